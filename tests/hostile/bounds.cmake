# Server bounds of kvr_worker and kvr_gateway (issue 14, deliverable 4):
# the gateway's whole-request HTTP deadline (a trickled body or head gets 408),
# --max_concurrent_streams on both binaries (a third call on one connection
# waits), the worker's --max_deadline_seconds, the new flags' ranges. Real
# processes on 127.0.0.1, CPU backend, stories260K.
if(TARGET kvr_gateway)
  kvr_test(bounds_test
    SOURCES hostile/bounds_test.cc
    DEPS kvr::proto kvr::common gRPC::grpc++ absl::strings absl::time
    PROTOBUF_FIRST
    NEEDS kvr_gateway kvr_worker
    LABELS e2e hostile
    TIMEOUT 180
    ENVIRONMENT KVR_GATEWAY_BIN=$<TARGET_FILE:kvr_gateway> KVR_WORKER_BIN=$<TARGET_FILE:kvr_worker>)
endif()
