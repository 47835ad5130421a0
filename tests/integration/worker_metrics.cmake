# gpu_worker/server metrics: a real kvr_worker's /metrics scraped over
# loopback, counters checked against the Generate calls made, decode phases
# against the decode step durations, the page by `promtool check metrics`.
add_executable(worker_metrics_test integration/worker_metrics_test.cc)
target_compile_options(worker_metrics_test PRIVATE ${KVR_WARNINGS})
kvr_link_protobuf_first(worker_metrics_test)  # as for every test linking generated code
target_link_libraries(worker_metrics_test PRIVATE kvr::proto
  kvr::common gRPC::grpc++ absl::time GTest::gtest)
add_dependencies(worker_metrics_test kvr_worker)
add_test(NAME worker_metrics_test
  COMMAND worker_metrics_test --kvr_worker $<TARGET_FILE:kvr_worker>)
set_tests_properties(worker_metrics_test PROPERTIES LABELS integration TIMEOUT 180
  ENVIRONMENT "${KVR_TEST_ENVIRONMENT}")
