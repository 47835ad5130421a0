// The CPU backend: host memory, fp32 compute with the runtime-dispatched SIMD
// kernels (common/simd) and a private ThreadPool of num_threads - 1 workers
// (the calling thread takes part). Synchronous: every op has finished when it
// returns. Weights for MatMul may be f32 or bf16; Embedding tables f32, bf16
// or f16. f32 MatMuls of >= 16 rows (prefill) call OpenBLAS sgemm when the
// build links it and it detected a core with AVX2/AVX-512 kernels, or when
// BackendOptions::cpu_matmul / KVR_CPU_MATMUL force it (openblas_gemm.h).
// Every other MatMul (bf16 weights at any row count, f32 below 16 rows or
// without OpenBLAS) runs the register-blocked simd matmul_bf16 / matmul_f32
// kernels (common/simd/kernels.h), output rows split across the threads in
// blocks of 32: fp32 accumulation, and each output depends only on its own
// token row and weight row, so a sequence's logits are bit-identical alone
// or in a decode batch. KVR_CPU_GEMM=dot selects the previous per-dot path
// (one dot_bf16 / dot per token and output row; for comparisons);
// KVR_CPU_GEMM=blocked (or unset) the blocked one; any other value is
// InvalidArgument. Describe() names the choices. Per-op scratch is
// thread-local and grows once to the largest size seen, so steady-state
// decode does not allocate.
#pragma once

#include <memory>

#include "absl/status/statusor.h"
#include "gpu_worker/backend/backend.h"

namespace kvr::worker {

// Also reachable as BackendRegistry::Create("cpu", options).
absl::StatusOr<std::unique_ptr<Backend>> NewCpuBackend(const BackendOptions& options);

}  // namespace kvr::worker
