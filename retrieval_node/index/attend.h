// Attend: top-k retrieval followed by partial attention over the retrieved
// keys — what a retrieval node computes for one shard per query batch.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "common/attention.h"
#include "common/value_matrix.h"
#include "retrieval_node/index/cluster_summary.h"
#include "retrieval_node/index/index.h"

namespace kvr::index {

struct AttendParams {
  SearchParams search;  // search.k is clamped to index.size() (a shard may be
                        // smaller than k: then every key is attended)
  float scale = 1.0f;   // s = scale * q.k, usually 1/sqrt(head dim)
  // Remainder estimation (cluster_summary.h): when non-null, each query's
  // partial also covers every key the search did not return, estimated from
  // this summary of the index's keys (summary->size() must equal
  // index.size()), LSE-merged with the exact part. Null: exact top-k only,
  // bit-identical to an Attend without estimation.
  const ClusterSummary* estimate = nullptr;
  // With `estimate`: the clusters attended exactly instead of estimated
  // (ExactZoneOptions; default: none). Ignored without `estimate`.
  ExactZoneOptions zone = {};
};

// Caller-owned reusable buffers. Grows to the largest (queries x k) seen and
// is then reused: repeated calls with the same shapes do not allocate.
// Not thread-safe: one per concurrent caller.
class AttendScratch {
 public:
  AttendScratch() = default;
  size_t MemoryBytes() const;

 private:
  friend absl::Status Attend(ConstMatrixView, const KeyIndex&, const ValueMatrix&,
                             const AttendParams&, PartialsView, AttendScratch*, SearchStats*,
                             EstimateStats*);
  std::vector<int64_t> ids_;
  std::vector<float> estimate_o_;
  EstimateScratch estimate_;
  std::vector<float> scores_;
  std::vector<float> weights_;
};

// For each query row i (n x index.dim()), out[i] = partial attention over the
// index's top-k keys of query i, with s_j = scale * (q_i . k_j) and value rows
// taken from `values` by key id. An empty index gives empty partials.
// InvalidArgument: values.rows() != index.size(), out.size() != n,
// out.dim() != values.cols(), scale not finite, or any Search error (dim,
// non-finite queries, k < 1), params.estimate covering a different key
// count or dimensions than the index / values, params.zone out of range
// (ValidateExactZone). `estimate_stats` (may be null)
// accumulates the estimate's counts.
absl::Status Attend(ConstMatrixView queries, const KeyIndex& index, const ValueMatrix& values,
                    const AttendParams& params, PartialsView out, AttendScratch* scratch,
                    SearchStats* stats = nullptr, EstimateStats* estimate_stats = nullptr);

}  // namespace kvr::index
