# Per-head parallel search within one Attend / AttendBatch item
# (--search_threads; session 26, issue 20 item 2): bit-identical partials and
# stats at search_threads 1 / 4 / 0 over random requests, 64-item batches
# from several threads on one-thread pools complete before a deadline (no
# nested-pool deadlock), the option's limit.
kvr_test(attend_parallel_test SOURCES unit/attend_parallel_test.cc DEPS kvr::retrieval_client
  LABELS unit TIMEOUT 300)
# decode_bench --prefill_contexts (session 26, issue 20 item 1 "a real
# prefill"): prefill rows exist per mode and search_threads, the prefill
# changed the context, exact retrieval equals full attention on it (logits
# within 1e-4 relative, every top-1 equal), search_threads 1 and 0 give the
# same logits, a bad entry is refused naming the flag.
if(TARGET decode_bench)
  find_package(Python3 REQUIRED COMPONENTS Interpreter)
  kvr_test(decode_prefill_test
    COMMAND ${Python3_EXECUTABLE} ${CMAKE_CURRENT_SOURCE_DIR}/e2e/decode_prefill_test.py
      $<TARGET_FILE:decode_bench>
    NEEDS decode_bench LABELS "e2e;bench" TIMEOUT 600)
endif()
