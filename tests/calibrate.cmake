# Self-calibration (issue 17 item 4): retrieval_node/index/calibrate.h and
# the node / worker paths that feed it held-back queries.
kvr_test(calibrate_test SOURCES unit/calibrate_test.cc DEPS kvr::index kvr::attention_data
         LABELS unit TIMEOUT 300)
