#include "retrieval_node/index/flat_sq8_index.h"

#include <algorithm>
#include <cstring>

#include "common/scratch_pool.h"

namespace kvr::index {
namespace {

constexpr uint32_t kFlatSq8Version = 1;

}  // namespace

namespace internal {
class Sq8ScratchPool : public ScratchPool<Sq8Scratch> {};
}  // namespace internal

FlatSq8Index::FlatSq8Index(size_t dim, int rerank_factor)
    : dim_(dim),
      rerank_factor_(rerank_factor),
      quantizer_(Sq8Quantizer::Train(ConstMatrixView(nullptr, 0, dim), dim)),
      codes_(simd::Sq8PaddedDim(dim)),
      scratch_(std::make_unique<internal::Sq8ScratchPool>()) {}
FlatSq8Index::~FlatSq8Index() = default;

absl::StatusOr<std::unique_ptr<FlatSq8Index>> FlatSq8Index::Create(size_t dim, int rerank_factor) {
  if (dim == 0 || dim > kMaxDim) {
    return absl::InvalidArgumentError(
        absl::StrCat("flat_sq8 index dim ", dim, " outside [1, ", kMaxDim, "]"));
  }
  KVR_RETURN_IF_ERROR(ValidateRerankFactor(rerank_factor, "flat_sq8 rerank_factor"));
  return std::unique_ptr<FlatSq8Index>(new FlatSq8Index(dim, rerank_factor));
}

void FlatSq8Index::Retrain() {
  quantizer_ = Sq8Quantizer::Train(keys(), dim_);
  trained_n_ = n_;
  codes_.Clear();
  codes_.Reserve(n_);
  for (size_t i = 0; i < n_; ++i) codes_.Append(quantizer_, keys_.data() + i * dim_);
}

absl::Status FlatSq8Index::Add(ConstMatrixView keys) {
  if (keys.rows() == 0) return absl::OkStatus();
  KVR_RETURN_IF_ERROR(ValidateFinite(keys, dim_, "keys"));
  if (n_ + keys.rows() > kMaxKeys) {
    return absl::InvalidArgumentError(absl::StrCat("flat_sq8 index: adding ", keys.rows(),
                                                   " keys to ", n_, " exceeds the limit ",
                                                   kMaxKeys));
  }
  keys_.resize((n_ + keys.rows()) * dim_);
  for (size_t i = 0; i < keys.rows(); ++i) {
    std::memcpy(keys_.data() + (n_ + i) * dim_, keys.row(i), dim_ * sizeof(float));
  }
  const size_t old_n = n_;
  n_ += keys.rows();
  if (n_ >= 2 * trained_n_) {
    Retrain();
  } else {
    for (size_t i = old_n; i < n_; ++i) codes_.Append(quantizer_, keys_.data() + i * dim_);
  }
  return absl::OkStatus();
}

absl::Status FlatSq8Index::Search(ConstMatrixView queries, const SearchParams& params,
                                  std::span<int64_t> ids, std::span<float> scores,
                                  SearchStats* stats) const {
  KVR_RETURN_IF_ERROR(ValidateSearch(*this, queries, params, ids, scores));
  int factor = rerank_factor_;
  if (params.rerank_factor != 0) {
    KVR_RETURN_IF_ERROR(ValidateRerankFactor(params.rerank_factor, "rerank_factor"));
    factor = params.rerank_factor;
  }
  const size_t k = static_cast<size_t>(params.k);
  // k <= kMaxSearchK and factor <= 64: no overflow.
  const size_t r = std::min(n_, k * static_cast<size_t>(factor));
  const auto& kern = simd::ActiveSq8();
  auto s = scratch_->Acquire();
  int64_t work = 0;
  for (size_t q0 = 0; q0 < queries.rows(); q0 += kSq8QueryBlock) {
    const size_t nq = std::min(kSq8QueryBlock, queries.rows() - q0);
    for (size_t j = 0; j < nq; ++j) BeginSq8Search(quantizer_, queries.row(q0 + j), r, j, *s);
    work += static_cast<int64_t>(nq * ScanSq8Codes(kern, codes_, nullptr, 0, nq, *s));
    for (size_t j = 0; j < nq; ++j) {
      const size_t q = q0 + j;
      work += static_cast<int64_t>(RerankExact(queries.row(q), keys(), r, k, j, *s,
                                               ids.data() + q * k, scores.data() + q * k));
    }
  }
  scratch_->Release(std::move(s));
  if (stats != nullptr) {
    stats->queries += static_cast<int64_t>(queries.rows());
    stats->distance_computations += work;
  }
  return absl::OkStatus();
}

size_t FlatSq8Index::MemoryBytes() const {
  return sizeof(*this) + keys_.capacity() * sizeof(float) + codes_.MemoryBytes() +
         dim_ * (2 * sizeof(float) + sizeof(double)) + scratch_->MemoryBytes();
}

absl::Status FlatSq8Index::Serialize(std::vector<uint8_t>* out) const {
  BinaryWriter w;
  w.Put<uint64_t>(dim_);
  w.Put<uint64_t>(n_);
  w.Put<int32_t>(rerank_factor_);
  w.Put<uint64_t>(trained_n_);
  quantizer_.Write(w);
  w.PutArray(std::span<const float>(keys_.data(), n_ * dim_));
  const auto blob = SealBlob(kFlatSq8BlobKind, kFlatSq8Version, w.bytes());
  out->insert(out->end(), blob.begin(), blob.end());
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<FlatSq8Index>> FlatSq8Index::Deserialize(const OpenedBlob& blob) {
  KVR_RETURN_IF_ERROR(CheckBlobKind(blob, kFlatSq8BlobKind, kFlatSq8Version, kFlatSq8Version, "flat_sq8 index"));
  BinaryReader r(blob.payload, "flat_sq8 index");
  uint64_t dim = 0, n = 0, trained = 0;
  int32_t factor = 0;
  KVR_RETURN_IF_ERROR(r.Get(&dim, "dim"));
  KVR_RETURN_IF_ERROR(r.Get(&n, "size"));
  KVR_RETURN_IF_ERROR(r.Get(&factor, "rerank_factor"));
  KVR_RETURN_IF_ERROR(r.Get(&trained, "trained_size"));
  if (dim == 0 || dim > kMaxDim) {
    return absl::DataLossError(
        absl::StrCat("flat_sq8 index: field 'dim' value ", dim, " outside [1, ", kMaxDim, "]"));
  }
  if (n > kMaxKeys) {
    return absl::DataLossError(
        absl::StrCat("flat_sq8 index: field 'size' value ", n, " exceeds the limit ", kMaxKeys));
  }
  if (factor < 1 || factor > kMaxSq8RerankFactor) {
    return absl::DataLossError(absl::StrCat("flat_sq8 index: field 'rerank_factor' value ",
                                            factor, " outside [1, ", kMaxSq8RerankFactor, "]"));
  }
  if (trained > n) {
    return absl::DataLossError(absl::StrCat("flat_sq8 index: field 'trained_size' value ",
                                            trained, " exceeds size ", n));
  }
  std::unique_ptr<FlatSq8Index> idx(new FlatSq8Index(dim, factor));
  KVR_ASSIGN_OR_RETURN(idx->quantizer_, Sq8Quantizer::Read(r, dim));
  KVR_RETURN_IF_ERROR(r.GetArray(&idx->keys_, "keys", n * dim));
  if (idx->keys_.size() != n * dim) {
    return absl::DataLossError(absl::StrCat("flat_sq8 index: field 'keys' holds ",
                                            idx->keys_.size(), " values, expected ", n, " x ",
                                            dim));
  }
  KVR_RETURN_IF_ERROR(r.ExpectEnd());
  idx->n_ = n;
  idx->trained_n_ = trained;
  absl::Status finite = ValidateFinite(idx->keys(), dim, "flat_sq8 index keys");
  if (!finite.ok()) return absl::DataLossError(finite.message());
  idx->codes_.Reserve(n);
  for (size_t i = 0; i < n; ++i) idx->codes_.Append(idx->quantizer_, idx->keys_.data() + i * dim);
  return idx;
}

}  // namespace kvr::index
