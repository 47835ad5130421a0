#include "retrieval_node/index/ivf_index.h"

#include <algorithm>
#include <cstring>

#include "common/scratch_pool.h"
#include "common/simd/kernels.h"
#include "common/topk_collector.h"
#include "retrieval_node/index/kmeans.h"

namespace kvr::index {
namespace {

// Version 2 added sq8, rerank_factor and the SQ8 scales; 1 still loads.
constexpr uint32_t kIvfVersion = 2;
constexpr uint32_t kIvfVersionNoSq8 = 1;
constexpr size_t kTrainPointsPerList = 256;

struct IvfScratch {
  std::vector<float> centroid_scores;
  std::vector<float> list_scores;
  TopKCollector probes;
  TopKCollector results;
  std::vector<int64_t> probe_ids;
  std::vector<float> probe_scores;
  Sq8Scratch sq8;

  size_t MemoryBytes() const {
    return (centroid_scores.capacity() + list_scores.capacity() + probe_scores.capacity()) *
               sizeof(float) +
           probe_ids.capacity() * sizeof(int64_t) + probes.MemoryBytes() +
           results.MemoryBytes() + sq8.MemoryBytes();
  }
};

// The nprobe lists whose centroids score best against `qv` (best first) into
// s.probe_ids; sizes s's probe buffers on first use. Shared by the float and
// the SQ8 search.
void SelectProbes(const simd::Kernels& kern, const float* qv, const std::vector<float>& centroids,
                  size_t nlist, size_t dim, size_t nprobe, IvfScratch& s) {
  if (s.centroid_scores.size() < nlist) s.centroid_scores.resize(nlist);
  if (s.probe_ids.size() < nprobe) {
    s.probe_ids.resize(nprobe);
    s.probe_scores.resize(nprobe);
  }
  kern.dot_batch(qv, centroids.data(), nlist, dim, dim, s.centroid_scores.data());
  s.probes.Reset(nprobe);
  s.probes.PushRange(s.centroid_scores.data(), nlist, 0);
  s.probes.Finish(s.probe_ids.data(), s.probe_scores.data());
}

}  // namespace

namespace internal {
class IvfScratchPool : public ScratchPool<IvfScratch> {};
}  // namespace internal

IvfIndex::IvfIndex(size_t dim, const IvfOptions& options)
    : dim_(dim), options_(options), scratch_(std::make_unique<internal::IvfScratchPool>()) {}
IvfIndex::~IvfIndex() = default;

absl::StatusOr<std::unique_ptr<IvfIndex>> IvfIndex::Build(ConstMatrixView keys,
                                                          const IvfOptions& options,
                                                          ThreadPool* pool) {
  if (keys.cols() == 0 || keys.cols() > kMaxDim) {
    return absl::InvalidArgumentError(
        absl::StrCat("ivf index dim ", keys.cols(), " outside [1, ", kMaxDim, "]"));
  }
  if (keys.rows() == 0) return absl::InvalidArgumentError("ivf index: build needs at least 1 key");
  if (keys.rows() > kMaxKeys) {
    return absl::InvalidArgumentError(
        absl::StrCat("ivf index: ", keys.rows(), " keys exceeds the limit ", kMaxKeys));
  }
  if (options.nlist == 0) return absl::InvalidArgumentError("ivf index: nlist=0");
  if (options.default_nprobe < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("ivf index: default_nprobe=", options.default_nprobe, " < 1"));
  }
  // Checked with or without sq8: the blob carries it and its loader checks it.
  KVR_RETURN_IF_ERROR(ValidateRerankFactor(options.rerank_factor, "ivf rerank_factor"));
  KVR_RETURN_IF_ERROR(ValidateFinite(keys, keys.cols(), "keys"));
  IvfOptions opts = options;
  opts.nlist = std::min(options.nlist, keys.rows());
  KMeansOptions km;
  km.k = opts.nlist;
  km.iterations = opts.iterations;
  km.seed = opts.seed;
  km.max_train_points = opts.max_train_points != 0 ? opts.max_train_points
                                                   : kTrainPointsPerList * opts.nlist;
  KVR_ASSIGN_OR_RETURN(KMeansResult clusters, SphericalKMeans(keys, km, pool));

