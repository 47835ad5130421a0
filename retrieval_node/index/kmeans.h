// Spherical (inner-product) k-means for IVF coarse quantisation.
//
// Centroids are kept at unit L2 norm and points are assigned to the centroid
// with the largest inner product, which is what an IVF probe for maximum inner
// product search ranks by. k-means++ seeding (on the cosine distance) from a
// seeded RNG, Lloyd iterations with multithreaded assignment, and empty
// clusters re-seeded by splitting the largest cluster. Deterministic for a
// given seed and input, whatever the pool size.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "common/status.h"
#include "common/tensor.h"
#include "common/thread_pool.h"

namespace kvr::index {

struct KMeansOptions {
  size_t k = 256;            // clusters; 1 <= k <= points
  int iterations = 10;       // Lloyd iterations (>= 0)
  uint64_t seed = 1;         // RNG seed for seeding and re-seeding
  size_t max_train_points = 0;  // subsample to this many points for training (0: all)
};

struct KMeansResult {
  Matrix centroids;                 // k x d, unit norm
  std::vector<uint32_t> assignment;  // per input point: its centroid
  double objective = 0;             // sum over points of their best inner product
};

// Clusters the rows of `points` (n x d, finite). InvalidArgument when k == 0,
// k > n or d == 0. `pool` may be null.
absl::StatusOr<KMeansResult> SphericalKMeans(ConstMatrixView points, const KMeansOptions& options,
                                             ThreadPool* pool);

// assignment[i] = argmax_c points[i] . centroids[c] (smallest c on ties);
// best[i] = that inner product when `best` is non-empty. `pool` may be null.
void AssignNearest(ConstMatrixView points, ConstMatrixView centroids,
                   std::span<uint32_t> assignment, std::span<float> best, ThreadPool* pool);

}  // namespace kvr::index
