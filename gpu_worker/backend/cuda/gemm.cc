#include "gpu_worker/backend/cuda/gemm.h"

#include <limits>

#include "absl/strings/str_cat.h"
#include "gpu_worker/backend/cuda/cuda_status.h"
#include "gpu_worker/backend/cuda/gemv.cuh"

namespace kvr::worker::cuda {

size_t MatMulScratchBytes(DType w_type, int64_t n, int64_t in) {
  if (w_type == DType::kF32 || n <= kGemvMaxTokens) return 0;
  return static_cast<size_t>(n) * static_cast<size_t>(in) * 2;
}

absl::Status CublasMatMul(cublasHandle_t handle, cudaStream_t stream, const float* x,
                          const void* w, DType w_type, float* y, int64_t n, int64_t in,
                          int64_t out, void* scratch) {
  if (n == 0 || out == 0) return absl::OkStatus();
  if (in == 0) {
    return CudaStatus(cudaMemsetAsync(y, 0, static_cast<size_t>(n * out) * sizeof(float), stream),
                      "cudaMemsetAsync(MatMul y)");
  }
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  if (n > kIntMax || in > kIntMax || out > kIntMax) {
    return absl::InvalidArgumentError(
        absl::StrCat("MatMul: dims n=", n, " in=", in, " out=", out, " exceed cuBLAS's int range"));
  }
  const bool half = w_type != DType::kF32;
  const bool bf16 = w_type == DType::kBf16;
  if (half && n <= kGemvMaxTokens) {
    return CudaStatus(LaunchGemvHalf(x, w, bf16, n, in, out, y, stream), "LaunchGemvHalf");
  }
  const void* b = x;
  cudaDataType_t ab_type = CUDA_R_32F;
  if (half) {
    KVR_RETURN_IF_ERROR(
        CudaStatus(LaunchConvertF32ToHalf(x, scratch, bf16, n * in, stream), "LaunchConvertF32ToHalf"));
    b = scratch;
    ab_type = bf16 ? CUDA_R_16BF : CUDA_R_16F;
  }
  // Column-major view: row-major y [n x out] is C = y^T (out x n, ld out);
  // row-major w [out x in] is A' = w^T (in x out, ld in); row-major x is
  // B = x^T (in x n, ld in). y^T = w x^T = A'^T B, hence OP_T, OP_N.
  const float alpha = 1.0f, beta = 0.0f;
  const int m_ = static_cast<int>(out), n_ = static_cast<int>(n), k_ = static_cast<int>(in);
  return CublasStatus(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, m_, n_, k_, &alpha, w,
                                   ab_type, k_, b, ab_type, k_, &beta, y, CUDA_R_32F, m_,
                                   CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                      absl::StrCat("cublasGemmEx(MatMul ", n, "x", in, " * ", out, "x", in, "^T ",
                                   DTypeName(w_type), ")"));
}

}  // namespace kvr::worker::cuda