  std::unique_ptr<IvfIndex> idx(new IvfIndex(keys.cols(), opts));
  idx->centroids_ = std::move(clusters.centroids.data);
  idx->lists_.resize(opts.nlist);
  std::vector<size_t> counts(opts.nlist);
  for (uint32_t c : clusters.assignment) ++counts[c];
  if (opts.sq8) idx->quantizer_ = Sq8Quantizer::Train(keys, idx->dim_);
  for (size_t c = 0; c < opts.nlist; ++c) {
    List& l = idx->lists_[c];
    l.ids.reserve(counts[c]);
    if (opts.sq8) {
      l.codes = Sq8Codes(simd::Sq8PaddedDim(idx->dim_));
      l.codes.Reserve(counts[c]);
    } else {
      l.keys.reserve(counts[c] * idx->dim_);
    }
  }
  idx->keys_.reserve(keys.rows() * idx->dim_);
  for (size_t i = 0; i < keys.rows(); ++i) {
    idx->keys_.insert(idx->keys_.end(), keys.row(i), keys.row(i) + idx->dim_);
    idx->AppendToList(clusters.assignment[i], static_cast<uint32_t>(i));
  }
  idx->n_ = keys.rows();
  return idx;
}

void IvfIndex::AppendToList(size_t c, uint32_t id) {
  List& l = lists_[c];
  const float* key = keys_.data() + static_cast<size_t>(id) * dim_;
  l.ids.push_back(id);
  if (options_.sq8) {
    l.codes.Append(quantizer_, key);
  } else {
    l.keys.insert(l.keys.end(), key, key + dim_);
  }
}

absl::Status IvfIndex::Add(ConstMatrixView keys) { return AddParallel(keys, nullptr); }

absl::Status IvfIndex::AddParallel(ConstMatrixView keys, ThreadPool* pool) {
  if (keys.rows() == 0) return absl::OkStatus();
  KVR_RETURN_IF_ERROR(ValidateFinite(keys, dim_, "keys"));
  if (n_ + keys.rows() > kMaxKeys) {
    return absl::InvalidArgumentError(absl::StrCat("ivf index: adding ", keys.rows(),
                                                   " keys to ", n_, " exceeds the limit ",
                                                   kMaxKeys));
  }
  std::vector<uint32_t> assign(keys.rows());
  AssignNearest(keys, centroids(), assign, {}, pool);
  for (size_t i = 0; i < keys.rows(); ++i) {
    keys_.insert(keys_.end(), keys.row(i), keys.row(i) + dim_);
    AppendToList(assign[i], static_cast<uint32_t>(n_ + i));
  }
  n_ += keys.rows();
  return absl::OkStatus();
}

