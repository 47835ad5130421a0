# Issue 17, session 27 (H2): PcaSq8Index (an SQ8 scan of the keys' top
# principal directions + exact rerank): the Jacobi eigen-decomposition
# against a double oracle, recall floors on every data family, exact
# scores, batches, blobs, appends, auto's pca_sq8 candidate and timing at
# the GQA group size (CalibrationOptions::queries_per_search).
kvr_test(pca_sq8_index_test SOURCES unit/pca_sq8_index_test.cc
  DEPS kvr::index kvr::attention_data TIMEOUT 600)
