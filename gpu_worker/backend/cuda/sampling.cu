#include "gpu_worker/backend/cuda/sampling.cuh"

#include "gpu_worker/backend/cuda/reduce.cuh"

namespace kvr::worker::cuda {
namespace {

constexpr int kThreads = 256;

__global__ void SoftmaxKernel(float* x, int64_t v, float inv_t, bool scale) {
  float* row = x + blockIdx.x * v;
  float mx = -__int_as_float(0x7f800000);
  for (int64_t j = threadIdx.x; j < v; j += blockDim.x) {
    float e = row[j];
    if (scale) {
      e *= inv_t;
      row[j] = e;
    }
    mx = fmaxf(mx, e);
  }
  mx = BlockMax(mx);
  float sum = 0.0f;
  for (int64_t j = threadIdx.x; j < v; j += blockDim.x) {
    const float e = expf(row[j] - mx);
    row[j] = e;
    sum += e;
  }
  sum = BlockSum(sum);
  const float inv = 1.0f / sum;
  for (int64_t j = threadIdx.x; j < v; j += blockDim.x) row[j] *= inv;
}

// (value, index) is better than (value', index') when value > value', or
// equal values and index < index' (the CPU's first-max rule).
__device__ __forceinline__ bool Better(float a, int64_t ia, float b, int64_t ib) {
  return a > b || (a == b && ia < ib);
}

__global__ void ArgmaxKernel(const float* x, int64_t v, int32_t* out) {
  const float* row = x + blockIdx.x * v;
  float best = -__int_as_float(0x7f800000);
  int64_t best_i = v;  // sentinel: worse than any real element
  for (int64_t j = threadIdx.x; j < v; j += blockDim.x) {
    if (best_i == v || Better(row[j], j, best, best_i)) {
      best = row[j];
      best_i = j;
    }
  }
  for (int o = 16; o > 0; o >>= 1) {
    const float b = __shfl_xor_sync(0xffffffffu, best, o);
    const int64_t bi = __shfl_xor_sync(0xffffffffu, best_i, o);
    if (best_i == v || (bi != v && Better(b, bi, best, best_i))) best = b, best_i = bi;
  }
  __shared__ float s_val[32];
  __shared__ int64_t s_idx[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) s_val[warp] = best, s_idx[warp] = best_i;
  __syncthreads();
  if (warp == 0) {
    const int warps = static_cast<int>(blockDim.x >> 5);
    best = lane < warps ? s_val[lane] : 0.0f;
    best_i = lane < warps ? s_idx[lane] : v;
    for (int o = 16; o > 0; o >>= 1) {
      const float b = __shfl_xor_sync(0xffffffffu, best, o);
      const int64_t bi = __shfl_xor_sync(0xffffffffu, best_i, o);
      if (best_i == v || (bi != v && Better(b, bi, best, best_i))) best = b, best_i = bi;
    }
    // All-NaN rows keep the CPU's answer of index 0.
    if (lane == 0) out[blockIdx.x] = static_cast<int32_t>(best_i == v ? 0 : best_i);
  }
}

}  // namespace

cudaError_t LaunchSoftmax(float* x, int64_t n, int64_t v, float temperature, cudaStream_t stream) {
  if (n == 0 || v == 0) return cudaSuccess;
  const float inv_t = 1.0f / temperature;
  KVR_LAUNCH(SoftmaxKernel, static_cast<unsigned>(n), kThreads, 0, stream)(
      x, v, inv_t, inv_t != 1.0f);
  return cudaGetLastError();
}

cudaError_t LaunchArgmax(const float* x, int64_t n, int64_t v, int32_t* out, cudaStream_t stream) {
  if (n == 0 || v == 0) return cudaSuccess;
  KVR_LAUNCH(ArgmaxKernel, static_cast<unsigned>(n), kThreads, 0, stream)(x, v, out);
  return cudaGetLastError();
}

}  // namespace kvr::worker::cuda
