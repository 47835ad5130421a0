# Per-head parallel search within one Attend / AttendBatch item
# (--search_threads; session 26, issue 20 item 2): bit-identical partials and
# stats at search_threads 1 / 4 / 0 over random requests, 64-item batches
# from several threads on one-thread pools complete before a deadline (no
# nested-pool deadlock), the option's limit.
kvr_test(attend_parallel_test SOURCES unit/attend_parallel_test.cc DEPS kvr::retrieval_client
  LABELS unit TIMEOUT 300)
