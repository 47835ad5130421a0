# retrieval_node/client: MultiNodeClient with R replicas over in-process
# fake nodes (routing, failover, staleness, sync orchestration, drops).
kvr_test(replicas_test SOURCES unit/replicas_test.cc DEPS kvr::remote_clients
  LABELS unit TIMEOUT 60)
# gpu_worker/engine: a node whose CreateSequence / DropSequence hangs does
# not stall other sequences' decode steps (no engine-wide lock across them).
kvr_test(engine_node_hang_test SOURCES unit/engine_node_hang_test.cc
  DEPS kvr::engine kvr::retrieval_client LABELS unit TIMEOUT 120)
