// Exact top-k maximum-inner-product search by a full scan: the training data
// of the attention-aware index (each prefill query's best keys), benchmark
// ground truth, and the scan behind FlatIndex.
//
// The scan is blocked: a tile of keys that fits in L2 is scored against a
// block of queries (simd dot_batch) before moving on, and each query keeps a
// bounded candidate buffer (TopKCollector) filtered by its current k-th best
// score. Ties are broken deterministically: larger score first, then smaller
// id, so results equal a std::sort oracle with that order, and a scan split
// over a ThreadPool returns the same results as a serial one.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "common/tensor.h"
#include "common/thread_pool.h"

namespace kvr {

// Limits of every top-k search (ExactTopK and the retrieval indexes).
inline constexpr int kMaxTopK = 4096;                  // k upper bound
inline constexpr uint64_t kMaxTopKKeys = 1ull << 31;  // keys searched (ids fit uint32)

// InvalidArgument naming the first NaN or Inf of `m` ("<what> row i col j is
// NaN"); OK when every value is finite.
absl::Status CheckFinite(ConstMatrixView m, absl::string_view what);

// The argument checks of a top-k search of `queries` over `size` keys of
// dimension `dim` (InvalidArgument): a query dim other than dim, k outside
// [1, kMaxTopK], no keys, k > size, outputs smaller than queries.rows() * k,
// non-finite query values. `what` names the searched object in messages.
absl::Status ValidateTopKArgs(size_t dim, size_t size, ConstMatrixView queries, int k,
                              std::span<const int64_t> ids, std::span<const float> scores,
                              absl::string_view what);

namespace internal {
class ExactScanScratchPool;  // exact_topk.cc
}  // namespace internal

// Scan scratch kept across calls (FlatIndex holds one, so its steady-state
// searches do not allocate). Thread-safe: concurrent scans take separate
// buffers from it.
class ExactTopKScratch {
 public:
  ExactTopKScratch();
  ~ExactTopKScratch();
  ExactTopKScratch(const ExactTopKScratch&) = delete;
  ExactTopKScratch& operator=(const ExactTopKScratch&) = delete;

  // Bytes held by the idle buffers.
  size_t MemoryBytes() const;

 private:
  friend void ExactTopKScan(ConstMatrixView keys, ConstMatrixView queries, size_t k,
                            std::span<int64_t> ids, std::span<float> scores, ThreadPool* pool,
                            ExactTopKScratch* scratch);
  std::unique_ptr<internal::ExactScanScratchPool> pool_;
};

// ExactTopK without the argument checks (the caller ran ValidateTopKArgs):
// k results per query row, best first, to ids / scores rows of k. The work
// is spread over `pool` when given (null: the calling thread); scratch from
// `scratch`.
void ExactTopKScan(ConstMatrixView keys, ConstMatrixView queries, size_t k,
                   std::span<int64_t> ids, std::span<float> scores, ThreadPool* pool,
                   ExactTopKScratch* scratch);

// Exact top-k of `queries` over `keys` (n x dim, strided views; no copy):
// for each query row i, the k keys with the largest inner product, best
// first, to ids[i*k .. i*k+k) (row numbers in `keys`) and their inner
// products to scores[...]. InvalidArgument as ValidateTopKArgs says (k may
// not exceed keys.rows()) and for more than kMaxTopKKeys keys. Allocates its
// scratch per call; `pool` may be null.
absl::Status ExactTopK(ConstMatrixView keys, ConstMatrixView queries, int k,
                       std::span<int64_t> ids, std::span<float> scores, ThreadPool* pool);

}  // namespace kvr
