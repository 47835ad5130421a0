#include "tools/attention_data.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace kvr {
namespace {

::testing::AssertionResult Contains(const std::string& text, const std::string& part) {
  if (text.find(part) != std::string::npos) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "'" << text << "' does not contain '" << part << "'";
}

AttentionDataOptions Small(const char* preset = "default") {
  AttentionDataOptions o = *AttentionDataPreset(preset);
  o.n_keys = 4096;
  o.n_train = 512;
  o.n_test = 128;
  o.dim = 64;
  return o;
}

bool SameBytes(const Matrix& a, const Matrix& b) {
  return a.rows == b.rows && a.cols == b.cols &&
         std::memcmp(a.data.data(), b.data.data(), a.data.size() * sizeof(float)) == 0;
}

bool SameData(const AttentionData& a, const AttentionData& b) {
  return SameBytes(a.keys, b.keys) && SameBytes(a.values, b.values) &&
         SameBytes(a.train_queries, b.train_queries) &&
         SameBytes(a.test_queries, b.test_queries) && a.train_positions == b.train_positions &&
         a.test_positions == b.test_positions && a.key_topics == b.key_topics;
}

TEST(AttentionData, SameSeedSameBytesWhateverTheThreads) {
  const AttentionDataOptions o = Small();
  ThreadPool inline_pool(0), wide_pool(3);
  absl::StatusOr<AttentionData> a = GenerateAttentionData(o, &inline_pool);
  absl::StatusOr<AttentionData> b = GenerateAttentionData(o, &wide_pool);
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_TRUE(SameData(*a, *b));

  AttentionDataOptions other = o;
  other.seed = o.seed + 1;
  absl::StatusOr<AttentionData> c = GenerateAttentionData(other, &wide_pool);
  ASSERT_TRUE(c.ok());
  EXPECT_FALSE(SameBytes(a->keys, c->keys));
  EXPECT_FALSE(SameBytes(a->values, c->values));
  EXPECT_FALSE(SameBytes(a->train_queries, c->train_queries));
  EXPECT_FALSE(SameBytes(a->test_queries, c->test_queries));
}

TEST(AttentionData, ShapesAndPositions) {
  AttentionDataOptions o = Small();
  o.test_position_offset = 10;
  absl::StatusOr<AttentionData> d = GenerateAttentionData(o);
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_EQ(d->keys.rows, o.n_keys);
  EXPECT_EQ(d->keys.cols, o.dim);
  EXPECT_EQ(d->values.rows, o.n_keys);
  EXPECT_EQ(d->values.cols, o.dim);
  EXPECT_EQ(d->train_queries.rows, o.n_train);
  EXPECT_EQ(d->test_queries.rows, o.n_test);
  ASSERT_EQ(d->train_positions.size(), o.n_train);
  EXPECT_TRUE(std::is_sorted(d->train_positions.begin(), d->train_positions.end()));
  EXPECT_EQ(std::adjacent_find(d->train_positions.begin(), d->train_positions.end()),
            d->train_positions.end());
  EXPECT_GE(d->train_positions.front(), 0);
  EXPECT_LT(d->train_positions.back(), static_cast<int64_t>(o.n_keys));
  ASSERT_EQ(d->test_positions.size(), o.n_test);
  for (size_t j = 0; j < o.n_test; ++j) {
    EXPECT_EQ(d->test_positions[j], static_cast<int64_t>(o.n_keys + 10 + j));
  }
  for (float x : d->keys.data) ASSERT_TRUE(std::isfinite(x));
  for (float x : d->test_queries.data) ASSERT_TRUE(std::isfinite(x));

  o.n_train = o.n_keys;
  d = GenerateAttentionData(o);
  ASSERT_TRUE(d.ok());
  for (size_t i = 0; i < o.n_keys; ++i) ASSERT_EQ(d->train_positions[i], static_cast<int64_t>(i));
}

// <R(p1) q, R(p2) k> = Σ_i (q0 k0 + q1 k1) cos(Δ ω_i) + (q1 k0 - q0 k1) sin(Δ ω_i),
// Δ = p2 - p1, ω_i = θ^(-2i/d): depends on the positions only through Δ.
double RopeDotFormula(const std::vector<float>& q, const std::vector<float>& k, int64_t p1,
                      int64_t p2, double theta) {
  const size_t d = q.size();
  double sum = 0;
  for (size_t i = 0; i < d / 2; ++i) {
    const double omega = std::pow(theta, -2.0 * static_cast<double>(i) / static_cast<double>(d));
    const double a = static_cast<double>(p2 - p1) * omega;
    const double q0 = q[2 * i], q1 = q[2 * i + 1], k0 = k[2 * i], k1 = k[2 * i + 1];
    sum += (q0 * k0 + q1 * k1) * std::cos(a) + (q1 * k0 - q0 * k1) * std::sin(a);
  }
  return sum;
}

TEST(AttentionData, RopeMatchesDirectFormulaAndDependsOnlyOnOffset) {
  const size_t d = 128;
  const double theta = 500000;
  std::mt19937 gen(7);
  std::normal_distribution<float> normal;
  for (int trial = 0; trial < 20; ++trial) {
    std::vector<float> q(d), k(d);
    for (auto& x : q) x = normal(gen);
    for (auto& x : k) x = normal(gen);
    const int64_t p1 = static_cast<int64_t>(gen() % 2000000);
    const int64_t p2 = static_cast<int64_t>(gen() % 2000000);
    const int64_t shift = static_cast<int64_t>(gen() % 100000);
    Matrix m(4, d);
    std::copy(q.begin(), q.end(), m.row(0));
    std::copy(k.begin(), k.end(), m.row(1));
    std::copy(q.begin(), q.end(), m.row(2));
    std::copy(k.begin(), k.end(), m.row(3));
    const std::vector<int64_t> positions = {p1, p2, p1 + shift, p2 + shift};
    ApplyRope(m.view(), positions, theta);
    double dot = 0, dot_shifted = 0, norm_q = 0, norm_rq = 0;
    for (size_t c = 0; c < d; ++c) {
      dot += double{m.row(0)[c]} * m.row(1)[c];
      dot_shifted += double{m.row(2)[c]} * m.row(3)[c];
      norm_q += double{q[c]} * q[c];
      norm_rq += double{m.row(0)[c]} * m.row(0)[c];
    }
    const double expected = RopeDotFormula(q, k, p1, p2, theta);
    const double tol = 1e-5 * std::sqrt(d) * 4;  // float rounding of the rotated vectors
    EXPECT_NEAR(dot, expected, tol) << "p1=" << p1 << " p2=" << p2;
    EXPECT_NEAR(dot_shifted, expected, tol) << "shift " << shift;
    EXPECT_NEAR(norm_rq, norm_q, 1e-5 * norm_q);  // rotations keep norms
  }
}

TEST(AttentionData, RopeRotatesPairsByPositionTimesFrequency) {
  const size_t d = 8;
  Matrix m(1, d);
  for (size_t c = 0; c < d; ++c) m.row(0)[c] = c % 2 == 0 ? 1.0f : 0.0f;  // unit x per pair
  const int64_t pos = 123457;
  ApplyRope(m.view(), std::vector<int64_t>{pos}, 10000.0);
  for (size_t i = 0; i < d / 2; ++i) {
    const double angle = static_cast<double>(pos) * std::pow(10000.0, -2.0 * i / d);
    EXPECT_NEAR(m.row(0)[2 * i], std::cos(angle), 1e-6) << i;
    EXPECT_NEAR(m.row(0)[2 * i + 1], std::sin(angle), 1e-6) << i;
  }
}

TEST(AttentionData, GeneratorAppliesRopeAtThePositions) {
  AttentionDataOptions o = Small();
  o.apply_rope = false;
  absl::StatusOr<AttentionData> plain = GenerateAttentionData(o);
  o.apply_rope = true;
  absl::StatusOr<AttentionData> rotated = GenerateAttentionData(o);
  ASSERT_TRUE(plain.ok());
  ASSERT_TRUE(rotated.ok());
  std::vector<int64_t> key_positions(o.n_keys);
  for (size_t t = 0; t < o.n_keys; ++t) key_positions[t] = static_cast<int64_t>(t);
  ApplyRope(plain->keys.view(), key_positions, o.rope_theta);
  ApplyRope(plain->train_queries.view(), plain->train_positions, o.rope_theta);
  ApplyRope(plain->test_queries.view(), plain->test_positions, o.rope_theta);
  EXPECT_TRUE(SameBytes(plain->keys, rotated->keys));
  EXPECT_TRUE(SameBytes(plain->train_queries, rotated->train_queries));
  EXPECT_TRUE(SameBytes(plain->test_queries, rotated->test_queries));
  EXPECT_TRUE(SameBytes(plain->values, rotated->values));  // values are not rotated
}

TEST(AttentionData, DefaultPresetShowsTheOodGap) {
  AttentionDataOptions o = Small();
  o.dim = 128;
  o.n_keys = 8192 + 512;  // the last 512 keys serve as in-distribution queries
  absl::StatusOr<AttentionData> d = GenerateAttentionData(o);
  ASSERT_TRUE(d.ok());
  const ConstMatrixView keys = d->keys.view().rows_slice(0, 8192);
  const ConstMatrixView key_queries = d->keys.view().rows_slice(8192, 512);
  OodStatsOptions so;
  so.topk_queries = 48;

  absl::StatusOr<OodStats> test = ComputeOodStats(keys, d->test_queries.view(), so);
  absl::StatusOr<OodStats> train = ComputeOodStats(keys, d->train_queries.view(), so);
  absl::StatusOr<OodStats> control = ComputeOodStats(keys, key_queries, so);
  ASSERT_TRUE(test.ok()) << test.status();
  ASSERT_TRUE(train.ok());
  ASSERT_TRUE(control.ok());
  SCOPED_TRACE("test:\n" + test->ToString() + "train:\n" + train->ToString() + "control:\n" +
               control->ToString());
  // A key's own Mahalanobis distance is about sqrt(d).
  EXPECT_NEAR(test->mahalanobis_key_to_key, std::sqrt(128.0), 1.5);
  EXPECT_GE(test->mahalanobis_ratio, 2.0);
  EXPECT_GE(train->mahalanobis_ratio, 2.0);
  EXPECT_NEAR(control->mahalanobis_ratio, 1.0, 0.2);
  // Attention concentrates on the top-100 but not on the same keys for every
  // query, and not just on the largest keys.
  EXPECT_GT(test->topk_attention_mass, 0.3);
  EXPECT_LT(test->topk_pairwise_overlap, 0.3);
  EXPECT_LT(test->topk_overlap_with_norm_topk, 0.3);
  // A decode query's top-100 is less covered by key-key neighbourhoods than
  // a key's own.
  EXPECT_LT(test->topk_in_l2_neighbourhood, control->topk_in_l2_neighbourhood);
}

TEST(AttentionData, MahalanobisMatchesAKnownGaussian) {
  // Keys ~ N(μ, diag(σ²)) with σ spanning 0.05..5; a query at μ + 3σ_0 e_0 + 4σ_5 e_5
  // is at Mahalanobis distance 5.
  const size_t d = 16, n = 40000;
  std::mt19937 gen(3);
  std::normal_distribution<double> normal;
  std::vector<double> sigma(d), mu(d);
  for (size_t c = 0; c < d; ++c) {
    sigma[c] = 0.05 * std::pow(100.0, static_cast<double>(c) / (d - 1));
    mu[c] = static_cast<double>(c) - 3;
  }
  Matrix keys(n, d);
  for (size_t i = 0; i < n; ++i) {
    for (size_t c = 0; c < d; ++c) keys.row(i)[c] = static_cast<float>(mu[c] + sigma[c] * normal(gen));
  }
  Matrix query(1, d);
  for (size_t c = 0; c < d; ++c) query.row(0)[c] = static_cast<float>(mu[c]);
  query.row(0)[0] += static_cast<float>(3 * sigma[0]);
  query.row(0)[5] += static_cast<float>(4 * sigma[5]);
  OodStatsOptions so;
  so.covariance_sample = 30000;
  so.topk_queries = 0;
  absl::StatusOr<OodStats> s = ComputeOodStats(keys.view(), query.view(), so);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_NEAR(s->mahalanobis_query_to_key, 5.0, 0.1);
  // E[chi_16] = sqrt(2) Γ(8.5)/Γ(8) ≈ 3.9218.
  EXPECT_NEAR(s->mahalanobis_key_to_key, 3.9218, 0.1);
  EXPECT_EQ(s->topk, 0u);
}

TEST(AttentionData, PresetsDiffer) {
  for (const std::string& name : AttentionDataPresetNames()) {
    EXPECT_TRUE(AttentionDataPreset(name).ok()) << name;
  }
  const AttentionDataOptions easy = *AttentionDataPreset("easy");
  const AttentionDataOptions hard = *AttentionDataPreset("hard");
  EXPECT_GT(easy.spectrum_decay, hard.spectrum_decay);
  EXPECT_LT(easy.query_spectrum_tilt, hard.query_spectrum_tilt);
  EXPECT_LT(easy.outlier_scale, hard.outlier_scale);
  EXPECT_GT(easy.concentration, hard.concentration);
  absl::StatusOr<AttentionDataOptions> bad = AttentionDataPreset("medium");
  ASSERT_FALSE(bad.ok());
  EXPECT_TRUE(Contains(std::string(bad.status().message()), "medium"));
}

TEST(AttentionData, BadOptionsNameTheField) {
  struct Case {
    void (*mutate)(AttentionDataOptions&);
    const char* field;
  };
  const Case cases[] = {
      {[](AttentionDataOptions& o) { o.dim = 127; }, "dim"},
      {[](AttentionDataOptions& o) { o.dim = 0; }, "dim"},
      {[](AttentionDataOptions& o) { o.n_keys = 0; }, "n_keys"},
      {[](AttentionDataOptions& o) { o.n_train = o.n_keys + 1; }, "n_train"},
      {[](AttentionDataOptions& o) { o.concentration = 1.5; }, "concentration"},
      {[](AttentionDataOptions& o) { o.spectrum_decay = -1; }, "spectrum_decay"},
      {[](AttentionDataOptions& o) { o.rope_theta = 1.0; }, "rope_theta"},
      {[](AttentionDataOptions& o) { o.outlier_channels = 1000; }, "outlier_channels"},
      {[](AttentionDataOptions& o) { o.topics = 0; }, "topics"},
      {[](AttentionDataOptions& o) { o.logit_std = 0; }, "logit_std"},
      {[](AttentionDataOptions& o) { o.segment_length = std::nan(""); }, "segment_length"},
  };
  for (const Case& c : cases) {
    AttentionDataOptions o = Small();
    c.mutate(o);
    absl::StatusOr<AttentionData> d = GenerateAttentionData(o);
    ASSERT_FALSE(d.ok()) << c.field;
    EXPECT_EQ(d.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_TRUE(Contains(std::string(d.status().message()), c.field));
  }
}

TEST(AttentionData, OodStatsRejectsBadInput) {
  Matrix keys(100, 8), queries(3, 4), few(5, 8);
  EXPECT_FALSE(ComputeOodStats(keys.view(), queries.view()).ok());   // dims differ
  EXPECT_FALSE(ComputeOodStats(few.view(), Matrix(2, 8).view()).ok());  // < d + 2 keys
  EXPECT_FALSE(ComputeOodStats(keys.view(), Matrix(0, 8).view()).ok());
}

TEST(AttentionData, ExactTopKMatchesBruteForce) {
  const AttentionDataOptions o = Small();
  absl::StatusOr<AttentionData> d = GenerateAttentionData(o);
  ASSERT_TRUE(d.ok());
  absl::StatusOr<IdMatrix> top = ExactTopK(d->keys.view(), d->test_queries.view(), 10);
  ASSERT_TRUE(top.ok());
  for (size_t q = 0; q < o.n_test; ++q) {
    std::vector<std::pair<double, int32_t>> scored;
    for (size_t t = 0; t < o.n_keys; ++t) {
      double s = 0;
      for (size_t c = 0; c < o.dim; ++c) s += double{d->test_queries.row(q)[c]} * d->keys.row(t)[c];
      scored.push_back({-s, static_cast<int32_t>(t)});
    }
    std::sort(scored.begin(), scored.end());
    // Compare score sets (float vs double accumulation may swap near-ties).
    for (size_t j = 0; j < 10; ++j) {
      const int32_t id = top->row(q)[j];
      double s = 0;
      for (size_t c = 0; c < o.dim; ++c) s += double{d->test_queries.row(q)[c]} * d->keys.row(id)[c];
      EXPECT_NEAR(s, -scored[j].first, 1e-3 * std::abs(scored[j].first) + 1e-3) << q << " " << j;
    }
  }
  EXPECT_FALSE(ExactTopK(d->keys.view(), d->test_queries.view(), 0).ok());
  EXPECT_FALSE(ExactTopK(d->keys.view(), d->test_queries.view(), o.n_keys + 1).ok());
}

}  // namespace
}  // namespace kvr
