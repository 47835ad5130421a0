// Sampling helpers of the CUDA backend: row softmax with temperature and row
// argmax (lowest index among ties, like the CPU backend). Launchers enqueue on
// `stream` and return the launch error.
#pragma once

#include <cstdint>

#include "gpu_worker/backend/cuda/cuda_api.h"

namespace kvr::worker::cuda {

// x [n x v] in place: softmax(x / temperature) per row.
cudaError_t LaunchSoftmax(float* x, int64_t n, int64_t v, float temperature, cudaStream_t stream);

// out[i] = argmax of row i of x [n x v]; out is device memory (n int32).
cudaError_t LaunchArgmax(const float* x, int64_t n, int64_t v, int32_t* out, cudaStream_t stream);

}  // namespace kvr::worker::cuda
