#include "retrieval_node/index/cluster_summary.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "common/attention.h"
#include "common/simd/kernels.h"
#include "retrieval_node/index/kmeans.h"

namespace kvr::index {

namespace {
thread_local int64_t plans_on_this_thread = 0;
}  // namespace

int64_t ClusterSummary::PlansOnThisThread() { return plans_on_this_thread; }

absl::Status ValidateExactZone(const ExactZoneOptions& zone) {
  if (!(zone.keys_fraction >= 0.0 && zone.keys_fraction <= 1.0)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "exact_zone_keys_fraction ", zone.keys_fraction, " outside [0, 1]"));
  }
  if (!(zone.mass_fraction > 0.0 && zone.mass_fraction <= 1.0)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "exact_zone_mass_fraction ", zone.mass_fraction, " outside (0, 1]"));
  }
  return absl::OkStatus();
}

absl::StatusOr<ClusterPlan> ClusterSummary::Plan(ConstMatrixView keys,
                                                 const ClusterSummaryOptions& options,
                                                 ThreadPool* pool) {
  const size_t n = keys.rows();
  if (n == 0 || keys.cols() == 0) {
    return absl::InvalidArgumentError("cluster summary: no keys to summarise");
  }
  if (options.clusters < kMinEstimateClusters || options.clusters > kMaxEstimateClusters) {
    return absl::InvalidArgumentError(
        absl::StrCat("estimate_clusters_per_chunk ", options.clusters, " outside [",
                     kMinEstimateClusters, ", ", kMaxEstimateClusters, "]"));
  }
  plans_on_this_thread += 1;
  KMeansOptions km;
  km.k = std::min(options.clusters, n);
  km.iterations = options.iterations;
  km.seed = options.seed;
  km.max_train_points = options.max_train_points;
  KVR_ASSIGN_OR_RETURN(KMeansResult res, SphericalKMeans(keys, km, pool));
  ClusterPlan plan;
  plan.centroids = std::move(res.centroids);
  plan.assignment = std::move(res.assignment);
  plan.second_order = options.second_order;
  return plan;
}

absl::StatusOr<ClusterSummary> ClusterSummary::FromPlan(const ClusterPlan& plan,
                                                        ConstMatrixView keys,
                                                        const ValueMatrix& values) {
  const size_t n = plan.assignment.size();
  const size_t k = plan.centroids.rows;
  const size_t d = keys.cols();
  if (n == 0 || keys.rows() < n || values.rows() < n || plan.centroids.cols != d) {
    return absl::InvalidArgumentError(absl::StrCat(
        "cluster summary: plan of ", n, " keys x ", plan.centroids.cols, " over ", keys.rows(),
        " x ", d, " keys and ", values.rows(), " value rows"));
  }
  ClusterSummary s;
  s.centroids_ = plan.centroids;
  s.value_dim_ = values.cols();
  s.count_.assign(k, 0);
  s.key_sum_.assign(k * d, 0.0);
  s.value_sum_.assign(k * s.value_dim_, 0.0);
  s.key_mean_ = Matrix(k, d);
  s.second_order_ = plan.second_order;
  if (s.second_order_) {
    s.key_sq_sum_.assign(k * d, 0.0);
    s.key_var_ = Matrix(k, d);
  }
  s.value_mean_ = Matrix(k, s.value_dim_);
  s.log_count_.assign(k, kNegInf);
  s.members_.assign(k, {});
  s.assignment_.reserve(n);
  std::vector<float> row(s.value_dim_);
  for (size_t i = 0; i < n; ++i) {
    KVR_CHECK(plan.assignment[i] < k);
    s.AddRow(i, plan.assignment[i], keys, values, &row);
  }
  for (uint32_t c = 0; c < k; ++c) s.RefreshMeans(c);
  return s;
}

