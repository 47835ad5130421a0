# Issue 17, session 27 (H2): PcaSq8Index (an SQ8 scan of the keys' top
# principal directions + exact rerank): the Jacobi eigen-decomposition
# against a double oracle, recall floors on every data family, exact
# scores, batches, blobs, appends, auto's pca_sq8 candidate and timing at
# the GQA group size (CalibrationOptions::queries_per_search).
kvr_test(pca_sq8_index_test SOURCES unit/pca_sq8_index_test.cc
  DEPS kvr::index kvr::attention_data TIMEOUT 600)

# The node: CalibrationForSpec (n_heads / n_kv_heads reach auto's timing),
# the pca_sq8 head_dim bound, the kvr.v1 enum, and a pca_sq8 sequence's
# build, Attend (the flat node's top-k) and seal.
kvr_test(pca_node_test SOURCES unit/pca_node_test.cc
  DEPS kvr::node_wire LABELS unit TIMEOUT 120)
