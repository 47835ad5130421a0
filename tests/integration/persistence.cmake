# retrieval_node/store: kvr_node --data_dir (RocksDB). In-process recovery,
# SIGKILL during a stream of appends, SIGTERM restart, corrupt blobs.
kvr_test(persistence_test SOURCES integration/persistence_test.cc NODE_MAIN
  DEPS kvr::remote_clients kvr::shard_store RocksDB::rocksdb
  ARGS --kvr_node $<TARGET_FILE:kvr_node> NEEDS kvr_node
  LABELS integration TIMEOUT 300)
