# Issue 17 (session 26): index auto chooses by measured time (ChooseFastest's
# rule, the fastest IVF kind kept where it clearly wins, a faster candidate
# missing the target never kept), IVF-SQ8 as its own kind (names, old blobs),
# measured_us in the calibrated blob.
kvr_test(index_auto_test SOURCES unit/index_auto_test.cc DEPS kvr::index kvr::attention_data
  LABELS unit TIMEOUT 300)
# Against a real kvr_node: INDEX_TYPE_IVF_SQ8 in ListShards and the metrics,
# ShardInfo.measured_search_us and the auto metrics, --rerank_factor checked.
if(KVR_WITH_SERVICES)
  kvr_test(index_auto_grpc_test SOURCES integration/index_auto_grpc_test.cc NODE_MAIN
    DEPS kvr::remote_clients kvr::attention_data
    ARGS --kvr_node $<TARGET_FILE:kvr_node> NEEDS kvr_node
    LABELS integration TIMEOUT 300)
endif()
