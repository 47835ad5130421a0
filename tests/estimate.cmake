# Issue 18: remainder estimation (cluster summaries of the keys top-k leaves
# behind, retrieval_node/index/cluster_summary.h) and its node plumbing.
kvr_test(estimate_test SOURCES unit/estimate_test.cc
  DEPS kvr::index kvr::attention_data LABELS unit TIMEOUT 300)
