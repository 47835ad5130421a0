// The data families of tools/attention_data (issue 17 item 1): each is a pure
// function of its options and seed, validated, and has the property that
// defines it, measured here by an exact double-precision oracle (logits
// q·k/√d over every key, softmax, top-k, key covariance spectrum) that shares
// no code with the generator.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "tools/attention_data.h"

namespace kvr {
namespace {

AttentionDataOptions Family(const std::string& family, size_t n_keys = 16384, size_t n_test = 64) {
  AttentionDataOptions o;
  o.family = family;
  o.n_keys = n_keys;
  o.n_train = 1024;
  o.n_test = n_test;
  o.dim = 128;
  return o;
}

AttentionData MustGenerate(const AttentionDataOptions& o) {
  absl::StatusOr<AttentionData> d = GenerateAttentionData(o);
  EXPECT_TRUE(d.ok()) << o.family << ": " << d.status();
  return d.ok() ? *std::move(d) : AttentionData{};
}

bool SameBytes(const Matrix& a, const Matrix& b) {
  return a.rows == b.rows && a.cols == b.cols &&
         std::memcmp(a.data.data(), b.data.data(), a.data.size() * sizeof(float)) == 0;
}

// Exact logits of one query over every key, in double.
std::vector<double> Logits(const Matrix& keys, const float* q) {
  std::vector<double> out(keys.rows);
  const double scale = 1.0 / std::sqrt(static_cast<double>(keys.cols));
  for (size_t t = 0; t < keys.rows; ++t) {
    double dot = 0;
    for (size_t c = 0; c < keys.cols; ++c) dot += static_cast<double>(q[c]) * keys.row(t)[c];
    out[t] = dot * scale;
  }
  return out;
}

// Softmax probabilities of `logits`.
std::vector<double> Softmax(const std::vector<double>& logits) {
  const double mx = *std::max_element(logits.begin(), logits.end());
  std::vector<double> p(logits.size());
  double sum = 0;
  for (size_t i = 0; i < p.size(); ++i) sum += p[i] = std::exp(logits[i] - mx);
  for (double& x : p) x /= sum;
  return p;
}

// Ids of the k largest logits.
std::vector<size_t> TopK(const std::vector<double>& logits, size_t k) {
  std::vector<size_t> ids(logits.size());
  std::iota(ids.begin(), ids.end(), size_t{0});
  std::partial_sort(ids.begin(), ids.begin() + k, ids.end(),
                    [&](size_t a, size_t b) { return logits[a] > logits[b]; });
  ids.resize(k);
  return ids;
}

// Eigenvalues of the key covariance (cyclic Jacobi on the d x d matrix),
// largest first.
std::vector<double> CovarianceSpectrum(const Matrix& x) {
  const size_t d = x.cols, n = x.rows;
  std::vector<double> mean(d, 0.0), a(d * d, 0.0);
  for (size_t r = 0; r < n; ++r) {
    for (size_t c = 0; c < d; ++c) mean[c] += x.row(r)[c];
  }
  for (double& m : mean) m /= static_cast<double>(n);
  std::vector<double> v(d);
  for (size_t r = 0; r < n; ++r) {
    for (size_t c = 0; c < d; ++c) v[c] = x.row(r)[c] - mean[c];
    for (size_t i = 0; i < d; ++i) {
      for (size_t j = 0; j <= i; ++j) a[i * d + j] += v[i] * v[j];
    }
  }
  for (size_t i = 0; i < d; ++i) {
    for (size_t j = 0; j <= i; ++j) a[j * d + i] = a[i * d + j] /= static_cast<double>(n - 1);
  }
  for (int sweep = 0; sweep < 60; ++sweep) {
    double off = 0;
    for (size_t i = 0; i < d; ++i) {
      for (size_t j = i + 1; j < d; ++j) off += a[i * d + j] * a[i * d + j];
    }
    if (off < 1e-18) break;
    for (size_t p = 0; p < d; ++p) {
      for (size_t q = p + 1; q < d; ++q) {
        const double apq = a[p * d + q];
        if (std::abs(apq) < 1e-300) continue;
        const double theta = (a[q * d + q] - a[p * d + p]) / (2 * apq);
        const double t = (theta >= 0 ? 1.0 : -1.0) / (std::abs(theta) + std::sqrt(theta * theta + 1));
        const double c = 1 / std::sqrt(t * t + 1), s = t * c;
        for (size_t k = 0; k < d; ++k) {
          const double akp = a[k * d + p], akq = a[k * d + q];
          a[k * d + p] = c * akp - s * akq;
          a[k * d + q] = s * akp + c * akq;
        }
        for (size_t k = 0; k < d; ++k) {
          const double apk = a[p * d + k], aqk = a[q * d + k];
          a[p * d + k] = c * apk - s * aqk;
          a[q * d + k] = s * apk + c * aqk;
        }
      }
    }
  }
  std::vector<double> eig(d);
  for (size_t i = 0; i < d; ++i) eig[i] = a[i * d + i];
  std::sort(eig.rbegin(), eig.rend());
  return eig;
}

double TopShare(const std::vector<double>& eig, size_t top) {
  const double total = std::accumulate(eig.begin(), eig.end(), 0.0);
  return std::accumulate(eig.begin(), eig.begin() + top, 0.0) / total;
}

TEST(AttentionFamilies, NamesAreTheContractsAndUnknownIsRejected) {
  EXPECT_EQ(AttentionFamilyNames(),
            (std::vector<std::string>{"topical", "lowrank", "flat", "positional", "sink"}));
  EXPECT_EQ(AttentionDataOptions{}.family, "topical");
  AttentionDataOptions o = Family("needle-in-a-typo");
  absl::StatusOr<AttentionData> d = GenerateAttentionData(o);
  ASSERT_EQ(d.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(d.status().message().find("family"), absl::string_view::npos) << d.status();
  EXPECT_NE(d.status().message().find("needle-in-a-typo"), absl::string_view::npos);
}

TEST(AttentionFamilies, EachFamilyIsAPureFunctionOfOptionsAndSeed) {
  for (const std::string& family : AttentionFamilyNames()) {
    SCOPED_TRACE(family);
    AttentionDataOptions o = Family(family, 4096, 32);
    o.n_train = 256;
    ThreadPool inline_pool(0), wide_pool(3);
    absl::StatusOr<AttentionData> a = GenerateAttentionData(o, &inline_pool);
    absl::StatusOr<AttentionData> b = GenerateAttentionData(o, &wide_pool);
    ASSERT_TRUE(a.ok()) << a.status();
    ASSERT_TRUE(b.ok()) << b.status();
    EXPECT_TRUE(SameBytes(a->keys, b->keys));
    EXPECT_TRUE(SameBytes(a->values, b->values));
    EXPECT_TRUE(SameBytes(a->train_queries, b->train_queries));
    EXPECT_TRUE(SameBytes(a->test_queries, b->test_queries));
    EXPECT_EQ(a->train_positions, b->train_positions);
    EXPECT_EQ(a->key_topics, b->key_topics);
    EXPECT_EQ(a->keys.rows, o.n_keys);
    EXPECT_EQ(a->train_queries.rows, o.n_train);
    EXPECT_EQ(a->test_queries.rows, o.n_test);
    for (float x : a->keys.data) ASSERT_TRUE(std::isfinite(x));
    for (float x : a->test_queries.data) ASSERT_TRUE(std::isfinite(x));
    o.seed += 1;
    absl::StatusOr<AttentionData> c = GenerateAttentionData(o, &wide_pool);
    ASSERT_TRUE(c.ok());
    EXPECT_FALSE(SameBytes(a->keys, c->keys));
    EXPECT_FALSE(SameBytes(a->test_queries, c->test_queries));
  }
  // Families differ from each other under the same seed.
  const AttentionData topical = MustGenerate(Family("topical", 4096, 32));
  const AttentionData lowrank = MustGenerate(Family("lowrank", 4096, 32));
  EXPECT_FALSE(SameBytes(topical.keys, lowrank.keys));
}

TEST(AttentionFamilies, BadFamilyKnobsNameTheFlagAndLimit) {
  struct Case {
    const char* family;
    void (*set)(AttentionDataOptions&);
    const char* field;
  };
  const Case cases[] = {
      {"lowrank", [](AttentionDataOptions& o) { o.lowrank.manifold_dim = 17; }, "lowrank_manifold_dim"},
      {"lowrank", [](AttentionDataOptions& o) { o.lowrank.planes = 65; }, "lowrank_planes"},
      {"lowrank", [](AttentionDataOptions& o) { o.lowrank.noise = 0.6; }, "lowrank_noise"},
      {"lowrank", [](AttentionDataOptions& o) { o.lowrank.logit_std = std::nan(""); }, "lowrank_logit_std"},
      {"flat", [](AttentionDataOptions& o) { o.flat.logit_std = 0; }, "flat_logit_std"},
      {"flat", [](AttentionDataOptions& o) { o.flat.shared_query = 1.5; }, "flat_shared_query"},
      {"positional", [](AttentionDataOptions& o) { o.positional.recency_window = 0.5; },
       "positional_recency_window"},
      {"positional", [](AttentionDataOptions& o) { o.apply_rope = false; }, "apply_rope"},
      {"sink", [](AttentionDataOptions& o) { o.sink.sink_mass = 1.0; }, "sink_mass"},
      {"sink", [](AttentionDataOptions& o) { o.sink.sink_keys = 65; }, "sink_keys"},
      {"sink", [](AttentionDataOptions& o) { o.n_keys = 2, o.n_train = 1; }, "sink_keys <= n_keys"},
  };
  for (const Case& c : cases) {
    AttentionDataOptions o = Family(c.family, 4096, 8);
    c.set(o);
    const absl::Status s = ValidateAttentionDataOptions(o);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << c.field;
    EXPECT_NE(s.message().find(c.field), absl::string_view::npos) << s;
  }
}

// flat: the exact top-100 holds < 2% of the softmax mass at 16K keys (the
// topical default holds ~75%).
TEST(AttentionFamilies, FlatTopHundredCarriesUnderTwoPercentOfTheMass) {
  for (const std::string& family : {std::string("flat"), std::string("topical")}) {
    const AttentionData d = MustGenerate(Family(family));
    double mean_mass = 0, max_mass = 0;
    for (size_t i = 0; i < d.test_queries.rows; ++i) {
      const std::vector<double> logits = Logits(d.keys, d.test_queries.row(i));
      const std::vector<double> p = Softmax(logits);
      double mass = 0;
      for (size_t id : TopK(logits, 100)) mass += p[id];
      mean_mass += mass / static_cast<double>(d.test_queries.rows);
      max_mass = std::max(max_mass, mass);
    }
    std::printf("%s: top-100 softmax mass mean %.4f max %.4f\n", family.c_str(), mean_mass,
                max_mass);
    if (family == "flat") {
      EXPECT_LT(mean_mass, 0.02);
      EXPECT_LT(max_mass, 0.03);
    } else {
      EXPECT_GT(mean_mass, 0.5);
    }
  }
}

// lowrank: >= 90% of the key variance in <= 16 principal directions (flat,
// high intrinsic dimension, holds well under half there).
TEST(AttentionFamilies, LowRankKeysHaveLowIntrinsicDimension) {
  const AttentionData lowrank = MustGenerate(Family("lowrank", 8192, 8));
  const AttentionData flat = MustGenerate(Family("flat", 8192, 8));
  const double lowrank_share = TopShare(CovarianceSpectrum(lowrank.keys), 16);
  const double flat_share = TopShare(CovarianceSpectrum(flat.keys), 16);
  std::printf("variance in the top 16 principal directions: lowrank %.4f, flat %.4f\n",
              lowrank_share, flat_share);
  EXPECT_GE(lowrank_share, 0.90);
  EXPECT_LT(flat_share, 0.5);
}

// sink: the first sink_keys keys take > 50% of the mass for most queries.
TEST(AttentionFamilies, SinkKeysTakeMostOfTheMass) {
  const AttentionDataOptions o = Family("sink");
  const AttentionData d = MustGenerate(o);
  for (const Matrix* q : {&d.train_queries, &d.test_queries}) {
    const size_t rows = std::min<size_t>(q->rows, 128);
    size_t dominated = 0;
    double mean_mass = 0;
    for (size_t i = 0; i < rows; ++i) {
      const std::vector<double> p = Softmax(Logits(d.keys, q->row(i * q->rows / rows)));
      double sink = 0;
      for (size_t j = 0; j < o.sink.sink_keys; ++j) sink += p[j];
      mean_mass += sink / static_cast<double>(rows);
      dominated += sink > 0.5 ? 1 : 0;
    }
    std::printf("sink mass mean %.4f, %zu of %zu queries > 0.5\n", mean_mass, dominated, rows);
    EXPECT_GE(dominated, rows * 8 / 10);
    EXPECT_GT(mean_mass, 0.6);
  }
  // Without the sink (the topical family, same seed), the first keys hold
  // about their share of the mass, nothing more.
  const AttentionData topical = MustGenerate(Family("topical"));
  double first = 0;
  for (size_t i = 0; i < topical.test_queries.rows; ++i) {
    const std::vector<double> p = Softmax(Logits(topical.keys, topical.test_queries.row(i)));
    first += (p[0] + p[1] + p[2] + p[3]) / static_cast<double>(topical.test_queries.rows);
  }
  EXPECT_LT(first, 0.05);
}

// positional: a decode query's top-100 keys sit among the most recent
// recency_window positions (a topical query's spread over the whole prompt).
TEST(AttentionFamilies, PositionalAttentionConcentratesAtRecentPositions) {
  for (const std::string& family : {std::string("positional"), std::string("topical")}) {
    const AttentionDataOptions o = Family(family);
    const AttentionData d = MustGenerate(o);
    const size_t recent_from = o.n_keys - static_cast<size_t>(o.positional.recency_window);
    double recent = 0;
    for (size_t i = 0; i < d.test_queries.rows; ++i) {
      for (size_t id : TopK(Logits(d.keys, d.test_queries.row(i)), 100)) {
        recent += id >= recent_from ? 1.0 : 0.0;
      }
    }
    recent /= 100.0 * static_cast<double>(d.test_queries.rows);
    std::printf("%s: fraction of the top-100 in the last %zu of %zu positions: %.4f\n",
                family.c_str(), o.n_keys - recent_from, o.n_keys, recent);
    if (family == "positional") {
      EXPECT_GE(recent, 0.8);
    } else {
      EXPECT_LT(recent, 0.2);
    }
  }
}

}  // namespace
}  // namespace kvr
