# gpu_worker/server metrics: a real kvr_worker's /metrics scraped over
# loopback, counters checked against the Generate calls made, decode phases
# against the decode step durations, the page by `promtool check metrics`.
kvr_test(worker_metrics_test SOURCES integration/worker_metrics_test.cc OWN_MAIN PROTOBUF_FIRST
  DEPS kvr::proto kvr::common gRPC::grpc++ absl::time
  ARGS --kvr_worker $<TARGET_FILE:kvr_worker> NEEDS kvr_worker
  LABELS integration TIMEOUT 180)
