# Server bounds of kvr_worker and kvr_gateway (issue 14, deliverable 4):
# the gateway's whole-request HTTP deadline (a trickled body or head gets 408),
# --max_concurrent_streams on both binaries (a third call on one connection
# waits), the worker's --max_deadline_seconds and device memory budget (on
# the emulated CUDA plugin when it is built), the new flags' ranges. Real
# processes on 127.0.0.1, CPU backend, stories260K.
if(TARGET kvr_gateway)
  # The emulated CUDA plugin is defined later in the tree (as for
  # generation_e2e_test): named by generator expression, not TARGET checks.
  kvr_test(bounds_test
    SOURCES hostile/bounds_test.cc
    DEPS kvr::proto kvr::common gRPC::grpc++ absl::strings absl::time
    PROTOBUF_FIRST
    NEEDS kvr_gateway kvr_worker kvr_cuda_emulated_plugin
    LABELS e2e hostile
    TIMEOUT 180
    ENVIRONMENT KVR_GATEWAY_BIN=$<TARGET_FILE:kvr_gateway> KVR_WORKER_BIN=$<TARGET_FILE:kvr_worker>
      KVR_CUDA_EMULATED_PLUGIN=$<TARGET_FILE:kvr_cuda_emulated_plugin>)
endif()
# The worker's host / device memory budgets at the scheduler (a real
# stories260K engine on the CPU backend, device accounting switched on).
kvr_test(bounds_budget_test SOURCES hostile/bounds_budget_test.cc PROTOBUF_FIRST
  DEPS kvr::worker_server kvr::engine kvr::retrieval_client
  LABELS unit hostile TIMEOUT 120)
