# Replication and failover with three real kvr_node processes (kill -9,
# SIGSTOP, restart on the same port with the same --data_dir).
# failover_test: liveness (down within 1 s, back after restart) and
# placement on live nodes. failover_replicas_test: the same program's
# replica tests, which need the node side of the contract
# (AttendRequest::shards honoured, SyncShards implemented).
kvr_test(failover_test SOURCES integration/failover_test.cc OWN_MAIN
  DEPS kvr::client_factory kvr::remote_clients
  ARGS --kvr_node $<TARGET_FILE:kvr_node> --kvr_worker $<TARGET_FILE:kvr_worker>
    --gtest_filter=FailoverLivenessTest.*
  NEEDS kvr_node kvr_worker LABELS integration TIMEOUT 120)
kvr_test(failover_replicas_test
  COMMAND $<TARGET_FILE:failover_test> --kvr_node $<TARGET_FILE:kvr_node>
    --kvr_worker $<TARGET_FILE:kvr_worker> --gtest_filter=FailoverReplicasTest.*
  NEEDS kvr_node failover_test LABELS integration TIMEOUT 120)
