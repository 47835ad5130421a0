#include "common/train_topk.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <string>

#include "absl/strings/str_cat.h"
#include "common/exact_topk.h"
#include "common/simd/kernels.h"
#include "common/status.h"
#include "common/topk_collector.h"

namespace kvr {
namespace {

// SplitMix64's finaliser: a well-mixed 64-bit hash of x.
uint64_t Mix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// floor(a * b / c) without overflow (a, b, c < 2^64, a * b / c < 2^64).
size_t MulDiv(size_t a, size_t b, size_t c) {
  return static_cast<size_t>(static_cast<unsigned __int128>(a) * b / c);
}

// k-means sample: at most this many points per cluster.
constexpr size_t kKMeansPointsPerList = 64;
// Keys sampled for the candidate thresholds of kApprox.
constexpr size_t kThresholdSampleKeys = 8192;
// Keys sampled for the per-channel key statistics of kApprox.
constexpr size_t kChannelStatKeys = 65536;
// Queries of one dot_batch_multi block.
constexpr size_t kApproxQueryBlock = 32;
// Keys of one score tile (kApproxQueryBlock x this many floats of scores).
constexpr size_t kApproxKeyTile = 1024;

// Scales every row of `m` to unit L2 norm (rows of norm 0 stay 0).
void NormalizeRows(Matrix* m) {
  for (size_t i = 0; i < m->rows; ++i) {
    float* r = m->row(i);
    double n2 = 0;
    for (size_t j = 0; j < m->cols; ++j) n2 += double(r[j]) * r[j];
    if (n2 <= 0) continue;
    const float inv = static_cast<float>(1.0 / std::sqrt(n2));
    for (size_t j = 0; j < m->cols; ++j) r[j] *= inv;
  }
}

// Row i's argmax_c rows[i] . centroids[c] (smallest c on ties) for every row.
std::vector<uint32_t> AssignToCentroids(ConstMatrixView rows, const Matrix& centroids,
                                        ThreadPool* pool) {
  std::vector<int64_t> best(rows.rows());
  std::vector<float> best_score(rows.rows());
  ExactTopKScratch scratch;
  ExactTopKScan(centroids.view(), rows, 1, best, best_score, pool, &scratch);
  std::vector<uint32_t> out(rows.rows());
  for (size_t i = 0; i < out.size(); ++i) out[i] = static_cast<uint32_t>(best[i]);
  return out;
}

// Spherical k-means centroids (unit norm) of a strided sample of `keys`
// (rows):
// seeded by evenly spaced sample rows, `iterations` Lloyd steps (an empty
// list keeps its centroid). Deterministic.
Matrix ApproxCentroids(ConstMatrixView keys, size_t lists, int iterations, ThreadPool* pool) {
  const size_t n = keys.rows(), dim = keys.cols();
  const size_t s = std::min(n, lists * kKMeansPointsPerList);
  Matrix sample(s, dim);
  for (size_t i = 0; i < s; ++i) std::copy_n(keys.row(MulDiv(i, n, s)), dim, sample.row(i));
  Matrix centroids(lists, dim);
  for (size_t c = 0; c < lists; ++c) {
    std::copy_n(sample.row(MulDiv(c, s, lists)), dim, centroids.row(c));
  }
  NormalizeRows(&centroids);
  std::vector<double> sum(lists * dim);
  std::vector<size_t> count(lists);
  for (int it = 0; it < iterations; ++it) {
    const std::vector<uint32_t> a = AssignToCentroids(sample.view(), centroids, pool);
    std::fill(sum.begin(), sum.end(), 0.0);
    std::fill(count.begin(), count.end(), 0);
    for (size_t i = 0; i < s; ++i) {
      double* acc = sum.data() + size_t{a[i]} * dim;
      const float* r = sample.row(i);
      for (size_t j = 0; j < dim; ++j) acc[j] += r[j];
      ++count[a[i]];
    }
    for (size_t c = 0; c < lists; ++c) {
      if (count[c] == 0) continue;
      for (size_t j = 0; j < dim; ++j) {
        centroids.row(c)[j] = static_cast<float>(sum[c * dim + j] / double(count[c]));
      }
    }
    NormalizeRows(&centroids);
  }
  return centroids;
}

// Query groups of m queries: ceil(m / group_size), at most m.
size_t ApproxGroupCount(size_t m, const TrainingTopKOptions& options) {
  const size_t g = std::max<size_t>(options.approx_group_size, 1);
  return std::max<size_t>(1, std::min(m, (m + g - 1) / g));
}

// Candidate keys of a group: ceil(fraction * n), in [k, n].
size_t ApproxCandidateCount(size_t n, size_t k, double fraction) {
  const double c = std::ceil(fraction * double(n));
  return std::clamp<size_t>(static_cast<size_t>(c), std::min(k, n), n);
}

// kApprox on validated arguments (queries finite, outputs large enough,
// k <= candidates < keys.rows(), 1 <= groups <= queries.rows()).
void ApproxScan(ConstMatrixView keys, ConstMatrixView queries, size_t k, size_t groups,
                size_t candidates, int iterations, ThreadPool* pool, std::span<int64_t> ids,
                std::span<float> scores) {
  const size_t n = keys.rows(), dim = keys.cols(), m = queries.rows();
  // A query's ranking of the keys depends only on q . (k - mean), whose
  // spread over the keys is carried by the channels where keys vary: queries
  // are grouped by the direction of x = s * q (s: the keys' per-channel
  // standard deviation) and not by their raw direction (a large query mean
  // where keys barely vary would dominate it).
  std::vector<double> kmean(dim, 0.0), kvar(dim, 0.0);
  const size_t ns = std::min<size_t>(n, kChannelStatKeys);
  for (size_t i = 0; i < ns; ++i) {
    const float* r = keys.row(MulDiv(i, n, ns));
    for (size_t j = 0; j < dim; ++j) kmean[j] += r[j];
  }
  for (size_t j = 0; j < dim; ++j) kmean[j] /= double(ns);
  for (size_t i = 0; i < ns; ++i) {
    const float* r = keys.row(MulDiv(i, n, ns));
    for (size_t j = 0; j < dim; ++j) kvar[j] += (r[j] - kmean[j]) * (r[j] - kmean[j]);
  }
  std::vector<float> sd(dim);
  for (size_t j = 0; j < dim; ++j) sd[j] = static_cast<float>(std::sqrt(kvar[j] / double(ns)));
  Matrix unit(m, dim);
  std::vector<float> inv_scale(m, 0.0f);  // 1 / |s * q| (0 when that is 0)
  for (size_t q = 0; q < m; ++q) {
    const float* r = queries.row(q);
    float* x = unit.row(q);
    double n2 = 0;
    for (size_t j = 0; j < dim; ++j) {
      x[j] = sd[j] * r[j];
      n2 += double(x[j]) * x[j];
    }
    if (n2 > 0) inv_scale[q] = static_cast<float>(1.0 / std::sqrt(n2));
  }
  NormalizeRows(&unit);
  const Matrix grouping = ApproxCentroids(unit.view(), groups, iterations, pool);
  const std::vector<uint32_t> group_of = AssignToCentroids(unit.view(), grouping, pool);
  unit = Matrix();
  // Members of each group in increasing order (a counting sort), and each
  // group's scoring centroid: the mean of its members' q / |s * q|.
  std::vector<size_t> moff(groups + 1, 0);
  for (uint32_t g : group_of) ++moff[size_t{g} + 1];
  for (size_t g = 0; g < groups; ++g) moff[g + 1] += moff[g];
  std::vector<uint32_t> members(m);
  {
    std::vector<size_t> next(moff.begin(), moff.end() - 1);
    for (size_t q = 0; q < m; ++q) members[next[group_of[q]]++] = static_cast<uint32_t>(q);
  }
  Matrix centroids(groups, dim);
  for (size_t q = 0; q < m; ++q) {
    float* c = centroids.row(group_of[q]);
    const float* r = queries.row(q);
    for (size_t j = 0; j < dim; ++j) c[j] += inv_scale[q] * r[j];
  }
  // Each group's candidates: about `candidates` keys its centroid scores
  // best, found by thresholds read off a strided key sample (no per-group
  // selection over every key): keys above the sample's top-4k quantile come
  // first (a member's threshold rises early, so its collector rejects most
  // of the rest with one compare), then the others above the candidates'
  // quantile.
  const auto& kern = simd::Active();
  std::vector<std::vector<uint32_t>> cand(groups);
  {
    const size_t ss = std::min(n, kThresholdSampleKeys);
    Matrix key_sample(ss, dim);
    for (size_t i = 0; i < ss; ++i) std::copy_n(keys.row(MulDiv(i, n, ss)), dim, key_sample.row(i));
    // Rank (0-based, descending) in the sample of the hi / lo thresholds.
    const size_t r_lo = std::min(ss - 1, MulDiv(candidates, ss, n));
    const size_t r_hi = std::min(r_lo, MulDiv(4 * k, ss, n));
    const size_t blocks = (groups + kApproxQueryBlock - 1) / kApproxQueryBlock;
    const size_t cap = 2 * candidates;
    auto select = [&](size_t b0, size_t b1) {
      std::vector<float> sc(kApproxQueryBlock * std::max(ss, kApproxKeyTile));
      std::vector<float> lo(kApproxQueryBlock), hi(kApproxQueryBlock);
      std::vector<std::vector<uint32_t>> back(kApproxQueryBlock);
      for (size_t b = b0; b < b1; ++b) {
        const size_t g0 = b * kApproxQueryBlock, ng = std::min(kApproxQueryBlock, groups - g0);
        const size_t stride = std::max(ss, kApproxKeyTile);
        kern.dot_batch_multi(centroids.row(g0), ng, dim, key_sample.row(0), ss, dim, dim,
                             sc.data(), stride);
        for (size_t j = 0; j < ng; ++j) {
          float* row = sc.data() + j * stride;
          std::nth_element(row, row + r_lo, row + ss, std::greater<float>());
          lo[j] = row[r_lo];
          std::nth_element(row, row + r_hi, row + r_lo + 1, std::greater<float>());
          hi[j] = row[r_hi];
          cand[g0 + j].reserve(candidates + candidates / 4);
          back[j].clear();
        }
        for (size_t t0 = 0; t0 < n; t0 += kApproxKeyTile) {
          const size_t tn = std::min(kApproxKeyTile, n - t0);
          kern.dot_batch_multi(centroids.row(g0), ng, dim, keys.row(t0), tn, dim, keys.stride(),
                               sc.data(), kApproxKeyTile);
          for (size_t j = 0; j < ng; ++j) {
            const float* row = sc.data() + j * kApproxKeyTile;
            std::vector<uint32_t>& front = cand[g0 + j];
            for (size_t i = 0; i < tn; ++i) {
              // At most 2x the expected count (ties, e.g. equal keys, could
              // otherwise make every key a candidate of every group).
              if (row[i] >= lo[j] && front.size() + back[j].size() < cap) {
                (row[i] >= hi[j] ? front : back[j]).push_back(static_cast<uint32_t>(t0 + i));
              }
            }
          }
        }
        for (size_t j = 0; j < ng; ++j) {
          cand[g0 + j].insert(cand[g0 + j].end(), back[j].begin(), back[j].end());
        }
      }
    };
    if (pool == nullptr || blocks <= 1) {
      select(0, blocks);
    } else {
      pool->ParallelFor(blocks, 1, select);
    }
  }
  auto run = [&](size_t g0, size_t g1) {
    std::vector<TopKCollector> collectors(kApproxQueryBlock);
    Matrix block(kApproxQueryBlock, dim);
    std::vector<float> gathered;
    Matrix short_block;
    std::vector<float> sc(kApproxQueryBlock * kApproxKeyTile);
    std::vector<ScoredId> best(k);
    for (size_t g = g0; g < g1; ++g) {
      if (moff[g] == moff[g + 1]) continue;
      // Candidates best first for the centroid: a member's threshold rises
      // early, so its collector rejects most of the rest with one compare.
      const std::vector<uint32_t>& cg = cand[g];
      const size_t cn = cg.size();
      if (cn < k) {
        // The sample's threshold let fewer than k keys through: the exact
        // scan for this group's members.
        const size_t nm = moff[g + 1] - moff[g];
        short_block = Matrix(nm, dim);
        for (size_t j = 0; j < nm; ++j) {
          std::copy_n(queries.row(members[moff[g] + j]), dim, short_block.row(j));
        }
        std::vector<int64_t> sid(nm * k);
        std::vector<float> ssc(nm * k);
        ExactTopKScratch scratch;
        ExactTopKScan(keys, short_block.view(), k, sid, ssc, nullptr, &scratch);
        for (size_t j = 0; j < nm; ++j) {
          std::copy_n(sid.data() + j * k, k, ids.data() + size_t{members[moff[g] + j]} * k);
          std::copy_n(ssc.data() + j * k, k, scores.data() + size_t{members[moff[g] + j]} * k);
        }
        continue;
      }
      if (gathered.size() < cn * dim) gathered.resize(cn * dim);
      for (size_t i = 0; i < cn; ++i) {
        std::copy_n(keys.row(cg[i]), dim, gathered.data() + i * dim);
      }
      for (size_t b = moff[g]; b < moff[g + 1]; b += kApproxQueryBlock) {
        const size_t nq = std::min(kApproxQueryBlock, moff[g + 1] - b);
        for (size_t j = 0; j < nq; ++j) {
          std::copy_n(queries.row(members[b + j]), dim, block.row(j));
          collectors[j].Reset(k);
        }
        for (size_t t0 = 0; t0 < cn; t0 += kApproxKeyTile) {
          const size_t tn = std::min(kApproxKeyTile, cn - t0);
          kern.dot_batch_multi(block.row(0), nq, dim, gathered.data() + t0 * dim, tn, dim, dim,
                               sc.data(), kApproxKeyTile);
          for (size_t j = 0; j < nq; ++j) {
            collectors[j].PushRange(sc.data() + j * kApproxKeyTile, tn,
                                    static_cast<uint32_t>(t0));
          }
        }
        for (size_t j = 0; j < nq; ++j) {
          int64_t* io = ids.data() + size_t{members[b + j]} * k;
          float* so = scores.data() + size_t{members[b + j]} * k;
          collectors[j].Finish(io, so);
          // Back to key ids, re-sorted so that ties order by key id.
          for (size_t i = 0; i < k; ++i) {
            best[i] = {so[i], cg[static_cast<size_t>(io[i])]};
          }
          std::sort(best.begin(), best.end(), BetterScored);
          for (size_t i = 0; i < k; ++i) {
            io[i] = best[i].id;
            so[i] = best[i].score;
          }
        }
      }
    }
  };
  if (pool == nullptr || groups <= 1) {
    run(0, groups);
  } else {
    pool->ParallelFor(groups, 1, run);
  }
}

}  // namespace

const char* TrainingTopKModeName(TrainingTopKMode mode) {
  return mode == TrainingTopKMode::kApprox ? "approx" : "exact";
}

std::optional<TrainingTopKMode> ParseTrainingTopKMode(absl::string_view name) {
  if (name == "exact") return TrainingTopKMode::kExact;
  if (name == "approx") return TrainingTopKMode::kApprox;
  return std::nullopt;
}

absl::Status ValidateTrainingTopKOptions(const TrainingTopKOptions& options) {
  if (options.max_queries > kMaxTrainingQueries) {
    return absl::InvalidArgumentError(absl::StrCat("max_queries (--max_train_queries) ",
                                                   options.max_queries,
                                                   " outside [0, ", kMaxTrainingQueries,
                                                   "] (0 = every query)"));
  }
  if (options.mode != TrainingTopKMode::kExact && options.mode != TrainingTopKMode::kApprox) {
    return absl::InvalidArgumentError(absl::StrCat(
        "mode (--train_topk) ", static_cast<int>(options.mode), " is not exact or approx"));
  }
  if (options.approx_group_size < 1 || options.approx_group_size > kMaxApproxGroupSize) {
    return absl::InvalidArgumentError(absl::StrCat("approx_group_size ",
                                                   options.approx_group_size, " outside [1, ",
                                                   kMaxApproxGroupSize, "]"));
  }
  if (!(options.approx_candidate_fraction > 0 && options.approx_candidate_fraction <= 1)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "approx_candidate_fraction ", options.approx_candidate_fraction, " outside (0, 1]"));
  }
  if (options.approx_kmeans_iterations < 0 ||
      options.approx_kmeans_iterations > kMaxApproxKMeansIterations) {
    return absl::InvalidArgumentError(absl::StrCat("approx_kmeans_iterations ",
                                                   options.approx_kmeans_iterations,
                                                   " outside [0, ", kMaxApproxKMeansIterations,
                                                   "]"));
  }
  if (options.approx_min_keys > kMaxTopKKeys) {
    return absl::InvalidArgumentError(absl::StrCat(
        "approx_min_keys ", options.approx_min_keys, " outside [0, ", kMaxTopKKeys, "]"));
  }
  return absl::OkStatus();
}

