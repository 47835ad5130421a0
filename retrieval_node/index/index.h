// The key-index interface every retrieval index implements.
//
// An index holds the keys of one (sequence, layer, kv head, chunk) shard and
// answers top-k maximum-inner-product queries in batches. Ids are the key's
// position in insertion order (0 .. size()-1). Search is const and
// thread-safe (any number of concurrent callers; each takes scratch from the
// index's pool, so the steady-state search path does not allocate). Add and
// Build are not thread-safe with respect to Search: the owner serialises them.
#pragma once

#include <cstdint>
#include <limits>
#include <memory>
#include <span>


#include "common/exact_topk.h"
#include "common/serialize.h"
#include "common/status.h"
#include "common/tensor.h"

namespace kvr::index {

// The kind of a key index: the one enum for what a sequence asks for
// (SequenceSpec::index_type), what a chunk has (KeyIndex::type(), ShardInfo)
// and what the CLI / flags name. The values are persisted (the shard store
// writes them as a uint8) and index per-kind metric arrays: never renumber;
// a new kind takes the next value. kvr.v1.IndexType has its own numbering,
// mapped in retrieval_node/wire/proto_convert.cc only.
enum class IndexType : uint8_t {
  kGraph = 0,  // attention-aware graph (AttentionGraphIndex)
  kFlat = 1,   // exact scan (FlatIndex)
  kIvf = 2,    // inverted lists over k-means clusters (IvfIndex)
  // Requested only (SequenceSpec::index_type): the node builds and
  // calibrates the candidates and keeps the cheapest meeting the target
  // recall (calibrate.h). A built index never has this type: it reports the
  // kind it chose.
  kAuto = 3,
  kFlatSq8 = 4,  // scan of SQ8 key codes + exact rerank (FlatSq8Index)
  // IVF whose lists hold SQ8 codes (IvfIndex with IvfOptions::sq8; the same
  // blob kind as kIvf, so blobs written before this value load as this kind).
  kIvfSq8 = 5,
  // SQ8 scan of the keys' top principal directions + exact rerank
  // (PcaSq8Index, pca_sq8_index.h).
  kPcaSq8 = 6,
};
inline constexpr size_t kNumIndexTypes = 7;
// "graph", "flat", "ivf", "auto", "flat_sq8", "ivf_sq8", "pca_sq8".
absl::string_view IndexTypeName(IndexType type);
// Parses the names above; InvalidArgument naming the value otherwise.
absl::StatusOr<IndexType> ParseIndexType(absl::string_view name);
// True for the IVF kinds (kIvf, kIvfSq8): SearchParams::nprobe is their effort.
inline bool IsIvfKind(IndexType type) {
  return type == IndexType::kIvf || type == IndexType::kIvfSq8;
}

// The kind tag of each index's serialized blob (common/serialize.h), written
// into every blob: persisted, never renumber.
inline constexpr uint32_t kFlatBlobKind = 1;
inline constexpr uint32_t kIvfBlobKind = 2;
inline constexpr uint32_t kGraphBlobKind = 3;
inline constexpr uint32_t kCalibratedBlobKind = 4;  // CalibratedIndex (calibrate.h)
inline constexpr uint32_t kFlatSq8BlobKind = 5;     // FlatSq8Index
inline constexpr uint32_t kPcaSq8BlobKind = 6;      // PcaSq8Index

// Limits every index enforces on its inputs (ValidateSearch / Add / loaders).
inline constexpr int kMaxSearchK = kMaxTopK;        // SearchParams::k upper bound
inline constexpr size_t kMaxDim = 4096;             // key/query dimension
inline constexpr uint64_t kMaxKeys = kMaxTopKKeys;  // keys per index (ids fit uint32)

// Knobs for one Search call. Each index reads the ones it understands.
struct SearchParams {
  int k = 100;     // results per query; 1 <= k <= min(size(), kMaxSearchK)
  int beam = 0;    // graph: beam width L (0: the index's default; raised to k if smaller)
  int nprobe = 0;  // IVF: clusters probed (0: the index's default)
  // SQ8 kinds (flat_sq8, IVF with sq8, pca_sq8): candidates rescored
  // exactly per result (0: the index's; else [1, kMaxSq8RerankFactor],
  // sq8_codes.h). pca_sq8's calibrated effort.
  int rerank_factor = 0;
};

// Work counters, summed over the queries of a call. Callers may pass one
// SearchStats to many calls to accumulate.
struct SearchStats {
  int64_t queries = 0;
  int64_t distance_computations = 0;  // keys whose inner product with a query was computed
};

// What self-calibration (calibrate.h) chose for an index.
struct CalibrationResult {
  IndexType kind = IndexType::kFlat;  // the index searched (never kAuto)
  int beam = 0;    // graph: SearchParams::beam used when a search leaves it 0 (0: graph default)
  int nprobe = 0;  // IVF: SearchParams::nprobe used when a search leaves it 0 (0: IVF default)
  // pca_sq8: SearchParams::rerank_factor used when a search leaves it 0 (0:
  // the index's default).
  int rerank_factor = 0;
  // Mean recall@k on the held-back queries at that effort; NaN when there
  // were none (the effort is then the index's built-in default).
  double expected_recall = std::numeric_limits<double>::quiet_NaN();
  double target_recall = 0;     // what was asked for
  int k = 0;                    // the k of expected_recall
  int64_t holdout_queries = 0;  // held-back queries evaluated
  // Mean distance computations per held-back query at the chosen effort
  // times the kind's cost constant, in flat-scan distances (a flat scan of
  // n keys costs n). 0 when unknown.
  double cost_per_query = 0;
  // Measured µs per query at the chosen effort: for IndexType::kAuto the
  // median over CalibrationOptions::timing_repetitions of the mean time of
  // the held-back timing queries searched one at a time on one thread
  // (calibrate.h). 0 when not measured (a kind asked for by name, a shard
  // below kAutoMinKeys, a blob written before it was recorded).
  double measured_us = 0;
};

class KeyIndex {
 public:
  virtual ~KeyIndex() = default;

