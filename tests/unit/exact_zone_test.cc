// Session 27, issue 18 item 3: the exact zone of the remainder estimate
// (ClusterSummary::Estimate with index::ExactZoneOptions; kvr_node
// --exact_zone_keys_fraction), against a double-precision oracle:
//  * a zone that covers every cluster gives full attention (relative L2
//    error <= 1e-5 against the double softmax over all keys), with and
//    without the second-order term, and no key estimated;
//  * an empty zone (fraction 0, or a budget smaller than the best cluster)
//    is bit-identical to the estimate alone;
//  * no key counted twice: top-k keys that sit in the zone's cluster are
//    left out of the zone (keys_exact_zone = cluster size - k, output equal
//    to the oracle's exact cluster + pseudo-keys within 1e-5);
//  * the error is non-increasing in the budget (within 2e-3) on random
//    Gaussian data and the topical family; the mass fraction stops the zone
//    once its clusters hold that share of the estimated remainder mass;
//  * member lists partition the keys under appends and count in
//    MemoryBytes; hostile fractions are rejected naming the field, by
//    Attend and by NodeCore::Create; the node reports keys_exact_zone.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <vector>

#include "common/attention.h"
#include "retrieval_node/core/node_core.h"
#include "retrieval_node/index/attend.h"
#include "retrieval_node/index/cluster_summary.h"
#include "retrieval_node/index/flat_index.h"
#include "tests/support/estimate_node.h"
#include "tests/support/test_data.h"
#include "tools/attention_data.h"

