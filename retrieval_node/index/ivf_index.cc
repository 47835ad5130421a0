#include "retrieval_node/index/ivf_index.h"

#include <algorithm>
#include <cstring>

#include "common/scratch_pool.h"
#include "common/simd/kernels.h"
#include "common/topk_collector.h"
#include "retrieval_node/index/kmeans.h"

namespace kvr::index {
namespace {

constexpr uint32_t kIvfVersion = 1;
constexpr size_t kTrainPointsPerList = 256;

struct IvfScratch {
  std::vector<float> centroid_scores;
  std::vector<float> list_scores;
  TopKCollector probes;
  TopKCollector results;
  std::vector<int64_t> probe_ids;
  std::vector<float> probe_scores;

  size_t MemoryBytes() const {
    return (centroid_scores.capacity() + list_scores.capacity() + probe_scores.capacity()) *
               sizeof(float) +
           probe_ids.capacity() * sizeof(int64_t) + probes.MemoryBytes() +
           results.MemoryBytes();
  }
};

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
  for (size_t c = 0; c < opts.nlist; ++c) {
    idx->lists_[c].ids.reserve(counts[c]);
    idx->lists_[c].keys.reserve(counts[c] * idx->dim_);
  }
  idx->keys_.reserve(keys.rows() * idx->dim_);
  for (size_t i = 0; i < keys.rows(); ++i) {
    List& l = idx->lists_[clusters.assignment[i]];
    l.ids.push_back(static_cast<uint32_t>(i));
    l.keys.insert(l.keys.end(), keys.row(i), keys.row(i) + idx->dim_);
    idx->keys_.insert(idx->keys_.end(), keys.row(i), keys.row(i) + idx->dim_);
  }
  idx->n_ = keys.rows();
  return idx;
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
    List& l = lists_[assign[i]];
    l.ids.push_back(static_cast<uint32_t>(n_ + i));
    l.keys.insert(l.keys.end(), keys.row(i), keys.row(i) + dim_);
    keys_.insert(keys_.end(), keys.row(i), keys.row(i) + dim_);
  }
  n_ += keys.rows();
  return absl::OkStatus();
}

absl::Status IvfIndex::Search(ConstMatrixView queries, const SearchParams& params,
                              std::span<int64_t> ids, std::span<float> scores,
                              SearchStats* stats) const {
  KVR_RETURN_IF_ERROR(ValidateSearch(*this, queries, params, ids, scores));
  const size_t nlist = lists_.size();
  const size_t nprobe = std::clamp<size_t>(
      params.nprobe > 0 ? params.nprobe : options_.default_nprobe, 1, nlist);
  const size_t k = static_cast<size_t>(params.k);
  const auto& kern = simd::Active();
  auto s = scratch_->Acquire();
  if (s->centroid_scores.size() < nlist) s->centroid_scores.resize(nlist);
  if (s->probe_ids.size() < nprobe) {
    s->probe_ids.resize(nprobe);
    s->probe_scores.resize(nprobe);
  }
  int64_t scanned = 0;
  for (size_t q = 0; q < queries.rows(); ++q) {
    const float* qv = queries.row(q);
    kern.dot_batch(qv, centroids_.data(), nlist, dim_, dim_, s->centroid_scores.data());
    s->probes.Reset(nprobe);
    s->probes.PushRange(s->centroid_scores.data(), nlist, 0);
    s->probes.Finish(s->probe_ids.data(), s->probe_scores.data());
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

size_t IvfIndex::MemoryBytes() const {
  size_t b = sizeof(*this) + (centroids_.capacity() + keys_.capacity()) * sizeof(float) +
             lists_.capacity() * sizeof(List) + scratch_->MemoryBytes();
  for (const List& l : lists_) {
    b += l.keys.capacity() * sizeof(float) + l.ids.capacity() * sizeof(uint32_t);
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
  w.PutArray(std::span<const float>(centroids_));
  for (const List& l : lists_) {
    w.PutArray(std::span<const uint32_t>(l.ids));
    w.PutArray(std::span<const float>(l.keys));
  }
  const auto blob = SealBlob(kIvfBlobKind, kIvfVersion, w.bytes());
  out->insert(out->end(), blob.begin(), blob.end());
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<IvfIndex>> IvfIndex::Deserialize(const OpenedBlob& blob) {
  if (blob.kind != kIvfBlobKind) {
    return absl::InvalidArgumentError(
        absl::StrCat("blob kind ", blob.kind, " is not an ivf index"));
  }
  if (blob.version != kIvfVersion) {
    return absl::InvalidArgumentError(absl::StrCat("ivf index: unsupported format version ",
                                                   blob.version, " (this build reads ",
                                                   kIvfVersion, ")"));
  }
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
  IvfOptions opts;
  opts.nlist = nlist;
  opts.iterations = iterations;
  opts.default_nprobe = nprobe;
  opts.seed = seed;
  opts.max_train_points = max_train;
  std::unique_ptr<IvfIndex> idx(new IvfIndex(dim, opts));
  KVR_RETURN_IF_ERROR(r.GetArray(&idx->centroids_, "centroids", nlist * dim));
  if (idx->centroids_.size() != nlist * dim) {
    return absl::DataLossError(absl::StrCat("ivf index: ", idx->centroids_.size(),
                                            " centroid values, expected ", nlist, " x ", dim));
  }
  // What follows holds, per list, two u64 counts, and per key its u32 id and
  // dim floats: check that the payload is that large before allocating for
  // the header's n and nlist (a corrupt or hostile header would otherwise
  // allocate up to kMaxKeys x kMaxDim floats). No overflow: nlist <= n <=
  // kMaxKeys and dim <= kMaxDim keep every product below 2^64.
  const uint64_t need = nlist * 2 * sizeof(uint64_t) + n * (sizeof(uint32_t) + dim * sizeof(float));
  if (need > r.remaining()) {
    return absl::DataLossError(absl::StrCat("ivf index: ", n, " keys of dim ", dim, " in ", nlist,
                                            " lists need at least ", need,
                                            " more payload bytes, the blob has ",
                                            r.remaining()));
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
  return idx;
}

}  // namespace kvr::index
