# Issue 17 items 2-4 (SQ8): the int8 kernels against their scalar oracle, and
# FlatSq8Index / IVF-SQ8 recall, exact scores, blobs and auto's choice on
# every data family.
kvr_test(sq8_kernels_test SOURCES unit/sq8_kernels_test.cc DEPS kvr::common TIMEOUT 120)
kvr_test(sq8_index_test SOURCES unit/sq8_index_test.cc DEPS kvr::index kvr::attention_data
  TIMEOUT 600)
