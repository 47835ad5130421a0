#include "retrieval_node/index/pca_sq8_index.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>

#include "common/scratch_pool.h"
#include "common/simd/kernels.h"

namespace kvr::index {
namespace {

constexpr uint32_t kPcaSq8Version = 1;
constexpr int kMaxJacobiSweeps = 64;
constexpr double kJacobiTolerance = 1e-12;
// A stored basis row whose squared norm is off 1 by more than this is
// corrupt (rows are written as fp32 unit vectors: ~1e-7 off).
constexpr double kBasisNormTolerance = 1e-3;

absl::Status ValidateOptions(size_t dim, const PcaSq8Options& o) {
  if (o.rank < 0 || static_cast<size_t>(o.rank) > dim) {
    return absl::InvalidArgumentError(
        absl::StrCat("pca_sq8 rank ", o.rank, " outside [0, dim ", dim, "]"));
  }
  if (!(o.variance > 0.0 && o.variance <= 1.0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("pca_sq8 variance ", o.variance, " outside (0, 1]"));
  }
  return ValidateRerankFactor(o.rerank_factor, "pca_sq8 rerank_factor");
}

}  // namespace

absl::StatusOr<SymmetricEigenResult> SymmetricEigen(std::span<const double> a, size_t d) {
  if (d == 0 || d > kMaxPcaDim) {
    return absl::InvalidArgumentError(
        absl::StrCat("SymmetricEigen: d ", d, " outside [1, ", kMaxPcaDim, "]"));
  }
  if (a.size() != d * d) {
    return absl::InvalidArgumentError(
        absl::StrCat("SymmetricEigen: matrix has ", a.size(), " entries, expected ", d, " x ", d));
  }
  std::vector<double> m(d * d), v(d * d, 0.0);
  double frob = 0;
  for (size_t i = 0; i < d; ++i) {
    v[i * d + i] = 1.0;
    for (size_t j = i; j < d; ++j) {
      const double x = a[i * d + j];
      if (!std::isfinite(x)) {
        return absl::InvalidArgumentError(
            absl::StrCat("SymmetricEigen: entry (", i, ", ", j, ") is not finite"));
      }
      m[i * d + j] = m[j * d + i] = x;
      frob += (i == j ? 1.0 : 2.0) * x * x;
    }
  }
  frob = std::sqrt(frob);
  SymmetricEigenResult out;
  for (; out.sweeps < kMaxJacobiSweeps; ++out.sweeps) {
    double off = 0;
    for (size_t p = 0; p < d; ++p) {
      for (size_t q = p + 1; q < d; ++q) off += m[p * d + q] * m[p * d + q];
    }
    if (!(std::sqrt(off) > kJacobiTolerance * frob)) break;
    for (size_t p = 0; p + 1 < d; ++p) {
      for (size_t q = p + 1; q < d; ++q) {
        const double apq = m[p * d + q];
        if (apq == 0.0) continue;
        // The rotation J (c, s) with (J^T M J)_pq = 0, the smaller angle.
        const double theta = (m[q * d + q] - m[p * d + p]) / (2.0 * apq);
        double t;
        if (std::fabs(theta) > 1e150) {
          t = 0.5 / theta;
        } else {
          t = (theta >= 0 ? 1.0 : -1.0) / (std::fabs(theta) + std::sqrt(theta * theta + 1.0));
        }
        const double c = 1.0 / std::sqrt(t * t + 1.0), s = t * c;
        for (size_t k = 0; k < d; ++k) {  // M J: columns p, q
          const double mkp = m[k * d + p], mkq = m[k * d + q];
          m[k * d + p] = c * mkp - s * mkq;
          m[k * d + q] = s * mkp + c * mkq;
        }
        for (size_t k = 0; k < d; ++k) {  // J^T (M J): rows p, q
          const double mpk = m[p * d + k], mqk = m[q * d + k];
          m[p * d + k] = c * mpk - s * mqk;
          m[q * d + k] = s * mpk + c * mqk;
        }
        m[p * d + q] = m[q * d + p] = 0.0;
        for (size_t k = 0; k < d; ++k) {  // V J: eigenvectors are V's columns
          const double vkp = v[k * d + p], vkq = v[k * d + q];
          v[k * d + p] = c * vkp - s * vkq;
          v[k * d + q] = s * vkp + c * vkq;
        }
      }
    }
  }
  std::vector<size_t> order(d);
  std::iota(order.begin(), order.end(), size_t{0});
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t x, size_t y) { return m[x * d + x] > m[y * d + y]; });
  out.values.resize(d);
  out.vectors.resize(d * d);
  for (size_t i = 0; i < d; ++i) {
    const size_t col = order[i];
    out.values[i] = m[col * d + col];
    for (size_t k = 0; k < d; ++k) out.vectors[i * d + k] = v[k * d + col];
  }
  return out;
}

