// Row-wise and elementwise kernels of the CUDA backend: embedding gather,
// RMSNorm, RoPE, SwiGLU, Add. Launchers enqueue on `stream` and return the
// launch error (cudaGetLastError); shapes are validated by the caller
// (cuda_backend.cc). All compute is fp32 and follows the CPU backend's
// formulas operation by operation. No absl here: this header is included by
// .cu files.
#pragma once

#include <cstdint>

#include "gpu_worker/backend/cuda/cuda_api.h"

namespace kvr::worker::cuda {

// Storage type of an Embedding table (values of DType).
enum class TableType : int { kF32 = 0, kBf16 = 1, kF16 = 2 };

// out[i, :] = table[tokens[i], :] as f32. tokens is device memory (n ids,
// already checked against the vocabulary).
cudaError_t LaunchEmbedding(const void* table, TableType type, const int32_t* tokens, int64_t n,
                            int64_t d, float* out, cudaStream_t stream);

// out[i] = w * (x[i] / sqrt(mean(x[i]^2) + eps)); out may alias x.
cudaError_t LaunchRmsNorm(const float* x, const float* weight, float eps, int64_t n, int64_t d,
                          float* out, cudaStream_t stream);

// Rotates x [n x n_heads*head_dim] in place; positions (device, n) and
// inv_freq (device, head_dim/2). interleaved: pairs (2k, 2k+1), else
// (k, k + head_dim/2).
cudaError_t LaunchRope(float* x, int64_t n, int n_heads, int head_dim, const int32_t* positions,
                       const float* inv_freq, bool interleaved, cudaStream_t stream);

// out = silu(gate) * up over `count` elements; out may alias either input.
cudaError_t LaunchSwiGlu(const float* gate, const float* up, float* out, int64_t count,
                         cudaStream_t stream);

// x += y over `count` elements.
cudaError_t LaunchAdd(float* x, const float* y, int64_t count, cudaStream_t stream);

}  // namespace kvr::worker::cuda
