# `kvr capture` (tools/capture.h): shapes of the .npy files, attention
# recomputed from them equals the backend's output, greedy tokens equal the
# engine's full-attention generation, and the bounds (context, output bytes,
# layers, non-empty --out, prompt file size).
kvr_test(capture_test SOURCES unit/capture_test.cc
  DEPS kvr::capture kvr::engine kvr::llama_reference kvr::retrieval_client
  TIMEOUT 120)
