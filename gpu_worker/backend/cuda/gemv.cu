#include "gpu_worker/backend/cuda/gemv.cuh"

#include "gpu_worker/backend/cuda/reduce.cuh"

namespace kvr::worker::cuda {
namespace {

constexpr int kWarpsPerBlock = 8;

__device__ __forceinline__ float ToF32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float ToF32(__half v) { return __half2float(v); }

// One warp per output feature o; every lane walks `in` with a stride of 32
// (8 weights = 16 bytes per step on the vector path) for all n tokens.
template <typename T>
__global__ void GemvKernel(const float* __restrict__ x, const T* __restrict__ w, int n,
                           int64_t in, int64_t out, float* __restrict__ y, bool vec8) {
  const int lane = threadIdx.x & 31;
  const int64_t o = int64_t{blockIdx.x} * kWarpsPerBlock + (threadIdx.x >> 5);
  if (o >= out) return;
  const T* wr = w + o * in;
  float acc[kGemvMaxTokens];
#pragma unroll
  for (int i = 0; i < kGemvMaxTokens; ++i) acc[i] = 0.0f;
  if (vec8) {
    for (int64_t k = int64_t{lane} * 8; k < in; k += 32 * 8) {
      const uint4 packed = *reinterpret_cast<const uint4*>(wr + k);
      const T* wv = reinterpret_cast<const T*>(&packed);
      float wf[8];
#pragma unroll
      for (int t = 0; t < 8; ++t) wf[t] = ToF32(wv[t]);
#pragma unroll
      for (int i = 0; i < kGemvMaxTokens; ++i) {
        if (i < n) {
          const float4 a = *reinterpret_cast<const float4*>(x + i * in + k);
          const float4 b = *reinterpret_cast<const float4*>(x + i * in + k + 4);
          float s = acc[i];
          s = fmaf(a.x, wf[0], s);
          s = fmaf(a.y, wf[1], s);
          s = fmaf(a.z, wf[2], s);
          s = fmaf(a.w, wf[3], s);
          s = fmaf(b.x, wf[4], s);
          s = fmaf(b.y, wf[5], s);
          s = fmaf(b.z, wf[6], s);
          s = fmaf(b.w, wf[7], s);
          acc[i] = s;
        }
      }
    }
  } else {
    for (int64_t k = lane; k < in; k += 32) {
      const float wf = ToF32(wr[k]);
#pragma unroll
      for (int i = 0; i < kGemvMaxTokens; ++i) {
        if (i < n) acc[i] = fmaf(x[i * in + k], wf, acc[i]);
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kGemvMaxTokens; ++i) {
    if (i < n) {
      const float s = WarpSum(acc[i]);
      if (lane == 0) y[i * out + o] = s;
    }
  }
}

template <typename T>
__global__ void ConvertKernel(const float* src, T* dst, int64_t count);

template <>
__global__ void ConvertKernel<__nv_bfloat16>(const float* src, __nv_bfloat16* dst, int64_t count) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < count;
       i += int64_t{gridDim.x} * blockDim.x) {
    dst[i] = __float2bfloat16_rn(src[i]);
  }
}

template <>
__global__ void ConvertKernel<__half>(const float* src, __half* dst, int64_t count) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < count;
       i += int64_t{gridDim.x} * blockDim.x) {
    dst[i] = __float2half_rn(src[i]);
  }
}

}  // namespace

cudaError_t LaunchGemvHalf(const float* x, const void* w, bool bf16, int64_t n, int64_t in,
                           int64_t out, float* y, cudaStream_t stream) {
  if (n == 0 || out == 0) return cudaSuccess;
  const bool vec8 = in % 8 == 0 && reinterpret_cast<uintptr_t>(w) % 16 == 0 &&
                    reinterpret_cast<uintptr_t>(x) % 16 == 0;
  const dim3 grid(static_cast<unsigned>((out + kWarpsPerBlock - 1) / kWarpsPerBlock));
  if (bf16) {
    KVR_LAUNCH(GemvKernel<__nv_bfloat16>, grid, kWarpsPerBlock * 32, 0, stream)(
        x, static_cast<const __nv_bfloat16*>(w), static_cast<int>(n), in, out, y, vec8);
  } else {
    KVR_LAUNCH(GemvKernel<__half>, grid, kWarpsPerBlock * 32, 0, stream)(
        x, static_cast<const __half*>(w), static_cast<int>(n), in, out, y, vec8);
  }
  return cudaGetLastError();
}

cudaError_t LaunchConvertF32ToHalf(const float* src, void* dst, bool bf16, int64_t count,
                                   cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  const int64_t blocks64 = (count + 255) / 256;
  const unsigned blocks = static_cast<unsigned>(blocks64 < 65535 ? blocks64 : 65535);
  if (bf16) {
    KVR_LAUNCH(ConvertKernel<__nv_bfloat16>, blocks, 256, 0, stream)(
        src, static_cast<__nv_bfloat16*>(dst), count);
  } else {
    KVR_LAUNCH(ConvertKernel<__half>, blocks, 256, 0, stream)(
        src, static_cast<__half*>(dst), count);
  }
  return cudaGetLastError();
}

}  // namespace kvr::worker::cuda
