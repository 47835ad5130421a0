// TrainingTopK's approximate mode (common/train_topk.h, issue 17 item 5; the
// worker's --train_topk=approx):
//  * on every attention data family, each sampled query's approx list
//    recovers at least a stated fraction of its exact list (mean over the
//    queries, per family; the floors are the measured values minus a margin),
//    every returned score is the exact inner product of its key, ids are
//    unique and best first (larger score, then smaller id);
//  * the approximate mode is deterministic and does not depend on the pool;
//  * exact mode is unchanged by the approx knobs (ExactTopK's rows), and
//    approx falls back to the exact scan below approx_min_keys and when the
//    candidates would be every key; with every key equal (all scores tie)
//    approx returns the exact tie order;
//  * hostile options get InvalidArgument naming the option and its limit.
#include "common/train_topk.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "common/exact_topk.h"
#include "common/simd/kernels.h"
#include "common/tensor.h"
#include "common/thread_pool.h"
#include "tests/support/test_data.h"
#include "tools/attention_data.h"

namespace kvr {
namespace {

constexpr size_t kKeys = 16384;
constexpr size_t kQueries = 16384;  // the worker's --max_train_queries default
constexpr int kK = 32;  // the worker's train_k

// Mean over rows of |approx row ∩ exact row| / k.
double MeanRecall(const std::vector<int64_t>& exact, const std::vector<int64_t>& approx,
                  size_t k) {
  const size_t rows = exact.size() / k;
  double sum = 0;
  for (size_t i = 0; i < rows; ++i) {
    std::vector<int64_t> a(exact.begin() + i * k, exact.begin() + (i + 1) * k);
    std::vector<int64_t> b(approx.begin() + i * k, approx.begin() + (i + 1) * k);
    std::sort(a.begin(), a.end());
    std::sort(b.begin(), b.end());
    std::vector<int64_t> both;
    std::set_intersection(a.begin(), a.end(), b.begin(), b.end(), std::back_inserter(both));
    sum += double(both.size()) / double(k);
  }
  return sum / double(rows);
}

TrainingTopKOptions Approx() {
  TrainingTopKOptions o;
  o.max_queries = 0;
  o.mode = TrainingTopKMode::kApprox;
  o.approx_min_keys = 0;  // the test's key sets are small
  return o;
}

struct FamilyFloor {
  const char* family;
  double floor;  // mean recall of the approx lists vs the exact lists
};

// Measured with the default knobs at 16,384 keys (one worker chunk) and
// 16,384 queries, k 32: topical 0.937, lowrank 0.989, flat 0.751,
// positional 1.000, sink 0.948; floors about 0.02 below.
constexpr FamilyFloor kFloors[] = {
    {"topical", 0.91}, {"lowrank", 0.97}, {"flat", 0.73}, {"positional", 0.98}, {"sink", 0.92},
};

TEST(TrainTopKApproxTest, RecallFloorAndExactScoresOnEveryFamily) {
  ThreadPool pool(1);
  ASSERT_EQ(std::size(kFloors), AttentionFamilyNames().size());
  for (const FamilyFloor& f : kFloors) {
    SCOPED_TRACE(f.family);
    AttentionDataOptions o;
    o.family = f.family;
    o.n_keys = kKeys;
    o.n_train = kQueries;
    o.n_test = 1;
    auto data = GenerateAttentionData(o, &pool);
    ASSERT_TRUE(data.ok()) << data.status();
    const ConstMatrixView keys = data->keys.view(), queries = data->train_queries.view();
    const size_t ku = kK;
    std::vector<int64_t> exact(kQueries * ku), approx(kQueries * ku);
    std::vector<float> exact_scores(kQueries * ku), approx_scores(kQueries * ku);
    ASSERT_TRUE(ExactTopK(keys, queries, kK, exact, exact_scores, &pool).ok());
    ASSERT_TRUE(TrainingTopK(keys, queries, kK, Approx(), &pool, approx, approx_scores).ok());
    const double recall = MeanRecall(exact, approx, ku);
    std::printf("%s: approx recall vs exact %.4f (floor %.2f)\n", f.family, recall, f.floor);
    EXPECT_GE(recall, f.floor);
    if (std::string(f.family) == "topical") {
      EXPECT_LT(recall, 1.0) << "the approximate path did not run";
    }
    std::vector<float> one(1);
    for (size_t q = 0; q < kQueries; ++q) {
      const int64_t* ids = approx.data() + q * ku;
      const float* sc = approx_scores.data() + q * ku;
      std::vector<int64_t> sorted(ids, ids + ku);
      std::sort(sorted.begin(), sorted.end());
      ASSERT_TRUE(std::adjacent_find(sorted.begin(), sorted.end()) == sorted.end()) << q;
      for (size_t j = 0; j < ku; ++j) {
        ASSERT_GE(ids[j], 0);
        ASSERT_LT(ids[j], static_cast<int64_t>(kKeys));
        simd::Active().dot_batch(queries.row(q), keys.row(static_cast<size_t>(ids[j])), 1,
                                 keys.cols(), keys.stride(), one.data());
        ASSERT_EQ(sc[j], one[0]) << "query " << q << " rank " << j;
        if (j > 0) {
          ASSERT_TRUE(sc[j - 1] > sc[j] || (sc[j - 1] == sc[j] && ids[j - 1] < ids[j]))
              << "query " << q << " rank " << j;
        }
      }
      // The exact best key scores at least as high as anything approx found.
      ASSERT_GE(exact_scores[q * ku], sc[0]);
    }
  }
}

TEST(TrainTopKApproxTest, DeterministicWithAndWithoutPool) {
  AttentionDataOptions o;
  o.family = "topical";
  o.n_keys = kKeys;
  o.n_train = 1024;
  o.n_test = 1;
  ThreadPool pool(3);
  auto data = GenerateAttentionData(o, &pool);
  ASSERT_TRUE(data.ok()) << data.status();
  const size_t n = 1024 * kK;
  std::vector<int64_t> a(n), b(n);
  std::vector<float> as(n), bs(n);
  ASSERT_TRUE(TrainingTopK(data->keys.view(), data->train_queries.view(), kK, Approx(), nullptr,
                           a, as).ok());
  ASSERT_TRUE(TrainingTopK(data->keys.view(), data->train_queries.view(), kK, Approx(), &pool, b,
                           bs).ok());
  EXPECT_EQ(a, b);
  EXPECT_EQ(as, bs);
}

// Exact mode ignores the approx knobs; approx runs the exact scan below
// approx_min_keys and when its candidates would be every key.
TEST(TrainTopKApproxTest, ExactModeAndFallbacksEqualExactTopK) {
  const Matrix keys = test_support::RandomMatrix(3000, 64, 11);
  const Matrix queries = test_support::RandomMatrix(700, 64, 12);
  const size_t k = 16, n = 700 * k;
  std::vector<int64_t> want(n), got(n);
  std::vector<float> want_s(n), got_s(n);
  ThreadPool pool(1);
  ASSERT_TRUE(ExactTopK(keys.view(), queries.view(), 16, want, want_s, &pool).ok());

  TrainingTopKOptions exact;
  exact.max_queries = 0;
  exact.approx_group_size = 3;
  exact.approx_candidate_fraction = 0.01;
  exact.approx_min_keys = 0;
  ASSERT_TRUE(TrainingTopK(keys.view(), queries.view(), 16, exact, &pool, got, got_s).ok());
  EXPECT_EQ(got, want);
  EXPECT_EQ(got_s, want_s);

  TrainingTopKOptions small = Approx();
  small.approx_candidate_fraction = 0.01;
  small.approx_min_keys = 3001;  // more than the keys: the exact scan
  ASSERT_TRUE(TrainingTopK(keys.view(), queries.view(), 16, small, &pool, got, got_s).ok());
  EXPECT_EQ(got, want);

  TrainingTopKOptions all = Approx();
  all.approx_candidate_fraction = 1.0;  // every key is a candidate: the exact scan
  ASSERT_TRUE(TrainingTopK(keys.view(), queries.view(), 16, all, &pool, got, got_s).ok());
  EXPECT_EQ(got, want);

  // Candidates rounded up to k: a tiny fraction still yields k ids per query.
  TrainingTopKOptions tiny = Approx();
  tiny.approx_candidate_fraction = 1e-9;
  ASSERT_TRUE(TrainingTopK(keys.view(), queries.view(), 16, tiny, &pool, got, got_s).ok());
  for (int64_t id : got) ASSERT_GE(id, 0);
}

// Every key equal: every score ties, so each group's candidate thresholds
// pass every key; candidates stay bounded (2x the expected count, in key
// order) and the result equals the exact one (ties by smaller id).
TEST(TrainTopKApproxTest, AllKeysEqualGivesTheExactTieOrder) {
  Matrix keys(8192, 16);
  for (size_t i = 0; i < keys.rows; ++i) {
    for (size_t j = 0; j < keys.cols; ++j) keys.row(i)[j] = 0.25f * static_cast<float>(j % 3);
  }
  const Matrix queries = test_support::RandomMatrix(300, 16, 5);
  const size_t k = 8, n = 300 * k;
  std::vector<int64_t> want(n), got(n);
  std::vector<float> want_s(n), got_s(n);
  ASSERT_TRUE(ExactTopK(keys.view(), queries.view(), 8, want, want_s, nullptr).ok());
  ASSERT_TRUE(TrainingTopK(keys.view(), queries.view(), 8, Approx(), nullptr, got, got_s).ok());
  EXPECT_EQ(got, want);
  EXPECT_EQ(got_s, want_s);
}

TEST(TrainTopKApproxTest, ModeNames) {
  EXPECT_EQ(ParseTrainingTopKMode("exact"), TrainingTopKMode::kExact);
  EXPECT_EQ(ParseTrainingTopKMode("approx"), TrainingTopKMode::kApprox);
  EXPECT_FALSE(ParseTrainingTopKMode("Approx").has_value());
  EXPECT_FALSE(ParseTrainingTopKMode("").has_value());
  EXPECT_STREQ(TrainingTopKModeName(TrainingTopKMode::kExact), "exact");
  EXPECT_STREQ(TrainingTopKModeName(TrainingTopKMode::kApprox), "approx");
}

TEST(TrainTopKApproxTest, HostileOptionsRejectedNamingTheOption) {
  const Matrix keys = test_support::RandomMatrix(256, 8, 1);
  const Matrix queries = test_support::RandomMatrix(16, 8, 2);
  std::vector<int64_t> ids(16 * 4);
  std::vector<float> scores(16 * 4);
  struct Case {
    TrainingTopKOptions options;
    std::string field;
    std::string limit;
  };
  std::vector<Case> cases;
  auto add = [&](auto mutate, std::string field, std::string limit) {
    TrainingTopKOptions o = Approx();
    mutate(o);
    cases.push_back({o, std::move(field), std::move(limit)});
  };
  add([](TrainingTopKOptions& o) { o.approx_group_size = 0; }, "approx_group_size",
      "[1, 65536]");
  add([](TrainingTopKOptions& o) { o.approx_group_size = kMaxApproxGroupSize + 1; },
      "approx_group_size", "[1, 65536]");
  add([](TrainingTopKOptions& o) { o.approx_candidate_fraction = 0; },
      "approx_candidate_fraction", "(0, 1]");
  add([](TrainingTopKOptions& o) { o.approx_candidate_fraction = -0.5; },
      "approx_candidate_fraction", "(0, 1]");
  add([](TrainingTopKOptions& o) { o.approx_candidate_fraction = 1.5; },
      "approx_candidate_fraction", "(0, 1]");
  add([](TrainingTopKOptions& o) {
        o.approx_candidate_fraction = std::numeric_limits<double>::quiet_NaN();
      },
      "approx_candidate_fraction", "(0, 1]");
  add([](TrainingTopKOptions& o) { o.approx_kmeans_iterations = -1; },
      "approx_kmeans_iterations", "[0, 32]");
  add([](TrainingTopKOptions& o) { o.approx_kmeans_iterations = 33; },
      "approx_kmeans_iterations", "[0, 32]");
  add([](TrainingTopKOptions& o) { o.approx_min_keys = kMaxTopKKeys + 1; }, "approx_min_keys",
      "2147483648]");
  add([](TrainingTopKOptions& o) { o.mode = static_cast<TrainingTopKMode>(7); },
      "mode (--train_topk)", "exact or approx");
  for (const Case& c : cases) {
    SCOPED_TRACE(c.field);
    const absl::Status v = ValidateTrainingTopKOptions(c.options);
    EXPECT_EQ(v.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(v.message().find(c.field), std::string::npos) << v.message();
    EXPECT_NE(v.message().find(c.limit), std::string::npos) << v.message();
    const absl::Status st =
        TrainingTopK(keys.view(), queries.view(), 4, c.options, nullptr, ids, scores);
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(st.message().find(c.field), std::string::npos) << st.message();
  }
}

}  // namespace
}  // namespace kvr
