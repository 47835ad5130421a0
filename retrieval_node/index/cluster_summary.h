// ClusterSummary: the "estimation zone" of one shard (RetroInfer): its keys
// grouped into clusters, each summarised by its size n_j, key sum and value
// sum, so that the attention mass of the keys a top-k search did NOT retrieve
// can be estimated without touching them.
//
// Estimator (per query q, scale s, cluster j with n_j' keys left after the
// retrieved ones are taken out of it, mean key mu_j', diagonal key variance
// var_j' and mean value vbar_j'):
//   sum over the cluster's keys of exp(s q.k) v
//     ~=  n_j' exp(s q.mu_j') (1 + s^2/2 sum_t q_t^2 var_j't) vbar_j'
// i.e. the cluster becomes ONE pseudo-key with score
// s q.mu_j' + ln(1 + s^2/2 q^2.var_j') + ln n_j' and value vbar_j' (the
// variance term only with ClusterSummaryOptions::second_order). All
// pseudo-keys form one partial (o, m, l) that merges with
// the exact partial of the retrieved keys by the usual LSE merge: the two
// key sets are disjoint because retrieved keys are subtracted from their
// clusters' sums (no double counting; a cluster whose keys were all retrieved
// contributes nothing).
//
// Clusters come from spherical k-means (kmeans.h) over the keys at Build;
// Append assigns new keys to their nearest centroid (largest inner product)
// and adds them to that cluster's sums, so a summary built over keys [0, a)
// and appended [a, n) equals one recomputed from scratch with the same
// centroids (sums are kept in double, accumulated in id order).
//
// Exact zone (session 27; RetroInfer's retrieval zone): Estimate can attend
// the clusters of most estimated mass key by key instead of as pseudo-keys
// (ExactZoneOptions). The summary keeps each cluster's member ids for that
// (4 bytes per key, counted in MemoryBytes).
//
// Thread-compatible: const methods may run concurrently.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "common/status.h"
#include "common/tensor.h"
#include "common/thread_pool.h"
#include "common/value_matrix.h"

