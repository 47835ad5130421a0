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
// The top-k of every sampled query is exact: identical to ExactTopK's for
// that query (same scores, same tie order: larger score, then smaller id).
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "common/tensor.h"
#include "common/thread_pool.h"

namespace kvr {

// Upper bound of TrainingTopKOptions::max_queries (and of the worker's
// --max_train_queries): 4M sampled queries.
inline constexpr size_t kMaxTrainingQueries = size_t{1} << 22;

struct TrainingTopKOptions {
  // Training queries kept at most: more rows are reduced to a stratified
  // sample of exactly this many; 0 keeps every row (the exact O(T * N) scan).
  // At most kMaxTrainingQueries.
  size_t max_queries = 16384;
  // Seed of the position chosen inside each stratum (the same seed and row
  // count always give the same sample).
  uint64_t seed = 0x5eed7a1e;
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
// sampled query i's, identical to ExactTopK of that query. ids and scores
// must hold TrainingQueryCount(queries.rows(), options) * k entries. When
// `sample` is given it receives the sampled row numbers. InvalidArgument as
// ExactTopK says (non-finite values only count in sampled rows; the others
// are never read) and for options out of range. Allocates the gathered
// sample (m x dim floats) when it is a proper subset; `pool` may be null.
absl::Status TrainingTopK(ConstMatrixView keys, ConstMatrixView queries, int k,
                          const TrainingTopKOptions& options, ThreadPool* pool,
                          std::span<int64_t> ids, std::span<float> scores,
                          std::vector<size_t>* sample = nullptr);

}  // namespace kvr
