// A small deterministic retrieval workload for replication tests
// (tests/unit/replicas_test.cc, tests/integration/failover_test.cc): one
// sequence shape, chunk uploads, appends to every (layer, kv head), an exact
// Attend (flat index, k above every shard's size) and a comparison of
// partials that tolerates a different merge grouping (float rounding only).
#pragma once

#include <cmath>
#include <cstdint>
#include <random>

#include "common/attention.h"
#include "common/status.h"
#include "common/tensor.h"
#include "gtest/gtest.h"
#include "retrieval_node/client/retrieval_client.h"

namespace kvr::test_support::replica_workload {

constexpr int kLayers = 2, kHeads = 4, kKvHeads = 2, kDim = 16, kChunks = 4, kRows = 32;
// The first position after the uploaded chunks (where appends start).
constexpr int64_t kAppendStart = int64_t{kChunks} * kRows;

inline retrieval::SequenceSpec Spec(uint64_t id) {
  retrieval::SequenceSpec s;
  s.sequence_id = id;
  s.n_layers = kLayers;
  s.n_heads = kHeads;
  s.n_kv_heads = kKvHeads;
  s.head_dim = kDim;
  s.index_type = retrieval::IndexType::kFlat;
  return s;
}

inline Matrix Random(size_t rows, size_t cols, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.0f, 1.0f);
  Matrix m(rows, cols);
  for (float& v : m.data) v = d(rng);
  return m;
}

// Uploads chunks [0, kChunks) of every (layer, kv head) of `seq`, kRows rows
// each (chunk c at positions c * kRows ...); the first error.
inline absl::Status Fill(retrieval::RetrievalClient& client, uint64_t seq) {
  for (int l = 0; l < kLayers; ++l) {
    for (int h = 0; h < kKvHeads; ++h) {
      for (int c = 0; c < kChunks; ++c) {
        const uint32_t seed = static_cast<uint32_t>(((l * kKvHeads + h) * kChunks + c) * 2);
        const Matrix k = Random(kRows, kDim, seed), v = Random(kRows, kDim, seed + 1);
        retrieval::ShardUpload u;
        u.key = {seq, l, h, c};
        u.first_position = int64_t{c} * kRows;
        u.keys = k.view();
        u.values = v.view();
        KVR_RETURN_IF_ERROR(client.UploadShard(u));
      }
    }
  }
  return absl::OkStatus();
}

// Appends `rows` rows at position `first` to every (layer, kv head); the
// rows depend on (first, layer, head) only.
inline absl::Status AppendAll(retrieval::RetrievalClient& client, uint64_t seq, int64_t first,
                              int rows) {
  for (int l = 0; l < kLayers; ++l) {
    for (int h = 0; h < kKvHeads; ++h) {
      const uint32_t seed = static_cast<uint32_t>(1000 + first * 7 + l * kKvHeads + h);
      const Matrix k = Random(static_cast<size_t>(rows), kDim, seed);
      const Matrix v = Random(static_cast<size_t>(rows), kDim, seed + 1);
      retrieval::AppendRequest a;
      a.sequence_id = seq;
      a.layer = l;
      a.kv_head = h;
      a.first_position = first;
      a.keys = k.view();
      a.values = v.view();
      KVR_RETURN_IF_ERROR(client.Append(a));
    }
  }
  return absl::OkStatus();
}

// Exact attention of a fixed query set over every key of (seq, layer).
inline absl::StatusOr<Partials> AttendLayer(retrieval::RetrievalClient& client, uint64_t seq,
                                            int layer, retrieval::AttendStats* stats = nullptr) {
  const Matrix q = Random(kHeads, kDim, 77u + static_cast<uint32_t>(layer));
  retrieval::AttendRequest req;
  req.sequence_id = seq;
  req.layer = layer;
  req.queries = q.view();
  req.k = 4096;  // above every shard's size: every key
  Partials out(kHeads, kDim);
  KVR_RETURN_IF_ERROR(client.Attend(req, out.view(), stats));
  return out;
}

// Same keys, merged in another grouping: equal up to float rounding.
inline void ExpectSamePartials(const Partials& a, const Partials& b, const char* what = "") {
  ASSERT_EQ(a.m.size(), b.m.size()) << what;
  for (size_t i = 0; i < a.m.size(); ++i) {
    EXPECT_NEAR(a.m[i], b.m[i], 1e-5f) << what << " head " << i;
    EXPECT_NEAR(a.l[i] * std::exp(a.m[i] - b.m[i]), b.l[i], 1e-4f * b.l[i]) << what << " head " << i;
    for (size_t d = 0; d < a.o.cols; ++d) {
      EXPECT_NEAR(a.o.row(i)[d], b.o.row(i)[d], 1e-5f) << what << " head " << i << " dim " << d;
    }
  }
}

}  // namespace kvr::test_support::replica_workload
