// Helpers shared by the index tests: one data family's synthetic attention
// data (tools/attention_data.h, d 128), recall@k against exact ids, a
// search into fresh vectors and the exact-score oracle.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "common/exact_topk.h"
#include "retrieval_node/index/index.h"
#include "tools/attention_data.h"

namespace kvr::test_support {

// `family`'s data with n_keys keys, n_train training and n_test decode
// queries, d 128, the generator's default seed; a failed generation is a
// test failure (and an empty AttentionData).
inline AttentionData GenerateFamily(const std::string& family, size_t n_keys, size_t n_train,
                                    size_t n_test) {
  AttentionDataOptions o;
  o.family = family;
  o.n_keys = n_keys;
  o.n_train = n_train;
  o.n_test = n_test;
  o.dim = 128;
  absl::StatusOr<AttentionData> d = GenerateAttentionData(o);
  EXPECT_TRUE(d.ok()) << d.status();
  return d.ok() ? *std::move(d) : AttentionData{};
}

// Mean over queries of |got_q ∩ truth_q| / k; got and truth are row-major
// (queries x k), truth's row count decides the queries.
inline double RecallAtK(const std::vector<int64_t>& got, const std::vector<int64_t>& truth,
                        int k) {
  const size_t rows = truth.size() / static_cast<size_t>(k);
  double sum = 0;
  for (size_t q = 0; q < rows; ++q) {
    std::vector<int64_t> t(truth.begin() + static_cast<ptrdiff_t>(q * k),
                           truth.begin() + static_cast<ptrdiff_t>((q + 1) * k));
    std::sort(t.begin(), t.end());
    size_t hits = 0;
    for (int j = 0; j < k; ++j) hits += std::binary_search(t.begin(), t.end(), got[q * k + j]);
    sum += static_cast<double>(hits) / k;
  }
  return rows == 0 ? 0.0 : sum / static_cast<double>(rows);
}

// The exact top-k ids of each query (ExactTopK; a failure is a test failure).
inline std::vector<int64_t> ExactIds(ConstMatrixView keys, ConstMatrixView queries, int k) {
  std::vector<int64_t> ids(queries.rows() * k);
  std::vector<float> scores(ids.size());
  EXPECT_TRUE(ExactTopK(keys, queries, k, ids, scores, nullptr).ok());
  return ids;
}

// One Search's output (queries x k, row-major).
struct SearchResult {
  std::vector<int64_t> ids;
  std::vector<float> scores;
};

// idx.Search(queries, p) into fresh vectors; a failed search is a test failure.
inline SearchResult SearchIndex(const index::KeyIndex& idx, ConstMatrixView queries,
                                const index::SearchParams& p) {
  SearchResult r;
  r.ids.resize(queries.rows() * p.k);
  r.scores.resize(r.ids.size());
  const absl::Status s = idx.Search(queries, p, r.ids, r.scores);
  EXPECT_TRUE(s.ok()) << s;
  return r;
}

// Every returned score is the key's inner product with the query: |score -
// double dot| <= 1e-5 * sum |q_j k_j| (+1e-30), the bound of fp32 summation
// of d = 128 products; ids distinct, in range, best first.
inline void ExpectExactScores(ConstMatrixView keys, ConstMatrixView queries,
                              const SearchResult& r, int k) {
  for (size_t q = 0; q < queries.rows(); ++q) {
    std::vector<int64_t> seen;
    for (int j = 0; j < k; ++j) {
      const int64_t id = r.ids[q * k + j];
      ASSERT_GE(id, 0);
      ASSERT_LT(id, static_cast<int64_t>(keys.rows()));
      seen.push_back(id);
      double dot = 0, mag = 0;
      for (size_t c = 0; c < keys.cols(); ++c) {
        dot += double{queries.row(q)[c]} * double{keys.row(id)[c]};
        mag += std::fabs(double{queries.row(q)[c]} * double{keys.row(id)[c]});
      }
      ASSERT_NEAR(r.scores[q * k + j], dot, 1e-5 * mag + 1e-30) << "query " << q << " rank " << j;
      if (j > 0) {
        ASSERT_GE(r.scores[q * k + j - 1], r.scores[q * k + j]);
      }
    }
    std::sort(seen.begin(), seen.end());
    ASSERT_EQ(std::adjacent_find(seen.begin(), seen.end()), seen.end()) << "query " << q;
  }
}

}  // namespace kvr::test_support
