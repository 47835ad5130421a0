# Background tail seals and the decode query ring of the retrieval node
# (retrieval_node/core/): Attends during a held seal, a stop between a seal's
# build and its install, the ring in the memory budget.
kvr_test(seal_test SOURCES unit/seal_test.cc
  DEPS kvr::node_core kvr::shard_store RocksDB::rocksdb
  LABELS unit TIMEOUT 120)
