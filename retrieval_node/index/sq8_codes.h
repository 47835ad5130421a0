// SQ8 key codes: per-dimension 8-bit scalar quantization of keys, the scan
// over their codes and the exact rerank of the survivors (FlatSq8Index and
// IvfIndex with IvfOptions::sq8).
//
// Scale: per dimension (chosen over per-vector because attention keys have a
// few outlier channels whose range would otherwise set every code's step):
// key value x of dimension j is coded c = round((x - lo_j) / scale_j) in
// [0, 255], scale_j = (hi_j - lo_j) / 255 over the training keys; values of
// later keys outside [lo_j, hi_j] saturate at 0 / 255 (only the candidate
// order suffers: the rerank scores exactly). A query q is folded into the
// scales, q'_j = q_j * scale_j, and quantized to signed bytes with one scale
// per query, so q . x ~= const(q) + s(q) * sum_j q8_j * c_j with s(q) > 0:
// the int32 code dot (common/simd/sq8_kernels.h) orders keys as the
// approximate score does, and nothing per key is computed in floating point.
//
// Search: the code scan keeps the best rerank_factor * k candidates (by code
// dot; ties smaller id first), their inner products with the stored fp32 keys
// are computed exactly, and the best k of those are returned: the scores are
// exact (what FlatIndex returns for the same ids, to fp32 rounding of the
// summation), the ids exact whenever the true top-k are among the candidates.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "common/serialize.h"
#include "common/simd/sq8_kernels.h"
#include "common/status.h"
#include "common/tensor.h"
#include "common/topk_collector.h"

namespace kvr::index {

// Bounds of the rerank factor (candidates rescanned exactly per result).
inline constexpr int kDefaultSq8RerankFactor = 4;
inline constexpr int kMaxSq8RerankFactor = 64;

// OK when 1 <= rerank_factor <= kMaxSq8RerankFactor; InvalidArgument naming
// `field` and the range otherwise.
absl::Status ValidateRerankFactor(int rerank_factor, absl::string_view field);

// Per-dimension SQ8 scales. Immutable once trained; thread-safe to share.
class Sq8Quantizer {
 public:
  Sq8Quantizer() = default;
  // Scales from the per-dimension range of `keys` (rows >= 1, finite; not
  // checked here). An empty `keys` gives lo 0, scale 0 (every code 0).
  static Sq8Quantizer Train(ConstMatrixView keys, size_t dim);
  // Restores scales written by Write; DataLoss naming the field when a value
  // is not finite or a scale is negative.
  static absl::StatusOr<Sq8Quantizer> Read(BinaryReader& r, size_t dim);
  void Write(BinaryWriter& w) const;

  size_t dim() const { return lo_.size(); }
  size_t padded_dim() const { return simd::Sq8PaddedDim(lo_.size()); }
  // Codes of key x (dim values) into slot `slot` of a blocked code array.
  void EncodeKey(const float* x, size_t slot, uint8_t* blocks) const;
  // The signed-byte query (padded_dim() entries, the padding 0).
  void EncodeQuery(const float* q, int8_t* out) const;

 private:
  std::vector<float> lo_;         // per dimension
  std::vector<float> scale_;      // per dimension, >= 0
  std::vector<double> inv_scale_; // 1 / scale (0 where scale is 0 or 1/scale overflows)
};

// Blocked codes of n keys (common/simd/sq8_kernels.h layout), grown by Append.
class Sq8Codes {
 public:
  Sq8Codes() = default;
  explicit Sq8Codes(size_t padded_dim) : dpad_(padded_dim) {}
  void Append(const Sq8Quantizer& quantizer, const float* key);
  void Reserve(size_t n);
  void Clear() {
    bytes_.clear();
    n_ = 0;
  }
  size_t size() const { return n_; }
  size_t blocks() const { return (n_ + simd::kSq8Block - 1) / simd::kSq8Block; }
  const uint8_t* data() const { return bytes_.data(); }
  size_t MemoryBytes() const { return bytes_.capacity(); }

 private:
  size_t dpad_ = 0;
  size_t n_ = 0;
  std::vector<uint8_t> bytes_;  // blocks() * Sq8BlockBytes(dpad_)
};

// Queries an SQ8 scan handles together: every code load feeds all of them
// (simd scan_sq8_multi keeps one accumulator per query in registers), so a
// batch reads the codes once per block of queries, not once per query.
inline constexpr size_t kSq8QueryBlock = 8;

// Per-search scratch of an SQ8 scan (pooled by each index): per query slot
// (< kSq8QueryBlock) its encoded query and candidate collector.
struct Sq8Scratch {
  std::vector<int8_t> query;  // kSq8QueryBlock x padded dim
  std::vector<int32_t> dots;    // kSq8QueryBlock x a chunk of keys
  std::vector<uint32_t> hits;   // a chunk's keys at or above a threshold
  TopKCollector candidates[kSq8QueryBlock];
  TopKCollector results;
  std::vector<int64_t> cand_ids;
  std::vector<float> cand_scores;
  std::vector<uint32_t> gather_ids;
  std::vector<float> exact;
  size_t dpad = 0;
  const int8_t* encoded(size_t slot) const { return query.data() + slot * dpad; }
  size_t MemoryBytes() const;
};

// Starts query slot `slot`'s search: encodes `query` into the slot and
// readies its collector for the best `candidates` keys (>= 1).
void BeginSq8Search(const Sq8Quantizer& quantizer, const float* query, size_t candidates,
                    size_t slot, Sq8Scratch& s);

// Scores every key of `codes` against the encoded queries of slots [0, nq)
// and offers each to the slot's collector (by code dot) under id ids[i]
// (ids null: first_id + i). Returns the keys scored per query.
size_t ScanSq8Codes(const simd::Sq8Kernels& kern, const Sq8Codes& codes, const uint32_t* ids,
                    uint32_t first_id, size_t nq, Sq8Scratch& s);

// Finishes slot `slot`'s collector (begun with `candidates`), scores the
// candidates exactly against `keys` (id order, n x d fp32), and writes the
// best k (larger score, then smaller id; pads of -1 / -inf when fewer) to
// ids / scores. Returns the keys rescored. `always` (ascending ids, each
// also set in `always_bits`, bit i of word i / 64) are rescored whatever
// the codes said, after the candidates and without repeating one of them
// (pca_sq8's outliers, which its projected codes cannot rank).
size_t RerankExact(const float* query, ConstMatrixView keys, size_t candidates, size_t k,
                   size_t slot, Sq8Scratch& s, int64_t* ids, float* scores,
                   std::span<const uint32_t> always = {},
                   std::span<const uint64_t> always_bits = {});

}  // namespace kvr::index