namespace kvr::index {

// Bounds of ClusterSummaryOptions::clusters (node flag
// --estimate_clusters_per_chunk).
inline constexpr size_t kMinEstimateClusters = 1;
inline constexpr size_t kMaxEstimateClusters = 65536;
// The node gives a chunk of n keys min(--estimate_clusters_per_chunk,
// max(1, n / kMinKeysPerEstimateCluster)) clusters.
inline constexpr size_t kMinKeysPerEstimateCluster = 16;

struct ClusterSummaryOptions {
  size_t clusters = 256;  // clusters per shard, clamped to the key count
  int iterations = 6;     // k-means Lloyd iterations
  uint64_t seed = 1;
  size_t max_train_points = 16384;  // k-means subsample (0: all keys)
  // Second-order estimator (session 26; off by default: it lowers the
  // error on every synthetic family but raised stories260K's KL at every k,
  // docs/benchmarks.md §4b "Session 26"): each pseudo-key
  // score also gets ln(1 + 0.5 s^2 sum_t q_t^2 var_jt) (var_jt: the
  // cluster's diagonal key variance), the second-order Taylor term of the
  // cluster's mean exp(s q.k) around its mean score -- Jensen's gap that the
  // mean key alone misses. (The Gaussian form exp(0.5 s^2 q'Sq) over-counted
  // spread clusters of bounded scores: topical error 0.14 -> 0.21 at 32K
  // keys; this form 0.14 -> 0.09, docs/benchmarks.md §4b "Session 26".)
  // Exact when every cluster is one key (variance 0). Costs one more
  // clusters x d pass per query and d doubles + d floats per cluster.
  bool second_order = false;
};

// The exact zone of an estimate (session 27; kvr_node --exact_zone_*): per
// query, the summary's clusters are ranked by their estimated remainder mass
// (the pseudo-key score s q.mu' + ln n' [+ the second-order term], retrieved
// keys already taken out) and the best are attended EXACTLY, every member
// key not in the exclude list, while (a) their keys fit the budget
// floor(keys_fraction * size()) and (b) the zone's estimated mass is below
// mass_fraction of the whole remainder's (mass_fraction 1: no mass stop).
// The ranking stops at the first cluster that does not fit, so a larger
// budget only adds clusters. The other clusters stay estimated.
// keys_fraction 0: no zone, Estimate bit-identical to the estimate alone.
struct ExactZoneOptions {
  double keys_fraction = 0.0;  // [0, 1]
  double mass_fraction = 1.0;  // (0, 1]
};
// InvalidArgument naming exact_zone_keys_fraction / exact_zone_mass_fraction
// and the range when a value is outside it (NaN included).
absl::Status ValidateExactZone(const ExactZoneOptions& zone);

// Counts of one estimate (per query, summed).
struct EstimateStats {
  int64_t keys_estimated = 0;      // keys represented by pseudo-keys
  int64_t clusters_estimated = 0;  // clusters that contributed (n_j' > 0)
  int64_t keys_exact_zone = 0;     // keys attended exactly by the exact zone
  int64_t clusters_exact_zone = 0; // clusters in the exact zone
};

// Caller-owned per-thread buffers for ClusterSummary::Estimate. Reused
// across calls (no allocation once grown). Not thread-safe.
class EstimateScratch {
 private:
  friend class ClusterSummary;
  std::vector<uint32_t> excluded;   // per cluster: retrieved keys in it
  std::vector<uint32_t> touched;    // clusters with excluded > 0
  std::vector<double> key_adj;      // per touched slot: sum of excluded keys (d)
  std::vector<double> value_adj;    // per touched slot: sum of excluded values (dv)
  std::vector<uint32_t> slot;       // per cluster: its slot in key_adj / value_adj
  std::vector<float> scores;        // per cluster pseudo-key score
  std::vector<float> mean;          // one adjusted mean key (d) / value (dv)
  std::vector<float> row;           // one value row as fp32
  std::vector<double> sq_adj;       // per touched slot: sum of excluded squared keys (d)
  std::vector<float> q2;            // q squared (second order)
  std::vector<float> var_scores;    // per cluster q^2 . var
  // Exact zone (ExactZoneOptions).
  std::vector<uint32_t> order;         // clusters by score, descending
  std::vector<int64_t> sorted_exclude; // exclude ids, sorted (membership)
  std::vector<int64_t> zone_ids;       // the zone's keys
  std::vector<uint32_t> zone_rows;     // the same as rows (dot_gather)
  std::vector<float> zone_scores;      // their scaled scores
  std::vector<float> zone_weights;     // PartialFromScores scratch
  std::vector<float> zone_o;           // the zone's partial (dv)
};

// The clustering half of ClusterSummary::Build (k-means over the keys
// only): what a background builder computes without holding the lock that
// guards the values (ClusterSummary::Plan / FromPlan).
struct ClusterPlan {
  Matrix centroids;                  // k x d, unit norm
  std::vector<uint32_t> assignment;  // per key: its cluster
  bool second_order = false;
};

class ClusterSummary {
 public:
  ClusterSummary() = default;

  // The k-means of Build over `keys` (n x d, finite, n >= 1), k =
  // min(options.clusters, n); touches no values. InvalidArgument: n == 0,
  // options.clusters outside [kMinEstimateClusters, kMaxEstimateClusters].
  // Counts one run in PlansOnThisThread(). `pool` may be null.
  static absl::StatusOr<ClusterPlan> Plan(ConstMatrixView keys,
                                          const ClusterSummaryOptions& options,
                                          ThreadPool* pool);
  // The summary of `plan` over keys / values rows [0, plan.assignment.size())
  // (`keys` must be the rows Plan clustered, values.rows() >= that many).
  // InvalidArgument on shape mismatches.
  static absl::StatusOr<ClusterSummary> FromPlan(const ClusterPlan& plan, ConstMatrixView keys,
                                                 const ValueMatrix& values);
  // Plan calls (k-means runs) made by the calling thread so far: lets a test
  // show that an Attend thread never clusters (the node builds summaries on
  // its own thread).
  static int64_t PlansOnThisThread();

