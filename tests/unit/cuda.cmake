# CUDA backend vs the CPU backend (label gpu). Skips without a device.
kvr_test(cuda_backend_test SOURCES unit/cuda_backend_test.cc
  DEPS kvr::cuda_backend kvr::model kvr::llama_reference kvr::engine kvr::retrieval_client
  LABELS "gpu;unit")
# The real libkvr_cuda_plugin.so: loads without a device (the backend then
# explains), and threads with small stacks still start once cuBLAS is loaded.
kvr_test(cuda_plugin_test SOURCES unit/backend_plugin_test.cc DEPS kvr::worker_backend
  NEEDS kvr_cuda_plugin LABELS "gpu;unit")
target_compile_definitions(cuda_plugin_test PRIVATE KVR_TEST_REAL_CUDA=1
  KVR_TEST_PLUGIN="$<TARGET_FILE:kvr_cuda_plugin>")
