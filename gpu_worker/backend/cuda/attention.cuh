// Attention kernels of the CUDA backend.
//
// Attend: causal GQA softmax attention of n queries over the key rows
// [key_begin, key_end) of a KV cache, each query i also limited to keys
// <= first_pos + i (the Backend::PartialAttention rule; Attention is the
// special case key_begin = 0, key_end = first_pos + n). Flash-style: a block
// holds `warps` (query row, query head) items of one KV head, streams the
// keys through shared memory 32 at a time (one key per lane for the scores)
// and keeps an online softmax (running max m, sum l, unnormalised o) per
// item, so K/V tiles are read once per block, not once per query head.
// When there are too few blocks to fill the device (decode: n = 1), the key
// range is split into `splits` chunks (flash-decoding) whose partials go to a
// workspace and are merged by log-sum-exp in a second kernel.
//
// MergeAttention: the in-place LSE merge of Backend::MergeAttention.
//
// head_dim <= kMaxAttendHeadDim. All pointers are device memory; launchers
// enqueue on `stream` and return the launch error.
#pragma once

#include <cstddef>
#include <cstdint>

#include "gpu_worker/backend/cuda/cuda_api.h"

namespace kvr::worker::cuda {

inline constexpr int kMaxAttendHeadDim = 256;

struct AttendArgs {
  const float* q = nullptr;  // [n x n_heads*head_dim]
  const float* k = nullptr;  // [S x n_kv_heads*head_dim]
  const float* v = nullptr;
  int64_t n = 0;
  int n_heads = 0, n_kv_heads = 0, head_dim = 0;
  float scale = 0.0f;  // already resolved (not 0)
  int64_t first_pos = 0, key_begin = 0, key_end = 0;
  float* o = nullptr;  // [n x n_heads*head_dim], normalised
  float* m = nullptr;  // [n x n_heads] or null
  float* l = nullptr;  // [n x n_heads] or null
};

// The launch shape PlanAttend picks; workspace_floats == 0 when no split.
struct AttendPlan {
  int warps = 4;
  int splits = 1;
  int64_t tiles_per_split = 0;
  size_t smem_bytes = 0;
  size_t workspace_floats = 0;
};

// Chooses warps per block and the key split for a device with `num_sms`
// multiprocessors.
AttendPlan PlanAttend(const AttendArgs& args, int num_sms);

// Runs the plan. `workspace` holds at least plan.workspace_floats floats.
cudaError_t LaunchAttend(const AttendArgs& args, const AttendPlan& plan, float* workspace,
                         cudaStream_t stream);

// (o, m, l) <- LSE merge of (o, m, l) and (o2, m2, l2); rows = n * heads.
cudaError_t LaunchMergeAttention(float* o, float* m, float* l, const float* o2, const float* m2,
                                 const float* l2, int64_t rows, int head_dim,
                                 cudaStream_t stream);

}  // namespace kvr::worker::cuda