absl::StatusOr<ClusterSummary> ClusterSummary::Build(ConstMatrixView keys,
                                                     const ValueMatrix& values,
                                                     const ClusterSummaryOptions& options,
                                                     ThreadPool* pool) {
  if (values.rows() != keys.rows()) {
    return absl::InvalidArgumentError(absl::StrCat("cluster summary: ", values.rows(),
                                                   " value rows != ", keys.rows(), " keys"));
  }
  KVR_ASSIGN_OR_RETURN(ClusterPlan plan, Plan(keys, options, pool));
  return FromPlan(plan, keys, values);
}

absl::Status ClusterSummary::Append(ConstMatrixView keys, const ValueMatrix& values) {
  if (keys.cols() != dim() || values.cols() != value_dim_ || values.rows() != keys.rows() ||
      keys.rows() < size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "cluster summary append: ", keys.rows(), " x ", keys.cols(), " keys / ", values.rows(),
        " x ", values.cols(), " values, summary holds ", size(), " x ", dim()));
  }
  const size_t first = size();
  const size_t added = keys.rows() - first;
  if (added == 0) return absl::OkStatus();
  std::vector<uint32_t> nearest(added);
  AssignNearest(keys.rows_slice(first, added), centroids_.view(), nearest, {}, nullptr);
  std::vector<float> row(value_dim_);
  for (size_t i = 0; i < added; ++i) AddRow(first + i, nearest[i], keys, values, &row);
  for (uint32_t c = 0; c < clusters(); ++c) RefreshMeans(c);
  return absl::OkStatus();
}

void ClusterSummary::AddRow(size_t i, uint32_t c, ConstMatrixView keys,
                            const ValueMatrix& values, std::vector<float>* row) {
  KVR_CHECK(i == assignment_.size() && c < clusters() &&
            i <= std::numeric_limits<uint32_t>::max());
  assignment_.push_back(c);
  members_[c].push_back(static_cast<uint32_t>(i));
  count_[c] += 1;
  const float* k = keys.row(i);
  double* ks = key_sum_.data() + c * dim();
  for (size_t t = 0; t < dim(); ++t) ks[t] += k[t];
  if (second_order_) {
    double* sq = key_sq_sum_.data() + c * dim();
    for (size_t t = 0; t < dim(); ++t) sq[t] += double(k[t]) * k[t];
  }
  values.RowToFloat(i, row->data());
  double* vs = value_sum_.data() + c * value_dim_;
  for (size_t t = 0; t < value_dim_; ++t) vs[t] += (*row)[t];
}

void ClusterSummary::RefreshMeans(uint32_t c) {
  const int64_t n = count_[c];
  float* km = key_mean_.row(c);
  float* vm = value_mean_.row(c);
  if (n == 0) {
    if (second_order_) std::fill_n(key_var_.row(c), dim(), 0.0f);
    std::fill_n(km, dim(), 0.0f);
    std::fill_n(vm, value_dim_, 0.0f);
    log_count_[c] = kNegInf;
    return;
  }
  const double inv = 1.0 / static_cast<double>(n);
  for (size_t t = 0; t < dim(); ++t) km[t] = static_cast<float>(key_sum_[c * dim() + t] * inv);
  if (second_order_) {
    float* kv = key_var_.row(c);
    for (size_t t = 0; t < dim(); ++t) {
      const double mean = key_sum_[c * dim() + t] * inv;
      kv[t] = static_cast<float>(std::max(0.0, key_sq_sum_[c * dim() + t] * inv - mean * mean));
    }
  }
  for (size_t t = 0; t < value_dim_; ++t) {
    vm[t] = static_cast<float>(value_sum_[c * value_dim_ + t] * inv);
  }
  log_count_[c] = static_cast<float>(std::log(static_cast<double>(n)));
}