size_t TrainingQueryCount(size_t rows, const TrainingTopKOptions& options) {
  return options.max_queries == 0 ? rows : std::min(rows, options.max_queries);
}

std::vector<size_t> TrainingQuerySample(size_t rows, const TrainingTopKOptions& options) {
  const size_t m = TrainingQueryCount(rows, options);
  std::vector<size_t> sample(m);
  if (m == rows) {
    for (size_t i = 0; i < m; ++i) sample[i] = i;
    return sample;
  }
  // m < rows: every stratum [lo, hi) holds at least one row.
  for (size_t i = 0; i < m; ++i) {
    const size_t lo = MulDiv(i, rows, m), hi = MulDiv(i + 1, rows, m);
    sample[i] = lo + static_cast<size_t>(Mix64(options.seed ^ Mix64(i)) % (hi - lo));
  }
  return sample;
}

absl::Status TrainingTopK(ConstMatrixView keys, ConstMatrixView queries, int k,
                          const TrainingTopKOptions& options, ThreadPool* pool,
                          std::span<int64_t> ids, std::span<float> scores,
                          std::vector<size_t>* sample) {
  KVR_RETURN_IF_ERROR(ValidateTrainingTopKOptions(options));
  if (keys.rows() > kMaxTopKKeys) {
    return absl::InvalidArgumentError(absl::StrCat("training top-k over ", keys.rows(),
                                                   " keys exceeds the limit ", kMaxTopKKeys));
  }
  std::vector<size_t> rows = TrainingQuerySample(queries.rows(), options);
  const size_t m = rows.size();
  // Validated on the sample's shape (and every query's finiteness below).
  KVR_RETURN_IF_ERROR(ValidateTopKArgs(keys.cols(), keys.rows(), queries.rows_slice(0, 0), k,
                                       ids, scores, "key set"));
  if (queries.rows() > 0 && queries.cols() != keys.cols()) {
    return absl::InvalidArgumentError(
        absl::StrCat("query dim ", queries.cols(), " != key set dim ", keys.cols()));
  }
  const size_t need = m * static_cast<size_t>(k);
  if (ids.size() < need || scores.size() < need) {
    return absl::InvalidArgumentError(absl::StrCat(
        "output holds ", ids.size(), " ids and ", scores.size(), " scores, need ", need, " (",
        m, " sampled queries x k=", k, ")"));
  }
  ConstMatrixView scanned = queries;
  Matrix gathered;
  if (m < queries.rows()) {
    gathered = Matrix(m, queries.cols());
    for (size_t i = 0; i < m; ++i) {
      std::copy_n(queries.row(rows[i]), queries.cols(), gathered.row(i));
    }
    scanned = gathered.view();
  }
  KVR_RETURN_IF_ERROR(CheckFinite(scanned, "training queries"));
  if (m > 0) {
    const size_t ku = static_cast<size_t>(k);
    const size_t candidates =
        ApproxCandidateCount(keys.rows(), ku, options.approx_candidate_fraction);
    if (options.mode == TrainingTopKMode::kApprox && keys.rows() >= options.approx_min_keys &&
        candidates < keys.rows()) {
      ApproxScan(keys, scanned, ku, ApproxGroupCount(m, options), candidates,
                 options.approx_kmeans_iterations, pool, ids, scores);
    } else {
      ExactTopKScratch scratch;
      ExactTopKScan(keys, scanned, static_cast<size_t>(k), ids, scores, pool, &scratch);
    }
  }
  if (sample != nullptr) *sample = std::move(rows);
  return absl::OkStatus();
}

}  // namespace kvr
