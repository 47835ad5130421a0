// A small retrieval node for the estimation tests (node_estimate_test,
// node_estimate2_test): 2 kv heads x 2 query heads, d 32, one flat chunk of
// kPrefill random keys per kv head, tails of kTail keys, k = kK.
#pragma once

#include <cmath>
#include <memory>

#include "common/attention.h"
#include "common/tensor.h"
#include "gtest/gtest.h"
#include "retrieval_node/core/node_core.h"
#include "tests/support/test_data.h"

namespace kvr::test_support::estimate_node {

inline constexpr int kHeads = 4, kKvHeads = 2, kDim = 32, kK = 8;
inline constexpr size_t kPrefill = 2048, kTail = 16;
inline constexpr uint64_t kSeq = 3;

// Keys, values and one query per query head (seeded, the same every run).
struct Data {
  Matrix keys = RandomMatrix(kPrefill + 3 * kTail, kDim, 1);
  Matrix values = RandomMatrix(kPrefill + 3 * kTail, kDim, 2);
  Matrix queries = RandomMatrix(kHeads, kDim, 3);
};

// A node with --estimate `estimate`, 64 clusters per chunk, seals inline in
// the append that fills the tail, and summaries clustered on the node's
// summary thread (`background`) or inside the first estimating Attend, and
// the estimate's exact zone at `exact_zone_keys_fraction` (0: none).
inline std::unique_ptr<retrieval::NodeCore> NewNode(bool estimate, int64_t budget = 0,
                                                    bool background = false,
                                                    double exact_zone_keys_fraction = 0.0) {
  retrieval::NodeCoreOptions o;
  o.memory_budget_bytes = budget;
  o.tail_capacity = kTail;
  o.background_seals = false;  // seals happen inside the append that fills the tail
  o.background_summaries = background;
  o.estimate = estimate;
  o.estimate_clusters_per_chunk = 64;
  o.exact_zone_keys_fraction = exact_zone_keys_fraction;
  auto n = retrieval::NodeCore::Create(o);
  EXPECT_TRUE(n.ok()) << n.status();
  return n.ok() ? std::move(*n) : nullptr;
}

// Creates sequence kSeq (flat index) and uploads the first kPrefill keys to
// both kv heads (kv head g's chunk 0).
inline void Load(retrieval::NodeCore* node, const Data& data) {
  retrieval::SequenceSpec s;
  s.sequence_id = kSeq;
  s.n_layers = 1;
  s.n_heads = kHeads;
  s.n_kv_heads = kKvHeads;
  s.head_dim = kDim;
  s.index_type = retrieval::IndexType::kFlat;
  ASSERT_TRUE(node->CreateSequence(s).ok());
  for (int32_t g = 0; g < kKvHeads; ++g) {
    retrieval::ShardUpload up;
    up.key = {kSeq, 0, g, 0};
    up.keys = data.keys.view().rows_slice(0, kPrefill);
    up.values = data.values.view().rows_slice(0, kPrefill);
    ASSERT_TRUE(node->UploadShard(up).ok());
  }
}

// One Attend of data.queries (k = kK) with `mode`; fills *stats when non-null.
inline absl::StatusOr<Partials> Attend(retrieval::NodeCore* node, const Data& data,
                                       retrieval::EstimateMode mode,
                                       retrieval::AttendStats* stats) {
  retrieval::AttendRequest r;
  r.sequence_id = kSeq;
  r.queries = data.queries.view();
  r.k = kK;
  r.estimate = mode;
  Partials out(kHeads, kDim);
  retrieval::StatusWaiter waiter;
  node->AttendAsync(r, out.view(), stats, waiter.callback());
  KVR_RETURN_IF_ERROR(waiter.Wait());
  return out;
}

// Appends data rows [first, first + count) to both kv heads, one row per
// Append (positions = row numbers; the chunk holds rows [0, kPrefill)).
inline void AppendRows(retrieval::NodeCore* node, const Data& data, size_t first, size_t count) {
  for (size_t i = first; i < first + count; ++i) {
    for (int32_t g = 0; g < kKvHeads; ++g) {
      retrieval::AppendRequest a;
      a.sequence_id = kSeq;
      a.kv_head = g;
      a.first_position = static_cast<int64_t>(i);
      a.keys = data.keys.view().rows_slice(i, 1);
      a.values = data.values.view().rows_slice(i, 1);
      ASSERT_TRUE(node->Append(a).ok());
    }
  }
}

// Mean relative L2 error of the outputs against full attention over the
// first `n` keys.
inline double ErrorVsFull(const Partials& p, const Data& data, size_t n) {
  const ValueMatrix values =
      ValueMatrix::FromFloat(DType::kF32, data.values.view().rows_slice(0, n));
  Partials full(kHeads, kDim);
  KVR_CHECK(ExactAttention(data.queries.view(), data.keys.view().rows_slice(0, n), values,
                           1.0f / std::sqrt(static_cast<float>(kDim)), full.view())
                .ok());
  double sum = 0;
  for (size_t i = 0; i < kHeads; ++i) {
    double num = 0, den = 0;
    for (size_t t = 0; t < kDim; ++t) {
      const double e = p.o.row(i)[t] - full.o.row(i)[t];
      num += e * e;
      den += static_cast<double>(full.o.row(i)[t]) * full.o.row(i)[t];
    }
    sum += std::sqrt(num / den);
  }
  return sum / kHeads;
}

}  // namespace kvr::test_support::estimate_node
