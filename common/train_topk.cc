#include "common/train_topk.h"

#include <algorithm>
#include <string>

#include "absl/strings/str_cat.h"
#include "common/exact_topk.h"
#include "common/status.h"

namespace kvr {
namespace {

// SplitMix64's finaliser: a well-mixed 64-bit hash of x.
uint64_t Mix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// floor(a * b / c) without overflow (a, b, c < 2^64, a * b / c < 2^64).
size_t MulDiv(size_t a, size_t b, size_t c) {
  return static_cast<size_t>(static_cast<unsigned __int128>(a) * b / c);
}

}  // namespace

absl::Status ValidateTrainingTopKOptions(const TrainingTopKOptions& options) {
  if (options.max_queries > kMaxTrainingQueries) {
    return absl::InvalidArgumentError(absl::StrCat("max_queries (--max_train_queries) ",
                                                   options.max_queries,
                                                   " outside [0, ", kMaxTrainingQueries,
                                                   "] (0 = every query)"));
  }
  return absl::OkStatus();
}

size_t TrainingQueryCount(size_t rows, const TrainingTopKOptions& options) {
  return options.max_queries == 0 ? rows : std::min(rows, options.max_queries);
}

std::vector<size_t> TrainingQuerySample(size_t rows, const TrainingTopKOptions& options) {
  const size_t m = TrainingQueryCount(rows, options);
  std::vector<size_t> sample(m);
  if (m == rows) {
    for (size_t i = 0; i < m; ++i) sample[i] = i;
    return sample;
  }
  // m < rows: every stratum [lo, hi) holds at least one row.
  for (size_t i = 0; i < m; ++i) {
    const size_t lo = MulDiv(i, rows, m), hi = MulDiv(i + 1, rows, m);
    sample[i] = lo + static_cast<size_t>(Mix64(options.seed ^ Mix64(i)) % (hi - lo));
  }
  return sample;
}

absl::Status TrainingTopK(ConstMatrixView keys, ConstMatrixView queries, int k,
                          const TrainingTopKOptions& options, ThreadPool* pool,
                          std::span<int64_t> ids, std::span<float> scores,
                          std::vector<size_t>* sample) {
  KVR_RETURN_IF_ERROR(ValidateTrainingTopKOptions(options));
  if (keys.rows() > kMaxTopKKeys) {
    return absl::InvalidArgumentError(absl::StrCat("training top-k over ", keys.rows(),
                                                   " keys exceeds the limit ", kMaxTopKKeys));
  }
  std::vector<size_t> rows = TrainingQuerySample(queries.rows(), options);
  const size_t m = rows.size();
  // Validated on the sample's shape (and every query's finiteness below).
  KVR_RETURN_IF_ERROR(ValidateTopKArgs(keys.cols(), keys.rows(), queries.rows_slice(0, 0), k,
                                       ids, scores, "key set"));
  if (queries.rows() > 0 && queries.cols() != keys.cols()) {
    return absl::InvalidArgumentError(
        absl::StrCat("query dim ", queries.cols(), " != key set dim ", keys.cols()));
  }
  const size_t need = m * static_cast<size_t>(k);
  if (ids.size() < need || scores.size() < need) {
    return absl::InvalidArgumentError(absl::StrCat(
        "output holds ", ids.size(), " ids and ", scores.size(), " scores, need ", need, " (",
        m, " sampled queries x k=", k, ")"));
  }
  ConstMatrixView scanned = queries;
  Matrix gathered;
  if (m < queries.rows()) {
    gathered = Matrix(m, queries.cols());
    for (size_t i = 0; i < m; ++i) {
      std::copy_n(queries.row(rows[i]), queries.cols(), gathered.row(i));
    }
    scanned = gathered.view();
  }
  KVR_RETURN_IF_ERROR(CheckFinite(scanned, "training queries"));
  if (m > 0) {
    ExactTopKScratch scratch;
    ExactTopKScan(keys, scanned, static_cast<size_t>(k), ids, scores, pool, &scratch);
  }
  if (sample != nullptr) *sample = std::move(rows);
  return absl::OkStatus();
}

}  // namespace kvr