absl::Status IvfIndex::Search(ConstMatrixView queries, const SearchParams& params,
                              std::span<int64_t> ids, std::span<float> scores,
                              SearchStats* stats) const {
  KVR_RETURN_IF_ERROR(ValidateSearch(*this, queries, params, ids, scores));
  if (options_.sq8) return SearchSq8(queries, params, ids, scores, stats);
  const size_t nlist = lists_.size();
  const size_t nprobe = std::clamp<size_t>(
      params.nprobe > 0 ? params.nprobe : options_.default_nprobe, 1, nlist);
  const size_t k = static_cast<size_t>(params.k);
  const auto& kern = simd::Active();
  auto s = scratch_->Acquire();
  int64_t scanned = 0;
  for (size_t q = 0; q < queries.rows(); ++q) {
    const float* qv = queries.row(q);
    SelectProbes(kern, qv, centroids_, nlist, dim_, nprobe, *s);
    s->results.Reset(k);
    for (size_t p = 0; p < nprobe; ++p) {
      const List& l = lists_[static_cast<size_t>(s->probe_ids[p])];
      const size_t m = l.ids.size();
      if (m == 0) continue;
      if (s->list_scores.size() < m) s->list_scores.resize(m);
      kern.dot_batch(qv, l.keys.data(), m, dim_, dim_, s->list_scores.data());
      s->results.PushIds(s->list_scores.data(), l.ids.data(), m);
      scanned += static_cast<int64_t>(m);
    }
    s->results.Finish(ids.data() + q * k, scores.data() + q * k);
  }
  scratch_->Release(std::move(s));
  if (stats != nullptr) {
    stats->queries += static_cast<int64_t>(queries.rows());
    stats->distance_computations += static_cast<int64_t>(queries.rows() * nlist) + scanned;
  }
  return absl::OkStatus();
}

absl::Status IvfIndex::SearchSq8(ConstMatrixView queries, const SearchParams& params,
                                 std::span<int64_t> ids, std::span<float> scores,
                                 SearchStats* stats) const {
  int factor = options_.rerank_factor;
  if (params.rerank_factor != 0) {
    KVR_RETURN_IF_ERROR(ValidateRerankFactor(params.rerank_factor, "rerank_factor"));
    factor = params.rerank_factor;
  }
  const size_t nlist = lists_.size();
  const size_t nprobe = std::clamp<size_t>(
      params.nprobe > 0 ? params.nprobe : options_.default_nprobe, 1, nlist);
  const size_t k = static_cast<size_t>(params.k);
  // k <= kMaxSearchK and factor <= 64: no overflow.
  const size_t r = std::min(n_, k * static_cast<size_t>(factor));
  const auto& kern = simd::Active();
  const auto& sq8 = simd::ActiveSq8();
  auto s = scratch_->Acquire();
  int64_t work = 0;
  for (size_t q = 0; q < queries.rows(); ++q) {
    const float* qv = queries.row(q);
    SelectProbes(kern, qv, centroids_, nlist, dim_, nprobe, *s);
    BeginSq8Search(quantizer_, qv, r, 0, s->sq8);
    for (size_t p = 0; p < nprobe; ++p) {
      const List& l = lists_[static_cast<size_t>(s->probe_ids[p])];
      work += static_cast<int64_t>(ScanSq8Codes(sq8, l.codes, l.ids.data(), 0, 1, s->sq8));
    }
    work += static_cast<int64_t>(
        RerankExact(qv, keys(), r, k, 0, s->sq8, ids.data() + q * k, scores.data() + q * k));
  }
  scratch_->Release(std::move(s));
  if (stats != nullptr) {
    stats->queries += static_cast<int64_t>(queries.rows());
    stats->distance_computations += static_cast<int64_t>(queries.rows() * nlist) + work;
  }
  return absl::OkStatus();
}

size_t IvfIndex::MemoryBytes() const {
  size_t b = sizeof(*this) + (centroids_.capacity() + keys_.capacity()) * sizeof(float) +
             lists_.capacity() * sizeof(List) + scratch_->MemoryBytes();
  for (const List& l : lists_) {
    b += l.keys.capacity() * sizeof(float) + l.ids.capacity() * sizeof(uint32_t) +
         l.codes.MemoryBytes();
  }
  return b;
}

