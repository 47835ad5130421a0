// Training data of the attention-aware graph index at prefill speed: each
// training query's exact top-k keys, over a bounded, deterministic sample of
// the queries instead of all of them.
//
// A prefill of T tokens has T x (query heads per kv head) queries per kv head;
// the exact top-k of all of them is O(T * N * d) per (layer, kv head), which
// dominates index preparation at long prompts. The graph only needs enough
// queries to cover the query distribution, so TrainingTopK keeps at most
// TrainingTopKOptions::max_queries of them, one per equal stratum of the rows
// (rows are position-major, so the sample is spread over the positions and,
// by the jitter inside each stratum, over the query heads), and scans them
// with ExactTopKScan (blocked, each key tile read once per block of queries).
// In mode kExact the top-k of every sampled query is exact: identical to
// ExactTopK's for that query (same scores, same tie order: larger score, then
// smaller id).
//
// Mode kApprox (the worker's --train_topk=approx) bounds the scan instead of
// the result. A query's top-k does not depend on its norm, so the sampled
// queries are grouped by direction (spherical k-means on s * q, s the keys'
// per-channel standard deviation, about approx_group_size queries per
// group); each group's centroid scans every key and keeps about its best
// approx_candidate_fraction of them (thresholds from a strided sample of
// 8192 keys; at most twice that many; the keys above the sample's top-4k
// quantile first);
// each member query then scans only its group's candidates, blocked (each
// candidate read once per block of 32 members). Cost per head:
// groups x keys + queries x candidates inner products instead of
// queries x keys. Every returned score is the exact inner product of that
// key (the same dot kernel as kExact); a true top-k key outside the group's
// candidates is missed. Below approx_min_keys keys kApprox runs kExact.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "common/tensor.h"
#include "common/thread_pool.h"

namespace kvr {

// Upper bound of TrainingTopKOptions::max_queries (and of the worker's
// --max_train_queries): 4M sampled queries.
inline constexpr size_t kMaxTrainingQueries = size_t{1} << 22;

// Upper bound of TrainingTopKOptions::approx_group_size.
inline constexpr size_t kMaxApproxGroupSize = size_t{1} << 16;
// Upper bound of TrainingTopKOptions::approx_kmeans_iterations.
inline constexpr int kMaxApproxKMeansIterations = 32;

// How TrainingTopK finds each sampled query's top-k (see the file comment).
enum class TrainingTopKMode {
  kExact,   // "exact": the full scan (the oracle)
  kApprox,  // "approx": query groups, each scans its centroid's best keys
};

// "exact" / "approx".
const char* TrainingTopKModeName(TrainingTopKMode mode);
// The mode named `name` ("exact" or "approx"); nullopt for anything else.
std::optional<TrainingTopKMode> ParseTrainingTopKMode(absl::string_view name);

struct TrainingTopKOptions {
  // Training queries kept at most: more rows are reduced to a stratified
  // sample of exactly this many; 0 keeps every row (the exact O(T * N) scan).
  // At most kMaxTrainingQueries.
  size_t max_queries = 16384;
  // Seed of the position chosen inside each stratum (the same seed and row
  // count always give the same sample).
  uint64_t seed = 0x5eed7a1e;

  // kExact (the default of this struct: the oracle) or kApprox. The worker's
  // default is EngineOptions::train_topk (--train_topk).
  TrainingTopKMode mode = TrainingTopKMode::kExact;
  // kApprox: sampled queries per group (groups = ceil(queries / this)).
  // [1, kMaxApproxGroupSize]
  size_t approx_group_size = 64;
  // kApprox: fraction of the keys a group's queries scan (rounded up, at
  // least k). (0, 1]; 1 scans every key (exact results).
  double approx_candidate_fraction = 0.0625;
  // kApprox: Lloyd iterations of the query grouping (k-means over at most 64
  // queries per group, a strided sample). [0, kMaxApproxKMeansIterations]
  int approx_kmeans_iterations = 2;
  // kApprox: below this many keys the exact scan runs instead (grouping does
  // not pay off on small key sets). [0, kMaxTopKKeys]
  size_t approx_min_keys = 4096;
};

// InvalidArgument naming the field and its limit when options are out of range.
absl::Status ValidateTrainingTopKOptions(const TrainingTopKOptions& options);

// Number of rows TrainingTopK keeps of `rows`: min(rows, max_queries), or
// rows when max_queries is 0.
size_t TrainingQueryCount(size_t rows, const TrainingTopKOptions& options);

// The kept rows of `rows` in increasing order: every row when no more than
// max_queries, else row i of the sample lies in stratum
// [i * rows / m, (i + 1) * rows / m) (m = max_queries) at an offset drawn
// from (seed, i). A pure function of its arguments.
std::vector<size_t> TrainingQuerySample(size_t rows, const TrainingTopKOptions& options);

// The exact top-k of the sampled rows of `queries` (TrainingQuerySample of
// queries.rows()) over `keys`: row i of ids / scores (k wide, best first) is
// sampled query i's: in kExact identical to ExactTopK of that query; in
// kApprox the exact scores of the best keys of its group's candidates, best first,
// same tie order (ids unique). ids and scores
// must hold TrainingQueryCount(queries.rows(), options) * k entries. When
// `sample` is given it receives the sampled row numbers. InvalidArgument as
// ExactTopK says (non-finite values only count in sampled rows; the others
// are never read) and for options out of range. Allocates the gathered
// sample (m x dim floats) when it is a proper subset, and in kApprox a unit
// copy of the sample, the groups' candidate ids (groups x candidates) and per
// task one gathered candidate set (candidates x dim floats); `pool` may be
// null.
absl::Status TrainingTopK(ConstMatrixView keys, ConstMatrixView queries, int k,
                          const TrainingTopKOptions& options, ThreadPool* pool,
                          std::span<int64_t> ids, std::span<float> scores,
                          std::vector<size_t>* sample = nullptr);

}  // namespace kvr
