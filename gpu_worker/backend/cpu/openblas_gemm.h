// OpenBLAS for the CPU backend's many-row MatMuls (prefill GEMM).
//
// Debian's OpenBLAS is built with DYNAMIC_ARCH: it picks its kernels from the
// CPU it detects at load time and reports that choice through
// openblas_get_corename(). With its AVX2 / AVX-512 kernels its sgemm is 2–3×
// the backend's own kernels at prefill shapes; when it misdetects the CPU
// (e.g. "Prescott" on some VMs) it falls back to SSE3 kernels and is 1.6×
// slower (docs/benchmarks.md §6). So the backend calls it only when the core
// name is one with AVX2 / AVX-512 kernels, or when the user forces it.
//
// Compiled as a no-op when the build has no OpenBLAS (KVR_WITH_OPENBLAS).
// Thread-safe.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

namespace kvr::worker {

// True when this build links OpenBLAS.
bool OpenBlasBuilt();

// openblas_get_corename() (e.g. "Haswell", "SkylakeX", "Prescott"); "" when
// not built with OpenBLAS.
std::string OpenBlasCoreName();

// True for the OpenBLAS cores whose sgemm kernels use AVX2 or AVX-512
// (Haswell, Zen, SkylakeX, CooperLake, SapphireRapids); case-insensitive.
bool OpenBlasCoreIsModern(std::string_view core);

// y[n x out] = x[n x in] * w[out x in]^T, all dense row-major fp32, on
// `threads` OpenBLAS threads. Must not be called when !OpenBlasBuilt().
void OpenBlasSgemmNT(int threads, size_t n, size_t in, size_t out, const float* x,
                     const float* w, float* y);

}  // namespace kvr::worker
