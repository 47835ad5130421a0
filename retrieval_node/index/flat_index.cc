#include "retrieval_node/index/flat_index.h"

#include <algorithm>
#include <cstring>

namespace kvr::index {
namespace {

constexpr uint32_t kFlatVersion = 1;

}  // namespace

FlatIndex::FlatIndex(size_t dim) : dim_(dim), scratch_(std::make_unique<ExactTopKScratch>()) {}
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
  ExactTopKScan(keys(), queries, static_cast<size_t>(params.k), ids, scores, pool, scratch_.get());
  if (stats != nullptr) {
    stats->queries += static_cast<int64_t>(queries.rows());
    stats->distance_computations += static_cast<int64_t>(queries.rows() * n_);
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
  KVR_RETURN_IF_ERROR(CheckBlobKind(blob, kFlatBlobKind, kFlatVersion, kFlatVersion, "flat index"));
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