namespace kvr::index {
namespace {

using test_support::RandomMatrix;

// Full softmax attention of q over every key, in double.
std::vector<double> FullOracle(const float* q, const Matrix& keys, const Matrix& vals,
                               double scale) {
  std::vector<double> s(keys.rows);
  double mx = -INFINITY;
  for (size_t i = 0; i < keys.rows; ++i) {
    double dot = 0;
    for (size_t t = 0; t < keys.cols; ++t) dot += double(q[t]) * keys.row(i)[t];
    s[i] = dot * scale;
    mx = std::max(mx, s[i]);
  }
  std::vector<double> o(vals.cols, 0.0);
  double l = 0;
  for (size_t i = 0; i < keys.rows; ++i) {
    const double w = std::exp(s[i] - mx);
    l += w;
    for (size_t t = 0; t < vals.cols; ++t) o[t] += w * vals.row(i)[t];
  }
  for (double& x : o) x /= l;
  return o;
}

double RelErr(const float* got, const std::vector<double>& want) {
  double num = 0, den = 0;
  for (size_t t = 0; t < want.size(); ++t) {
    num += (got[t] - want[t]) * (got[t] - want[t]);
    den += want[t] * want[t];
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

struct Shard {
  Matrix keys, vals;
  ValueMatrix values;
  std::unique_ptr<FlatIndex> flat;
  ClusterSummary summary;
};

Shard MakeShard(Matrix keys, Matrix vals, size_t clusters, bool second_order) {
  Shard sh;
  sh.keys = std::move(keys);
  sh.vals = std::move(vals);
  sh.values = ValueMatrix::FromFloat(DType::kF32, sh.vals.view());
  auto flat = FlatIndex::Create(sh.keys.cols);
  KVR_CHECK(flat.ok());
  sh.flat = std::move(*flat);
  KVR_CHECK(sh.flat->Add(sh.keys.view()).ok());
  ClusterSummaryOptions co;
  co.clusters = clusters;
  co.second_order = second_order;
  auto s = ClusterSummary::Build(sh.keys.view(), sh.values, co, nullptr);
  KVR_CHECK(s.ok());
  sh.summary = std::move(*s);
  return sh;
}

// Attends every query (one at a time) with top-k + estimate + `zone`.
Partials AttendAll(const Shard& sh, const Matrix& q, int k, ExactZoneOptions zone,
                   EstimateStats* stats) {
  AttendParams p;
  p.search.k = k;
  p.scale = 1.0f / std::sqrt(static_cast<float>(sh.keys.cols));
  p.estimate = &sh.summary;
  p.zone = zone;
  AttendScratch scratch;
  Partials out(q.rows, sh.vals.cols);
  for (size_t i = 0; i < q.rows; ++i) {
    const absl::Status st = Attend(q.view().rows_slice(i, 1), *sh.flat, sh.values, p,
                                   out.view().slice(i, 1), &scratch, nullptr, stats);
    KVR_CHECK(st.ok());
  }
  return out;
}

double MeanErrVsFull(const Shard& sh, const Matrix& q, const Partials& got) {
  const double scale = 1.0 / std::sqrt(static_cast<double>(sh.keys.cols));
  double sum = 0;
  for (size_t i = 0; i < q.rows; ++i) {
    sum += RelErr(got.o.row(i), FullOracle(q.row(i), sh.keys, sh.vals, scale));
  }
  return sum / static_cast<double>(q.rows);
}

TEST(ExactZoneTest, ZoneOverEveryClusterIsFullAttention) {
  constexpr size_t kN = 2048, kD = 32;
  constexpr int kK = 16;
  const Matrix q = RandomMatrix(8, kD, 3, 0.3f);
  for (const bool second_order : {false, true}) {
    const Shard sh = MakeShard(RandomMatrix(kN, kD, 1, 0.3f), RandomMatrix(kN, kD, 2), 32,
                               second_order);
    EstimateStats stats;
    const Partials got = AttendAll(sh, q, kK, {.keys_fraction = 1.0}, &stats);
    const double err = MeanErrVsFull(sh, q, got);
    std::printf("second_order %d: zone over all clusters, error vs full %.3g\n", second_order,
                err);
    EXPECT_LE(err, 1e-5) << "second_order " << second_order;
    EXPECT_EQ(stats.keys_exact_zone, static_cast<int64_t>((kN - kK) * q.rows));
    EXPECT_EQ(stats.keys_estimated, 0);
    EXPECT_EQ(stats.clusters_estimated, 0);
    // Estimation alone is far from it on the same data.
    EstimateStats est_stats;
    const Partials est = AttendAll(sh, q, kK, {}, &est_stats);
    EXPECT_GT(MeanErrVsFull(sh, q, est), 100 * std::max(err, 1e-7));
    EXPECT_EQ(est_stats.keys_exact_zone, 0);
  }
}

TEST(ExactZoneTest, EmptyZoneIsBitIdenticalToTheEstimate) {
  constexpr size_t kN = 4096, kD = 32;
  const Shard sh = MakeShard(RandomMatrix(kN, kD, 4, 0.2f), RandomMatrix(kN, kD, 5), 64, false);
  const Matrix q = RandomMatrix(16, kD, 6, 0.2f);
  EstimateStats base_stats;
  const Partials base = AttendAll(sh, q, 16, {}, &base_stats);
  // Fraction 0; a budget of 0 keys (fraction < 1/n); a budget of one key,
  // smaller than any cluster (64 clusters of 4096 keys: none holds 1 key).
  size_t smallest = kN;
  for (size_t c = 0; c < sh.summary.clusters(); ++c) {
    smallest = std::min<size_t>(smallest, static_cast<size_t>(sh.summary.count(c)));
  }
  ASSERT_GT(smallest, 16u + 1u);  // even after top-k took 16 keys from it
  for (const double f : {0.0, 0.5 / kN, 1.5 / kN}) {
    EstimateStats stats;
    const Partials got = AttendAll(sh, q, 16, {.keys_fraction = f}, &stats);
    test_support::ExpectSamePartials(got, base, "zone fraction " + std::to_string(f));
    EXPECT_EQ(stats.keys_exact_zone, 0) << f;
    EXPECT_EQ(stats.keys_estimated, base_stats.keys_estimated) << f;
    EXPECT_EQ(stats.clusters_estimated, base_stats.clusters_estimated) << f;
  }
}

TEST(ExactZoneTest, TopKKeysInTheZoneClusterAreNotCountedTwice) {
  // 8 tight, well separated groups of 64 keys; the query points at group
  // 0, so top-16 are all group 0 keys and group 0's cluster has the most
  // estimated mass. The budget fits exactly its 48 keys left.
  constexpr size_t kGroups = 8, kPer = 64, kN = kGroups * kPer, kD = 16;
  constexpr int kK = 16;
  const Matrix centers = RandomMatrix(kGroups, kD, 7);
  const Matrix noise = RandomMatrix(kN, kD, 8);
  Matrix keys(kN, kD);
  for (size_t i = 0; i < kN; ++i) {
    const float* c = centers.row(i / kPer);
    double norm = 0;
    for (size_t t = 0; t < kD; ++t) norm += double(c[t]) * c[t];
    for (size_t t = 0; t < kD; ++t) {
      keys.row(i)[t] = static_cast<float>(4.0 * c[t] / std::sqrt(norm)) + 0.05f * noise.row(i)[t];
    }
  }
  Matrix q(1, kD);
  {
    double norm = 0;
    for (size_t t = 0; t < kD; ++t) norm += double(centers.row(0)[t]) * centers.row(0)[t];
    for (size_t t = 0; t < kD; ++t) {
      q.row(0)[t] = static_cast<float>(3.0 * centers.row(0)[t] / std::sqrt(norm));
    }
  }
  const Shard sh = MakeShard(std::move(keys), RandomMatrix(kN, kD, 9), kGroups, false);
  // The cluster of group 0 holds exactly group 0 (k-means separated them).
  const uint32_t c0 = sh.summary.assignment(0);
  ASSERT_EQ(sh.summary.count(c0), static_cast<int64_t>(kPer));
  for (size_t i = 0; i < kPer; ++i) ASSERT_EQ(sh.summary.assignment(i), c0);
  // Top-k is inside group 0.
  std::vector<int64_t> ids(kK);
  std::vector<float> scores(kK);
  ASSERT_TRUE(sh.flat->Search(q.view(), {.k = kK}, ids, scores, nullptr).ok());
  for (const int64_t id : ids) ASSERT_LT(id, static_cast<int64_t>(kPer));

  EstimateStats stats;
  const double fraction = (static_cast<double>(kPer - kK) + 0.5) / static_cast<double>(kN);
  const Partials got = AttendAll(sh, q, kK, {.keys_fraction = fraction}, &stats);
  EXPECT_EQ(stats.keys_exact_zone, static_cast<int64_t>(kPer - kK));
  EXPECT_EQ(stats.clusters_exact_zone, 1);
  EXPECT_EQ(stats.keys_estimated, static_cast<int64_t>(kN - kPer));

  // Oracle: group 0 exactly (its 64 keys, once each) + one first-order
  // pseudo-key (mean key, mean value, + ln n) per other cluster, in double.
  const double scale = 1.0 / std::sqrt(static_cast<double>(kD));
  std::vector<double> score;
  std::vector<std::vector<double>> value;
  for (size_t i = 0; i < kPer; ++i) {
    double dot = 0;
    for (size_t t = 0; t < kD; ++t) dot += double(q.row(0)[t]) * sh.keys.row(i)[t];
    score.push_back(dot * scale);
    value.emplace_back(sh.vals.row(i), sh.vals.row(i) + kD);
  }
  for (size_t c = 0; c < sh.summary.clusters(); ++c) {
    if (c == c0 || sh.summary.count(c) == 0) continue;
    std::vector<double> mk(kD, 0.0), mv(kD, 0.0);
    double n = 0;
    for (size_t i = 0; i < kN; ++i) {
      if (sh.summary.assignment(i) != c) continue;
      n += 1;
      for (size_t t = 0; t < kD; ++t) mk[t] += sh.keys.row(i)[t];
      for (size_t t = 0; t < kD; ++t) mv[t] += sh.vals.row(i)[t];
    }
    double dot = 0;
    for (size_t t = 0; t < kD; ++t) dot += double(q.row(0)[t]) * mk[t] / n;
    for (double& x : mv) x /= n;
    score.push_back(dot * scale + std::log(n));
    value.push_back(mv);
  }
  const double mx = *std::max_element(score.begin(), score.end());
  std::vector<double> want(kD, 0.0);
  double l = 0;
  for (size_t j = 0; j < score.size(); ++j) {
    const double w = std::exp(score[j] - mx);
    l += w;
    for (size_t t = 0; t < kD; ++t) want[t] += w * value[j][t];
  }
  for (double& x : want) x /= l;
  const double err = RelErr(got.o.row(0), want);
  std::printf("top-k inside the zone cluster: error vs oracle %.3g\n", err);
  EXPECT_LE(err, 1e-5);
  // Counting the 16 top-k keys twice would move the output by far more.
  std::vector<double> twice = want;
  {
    double l2 = l;
    std::vector<double> acc(kD);
    for (size_t t = 0; t < kD; ++t) acc[t] = want[t] * l;
    for (const int64_t id : ids) {
      const double w = std::exp(score[static_cast<size_t>(id)] - mx);
      l2 += w;
      for (size_t t = 0; t < kD; ++t) acc[t] += w * sh.vals.row(static_cast<size_t>(id))[t];
    }
    for (size_t t = 0; t < kD; ++t) twice[t] = acc[t] / l2;
  }
  EXPECT_GT(RelErr(got.o.row(0), twice), 1000 * std::max(err, 1e-9));
}

// Mean error against full attention at each budget; asserts it does not
// grow with the budget (2e-3 slack for the estimate of the clusters a
// larger zone leaves out) and vanishes at 1.
void ExpectNonIncreasing(const Shard& sh, const Matrix& q, int k, const char* what) {
  const std::vector<double> fractions = {0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0};
  std::vector<double> err;
  for (const double f : fractions) {
    EstimateStats stats;
    err.push_back(MeanErrVsFull(sh, q, AttendAll(sh, q, k, {.keys_fraction = f}, &stats)));
    std::printf("%s: zone %.3f error %.5f (zone keys/query %.1f)\n", what, f, err.back(),
                double(stats.keys_exact_zone) / double(q.rows));
  }
  for (size_t i = 1; i < err.size(); ++i) {
    EXPECT_LE(err[i], err[i - 1] + 2e-3) << what << ": fraction " << fractions[i];
  }
  EXPECT_LT(err[6], 0.8 * err[0]) << what;  // 20% of the keys help
  EXPECT_LE(err.back(), 1e-5) << what;
}

TEST(ExactZoneTest, ErrorIsNonIncreasingInTheBudget) {
  constexpr size_t kN = 8192, kD = 32;
  const Shard gaussian =
      MakeShard(RandomMatrix(kN, kD, 10, 0.3f), RandomMatrix(kN, kD, 11), 64, false);
  ExpectNonIncreasing(gaussian, RandomMatrix(24, kD, 12, 0.3f), 32, "gaussian");

  AttentionDataOptions opt;
  opt.family = "topical";
  opt.n_keys = kN;
  opt.n_train = 64;
  opt.n_test = 24;
  opt.dim = 64;
  auto data = GenerateAttentionData(opt);
  ASSERT_TRUE(data.ok()) << data.status();
  const Shard topical = MakeShard(std::move(data->keys), std::move(data->values), 64, true);
  ExpectNonIncreasing(topical, data->test_queries, 32, "topical e2");
}

TEST(ExactZoneTest, MassFractionStopsOnceTheZoneHoldsIt) {
  constexpr size_t kN = 2048, kD = 32;
  const Shard sh = MakeShard(RandomMatrix(kN, kD, 18, 0.3f), RandomMatrix(kN, kD, 19), 32, false);
  const Matrix q = RandomMatrix(8, kD, 20, 0.3f);
  // A tiny share: the best cluster alone already holds it.
  EstimateStats one;
  AttendAll(sh, q, 16, {.keys_fraction = 1.0, .mass_fraction = 1e-9}, &one);
  EXPECT_EQ(one.clusters_exact_zone, static_cast<int64_t>(q.rows));
  // Half the mass: more than one cluster on average, fewer keys than all.
  EstimateStats half;
  AttendAll(sh, q, 16, {.keys_fraction = 1.0, .mass_fraction = 0.5}, &half);
  EXPECT_GT(half.clusters_exact_zone, one.clusters_exact_zone);
  EXPECT_LT(half.keys_exact_zone, static_cast<int64_t>((kN - 16) * q.rows));
  EXPECT_GT(half.keys_estimated, 0);
  EXPECT_EQ(half.keys_exact_zone + half.keys_estimated, static_cast<int64_t>((kN - 16) * q.rows));
}

TEST(ExactZoneTest, MembersPartitionTheKeysUnderAppendsAndCountInMemory) {
  constexpr size_t kN = 1000, kD = 16;
  const Matrix keys = RandomMatrix(kN, kD, 13);
  const Matrix vals = RandomMatrix(kN, kD, 14);
  const ValueMatrix all = ValueMatrix::FromFloat(DType::kF32, vals.view());
  const ValueMatrix head = ValueMatrix::FromFloat(DType::kF32, vals.view().rows_slice(0, 600));
  ClusterSummaryOptions co;
  co.clusters = 16;
  auto s = ClusterSummary::Build(keys.view().rows_slice(0, 600), head, co, nullptr);
  ASSERT_TRUE(s.ok()) << s.status();
  const size_t bytes_600 = s->MemoryBytes();
  ASSERT_TRUE(s->Append(keys.view(), all).ok());
  EXPECT_GE(s->MemoryBytes(), bytes_600 + 400 * 2 * sizeof(uint32_t));  // assignment + member
  std::vector<int> seen(kN, 0);
  for (size_t c = 0; c < s->clusters(); ++c) {
    const std::span<const uint32_t> m = s->members(c);
    EXPECT_EQ(static_cast<int64_t>(m.size()), s->count(c));
    EXPECT_TRUE(std::is_sorted(m.begin(), m.end()));
    for (const uint32_t id : m) {
      ASSERT_LT(id, kN);
      EXPECT_EQ(s->assignment(id), c);
      seen[id] += 1;
    }
  }
  for (size_t i = 0; i < kN; ++i) EXPECT_EQ(seen[i], 1) << "key " << i;
}

TEST(ExactZoneTest, HostileFractionsAreRejectedNamingTheField) {
  const Shard sh = MakeShard(RandomMatrix(256, 16, 15), RandomMatrix(256, 16, 16), 8, false);
  const Matrix q = RandomMatrix(1, 16, 17);
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();
  struct Case {
    ExactZoneOptions zone;
    const char* field;
    const char* range;
  };
  const Case cases[] = {
      {{-0.01, 1.0}, "exact_zone_keys_fraction", "[0, 1]"},
      {{1.5, 1.0}, "exact_zone_keys_fraction", "[0, 1]"},
      {{nan, 1.0}, "exact_zone_keys_fraction", "[0, 1]"},
      {{inf, 1.0}, "exact_zone_keys_fraction", "[0, 1]"},
      {{0.1, 0.0}, "exact_zone_mass_fraction", "(0, 1]"},
      {{0.1, -1.0}, "exact_zone_mass_fraction", "(0, 1]"},
      {{0.1, 1.0001}, "exact_zone_mass_fraction", "(0, 1]"},
      {{0.1, nan}, "exact_zone_mass_fraction", "(0, 1]"},
  };
  for (const Case& c : cases) {
    AttendParams p;
    p.search.k = 4;
    p.estimate = &sh.summary;
    p.zone = c.zone;
    AttendScratch scratch;
    Partials out(1, 16);
    const absl::Status st = Attend(q.view(), *sh.flat, sh.values, p, out.view(), &scratch);
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << c.field;
    EXPECT_NE(st.message().find(c.field), std::string::npos) << st;
    EXPECT_NE(st.message().find(c.range), std::string::npos) << st;

    retrieval::NodeCoreOptions o;
    o.exact_zone_keys_fraction = c.zone.keys_fraction;
    o.exact_zone_mass_fraction = c.zone.mass_fraction;
    auto node = retrieval::NodeCore::Create(o);
    ASSERT_FALSE(node.ok()) << c.field;
    EXPECT_EQ(node.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(node.status().message().find(c.field), std::string::npos) << node.status();
  }
}

}  // namespace
}  // namespace kvr::index

namespace kvr::retrieval {
namespace {

namespace en = test_support::estimate_node;

TEST(ExactZoneNodeTest, NodeZoneOverEveryKeyIsFullAttentionAndCountsItsKeys) {
  const en::Data data;
  auto zone_node = en::NewNode(true, 0, false, 1.0);
  auto est_node = en::NewNode(true);
  auto off_zone_node = en::NewNode(true, 0, false, 0.0);
  ASSERT_TRUE(zone_node && est_node && off_zone_node);
  ASSERT_NO_FATAL_FAILURE(en::Load(zone_node.get(), data));
  ASSERT_NO_FATAL_FAILURE(en::Load(est_node.get(), data));
  ASSERT_NO_FATAL_FAILURE(en::Load(off_zone_node.get(), data));
  AttendStats zs, es, os;
  auto zone = en::Attend(zone_node.get(), data, EstimateMode::kDefault, &zs);
  auto est = en::Attend(est_node.get(), data, EstimateMode::kDefault, &es);
  auto off = en::Attend(off_zone_node.get(), data, EstimateMode::kDefault, &os);
  ASSERT_TRUE(zone.ok() && est.ok() && off.ok());
  EXPECT_EQ(zs.keys_exact_zone, static_cast<int64_t>(en::kPrefill - en::kK) * en::kHeads);
  EXPECT_EQ(zs.keys_estimated, 0);
  EXPECT_EQ(zs.keys_attended, int64_t{en::kK} * en::kHeads);
  const double e_zone = en::ErrorVsFull(*zone, data, en::kPrefill);
  const double e_est = en::ErrorVsFull(*est, data, en::kPrefill);
  std::printf("node: error vs full, estimate %.4f, estimate + zone over all %.3g\n", e_est,
              e_zone);
  EXPECT_LE(e_zone, 1e-5);
  EXPECT_GT(e_est, 1e-3);
  // Zone 0 is the estimate, bit for bit; the request's OFF turns both off.
  test_support::ExpectSamePartials(*off, *est, "zone 0 vs estimate");
  EXPECT_EQ(os.keys_exact_zone, 0);
  AttendStats zoff;
  auto zone_req_off = en::Attend(zone_node.get(), data, EstimateMode::kOff, &zoff);
  auto est_req_off = en::Attend(est_node.get(), data, EstimateMode::kOff, nullptr);
  ASSERT_TRUE(zone_req_off.ok() && est_req_off.ok());
  test_support::ExpectSamePartials(*zone_req_off, *est_req_off, "request off");
  EXPECT_EQ(zoff.keys_exact_zone, 0);
}

}  // namespace
}  // namespace kvr::retrieval
