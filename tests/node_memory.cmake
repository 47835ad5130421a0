# Session 27 (issue 20 item 3, a CI flake): kvr_node's resident memory over
# gRPC uploads against the shard bytes it reports, and the gateway's
# lingering close (error answers reach clients that are still sending).
kvr_test(node_memory_test SOURCES integration/node_memory_test.cc OWN_MAIN
  DEPS kvr::remote_clients
  ARGS --kvr_node $<TARGET_FILE:kvr_node> NEEDS kvr_node
  LABELS integration TIMEOUT 300)
