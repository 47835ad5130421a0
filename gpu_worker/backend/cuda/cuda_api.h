// The CUDA runtime, kernel-language and cuBLAS declarations of the backend:
// the toolkit's headers, or, with KVR_CUDA_EMULATION defined, the CPU
// emulator's (emulator/cuda_emulator.h), which runs the same sources in
// tests without a GPU. Every backend file includes this instead of naming a
// toolkit header, and launches kernels through KVR_LAUNCH:
//
//   KVR_LAUNCH(Kernel, grid, block, shared_bytes, stream)(args...);
//   KVR_DYNAMIC_SHARED(float, smem);  // extern __shared__ float smem[];
//
// (`Kernel<<<grid, block, shared_bytes, stream>>>(args...)` under nvcc; a
// kernel template is named with its arguments, Kernel<float>.)
#pragma once

#if defined(KVR_CUDA_EMULATION)

#include "gpu_worker/backend/cuda/emulator/cuda_emulator.h"

#define KVR_LAUNCH(kernel, grid, block, shared_bytes, stream) \
  ::kvr::cuda_emu::Launch(#kernel, kernel, grid, block, shared_bytes, stream)
#define KVR_DYNAMIC_SHARED(type, name) type* const name = ::kvr::cuda_emu::DynamicShared<type>()

#else

#include <cublas_v2.h>
#include <cuda_runtime_api.h>
#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#define KVR_LAUNCH(kernel, grid, block, shared_bytes, stream) \
  kernel<<<grid, block, shared_bytes, stream>>>
#define KVR_DYNAMIC_SHARED(type, name) extern __shared__ type name[]

#endif
