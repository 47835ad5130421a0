# Training top-k at prefill speed (issue 17 item 5): the sampled, blocked
# training top-k and the multi-query dot kernel behind the exact scan.
kvr_test(train_topk_test SOURCES unit/train_topk_test.cc DEPS kvr::common LABELS unit TIMEOUT 120)
# The worker's hand-off under EngineOptions::max_train_queries (--max_train_queries):
# bounded, exact training lists of the sampled prefill queries on stories260K.
kvr_test(train_topk_engine_test SOURCES unit/train_topk_engine_test.cc
  DEPS kvr::engine kvr::retrieval_client LABELS unit TIMEOUT 300)
# The node's own training-set preparation (BuildFromQueries) on TrainingTopK's sample.
kvr_test(train_topk_graph_test SOURCES unit/train_topk_graph_test.cc
  DEPS kvr::index LABELS unit TIMEOUT 120)
