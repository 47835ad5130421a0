#include "gpu_worker/backend/cuda/attention.cuh"

#include <algorithm>

#include "gpu_worker/backend/cuda/reduce.cuh"

namespace kvr::worker::cuda {
namespace {

constexpr int kTile = 32;  // keys per shared-memory tile = lanes per warp
constexpr int kMaxPerLane = kMaxAttendHeadDim / 32;

__device__ __forceinline__ float NegInf() { return -__int_as_float(0x7f800000); }

// Grid: x = item tiles, y = KV head, z = key split. Block: warps * 32.
__global__ void AttendKernel(AttendArgs a, int splits, int64_t tiles_per_split, float* ws_o,
                             float* ws_ml) {
  KVR_DYNAMIC_SHARED(float, smem);
  const int hd = a.head_dim;
  const int warps = static_cast<int>(blockDim.x >> 5);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float* ks = smem;                      // [kTile][hd + 1] (padded: no bank conflicts)
  float* vs = ks + kTile * (hd + 1);     // [kTile][hd]
  float* qs = vs + kTile * hd;           // [warps][hd]

  const int group = a.n_heads / a.n_kv_heads;
  const int kvh = blockIdx.y;
  const int64_t items = a.n * group;
  const int64_t first_item = int64_t{blockIdx.x} * warps;
  const int64_t item = first_item + warp;
  const bool active = item < items;
  const int64_t row = active ? item / group : 0;
  const int h = kvh * group + static_cast<int>(active ? item % group : 0);
  const int64_t last_row = (min(first_item + warps, items) - 1) / group;
  const int64_t q_cols = int64_t{a.n_heads} * hd, kv_cols = int64_t{a.n_kv_heads} * hd;

  // Keys this block may need, then this split's share of them.
  const int64_t block_hi = min(a.key_end, a.first_pos + last_row + 1);
  int64_t lo = a.key_begin, hi = block_hi;
  if (splits > 1) {
    lo = a.key_begin + int64_t{blockIdx.z} * tiles_per_split * kTile;
    hi = min(block_hi, lo + tiles_per_split * kTile);
  }
  const int64_t vis_hi = min(hi, a.first_pos + row + 1);

  if (active) {
    for (int d = lane; d < hd; d += 32) qs[warp * hd + d] = a.q[row * q_cols + int64_t{h} * hd + d];
  }
  float acc[kMaxPerLane];
#pragma unroll
  for (int t = 0; t < kMaxPerLane; ++t) acc[t] = 0.0f;
  float m = NegInf(), l = 0.0f;

  const float* kbase = a.k + int64_t{kvh} * hd;
  const float* vbase = a.v + int64_t{kvh} * hd;
  for (int64_t t0 = lo; t0 < hi; t0 += kTile) {
    __syncthreads();  // previous tile fully consumed (and qs written)
    for (int e = threadIdx.x; e < kTile * hd; e += blockDim.x) {
      const int key = e / hd, d = e % hd;
      const int64_t gk = t0 + key;
      float kv = 0.0f, vv = 0.0f;
      if (gk < hi) {
        kv = kbase[gk * kv_cols + d];
        vv = vbase[gk * kv_cols + d];
      }
      ks[key * (hd + 1) + d] = kv;
      vs[key * hd + d] = vv;
    }
    __syncthreads();
    if (!active || t0 >= vis_hi) continue;  // nothing visible in this tile
    const bool visible = t0 + lane < vis_hi;
    float s = NegInf();
    if (visible) {
      const float* qrow = qs + warp * hd;
      const float* krow = ks + lane * (hd + 1);
      float dot = 0.0f;
      for (int d = 0; d < hd; ++d) dot = fmaf(qrow[d], krow[d], dot);
      s = dot * a.scale;
    }
    const float new_m = fmaxf(m, WarpMax(s));  // finite: lane 0 is visible
    const float corr = expf(m - new_m);        // 0 on the first tile
    const float p = visible ? expf(s - new_m) : 0.0f;
    l = l * corr + WarpSum(p);
    m = new_m;
#pragma unroll
    for (int t = 0; t < kMaxPerLane; ++t) acc[t] *= corr;
    const int count = static_cast<int>(min(static_cast<int64_t>(kTile), vis_hi - t0));
    for (int j = 0; j < count; ++j) {
      const float pj = __shfl_sync(0xffffffffu, p, j);
      const float* vrow = vs + j * hd;
#pragma unroll
      for (int t = 0; t < kMaxPerLane; ++t) {
        const int d = lane + 32 * t;
        if (d < hd) acc[t] = fmaf(pj, vrow[d], acc[t]);
      }
    }
  }
  if (!active) return;

  const float inv = l > 0.0f ? 1.0f / l : 0.0f;
  const int64_t r = row * a.n_heads + h;  // (query, head) index
  float* out = splits > 1 ? ws_o + (int64_t{blockIdx.z} * items * a.n_kv_heads + r) * hd
                          : a.o + r * hd;
#pragma unroll
  for (int t = 0; t < kMaxPerLane; ++t) {
    const int d = lane + 32 * t;
    if (d < hd) out[d] = acc[t] * inv;
  }
  if (lane == 0) {
    if (splits > 1) {
      float* ml = ws_ml + (int64_t{blockIdx.z} * items * a.n_kv_heads + r) * 2;
      ml[0] = m;
      ml[1] = l;
    } else {
      if (a.m != nullptr) a.m[r] = m;
      if (a.l != nullptr) a.l[r] = l;
    }
  }
}

// One block per (query, head) row: LSE merge of the split partials.
__global__ void CombineKernel(const float* ws_o, const float* ws_ml, int splits, int64_t rows,
                              int hd, float* o, float* m_out, float* l_out) {
  const int64_t r = blockIdx.x;
  float mx = NegInf();
  for (int s = 0; s < splits; ++s) mx = fmaxf(mx, ws_ml[(s * rows + r) * 2]);
  float total = 0.0f;
  if (mx != NegInf()) {
    for (int s = 0; s < splits; ++s) {
      const float ls = ws_ml[(s * rows + r) * 2 + 1];
      if (ls > 0.0f) total += ls * expf(ws_ml[(s * rows + r) * 2] - mx);
    }
  }
  const float inv = total > 0.0f ? 1.0f / total : 0.0f;
  for (int d = threadIdx.x; d < hd; d += blockDim.x) {
    float acc = 0.0f;
    if (total > 0.0f) {
      for (int s = 0; s < splits; ++s) {
        const float ls = ws_ml[(s * rows + r) * 2 + 1];
        if (ls > 0.0f) acc += ws_o[(s * rows + r) * hd + d] * (ls * expf(ws_ml[(s * rows + r) * 2] - mx));
      }
    }
    o[r * hd + d] = acc * inv;
  }
  if (threadIdx.x == 0) {
    if (m_out != nullptr) m_out[r] = total > 0.0f ? mx : NegInf();
    if (l_out != nullptr) l_out[r] = total;
  }
}

__global__ void MergeKernel(float* o, float* m, float* l, const float* o2, const float* m2,
                            const float* l2, int hd) {
  const int64_t r = blockIdx.x;
  const float ma = m[r], la = l[r], mb = m2[r], lb = l2[r];
  if (lb == 0.0f) return;  // empty partial: identity (uniform across the block)
  float* oa = o + r * hd;
  const float* ob = o2 + r * hd;
  if (la == 0.0f) {
    for (int d = threadIdx.x; d < hd; d += blockDim.x) oa[d] = ob[d];
  } else {
    const float mx = fmaxf(ma, mb);
    const float wa = la * expf(ma - mx), wb = lb * expf(mb - mx);
    const float total = wa + wb;
    const float ca = wa / total, cb = wb / total;
    for (int d = threadIdx.x; d < hd; d += blockDim.x) oa[d] = oa[d] * ca + ob[d] * cb;
  }
  __syncthreads();  // every thread has read m[r], l[r]
  if (threadIdx.x == 0) {
    if (la == 0.0f) {
      m[r] = mb;
      l[r] = lb;
    } else {
      const float mx = fmaxf(ma, mb);
      m[r] = mx;
      l[r] = la * expf(ma - mx) + lb * expf(mb - mx);
    }
  }
}

}  // namespace

AttendPlan PlanAttend(const AttendArgs& a, int num_sms) {
  AttendPlan plan;
  const int64_t group = a.n_heads / a.n_kv_heads;
  const int64_t items = a.n * group;
  plan.warps = items >= 64 ? 16 : 4;
  plan.smem_bytes = sizeof(float) * (static_cast<size_t>(kTile) * (a.head_dim + 1) +
                                     static_cast<size_t>(kTile) * a.head_dim +
                                     static_cast<size_t>(plan.warps) * a.head_dim);
  const int64_t blocks = (items + plan.warps - 1) / plan.warps * a.n_kv_heads;
  const int64_t keys = std::max<int64_t>(
      0, std::min(a.key_end, a.first_pos + a.n) - a.key_begin);
  const int64_t tiles = (keys + kTile - 1) / kTile;
  const int64_t target = 2 * static_cast<int64_t>(std::max(num_sms, 1));
  int64_t splits = 1;
  if (blocks < target && tiles >= 8) {
    // At least 4 tiles (128 keys) per split.
    splits = std::min((target + blocks - 1) / blocks, tiles / 4);
  }
  if (splits > 1) {
    plan.tiles_per_split = (tiles + splits - 1) / splits;
    splits = (tiles + plan.tiles_per_split - 1) / plan.tiles_per_split;
  }
  plan.splits = static_cast<int>(std::max<int64_t>(splits, 1));
  if (plan.splits > 1) {
    plan.workspace_floats = static_cast<size_t>(plan.splits) * static_cast<size_t>(items) *
                            static_cast<size_t>(a.n_kv_heads) *
                            (static_cast<size_t>(a.head_dim) + 2);
  }
  return plan;
}

cudaError_t LaunchAttend(const AttendArgs& a, const AttendPlan& plan, float* workspace,
                         cudaStream_t stream) {
  const int64_t group = a.n_heads / a.n_kv_heads;
  const int64_t items = a.n * group;
  if (items == 0) return cudaSuccess;
  if (plan.smem_bytes > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(
        AttendKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
        static_cast<int>(plan.smem_bytes));
    if (err != cudaSuccess) return err;
  }
  const int64_t rows = a.n * a.n_heads;
  float* ws_o = plan.splits > 1 ? workspace : nullptr;
  float* ws_ml = plan.splits > 1 ? workspace + static_cast<size_t>(plan.splits) * rows * a.head_dim
                                 : nullptr;
  const dim3 grid(static_cast<unsigned>((items + plan.warps - 1) / plan.warps),
                  static_cast<unsigned>(a.n_kv_heads), static_cast<unsigned>(plan.splits));
  KVR_LAUNCH(AttendKernel, grid, plan.warps * 32, plan.smem_bytes, stream)(
      a, plan.splits, plan.tiles_per_split, ws_o, ws_ml);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || plan.splits == 1) return err;
  KVR_LAUNCH(CombineKernel, static_cast<unsigned>(rows), 128, 0, stream)(
      ws_o, ws_ml, plan.splits, rows, a.head_dim, a.o, a.m, a.l);
  return cudaGetLastError();
}

cudaError_t LaunchMergeAttention(float* o, float* m, float* l, const float* o2, const float* m2,
                                 const float* l2, int64_t rows, int head_dim,
                                 cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  KVR_LAUNCH(MergeKernel, static_cast<unsigned>(rows), 128, 0, stream)(
      o, m, l, o2, m2, l2, head_dim);
  return cudaGetLastError();
}

}  // namespace kvr::worker::cuda