namespace internal {
struct PcaScratch {
  Sq8Scratch sq8;
  std::vector<float> projected;  // rank
  size_t MemoryBytes() const { return sq8.MemoryBytes() + projected.capacity() * sizeof(float); }
};
class PcaScratchPool : public ScratchPool<PcaScratch> {};
}  // namespace internal

PcaSq8Index::PcaSq8Index(size_t dim, const PcaSq8Options& options)
    : dim_(dim),
      options_(options),
      mean_(dim, 0.0f),
      quantizer_(Sq8Quantizer::Train(ConstMatrixView(nullptr, 0, 0), 0)),
      codes_(simd::Sq8PaddedDim(0)),
      scratch_(std::make_unique<internal::PcaScratchPool>()) {}
PcaSq8Index::~PcaSq8Index() = default;

absl::StatusOr<std::unique_ptr<PcaSq8Index>> PcaSq8Index::Create(size_t dim,
                                                                 const PcaSq8Options& options) {
  if (dim == 0 || dim > kMaxPcaDim) {
    return absl::InvalidArgumentError(
        absl::StrCat("pca_sq8 index dim ", dim, " outside [1, ", kMaxPcaDim, "]"));
  }
  KVR_RETURN_IF_ERROR(ValidateOptions(dim, options));
  return std::unique_ptr<PcaSq8Index>(new PcaSq8Index(dim, options));
}

void PcaSq8Index::Project(const float* x, float* centered, float* out) const {
  for (size_t j = 0; j < dim_; ++j) centered[j] = x[j] - mean_[j];
  simd::Active().dot_batch(centered, basis_.data(), rank_, dim_, dim_, out);
}

namespace {

// ||centered||^2 - ||projected||^2 (the basis is orthonormal), >= 0.
double Residual(const float* centered, size_t d, const float* projected, size_t r) {
  double all = 0, kept = 0;
  for (size_t j = 0; j < d; ++j) all += static_cast<double>(centered[j]) * centered[j];
  for (size_t j = 0; j < r; ++j) kept += static_cast<double>(projected[j]) * projected[j];
  return std::max(0.0, all - kept);
}

}  // namespace

void PcaSq8Index::EncodeFrom(size_t first, bool find_outliers) {
  std::vector<float> centered(dim_), projected(rank_);
  outlier_bits_.resize((n_ + 63) / 64, 0);
  for (size_t i = first; i < n_; ++i) {
    Project(keys_.data() + i * dim_, centered.data(), projected.data());
    codes_.Append(quantizer_, projected.data());
    if (find_outliers && outliers_.size() < MaxPcaOutliers(n_) &&
        Residual(centered.data(), dim_, projected.data(), rank_) > outlier_threshold_) {
      outliers_.push_back(static_cast<uint32_t>(i));
      outlier_bits_[i / 64] |= uint64_t{1} << (i % 64);
    }
  }
}