  virtual IndexType type() const = 0;
  virtual size_t dim() const = 0;
  virtual size_t size() const = 0;

  // For each row i of `queries` (n x dim()), writes the k keys with the largest
  // inner product, best first, to ids[i*k .. i*k+k) and their inner products
  // to scores[...]. Approximate indexes may return fewer than k distinct keys;
  // the rest of the row is padded with id -1 and score -inf.
  // Errors (InvalidArgument): dim mismatch, empty index, k outside [1, size()],
  // non-finite query values, output spans smaller than n*k.
  virtual absl::Status Search(ConstMatrixView queries, const SearchParams& params,
                              std::span<int64_t> ids, std::span<float> scores,
                              SearchStats* stats = nullptr) const = 0;

  // Appends keys (n x dim(), finite); they get ids size() .. size()+n-1 and are
  // searchable when Add returns.
  virtual absl::Status Add(ConstMatrixView keys) = 0;

  // Bytes of memory the index holds (keys, graph, centroids, scratch pools).
  virtual size_t MemoryBytes() const = 0;

  // Appends the index (keys included) as a sealed blob (common/serialize.h).
  virtual absl::Status Serialize(std::vector<uint8_t>* out) const = 0;

  // The keys, as stored (n x dim()).
  virtual ConstMatrixView keys() const = 0;

  // What calibration chose, for a CalibratedIndex (calibrate.h); null for an
  // index that was not calibrated. Valid as long as the index.
  virtual const CalibrationResult* calibration() const { return nullptr; }
};

// Restores any index written by KeyIndex::Serialize. Corrupt or truncated
// blobs return DataLoss; an unknown kind or version returns InvalidArgument.
absl::StatusOr<std::unique_ptr<KeyIndex>> LoadIndex(std::span<const uint8_t> blob);

// Shared argument checks for Search implementations (ValidateTopKArgs with
// the index's dim and size).
absl::Status ValidateSearch(const KeyIndex& index, ConstMatrixView queries,
                            const SearchParams& params, std::span<int64_t> ids,
                            std::span<float> scores);
// Checks that `m` has `dim` columns and only finite values; `what` names it.
absl::Status ValidateFinite(ConstMatrixView m, size_t dim, absl::string_view what);

}  // namespace kvr::index
