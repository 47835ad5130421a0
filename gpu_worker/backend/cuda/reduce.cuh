// Warp and block reductions shared by the backend's kernels (device code
// only; include from .cu files). Block reductions must be reached by every
// thread of the block and return the result to all of them.
#pragma once

#include "gpu_worker/backend/cuda/cuda_api.h"

namespace kvr::worker::cuda {

__device__ __forceinline__ float WarpSum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float WarpMax(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// blockDim.x must be a multiple of 32 and at most 1024.
template <typename Op>
__device__ __forceinline__ float BlockReduce(float v, Op op, float identity) {
  __shared__ float partial[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  __syncthreads();  // `partial` may still be read by a previous reduction
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  const int warps = static_cast<int>(blockDim.x >> 5);
  v = lane < warps ? partial[lane] : identity;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

struct SumOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};
struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

__device__ __forceinline__ float BlockSum(float v) { return BlockReduce(v, SumOp{}, 0.0f); }
__device__ __forceinline__ float BlockMax(float v) {
  return BlockReduce(v, MaxOp{}, -__int_as_float(0x7f800000));
}

}  // namespace kvr::worker::cuda
