#include "retrieval_node/index/kmeans.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <functional>
#include <random>

#include "common/simd/kernels.h"

namespace kvr::index {
namespace {

// Above this many multiply-adds k-means++ seeding is replaced by a uniform
// sample of distinct points (k-means++ is k sequential passes over the data).
constexpr double kPlusPlusBudget = 4e9;

void Normalize(float* v, size_t d) {
  double s = 0;
  for (size_t i = 0; i < d; ++i) s += static_cast<double>(v[i]) * v[i];
  if (s <= 0) return;
  const float inv = static_cast<float>(1.0 / std::sqrt(s));
  for (size_t i = 0; i < d; ++i) v[i] *= inv;
}

void ParallelOrInline(ThreadPool* pool, size_t n, size_t grain,
                      const std::function<void(size_t, size_t)>& fn) {
  if (pool == nullptr) {
    fn(0, n);
  } else {
    pool->ParallelFor(n, grain, fn);
  }
}

}  // namespace

void AssignNearest(ConstMatrixView points, ConstMatrixView centroids,
                   std::span<uint32_t> assignment, std::span<float> best, ThreadPool* pool) {
  KVR_CHECK(assignment.size() >= points.rows());
  KVR_CHECK(best.empty() || best.size() >= points.rows());
  KVR_CHECK(centroids.cols() == points.cols() && centroids.rows() > 0);
  const auto& kern = simd::Active();
  const size_t k = centroids.rows();
  ParallelOrInline(pool, points.rows(), 256, [&](size_t b, size_t e) {
    std::vector<float> sc(k);
    for (size_t i = b; i < e; ++i) {
      kern.dot_batch(points.row(i), centroids.data(), k, centroids.cols(), centroids.stride(),
                     sc.data());
      size_t arg = 0;
      for (size_t c = 1; c < k; ++c) {
        if (sc[c] > sc[arg]) arg = c;
      }
      assignment[i] = static_cast<uint32_t>(arg);
      if (!best.empty()) best[i] = sc[arg];
    }
  });
}

absl::StatusOr<KMeansResult> SphericalKMeans(ConstMatrixView points, const KMeansOptions& options,
                                             ThreadPool* pool) {
  const size_t n = points.rows(), d = points.cols();
  const size_t k = options.k;
  if (d == 0) return absl::InvalidArgumentError("k-means: points have dimension 0");
  if (k == 0 || k > n) {
    return absl::InvalidArgumentError(
        absl::StrCat("k-means: k=", k, " outside [1, ", n, "] (the number of points)"));
  }
  if (options.iterations < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("k-means: iterations=", options.iterations, " is negative"));
  }
  std::mt19937_64 rng(options.seed);

  // Training set: all points or a seeded subsample (at least k points).
  Matrix sample;
  ConstMatrixView train = points;
  if (options.max_train_points > 0 && options.max_train_points < n) {
    const size_t m = std::max(k, options.max_train_points);
    if (m < n) {
      std::vector<uint32_t> perm(n);
      std::iota(perm.begin(), perm.end(), 0u);
      for (size_t i = 0; i < m; ++i) {
        std::uniform_int_distribution<size_t> pick(i, n - 1);
        std::swap(perm[i], perm[pick(rng)]);
      }
      std::sort(perm.begin(), perm.begin() + m);
      sample = Matrix(m, d);
      for (size_t i = 0; i < m; ++i) {
        std::memcpy(sample.row(i), points.row(perm[i]), d * sizeof(float));
      }
      train = sample.view();
    }
  }
  const size_t nt = train.rows();
  const auto& kern = simd::Active();

  KMeansResult result;
  result.centroids = Matrix(k, d);
  Matrix& cent = result.centroids;

  // Unit-norm copies of the training points drive seeding (cosine geometry).
  std::vector<float> norms(nt);
  for (size_t i = 0; i < nt; ++i) {
    norms[i] = std::sqrt(std::max(0.0f, kern.dot(train.row(i), train.row(i), d)));
  }
  auto seed_from = [&](size_t c, size_t point) {
    std::memcpy(cent.row(c), train.row(point), d * sizeof(float));
    Normalize(cent.row(c), d);
  };

