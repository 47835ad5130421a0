// FlatIndex: exact top-k maximum-inner-product search by a full scan.
//
// The oracle for every approximate index, the exact-scan baseline, and the
// flat-scanned tail buffer for recently appended tokens. Keys are stored
// contiguously (n x dim fp32).
//
// Search runs on the calling thread (a retrieval node already parallelises
// across shards). SearchParallel additionally splits the work (blocks of
// queries, and for few queries also ranges of keys) over a ThreadPool; both
// return identical results. Ties are broken deterministically: larger score
// first, then smaller id, so results equal a std::sort oracle with that order.
//
// The scan is common/exact_topk.h's ExactTopKScan (blocked, tiles of keys
// against blocks of queries). Scratch comes from a per-index pool: the
// steady-state search path does not allocate.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "common/exact_topk.h"
#include "common/thread_pool.h"
#include "retrieval_node/index/index.h"

namespace kvr::index {

class FlatIndex final : public KeyIndex {
 public:
  // An empty index over dim-dimensional keys; InvalidArgument when dim == 0
  // or dim > kMaxDim.
  static absl::StatusOr<std::unique_ptr<FlatIndex>> Create(size_t dim);
  // Restores an index written by Serialize (blob.kind must be kFlat).
  static absl::StatusOr<std::unique_ptr<FlatIndex>> Deserialize(const OpenedBlob& blob);
  ~FlatIndex() override;

  IndexType type() const override { return IndexType::kFlat; }
  size_t dim() const override { return dim_; }
  size_t size() const override { return n_; }
  absl::Status Search(ConstMatrixView queries, const SearchParams& params,
                      std::span<int64_t> ids, std::span<float> scores,
                      SearchStats* stats = nullptr) const override;
  absl::Status Add(ConstMatrixView keys) override;
  size_t MemoryBytes() const override;
  absl::Status Serialize(std::vector<uint8_t>* out) const override;
  ConstMatrixView keys() const override { return ConstMatrixView(keys_.data(), n_, dim_); }

  // Search with the work spread over `pool` (null: same as Search).
  absl::Status SearchParallel(ConstMatrixView queries, const SearchParams& params,
                              std::span<int64_t> ids, std::span<float> scores, ThreadPool* pool,
                              SearchStats* stats = nullptr) const;

  // Reserves storage for `n` keys in total.
  void Reserve(size_t n);
  // Removes every key (ids restart at 0); keeps the capacity.
  void Clear();

 private:
  explicit FlatIndex(size_t dim);

  size_t dim_;
  size_t n_ = 0;
  std::vector<float> keys_;  // n x dim
  std::unique_ptr<ExactTopKScratch> scratch_;
};

}  // namespace kvr::index
