# tools/cluster: `kvr cluster` (3 kvr_node + kvr_worker + kvr_gateway) started
# from the test; generation through the gateway's gRPC (stub and `kvr
# client`) and HTTP APIs vs the embedded engine; logs; clean SIGTERM stop;
# a dead child stops the rest. Without kvr_gateway the worker-only part runs.
find_package(PkgConfig REQUIRED)
pkg_check_modules(KVR_TEST_HTTPLIB REQUIRED IMPORTED_TARGET cpp-httplib)
find_package(nlohmann_json 3 CONFIG REQUIRED)
set(kvr_cluster_test_args)
set(kvr_cluster_test_needs kvr kvr_node kvr_worker)
if(TARGET kvr_gateway)
  list(APPEND kvr_cluster_test_needs kvr_gateway)
  set(kvr_cluster_test_args --with_gateway)
endif()
kvr_test(cluster_e2e_test SOURCES e2e/cluster_test.cc OWN_MAIN PROTOBUF_FIRST
  DEPS kvr::proto kvr::cluster_cli kvr::common kvr::engine kvr::retrieval_client kvr::model
    PkgConfig::KVR_TEST_HTTPLIB nlohmann_json::nlohmann_json
  ARGS --kvr $<TARGET_FILE:kvr> ${kvr_cluster_test_args}
  NEEDS ${kvr_cluster_test_needs}
  LABELS e2e TIMEOUT 180)
