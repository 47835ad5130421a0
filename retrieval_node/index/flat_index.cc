#include "retrieval_node/index/flat_index.h"

#include <algorithm>
#include <cstring>

#include "common/simd/kernels.h"
#include "retrieval_node/index/scratch_pool.h"
#include "retrieval_node/index/topk.h"

namespace kvr::index {
namespace {

constexpr uint32_t kFlatVersion = 1;
// Key tile: ~256 KiB of keys stays in L2 while a block of queries scans it.
constexpr size_t kTileBytes = 256 * 1024;
constexpr size_t kQueryBlock = 32;
// Below this many keys per task a key-range split is not worth its merge.
constexpr size_t kMinKeysPerSplit = 16384;

size_t TileKeys(size_t dim) {
  return std::clamp<size_t>(kTileBytes / (dim * sizeof(float)), 64, 4096);
}

}  // namespace

namespace internal {

// Per-task scratch: one collector per query of a block and one tile of scores.
struct FlatScratch {
  std::vector<TopKCollector> collectors;
  std::vector<float> tile_scores;

  void Prepare(size_t tile) {
    if (collectors.size() < kQueryBlock) collectors.resize(kQueryBlock);
    if (tile_scores.size() < tile) tile_scores.resize(tile);
  }
  size_t MemoryBytes() const {
    size_t b = tile_scores.capacity() * sizeof(float);
    for (const auto& c : collectors) b += c.MemoryBytes();
    return b;
  }
};

// A free list of scratch objects; grows to the peak number of concurrent tasks.
class FlatScratchPool : public ScratchPool<FlatScratch> {};

}  // namespace internal

namespace {

using internal::FlatScratch;
using internal::FlatScratchPool;

// The blocked scan: queries [q_begin, q_end) (at most kQueryBlock) against
// keys [k_begin, k_end); results (k per query, best first) go to ids/scores
// rows q - q_begin of the given output. Keys are addressed by global id.
void ScanBlock(ConstMatrixView keys, ConstMatrixView queries, size_t q_begin,
                      size_t q_end, size_t k_begin, size_t k_end, size_t k,
                      FlatScratch* s, int64_t* ids_out, float* scores_out,
                      size_t out_stride) {
  const auto& kern = simd::Active();
  const size_t dim = keys.cols();
  const size_t tile = TileKeys(dim);
  s->Prepare(tile);
  const size_t nq = q_end - q_begin;
  for (size_t q = 0; q < nq; ++q) s->collectors[q].Reset(k);
  float* sc = s->tile_scores.data();
  for (size_t t0 = k_begin; t0 < k_end; t0 += tile) {
    const size_t tn = std::min(tile, k_end - t0);
    const float* tile_rows = keys.row(t0);
    for (size_t q = 0; q < nq; ++q) {
      kern.dot_batch(queries.row(q_begin + q), tile_rows, tn, dim, keys.stride(), sc);
      s->collectors[q].PushRange(sc, tn, static_cast<uint32_t>(t0));
    }
  }
  for (size_t q = 0; q < nq; ++q) {
    s->collectors[q].Finish(ids_out + q * out_stride, scores_out + q * out_stride);
  }
}

// Shared by FlatIndex and ExactTopK; arguments already validated.
void SearchImpl(ConstMatrixView keys, ConstMatrixView queries, size_t k,
                       std::span<int64_t> ids, std::span<float> scores, ThreadPool* pool,
                       FlatScratchPool* scratch_pool) {
  const size_t nq = queries.rows();
  const size_t nk = keys.rows();
  if (nq == 0) return;
  const size_t blocks = (nq + kQueryBlock - 1) / kQueryBlock;
  const size_t workers = pool == nullptr ? 1 : pool->size() + 1;
  size_t splits = 1;
  if (workers > blocks) {
    splits = std::min((workers + blocks - 1) / blocks, std::max<size_t>(1, nk / kMinKeysPerSplit));
  }
  if (splits <= 1) {
    auto run = [&](size_t b0, size_t b1) {
      auto s = scratch_pool->Acquire();
      for (size_t b = b0; b < b1; ++b) {
        const size_t q0 = b * kQueryBlock, q1 = std::min(nq, q0 + kQueryBlock);
        ScanBlock(keys, queries, q0, q1, 0, nk, k, s.get(), ids.data() + q0 * k,
                  scores.data() + q0 * k, k);
      }
      scratch_pool->Release(std::move(s));
    };
    if (pool == nullptr || blocks <= 1) {
      run(0, blocks);
    } else {
      pool->ParallelFor(blocks, 1, run);
    }
    return;
  }
  // Few queries, many keys: each task scans one key range for one query
  // block into a private k-list; the lists of a query are then merged.
  // (Allocates the split results for this call.)
  // Split points fall on tile boundaries, so every key is scored by the same
  // dot_batch call shape as in the serial scan (bit-identical results).
  const size_t tile = TileKeys(keys.cols());
  const size_t per_split = ((nk + splits - 1) / splits + tile - 1) / tile * tile;
  std::vector<int64_t> part_ids(splits * nq * k);
  std::vector<float> part_scores(splits * nq * k);
  pool->ParallelFor(blocks * splits, 1, [&](size_t t0, size_t t1) {
    auto s = scratch_pool->Acquire();
    for (size_t t = t0; t < t1; ++t) {
      const size_t b = t / splits, sp = t % splits;
      const size_t q0 = b * kQueryBlock, q1 = std::min(nq, q0 + kQueryBlock);
      const size_t k0 = sp * per_split, k1 = std::min(nk, k0 + per_split);
      int64_t* io = part_ids.data() + (sp * nq + q0) * k;
      float* so = part_scores.data() + (sp * nq + q0) * k;
      if (k0 >= k1) {
        std::fill(io, io + (q1 - q0) * k, -1);
        std::fill(so, so + (q1 - q0) * k, -std::numeric_limits<float>::infinity());
        continue;
      }
      ScanBlock(keys, queries, q0, q1, k0, k1, k, s.get(), io, so, k);
    }
    scratch_pool->Release(std::move(s));
  });
  auto s = scratch_pool->Acquire();
  s->Prepare(tile);
  TopKCollector& c = s->collectors[0];
  for (size_t q = 0; q < nq; ++q) {
    c.Reset(k);
    for (size_t sp = 0; sp < splits; ++sp) {
      const int64_t* io = part_ids.data() + (sp * nq + q) * k;
      const float* so = part_scores.data() + (sp * nq + q) * k;
      for (size_t j = 0; j < k && io[j] >= 0; ++j) c.Push(so[j], static_cast<uint32_t>(io[j]));
    }
    c.Finish(ids.data() + q * k, scores.data() + q * k);
  }
  scratch_pool->Release(std::move(s));
}

}  // namespace

FlatIndex::FlatIndex(size_t dim) : dim_(dim), scratch_(std::make_unique<FlatScratchPool>()) {}
FlatIndex::~FlatIndex() = default;

absl::StatusOr<std::unique_ptr<FlatIndex>> FlatIndex::Create(size_t dim) {
  if (dim == 0 || dim > kMaxDim) {
    return absl::InvalidArgumentError(
        absl::StrCat("flat index dim ", dim, " outside [1, ", kMaxDim, "]"));
  }
  return std::unique_ptr<FlatIndex>(new FlatIndex(dim));
}

absl::Status FlatIndex::Search(ConstMatrixView queries, const SearchParams& params,
                               std::span<int64_t> ids, std::span<float> scores,
                               SearchStats* stats) const {
  return SearchParallel(queries, params, ids, scores, nullptr, stats);
}

absl::Status FlatIndex::SearchParallel(ConstMatrixView queries, const SearchParams& params,
                                       std::span<int64_t> ids, std::span<float> scores,
                                       ThreadPool* pool, SearchStats* stats) const {
  KVR_RETURN_IF_ERROR(ValidateSearch(*this, queries, params, ids, scores));
  SearchImpl(keys(), queries, static_cast<size_t>(params.k), ids, scores, pool, scratch_.get());
  if (stats != nullptr) {
    stats->queries += static_cast<int64_t>(queries.rows());
    stats->distance_computations += static_cast<int64_t>(queries.rows() * n_);
  }
  return absl::OkStatus();
}

absl::Status ExactTopK(ConstMatrixView keys, ConstMatrixView queries, int k,
                       std::span<int64_t> ids, std::span<float> scores, ThreadPool* pool,
                       SearchStats* stats) {
  if (keys.rows() > kMaxKeys) {
    return absl::InvalidArgumentError(
        absl::StrCat("exact top-k over ", keys.rows(), " keys exceeds the limit ", kMaxKeys));
  }
  KVR_RETURN_IF_ERROR(
      ValidateSearchArgs(keys.cols(), keys.rows(), queries, k, ids, scores, "key set"));
  FlatScratchPool scratch;
  SearchImpl(keys, queries, static_cast<size_t>(k), ids, scores, pool, &scratch);
  if (stats != nullptr) {
    stats->queries += static_cast<int64_t>(queries.rows());
    stats->distance_computations += static_cast<int64_t>(queries.rows() * keys.rows());
  }
  return absl::OkStatus();
}

absl::Status FlatIndex::Add(ConstMatrixView keys) {
  if (keys.rows() == 0) return absl::OkStatus();
  KVR_RETURN_IF_ERROR(ValidateFinite(keys, dim_, "keys"));
  if (n_ + keys.rows() > kMaxKeys) {
    return absl::InvalidArgumentError(absl::StrCat("flat index: adding ", keys.rows(),
                                                   " keys to ", n_, " exceeds the limit ",
                                                   kMaxKeys));
  }
  keys_.resize((n_ + keys.rows()) * dim_);
  for (size_t i = 0; i < keys.rows(); ++i) {
    std::memcpy(keys_.data() + (n_ + i) * dim_, keys.row(i), dim_ * sizeof(float));
  }
  n_ += keys.rows();
  return absl::OkStatus();
}

void FlatIndex::Reserve(size_t n) { keys_.reserve(n * dim_); }

void FlatIndex::Clear() {
  keys_.clear();
  n_ = 0;
}

size_t FlatIndex::MemoryBytes() const {
  return sizeof(*this) + keys_.capacity() * sizeof(float) + scratch_->MemoryBytes();
}

absl::Status FlatIndex::Serialize(std::vector<uint8_t>* out) const {
  BinaryWriter w;
  w.Put<uint64_t>(dim_);
  w.Put<uint64_t>(n_);
  w.PutArray(std::span<const float>(keys_.data(), n_ * dim_));
  const auto blob = SealBlob(kFlatBlobKind, kFlatVersion, w.bytes());
  out->insert(out->end(), blob.begin(), blob.end());
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<FlatIndex>> FlatIndex::Deserialize(const OpenedBlob& blob) {
  if (blob.kind != kFlatBlobKind) {
    return absl::InvalidArgumentError(
        absl::StrCat("blob kind ", blob.kind, " is not a flat index"));
  }
  if (blob.version != kFlatVersion) {
    return absl::InvalidArgumentError(absl::StrCat("flat index: unsupported format version ",
                                                   blob.version, " (this build reads ",
                                                   kFlatVersion, ")"));
  }
  BinaryReader r(blob.payload, "flat index");
  uint64_t dim = 0, n = 0;
  KVR_RETURN_IF_ERROR(r.Get(&dim, "dim"));
  KVR_RETURN_IF_ERROR(r.Get(&n, "size"));
  if (dim == 0 || dim > kMaxDim) {
    return absl::DataLossError(absl::StrCat("flat index: dim ", dim, " outside [1, ", kMaxDim, "]"));
  }
  if (n > kMaxKeys) {
    return absl::DataLossError(
        absl::StrCat("flat index: claims ", n, " keys, limit ", kMaxKeys));
  }
  std::unique_ptr<FlatIndex> idx(new FlatIndex(dim));
  KVR_RETURN_IF_ERROR(r.GetArray(&idx->keys_, "keys", n * dim));
  if (idx->keys_.size() != n * dim) {
    return absl::DataLossError(absl::StrCat("flat index: ", idx->keys_.size(),
                                            " key values, expected ", n, " x ", dim));
  }
  KVR_RETURN_IF_ERROR(r.ExpectEnd());
  idx->n_ = n;
  absl::Status finite = ValidateFinite(idx->keys(), dim, "flat index keys");
  if (!finite.ok()) return absl::DataLossError(finite.message());
  return idx;
}

}  // namespace kvr::index
