// Helpers shared by the index tests: one data family's synthetic attention
// data (tools/attention_data.h, d 128) and recall@k against exact ids.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

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

}  // namespace kvr::test_support