absl::Status IvfIndex::Serialize(std::vector<uint8_t>* out) const {
  BinaryWriter w;
  w.Put<uint64_t>(dim_);
  w.Put<uint64_t>(n_);
  w.Put<uint64_t>(lists_.size());
  w.Put<int32_t>(options_.iterations);
  w.Put<int32_t>(options_.default_nprobe);
  w.Put<uint64_t>(options_.seed);
  w.Put<uint64_t>(options_.max_train_points);
  w.Put<uint8_t>(options_.sq8 ? 1 : 0);
  w.Put<int32_t>(options_.rerank_factor);
  if (options_.sq8) quantizer_.Write(w);
  w.PutArray(std::span<const float>(centroids_));
  std::vector<float> list_keys;
  for (const List& l : lists_) {
    w.PutArray(std::span<const uint32_t>(l.ids));
    if (options_.sq8) {  // the keys of the list, from the id-ordered copy
      list_keys.resize(l.ids.size() * dim_);
      for (size_t j = 0; j < l.ids.size(); ++j) {
        std::memcpy(list_keys.data() + j * dim_, keys_.data() + size_t{l.ids[j]} * dim_,
                    dim_ * sizeof(float));
      }
      w.PutArray(std::span<const float>(list_keys));
    } else {
      w.PutArray(std::span<const float>(l.keys));
    }
  }
  const auto blob = SealBlob(kIvfBlobKind, kIvfVersion, w.bytes());
  out->insert(out->end(), blob.begin(), blob.end());
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<IvfIndex>> IvfIndex::Deserialize(const OpenedBlob& blob) {
  KVR_RETURN_IF_ERROR(CheckBlobKind(blob, kIvfBlobKind, kIvfVersionNoSq8, kIvfVersion, "ivf index"));
  BinaryReader r(blob.payload, "ivf index");
  uint64_t dim = 0, n = 0, nlist = 0, max_train = 0, seed = 0;
  int32_t iterations = 0, nprobe = 0;
  KVR_RETURN_IF_ERROR(r.Get(&dim, "dim"));
  KVR_RETURN_IF_ERROR(r.Get(&n, "size"));
  KVR_RETURN_IF_ERROR(r.Get(&nlist, "nlist"));
  KVR_RETURN_IF_ERROR(r.Get(&iterations, "iterations"));
  KVR_RETURN_IF_ERROR(r.Get(&nprobe, "default_nprobe"));
  KVR_RETURN_IF_ERROR(r.Get(&seed, "seed"));
  KVR_RETURN_IF_ERROR(r.Get(&max_train, "max_train_points"));
  uint8_t sq8 = 0;
  int32_t rerank_factor = kDefaultSq8RerankFactor;
  if (blob.version >= 2) {
    KVR_RETURN_IF_ERROR(r.Get(&sq8, "sq8"));
    KVR_RETURN_IF_ERROR(r.Get(&rerank_factor, "rerank_factor"));
    if (sq8 > 1) {
      return absl::DataLossError(absl::StrCat("ivf index: field 'sq8' value ", int{sq8},
                                              " is not 0 or 1"));
    }
    if (rerank_factor < 1 || rerank_factor > kMaxSq8RerankFactor) {
      return absl::DataLossError(absl::StrCat("ivf index: field 'rerank_factor' value ",
                                              rerank_factor, " outside [1, ",
                                              kMaxSq8RerankFactor, "]"));
    }
  }
  if (dim == 0 || dim > kMaxDim) {
    return absl::DataLossError(absl::StrCat("ivf index: dim ", dim, " outside [1, ", kMaxDim, "]"));
  }
  if (n == 0 || n > kMaxKeys) {
    return absl::DataLossError(absl::StrCat("ivf index: size ", n, " outside [1, ", kMaxKeys, "]"));
  }
  if (nlist == 0 || nlist > n) {
    return absl::DataLossError(absl::StrCat("ivf index: nlist ", nlist, " outside [1, ", n, "]"));
  }
  if (nprobe < 1 || iterations < 0) {
    return absl::DataLossError(absl::StrCat("ivf index: bad options (default_nprobe ", nprobe,
                                            ", iterations ", iterations, ")"));
  }
  // What the rest of the payload must hold for these counts (centroids,
  // then per list an id count + ids and a key count + keys), checked before
  // any allocation sized by them: a crafted header cannot make the loader
  // allocate more than the blob's own size. No overflow: nlist <= n <=
  // kMaxKeys (2^31) and dim <= kMaxDim (2^12).
  const uint64_t need = sizeof(uint64_t) + nlist * dim * sizeof(float) +
                        nlist * 2 * sizeof(uint64_t) + n * (sizeof(uint32_t) + dim * sizeof(float));
  if (need > r.remaining()) {
    return absl::DataLossError(absl::StrCat("ivf index: size ", n, " x dim ", dim, " with nlist ",
                                            nlist, " needs ", need, " payload bytes, ",
                                            r.remaining(), " remain"));
  }
  IvfOptions opts;
  opts.nlist = nlist;
  opts.iterations = iterations;
  opts.default_nprobe = nprobe;
  opts.seed = seed;
  opts.max_train_points = max_train;
  opts.sq8 = sq8 != 0;
  opts.rerank_factor = rerank_factor;
  std::unique_ptr<IvfIndex> idx(new IvfIndex(dim, opts));
  if (opts.sq8) {
    KVR_ASSIGN_OR_RETURN(idx->quantizer_, Sq8Quantizer::Read(r, dim));
  }
  KVR_RETURN_IF_ERROR(r.GetArray(&idx->centroids_, "centroids", nlist * dim));
  if (idx->centroids_.size() != nlist * dim) {
    return absl::DataLossError(absl::StrCat("ivf index: ", idx->centroids_.size(),
                                            " centroid values, expected ", nlist, " x ", dim));
  }
  idx->lists_.resize(nlist);
  idx->keys_.resize(n * dim);
  std::vector<uint8_t> seen(n, 0);
  uint64_t total = 0;
  for (size_t c = 0; c < nlist; ++c) {
    List& l = idx->lists_[c];
    KVR_RETURN_IF_ERROR(r.GetArray(&l.ids, "list ids", n - total));
    KVR_RETURN_IF_ERROR(r.GetArray(&l.keys, "list keys", l.ids.size() * dim));
    if (l.keys.size() != l.ids.size() * dim) {
      return absl::DataLossError(absl::StrCat("ivf index: list ", c, " has ", l.ids.size(),
                                              " ids but ", l.keys.size(), " key values"));
    }
    for (size_t j = 0; j < l.ids.size(); ++j) {
      const uint32_t id = l.ids[j];
      if (id >= n || seen[id]) {
        return absl::DataLossError(absl::StrCat("ivf index: list ", c, " holds ",
                                                id >= n ? "out-of-range" : "duplicate", " id ",
                                                id));
      }
      seen[id] = 1;
      std::memcpy(idx->keys_.data() + static_cast<size_t>(id) * dim, l.keys.data() + j * dim,
                  dim * sizeof(float));
    }
    total += l.ids.size();
  }
  if (total != n) {
    return absl::DataLossError(
        absl::StrCat("ivf index: lists hold ", total, " keys, header says ", n));
  }
  KVR_RETURN_IF_ERROR(r.ExpectEnd());
  idx->n_ = n;
  absl::Status finite = ValidateFinite(idx->keys(), dim, "ivf index keys");
  if (!finite.ok()) return absl::DataLossError(finite.message());
  finite = ValidateFinite(idx->centroids(), dim, "ivf index centroids");
  if (!finite.ok()) return absl::DataLossError(finite.message());
  if (opts.sq8) {  // codes re-derived from the (checked) keys; the lists drop theirs
    for (List& l : idx->lists_) {
      l.keys = std::vector<float>();
      l.codes = Sq8Codes(simd::Sq8PaddedDim(dim));
      l.codes.Reserve(l.ids.size());
      for (uint32_t id : l.ids) {
        l.codes.Append(idx->quantizer_, idx->keys_.data() + size_t{id} * dim);
      }
    }
  }
  return idx;
}

}  // namespace kvr::index