size_t ClusterSummary::MemoryBytes() const {
  size_t member_bytes = members_.capacity() * sizeof(std::vector<uint32_t>);
  for (const std::vector<uint32_t>& ids : members_) member_bytes += ids.capacity() * sizeof(uint32_t);
  return member_bytes + (centroids_.data.capacity() + key_mean_.data.capacity() +
          value_mean_.data.capacity() + log_count_.capacity()) *
             sizeof(float) +
         assignment_.capacity() * sizeof(uint32_t) + count_.capacity() * sizeof(int64_t) +
         key_var_.data.capacity() * sizeof(float) +
         (key_sum_.capacity() + value_sum_.capacity() + key_sq_sum_.capacity()) * sizeof(double);
}

void ClusterSummary::Estimate(std::span<const float> q, float scale,
                              std::span<const int64_t> exclude, ConstMatrixView keys,
                              const ValueMatrix& values, EstimateScratch* scratch,
                              std::span<float> o, float* m, float* l, EstimateStats* stats,
                              const ExactZoneOptions& zone) const {
  const size_t k = clusters();
  const size_t d = dim();
  const size_t dv = value_dim_;
  KVR_CHECK(scratch != nullptr && q.size() == d && o.size() == dv);
  KVR_CHECK(keys.rows() >= size() && keys.cols() == d && values.rows() >= size() &&
            values.cols() == dv);
  EstimateScratch& s = *scratch;
  if (s.excluded.size() < k) {
    s.excluded.assign(k, 0);
    s.slot.resize(k);
    s.scores.resize(k);
  }
  if (s.mean.size() < std::max(d, dv)) s.mean.resize(std::max(d, dv));
  if (s.row.size() < dv) s.row.resize(dv);
  s.touched.clear();
  // Take the retrieved keys out of their clusters (per-query adjustments).
  for (const int64_t id : exclude) {
    if (id < 0) continue;
    KVR_CHECK(static_cast<size_t>(id) < size());
    const uint32_t c = assignment_[static_cast<size_t>(id)];
    if (s.excluded[c] == 0) {
      s.slot[c] = static_cast<uint32_t>(s.touched.size());
      s.touched.push_back(c);
      if (s.key_adj.size() < s.touched.size() * d) s.key_adj.resize(s.touched.size() * d);
      if (s.value_adj.size() < s.touched.size() * dv) s.value_adj.resize(s.touched.size() * dv);
      std::fill_n(s.key_adj.data() + s.slot[c] * d, d, 0.0);
      if (second_order_) {
        if (s.sq_adj.size() < s.touched.size() * d) s.sq_adj.resize(s.touched.size() * d);
        std::fill_n(s.sq_adj.data() + s.slot[c] * d, d, 0.0);
      }
      std::fill_n(s.value_adj.data() + s.slot[c] * dv, dv, 0.0);
    }
    s.excluded[c] += 1;
    const float* key = keys.row(static_cast<size_t>(id));
    double* ka = s.key_adj.data() + s.slot[c] * d;
    for (size_t t = 0; t < d; ++t) ka[t] += key[t];
    if (second_order_) {
      double* sa = s.sq_adj.data() + s.slot[c] * d;
      for (size_t t = 0; t < d; ++t) sa[t] += double(key[t]) * key[t];
    }
    values.RowToFloat(static_cast<size_t>(id), s.row.data());
    double* va = s.value_adj.data() + s.slot[c] * dv;
    for (size_t t = 0; t < dv; ++t) va[t] += s.row[t];
  }
  // Pseudo-key scores: scale * q.mean + ln(n').
  simd::Active().dot_batch(q.data(), key_mean_.data.data(), k, d, d, s.scores.data());
  for (size_t c = 0; c < k; ++c) s.scores[c] = s.scores[c] * scale + log_count_[c];
  const float half_s2 = 0.5f * scale * scale;
  if (second_order_) {
    if (s.q2.size() < d) s.q2.resize(d);
    if (s.var_scores.size() < k) s.var_scores.resize(k);
    for (size_t t = 0; t < d; ++t) s.q2[t] = q[t] * q[t];
    simd::Active().dot_batch(s.q2.data(), key_var_.data.data(), k, d, d, s.var_scores.data());
    for (size_t c = 0; c < k; ++c) s.scores[c] += std::log1p(half_s2 * s.var_scores[c]);
  }
  for (const uint32_t c : s.touched) {
    const int64_t left = count_[c] - static_cast<int64_t>(s.excluded[c]);
    if (left <= 0) {
      s.scores[c] = kNegInf;
      continue;
    }
    const double inv = 1.0 / static_cast<double>(left);
    const double* ks = key_sum_.data() + c * d;
    const double* ka = s.key_adj.data() + s.slot[c] * d;
    for (size_t t = 0; t < d; ++t) s.mean[t] = static_cast<float>((ks[t] - ka[t]) * inv);
    s.scores[c] = simd::Dot(q.data(), s.mean.data(), d) * scale +
                  static_cast<float>(std::log(static_cast<double>(left)));
    if (second_order_) {
      const double* sq = key_sq_sum_.data() + c * d;
      const double* sa = s.sq_adj.data() + s.slot[c] * d;
      double var_term = 0;
      for (size_t t = 0; t < d; ++t) {
        const double mean = (ks[t] - ka[t]) * inv;
        var_term += double(s.q2[t]) * std::max(0.0, (sq[t] - sa[t]) * inv - mean * mean);
      }
      s.scores[c] += static_cast<float>(std::log1p(half_s2 * var_term));
    }
  }
  // The exact zone takes the clusters of most mass out of the estimate.
  float zm = kNegInf;
  float zl = 0.0f;
  const bool zone_used =
      zone.keys_fraction > 0.0 &&
      AttendExactZone(q, scale, exclude, keys, values, zone, &s, &zm, &zl, stats);
  float mx = kNegInf;
  for (size_t c = 0; c < k; ++c) mx = std::max(mx, s.scores[c]);
  if (mx == kNegInf) {
    for (const uint32_t c : s.touched) s.excluded[c] = 0;
    SetEmpty(o, m, l);
    if (zone_used) MergeInto(o, m, l, std::span<const float>(s.zone_o.data(), dv), zm, zl);
    return;
  }
  std::fill(o.begin(), o.end(), 0.0f);
  double sum = 0;
  int64_t keys_left = 0;
  int64_t clusters_left = 0;
  for (size_t c = 0; c < k; ++c) {
    if (s.scores[c] == kNegInf) continue;
    const float w = std::exp(s.scores[c] - mx);
    sum += w;
    const int64_t left = count_[c] - static_cast<int64_t>(s.excluded[c]);
    keys_left += left;
    clusters_left += 1;
    if (s.excluded[c] == 0) {
      simd::Active().axpy(w, value_mean_.row(c), o.data(), dv);
    } else {
      const double inv = 1.0 / static_cast<double>(left);
      const double* vs = value_sum_.data() + c * dv;
      const double* va = s.value_adj.data() + s.slot[c] * dv;
      for (size_t t = 0; t < dv; ++t) o[t] += w * static_cast<float>((vs[t] - va[t]) * inv);
    }
  }
  for (const uint32_t c : s.touched) s.excluded[c] = 0;
  const float inv_sum = static_cast<float>(1.0 / sum);
  for (float& x : o) x *= inv_sum;
  *m = mx;
  *l = static_cast<float>(sum);
  if (zone_used) MergeInto(o, m, l, std::span<const float>(s.zone_o.data(), dv), zm, zl);
  if (stats != nullptr) {
    stats->keys_estimated += keys_left;
    stats->clusters_estimated += clusters_left;
  }
}

