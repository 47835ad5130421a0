# retrieval_node/server UCX data plane: a real kvr_node with --ucx_listen on
# loopback; Attend over UCX vs gRPC vs in-process (bit-identical), bad input,
# deadlines, fallback to gRPC. UCX transports: tcp on lo (skips with the UCX
# error when UCX cannot run).
add_executable(ucx_test integration/ucx_test.cc)
target_compile_options(ucx_test PRIVATE ${KVR_WARNINGS})
target_link_libraries(ucx_test PRIVATE kvr::node_server kvr::remote_clients GTest::gtest)
add_dependencies(ucx_test kvr_node)
add_test(NAME ucx_test COMMAND ucx_test --kvr_node $<TARGET_FILE:kvr_node>)
set_tests_properties(ucx_test PROPERTIES LABELS integration TIMEOUT 180
  ENVIRONMENT "UCX_TLS=tcp;UCX_NET_DEVICES=lo;UCX_WARN_UNUSED_ENV_VARS=n")
