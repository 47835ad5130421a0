// FlatSq8Index: a full scan over SQ8 key codes with an exact rerank
// (sq8_codes.h), IndexType::kFlatSq8, blob kind kFlatSq8BlobKind.
//
// Every key's codes are scored (a quarter of the bytes of the fp32 scan, 64
// products per VNNI instruction), the best rerank_factor * k candidates are
// rescored against the stored fp32 keys and the best k returned with exact
// scores. Recall is not guaranteed 1 (a true top-k key can rank below the
// candidates on its codes) but the scores of what it returns are exact.
//
// The quantizer is trained on the keys present at the first Add and
// retrained (every code re-encoded) whenever the index has grown to twice
// the keys it was trained on: amortised O(1) per appended key, and appended
// keys never saturate for long. Search is const and thread-safe (pooled
// scratch, no steady-state allocation); Add is not (the owner serialises).
// Memory: n * dim * 4 bytes of keys + n * dim bytes of codes.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "retrieval_node/index/index.h"
#include "retrieval_node/index/sq8_codes.h"

namespace kvr::index {

namespace internal {
class Sq8ScratchPool;  // flat_sq8_index.cc
}  // namespace internal

class FlatSq8Index final : public KeyIndex {
 public:
  // An empty index; InvalidArgument naming the field when dim is outside
  // [1, kMaxDim] or rerank_factor outside [1, kMaxSq8RerankFactor].
  static absl::StatusOr<std::unique_ptr<FlatSq8Index>> Create(
      size_t dim, int rerank_factor = kDefaultSq8RerankFactor);
  // Restores an index written by Serialize (blob.kind must be kFlatSq8BlobKind);
  // every field is checked (DataLoss naming it) and the codes re-encoded.
  static absl::StatusOr<std::unique_ptr<FlatSq8Index>> Deserialize(const OpenedBlob& blob);
  ~FlatSq8Index() override;

  IndexType type() const override { return IndexType::kFlatSq8; }
  size_t dim() const override { return dim_; }
  size_t size() const override { return n_; }
  // SearchParams::rerank_factor: 0 -> the index's; else [1, kMaxSq8RerankFactor].
  // distance_computations counts the codes scanned plus the keys rescored.
  absl::Status Search(ConstMatrixView queries, const SearchParams& params,
                      std::span<int64_t> ids, std::span<float> scores,
                      SearchStats* stats = nullptr) const override;
  absl::Status Add(ConstMatrixView keys) override;
  size_t MemoryBytes() const override;
  absl::Status Serialize(std::vector<uint8_t>* out) const override;
  ConstMatrixView keys() const override { return ConstMatrixView(keys_.data(), n_, dim_); }

  int rerank_factor() const { return rerank_factor_; }
  // Keys the current quantizer was trained on.
  size_t trained_size() const { return trained_n_; }

 private:
  FlatSq8Index(size_t dim, int rerank_factor);
  void Retrain();

  size_t dim_;
  int rerank_factor_;
  size_t n_ = 0;
  size_t trained_n_ = 0;
  std::vector<float> keys_;  // n x dim
  Sq8Quantizer quantizer_;
  Sq8Codes codes_;
  std::unique_ptr<internal::Sq8ScratchPool> scratch_;
};

}  // namespace kvr::index
