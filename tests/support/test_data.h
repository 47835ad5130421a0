// Data helpers shared by the node integration tests: seeded matrices, a
// brute-force top-k oracle, and exact comparison of attention partials.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "common/attention.h"
#include "common/tensor.h"

namespace kvr::test_support {

// Seeded N(0, 1) entries; `shift` is added to every fourth column.
inline Matrix RandomMatrix(size_t rows, size_t cols, uint32_t seed, float shift = 0.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  Matrix m(rows, cols);
  for (size_t i = 0; i < rows; ++i) {
    for (size_t j = 0; j < cols; ++j) m.row(i)[j] = dist(rng) + (j % 4 == 0 ? shift : 0.0f);
  }
  return m;
}

// Exact top-k key ids (by inner product) of each query, row-major.
inline std::vector<int64_t> ExactTopKIds(const Matrix& queries, const Matrix& keys, size_t k) {
  std::vector<int64_t> out;
  std::vector<std::pair<float, int64_t>> s(keys.rows);
  for (size_t q = 0; q < queries.rows; ++q) {
    for (size_t i = 0; i < keys.rows; ++i) {
      float dot = 0.0f;
      for (size_t j = 0; j < keys.cols; ++j) dot += queries.row(q)[j] * keys.row(i)[j];
      s[i] = {-dot, static_cast<int64_t>(i)};
    }
    std::partial_sort(s.begin(), s.begin() + k, s.end());
    for (size_t i = 0; i < k; ++i) out.push_back(s[i].second);
  }
  return out;
}

// Bit-for-bit equality of two partial sets (the first few differences are
// reported).
inline void ExpectSamePartials(const Partials& a, const Partials& b, const std::string& what) {
  ASSERT_EQ(a.m.size(), b.m.size()) << what;
  ASSERT_EQ(a.o.data.size(), b.o.data.size()) << what;
  int mismatches = 0;
  for (size_t i = 0; i < a.m.size(); ++i) {
    if ((a.m[i] != b.m[i] || a.l[i] != b.l[i]) && ++mismatches < 5) {
      ADD_FAILURE() << what << " head " << i << ": m " << a.m[i] << " vs " << b.m[i] << ", l "
                    << a.l[i] << " vs " << b.l[i];
    }
  }
  for (size_t i = 0; i < a.o.data.size(); ++i) {
    if (a.o.data[i] != b.o.data[i] && ++mismatches < 5) {
      ADD_FAILURE() << what << " o[" << i << "] " << a.o.data[i] << " vs " << b.o.data[i];
    }
  }
  EXPECT_EQ(mismatches, 0) << what;
}

}  // namespace kvr::test_support
