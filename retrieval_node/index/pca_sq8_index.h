// PcaSq8Index: an SQ8 scan in the keys' top principal directions with an
// exact rerank on the full keys (Loki, NeurIPS 2024: attention keys have a
// low effective rank), IndexType::kPcaSq8, blob kind kPcaSq8BlobKind.
//
// Build (Retrain): the key mean and the d x d key covariance (in double,
// over at most kPcaCovarianceSample keys taken at a fixed stride), its
// eigen-decomposition (SymmetricEigen, cyclic Jacobi), the top-r
// eigenvectors as the basis B (r x d), every key projected to B (x - mean)
// and those r coordinates SQ8-coded (sq8_codes.h). r is the options' rank,
// or with rank 0 the smallest multiple of kPcaRankStep (capped at d) whose
// eigenvalues hold options.variance of the total variance.
//
// Outliers: a key far outside the kept directions (residual ||x - mean -
// B^T B (x - mean)||^2 above kPcaOutlierFactor^2 x the mean residual at
// training, e.g. a sink key whose large value lies on a direction only a
// few keys use) is invisible to the projected scan, so such keys (at most
// MaxPcaOutliers(n), the largest residuals first) are rescored exactly by
// every search in addition to the scan's candidates.
//
// Search: each query is projected (B q, uncentred: q . x = q . mean +
// (B q) . B (x - mean) + the residual, and q . mean is the same for every
// key), its codes scanned (blocks of
// kSq8QueryBlock queries share one read of the codes: scan_sq8_multi), and
// the best rerank_factor * k candidates rescored on the stored fp32 keys:
// the returned scores are exact (FlatIndex's for the same ids, to fp32
// rounding), the ids exact whenever the true top-k are among the
// candidates. The effort is the rerank factor (SearchParams::rerank_factor;
// calibrate.h chooses it from held-back queries, else the index's default).
//
// Appends (Add): new keys are projected with the stored basis and coded
// with the stored quantizer (values outside its range saturate); when the
// index has grown to twice the keys it was trained on, basis, rank and
// quantizer are retrained and every code re-encoded (amortised O(1) per
// key, as FlatSq8Index). Search is const and thread-safe (pooled scratch,
// no steady-state allocation); Add is not (the owner serialises).
// Memory: n * d * 4 bytes of keys + n * r bytes of codes + (r + 1) * d * 4
// of basis and mean + n / 8 bytes of outlier flags.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "common/status.h"
#include "retrieval_node/index/index.h"
#include "retrieval_node/index/sq8_codes.h"

namespace kvr::index {

namespace internal {
struct PcaScratch;      // pca_sq8_index.cc
class PcaScratchPool;  // pca_sq8_index.cc
}  // namespace internal

// Bounds of the PCA kind: the key dimension it accepts (the covariance and
// its eigen-decomposition are O(d^2) memory and O(d^3) time per build), the
// step of an automatic rank, the keys the covariance is estimated on, and
// the rerank factor used when no calibration chose one (projection loses
// the residual directions, so the default is 4x flat_sq8's).
inline constexpr size_t kMaxPcaDim = 512;
inline constexpr size_t kPcaRankStep = 16;
inline constexpr size_t kPcaCovarianceSample = 16384;
inline constexpr int kDefaultPcaRerankFactor = 16;
inline constexpr double kDefaultPcaVariance = 0.9;
inline constexpr double kPcaOutlierFactor = 4.0;
// Outliers an index of n keys keeps (each costs every search one exact
// inner product): max(64, n / 512).
inline constexpr size_t MaxPcaOutliers(size_t n) { return n / 512 > 64 ? n / 512 : 64; }

struct PcaSq8Options {
  // Principal directions kept, [1, d]; 0: chosen from `variance` at each
  // (re)train.
  int rank = 0;
  // rank 0: the fraction of the total key variance the kept directions
  // hold, (0, 1].
  double variance = kDefaultPcaVariance;
  // Candidates rescored exactly per result, [1, kMaxSq8RerankFactor].
  int rerank_factor = kDefaultPcaRerankFactor;
};

// Eigen-decomposition of a symmetric matrix: eigenvalues descending and the
// matching unit eigenvectors (row i of `vectors`, d values, is the vector of
// values[i]).
struct SymmetricEigenResult {
  std::vector<double> values;   // d
  std::vector<double> vectors;  // d x d, row-major, one eigenvector per row
  int sweeps = 0;               // Jacobi sweeps run
};

// Cyclic Jacobi on the d x d row-major symmetric matrix `a` (finite; only
// the upper triangle is read), d in [1, kMaxPcaDim]: sweeps until every
// off-diagonal entry is below 1e-12 of the matrix's Frobenius norm (at most
// 64 sweeps; a symmetric matrix converges quadratically, ~8-12 sweeps).
// O(d^3) per sweep. InvalidArgument for d out of range, a size mismatch or
// non-finite entries.
absl::StatusOr<SymmetricEigenResult> SymmetricEigen(std::span<const double> a, size_t d);

class PcaSq8Index final : public KeyIndex {
 public:
  // An empty index; InvalidArgument naming the field when dim is outside
  // [1, kMaxPcaDim], rank outside [0, dim], variance outside (0, 1] or
  // rerank_factor outside [1, kMaxSq8RerankFactor].
  static absl::StatusOr<std::unique_ptr<PcaSq8Index>> Create(size_t dim,
                                                             const PcaSq8Options& options = {});
  // Restores an index written by Serialize (blob.kind must be
  // kPcaSq8BlobKind); every field is checked (DataLoss naming it) and the
  // codes re-encoded from the keys with the stored basis and quantizer.
  static absl::StatusOr<std::unique_ptr<PcaSq8Index>> Deserialize(const OpenedBlob& blob);
  ~PcaSq8Index() override;

