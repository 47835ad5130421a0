# retrieval_node/server UCX data plane: a real kvr_node with --ucx_listen on
# loopback; Attend over UCX vs gRPC vs in-process (bit-identical), bad input,
# deadlines, fallback to gRPC. UCX transports: tcp on lo (skips with the UCX
# error when UCX cannot run).
kvr_test(ucx_test SOURCES integration/ucx_test.cc OWN_MAIN
  DEPS kvr::node_server kvr::remote_clients
  ARGS --kvr_node $<TARGET_FILE:kvr_node> NEEDS kvr_node
  LABELS integration TIMEOUT 180
  ENVIRONMENT UCX_TLS=tcp UCX_NET_DEVICES=lo UCX_WARN_UNUSED_ENV_VARS=n)
