// estimate_bench: remainder estimation (issue 18, retrieval_node/index/
// cluster_summary.h) on the index_bench data families
// (tools/attention_data) and with planted needles.
//
//   build/bench/estimate_bench [--n_keys 131072] [--k 100] [--clusters 256]
//       [--families all] [--needles 100] [--n_test 200]
//
// Per family (one shard of n_keys keys, bf16 values, one thread):
//  * relative L2 error of the attention output against full attention for
//    exact top-k (flat), exact top-k + estimate, IVF top-k, IVF + estimate;
//  * Attend time per query with the IVF index, without and with the
//    estimate, and their ratio (target <= 1.3x);
//  * needles: --needles key/value pairs planted at random depths, each with
//    its own query (a decode query of the family plus a random direction the
//    needle key points along, sized so the needle holds ~73% of the full
//    attention mass); found = cos(output, needle value) >= 0.5, for full
//    attention, exact top-k (flat), flat + estimate, IVF top-k, IVF +
//    estimate (target >= 99%; IVF at its default nprobe misses needles that
//    its lists do not cover: a retrieval miss, not the estimate's).
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
#include "absl/strings/str_split.h"
#include "common/attention.h"
#include "common/status.h"
#include "common/value_matrix.h"
#include "retrieval_node/index/attend.h"
#include "retrieval_node/index/cluster_summary.h"
#include "retrieval_node/index/flat_index.h"
#include "retrieval_node/index/ivf_index.h"
#include "tools/attention_data.h"

ABSL_FLAG(int64_t, n_keys, 131072, "keys per shard");
ABSL_FLAG(int, dim, 128, "head dimension");
ABSL_FLAG(int, n_test, 200, "decode queries per family");
ABSL_FLAG(int, k, 100, "top-k");
ABSL_FLAG(int, clusters, 256, "estimate clusters per shard");
ABSL_FLAG(int, nprobe, 0, "IVF lists probed (0: the index default)");
ABSL_FLAG(std::string, families, "all", "comma-separated families, or all");
ABSL_FLAG(int, needles, 100, "needles planted per family (0: skip)");
ABSL_FLAG(uint64_t, seed, 1, "data and needle seed");
ABSL_FLAG(bool, second_order, false, "ClusterSummaryOptions::second_order");
ABSL_FLAG(int, reps, 5, "timing repetitions (interleaved; the fastest counts)");

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
double AttendAll(ConstMatrixView q, const index::KeyIndex& idx, const ValueMatrix& values,
                 const index::AttendParams& p, Partials* out) {
  index::AttendScratch scratch;
  const auto t0 = Clock::now();
  for (size_t i = 0; i < q.rows(); ++i) {
    if (auto s = index::Attend(q.rows_slice(i, 1), idx, values, p, out->view().slice(i, 1),
                               &scratch);
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
  co.second_order = absl::GetFlag(FLAGS_second_order);
  auto summary = index::ClusterSummary::Build(data->keys.view(), values, co, nullptr);
  if (!summary.ok()) Fail(summary.status());
  const double summary_build_s = std::chrono::duration<double>(Clock::now() - t0).count();

  const ConstMatrixView q = data->test_queries.view();
  Partials full(nq, d), fe(nq, d), fest(nq, d), ie(nq, d), iest(nq, d);
  if (auto s = ExactAttention(q, data->keys.view(), values, scale, full.view()); !s.ok()) Fail(s);
  index::AttendParams p;
  p.search.k = k;
  p.search.nprobe = absl::GetFlag(FLAGS_nprobe);
  p.scale = scale;
  index::AttendParams pe = p;
  pe.estimate = &*summary;
  AttendAll(q, **flat, values, p, &fe);
  AttendAll(q, **flat, values, pe, &fest);
  // Timed --reps times each, interleaved; the fastest of each counts (the
  // box may be shared: the minimum is the least disturbed).
  double us_off = INFINITY, us_on = INFINITY;
  for (int r = 0; r < absl::GetFlag(FLAGS_reps); ++r) {
    us_off = std::min(us_off, AttendAll(q, **ivf, values, p, &ie));
    us_on = std::min(us_on, AttendAll(q, **ivf, values, pe, &iest));
  }
  std::printf("%-10s %8.4f %8.4f %8.4f %8.4f %9.1f %9.1f %6.2fx %6.1fs %6.1fs\n", family.c_str(),
              MeanRelErr(fe, full), MeanRelErr(fest, full), MeanRelErr(ie, full),
              MeanRelErr(iest, full), us_off, us_on, us_on / us_off, ivf_build_s,
              summary_build_s);
  std::fflush(stdout);

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
  std::printf("  needles %-10s found: full %.3f, exact top-%d %.3f, exact + estimate %.3f, "
              "ivf %.3f, ivf + estimate %.3f (%zu needles)\n",
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
  std::printf("%-10s %8s %8s %8s %8s %9s %9s %7s %7s %7s\n", "family", "exact", "exact+e",
              "ivf", "ivf+e", "us ivf", "us ivf+e", "ratio", "ivf bld", "sum bld");
  for (const std::string& family : families) kvr::RunFamily(family);
  return 0;
}
