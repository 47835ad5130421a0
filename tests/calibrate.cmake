# Self-calibration (issue 17 item 4): retrieval_node/index/calibrate.h and
# the node / worker paths that feed it held-back queries.
kvr_test(calibrate_test SOURCES unit/calibrate_test.cc DEPS kvr::index kvr::attention_data
         LABELS unit TIMEOUT 300)
# Worker hand-off -> node: held-back queries reach the node, chunks report
# their calibration, index auto serves like the exact scan on small chunks,
# hostile held-back data is refused.
kvr_test(calibrate_node_test SOURCES unit/calibrate_node_test.cc
         DEPS kvr::engine kvr::retrieval_client kvr::node_core kvr::attention_data
         LABELS unit TIMEOUT 300)
