# CUDA backend vs the CPU backend (label gpu). Skips without a device.
kvr_test(cuda_backend_test SOURCES unit/cuda_backend_test.cc
  DEPS kvr::cuda_backend kvr::model kvr::engine kvr::retrieval_client
  LABELS "gpu;unit")
