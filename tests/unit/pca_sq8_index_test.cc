// PcaSq8Index (issue 17, session 27): the Jacobi eigen-decomposition against
// a double oracle, recall floors on every data family, returned scores equal
// to a double-precision dot product, batches equal single searches, blob
// round trips and corrupted blobs rejected naming the field, appends, and
// the calibrated rerank factor.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "common/exact_topk.h"
#include "common/serialize.h"
#include "common/thread_pool.h"
#include "gtest/gtest.h"
#include "retrieval_node/index/calibrate.h"
#include "retrieval_node/index/pca_sq8_index.h"
#include "tests/support/index_eval.h"
#include "tools/attention_data.h"

namespace kvr::index {
namespace {

constexpr size_t kKeys = 16384;
constexpr size_t kTest = 100;
constexpr int kK = 100;

// A random symmetric d x d matrix Q diag(lambda) Q^T with known spectrum
// (Q from Gram-Schmidt of Gaussian vectors), row-major.
std::vector<double> SymmetricWithSpectrum(size_t d, const std::vector<double>& lambda,
                                          uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> g;
  std::vector<double> q(d * d);
  for (double& x : q) x = g(rng);
  for (size_t i = 0; i < d; ++i) {  // orthonormal rows
    for (size_t j = 0; j < i; ++j) {
      double dot = 0;
      for (size_t c = 0; c < d; ++c) dot += q[i * d + c] * q[j * d + c];
      for (size_t c = 0; c < d; ++c) q[i * d + c] -= dot * q[j * d + c];
    }
    double norm = 0;
    for (size_t c = 0; c < d; ++c) norm += q[i * d + c] * q[i * d + c];
    norm = std::sqrt(norm);
    for (size_t c = 0; c < d; ++c) q[i * d + c] /= norm;
  }
  std::vector<double> a(d * d, 0.0);
  for (size_t r = 0; r < d; ++r) {
    for (size_t c = 0; c < d; ++c) {
      double s = 0;
      for (size_t t = 0; t < d; ++t) s += q[t * d + r] * lambda[t] * q[t * d + c];
      a[r * d + c] = s;
    }
  }
  return a;
}

// Eigenvectors orthonormal to 1e-10, A v = lambda v to 1e-9 of ||A||, the
// Rayleigh quotient v^T A v equal to the eigenvalue, eigenvalues descending
// and equal to the constructed spectrum to 1e-9 of its largest.
TEST(PcaSq8Test, JacobiMatchesTheDoubleOracle) {
  for (size_t d : {size_t{1}, size_t{5}, size_t{32}, size_t{128}}) {
    std::vector<double> lambda(d);
    for (size_t i = 0; i < d; ++i) lambda[i] = 100.0 * std::pow(0.8, static_cast<double>(i)) - 1.0;
    lambda[d / 2] = lambda[d > 1 ? d / 2 - 1 : 0];  // a repeated eigenvalue
    const std::vector<double> a = SymmetricWithSpectrum(d, lambda, 7 + d);
    auto eig = SymmetricEigen(a, d);
    ASSERT_TRUE(eig.ok()) << eig.status();
    std::vector<double> want = lambda;
    std::sort(want.rbegin(), want.rend());
    double scale = 0;
    for (double x : lambda) scale = std::max(scale, std::fabs(x));
    for (size_t i = 0; i < d; ++i) {
      EXPECT_NEAR(eig->values[i], want[i], 1e-9 * scale) << "d " << d << " value " << i;
      if (i > 0) {
        EXPECT_GE(eig->values[i - 1], eig->values[i]);
      }
      const double* v = eig->vectors.data() + i * d;
      for (size_t j = 0; j <= i; ++j) {
        double dot = 0;
        for (size_t c = 0; c < d; ++c) dot += v[c] * eig->vectors[j * d + c];
        EXPECT_NEAR(dot, i == j ? 1.0 : 0.0, 1e-10) << "d " << d << " vectors " << i << ", " << j;
      }
      double rayleigh = 0;
      for (size_t r = 0; r < d; ++r) {
        double av = 0;
        for (size_t c = 0; c < d; ++c) av += a[r * d + c] * v[c];
        EXPECT_NEAR(av, eig->values[i] * v[r], 1e-9 * scale) << "d " << d << " A v, row " << r;
        rayleigh += v[r] * av;
      }
      EXPECT_NEAR(rayleigh, eig->values[i], 1e-9 * scale) << "d " << d;
    }
    EXPECT_LE(eig->sweeps, 20) << "d " << d;
  }
}

TEST(PcaSq8Test, JacobiRejectsBadInput) {
  std::vector<double> a(4, 1.0);
  EXPECT_EQ(SymmetricEigen(a, 3).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(SymmetricEigen({}, 0).status().code(), absl::StatusCode::kInvalidArgument);
  std::vector<double> big((kMaxPcaDim + 1) * (kMaxPcaDim + 1), 0.0);
  EXPECT_NE(SymmetricEigen(big, kMaxPcaDim + 1).status().message().find("512"),
            std::string::npos);
  a[1] = std::nan("");
  auto bad = SymmetricEigen(a, 2);
  EXPECT_NE(bad.status().message().find("(0, 1) is not finite"), std::string::npos)
      << bad.status();
}


AttentionData Generate(const std::string& family, size_t n_keys = kKeys, size_t n_train = 512) {
  return test_support::GenerateFamily(family, n_keys, n_train, kTest);
}

using test_support::ExactIds;
using test_support::ExpectExactScores;
using Result = test_support::SearchResult;

Result Search(const KeyIndex& idx, ConstMatrixView queries, SearchParams p) {
  return test_support::SearchIndex(idx, queries, p);
}

std::unique_ptr<PcaSq8Index> BuildPca(ConstMatrixView keys, const PcaSq8Options& o = {}) {
  auto idx = PcaSq8Index::Create(keys.cols(), o);
  EXPECT_TRUE(idx.ok()) << idx.status();
  if (!idx.ok()) return nullptr;
  const absl::Status s = (*idx)->Add(keys);
  EXPECT_TRUE(s.ok()) << s;
  return std::move(idx).value();
}

struct FamilyFloor {
  const char* family;
  double floor;  // recall@100 on the decode queries at the default rerank factor 16
};

// Recall floors at 16384 keys, the default options (rank from 90% of the
// variance, rerank factor 16). Measured (index_bench --sizes=16384
// --n_test=200): every family >= 0.996 at rerank 8; the floors leave room
// for the generator's other seeds.
TEST(PcaSq8Test, RecallFloorsOnEveryFamilyWithExactScores) {
  const FamilyFloor floors[] = {
      {"topical", 0.98}, {"lowrank", 0.98}, {"flat", 0.98}, {"positional", 0.98}, {"sink", 0.98}};
  for (const FamilyFloor& f : floors) {
    const AttentionData d = Generate(f.family);
    ASSERT_GT(d.keys.rows, 0u);
    const auto idx = BuildPca(d.keys.view());
    ASSERT_NE(idx, nullptr);
    EXPECT_GE(idx->rank(), kPcaRankStep);
    EXPECT_LE(idx->rank(), d.keys.cols);
    EXPECT_EQ(idx->rank() % kPcaRankStep, 0u);
    SearchParams p;
    p.k = kK;
    const Result r = Search(*idx, d.test_queries.view(), p);
    const double recall =
        test_support::RecallAtK(r.ids, ExactIds(d.keys.view(), d.test_queries.view(), kK), kK);
    std::printf("%-10s pca_sq8 rank %zu rerank 16: recall@100 %.4f\n", f.family, idx->rank(),
                recall);
    EXPECT_GE(recall, f.floor) << f.family;
    // The sink keys lie on a direction almost no other key uses: outside
    // the kept directions, they are found only as outliers (before the
    // outlier list this family's recall was 0.9600 at any rerank factor:
    // the 4 sink keys of every top-100 missing).
    if (std::string(f.family) == "sink") {
      EXPECT_GE(idx->outliers().size(), 4u);
    }
    EXPECT_LE(idx->outliers().size(), MaxPcaOutliers(d.keys.rows));
    ExpectExactScores(d.keys.view(), d.test_queries.view(), r, kK);
  }
}

// The low-rank family keeps far fewer directions than d (>= 99% of its
// variance lies in 16), and its variances are the covariance's eigenvalues:
// descending, and the basis rows orthonormal.
TEST(PcaSq8Test, LowRankFamilyKeepsFewDirections) {
  const AttentionData d = Generate("lowrank");
  const auto idx = BuildPca(d.keys.view());
  ASSERT_NE(idx, nullptr);
  EXPECT_LE(idx->rank(), 32u);
  const size_t dim = d.keys.cols;
  for (size_t i = 0; i < idx->rank(); ++i) {
    if (i > 0) {
      EXPECT_GE(idx->variances()[i - 1], idx->variances()[i]);
    }
    for (size_t j = 0; j <= i; ++j) {
      double dot = 0;
      for (size_t c = 0; c < dim; ++c) {
        dot += double{idx->basis()[i * dim + c]} * double{idx->basis()[j * dim + c]};
      }
      EXPECT_NEAR(dot, i == j ? 1.0 : 0.0, 1e-5) << i << ", " << j;
    }
  }
}

// A batch of queries (blocks of kSq8QueryBlock share one code scan, the
// last partial) returns exactly what each query searched alone returns.
TEST(PcaSq8Test, BatchEqualsSingleSearches) {
  const AttentionData d = Generate("topical");
  const auto idx = BuildPca(d.keys.view());
  ASSERT_NE(idx, nullptr);
  SearchParams p;
  p.k = 50;
  p.rerank_factor = 3;
  const ConstMatrixView q = d.test_queries.view().rows_slice(0, 19);
  const Result all = Search(*idx, q, p);
  for (size_t i = 0; i < q.rows(); ++i) {
    const Result one = Search(*idx, q.rows_slice(i, 1), p);
    for (int j = 0; j < p.k; ++j) {
      ASSERT_EQ(one.ids[j], all.ids[i * p.k + j]) << "query " << i << " rank " << j;
      ASSERT_EQ(one.scores[j], all.scores[i * p.k + j]) << "query " << i << " rank " << j;
    }
  }
}

TEST(PcaSq8Test, RejectsBadOptionsAndSearches) {
  EXPECT_NE(PcaSq8Index::Create(kMaxPcaDim + 1).status().message().find("dim 513 outside [1, 512]"),
            std::string::npos);
  PcaSq8Options o;
  o.rank = 129;
  EXPECT_NE(PcaSq8Index::Create(128, o).status().message().find("rank 129"), std::string::npos);
  o = {};
  o.variance = 0;
  EXPECT_NE(PcaSq8Index::Create(128, o).status().message().find("variance 0"), std::string::npos);
  o = {};
  o.rerank_factor = 65;
  EXPECT_NE(PcaSq8Index::Create(128, o).status().message().find("rerank_factor 65"),
            std::string::npos);
  const AttentionData d = Generate("topical", 2048, 16);
  const auto idx = BuildPca(d.keys.view());
  ASSERT_NE(idx, nullptr);
  SearchParams p;
  p.k = 10;
  p.rerank_factor = 65;
  std::vector<int64_t> ids(10);
  std::vector<float> scores(10);
  const absl::Status s = idx->Search(d.test_queries.view().rows_slice(0, 1), p, ids, scores);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("rerank_factor 65"), std::string::npos) << s;
}

// Appends below twice the trained size are coded with the stored basis;
// reaching twice retrains (trained_size() moves). Either way the appended
// keys are found: recall against the exact top-k over every key.
TEST(PcaSq8Test, AppendsAreSearchable) {
  const AttentionData d = Generate("topical");
  const size_t half = d.keys.rows / 2;
  const auto idx = BuildPca(d.keys.view().rows_slice(0, half));
  ASSERT_NE(idx, nullptr);
  EXPECT_EQ(idx->trained_size(), half);
  ASSERT_TRUE(idx->Add(d.keys.view().rows_slice(half, half - 1)).ok());
  EXPECT_EQ(idx->trained_size(), half);  // not yet twice
  EXPECT_EQ(idx->size(), 2 * half - 1);
  SearchParams p;
  p.k = kK;
  const ConstMatrixView all_but_one = d.keys.view().rows_slice(0, 2 * half - 1);
  Result r = Search(*idx, d.test_queries.view(), p);
  double recall = test_support::RecallAtK(
      r.ids, ExactIds(all_but_one, d.test_queries.view(), kK), kK);
  EXPECT_GE(recall, 0.97);
  ExpectExactScores(all_but_one, d.test_queries.view(), r, kK);
  ASSERT_TRUE(idx->Add(d.keys.view().rows_slice(2 * half - 1, 1)).ok());
  EXPECT_EQ(idx->trained_size(), 2 * half);  // retrained
  r = Search(*idx, d.test_queries.view(), p);
  recall = test_support::RecallAtK(r.ids, ExactIds(d.keys.view(), d.test_queries.view(), kK), kK);
  EXPECT_GE(recall, 0.98);
}

// A payload field of a serialized index (common/serialize.h layout).
struct Layout {
  size_t dim = 0, n = 0, rank = 0;
  // Byte offsets in the payload.
  size_t rank_option = 16, variance = 20, rerank = 28, trained = 32, rank_at = 40;
  size_t mean() const { return 48 + 8; }                      // after its count
  size_t variances() const { return mean() + dim * 4 + 8; }
  size_t basis() const { return variances() + rank * 8 + 8; }
  size_t outlier_threshold() const { return basis() + rank * dim * 4; }
  size_t outliers_count() const { return outlier_threshold() + 8; }
};

std::vector<uint8_t> Reseal(const std::vector<uint8_t>& payload) {
  return SealBlob(kPcaSq8BlobKind, 1, payload);
}

// Blobs round-trip (same results), and each corrupted field is rejected
// with DataLoss naming it.
TEST(PcaSq8Test, BlobRoundTripAndCorruptFieldsNamed) {
  const AttentionData d = Generate("lowrank", 4096, 16);
  const auto idx = BuildPca(d.keys.view());
  ASSERT_NE(idx, nullptr);
  std::vector<uint8_t> blob;
  ASSERT_TRUE(idx->Serialize(&blob).ok());
  auto back = LoadIndex(blob);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ((*back)->type(), IndexType::kPcaSq8);
  SearchParams p;
  p.k = kK;
  const Result a = Search(*idx, d.test_queries.view(), p);
  const Result b = Search(**back, d.test_queries.view(), p);
  EXPECT_EQ(a.ids, b.ids);
  EXPECT_EQ(a.scores, b.scores);

  auto opened = OpenBlob(blob);
  ASSERT_TRUE(opened.ok());
  const std::vector<uint8_t> payload(opened->payload.begin(), opened->payload.end());
  Layout l;
  l.dim = d.keys.cols;
  l.n = d.keys.rows;
  l.rank = idx->rank();
  auto expect_field = [&](auto value, size_t offset, const std::string& field) {
    std::vector<uint8_t> bad = payload;
    std::memcpy(bad.data() + offset, &value, sizeof(value));
    auto loaded = LoadIndex(Reseal(bad));
    ASSERT_FALSE(loaded.ok()) << field;
    EXPECT_EQ(loaded.status().code(), absl::StatusCode::kDataLoss) << field << loaded.status();
    EXPECT_NE(loaded.status().message().find("'" + field + "'"), std::string::npos)
        << field << ": " << loaded.status();
  };
  expect_field(uint64_t{0}, 0, "dim");
  expect_field(uint64_t{kMaxPcaDim + 1}, 0, "dim");
  expect_field(uint64_t{kMaxKeys + 1}, 8, "size");
  expect_field(int32_t{-1}, l.rank_option, "rank_option");
  expect_field(int32_t{129}, l.rank_option, "rank_option");
  expect_field(std::nan(""), l.variance, "variance");
  expect_field(1.5, l.variance, "variance");
  expect_field(int32_t{0}, l.rerank, "rerank_factor");
  expect_field(int32_t{65}, l.rerank, "rerank_factor");
  expect_field(uint64_t{l.n + 1}, l.trained, "trained_size");
  expect_field(uint64_t{0}, l.trained, "trained_size");
  expect_field(uint64_t{0}, l.rank_at, "rank");
  expect_field(uint64_t{l.dim + 1}, l.rank_at, "rank");
  expect_field(std::numeric_limits<float>::infinity(), l.mean() + 4, "mean");
  expect_field(std::nan(""), l.variances(), "variances");
  expect_field(std::nan(""), l.basis(), "basis");
  expect_field(2.0f, l.basis(), "basis");  // row 0 no longer a unit vector
  expect_field(-1.0, l.outlier_threshold(), "outlier_threshold");
  expect_field(std::nan(""), l.outlier_threshold(), "outlier_threshold");
  expect_field(uint64_t{MaxPcaOutliers(l.n) + 1}, l.outliers_count(), "outliers");
  if (!idx->outliers().empty()) {  // an id past the keys
    expect_field(static_cast<uint32_t>(l.n), l.outliers_count() + 8, "outliers");
  }
  // A truncated key array.
  std::vector<uint8_t> cut = payload;
  cut.resize(cut.size() - 4);
  auto truncated = LoadIndex(Reseal(cut));
  ASSERT_FALSE(truncated.ok());
  EXPECT_NE(truncated.status().message().find("keys"), std::string::npos) << truncated.status();
  // An unknown version.
  auto v2 = LoadIndex(SealBlob(kPcaSq8BlobKind, 2, payload));
  EXPECT_EQ(v2.status().code(), absl::StatusCode::kInvalidArgument);
}

// kPcaSq8 built and calibrated on held-back queries: the rerank factor is
// the smallest meeting target + decode margin on them, kept in the result,
// used by searches that leave SearchParams::rerank_factor 0, and kept by a
// blob round trip (calibrated blob version 3).
TEST(PcaSq8Test, CalibratedRerankFactorRoundTrips) {
  const AttentionData d = Generate("topical", kKeys, 768);
  const size_t held = 256;
  const ConstMatrixView hq = d.train_queries.view().rows_slice(0, held);
  const std::vector<int64_t> htop = ExactIds(d.keys.view(), hq, kK);
  const Holdout holdout{hq, htop, static_cast<size_t>(kK)};
  CalibratedBuildOptions o;
  auto built = BuildCalibrated(IndexType::kPcaSq8, d.keys.view(), {}, 0, holdout, o, nullptr);
  ASSERT_TRUE(built.ok()) << built.status();
  const CalibrationResult c = *(*built)->calibration();
  EXPECT_EQ(c.kind, IndexType::kPcaSq8);
  EXPECT_GE(c.rerank_factor, 1);
  EXPECT_LE(c.rerank_factor, kMaxSq8RerankFactor);
  EXPECT_EQ(CalibratedEffort(c), c.rerank_factor);
  const double goal = o.calibration.target_recall + o.calibration.decode_margin;
  EXPECT_GE(c.expected_recall, goal);
  // One step less misses the goal on the same held-back queries (bisection
  // to a single factor below 16).
  if (c.rerank_factor > 1 && c.rerank_factor <= 16) {
    SearchParams lower;
    lower.rerank_factor = c.rerank_factor - 1;
    auto m = MeasureEffort((*built)->inner(), holdout, lower, o.calibration, nullptr);
    ASSERT_TRUE(m.ok());
    EXPECT_LT(m->recall, goal);
  }
  SearchParams p;
  p.k = kK;
  const Result served = Search(**built, d.test_queries.view(), p);
  p.rerank_factor = c.rerank_factor;
  const Result direct = Search((*built)->inner(), d.test_queries.view(), p);
  EXPECT_EQ(served.ids, direct.ids);
  const double recall = test_support::RecallAtK(
      served.ids, ExactIds(d.keys.view(), d.test_queries.view(), kK), kK);
  EXPECT_GE(recall, o.calibration.target_recall - 0.03);
  std::vector<uint8_t> blob;
  ASSERT_TRUE((*built)->Serialize(&blob).ok());
  auto back = LoadIndex(blob);
  ASSERT_TRUE(back.ok()) << back.status();
  ASSERT_NE((*back)->calibration(), nullptr);
  EXPECT_EQ((*back)->calibration()->rerank_factor, c.rerank_factor);
  EXPECT_EQ((*back)->type(), IndexType::kPcaSq8);
}

// A KeyIndex that records the rows of each Search call (and returns -1 /
// -inf pads): what TimeSearch hands the index.
class RecordingIndex final : public KeyIndex {
 public:
  IndexType type() const override { return IndexType::kFlat; }
  size_t dim() const override { return 4; }
  size_t size() const override { return 8; }
  absl::Status Search(ConstMatrixView queries, const SearchParams& params,
                      std::span<int64_t> ids, std::span<float> scores,
                      SearchStats*) const override {
    if (ids.size() < queries.rows() * static_cast<size_t>(params.k)) {
      return absl::InvalidArgumentError("ids too small");
    }
    calls.push_back(queries.rows());
    std::fill(ids.begin(), ids.end(), -1);
    std::fill(scores.begin(), scores.end(), -std::numeric_limits<float>::infinity());
    return absl::OkStatus();
  }
  absl::Status Add(ConstMatrixView) override { return absl::OkStatus(); }
  size_t MemoryBytes() const override { return 0; }
  absl::Status Serialize(std::vector<uint8_t>*) const override { return absl::OkStatus(); }
  ConstMatrixView keys() const override { return ConstMatrixView(nullptr, 0, 4); }
  mutable std::vector<size_t> calls;
};

// TimeSearch searches queries_per_search rows per call (the last call the
// rest), once per repetition; 1 keeps the session-26 one-query searches.
TEST(PcaSq8Test, TimeSearchSearchesQueriesPerSearchAtOnce) {
  RecordingIndex idx;
  std::vector<float> q(10 * 4, 0.5f);
  const ConstMatrixView queries(q.data(), 10, 4);
  SearchParams p;
  p.k = 3;
  ASSERT_TRUE(TimeSearch(idx, queries, p, 1, 4).ok());
  EXPECT_EQ(idx.calls, (std::vector<size_t>{4, 4, 2}));
  idx.calls.clear();
  ASSERT_TRUE(TimeSearch(idx, queries, p, 2, 1).ok());
  EXPECT_EQ(idx.calls, std::vector<size_t>(20, 1));
  idx.calls.clear();
  ASSERT_TRUE(TimeSearch(idx, queries, p, 1).ok());  // the default: one query per search
  EXPECT_EQ(idx.calls, std::vector<size_t>(10, 1));
  idx.calls.clear();
  ASSERT_TRUE(TimeSearch(idx, queries, p, 1, 64).ok());  // more than the rows: one call
  EXPECT_EQ(idx.calls, (std::vector<size_t>{10}));
  const auto zero = TimeSearch(idx, queries, p, 1, 0);
  EXPECT_NE(zero.status().message().find("queries_per_search 0 outside [1, 4096]"),
            std::string::npos)
      << zero.status();
  CalibrationOptions o;
  EXPECT_EQ(o.queries_per_search, 1u);
  o.queries_per_search = kMaxHoldoutQueries + 1;
  EXPECT_NE(ValidateCalibrationOptions(o).message().find("queries_per_search 4097"),
            std::string::npos);
  o.queries_per_search = 0;
  EXPECT_FALSE(ValidateCalibrationOptions(o).ok());
}

// A strongly low-rank key set (16 directions of 128 + 1% noise, 32768
// keys): auto with the pca_sq8 candidate considers it last, it meets the
// target and is timed at 4 queries per search, and its timed µs are below
// the exact scan's (8x fewer code bytes than flat_sq8, a quarter of the
// exact scan's; 2x margin kept for a loaded machine). Which kind wins is
// printed, not asserted (IVF-SQ8 is close on some runs).
TEST(PcaSq8Test, AutoTimesPcaOnALowRankSet) {
  const size_t n = 32768, dim = 128, rank = 16, nq = 288;
  std::mt19937_64 rng(5);
  std::normal_distribution<float> g;
  std::vector<float> dirs(rank * dim);
  for (float& x : dirs) x = g(rng);
  auto make = [&](size_t rows, float noise) {
    Matrix m(rows, dim);
    for (size_t i = 0; i < rows; ++i) {
      float z[16];
      for (float& x : z) x = g(rng);
      for (size_t c = 0; c < dim; ++c) {
        float v = noise * g(rng);
        for (size_t t = 0; t < rank; ++t) v += z[t] * dirs[t * dim + c] * 0.25f;
        m.row(i)[c] = v;
      }
    }
    return m;
  };
  const Matrix keys = make(n, 0.01f);
  const Matrix queries = make(nq, 0.01f);
  const ConstMatrixView held = queries.view().rows_slice(0, 256);
  const std::vector<int64_t> top = ExactIds(keys.view(), held, kK);
  const Holdout holdout{held, top, static_cast<size_t>(kK)};
  CalibratedBuildOptions o;
  o.pca_candidate = true;
  o.calibration.queries_per_search = 4;
  std::vector<AutoCandidate> candidates;
  o.candidates = &candidates;
  ThreadPool pool(2);
  auto built = BuildCalibrated(IndexType::kAuto, keys.view(), {}, 0, holdout, o, &pool);
  ASSERT_TRUE(built.ok()) << built.status();
  std::string report;
  for (const AutoCandidate& a : candidates) {
    report += absl::StrCat(std::string(IndexTypeName(a.calibration.kind)), " e=",
                           CalibratedEffort(a.calibration), " recall=",
                           a.calibration.expected_recall, " us=", a.measured_us,
                           a.pruned ? " pruned" : "", "; ");
  }
  std::printf("%s\nchose %s\n", report.c_str(),
              std::string(IndexTypeName((*built)->type())).c_str());
  ASSERT_GE(candidates.size(), 5u) << report;
  const AutoCandidate& pca = candidates.back();
  ASSERT_EQ(pca.calibration.kind, IndexType::kPcaSq8) << report;
  EXPECT_TRUE(pca.meets_target) << report;
  EXPECT_GT(pca.measured_us, 0) << report;
  EXPECT_GE(pca.calibration.rerank_factor, 1) << report;
  ASSERT_EQ(candidates[0].calibration.kind, IndexType::kFlat);
  EXPECT_LT(pca.measured_us, 0.5 * candidates[0].measured_us) << report;
  // Whatever was kept is the fastest timed candidate meeting the target.
  const int chosen = ChooseFastest(candidates);
  ASSERT_GE(chosen, 0);
  EXPECT_EQ((*built)->type(), candidates[static_cast<size_t>(chosen)].calibration.kind);
}

}  // namespace
}  // namespace kvr::index
