// estimate_bench: remainder estimation (issue 18, retrieval_node/index/
// cluster_summary.h) on the index_bench data families
// (tools/attention_data) and with planted needles.
//
//   build/bench/estimate_bench [--n_keys 131072] [--k 100] [--clusters 256]
//       [--families all] [--needles 100] [--n_test 200] [--target_recall 0.95]
//
// Per family (one shard of n_keys keys, bf16 values, one thread), for the
// first-order estimator ("e1", before session 26) and the second-order one
// ("e2", ClusterSummaryOptions::second_order, session 26; off by default) in one run:
//  * relative L2 error of the attention output against full attention for
//    exact top-k (flat), exact top-k + e1 / + e2, IVF top-k, IVF + e1 / + e2;
//  * the IVF nprobe self-calibrated (index/calibrate.h CalibrateEffort on
//    256 of the family's prefill queries with their exact top-k) for
//    --target_recall, and the recall@k it gives the decode queries
//    (--nprobe > 0 overrides the calibration);
//  * Attend time per query with that IVF index, without and with e1 / e2,
//    and the ratios (target <= 1.3x);
//  * needles: --needles key/value pairs planted at random depths, each with
//    its own query (a decode query of the family plus a random direction the
//    needle key points along, sized so the needle holds ~73% of the full
//    attention mass); found = cos(output, needle value) >= 0.5, for full
//    attention, exact top-k (flat), flat + estimate, IVF top-k, IVF +
//    estimate (target >= 99%; IVF at its default nprobe misses needles that
//    its lists do not cover: a retrieval miss, not the estimate's);
//  * the exact zone (session 27, ExactZoneOptions): for each budget in
//    --zone_fractions (fraction of the shard's keys attended exactly, in the
//    clusters of most estimated mass) over e1 and/or e2 (--zone_orders):
//    the error of exact top-k + zone and IVF + zone, the IVF Attend time
//    and its ratio to the IVF Attend without estimation (timed in their own
//    interleaved loop, fastest of --reps), and zone keys / clusters per query.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "common/attention.h"
#include "common/status.h"
#include "common/value_matrix.h"
#include "retrieval_node/index/attend.h"
#include "retrieval_node/index/calibrate.h"
#include "retrieval_node/index/cluster_summary.h"
#include "retrieval_node/index/flat_index.h"
#include "retrieval_node/index/ivf_index.h"
#include "tools/attention_data.h"

ABSL_FLAG(int64_t, n_keys, 131072, "keys per shard");
ABSL_FLAG(int, dim, 128, "head dimension");
ABSL_FLAG(int, n_test, 200, "decode queries per family");
ABSL_FLAG(int, k, 100, "top-k");
ABSL_FLAG(int, clusters, 256, "estimate clusters per shard");
ABSL_FLAG(int, nprobe, 0, "IVF lists probed (0: self-calibrated for --target_recall)");
ABSL_FLAG(double, target_recall, 0.95, "recall@k the IVF nprobe is calibrated for");
ABSL_FLAG(std::string, families, "all", "comma-separated families, or all");
ABSL_FLAG(int, needles, 100, "needles planted per family (0: skip)");
ABSL_FLAG(uint64_t, seed, 1, "data and needle seed");
ABSL_FLAG(int, reps, 5, "timing repetitions (interleaved; the fastest counts)");
ABSL_FLAG(std::string, zone_fractions, "0,0.01,0.02,0.05",
          "exact-zone key budgets (fractions of the shard's keys) to compare; empty: skip");
ABSL_FLAG(std::string, zone_orders, "1,2", "estimators (1: first order, 2: second) under the zone");
ABSL_FLAG(double, zone_mass_fraction, 1.0,
          "exact zone: stop adding clusters at this fraction of the estimated remainder mass");

