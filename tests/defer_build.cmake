# Deferred index builds of the retrieval node (session 27, issue 17 item 5;
# NodeCoreOptions::defer_index_build, kvr_node --defer_index_build): the
# pending chunk is exact, the install equals the synchronous build, appends
# during a build, drop during a build, restart before and after the install.
kvr_test(defer_build_test SOURCES unit/defer_build_test.cc
  DEPS kvr::node_core kvr::shard_store RocksDB::rocksdb
  LABELS unit TIMEOUT 120)
# The engine over a deferring node (stories260K, retrieval mode): exact
# logits while builds are pending, the synchronous node's logits once they
# installed, also for a fork made while pending.
kvr_test(defer_build_engine_test SOURCES unit/defer_build_engine_test.cc
  DEPS kvr::engine kvr::retrieval_client LABELS unit TIMEOUT 300)
# kvr_node's flags, the wire field ShardInfo.index_pending and the metrics.
if(KVR_WITH_SERVICES)
  kvr_test(defer_build_grpc_test SOURCES integration/defer_build_grpc_test.cc NODE_MAIN
    DEPS kvr::remote_clients
    ARGS --kvr_node $<TARGET_FILE:kvr_node> NEEDS kvr_node
    LABELS integration TIMEOUT 300)
endif()
