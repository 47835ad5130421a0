#include "gpu_worker/backend/cuda/elementwise.cuh"

#include "gpu_worker/backend/cuda/reduce.cuh"

namespace kvr::worker::cuda {
namespace {

constexpr int kThreads = 256;

// Grid-stride launches cap the grid; 65535 blocks of 256 threads cover any
// tensor with a few passes.
unsigned GridFor(int64_t count) {
  const int64_t blocks = (count + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < 65535 ? (blocks > 0 ? blocks : 1) : 65535);
}

__device__ __forceinline__ float Load(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float Load(const __nv_bfloat16* p, int64_t i) {
  return __bfloat162float(p[i]);
}
__device__ __forceinline__ float Load(const __half* p, int64_t i) { return __half2float(p[i]); }

template <typename T>
__global__ void EmbeddingKernel(const T* __restrict__ table, const int32_t* __restrict__ tokens,
                                int64_t d, float* __restrict__ out) {
  const int64_t row = blockIdx.x;
  const T* src = table + static_cast<int64_t>(tokens[row]) * d;
  float* dst = out + row * d;
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) dst[j] = Load(src, j);
}

__global__ void RmsNormKernel(const float* x, const float* __restrict__ w, float eps, int64_t d,
                              float* out) {
  const int64_t row = blockIdx.x;
  const float* xi = x + row * d;
  float* oi = out + row * d;
  float ss = 0.0f;
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) ss = fmaf(xi[j], xi[j], ss);
  ss = BlockSum(ss);
  const float inv = 1.0f / sqrtf(ss / static_cast<float>(d) + eps);
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) oi[j] = w[j] * (inv * xi[j]);
}

// One block per row; threads loop over (head, pair).
__global__ void RopeKernel(float* x, int n_heads, int head_dim, const int32_t* __restrict__ pos,
                           const float* __restrict__ inv_freq, bool interleaved) {
  const int64_t row = blockIdx.x;
  const int half = head_dim / 2;
  const float p = static_cast<float>(pos[row]);
  float* xr = x + row * static_cast<int64_t>(n_heads) * head_dim;
  for (int t = threadIdx.x; t < n_heads * half; t += blockDim.x) {
    const int h = t / half, k = t % half;
    const float angle = p * inv_freq[k];
    float s, c;
    sincosf(angle, &s, &c);
    float* v = xr + static_cast<int64_t>(h) * head_dim;
    const int a = interleaved ? 2 * k : k;
    const int b = interleaved ? 2 * k + 1 : k + half;
    const float v0 = v[a], v1 = v[b];
    v[a] = v0 * c - v1 * s;
    v[b] = v0 * s + v1 * c;
  }
}

__global__ void SwiGluKernel(const float* gate, const float* up, float* out, int64_t count) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < count;
       i += int64_t{gridDim.x} * blockDim.x) {
    float v = gate[i];
    v *= 1.0f / (1.0f + expf(-v));
    out[i] = v * up[i];
  }
}

__global__ void AddKernel(float* x, const float* y, int64_t count) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < count;
       i += int64_t{gridDim.x} * blockDim.x) {
    x[i] += y[i];
  }
}

}  // namespace

cudaError_t LaunchEmbedding(const void* table, TableType type, const int32_t* tokens, int64_t n,
                            int64_t d, float* out, cudaStream_t stream) {
  if (n == 0 || d == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(n));
  switch (type) {
    case TableType::kF32:
      KVR_LAUNCH(EmbeddingKernel<float>, grid, kThreads, 0, stream)(
          static_cast<const float*>(table), tokens, d, out);
      break;
    case TableType::kBf16:
      KVR_LAUNCH(EmbeddingKernel<__nv_bfloat16>, grid, kThreads, 0, stream)(
          static_cast<const __nv_bfloat16*>(table), tokens, d, out);
      break;
    case TableType::kF16:
      KVR_LAUNCH(EmbeddingKernel<__half>, grid, kThreads, 0, stream)(
          static_cast<const __half*>(table), tokens, d, out);
      break;
  }
  return cudaGetLastError();
}

cudaError_t LaunchRmsNorm(const float* x, const float* weight, float eps, int64_t n, int64_t d,
                          float* out, cudaStream_t stream) {
  if (n == 0 || d == 0) return cudaSuccess;
  KVR_LAUNCH(RmsNormKernel, static_cast<unsigned>(n), kThreads, 0, stream)(x, weight, eps, d, out);
  return cudaGetLastError();
}

cudaError_t LaunchRope(float* x, int64_t n, int n_heads, int head_dim, const int32_t* positions,
                       const float* inv_freq, bool interleaved, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  KVR_LAUNCH(RopeKernel, static_cast<unsigned>(n), kThreads, 0, stream)(
      x, n_heads, head_dim, positions, inv_freq, interleaved);
  return cudaGetLastError();
}

cudaError_t LaunchSwiGlu(const float* gate, const float* up, float* out, int64_t count,
                         cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  KVR_LAUNCH(SwiGluKernel, GridFor(count), kThreads, 0, stream)(gate, up, out, count);
  return cudaGetLastError();
}

cudaError_t LaunchAdd(float* x, const float* y, int64_t count, cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  KVR_LAUNCH(AddKernel, GridFor(count), kThreads, 0, stream)(x, y, count);
  return cudaGetLastError();
}

}  // namespace kvr::worker::cuda