  // Clusters keys (n x d, finite, n >= 1) with k = min(options.clusters, n)
  // and sums keys and values (values.rows() == n) per cluster.
  // InvalidArgument: n == 0, values.rows() != n, options.clusters outside
  // [kMinEstimateClusters, kMaxEstimateClusters]. `pool` may be null.
  static absl::StatusOr<ClusterSummary> Build(ConstMatrixView keys, const ValueMatrix& values,
                                              const ClusterSummaryOptions& options,
                                              ThreadPool* pool);

  // Adds keys rows [size(), keys.rows()) (with the same value rows) to
  // their nearest clusters. `keys` / `values` are the shard's full key and
  // value matrices (the prefix [0, size()) must be the keys summarised so
  // far). InvalidArgument on shape mismatches or keys.rows() < size().
  absl::Status Append(ConstMatrixView keys, const ValueMatrix& values);

  size_t size() const { return assignment_.size(); }  // keys summarised
  size_t clusters() const { return count_.size(); }
  size_t dim() const { return centroids_.cols; }
  size_t value_dim() const { return value_dim_; }
  const Matrix& centroids() const { return centroids_; }  // k x d, unit norm
  uint32_t assignment(size_t id) const { return assignment_[id]; }
  int64_t count(size_t j) const { return count_[j]; }
  std::span<const double> key_sum(size_t j) const {
    return {key_sum_.data() + j * dim(), dim()};
  }
  bool second_order() const { return second_order_; }
  std::span<const double> value_sum(size_t j) const {
    return {value_sum_.data() + j * value_dim_, value_dim_};
  }
  // Key ids of cluster j, ascending (the exact zone attends them).
  std::span<const uint32_t> members(size_t j) const { return members_[j]; }
  size_t MemoryBytes() const;

  // The estimate partial of one query `q` (dim() floats) over every
  // summarised key NOT in `exclude` (ids of retrieved keys; ids < 0 are
  // padding and ignored; each id at most once, < size()): writes o
  // (value_dim() floats), *m, *l; the empty partial when nothing is left.
  // `keys` / `values` are the shard's (rows >= size()), used to subtract the
  // excluded keys. Adds to *stats when non-null. KVR_CHECKs shapes.
  // `zone` (validated by the caller: ValidateExactZone) moves the clusters
  // of most estimated mass from the estimate to exact attention over their
  // keys (ExactZoneOptions); the partial written is then the LSE merge of
  // both, still over exactly the keys not in `exclude`.
  void Estimate(std::span<const float> q, float scale, std::span<const int64_t> exclude,
                ConstMatrixView keys, const ValueMatrix& values, EstimateScratch* scratch,
                std::span<float> o, float* m, float* l, EstimateStats* stats,
                const ExactZoneOptions& zone = {}) const;

 private:
  // Adds key/value row i (cluster c) to the sums and the float means.
  void AddRow(size_t i, uint32_t c, ConstMatrixView keys, const ValueMatrix& values,
              std::vector<float>* row);
  void RefreshMeans(uint32_t c);
  // The exact zone of Estimate: picks the clusters (scratch->scores final,
  // scratch->excluded set), attends their non-excluded keys into
  // scratch->zone_o / *zm / *zl and sets their scores to -inf. Returns
  // whether any cluster was picked (false: nothing written).
  bool AttendExactZone(std::span<const float> q, float scale, std::span<const int64_t> exclude,
                       ConstMatrixView keys, const ValueMatrix& values,
                       const ExactZoneOptions& zone, EstimateScratch* scratch, float* zm,
                       float* zl, EstimateStats* stats) const;

  Matrix centroids_;                  // k x d, unit norm (assignment only)
  size_t value_dim_ = 0;
  std::vector<uint32_t> assignment_;  // per key id
  std::vector<int64_t> count_;        // per cluster
  std::vector<double> key_sum_;       // k x d
  std::vector<double> value_sum_;     // k x dv
  Matrix key_mean_;                   // k x d, key_sum / count (float, for Estimate)
  Matrix value_mean_;                 // k x dv
  bool second_order_ = false;
  std::vector<double> key_sq_sum_;    // k x d (second order only)
  Matrix key_var_;                    // k x d, diagonal variance (second order only)
  std::vector<float> log_count_;      // per cluster ln(count) (-inf when empty)
  std::vector<std::vector<uint32_t>> members_;  // per cluster: key ids, ascending
};

}  // namespace kvr::index