absl::Status PcaSq8Index::Retrain() {
  const size_t d = dim_;
  // Mean over every key; covariance over at most kPcaCovarianceSample keys
  // at a fixed stride (a deterministic sample spread over positions).
  std::vector<double> mean(d, 0.0);
  for (size_t i = 0; i < n_; ++i) {
    const float* x = keys_.data() + i * d;
    for (size_t j = 0; j < d; ++j) mean[j] += x[j];
  }
  for (double& m : mean) m /= static_cast<double>(n_);
  const size_t stride = (n_ + kPcaCovarianceSample - 1) / kPcaCovarianceSample;
  std::vector<double> cov(d * d, 0.0), c(d);
  size_t sampled = 0;
  for (size_t i = 0; i < n_; i += stride, ++sampled) {
    const float* x = keys_.data() + i * d;
    for (size_t j = 0; j < d; ++j) c[j] = static_cast<double>(x[j]) - mean[j];
    for (size_t a = 0; a < d; ++a) {
      const double ca = c[a];
      double* row = cov.data() + a * d;
      for (size_t b = a; b < d; ++b) row[b] += ca * c[b];
    }
  }
  for (double& x : cov) x /= static_cast<double>(sampled);
  KVR_ASSIGN_OR_RETURN(SymmetricEigenResult eig, SymmetricEigen(cov, d));
  size_t rank = static_cast<size_t>(options_.rank);
  if (rank == 0) {
    double total = 0;
    for (double x : eig.values) total += std::max(0.0, x);
    rank = std::min(kPcaRankStep, d);
    double held = 0;
    for (size_t i = 0; i < rank; ++i) held += std::max(0.0, eig.values[i]);
    while (rank < d && held < options_.variance * total) {
      const size_t next = std::min(d, rank + kPcaRankStep);
      for (size_t i = rank; i < next; ++i) held += std::max(0.0, eig.values[i]);
      rank = next;
    }
  }
  rank_ = rank;
  mean_.assign(d, 0.0f);
  for (size_t j = 0; j < d; ++j) mean_[j] = static_cast<float>(mean[j]);
  basis_.resize(rank * d);
  variances_.assign(eig.values.begin(), eig.values.begin() + static_cast<ptrdiff_t>(rank));
  for (size_t i = 0; i < rank * d; ++i) basis_[i] = static_cast<float>(eig.vectors[i]);
  // The quantizer's ranges from every key's projection; the outliers from
  // every key's residual.
  std::vector<float> projected(n_ * rank), centered(d);
  std::vector<double> residual(n_);
  double residual_sum = 0;
  for (size_t i = 0; i < n_; ++i) {
    Project(keys_.data() + i * d, centered.data(), projected.data() + i * rank);
    residual[i] = Residual(centered.data(), d, projected.data() + i * rank, rank);
    residual_sum += residual[i];
  }
  outlier_threshold_ =
      kPcaOutlierFactor * kPcaOutlierFactor * residual_sum / static_cast<double>(n_);
  outliers_.clear();
  for (size_t i = 0; i < n_; ++i) {
    if (residual[i] > outlier_threshold_) outliers_.push_back(static_cast<uint32_t>(i));
  }
  if (outliers_.size() > MaxPcaOutliers(n_)) {  // keep the largest residuals
    const auto keep = static_cast<ptrdiff_t>(MaxPcaOutliers(n_));
    std::nth_element(outliers_.begin(), outliers_.begin() + keep, outliers_.end(),
                     [&](uint32_t a, uint32_t b) {
                       return residual[a] != residual[b] ? residual[a] > residual[b] : a < b;
                     });
    outliers_.resize(static_cast<size_t>(keep));
    std::sort(outliers_.begin(), outliers_.end());
  }
  outlier_bits_.assign((n_ + 63) / 64, 0);
  for (uint32_t o : outliers_) outlier_bits_[o / 64] |= uint64_t{1} << (o % 64);
  quantizer_ = Sq8Quantizer::Train(ConstMatrixView(projected.data(), n_, rank), rank);
  codes_ = Sq8Codes(simd::Sq8PaddedDim(rank));
  codes_.Reserve(n_);
  for (size_t i = 0; i < n_; ++i) codes_.Append(quantizer_, projected.data() + i * rank);
  trained_n_ = n_;
  return absl::OkStatus();
}