bool ClusterSummary::AttendExactZone(std::span<const float> q, float scale,
                                     std::span<const int64_t> exclude, ConstMatrixView keys,
                                     const ValueMatrix& values, const ExactZoneOptions& zone,
                                     EstimateScratch* scratch, float* zm, float* zl,
                                     EstimateStats* stats) const {
  EstimateScratch& s = *scratch;
  // keys_fraction is in [0, 1] (ValidateExactZone): the budget is <= size().
  const size_t budget = static_cast<size_t>(zone.keys_fraction * static_cast<double>(size()));
  if (budget == 0) return false;
  const size_t k = clusters();
  s.order.clear();
  float top = kNegInf;
  for (size_t c = 0; c < k; ++c) {
    if (s.scores[c] == kNegInf) continue;
    s.order.push_back(static_cast<uint32_t>(c));
    top = std::max(top, s.scores[c]);
  }
  if (s.order.empty()) return false;
  const std::vector<float>& score = s.scores;
  std::sort(s.order.begin(), s.order.end(), [&score](uint32_t a, uint32_t b) {
    return score[a] > score[b] || (score[a] == score[b] && a < b);
  });
  // The mass stop (mass_fraction < 1) needs the remainder's total mass.
  const bool mass_stop = zone.mass_fraction < 1.0;
  double total = 0;
  if (mass_stop) {
    for (const uint32_t c : s.order) total += std::exp(static_cast<double>(score[c] - top));
  }
  const double target = zone.mass_fraction * total;
  double mass = 0;
  size_t used = 0;
  size_t picked = 0;
  for (; picked < s.order.size(); ++picked) {
    if (mass_stop && mass >= target) break;
    const uint32_t c = s.order[picked];
    const size_t left = static_cast<size_t>(count_[c]) - s.excluded[c];
    if (left > budget - used) break;
    used += left;
    if (mass_stop) mass += std::exp(static_cast<double>(score[c] - top));
  }
  if (picked == 0) return false;
  const size_t d = dim();
  if (s.zone_ids.size() < used) {
    s.zone_ids.resize(used);
    s.zone_rows.resize(used);
    s.zone_scores.resize(used);
    s.zone_weights.resize(used);
  }
  if (s.zone_o.size() < value_dim_) s.zone_o.resize(value_dim_);
  bool sorted = false;
  size_t n_zone = 0;
  for (size_t i = 0; i < picked; ++i) {
    const uint32_t c = s.order[i];
    const bool check = s.excluded[c] > 0;
    if (check && !sorted) {
      s.sorted_exclude.clear();
      for (const int64_t id : exclude) {
        if (id >= 0) s.sorted_exclude.push_back(id);
      }
      std::sort(s.sorted_exclude.begin(), s.sorted_exclude.end());
      sorted = true;
    }
    for (const uint32_t id : members_[c]) {
      if (check && std::binary_search(s.sorted_exclude.begin(), s.sorted_exclude.end(),
                                      static_cast<int64_t>(id))) {
        continue;
      }
      KVR_CHECK(n_zone < used);
      s.zone_rows[n_zone++] = id;
    }
    s.scores[c] = kNegInf;  // attended exactly: out of the estimate
  }
  KVR_CHECK(n_zone == used);
  // Scattered key rows: the gather kernel prefetches the next rows.
  simd::Active().dot_gather(q.data(), keys.data(), s.zone_rows.data(), used, d, keys.stride(),
                            s.zone_scores.data());
  for (size_t j = 0; j < used; ++j) {
    s.zone_scores[j] *= scale;
    s.zone_ids[j] = s.zone_rows[j];
  }
  PartialFromScores(std::span<const float>(s.zone_scores.data(), used),
                    std::span<const int64_t>(s.zone_ids.data(), used), values,
                    std::span<float>(s.zone_weights.data(), used),
                    std::span<float>(s.zone_o.data(), value_dim_), zm, zl);
  if (stats != nullptr) {
    stats->keys_exact_zone += static_cast<int64_t>(used);
    stats->clusters_exact_zone += static_cast<int64_t>(picked);
  }
  return true;
}

}  // namespace kvr::index
