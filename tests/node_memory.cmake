# Session 27 (issue 20 item 3, and a CI flake): kvr_node's resident memory over
# gRPC uploads against the shard bytes it reports, and the gateway's
# lingering close (error answers reach clients that are still sending).
kvr_test(node_memory_test SOURCES integration/node_memory_test.cc OWN_MAIN
  DEPS kvr::remote_clients
  ARGS --kvr_node $<TARGET_FILE:kvr_node> NEEDS kvr_node
  LABELS integration TIMEOUT 300)

# The gateway's refusals (413 at a lying Content-Length, 400 for an oversized
# head or a malformed request) while the client is still sending: answered
# at once, the rest of the request drained, the connection ended by a FIN
# (services/gateway/http_server.h, lingering close).
if(TARGET kvr_gateway)
  kvr_test(gateway_linger_test
    SOURCES integration/gateway_linger_test.cc
    DEPS kvr::common absl::strings absl::time
    NEEDS kvr_gateway
    LABELS integration hostile
    TIMEOUT 300
    ENVIRONMENT KVR_GATEWAY_BIN=$<TARGET_FILE:kvr_gateway>)
endif()
