# Attention math, flat/IVF indexes, serialization and Attend.
kvr_test(attention_test SOURCES unit/attention_test.cc DEPS kvr::common)
kvr_test(flat_index_test SOURCES unit/flat_index_test.cc DEPS kvr::index)
kvr_test(ivf_index_test SOURCES unit/ivf_index_test.cc DEPS kvr::index)
kvr_test(serialize_test SOURCES unit/serialize_test.cc DEPS kvr::index)
kvr_test(attend_test SOURCES unit/attend_test.cc DEPS kvr::index)
