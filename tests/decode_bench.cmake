# bench/decode_common (kvr::bench_decode_common): the VmRSS parser (8-digit
# regression) and the --contexts / --batches list parser with its bounds.
if(TARGET kvr_bench_decode_common)
  kvr_test(decode_common_test SOURCES unit/decode_common_test.cc
    DEPS kvr::bench_decode_common LABELS unit TIMEOUT 30)
endif()
# bench/decode_bench (issue 20 item 1) at its smallest shape: every mode
# (full, in-process retrieval, 3 kvr_node over gRPC and over UCX) produces a
# JSON row with the required fields; with an exact index covering the
# context, each retrieval mode's per-step logits equal full attention's within
# 1e-4 relative and its top-1 tokens are identical; a row over
# --memory_budget_bytes is skipped and named; a bad --batches is refused.
if(TARGET decode_bench)
  find_package(Python3 REQUIRED COMPONENTS Interpreter)
  kvr_test(decode_bench_smoke
    COMMAND ${Python3_EXECUTABLE} ${CMAKE_CURRENT_SOURCE_DIR}/e2e/decode_bench_test.py
      $<TARGET_FILE:decode_bench> $<TARGET_FILE:kvr_node>
    NEEDS decode_bench kvr_node LABELS "e2e;bench" TIMEOUT 600)
endif()