  const bool plus_plus = static_cast<double>(k) * nt * d <= kPlusPlusBudget;
  if (plus_plus) {
    // k-means++ with D(x) = 1 - cos(x, nearest chosen centroid).
    std::vector<float> dist(nt, 2.0f);
    std::uniform_int_distribution<size_t> first(0, nt - 1);
    seed_from(0, first(rng));
    for (size_t c = 1; c <= k; ++c) {
      const float* newest = cent.row(c - 1);
      ParallelOrInline(pool, nt, 4096, [&](size_t b, size_t e) {
        for (size_t i = b; i < e; ++i) {
          const float cosv = norms[i] > 0 ? kern.dot(train.row(i), newest, d) / norms[i] : 0.0f;
          dist[i] = std::min(dist[i], std::max(0.0f, 1.0f - cosv));
        }
      });
      if (c == k) break;
      double total = 0;
      for (float x : dist) total += x;
      size_t pick = 0;
      if (total > 0) {
        std::uniform_real_distribution<double> u(0.0, total);
        double r = u(rng), acc = 0;
        pick = nt - 1;
        for (size_t i = 0; i < nt; ++i) {
          acc += dist[i];
          if (acc >= r && dist[i] > 0) {
            pick = i;
            break;
          }
        }
      } else {
        std::uniform_int_distribution<size_t> any(0, nt - 1);
        pick = any(rng);
      }
      seed_from(c, pick);
    }
  } else {
    std::vector<uint32_t> perm(nt);
    std::iota(perm.begin(), perm.end(), 0u);
    for (size_t c = 0; c < k; ++c) {
      std::uniform_int_distribution<size_t> pick(c, nt - 1);
      std::swap(perm[c], perm[pick(rng)]);
      seed_from(c, perm[c]);
    }
  }

  // Lloyd iterations: assign by inner product, centroid = normalised sum.
  std::vector<uint32_t> assign(nt);
  std::vector<double> sums(k * d);
  std::vector<size_t> counts(k);
  std::normal_distribution<float> gauss(0.0f, 1.0f);
  for (int it = 0; it < options.iterations; ++it) {
    AssignNearest(train, cent.view(), assign, {}, pool);
    std::fill(sums.begin(), sums.end(), 0.0);
    std::fill(counts.begin(), counts.end(), 0);
    for (size_t i = 0; i < nt; ++i) {
      const uint32_t c = assign[i];
      ++counts[c];
      double* s = sums.data() + c * d;
      const float* x = train.row(i);
      for (size_t j = 0; j < d; ++j) s[j] += x[j];
    }
    for (size_t c = 0; c < k; ++c) {
      if (counts[c] == 0) continue;
      double norm = 0;
      for (size_t j = 0; j < d; ++j) norm += sums[c * d + j] * sums[c * d + j];
      if (norm <= 0) continue;  // keep the previous direction
      const double inv = 1.0 / std::sqrt(norm);
      for (size_t j = 0; j < d; ++j) cent.row(c)[j] = static_cast<float>(sums[c * d + j] * inv);
    }
    // Empty clusters: split the largest cluster's centroid in two by a small
    // symmetric perturbation; the next assignment divides its points.
    for (size_t c = 0; c < k; ++c) {
      if (counts[c] != 0) continue;
      const size_t big = std::max_element(counts.begin(), counts.end()) - counts.begin();
      if (counts[big] <= 1) break;
      float* a = cent.row(c);
      float* b = cent.row(big);
      for (size_t j = 0; j < d; ++j) {
        const float eps = 1e-3f * gauss(rng);
        a[j] = b[j] + eps;
        b[j] = b[j] - eps;
      }
      Normalize(a, d);
      Normalize(b, d);
      counts[c] = counts[big] / 2;
      counts[big] -= counts[c];
    }
  }

  result.assignment.resize(n);
  std::vector<float> best(n);
  AssignNearest(points, cent.view(), result.assignment, best, pool);
  double obj = 0;
  for (float b : best) obj += b;
  result.objective = obj;
  return result;
}

}  // namespace kvr::index
