# gpu_worker/server: a real kvr_worker (in-process node) on loopback vs the
# embedded engine; streaming, concurrency, cancellation, bad requests,
# overload, health, reflection, SIGTERM; and a worker on a real kvr_node.
kvr_test(generation_e2e_test SOURCES e2e/generation_test.cc OWN_MAIN PROTOBUF_FIRST
  DEPS kvr::proto kvr::health_proto kvr::engine kvr::retrieval_client kvr::model
  ARGS --kvr_worker $<TARGET_FILE:kvr_worker> --kvr_node $<TARGET_FILE:kvr_node>
    --cuda_emulated_plugin $<TARGET_FILE:kvr_cuda_emulated_plugin>
  NEEDS kvr_worker kvr_node kvr_cuda_emulated_plugin
  LABELS e2e TIMEOUT 300)
