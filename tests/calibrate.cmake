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
# The held-back queries over gRPC to a real kvr_node (ShardHeader.holdout_*),
# ListShards' search_effort / expected_recall, --target_recall checked.
if(KVR_WITH_SERVICES)
  kvr_test(calibrate_grpc_test SOURCES integration/calibrate_grpc_test.cc NODE_MAIN
    DEPS kvr::remote_clients kvr::attention_data
    ARGS --kvr_node $<TARGET_FILE:kvr_node> NEEDS kvr_node
    LABELS integration TIMEOUT 300)
endif()
