# Issue 17, items 1 and 2: the attention data families (tools/attention_data)
# and index_bench running every method on every family.
kvr_test(attention_families_test SOURCES unit/attention_families_test.cc
  DEPS kvr::attention_data TIMEOUT 300)
