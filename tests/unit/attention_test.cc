// Partial attention and the LSE merge against full softmax attention computed
// in double over the same (rounded) inputs.
#include "common/attention.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "common/simd/kernels.h"

namespace kvr {
namespace {

struct Oracle {
  std::vector<double> o;
  double m = -INFINITY;
  double l = 0;
};

// Full softmax attention over `rows` in double; values read back from the
// ValueMatrix so bf16/fp16 rounding is shared with the kernels.
Oracle SoftmaxOracle(const std::vector<float>& scores, const std::vector<int64_t>& rows,
                     const ValueMatrix& values) {
  Oracle r;
  r.o.assign(values.cols(), 0.0);
  for (int64_t i : rows) r.m = std::max<double>(r.m, scores[i]);
  if (rows.empty()) return r;
  std::vector<float> v(values.cols());
  for (int64_t i : rows) {
    const double w = std::exp(static_cast<double>(scores[i]) - r.m);
    r.l += w;
    values.RowToFloat(i, v.data());
    for (size_t j = 0; j < v.size(); ++j) r.o[j] += w * v[j];
  }
  for (double& x : r.o) x /= r.l;
  return r;
}

void ExpectClose(std::span<const float> o, float m, float l, const Oracle& want, double rel) {
  ASSERT_EQ(o.size(), want.o.size());
  if (want.l == 0) {
    EXPECT_EQ(l, 0.0f);
    EXPECT_EQ(m, -INFINITY);
    for (float x : o) EXPECT_EQ(x, 0.0f);
    return;
  }
  EXPECT_EQ(static_cast<double>(m), want.m);
  EXPECT_NEAR(l, want.l, rel * want.l);
  double scale = 0;
  for (double x : want.o) scale = std::max(scale, std::abs(x));
  for (size_t j = 0; j < o.size(); ++j) {
    EXPECT_NEAR(o[j], want.o[j], rel * std::max(scale, 1e-30)) << "component " << j;
  }
}

// Partial over `rows` computed with PartialFromScores.
void PartialOver(const std::vector<float>& scores, const std::vector<int64_t>& rows,
                 const ValueMatrix& values, std::span<float> o, float* m, float* l) {
  std::vector<float> s(rows.size()), scratch(rows.size());
  for (size_t j = 0; j < rows.size(); ++j) s[j] = scores[rows[j]];
  PartialFromScores(s, rows, values, scratch, o, m, l);
}

struct Case {
  size_t n;
  size_t dv;
  float score_scale;  // scores uniform in [-score_scale, score_scale]
  size_t parts;
  bool duplicate_scores;
};

void RunMergeProperty(const Case& c, DType dtype, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> scores(c.n);
  for (float& s : scores) s = c.score_scale * u(rng);
  if (c.duplicate_scores) {
    for (size_t i = 1; i < c.n; i += 2) scores[i] = scores[i - 1];
  }
  Matrix vals(c.n, c.dv);
  for (float& x : vals.data) x = u(rng);
  if (c.duplicate_scores) {
    for (size_t i = 1; i < c.n; i += 2) std::copy_n(vals.row(i - 1), c.dv, vals.row(i));
  }
  const ValueMatrix values = ValueMatrix::FromFloat(dtype, vals.view());

  // Random disjoint parts (some possibly empty) covering all rows.
  std::vector<std::vector<int64_t>> parts(c.parts);
  std::uniform_int_distribution<size_t> pick(0, c.parts - 1);
  for (size_t i = 0; i < c.n; ++i) parts[pick(rng)].push_back(static_cast<int64_t>(i));
  Partials p(c.parts, c.dv);
  for (size_t j = 0; j < c.parts; ++j) {
    PartialOver(scores, parts[j], values, p.o.view().row_span(j), &p.m[j], &p.l[j]);
    ExpectClose(p.o.view().row_span(j), p.m[j], p.l[j], SoftmaxOracle(scores, parts[j], values),
                1e-5);
  }
  std::vector<int64_t> all(c.n);
  std::iota(all.begin(), all.end(), 0);
  const Oracle want = SoftmaxOracle(scores, all, values);

  // Pairwise merges in random orders.
  for (int trial = 0; trial < 3; ++trial) {
    std::vector<size_t> order(c.parts);
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), rng);
    Partials acc(1, c.dv);
    for (size_t j : order) {
      MergeInto(acc.o.view().row_span(0), &acc.m[0], &acc.l[0], p.o.view().row_span(j), p.m[j],
                p.l[j]);
    }
    ExpectClose(acc.o.view().row_span(0), acc.m[0], acc.l[0], want, 1e-5);
  }
  // Batched merge.
  Partials many(1, c.dv);
  MergeMany(p.view(), many.o.view().row_span(0), &many.m[0], &many.l[0]);
  ExpectClose(many.o.view().row_span(0), many.m[0], many.l[0], want, 1e-5);
}

