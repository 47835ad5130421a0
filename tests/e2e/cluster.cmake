# tools/cluster: `kvr cluster` (3 kvr_node + kvr_worker + kvr_gateway) started
# from the test; generation through the gateway's gRPC (stub and `kvr
# client`) and HTTP APIs vs the embedded engine; logs; clean SIGTERM stop;
# a dead child stops the rest. Without kvr_gateway the worker-only part runs.
find_package(PkgConfig REQUIRED)
pkg_check_modules(KVR_TEST_HTTPLIB REQUIRED IMPORTED_TARGET cpp-httplib)
find_package(nlohmann_json 3 CONFIG REQUIRED)
add_executable(cluster_e2e_test e2e/cluster_test.cc)
target_compile_options(cluster_e2e_test PRIVATE ${KVR_WARNINGS})
kvr_link_protobuf_first(cluster_e2e_test)  # libsentencepiece: see cmake/KvrTargets.cmake
target_link_libraries(cluster_e2e_test PRIVATE kvr::proto kvr::cluster_cli
  kvr::common kvr::engine kvr::retrieval_client kvr::model PkgConfig::KVR_TEST_HTTPLIB
  nlohmann_json::nlohmann_json GTest::gtest)
add_dependencies(cluster_e2e_test kvr kvr_node kvr_worker)
set(kvr_cluster_test_args)
if(TARGET kvr_gateway)
  add_dependencies(cluster_e2e_test kvr_gateway)
  set(kvr_cluster_test_args --with_gateway)
endif()
add_test(NAME cluster_e2e_test
  COMMAND cluster_e2e_test --kvr $<TARGET_FILE:kvr> ${kvr_cluster_test_args})
set_tests_properties(cluster_e2e_test PROPERTIES LABELS e2e TIMEOUT 180
  ENVIRONMENT "${KVR_TEST_ENVIRONMENT}")
