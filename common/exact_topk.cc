#include "common/exact_topk.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/scratch_pool.h"
#include "common/simd/kernels.h"
#include "common/topk_collector.h"

namespace kvr {
namespace {

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
struct ScanScratch {
  std::vector<TopKCollector> collectors;
  std::vector<float> tile_scores;

  // Scores of a whole query block against one tile: kQueryBlock x tile.
  void Prepare(size_t tile) {
    if (collectors.size() < kQueryBlock) collectors.resize(kQueryBlock);
    if (tile_scores.size() < kQueryBlock * tile) tile_scores.resize(kQueryBlock * tile);
  }
  size_t MemoryBytes() const {
    size_t b = tile_scores.capacity() * sizeof(float);
    for (const auto& c : collectors) b += c.MemoryBytes();
    return b;
  }
};

// A free list of scratch objects; grows to the peak number of concurrent tasks.
class ExactScanScratchPool : public ScratchPool<ScanScratch> {};

}  // namespace internal

namespace {

using internal::ScanScratch;
using internal::ExactScanScratchPool;

// The blocked scan: queries [q_begin, q_end) (at most kQueryBlock) against
// keys [k_begin, k_end); results (k per query, best first) go to ids/scores
// rows q - q_begin of the given output. Keys are addressed by global id.
void ScanBlock(ConstMatrixView keys, ConstMatrixView queries, size_t q_begin, size_t q_end,
               size_t k_begin, size_t k_end, size_t k, ScanScratch* s, int64_t* ids_out,
               float* scores_out, size_t out_stride) {
  const auto& kern = simd::Active();
  const size_t dim = keys.cols();
  const size_t tile = TileKeys(dim);
  s->Prepare(tile);
  const size_t nq = q_end - q_begin;
  for (size_t q = 0; q < nq; ++q) s->collectors[q].Reset(k);
  float* sc = s->tile_scores.data();
  for (size_t t0 = k_begin; t0 < k_end; t0 += tile) {
    const size_t tn = std::min(tile, k_end - t0);
    // The whole block against the tile at once (each key row read once per
    // pair of queries), every score bit-identical to dot_batch's.
    kern.dot_batch_multi(queries.row(q_begin), nq, queries.stride(), keys.row(t0), tn, dim,
                         keys.stride(), sc, tile);
    for (size_t q = 0; q < nq; ++q) {
      s->collectors[q].PushRange(sc + q * tile, tn, static_cast<uint32_t>(t0));
    }
  }
  for (size_t q = 0; q < nq; ++q) {
    s->collectors[q].Finish(ids_out + q * out_stride, scores_out + q * out_stride);
  }
}

// The scan; arguments already validated.
void ScanAll(ConstMatrixView keys, ConstMatrixView queries, size_t k, std::span<int64_t> ids,
             std::span<float> scores, ThreadPool* pool, ExactScanScratchPool* scratch_pool) {
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

ExactTopKScratch::ExactTopKScratch() : pool_(std::make_unique<internal::ExactScanScratchPool>()) {}
ExactTopKScratch::~ExactTopKScratch() = default;

size_t ExactTopKScratch::MemoryBytes() const { return pool_->MemoryBytes(); }

absl::Status CheckFinite(ConstMatrixView m, absl::string_view what) {
  for (size_t i = 0; i < m.rows(); ++i) {
    const float* r = m.row(i);
    for (size_t j = 0; j < m.cols(); ++j) {
      if (!std::isfinite(r[j])) {
        return absl::InvalidArgumentError(absl::StrCat(what, " row ", i, " col ", j, " is ",
                                                       std::isnan(r[j]) ? "NaN" : "Inf"));
      }
    }
  }
  return absl::OkStatus();
}

absl::Status ValidateTopKArgs(size_t dim, size_t size, ConstMatrixView queries, int k,
                              std::span<const int64_t> ids, std::span<const float> scores,
                              absl::string_view what) {
  if (queries.rows() > 0 && queries.cols() != dim) {
    return absl::InvalidArgumentError(
        absl::StrCat("query dim ", queries.cols(), " != ", what, " dim ", dim));
  }
  if (k < 1 || k > kMaxTopK) {
    return absl::InvalidArgumentError(absl::StrCat("k=", k, " outside [1, ", kMaxTopK, "]"));
  }
  if (size == 0) {
    return absl::InvalidArgumentError(absl::StrCat("search on an empty ", what));
  }
  if (static_cast<size_t>(k) > size) {
    return absl::InvalidArgumentError(absl::StrCat("k=", k, " exceeds ", what, " size ", size));
  }
  const size_t need = queries.rows() * static_cast<size_t>(k);
  if (ids.size() < need || scores.size() < need) {
    return absl::InvalidArgumentError(absl::StrCat(
        "output holds ", ids.size(), " ids and ", scores.size(), " scores, need ", need, " (",
        queries.rows(), " queries x k=", k, ")"));
  }
  return CheckFinite(queries, "queries");
}

void ExactTopKScan(ConstMatrixView keys, ConstMatrixView queries, size_t k,
                   std::span<int64_t> ids, std::span<float> scores, ThreadPool* pool,
                   ExactTopKScratch* scratch) {
  ScanAll(keys, queries, k, ids, scores, pool, scratch->pool_.get());
}

absl::Status ExactTopK(ConstMatrixView keys, ConstMatrixView queries, int k,
                       std::span<int64_t> ids, std::span<float> scores, ThreadPool* pool) {
  if (keys.rows() > kMaxTopKKeys) {
    return absl::InvalidArgumentError(
        absl::StrCat("exact top-k over ", keys.rows(), " keys exceeds the limit ", kMaxTopKKeys));
  }
  KVR_RETURN_IF_ERROR(
      ValidateTopKArgs(keys.cols(), keys.rows(), queries, k, ids, scores, "key set"));
  ExactTopKScratch scratch;
  ExactTopKScan(keys, queries, static_cast<size_t>(k), ids, scores, pool, &scratch);
  return absl::OkStatus();
}

}  // namespace kvr