absl::Status PcaSq8Index::Add(ConstMatrixView keys) {
  if (keys.rows() == 0) return absl::OkStatus();
  KVR_RETURN_IF_ERROR(ValidateFinite(keys, dim_, "keys"));
  if (n_ + keys.rows() > kMaxKeys) {
    return absl::InvalidArgumentError(absl::StrCat("pca_sq8 index: adding ", keys.rows(),
                                                   " keys to ", n_, " exceeds the limit ",
                                                   kMaxKeys));
  }
  keys_.resize((n_ + keys.rows()) * dim_);
  for (size_t i = 0; i < keys.rows(); ++i) {
    std::memcpy(keys_.data() + (n_ + i) * dim_, keys.row(i), dim_ * sizeof(float));
  }
  const size_t old_n = n_;
  n_ += keys.rows();
  if (n_ >= 2 * trained_n_) return Retrain();
  EncodeFrom(old_n, /*find_outliers=*/true);
  return absl::OkStatus();
}

absl::Status PcaSq8Index::Search(ConstMatrixView queries, const SearchParams& params,
                                 std::span<int64_t> ids, std::span<float> scores,
                                 SearchStats* stats) const {
  KVR_RETURN_IF_ERROR(ValidateSearch(*this, queries, params, ids, scores));
  int factor = options_.rerank_factor;
  if (params.rerank_factor != 0) {
    KVR_RETURN_IF_ERROR(ValidateRerankFactor(params.rerank_factor, "rerank_factor"));
    factor = params.rerank_factor;
  }
  const size_t k = static_cast<size_t>(params.k);
  // k <= kMaxSearchK and factor <= 64: no overflow.
  const size_t r = std::min(n_, k * static_cast<size_t>(factor));
  const auto& kern = simd::ActiveSq8();
  auto s = scratch_->Acquire();
  s->projected.resize(rank_);
  int64_t work = 0;
  // Codes scanned per query in d-dimension equivalents (n <= 2^32, r <= d <= 512).
  const int64_t scan_work = static_cast<int64_t>((n_ * rank_ + dim_ - 1) / dim_);
  for (size_t q0 = 0; q0 < queries.rows(); q0 += kSq8QueryBlock) {
    const size_t nq = std::min(kSq8QueryBlock, queries.rows() - q0);
    for (size_t j = 0; j < nq; ++j) {
      // B q, not B (q - mean): q . x = q . mean + (B q) . B (x - mean) + the
      // residual, and q . mean is the same for every key.
      simd::Active().dot_batch(queries.row(q0 + j), basis_.data(), rank_, dim_, dim_,
                               s->projected.data());
      BeginSq8Search(quantizer_, s->projected.data(), r, j, s->sq8);
    }
    ScanSq8Codes(kern, codes_, nullptr, 0, nq, s->sq8);
    work += static_cast<int64_t>(nq) * scan_work;
    for (size_t j = 0; j < nq; ++j) {
      const size_t q = q0 + j;
      // The outliers are rescored by every search: the projected codes
      // cannot rank them.
      work += static_cast<int64_t>(RerankExact(queries.row(q), keys(), r, k, j, s->sq8,
                                               ids.data() + q * k, scores.data() + q * k,
                                               outliers_, outlier_bits_));
    }
  }
  scratch_->Release(std::move(s));
  if (stats != nullptr) {
    stats->queries += static_cast<int64_t>(queries.rows());
    stats->distance_computations += work;
  }
  return absl::OkStatus();
}