namespace kvr {
namespace {

using Clock = std::chrono::steady_clock;

[[noreturn]] void Fail(const absl::Status& s) {
  std::fprintf(stderr, "estimate_bench: %s\n", s.ToString().c_str());
  std::exit(1);
}

double MeanRelErr(const Partials& a, const Partials& ref) {
  double sum = 0;
  for (size_t i = 0; i < a.m.size(); ++i) {
    double num = 0, den = 0;
    for (size_t j = 0; j < a.o.cols; ++j) {
      const double e = ref.o.row(i)[j], x = a.o.row(i)[j];
      num += (x - e) * (x - e);
      den += e * e;
    }
    sum += std::sqrt(num / std::max(den, 1e-30));
  }
  return sum / static_cast<double>(a.m.size());
}

// Attends every query one at a time; returns microseconds per query.
// `est` (may be null) accumulates the estimate's counts.
double AttendAll(ConstMatrixView q, const index::KeyIndex& idx, const ValueMatrix& values,
                 const index::AttendParams& p, Partials* out,
                 index::EstimateStats* est = nullptr) {
  index::AttendScratch scratch;
  const auto t0 = Clock::now();
  for (size_t i = 0; i < q.rows(); ++i) {
    if (auto s = index::Attend(q.rows_slice(i, 1), idx, values, p, out->view().slice(i, 1),
                               &scratch, nullptr, est);
        !s.ok()) {
      Fail(s);
    }
  }
  return 1e6 * std::chrono::duration<double>(Clock::now() - t0).count() /
         static_cast<double>(q.rows());
}

void RunFamily(const std::string& family) {
  AttentionDataOptions opt;
  opt.family = family;
  opt.n_keys = static_cast<size_t>(absl::GetFlag(FLAGS_n_keys));
  opt.n_train = std::min<size_t>(1024, opt.n_keys);
  opt.n_test = static_cast<size_t>(absl::GetFlag(FLAGS_n_test));
  opt.dim = static_cast<size_t>(absl::GetFlag(FLAGS_dim));
  opt.seed = absl::GetFlag(FLAGS_seed);
  auto data = GenerateAttentionData(opt);
  if (!data.ok()) Fail(data.status());
  const size_t n = opt.n_keys, d = opt.dim, nq = opt.n_test;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  const int k = absl::GetFlag(FLAGS_k);

  // Needles: planted before anything is built, each with its own query.
  const size_t n_needles = std::min<size_t>(static_cast<size_t>(absl::GetFlag(FLAGS_needles)), n);
  Matrix needle_q(n_needles, d);
  std::vector<size_t> needle_pos(n_needles);
  {
    std::mt19937_64 rng(opt.seed * 7919 + 17);
    std::normal_distribution<float> g;
    std::vector<size_t> perm(n);
    for (size_t i = 0; i < n; ++i) perm[i] = i;
    std::shuffle(perm.begin(), perm.end(), rng);
    const ValueMatrix plain = ValueMatrix::FromFloat(DType::kF32, data->values.view());
    double value_norm = 0;
    for (size_t i = 0; i < std::min<size_t>(n, 1000); ++i) {
      double s = 0;
      for (size_t t = 0; t < d; ++t) s += double(data->values.row(i)[t]) * data->values.row(i)[t];
      value_norm += std::sqrt(s) / static_cast<double>(std::min<size_t>(n, 1000));
    }
    for (size_t j = 0; j < n_needles; ++j) {
      needle_pos[j] = perm[j];
      std::vector<float> r(d);
      double rn = 0;
      for (float& x : r) { x = g(rng); rn += double(x) * x; }
      for (float& x : r) x = static_cast<float>(x / std::sqrt(rn));
      const float* base = data->test_queries.row(j % nq);
      double qn = 0;
      for (size_t t = 0; t < d; ++t) qn += double(base[t]) * base[t];
      qn = std::sqrt(qn);
      float* q = needle_q.row(j);
      for (size_t t = 0; t < d; ++t) q[t] = base[t] + static_cast<float>(qn) * r[t];
      // Background log-sum-exp of this query over the original keys.
      double m = -INFINITY;
      std::vector<double> s(n);
      for (size_t i = 0; i < n; ++i) {
        double dot = 0;
        for (size_t t = 0; t < d; ++t) dot += double(q[t]) * data->keys.row(i)[t];
        s[i] = dot * scale;
        m = std::max(m, s[i]);
      }
      double l = 0;
      for (double x : s) l += std::exp(x - m);
      const double target = m + std::log(l) + 1.0;  // weight e/(1+e) ~ 0.73
      double qr = 0;
      for (size_t t = 0; t < d; ++t) qr += double(q[t]) * r[t];
      const double c = target / (scale * qr);
      float* key = data->keys.row(needle_pos[j]);
      float* val = data->values.row(needle_pos[j]);
      for (size_t t = 0; t < d; ++t) {
        key[t] = static_cast<float>(c * r[t]);
        val[t] = static_cast<float>(4.0 * value_norm) * g(rng) / std::sqrt(static_cast<float>(d));
      }
    }
  }
  const ValueMatrix values = ValueMatrix::FromFloat(DType::kBf16, data->values.view());

  auto flat = index::FlatIndex::Create(d);
  if (!flat.ok()) Fail(flat.status());
  if (auto s = (*flat)->Add(data->keys.view()); !s.ok()) Fail(s);
  index::IvfOptions io;
  io.nlist = static_cast<size_t>(4 * std::sqrt(static_cast<double>(n)));
  auto t0 = Clock::now();
  auto ivf = index::IvfIndex::Build(data->keys.view(), io, nullptr);
  if (!ivf.ok()) Fail(ivf.status());
  const double ivf_build_s = std::chrono::duration<double>(Clock::now() - t0).count();
  t0 = Clock::now();
  index::ClusterSummaryOptions co;
  co.clusters = static_cast<size_t>(absl::GetFlag(FLAGS_clusters));
  co.second_order = false;
  auto summary1 = index::ClusterSummary::Build(data->keys.view(), values, co, nullptr);
  if (!summary1.ok()) Fail(summary1.status());
  const double summary_build_s = std::chrono::duration<double>(Clock::now() - t0).count();
  co.second_order = true;
  auto summary2 = index::ClusterSummary::Build(data->keys.view(), values, co, nullptr);
  if (!summary2.ok()) Fail(summary2.status());

  // The IVF effort for --target_recall, self-calibrated on prefill queries;
  // the decode (test) queries' recall at it is reported.
  const ConstMatrixView q = data->test_queries.view();
  int nprobe = absl::GetFlag(FLAGS_nprobe);
  index::CalibrationOptions cal;
  cal.target_recall = absl::GetFlag(FLAGS_target_recall);
  cal.k = k;
  const ConstMatrixView train =
      data->train_queries.view().rows_slice(0, std::min<size_t>(cal.max_queries,
                                                                data->train_queries.rows));
  auto holdout_ids = [&](ConstMatrixView qs) {
    auto top = ExactTopK(data->keys.view(), qs, static_cast<size_t>(k));
    if (!top.ok()) Fail(top.status());
    return std::vector<int64_t>(top->data.begin(), top->data.end());
  };
  if (nprobe == 0) {
    const std::vector<int64_t> ids = holdout_ids(train);
    auto r = index::CalibrateEffort(**ivf, {train, ids, static_cast<size_t>(k)}, cal, nullptr);
    if (!r.ok()) Fail(r.status());
    nprobe = r->nprobe;
  }
  const std::vector<int64_t> test_ids = holdout_ids(q);
  auto recall = index::MeasureEffort(**ivf, {q, test_ids, static_cast<size_t>(k)},
                                     {.k = k, .nprobe = nprobe}, cal, nullptr);
  if (!recall.ok()) Fail(recall.status());

  Partials full(nq, d), fe(nq, d), fe1(nq, d), fe2(nq, d), ie(nq, d), ie1(nq, d), ie2(nq, d);
  if (auto s = ExactAttention(q, data->keys.view(), values, scale, full.view()); !s.ok()) Fail(s);
  index::AttendParams p;
  p.search.k = k;
  p.search.nprobe = nprobe;
  p.scale = scale;
  index::AttendParams pe1 = p, pe2 = p;
  pe1.estimate = &*summary1;
  pe2.estimate = &*summary2;
  AttendAll(q, **flat, values, p, &fe);
  AttendAll(q, **flat, values, pe1, &fe1);
  AttendAll(q, **flat, values, pe2, &fe2);
  // Timed --reps times each, interleaved; the fastest of each counts (the
  // box may be shared: the minimum is the least disturbed).
  double us_off = INFINITY, us_e1 = INFINITY, us_e2 = INFINITY;
  for (int r = 0; r < absl::GetFlag(FLAGS_reps); ++r) {
    us_off = std::min(us_off, AttendAll(q, **ivf, values, p, &ie));
    us_e1 = std::min(us_e1, AttendAll(q, **ivf, values, pe1, &ie1));
    us_e2 = std::min(us_e2, AttendAll(q, **ivf, values, pe2, &ie2));
  }
  std::printf("%-10s %7.4f %7.4f %7.4f %6d %6.4f %7.4f %7.4f %7.4f %8.1f %8.1f %8.1f %5.2fx "
              "%5.2fx %6.1fs %6.1fs\n",
              family.c_str(), MeanRelErr(fe, full), MeanRelErr(fe1, full), MeanRelErr(fe2, full),
              nprobe, recall->recall, MeanRelErr(ie, full), MeanRelErr(ie1, full),
              MeanRelErr(ie2, full), us_off, us_e1, us_e2, us_e1 / us_off, us_e2 / us_off,
              ivf_build_s, summary_build_s);
  std::fflush(stdout);
  const index::AttendParams& pe = pe2;

  // The exact zone over e1 / e2 at each budget.
  struct ZoneRun {
    int order;
    double fraction;
    index::AttendParams params;
    double err_exact = 0, err_ivf = 0, us = INFINITY;
    index::EstimateStats est;
  };
  std::vector<ZoneRun> zones;
  for (absl::string_view o : absl::StrSplit(absl::GetFlag(FLAGS_zone_orders), ',',
                                            absl::SkipEmpty())) {
    for (absl::string_view f : absl::StrSplit(absl::GetFlag(FLAGS_zone_fractions), ',',
                                              absl::SkipEmpty())) {
      ZoneRun z;
      z.order = o == "1" ? 1 : 2;
      if (!absl::SimpleAtod(f, &z.fraction)) Fail(absl::InvalidArgumentError("--zone_fractions"));
      z.params = z.order == 1 ? pe1 : pe2;
      z.params.zone.keys_fraction = z.fraction;
      z.params.zone.mass_fraction = absl::GetFlag(FLAGS_zone_mass_fraction);
      zones.push_back(z);
    }
  }
  if (!zones.empty()) {
    Partials zf(nq, d), zi(nq, d);
    for (ZoneRun& z : zones) {
      AttendAll(q, **flat, values, z.params, &zf);
      z.err_exact = MeanRelErr(zf, full);
      AttendAll(q, **ivf, values, z.params, &zi, &z.est);
      z.err_ivf = MeanRelErr(zi, full);
    }
    double us_base = INFINITY;
    for (int r = 0; r < absl::GetFlag(FLAGS_reps); ++r) {
      us_base = std::min(us_base, AttendAll(q, **ivf, values, p, &ie));
      for (ZoneRun& z : zones) z.us = std::min(z.us, AttendAll(q, **ivf, values, z.params, &zi));
    }
    for (const ZoneRun& z : zones) {
      std::printf("  zone %-10s e%d %5.3f: exact+zone %7.4f ivf+zone %7.4f  us %8.1f (ivf "
                  "%8.1f) %5.2fx  zone keys/q %7.1f clusters/q %5.1f\n",
                  family.c_str(), z.order, z.fraction, z.err_exact, z.err_ivf, z.us, us_base,
                  z.us / us_base, double(z.est.keys_exact_zone) / double(nq),
                  double(z.est.clusters_exact_zone) / double(nq));
    }
    std::fflush(stdout);
  }

  if (n_needles == 0) return;
  Partials nfull(n_needles, d), noff(n_needles, d), non(n_needles, d), nflat(n_needles, d),
      nflat_est(n_needles, d);
  if (auto s = ExactAttention(needle_q.view(), data->keys.view(), values, scale, nfull.view());
      !s.ok()) {
    Fail(s);
  }
  AttendAll(needle_q.view(), **flat, values, p, &nflat);
  AttendAll(needle_q.view(), **flat, values, pe, &nflat_est);
  AttendAll(needle_q.view(), **ivf, values, p, &noff);
  AttendAll(needle_q.view(), **ivf, values, pe, &non);
  auto found = [&](const Partials& o) {
    size_t hit = 0;
    std::vector<float> v(d);
    for (size_t j = 0; j < n_needles; ++j) {
      values.RowToFloat(needle_pos[j], v.data());
      double dot = 0, a = 0, b = 0;
      for (size_t t = 0; t < d; ++t) {
        dot += double(o.o.row(j)[t]) * v[t];
        a += double(o.o.row(j)[t]) * o.o.row(j)[t];
        b += double(v[t]) * v[t];
      }
      hit += dot / std::sqrt(std::max(a * b, 1e-30)) >= 0.5;
    }
    return static_cast<double>(hit) / static_cast<double>(n_needles);
  };
  std::printf("  needles %-10s found: full %.3f, exact top-%d %.3f, exact + e2 %.3f, "
              "ivf %.3f, ivf + e2 %.3f (%zu needles)\n",
              family.c_str(), found(nfull), k, found(nflat), found(nflat_est), found(noff),
              found(non), n_needles);
  std::fflush(stdout);
}

}  // namespace
}  // namespace kvr

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("remainder estimation vs full attention on the data families");
  absl::ParseCommandLine(argc, argv);
  std::vector<std::string> families;
  const std::string f = absl::GetFlag(FLAGS_families);
  if (f == "all") {
    families = kvr::AttentionFamilyNames();
  } else {
    families = absl::StrSplit(f, ',', absl::SkipEmpty());
  }
  std::printf("estimate_bench: %lld keys, d %d, top-%d, %d clusters, %d queries, values bf16, "
              "one thread\n",
              static_cast<long long>(absl::GetFlag(FLAGS_n_keys)), absl::GetFlag(FLAGS_dim),
              absl::GetFlag(FLAGS_k), absl::GetFlag(FLAGS_clusters), absl::GetFlag(FLAGS_n_test));
  std::printf("output error vs full attention (relative L2, mean over queries); Attend us/query "
              "with IVF\n");
  std::printf("e1 = first-order estimate (mean key), e2 = second-order; IVF at the "
              "self-calibrated nprobe, its recall@k on the decode queries\n");
  std::printf("%-10s %7s %7s %7s %6s %6s %7s %7s %7s %8s %8s %8s %6s %6s %7s %7s\n", "family",
              "exact", "exact+e1", "exact+e2", "nprobe", "recall", "ivf", "ivf+e1", "ivf+e2",
              "us ivf", "us +e1", "us +e2", "r e1", "r e2", "ivf bld", "sum bld");
  for (const std::string& family : families) kvr::RunFamily(family);
  return 0;
}
