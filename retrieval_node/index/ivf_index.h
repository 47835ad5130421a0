// IvfIndex: inverted-file index for maximum inner product search.
//
// Keys are clustered by spherical k-means (kmeans.h); each inverted list
// stores its keys contiguously (a probe is one contiguous dot_batch scan)
// together with their ids. Search scores the query against every centroid,
// probes the nprobe best lists and keeps the top k. Add assigns new keys to
// their best centroid (the centroids are not retrained).
//
// The keys are also kept in id order for keys() (so memory is ~2x the keys).
// Search is const and thread-safe with per-index pooled scratch.
//
// With IvfOptions::sq8 the lists hold SQ8 codes (sq8_codes.h; per-dimension
// scales trained on the build keys) instead of fp32 keys: a probe scans
// codes, the best rerank_factor * k candidates over all probed lists are
// rescored exactly against the id-ordered fp32 keys (scores exact), and the
// memory is the keys + 1 byte per key and dimension. Appended keys are coded
// with the build's scales (values outside the build range saturate).
// Blob version 2 carries sq8, rerank_factor and the scales; version 1
// blobs (no SQ8) still load.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "common/thread_pool.h"
#include "retrieval_node/index/index.h"
#include "retrieval_node/index/sq8_codes.h"

namespace kvr::index {

namespace internal {
class IvfScratchPool;  // ivf_index.cc
}  // namespace internal

struct IvfOptions {
  size_t nlist = 256;       // inverted lists (clamped to the number of keys)
  int iterations = 10;      // k-means iterations
  uint64_t seed = 1;        // k-means seed
  int default_nprobe = 16;  // lists probed when SearchParams::nprobe == 0
  size_t max_train_points = 0;  // k-means training subsample (0: min(n, 256 * nlist))
  bool sq8 = false;             // lists hold SQ8 codes, searched with an exact rerank
  int rerank_factor = 4;        // sq8: candidates rescored per result, [1, kMaxSq8RerankFactor]
};

class IvfIndex final : public KeyIndex {
 public:
  // Trains centroids on `keys` (n x d, finite, n >= 1) and adds them.
  // `pool` may be null.
  static absl::StatusOr<std::unique_ptr<IvfIndex>> Build(ConstMatrixView keys,
                                                         const IvfOptions& options,
                                                         ThreadPool* pool);
  static absl::StatusOr<std::unique_ptr<IvfIndex>> Deserialize(const OpenedBlob& blob);
  ~IvfIndex() override;

  // kIvfSq8 when the lists hold SQ8 codes (options().sq8), else kIvf.
  IndexType type() const override { return options_.sq8 ? IndexType::kIvfSq8 : IndexType::kIvf; }
  size_t dim() const override { return dim_; }
  size_t size() const override { return n_; }
  // SearchParams::nprobe: 0 -> default_nprobe; clamped to [1, nlist].
  // SearchParams::rerank_factor (sq8 only): 0 -> options().rerank_factor.
  // distance_computations counts nlist centroid products + scanned keys
  // (sq8: + keys rescored).
  absl::Status Search(ConstMatrixView queries, const SearchParams& params,
                      std::span<int64_t> ids, std::span<float> scores,
                      SearchStats* stats = nullptr) const override;
  absl::Status Add(ConstMatrixView keys) override;
  // Add with the centroid assignment spread over `pool` (may be null).
  absl::Status AddParallel(ConstMatrixView keys, ThreadPool* pool);
  size_t MemoryBytes() const override;
  absl::Status Serialize(std::vector<uint8_t>* out) const override;
  ConstMatrixView keys() const override { return ConstMatrixView(keys_.data(), n_, dim_); }

  const IvfOptions& options() const { return options_; }
  size_t nlist() const { return lists_.size(); }
  ConstMatrixView centroids() const {
    return ConstMatrixView(centroids_.data(), lists_.size(), dim_);
  }
  size_t list_size(size_t list) const { return lists_[list].ids.size(); }

 private:
  struct List {
    std::vector<float> keys;     // size x dim, contiguous (empty with sq8)
    std::vector<uint32_t> ids;   // size (key ids)
    Sq8Codes codes;              // sq8: the keys' codes
  };
  IvfIndex(size_t dim, const IvfOptions& options);
  // Appends key `id` (keys_ row) to list `c`.
  void AppendToList(size_t c, uint32_t id);
  absl::Status SearchSq8(ConstMatrixView queries, const SearchParams& params,
                         std::span<int64_t> ids, std::span<float> scores,
                         SearchStats* stats) const;

  size_t dim_;
  size_t n_ = 0;
  IvfOptions options_;
  std::vector<float> centroids_;  // nlist x dim, unit norm
  std::vector<List> lists_;
  std::vector<float> keys_;       // n x dim, id order
  Sq8Quantizer quantizer_;        // sq8 only
  std::unique_ptr<internal::IvfScratchPool> scratch_;
};

}  // namespace kvr::index
