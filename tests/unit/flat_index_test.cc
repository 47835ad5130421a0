// FlatIndex / ExactTopK (common/exact_topk.h) against a brute-force std::sort oracle.
#include "retrieval_node/index/flat_index.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "common/exact_topk.h"

namespace kvr::index {
namespace {

Matrix RandomMatrix(size_t rows, size_t cols, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> g;
  Matrix m(rows, cols);
  for (float& x : m.data) x = g(rng);
  return m;
}

// Small integers: every inner product is exact in float whatever the
// summation order, and ties are frequent.
Matrix IntegerMatrix(size_t rows, size_t cols, int range, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int> u(-range, range);
  Matrix m(rows, cols);
  for (float& x : m.data) x = static_cast<float>(u(rng));
  return m;
}

// Top-k by (score desc, id asc), scores computed in double.
std::vector<std::pair<double, int64_t>> OracleTopK(const Matrix& keys, const float* q, size_t k) {
  std::vector<std::pair<double, int64_t>> all(keys.rows);
  for (size_t i = 0; i < keys.rows; ++i) {
    double s = 0;
    for (size_t j = 0; j < keys.cols; ++j) s += static_cast<double>(q[j]) * keys.row(i)[j];
    all[i] = {s, static_cast<int64_t>(i)};
  }
  std::sort(all.begin(), all.end(), [](const auto& a, const auto& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  });
  all.resize(k);
  return all;
}

std::unique_ptr<FlatIndex> MakeIndex(const Matrix& keys) {
  auto idx = FlatIndex::Create(keys.cols);
  KVR_CHECK(idx.ok());
  KVR_CHECK((*idx)->Add(keys.view()).ok());
  return std::move(*idx);
}

TEST(FlatIndexTest, ExactTiesMatchSortOracle) {
  const Matrix keys = IntegerMatrix(5000, 19, 2, 1);
  const Matrix q = IntegerMatrix(40, 19, 2, 2);
  auto idx = MakeIndex(keys);
  for (int k : {1, 7, 100, 4096}) {
    std::vector<int64_t> ids(q.rows * k);
    std::vector<float> scores(q.rows * k);
    SearchStats stats;
    ASSERT_TRUE(idx->Search(q.view(), {.k = k}, ids, scores, &stats).ok());
    EXPECT_EQ(stats.queries, 40);
    EXPECT_EQ(stats.distance_computations, 40 * 5000);
    for (size_t i = 0; i < q.rows; ++i) {
      const auto want = OracleTopK(keys, q.row(i), k);
      for (int j = 0; j < k; ++j) {
        ASSERT_EQ(ids[i * k + j], want[j].second) << "query " << i << " rank " << j << " k " << k;
        ASSERT_EQ(scores[i * k + j], static_cast<float>(want[j].first));
      }
    }
  }
}

TEST(FlatIndexTest, RandomFloatsMatchOracleWithinRounding) {
  const Matrix keys = RandomMatrix(3000, 37, 3);
  const Matrix q = RandomMatrix(33, 37, 4);
  auto idx = MakeIndex(keys);
  const int k = 50;
  std::vector<int64_t> ids(q.rows * k);
  std::vector<float> scores(q.rows * k);
  ASSERT_TRUE(idx->Search(q.view(), {.k = k}, ids, scores).ok());
  for (size_t i = 0; i < q.rows; ++i) {
    const auto want = OracleTopK(keys, q.row(i), k);
    std::vector<int64_t> got(ids.begin() + i * k, ids.begin() + (i + 1) * k);
    for (int j = 0; j < k; ++j) {
      EXPECT_NEAR(scores[i * k + j], want[j].first, 1e-4) << "query " << i << " rank " << j;
      if (j > 0) {
        EXPECT_GE(scores[i * k + j - 1], scores[i * k + j]);
      }
    }
    std::sort(got.begin(), got.end());
    EXPECT_TRUE(std::adjacent_find(got.begin(), got.end()) == got.end()) << "duplicate ids";
    // Same set unless two oracle scores are within rounding of the k-th.
    std::vector<int64_t> want_ids;
    for (const auto& w : want) want_ids.push_back(w.second);
    std::sort(want_ids.begin(), want_ids.end());
    EXPECT_EQ(got, want_ids) << "query " << i;
  }
}

TEST(FlatIndexTest, ParallelEqualsSerialAndExactTopK) {
  const Matrix keys = RandomMatrix(40000, 64, 5);
  auto idx = MakeIndex(keys);
  ThreadPool pool(3);
  const int k = 100;
  for (size_t nq : {1, 3, 70}) {  // few queries: key-range split; many: query blocks
    const Matrix q = RandomMatrix(nq, 64, 6 + nq);
    std::vector<int64_t> a(nq * k), b(nq * k), c(nq * k);
    std::vector<float> sa(nq * k), sb(nq * k), sc(nq * k);
    ASSERT_TRUE(idx->Search(q.view(), {.k = k}, a, sa).ok());
    SearchStats stats;
    ASSERT_TRUE(idx->SearchParallel(q.view(), {.k = k}, b, sb, &pool, &stats).ok());
    EXPECT_EQ(stats.distance_computations, static_cast<int64_t>(nq * 40000));
    ASSERT_TRUE(ExactTopK(keys.view(), q.view(), k, c, sc, &pool).ok());
    EXPECT_EQ(a, b) << nq;
    EXPECT_EQ(sa, sb) << nq;
    EXPECT_EQ(a, c) << nq;
    EXPECT_EQ(sa, sc) << nq;
  }
}

TEST(FlatIndexTest, AddAppendsSearchableKeys) {
  auto idx = MakeIndex(RandomMatrix(100, 8, 7));
  Matrix extra(1, 8);
  std::fill(extra.data.begin(), extra.data.end(), 100.0f);
  ASSERT_TRUE(idx->Add(extra.view()).ok());
  EXPECT_EQ(idx->size(), 101u);
  Matrix q(1, 8);
  std::fill(q.data.begin(), q.data.end(), 1.0f);
  std::vector<int64_t> ids(1);
  std::vector<float> scores(1);
  ASSERT_TRUE(idx->Search(q.view(), {.k = 1}, ids, scores).ok());
  EXPECT_EQ(ids[0], 100);
  EXPECT_FLOAT_EQ(scores[0], 800.0f);
  EXPECT_EQ(idx->keys().rows(), 101u);
  EXPECT_GE(idx->MemoryBytes(), 101 * 8 * sizeof(float));
}

void ExpectInvalid(const absl::Status& s, const std::string& fragment) {
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_NE(s.message().find(fragment), std::string::npos) << s;
}

TEST(FlatIndexTest, BadInputIsInvalidArgument) {
  EXPECT_FALSE(FlatIndex::Create(0).ok());
  auto empty = FlatIndex::Create(4);
  ASSERT_TRUE(empty.ok());
  Matrix q(2, 4);
  std::vector<int64_t> ids(200);
  std::vector<float> scores(200);
  ExpectInvalid((*empty)->Search(q.view(), {.k = 1}, ids, scores), "empty");

  auto idx = MakeIndex(RandomMatrix(10, 4, 8));
  Matrix q3(2, 3);
  ExpectInvalid(idx->Search(q3.view(), {.k = 1}, ids, scores), "query dim 3 != flat index dim 4");
  ExpectInvalid(idx->Search(q.view(), {.k = 0}, ids, scores), "k=0 outside [1, 4096]");
  ExpectInvalid(idx->Search(q.view(), {.k = 11}, ids, scores), "k=11 exceeds");
  ExpectInvalid(idx->Search(q.view(), {.k = 5000}, ids, scores), "outside [1, 4096]");
  ExpectInvalid(idx->Search(q.view(), {.k = 5}, std::span<int64_t>(ids).first(9), scores),
                "need 10");
  ExpectInvalid(idx->Search(q.view(), {.k = 5}, ids, std::span<float>(scores).first(3)),
                "need 10");
  q.row(1)[2] = NAN;
  ExpectInvalid(idx->Search(q.view(), {.k = 1}, ids, scores), "queries row 1 col 2 is NaN");
  q.row(1)[2] = 0;
  q.row(0)[3] = -INFINITY;
  ExpectInvalid(idx->Search(q.view(), {.k = 1}, ids, scores), "queries row 0 col 3 is Inf");
  ThreadPool pool(1);
  ExpectInvalid(idx->SearchParallel(q.view(), {.k = 1}, ids, scores, &pool), "Inf");

  Matrix bad_keys(2, 4);
  bad_keys.row(1)[0] = NAN;
  ExpectInvalid(idx->Add(bad_keys.view()), "keys row 1 col 0 is NaN");
  Matrix wrong_dim(2, 5);
  ExpectInvalid(idx->Add(wrong_dim.view()), "dim 5");
  EXPECT_EQ(idx->size(), 10u);  // failed adds change nothing
  ExpectInvalid(ExactTopK(idx->keys(), q3.view(), 1, ids, scores, nullptr), "query dim");
}

TEST(FlatIndexTest, ZeroQueriesIsOk) {
  auto idx = MakeIndex(RandomMatrix(10, 4, 9));
  Matrix q(0, 4);
  EXPECT_TRUE(idx->Search(q.view(), {.k = 3}, {}, {}).ok());
}

}  // namespace
}  // namespace kvr::index
