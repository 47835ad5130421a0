# AttentionGraphIndex, session 25 (issue 17 items 3 and 5): the positional
# recall floor (routers derived from the training top-k), the cheaper link
# pass (link_beam) and the graph blob's version 3 (version 2 still loads).
kvr_test(graph_speed_test SOURCES unit/graph_speed_test.cc
  DEPS kvr::index kvr::attention_data LABELS unit TIMEOUT 600)
