// CUDA / cuBLAS error codes as absl::Status. Host-side only (.cc files); the
// .cu launchers return cudaError_t and never include absl.
//
//   cudaErrorMemoryAllocation  -> ResourceExhausted (with the bytes requested)
//   invalid argument / value   -> InvalidArgument
//   no device / driver issues  -> FailedPrecondition
//   anything else              -> Internal
// Every message names the failing call and the CUDA error name and string.
#pragma once

#include <cstddef>

#include "gpu_worker/backend/cuda/cuda_api.h"

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "common/status.h"

namespace kvr::worker::cuda {

// OK for cudaSuccess. `what` names the call (e.g. "cudaMemcpyAsync").
absl::Status CudaStatus(cudaError_t err, absl::string_view what);

// Like CudaStatus, for an allocation of `bytes`: out-of-memory becomes
// ResourceExhausted "<what>: out of memory allocating N bytes on device D".
absl::Status CudaAllocStatus(cudaError_t err, absl::string_view what, size_t bytes);

// OK for CUBLAS_STATUS_SUCCESS; CUBLAS_STATUS_ALLOC_FAILED is
// ResourceExhausted, CUBLAS_STATUS_NOT_SUPPORTED Unimplemented.
absl::Status CublasStatus(cublasStatus_t err, absl::string_view what);

}  // namespace kvr::worker::cuda

// Returns from the enclosing function when a CUDA runtime call fails.
#define KVR_CUDA_RETURN_IF_ERROR(expr) \
  KVR_RETURN_IF_ERROR(::kvr::worker::cuda::CudaStatus((expr), #expr))
// Returns from the enclosing function when a cuBLAS call fails.
#define KVR_CUBLAS_RETURN_IF_ERROR(expr) \
  KVR_RETURN_IF_ERROR(::kvr::worker::cuda::CublasStatus((expr), #expr))