  IndexType type() const override { return IndexType::kPcaSq8; }
  size_t dim() const override { return dim_; }
  size_t size() const override { return n_; }
  // SearchParams::rerank_factor: 0 -> the index's; else [1, kMaxSq8RerankFactor].
  // distance_computations counts the codes scanned in d-dimension
  // equivalents (n * rank / d, rounded up) plus the keys rescored.
  absl::Status Search(ConstMatrixView queries, const SearchParams& params,
                      std::span<int64_t> ids, std::span<float> scores,
                      SearchStats* stats = nullptr) const override;
  absl::Status Add(ConstMatrixView keys) override;
  size_t MemoryBytes() const override;
  absl::Status Serialize(std::vector<uint8_t>* out) const override;
  ConstMatrixView keys() const override { return ConstMatrixView(keys_.data(), n_, dim_); }

  int rerank_factor() const { return options_.rerank_factor; }
  // Directions the codes hold (0 before the first Add).
  size_t rank() const { return rank_; }
  // Keys the current basis and quantizer were trained on.
  size_t trained_size() const { return trained_n_; }
  // The basis (rank() x dim(), orthonormal rows, by decreasing variance),
  // the key mean (dim()) and the variance along each basis row (rank()).
  std::span<const float> basis() const { return basis_; }
  std::span<const float> mean() const { return mean_; }
  std::span<const double> variances() const { return variances_; }
  // Keys every search rescores exactly (ascending ids; see the file comment).
  std::span<const uint32_t> outliers() const { return outliers_; }

 private:
  PcaSq8Index(size_t dim, const PcaSq8Options& options);
  // Basis, rank and quantizer from the current keys; re-encodes every key.
  absl::Status Retrain();
  // B (x - mean) into out (rank_ values); `centered` holds dim_ floats.
  void Project(const float* x, float* centered, float* out) const;
  // Encodes keys [first, n_) with the current basis and quantizer; with
  // `find_outliers` appends those of them whose residual exceeds
  // outlier_threshold_ to the outliers (while under MaxPcaOutliers(n_)).
  void EncodeFrom(size_t first, bool find_outliers);

  size_t dim_;
  PcaSq8Options options_;
  size_t n_ = 0;
  size_t trained_n_ = 0;
  size_t rank_ = 0;
  std::vector<float> mean_;        // dim (0 before the first Add)
  std::vector<float> keys_;        // n x dim
  std::vector<float> basis_;       // rank x dim
  std::vector<double> variances_;  // rank
  double outlier_threshold_ = 0;   // squared residual above which a key is an outlier
  std::vector<uint32_t> outliers_;       // ascending
  std::vector<uint64_t> outlier_bits_;   // bit i: key i is an outlier
  Sq8Quantizer quantizer_;         // over the rank projected coordinates
  Sq8Codes codes_;
  std::unique_ptr<internal::PcaScratchPool> scratch_;
};

}  // namespace kvr::index