class MergePropertyTest : public ::testing::TestWithParam<DType> {};

TEST_P(MergePropertyTest, RandomPartsEqualFullSoftmax) {
  for (uint64_t seed = 1; seed <= 5; ++seed) {
    RunMergeProperty({1000, 64, 4.0f, 7, false}, GetParam(), seed);
  }
}
TEST_P(MergePropertyTest, HugeLogits) {
  RunMergeProperty({500, 32, 1e4f, 5, false}, GetParam(), 11);
  RunMergeProperty({500, 32, 3e4f, 3, false}, GetParam(), 12);
}
TEST_P(MergePropertyTest, TinyLogits) {
  RunMergeProperty({500, 32, 1e-6f, 5, false}, GetParam(), 13);
  RunMergeProperty({500, 32, 0.0f, 4, false}, GetParam(), 14);
}
TEST_P(MergePropertyTest, OneKeyPerPartAndOnePart) {
  RunMergeProperty({64, 16, 10.0f, 64, false}, GetParam(), 15);  // ~k=1 parts
  RunMergeProperty({64, 16, 10.0f, 1, false}, GetParam(), 16);   // k=n
  RunMergeProperty({1, 16, 10.0f, 1, false}, GetParam(), 17);
}
TEST_P(MergePropertyTest, DuplicateKeys) {
  RunMergeProperty({400, 24, 8.0f, 6, true}, GetParam(), 18);
}
TEST_P(MergePropertyTest, ManyEmptyParts) {
  RunMergeProperty({5, 8, 3.0f, 40, false}, GetParam(), 19);
}

INSTANTIATE_TEST_SUITE_P(AllDTypes, MergePropertyTest,
                         ::testing::Values(DType::kF32, DType::kBf16, DType::kF16),
                         [](const auto& param_info) { return std::string(DTypeName(param_info.param)); });

TEST(AttentionTest, EmptyPartialAndIdentity) {
  Partials e(1, 4);
  ValueMatrix values(DType::kF32, 4);
  std::vector<float> scratch;
  PartialFromScores({}, {}, values, scratch, e.o.view().row_span(0), &e.m[0], &e.l[0]);
  EXPECT_EQ(e.m[0], -INFINITY);
  EXPECT_EQ(e.l[0], 0.0f);

  std::vector<float> o = {1, 2, 3, 4};
  float m = 2.5f, l = 3.0f;
  MergeInto(o, &m, &l, e.o.view().row_span(0), e.m[0], e.l[0]);
  EXPECT_EQ(o, (std::vector<float>{1, 2, 3, 4}));
  EXPECT_EQ(m, 2.5f);
  EXPECT_EQ(l, 3.0f);

  // empty <- merge(empty, x) = x; merge of empties stays empty.
  Partials acc(1, 4);
  MergeInto(acc.o.view().row_span(0), &acc.m[0], &acc.l[0], o, m, l);
  EXPECT_EQ(acc.m[0], 2.5f);
  EXPECT_EQ(acc.l[0], 3.0f);
  Partials two(2, 4), out(1, 4);
  MergeMany(two.view(), out.o.view().row_span(0), &out.m[0], &out.l[0]);
  EXPECT_EQ(out.l[0], 0.0f);
  EXPECT_EQ(out.m[0], -INFINITY);
  MergeInto(two.view().slice(0, 1), two.view().slice(1, 1));
  EXPECT_EQ(two.l[0], 0.0f);
}

TEST(AttentionTest, PaddingIdsAreIgnored) {
  Matrix v(3, 2);
  v.data = {1, 2, 3, 4, 5, 6};
  const ValueMatrix values = ValueMatrix::FromFloat(DType::kF32, v.view());
  const std::vector<float> scores = {0.5f, -INFINITY, 1.0f};
  const std::vector<int64_t> ids = {0, -1, 2};
  std::vector<float> scratch(3), o(2);
  float m, l;
  PartialFromScores(scores, ids, values, scratch, o, &m, &l);
  const double w0 = std::exp(-0.5), w2 = 1.0;
  EXPECT_EQ(m, 1.0f);
  EXPECT_NEAR(l, w0 + w2, 1e-6);
  EXPECT_NEAR(o[0], (w0 * 1 + w2 * 5) / (w0 + w2), 1e-6);
  EXPECT_NEAR(o[1], (w0 * 2 + w2 * 6) / (w0 + w2), 1e-6);
  // All padding: empty.
  const std::vector<float> pad_scores = {-INFINITY, -INFINITY};
  const std::vector<int64_t> pad_ids = {-1, -1};
  PartialFromScores(pad_scores, pad_ids, values, scratch, o, &m, &l);
  EXPECT_EQ(l, 0.0f);
  EXPECT_EQ(m, -INFINITY);
}

