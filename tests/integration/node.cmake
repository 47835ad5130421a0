# retrieval_node/server: three real kvr_node processes on loopback vs the
# in-process node; bad input, limits, health, reflection, SIGTERM.
kvr_test(node_integration_test SOURCES integration/node_integration_test.cc NODE_MAIN
  DEPS kvr::remote_clients kvr::node_wire kvr::health_proto
  ARGS --kvr_node $<TARGET_FILE:kvr_node> NEEDS kvr_node
  LABELS integration TIMEOUT 300)
