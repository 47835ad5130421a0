# retrieval_node/server: three real kvr_node processes on loopback vs the
# in-process node; bad input, limits, health, reflection, SIGTERM.
add_executable(node_integration_test integration/node_integration_test.cc)
target_compile_options(node_integration_test PRIVATE ${KVR_WARNINGS})
target_link_libraries(node_integration_test PRIVATE kvr::remote_clients kvr::node_wire
  kvr::health_proto
  GTest::gtest)
add_dependencies(node_integration_test kvr_node)
add_test(NAME node_integration_test
  COMMAND node_integration_test --kvr_node $<TARGET_FILE:kvr_node>)
set_tests_properties(node_integration_test PROPERTIES LABELS integration TIMEOUT 300)
