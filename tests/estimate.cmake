# Issue 18: remainder estimation (cluster summaries of the keys top-k leaves
# behind, retrieval_node/index/cluster_summary.h) and its node plumbing.
kvr_test(estimate_test SOURCES unit/estimate_test.cc
  DEPS kvr::index kvr::attention_data LABELS unit TIMEOUT 300)

# The node's Attend with EstimateMode off / on / default, appends and seals,
# memory, hostile modes and cluster counts.
kvr_test(node_estimate_test SOURCES unit/node_estimate_test.cc
  DEPS kvr::node_core LABELS unit TIMEOUT 120)

# AttentionOptions::estimate through the decode engine to every Attend.
kvr_test(estimate_engine_test SOURCES unit/estimate_engine_test.cc
  DEPS kvr::engine kvr::retrieval_client LABELS unit TIMEOUT 300)

# kvr.estimate in the gateway's OpenAI-compatible requests.
if(TARGET kvr_gateway_http)
  kvr_test(estimate_gateway_test SOURCES unit/estimate_gateway_test.cc
    DEPS kvr::gateway_http PROTOBUF_FIRST LABELS unit)
endif()
