# `kvr capture` (tools/capture.h): shapes of the .npy files, attention
# recomputed from them equals the backend's output, greedy tokens equal the
# engine's full-attention generation, and the bounds (context, output bytes,
# layers, non-empty --out, prompt file size).
kvr_test(capture_test SOURCES unit/capture_test.cc
  DEPS kvr::capture kvr::engine kvr::llama_reference kvr::retrieval_client
  TIMEOUT 120)
# The `kvr capture` command line: files, exit statuses, manifest tokens =
# `kvr generate --mode full`, and index_bench reading a captured head (when
# index_bench is built: it needs faiss and hnswlib).
if(TARGET index_bench)
  kvr_test(capture_cli_test
    COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/e2e/capture_cli_test.sh $<TARGET_FILE:kvr>
      $<TARGET_FILE:index_bench>
    NEEDS kvr index_bench LABELS e2e TIMEOUT 120)
else()
  kvr_test(capture_cli_test
    COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/e2e/capture_cli_test.sh $<TARGET_FILE:kvr>
    NEEDS kvr LABELS e2e TIMEOUT 120)
endif()
