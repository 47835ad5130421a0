# tests for this area: data-set file IO (tools/dataset_io) and the synthetic
# attention data generator (tools/attention_data).
kvr_test(dataset_io_test SOURCES unit/dataset_io_test.cc DEPS kvr::dataset_io)
kvr_test(attention_data_test SOURCES unit/attention_data_test.cc DEPS kvr::attention_data)
