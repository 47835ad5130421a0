// MatMul on cuBLAS: y [n x out] = x [n x in] * w [out x in]^T, row-major,
// fp32 accumulation. Host-side (.cc) only.
#pragma once

#include <cstdint>

#include "gpu_worker/backend/cuda/cuda_api.h"

#include "absl/status/status.h"
#include "gpu_worker/backend/tensor.h"

namespace kvr::worker::cuda {

// Bytes of device scratch CublasMatMul needs for these operands (x rounded
// to the weight type for half weights and more than kGemvMaxTokens rows).
size_t MatMulScratchBytes(DType w_type, int64_t n, int64_t in);

// Enqueues the product on `stream` (the handle's stream). `scratch` holds
// MatMulScratchBytes(...) bytes. Dimensions must fit in int (cuBLAS);
// larger is InvalidArgument.
absl::Status CublasMatMul(cublasHandle_t handle, cudaStream_t stream, const float* x,
                          const void* w, DType w_type, float* y, int64_t n, int64_t in,
                          int64_t out, void* scratch);

}  // namespace kvr::worker::cuda
