# retrieval_node/client: MultiNodeClient with R replicas over in-process
# fake nodes (routing, failover, staleness, sync orchestration, drops).
kvr_test(replicas_test SOURCES unit/replicas_test.cc DEPS kvr::remote_clients
  LABELS unit TIMEOUT 60)
