// The CUDA backend: device memory, one CUDA stream and one cuBLAS handle per
// instance, fp32 compute matching the CPU backend op by op (see README.md for
// what is implemented and what is left).
//
// Asynchrony: ops enqueue on the instance's stream and return; Download,
// Argmax, TopK and Synchronize wait for the stream (never the whole device).
// Host spans that ops take (Embedding tokens, Rope positions) are copied
// through pinned staging before the op returns, so callers may reuse them at
// once. Upload of up to 4 MiB goes through one of 8 pinned buffers used in
// turn (waiting only for the copy issued from the same buffer 8 uploads ago,
// so a few small uploads in a row do not wait at all); larger uploads copy
// from pageable memory.
//
// TopK (the optional Backend op, top_k <= 64) runs on the device: one block
// per (query, head) over the key range, exact, ExactTopK's order.
//
// Weights: MatMul takes f32, bf16 or f16 w; with half weights and at most
// kGemvMaxTokens (8) rows of x a GEMV kernel multiplies in fp32 (the CPU's
// numerics); larger batches round x to the weight's type and use cuBLAS
// tensor cores with fp32 accumulation. f32 weights always use cuBLAS
// (CUBLAS_COMPUTE_32F, no TF32). Embedding tables: f32, bf16 or f16.
//
// Errors: every CUDA and cuBLAS call is checked; out-of-memory is
// ResourceExhausted naming the bytes requested; no device is
// FailedPrecondition. Thread-safety as for every Backend.
//
// This header has no CUDA includes: code that only links kvr::cuda_backend
// compiles without the toolkit headers.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "gpu_worker/backend/backend.h"

namespace kvr::worker {

// Also reachable as BackendRegistry::Create("cuda", options) once registered.
// FailedPrecondition when no CUDA device is usable; InvalidArgument for a
// device ordinal out of range.
absl::StatusOr<std::unique_ptr<Backend>> NewCudaBackend(const BackendOptions& options);

// Registers "cuda" with BackendRegistry. Idempotent and thread-safe; also run
// by a static initializer of this library's backend translation unit, which
// a static link keeps whenever anything in it is referenced, so calling this
// once (e.g. from main) is the reliable way to get "cuda" registered.
absl::Status RegisterCudaBackend();

// The number of usable CUDA devices; 0 when there are none, with *why (if
// non-null) set to e.g. "cudaGetDeviceCount returned cudaErrorNoDevice (no
// CUDA-capable device is detected)".
int CudaDeviceCount(std::string* why = nullptr);


}  // namespace kvr::worker
