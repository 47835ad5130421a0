# retrieval_node/store: kvr_node --data_dir (RocksDB). In-process recovery,
# SIGKILL during a stream of appends, SIGTERM restart, corrupt blobs.
add_executable(persistence_test integration/persistence_test.cc)
target_compile_options(persistence_test PRIVATE ${KVR_WARNINGS})
target_link_libraries(persistence_test PRIVATE kvr::remote_clients kvr::shard_store
  RocksDB::rocksdb GTest::gtest)
add_dependencies(persistence_test kvr_node)
add_test(NAME persistence_test
  COMMAND persistence_test --kvr_node $<TARGET_FILE:kvr_node>)
set_tests_properties(persistence_test PROPERTIES LABELS integration TIMEOUT 300)
