# Hostile input to the retrieval node (issue 14): index loaders, position
# and shape limits in process; with services, real kvr_node processes
# (append overflow + restart, recovery quarantine, upload memory budget).
kvr_test(node_limits_test SOURCES hostile/node_limits_test.cc DEPS kvr::node_core kvr::index)
if(KVR_WITH_SERVICES)
  kvr_test(node_hostile_test SOURCES hostile/node_hostile_test.cc NODE_MAIN
    DEPS kvr::remote_clients kvr::node_wire kvr::shard_store RocksDB::rocksdb
    ARGS --kvr_node $<TARGET_FILE:kvr_node>
    NEEDS kvr_node LABELS integration TIMEOUT 300)
endif()
