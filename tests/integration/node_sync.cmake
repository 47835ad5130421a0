# Replication support on the retrieval node (issue 15, node side):
# AttendRequest.shards (per-node shard selection) in-process, over gRPC and
# over UCX against a real kvr_node (UCX: tcp on lo; skips when UCX cannot run).
kvr_test(shard_select_test SOURCES integration/shard_select_test.cc OWN_MAIN
  DEPS kvr::node_server kvr::remote_clients
  ARGS --kvr_node $<TARGET_FILE:kvr_node> NEEDS kvr_node
  LABELS integration TIMEOUT 180
  ENVIRONMENT UCX_TLS=tcp UCX_NET_DEVICES=lo UCX_WARN_UNUSED_ENV_VARS=n)
# SyncShards: in-process NodeCores (delta, divergence, budget, concurrency)
# and real kvr_node processes (ReadShards stream, restart, unreachable source).
kvr_test(node_sync_test SOURCES integration/node_sync_test.cc OWN_MAIN
  DEPS kvr::node_server kvr::remote_clients
  ARGS --kvr_node $<TARGET_FILE:kvr_node> NEEDS kvr_node
  LABELS integration TIMEOUT 300)