TEST(AttentionTest, ExactAttentionMatchesDoubleOracle) {
  std::mt19937_64 rng(7);
  std::normal_distribution<float> g;
  const size_t n = 2000, d = 64, dv = 48, nq = 5;
  Matrix keys(n, d), q(nq, d), v(n, dv);
  for (float& x : keys.data) x = g(rng);
  for (float& x : q.data) x = g(rng);
  for (float& x : v.data) x = g(rng);
  const ValueMatrix values = ValueMatrix::FromFloat(DType::kF32, v.view());
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  Partials out(nq, dv);
  ASSERT_TRUE(ExactAttention(q.view(), keys.view(), values, scale, out.view()).ok());
  for (size_t i = 0; i < nq; ++i) {
    std::vector<double> s(n);
    double mx = -INFINITY;
    for (size_t j = 0; j < n; ++j) {
      double acc = 0;
      for (size_t t = 0; t < d; ++t) acc += static_cast<double>(q.row(i)[t]) * keys.row(j)[t];
      s[j] = acc * scale;
      mx = std::max(mx, s[j]);
    }
    double l = 0;
    std::vector<double> o(dv, 0.0);
    for (size_t j = 0; j < n; ++j) {
      const double w = std::exp(s[j] - mx);
      l += w;
      for (size_t t = 0; t < dv; ++t) o[t] += w * v.row(j)[t];
    }
    double big = 0;
    for (double& x : o) big = std::max(big, std::abs(x /= l));
    EXPECT_NEAR(out.m[i], mx, 1e-5 * std::abs(mx));
    EXPECT_NEAR(out.l[i], l, 1e-4 * l);
    for (size_t t = 0; t < dv; ++t) EXPECT_NEAR(out.o.row(i)[t], o[t], 1e-5 * big);
  }
}

TEST(AttentionTest, ExactAttentionRejectsBadShapes) {
  Matrix keys(4, 8), q(2, 7), v(4, 3);
  const ValueMatrix values = ValueMatrix::FromFloat(DType::kF32, v.view());
  Partials out(2, 3);
  EXPECT_EQ(ExactAttention(q.view(), keys.view(), values, 1.0f, out.view()).code(),
            absl::StatusCode::kInvalidArgument);
  Matrix q2(2, 8);
  Partials wrong(3, 3);
  EXPECT_EQ(ExactAttention(q2.view(), keys.view(), values, 1.0f, wrong.view()).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(ExactAttention(q2.view(), keys.view(), values, 1.0f, out.view()).ok());
}

TEST(ValueMatrixTest, DTypesRoundTripAndAccumulate) {
  EXPECT_EQ(*ParseDType("bf16"), DType::kBf16);
  EXPECT_EQ(*ParseDType("fp16"), DType::kF16);
  EXPECT_EQ(*ParseDType("f32"), DType::kF32);
  const auto bad = ParseDType("int8");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("int8"), std::string::npos);
  Matrix v(3, 5);
  for (size_t i = 0; i < v.data.size(); ++i) v.data[i] = 0.1f * static_cast<float>(i) - 0.7f;
  for (DType t : {DType::kF32, DType::kBf16, DType::kF16}) {
    ValueMatrix m = ValueMatrix::FromFloat(t, v.view());
    EXPECT_EQ(m.rows(), 3u);
    EXPECT_EQ(m.raw_bytes().size(), 15 * DTypeSize(t));
    auto copy = ValueMatrix::FromRaw(t, 3, 5, m.raw_bytes());
    ASSERT_TRUE(copy.ok());
    std::vector<float> a(5), b(5), y(5, 1.0f);
    m.RowToFloat(2, a.data());
    copy->RowToFloat(2, b.data());
    EXPECT_EQ(a, b);
    m.AccumulateRow(2, 2.0f, y.data());
    for (size_t j = 0; j < 5; ++j) {
      EXPECT_FLOAT_EQ(y[j], 1.0f + 2.0f * a[j]);
      EXPECT_NEAR(a[j], v.row(2)[j], t == DType::kF32 ? 0 : 4e-3);
    }
    EXPECT_FALSE(ValueMatrix::FromRaw(t, 3, 6, m.raw_bytes()).ok());
    EXPECT_FALSE(ValueMatrix::FromRaw(t, SIZE_MAX / 2, 4, m.raw_bytes()).ok());
    Matrix wrong(1, 4);
    EXPECT_FALSE(m.Append(wrong.view()).ok());
  }
}

}  // namespace
}  // namespace kvr
