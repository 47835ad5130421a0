#include "gpu_worker/backend/cuda/topk.cuh"

namespace kvr::worker::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int64_t kNoId = INT64_MAX;

__device__ __forceinline__ float NegInf() { return -__int_as_float(0x7f800000); }

// Larger score first, then smaller id; kNoId never beats a real entry.
__device__ __forceinline__ bool Better(float a, int64_t ia, float b, int64_t ib) {
  if (ib == kNoId) return ia != kNoId;
  if (ia == kNoId) return false;
  return a > b || (a == b && ia < ib);
}

__global__ void TopKKernel(TopKArgs a) {
  KVR_DYNAMIC_SHARED(float, qs);  // [head_dim]
  __shared__ float red_val[kThreads / 32];
  __shared__ int64_t red_id[kThreads / 32];
  const int group = a.n_heads / a.n_kv_heads;
  const int64_t per_head = a.n * group;  // blocks of one KV head
  const int kvh = a.kv_head >= 0 ? a.kv_head : static_cast<int>(blockIdx.x / per_head);
  const int64_t local = a.kv_head >= 0 ? int64_t{blockIdx.x} : blockIdx.x % per_head;
  const int64_t row = local / group;
  const int h = kvh * group + static_cast<int>(local % group);
  const int hd = a.head_dim, k = a.top_k;
  const int64_t q_cols = int64_t{a.n_heads} * hd, kv_cols = int64_t{a.n_kv_heads} * hd;
  for (int d = threadIdx.x; d < hd; d += blockDim.x) qs[d] = a.q[row * q_cols + int64_t{h} * hd + d];
  __syncthreads();

  float vals[kMaxGpuTopK];
  int64_t ids[kMaxGpuTopK];
  int count = 0;
  const float* kbase = a.k + int64_t{kvh} * hd;
  for (int64_t j = a.key_begin + threadIdx.x; j < a.key_end; j += blockDim.x) {
    const float* kr = kbase + j * kv_cols;
    float s = 0.0f;
    for (int d = 0; d < hd; ++d) s = fmaf(qs[d], kr[d], s);
    const int64_t id = j - a.key_begin;
    // Keys arrive in increasing id order, so an equal score never displaces.
    if (count == k && !(s > vals[k - 1])) continue;
    int pos = count < k ? count++ : k - 1;
    while (pos > 0 && s > vals[pos - 1]) {
      vals[pos] = vals[pos - 1];
      ids[pos] = ids[pos - 1];
      --pos;
    }
    vals[pos] = s;
    ids[pos] = id;
  }

  // k rounds of a block-wide (score, id) argmax over the list heads.
  int head = 0;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t out_base = int64_t{blockIdx.x} * k;
  for (int r = 0; r < k; ++r) {
    float best = head < count ? vals[head] : NegInf();
    int64_t best_id = head < count ? ids[head] : kNoId;
    for (int o = 16; o > 0; o >>= 1) {
      const float b = __shfl_xor_sync(0xffffffffu, best, o);
      const int64_t bi = __shfl_xor_sync(0xffffffffu, best_id, o);
      if (Better(b, bi, best, best_id)) best = b, best_id = bi;
    }
    if (lane == 0) red_val[warp] = best, red_id[warp] = best_id;
    __syncthreads();
    best = red_val[0];
    best_id = red_id[0];
    for (int w = 1; w < kThreads / 32; ++w) {
      if (Better(red_val[w], red_id[w], best, best_id)) best = red_val[w], best_id = red_id[w];
    }
    __syncthreads();  // red_* reused next round
    if (head < count && ids[head] == best_id) ++head;
    if (threadIdx.x == 0) {
      a.ids[out_base + r] = best_id == kNoId ? -1 : best_id;
      a.scores[out_base + r] = best_id == kNoId ? NegInf() : best;
    }
  }
}

}  // namespace

cudaError_t LaunchTopK(const TopKArgs& a, cudaStream_t stream) {
  const int64_t blocks =
      a.n * (a.n_heads / a.n_kv_heads) * (a.kv_head >= 0 ? 1 : a.n_kv_heads);
  if (blocks == 0) return cudaSuccess;
  const size_t shared_bytes = sizeof(float) * a.head_dim;
  KVR_LAUNCH(TopKKernel, static_cast<unsigned>(blocks), kThreads, shared_bytes, stream)(a);
  return cudaGetLastError();
}

}  // namespace kvr::worker::cuda
