// Training top-k at prefill speed (common/train_topk.h) and the blocked exact
// scan behind it (common/exact_topk.h, simd dot_batch_multi):
//  * dot_batch_multi is bit-identical to one dot_batch per query in every
//    kernel table this CPU has (odd counts, tails, strided rows);
//  * ExactTopK equals a double-precision sort oracle, ties included (larger
//    score, then smaller id), with and without a pool;
//  * TrainingTopK's rows are ExactTopK's rows of the sampled queries, bit for
//    bit; the sample is deterministic, one row per stratum, spread over
//    positions and query heads, and bounded by max_queries;
//  * hostile options and outputs get InvalidArgument naming field and limit.
#include "common/train_topk.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "common/exact_topk.h"
#include "common/simd/kernels.h"
#include "common/tensor.h"
#include "common/thread_pool.h"
#include "tests/support/test_data.h"

namespace kvr {
namespace {

// Seeded N(0, 1) rows of cols + stride_pad floats (a strided view uses the
// first cols).
Matrix RandomMatrix(size_t rows, size_t cols, uint32_t seed, size_t stride_pad = 0) {
  return test_support::RandomMatrix(rows, cols + stride_pad, seed);
}

// Small integers: every float dot product of them is exact, so scores tie
// exactly whenever the integer sums tie.
Matrix IntegerMatrix(size_t rows, size_t cols, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> dist(-2, 2);
  Matrix m(rows, cols);
  for (float& x : m.data) x = static_cast<float>(dist(rng));
  return m;
}

// Exact top-k by a double-precision dot and a full sort (larger score first,
// then smaller id).
std::vector<int64_t> OracleTopK(ConstMatrixView keys, const float* q, size_t k,
                                std::vector<double>* scores = nullptr) {
  std::vector<std::pair<double, int64_t>> all(keys.rows());
  for (size_t i = 0; i < keys.rows(); ++i) {
    double s = 0;
    for (size_t j = 0; j < keys.cols(); ++j) s += double(q[j]) * double(keys.row(i)[j]);
    all[i] = {s, static_cast<int64_t>(i)};
  }
  std::sort(all.begin(), all.end(), [](const auto& a, const auto& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  });
  std::vector<int64_t> ids(k);
  if (scores != nullptr) scores->resize(k);
  for (size_t i = 0; i < k; ++i) {
    ids[i] = all[i].second;
    if (scores != nullptr) (*scores)[i] = all[i].first;
  }
  return ids;
}

TEST(DotBatchMulti, BitIdenticalToDotBatchInEveryTable) {
  const simd::Isa isas[] = {simd::Isa::kScalar, simd::Isa::kAvx2, simd::Isa::kAvx512};
  int tables = 0;
  for (simd::Isa isa : isas) {
    const simd::Kernels* kern = simd::ForIsa(isa);
    if (kern == nullptr) {
      std::printf("table %d not available on this CPU: skipped\n", static_cast<int>(isa));
      continue;
    }
    ++tables;
    for (size_t d : {1, 7, 16, 33, 64, 100, 128, 130}) {
      for (size_t nq : {1, 2, 3, 5, 32}) {
        for (size_t n : {1, 2, 3, 4, 5, 15, 16, 17, 37, 515}) {
          const Matrix q = RandomMatrix(nq, d, 7 + uint32_t(d * 31 + nq), /*stride_pad=*/3);
          const Matrix rows = RandomMatrix(n, d, 11 + uint32_t(n), /*stride_pad=*/5);
          const size_t out_stride = n + 2;
          std::vector<float> got(nq * out_stride, -7.0f), want(nq * out_stride, -7.0f);
          kern->dot_batch_multi(q.data.data(), nq, q.cols, rows.data.data(), n, d, rows.cols,
                                got.data(), out_stride);
          for (size_t j = 0; j < nq; ++j) {
            kern->dot_batch(q.row(j), rows.data.data(), n, d, rows.cols,
                            want.data() + j * out_stride);
          }
          ASSERT_EQ(0, std::memcmp(got.data(), want.data(), got.size() * sizeof(float)))
              << kern->name << " d=" << d << " nq=" << nq << " n=" << n;
        }
      }
    }
  }
  EXPECT_GE(tables, 1);
}

TEST(ExactTopK, EqualsDoublePrecisionOracleWithTies) {
  // d 8 of values in [-2, 2]: scores in [-32, 32], thousands of exact ties.
  const Matrix keys = IntegerMatrix(3000, 8, 1);
  const Matrix queries = IntegerMatrix(70, 8, 2);
  ThreadPool pool(2);
  for (ThreadPool* p : {static_cast<ThreadPool*>(nullptr), &pool}) {
    for (int k : {1, 10, 100}) {
      std::vector<int64_t> ids(queries.rows * k);
      std::vector<float> scores(ids.size());
      ASSERT_TRUE(ExactTopK(keys.view(), queries.view(), k, ids, scores, p).ok());
      for (size_t i = 0; i < queries.rows; ++i) {
        std::vector<double> want_scores;
        const std::vector<int64_t> want =
            OracleTopK(keys.view(), queries.row(i), size_t(k), &want_scores);
        for (int j = 0; j < k; ++j) {
          ASSERT_EQ(ids[i * k + j], want[j]) << "query " << i << " rank " << j << " k=" << k;
          ASSERT_EQ(double(scores[i * k + j]), want_scores[j]);
        }
      }
    }
  }
}

TEST(ExactTopK, RandomFloatsWithinRoundingOfOracle) {
  const Matrix keys = RandomMatrix(5000, 128, 3);
  const Matrix queries = RandomMatrix(40, 128, 4);
  const int k = 50;
  std::vector<int64_t> ids(queries.rows * k);
  std::vector<float> scores(ids.size());
  ASSERT_TRUE(ExactTopK(keys.view(), queries.view(), k, ids, scores, nullptr).ok());
  size_t same = 0;
  for (size_t i = 0; i < queries.rows; ++i) {
    std::vector<double> want_scores;
    const std::vector<int64_t> want =
        OracleTopK(keys.view(), queries.row(i), size_t(k), &want_scores);
    for (int j = 0; j < k; ++j) {
      // Float rounding of a 128-term sum: |error| <= 1e-4 here.
      ASSERT_NEAR(scores[i * k + j], want_scores[j], 1e-4) << "query " << i << " rank " << j;
      same += ids[i * k + j] == want[j];
    }
  }
  // Only near-ties (closer than rounding) may swap.
  EXPECT_GE(same, queries.rows * k * 99 / 100);
}

TEST(TrainingQuerySample, OnePerStratumDeterministicAndSpread) {
  TrainingTopKOptions o;
  o.max_queries = 1000;
  const size_t group = 4, positions = 8192, rows = positions * group;
  const std::vector<size_t> s = TrainingQuerySample(rows, o);
  ASSERT_EQ(s.size(), 1000u);
  EXPECT_EQ(s, TrainingQuerySample(rows, o));
  std::vector<size_t> per_head(group, 0);
  for (size_t i = 0; i < s.size(); ++i) {
    ASSERT_GE(s[i], i * rows / 1000) << i;
    ASSERT_LT(s[i], (i + 1) * rows / 1000) << i;
    ++per_head[s[i] % group];
  }
  // Every query head gets about a quarter (a fixed stride would give one head all).
  for (size_t h = 0; h < group; ++h) {
    EXPECT_GT(per_head[h], 180u) << "head " << h;
    EXPECT_LT(per_head[h], 320u) << "head " << h;
  }
  // Every eighth of the positions holds an eighth of the sample.
  for (size_t part = 0; part < 8; ++part) {
    const auto in = std::count_if(s.begin(), s.end(), [&](size_t r) {
      return r / group * 8 / positions == part;
    });
    EXPECT_EQ(in, 125) << "part " << part;
  }
  TrainingTopKOptions other = o;
  other.seed = o.seed + 1;
  EXPECT_NE(s, TrainingQuerySample(rows, other));
  // Few rows, or max_queries 0: every row, in order.
  std::vector<size_t> all(900);
  std::iota(all.begin(), all.end(), size_t{0});
  EXPECT_EQ(TrainingQuerySample(900, o), all);
  o.max_queries = 0;
  EXPECT_EQ(TrainingQuerySample(900, o), all);
  EXPECT_EQ(TrainingQueryCount(rows, o), rows);
}

TEST(TrainingTopK, RowsAreExactTopKOfTheSampledQueries) {
  const Matrix keys = RandomMatrix(4000, 64, 5);
  const Matrix queries = RandomMatrix(3000, 64, 6);
  const int k = 32;
  TrainingTopKOptions o;
  o.max_queries = 500;
  ThreadPool pool(2);
  for (ThreadPool* p : {static_cast<ThreadPool*>(nullptr), &pool}) {
    std::vector<int64_t> ids(500 * k);
    std::vector<float> scores(ids.size());
    std::vector<size_t> sample;
    ASSERT_TRUE(TrainingTopK(keys.view(), queries.view(), k, o, p, ids, scores, &sample).ok());
    ASSERT_EQ(sample, TrainingQuerySample(queries.rows, o));
    std::vector<int64_t> want_ids(k);
    std::vector<float> want_scores(k);
    for (size_t i = 0; i < sample.size(); ++i) {
      const ConstMatrixView one(queries.row(sample[i]), 1, 64);
      ASSERT_TRUE(ExactTopK(keys.view(), one, k, want_ids, want_scores, nullptr).ok());
      ASSERT_TRUE(std::equal(want_ids.begin(), want_ids.end(), ids.begin() + i * k)) << i;
      ASSERT_EQ(0, std::memcmp(want_scores.data(), scores.data() + i * k, k * sizeof(float)));
    }
  }
}

TEST(TrainingTopK, FewQueriesAreAllKeptAndEqualExactTopK) {
  const Matrix keys = RandomMatrix(700, 32, 8);
  const Matrix queries = RandomMatrix(100, 32, 9);
  const int k = 16;
  std::vector<int64_t> ids(100 * k), want_ids(ids.size());
  std::vector<float> scores(ids.size()), want_scores(ids.size());
  ASSERT_TRUE(TrainingTopK(keys.view(), queries.view(), k, {}, nullptr, ids, scores).ok());
  ASSERT_TRUE(ExactTopK(keys.view(), queries.view(), k, want_ids, want_scores, nullptr).ok());
  EXPECT_EQ(ids, want_ids);
  EXPECT_EQ(0, std::memcmp(scores.data(), want_scores.data(), scores.size() * sizeof(float)));
}

TEST(TrainingTopK, HostileArgumentsNameFieldAndLimit) {
  const Matrix keys = RandomMatrix(100, 16, 10);
  Matrix queries = RandomMatrix(50, 16, 11);
  std::vector<int64_t> ids(50 * 8);
  std::vector<float> scores(ids.size());
  TrainingTopKOptions o;
  o.max_queries = kMaxTrainingQueries + 1;
  absl::Status st = TrainingTopK(keys.view(), queries.view(), 8, o, nullptr, ids, scores);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("max_queries"), std::string::npos) << st;
  EXPECT_NE(st.message().find(std::to_string(kMaxTrainingQueries)), std::string::npos) << st;

  o.max_queries = 20;
  std::vector<int64_t> small_ids(20 * 8 - 1);
  st = TrainingTopK(keys.view(), queries.view(), 8, o, nullptr, small_ids, scores);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("need 160"), std::string::npos) << st;

  st = TrainingTopK(keys.view(), queries.view(), 101, o, nullptr, ids, scores);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("k=101"), std::string::npos) << st;

  const Matrix wrong_dim = RandomMatrix(50, 15, 12);
  st = TrainingTopK(keys.view(), wrong_dim.view(), 8, o, nullptr, ids, scores);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("query dim 15"), std::string::npos) << st;

  // A NaN in a sampled row is rejected; one in a row never read is not.
  const std::vector<size_t> sample = TrainingQuerySample(50, o);
  queries.row(sample[3])[2] = std::nanf("");
  st = TrainingTopK(keys.view(), queries.view(), 8, o, nullptr, ids, scores);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("training queries row 3 col 2 is NaN"), std::string::npos) << st;
}

}  // namespace
}  // namespace kvr
