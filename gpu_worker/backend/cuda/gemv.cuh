// Half-precision-weight helpers for MatMul: a GEMV-style kernel for few
// tokens (decode) that reads bf16/f16 weights once and multiplies them with
// fp32 activations in fp32 (the CPU backend's dot_bf16 numerics, no rounding
// of x), and the f32 -> bf16/f16 conversion of activations that the cuBLAS
// tensor-core path (gemm.cc) uses for larger batches.
#pragma once

#include <cstdint>

#include "gpu_worker/backend/cuda/cuda_api.h"

namespace kvr::worker::cuda {

// Token counts up to this use LaunchGemvHalf; more use cuBLAS.
inline constexpr int64_t kGemvMaxTokens = 8;

// y [n x out] = x [n x in] (f32) * w [out x in]^T, w bf16 (bf16 = true) or
// f16. n <= kGemvMaxTokens.
cudaError_t LaunchGemvHalf(const float* x, const void* w, bool bf16, int64_t n, int64_t in,
                           int64_t out, float* y, cudaStream_t stream);

// dst[i] = round-to-nearest-even(src[i]) as bf16 (bf16 = true) or f16.
cudaError_t LaunchConvertF32ToHalf(const float* src, void* dst, bool bf16, int64_t count,
                                   cudaStream_t stream);

}  // namespace kvr::worker::cuda