size_t PcaSq8Index::MemoryBytes() const {
  return sizeof(*this) + keys_.capacity() * sizeof(float) + codes_.MemoryBytes() +
         (mean_.capacity() + basis_.capacity()) * sizeof(float) +
         variances_.capacity() * sizeof(double) + outliers_.capacity() * sizeof(uint32_t) +
         outlier_bits_.capacity() * sizeof(uint64_t) +
         rank_ * (2 * sizeof(float) + sizeof(double)) + scratch_->MemoryBytes();
}

absl::Status PcaSq8Index::Serialize(std::vector<uint8_t>* out) const {
  BinaryWriter w;
  w.Put<uint64_t>(dim_);
  w.Put<uint64_t>(n_);
  w.Put<int32_t>(options_.rank);
  w.Put<double>(options_.variance);
  w.Put<int32_t>(options_.rerank_factor);
  w.Put<uint64_t>(trained_n_);
  w.Put<uint64_t>(rank_);
  w.PutArray(std::span<const float>(mean_));
  w.PutArray(std::span<const double>(variances_));
  w.PutArray(std::span<const float>(basis_));
  w.Put<double>(outlier_threshold_);
  w.PutArray(std::span<const uint32_t>(outliers_));
  quantizer_.Write(w);
  w.PutArray(std::span<const float>(keys_.data(), n_ * dim_));
  const auto blob = SealBlob(kPcaSq8BlobKind, kPcaSq8Version, w.bytes());
  out->insert(out->end(), blob.begin(), blob.end());
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<PcaSq8Index>> PcaSq8Index::Deserialize(const OpenedBlob& blob) {
  KVR_RETURN_IF_ERROR(CheckBlobKind(blob, kPcaSq8BlobKind, kPcaSq8Version, kPcaSq8Version, "pca_sq8 index"));
  auto bad = [](absl::string_view field, auto value, absl::string_view limit) {
    return absl::DataLossError(
        absl::StrCat("pca_sq8 index: field '", field, "' value ", value, " ", limit));
  };
  BinaryReader r(blob.payload, "pca_sq8 index");
  uint64_t dim = 0, n = 0, trained = 0, rank = 0;
  PcaSq8Options o;
  KVR_RETURN_IF_ERROR(r.Get(&dim, "dim"));
  KVR_RETURN_IF_ERROR(r.Get(&n, "size"));
  KVR_RETURN_IF_ERROR(r.Get(&o.rank, "rank_option"));
  KVR_RETURN_IF_ERROR(r.Get(&o.variance, "variance"));
  KVR_RETURN_IF_ERROR(r.Get(&o.rerank_factor, "rerank_factor"));
  KVR_RETURN_IF_ERROR(r.Get(&trained, "trained_size"));
  KVR_RETURN_IF_ERROR(r.Get(&rank, "rank"));
  if (dim == 0 || dim > kMaxPcaDim) {
    return bad("dim", dim, absl::StrCat("outside [1, ", kMaxPcaDim, "]"));
  }
  if (n > kMaxKeys) return bad("size", n, absl::StrCat("exceeds the limit ", kMaxKeys));
  if (o.rank < 0 || static_cast<uint64_t>(o.rank) > dim) {
    return bad("rank_option", o.rank, absl::StrCat("outside [0, dim ", dim, "]"));
  }
  if (!(o.variance > 0.0 && o.variance <= 1.0)) return bad("variance", o.variance, "outside (0, 1]");
  if (o.rerank_factor < 1 || o.rerank_factor > kMaxSq8RerankFactor) {
    return bad("rerank_factor", o.rerank_factor,
               absl::StrCat("outside [1, ", kMaxSq8RerankFactor, "]"));
  }
  if (trained > n) return bad("trained_size", trained, absl::StrCat("exceeds size ", n));
  // A trained index has 1..dim directions; an empty one none.
  if (n == 0 && rank != 0) return bad("rank", rank, "!= 0 for an empty index");
  if (n > 0 && (rank < 1 || rank > dim)) {
    return bad("rank", rank, absl::StrCat("outside [1, dim ", dim, "]"));
  }
  if (n > 0 && trained == 0) return bad("trained_size", trained, "is 0 for a non-empty index");
  if (o.rank != 0 && n > 0 && rank != static_cast<uint64_t>(o.rank)) {
    return bad("rank", rank, absl::StrCat("!= rank_option ", o.rank));
  }
  std::unique_ptr<PcaSq8Index> idx(new PcaSq8Index(dim, o));
  KVR_RETURN_IF_ERROR(r.GetArray(&idx->mean_, "mean", dim));
  KVR_RETURN_IF_ERROR(r.GetArray(&idx->variances_, "variances", rank));
  KVR_RETURN_IF_ERROR(r.GetArray(&idx->basis_, "basis", rank * dim));
  if (idx->mean_.size() != dim) {
    return bad("mean", idx->mean_.size(), absl::StrCat("values, expected dim ", dim));
  }
  if (idx->variances_.size() != rank) {
    return bad("variances", idx->variances_.size(), absl::StrCat("values, expected rank ", rank));
  }
  if (idx->basis_.size() != rank * dim) {
    return bad("basis", idx->basis_.size(),
               absl::StrCat("values, expected rank ", rank, " x dim ", dim));
  }
  for (size_t j = 0; j < idx->mean_.size(); ++j) {
    if (!std::isfinite(idx->mean_[j])) return bad("mean", idx->mean_[j], "is not finite");
  }
  for (double v : idx->variances_) {
    if (!std::isfinite(v)) return bad("variances", v, "is not finite");
  }
  for (size_t i = 0; i < rank; ++i) {
    double norm = 0;
    for (size_t j = 0; j < dim; ++j) {
      const float x = idx->basis_[i * dim + j];
      if (!std::isfinite(x)) return bad("basis", x, "is not finite");
      norm += static_cast<double>(x) * x;
    }
    if (!(std::fabs(norm - 1.0) <= kBasisNormTolerance)) {
      return bad("basis", norm, absl::StrCat("(squared norm of row ", i, ") is not 1"));
    }
  }
  KVR_RETURN_IF_ERROR(r.Get(&idx->outlier_threshold_, "outlier_threshold"));
  if (!std::isfinite(idx->outlier_threshold_) || idx->outlier_threshold_ < 0) {
    return bad("outlier_threshold", idx->outlier_threshold_, "is not finite and >= 0");
  }
  KVR_RETURN_IF_ERROR(r.GetArray(&idx->outliers_, "outliers", MaxPcaOutliers(n)));
  for (size_t i = 0; i < idx->outliers_.size(); ++i) {
    const uint32_t id = idx->outliers_[i];
    if (id >= n || (i > 0 && id <= idx->outliers_[i - 1])) {
      return bad("outliers", id, absl::StrCat("(entry ", i, ") is not an ascending id below ", n));
    }
  }
  KVR_ASSIGN_OR_RETURN(idx->quantizer_, Sq8Quantizer::Read(r, rank));
  KVR_RETURN_IF_ERROR(r.GetArray(&idx->keys_, "keys", n * dim));
  if (idx->keys_.size() != n * dim) {
    return bad("keys", idx->keys_.size(), absl::StrCat("values, expected ", n, " x ", dim));
  }
  KVR_RETURN_IF_ERROR(r.ExpectEnd());
  idx->n_ = n;
  idx->trained_n_ = trained;
  idx->rank_ = rank;
  absl::Status finite = ValidateFinite(idx->keys(), dim, "pca_sq8 index keys");
  if (!finite.ok()) return absl::DataLossError(finite.message());
  idx->codes_ = Sq8Codes(simd::Sq8PaddedDim(rank));
  idx->codes_.Reserve(n);
  idx->EncodeFrom(0, /*find_outliers=*/false);
  for (uint32_t id : idx->outliers_) idx->outlier_bits_[id / 64] |= uint64_t{1} << (id % 64);
  return idx;
}

}  // namespace kvr::index
