// Attend: retrieval + partial attention against exact attention.
#include "retrieval_node/index/attend.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "retrieval_node/index/flat_index.h"

namespace kvr::index {
namespace {

Matrix RandomMatrix(size_t rows, size_t cols, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> g;
  Matrix m(rows, cols);
  for (float& x : m.data) x = g(rng);
  return m;
}

void ExpectPartialsClose(const Partials& got, const Partials& want, double rel) {
  ASSERT_EQ(got.m.size(), want.m.size());
  for (size_t i = 0; i < got.m.size(); ++i) {
    EXPECT_NEAR(got.m[i], want.m[i], rel * std::max(1.0f, std::abs(want.m[i])));
    EXPECT_NEAR(got.l[i], want.l[i], rel * want.l[i]);
    float big = 0;
    for (size_t j = 0; j < want.o.cols; ++j) big = std::max(big, std::abs(want.o.row(i)[j]));
    for (size_t j = 0; j < want.o.cols; ++j) {
      EXPECT_NEAR(got.o.row(i)[j], want.o.row(i)[j], rel * big) << i << "," << j;
    }
  }
}

struct Fixture {
  Matrix keys, queries, vals;
  std::unique_ptr<FlatIndex> index;
  float scale;
};
Fixture Make(size_t n, size_t nq, size_t d, size_t dv) {
  Fixture f{RandomMatrix(n, d, 1), RandomMatrix(nq, d, 2), RandomMatrix(n, dv, 3), nullptr,
            1.0f / std::sqrt(static_cast<float>(d))};
  f.index = std::move(*FlatIndex::Create(d));
  KVR_CHECK(f.index->Add(f.keys.view()).ok());
  return f;
}

TEST(AttendTest, KEqualsNMatchesExactAttention) {
  Fixture f = Make(1500, 6, 64, 32);
  for (DType t : {DType::kF32, DType::kBf16}) {
    const ValueMatrix values = ValueMatrix::FromFloat(t, f.vals.view());
    Partials got(6, 32), want(6, 32);
    AttendScratch scratch;
    SearchStats stats;
    ASSERT_TRUE(Attend(f.queries.view(), *f.index, values, {{.k = 1500}, f.scale}, got.view(),
                       &scratch, &stats)
                    .ok());
    EXPECT_EQ(stats.distance_computations, 6 * 1500);
    ASSERT_TRUE(ExactAttention(f.queries.view(), f.keys.view(), values, f.scale, want.view()).ok());
    ExpectPartialsClose(got, want, 1e-5);
    // k larger than the shard clamps to every key.
    Partials clamped(6, 32);
    ASSERT_TRUE(Attend(f.queries.view(), *f.index, values, {{.k = 4000}, f.scale},
                       clamped.view(), &scratch)
                    .ok());
    ExpectPartialsClose(clamped, want, 1e-5);
  }
}

TEST(AttendTest, SmallKEqualsPartialOverBruteForceTopK) {
  Fixture f = Make(3000, 5, 32, 16);
  const ValueMatrix values = ValueMatrix::FromFloat(DType::kF16, f.vals.view());
  const int k = 40;
  Partials got(5, 16);
  AttendScratch scratch;
  ASSERT_TRUE(Attend(f.queries.view(), *f.index, values, {{.k = k}, f.scale}, got.view(),
                     &scratch)
                  .ok());
  for (size_t i = 0; i < 5; ++i) {
    // Oracle in double over the brute-force top-k (same fp16-rounded values).
    std::vector<std::pair<double, size_t>> s(3000);
    for (size_t j = 0; j < 3000; ++j) {
      double acc = 0;
      for (size_t t = 0; t < 32; ++t) acc += double(f.queries.row(i)[t]) * f.keys.row(j)[t];
      s[j] = {acc * f.scale, j};
    }
    std::sort(s.begin(), s.end(), std::greater<>());
    const double m = s[0].first;
    double l = 0;
    std::vector<double> o(16, 0.0);
    std::vector<float> v(16);
    for (int j = 0; j < k; ++j) {
      const double w = std::exp(s[j].first - m);
      l += w;
      values.RowToFloat(s[j].second, v.data());
      for (size_t t = 0; t < 16; ++t) o[t] += w * v[t];
    }
    double big = 0;
    for (double& x : o) big = std::max(big, std::abs(x /= l));
    EXPECT_NEAR(got.m[i], m, 1e-5 * std::max(1.0, std::abs(m)));
    EXPECT_NEAR(got.l[i], l, 1e-5 * l);
    for (size_t t = 0; t < 16; ++t) EXPECT_NEAR(got.o.row(i)[t], o[t], 1e-5 * big);
  }
}

TEST(AttendTest, ScratchIsReused) {
  Fixture f = Make(500, 4, 16, 8);
  const ValueMatrix values = ValueMatrix::FromFloat(DType::kF32, f.vals.view());
  Partials got(4, 8);
  AttendScratch scratch;
  ASSERT_TRUE(Attend(f.queries.view(), *f.index, values, {{.k = 100}, 0.25f}, got.view(),
                     &scratch)
                  .ok());
  const size_t bytes = scratch.MemoryBytes();
  for (int r = 0; r < 3; ++r) {
    ASSERT_TRUE(Attend(f.queries.view(), *f.index, values, {{.k = 100}, 0.25f}, got.view(),
                       &scratch)
                    .ok());
  }
  EXPECT_EQ(scratch.MemoryBytes(), bytes);
}

TEST(AttendTest, EmptyIndexGivesEmptyPartials) {
  auto idx = FlatIndex::Create(8);
  ASSERT_TRUE(idx.ok());
  const Matrix q = RandomMatrix(3, 8, 4);
  ValueMatrix values(DType::kBf16, 5);
  Partials got(3, 5);
  got.l[1] = 7;  // overwritten
  AttendScratch scratch;
  ASSERT_TRUE(Attend(q.view(), **idx, values, {{.k = 10}, 1.0f}, got.view(), &scratch).ok());
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(got.l[i], 0.0f);
    EXPECT_EQ(got.m[i], -INFINITY);
  }
}

TEST(AttendTest, BadInput) {
  Fixture f = Make(100, 2, 8, 4);
  const ValueMatrix values = ValueMatrix::FromFloat(DType::kF32, f.vals.view());
  AttendScratch scratch;
  Partials out(2, 4);
  const ValueMatrix short_values = ValueMatrix::FromFloat(DType::kF32, f.vals.view().rows_slice(0, 99));
  EXPECT_EQ(Attend(f.queries.view(), *f.index, short_values, {{.k = 5}, 1.0f}, out.view(),
                   &scratch)
                .code(),
            absl::StatusCode::kInvalidArgument);
  Partials wrong(2, 5);
  EXPECT_EQ(Attend(f.queries.view(), *f.index, values, {{.k = 5}, 1.0f}, wrong.view(), &scratch)
                .code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Attend(f.queries.view(), *f.index, values, {{.k = 5}, NAN}, out.view(), &scratch)
                .code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Attend(f.queries.view(), *f.index, values, {{.k = 0}, 1.0f}, out.view(), &scratch)
                .code(),
            absl::StatusCode::kInvalidArgument);
  Matrix bad = f.queries;
  bad.row(1)[1] = INFINITY;
  EXPECT_EQ(Attend(bad.view(), *f.index, values, {{.k = 5}, 1.0f}, out.view(), &scratch).code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace kvr::index
