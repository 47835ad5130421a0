# Issue 17 item 3, session 26 (the near-flat family): the multi-query SQ8
# kernels (scan_sq8_multi, select_ge) bit-exact against their scalar oracle;
# flat_sq8 / IVF-SQ8 batches equal one query at a time on every data family,
# recall floors at rerank 2, and flat_sq8 at most half the exact scan's CPU.
kvr_test(sq8_multi_kernels_test SOURCES unit/sq8_multi_kernels_test.cc DEPS kvr::common
  TIMEOUT 120)
kvr_test(sq8_multi_index_test SOURCES unit/sq8_multi_index_test.cc
  DEPS kvr::index kvr::attention_data TIMEOUT 600)
