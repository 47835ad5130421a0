kvr_test(graph_test SOURCES unit/graph_test.cc DEPS kvr::index kvr::attention_data TIMEOUT 600)
