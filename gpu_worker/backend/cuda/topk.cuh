// Exact top-k of inner products on the GPU, for the prefill training kNN:
// for every query row i of q [n x n_heads*head_dim] and every query head
// h = kv_head * group + j of one KV head (group = n_heads / n_kv_heads),
// the k keys of that KV head among cache rows [key_begin, key_end) with the
// largest q . k (unscaled), best first, ties to the smaller id (the order of
// retrieval_node's ExactTopK). Ids are relative to key_begin. Rows of the
// output are (i, j) in that order: ids/scores[(i * group + j) * k + r].
// Slots beyond the key count hold id -1 and score -inf.
//
// One block per (query, head): every thread keeps a sorted list of its best
// k over a strided share of the keys, then the block merges the lists k
// times by a (score, id) argmax. Simple and exact; fine for k <= 64.
#pragma once

#include <cstdint>

#include "gpu_worker/backend/cuda/cuda_api.h"

namespace kvr::worker::cuda {

inline constexpr int kMaxGpuTopK = 64;

struct TopKArgs {
  const float* q = nullptr;  // [n x n_heads*head_dim]
  const float* k = nullptr;  // [S x n_kv_heads*head_dim]
  int64_t n = 0;
  int n_heads = 0, n_kv_heads = 0, head_dim = 0;
  int kv_head = 0;           // 0 .. n_kv_heads - 1, or -1: all (head g's rows at g * n * group)
  int64_t key_begin = 0, key_end = 0;
  int top_k = 0;             // 1 .. kMaxGpuTopK
  int64_t* ids = nullptr;    // [(kv heads) * n * group * top_k]
  float* scores = nullptr;   // same
};

cudaError_t LaunchTopK(const TopKArgs& args, cudaStream_t stream);

}  // namespace kvr::worker::cuda
