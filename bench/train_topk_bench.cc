// train_topk_bench: the worker's training-set preparation for one head, old
// vs new, side by side in one run.
//
//   build/bench/train_topk_bench [--keys=131072] [--queries=131072] [--dim=128]
//                                [--k=32] [--threads=2] [--max_train_queries=16384]
//                                [--old=true] [--json=out.json]
//
// Rows (same keys and queries, `--threads` threads):
//  * "before: exact, all queries, one dot_batch per query": the blocked scan as
//    it was before dot_batch_multi (each key tile scored query by query);
//  * "exact, all queries (ExactTopK)": today's blocked scan, every key row
//    read once per pair of queries (dot_batch_multi);
//  * "TrainingTopK, sampled": the worker's path, the exact top-k of a
//    stratified sample of at most --max_train_queries queries.
// It checks that the first two agree id for id, and the sampled rows equal
// the exact rows of the same queries. Keys and queries are Gaussian with
// per-row scales (a spread of norms, like attention keys).
//
//   build/bench/train_topk_bench --families=all [--keys=131072]
//        [--max_train_queries=16384] [--k=100] [--approx_candidate_fraction=0.0625] ...
//
// With --families (a comma list of tools/attention_data families, or "all"):
// per family, --keys keys and --max_train_queries prefill queries of that
// family; TrainingTopK exact vs approx on the same data (seconds, CPU
// seconds, and approx's recall of the exact lists: mean, 1st percentile and
// worst query). Exits 1 when an approx score is not the exact score of its id.
// --key_sizes=4096,8192,... repeats that per chunk size (keys) in the same
// run, the same --max_train_queries queries each: where approx starts to pay
// (TrainingTopKOptions::approx_min_keys).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <vector>

#include <time.h>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "common/exact_topk.h"
#include "common/simd/kernels.h"
#include "common/tensor.h"
#include "common/thread_pool.h"
#include "common/topk_collector.h"
#include "common/train_topk.h"
#include "tools/attention_data.h"

ABSL_FLAG(int64_t, keys, 131072, "keys of the head");
ABSL_FLAG(int64_t, queries, 131072, "prefill queries of the head (one per position)");
ABSL_FLAG(int, dim, 128, "head dimension");
ABSL_FLAG(int, k, 32, "top-k per training query (the worker's train_k)");
ABSL_FLAG(int, threads, 2, "threads (the caller plus threads - 1 pool workers)");
ABSL_FLAG(int64_t, max_train_queries, 16384, "TrainingTopK's sample bound");
ABSL_FLAG(bool, old, true, "also time the pre-dot_batch_multi scan of every query");
ABSL_FLAG(std::string, json, "", "write the rows as JSON to this file");
ABSL_FLAG(std::string, families, "",
          "attention data families (comma list or \"all\"): exact vs approx per family "
          "instead of the Gaussian rows");
ABSL_FLAG(std::string, key_sizes, "",
          "--families mode: comma list of key counts to run each family at (default: --keys)");
ABSL_FLAG(int64_t, approx_group_size, 64, "TrainingTopKOptions::approx_group_size");
ABSL_FLAG(double, approx_candidate_fraction, 0.0625,
          "TrainingTopKOptions::approx_candidate_fraction");
ABSL_FLAG(int, approx_kmeans_iterations, 2, "TrainingTopKOptions::approx_kmeans_iterations");

namespace kvr {
namespace {

using Clock = std::chrono::steady_clock;

double Since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// CPU seconds of the whole process (every thread) so far: on a shared box
// the wall time depends on the other load, this does not.
double CpuSeconds() {
  timespec ts{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
}

[[noreturn]] void Fail(const absl::Status& st) {
  std::fprintf(stderr, "train_topk_bench: %s\n", st.ToString().c_str());
  std::exit(1);
}

Matrix Gaussian(size_t rows, size_t dim, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::uniform_real_distribution<float> scale(0.5f, 1.5f);
  Matrix m(rows, dim);
  for (size_t i = 0; i < rows; ++i) {
    const float s = scale(rng);
    for (size_t j = 0; j < dim; ++j) m.row(i)[j] = s * dist(rng);
  }
  return m;
}

// The exact scan as it was before dot_batch_multi: blocks of 32 queries,
// tiles of ~256 KiB of keys, one dot_batch per query and tile. Parallel over
// query blocks.
void OldExactScan(ConstMatrixView keys, ConstMatrixView queries, size_t k, ThreadPool* pool,
                  std::span<int64_t> ids, std::span<float> scores) {
  constexpr size_t kBlock = 32;
  const size_t dim = keys.cols();
  const size_t tile = std::clamp<size_t>(256 * 1024 / (dim * sizeof(float)), 64, 4096);
  const size_t blocks = (queries.rows() + kBlock - 1) / kBlock;
  const auto& kern = simd::Active();
  pool->ParallelFor(blocks, 1, [&](size_t b0, size_t b1) {
    std::vector<TopKCollector> collectors(kBlock);
    std::vector<float> sc(tile);
    for (size_t b = b0; b < b1; ++b) {
      const size_t q0 = b * kBlock, q1 = std::min(queries.rows(), q0 + kBlock);
      for (size_t q = q0; q < q1; ++q) collectors[q - q0].Reset(k);
      for (size_t t0 = 0; t0 < keys.rows(); t0 += tile) {
        const size_t tn = std::min(tile, keys.rows() - t0);
        for (size_t q = q0; q < q1; ++q) {
          kern.dot_batch(queries.row(q), keys.row(t0), tn, dim, keys.stride(), sc.data());
          collectors[q - q0].PushRange(sc.data(), tn, static_cast<uint32_t>(t0));
        }
      }
      for (size_t q = q0; q < q1; ++q) {
        collectors[q - q0].Finish(ids.data() + q * k, scores.data() + q * k);
      }
    }
  });
}

struct Row {
  std::string name;
  size_t queries = 0;
  double seconds = 0;
  double cpu_seconds = 0;
};

// Fraction of each row of `exact` (k ids) found in the same row of `approx`,
// sorted ascending.
std::vector<double> RowRecalls(const std::vector<int64_t>& exact,
                               const std::vector<int64_t>& approx, size_t k) {
  const size_t rows = exact.size() / k;
  std::vector<double> out(rows);
  std::vector<int64_t> a, b;
  for (size_t i = 0; i < rows; ++i) {
    a.assign(exact.begin() + i * k, exact.begin() + (i + 1) * k);
    b.assign(approx.begin() + i * k, approx.begin() + (i + 1) * k);
    std::sort(a.begin(), a.end());
    std::sort(b.begin(), b.end());
    std::vector<int64_t> both;
    std::set_intersection(a.begin(), a.end(), b.begin(), b.end(), std::back_inserter(both));
    out[i] = double(both.size()) / double(k);
  }
  std::sort(out.begin(), out.end());
  return out;
}

// The --families mode (see the file comment).
int FamiliesMain() {
  std::vector<size_t> sizes;
  for (absl::string_view s : absl::StrSplit(absl::GetFlag(FLAGS_key_sizes), ',',
                                              absl::SkipEmpty())) {
    size_t v = 0;
    if (!absl::SimpleAtoi(s, &v) || v < 1 || v > kMaxTopKKeys) {
      Fail(absl::InvalidArgumentError(absl::StrCat("--key_sizes entry \"", s,
                                                   "\" is not a key count in [1, 2^31]")));
    }
    sizes.push_back(v);
  }
  if (sizes.empty()) sizes.push_back(static_cast<size_t>(absl::GetFlag(FLAGS_keys)));
  const size_t t = static_cast<size_t>(absl::GetFlag(FLAGS_max_train_queries));
  const size_t dim = static_cast<size_t>(absl::GetFlag(FLAGS_dim));
  const int k = absl::GetFlag(FLAGS_k);
  const size_t ku = static_cast<size_t>(k);
  const int threads = std::max(1, absl::GetFlag(FLAGS_threads));
  ThreadPool pool(static_cast<size_t>(threads - 1));
  TrainingTopKOptions exact;
  exact.max_queries = 0;
  TrainingTopKOptions approx = exact;
  approx.mode = TrainingTopKMode::kApprox;
  approx.approx_group_size =
      static_cast<size_t>(std::max<int64_t>(0, absl::GetFlag(FLAGS_approx_group_size)));
  approx.approx_candidate_fraction = absl::GetFlag(FLAGS_approx_candidate_fraction);
  approx.approx_kmeans_iterations = absl::GetFlag(FLAGS_approx_kmeans_iterations);
  approx.approx_min_keys = 0;
  if (auto st = ValidateTrainingTopKOptions(approx); !st.ok()) Fail(st);
  std::vector<std::string> families;
  const std::string list = absl::GetFlag(FLAGS_families);
  if (list == "all") {
    families = AttentionFamilyNames();
  } else {
    size_t at = 0;
    while (at <= list.size()) {
      const size_t comma = std::min(list.find(',', at), list.size());
      if (comma > at) families.push_back(list.substr(at, comma - at));
      at = comma + 1;
    }
  }
  std::printf("train_topk_bench: %zu training queries, d %zu, k %d, %d threads, "
              "simd %s; approx: group size %zu, candidate fraction %.4f, k-means iterations %d\n",
              t, dim, k, threads, simd::Active().name, approx.approx_group_size,
              approx.approx_candidate_fraction, approx.approx_kmeans_iterations);
  std::printf("\n| family | keys | exact s (CPU s) | approx s (CPU s) | speed-up (wall) | recall "
              "vs exact: mean | p1 | worst query |\n|---|---|---|---|---|---|---|---|\n");
  std::string json = "[\n";
  for (const std::string& family : families) for (const size_t n : sizes) {
    AttentionDataOptions o;
    o.family = family;
    // The generator wants at least as many keys as queries; a chunk smaller
    // than the query sample (a worker's chunk has query heads / kv head times
    // more queries than keys) takes the first n of them.
    o.n_keys = std::max(n, t);
    o.n_train = t;
    o.n_test = 1;
    o.dim = dim;
    auto data = GenerateAttentionData(o, &pool);
    if (!data.ok()) Fail(data.status());
    const ConstMatrixView keys = data->keys.view().rows_slice(0, n),
                          queries = data->train_queries.view();
    std::vector<int64_t> eids(t * ku), aids(t * ku);
    std::vector<float> escores(t * ku), ascores(t * ku);
    auto t0 = Clock::now();
    double c0 = CpuSeconds();
    if (auto st = TrainingTopK(keys, queries, k, exact, &pool, eids, escores); !st.ok()) Fail(st);
    const double exact_s = Since(t0), exact_cpu = CpuSeconds() - c0;
    t0 = Clock::now();
    c0 = CpuSeconds();
    if (auto st = TrainingTopK(keys, queries, k, approx, &pool, aids, ascores); !st.ok()) Fail(st);
    const double approx_s = Since(t0), approx_cpu = CpuSeconds() - c0;
    // Every approx score is the exact inner product of its key (dot_batch).
    std::vector<float> one(1);
    for (size_t q = 0; q < t; q += 97) {
      for (size_t j = 0; j < ku; ++j) {
        const size_t id = static_cast<size_t>(aids[q * ku + j]);
        simd::Active().dot_batch(queries.row(q), keys.row(id), 1, dim, keys.stride(), one.data());
        if (one[0] != ascores[q * ku + j]) {
          std::printf("MISMATCH: %s query %zu id %zu approx score %g != %g\n", family.c_str(), q,
                      id, ascores[q * ku + j], one[0]);
          return 1;
        }
      }
    }
    const std::vector<double> r = RowRecalls(eids, aids, ku);
    double mean = 0;
    for (double x : r) mean += x;
    mean /= double(r.size());
    const double p1 = r[r.size() / 100];
    std::printf("| %s | %zu | %.3f (%.3f) | %.3f (%.3f) | %.2fx | %.4f | %.2f | %.2f |\n",
                family.c_str(), n, exact_s, exact_cpu, approx_s, approx_cpu, exact_s / approx_s, mean,
                p1, r.front());
    std::fflush(stdout);
    json += absl::StrFormat(
        "%s  {\"family\": \"%s\", \"keys\": %zu, \"queries\": %zu, \"k\": %d, "
        "\"threads\": %d, \"exact_seconds\": %.4f, \"exact_cpu_seconds\": %.4f, "
        "\"approx_seconds\": %.4f, \"approx_cpu_seconds\": %.4f, \"approx_group_size\": %zu, "
        "\"approx_candidate_fraction\": %.4f, \"recall_mean\": %.5f, \"recall_p1\": %.4f, "
        "\"recall_worst\": %.4f}",
        json.size() > 2 ? ",\n" : "", family, n, t, k, threads, exact_s, exact_cpu, approx_s,
        approx_cpu, approx.approx_group_size, approx.approx_candidate_fraction, mean, p1, r.front());
  }
  if (const std::string path = absl::GetFlag(FLAGS_json); !path.empty()) {
    std::ofstream f(path);
    f << json << "\n]\n";
  }
  return 0;
}

int Main() {
  if (!absl::GetFlag(FLAGS_families).empty()) return FamiliesMain();
  const size_t n = static_cast<size_t>(absl::GetFlag(FLAGS_keys));
  const size_t t = static_cast<size_t>(absl::GetFlag(FLAGS_queries));
  const size_t dim = static_cast<size_t>(absl::GetFlag(FLAGS_dim));
  const int k = absl::GetFlag(FLAGS_k);
  const int threads = std::max(1, absl::GetFlag(FLAGS_threads));
  TrainingTopKOptions options;
  options.max_queries = static_cast<size_t>(absl::GetFlag(FLAGS_max_train_queries));
  if (auto st = ValidateTrainingTopKOptions(options); !st.ok()) Fail(st);
  ThreadPool pool(static_cast<size_t>(threads - 1));
  std::printf("train_topk_bench: %zu keys x %zu queries, d %zu, k %d, %d threads, simd %s\n", n,
              t, dim, k, threads, simd::Active().name);
  const Matrix keys = Gaussian(n, dim, 1);
  const Matrix queries = Gaussian(t, dim, 2);
  const size_t ku = static_cast<size_t>(k);

  std::vector<Row> rows;
  std::vector<int64_t> old_ids, ids(t * ku);
  std::vector<float> old_scores, scores(t * ku);
  if (absl::GetFlag(FLAGS_old)) {
    old_ids.resize(t * ku);
    old_scores.resize(t * ku);
    const auto t0 = Clock::now();
    const double c0 = CpuSeconds();
    OldExactScan(keys.view(), queries.view(), ku, &pool, old_ids, old_scores);
    rows.push_back({"before: exact, all queries, one dot_batch per query", t, Since(t0),
                    CpuSeconds() - c0});
  }
  {
    const auto t0 = Clock::now();
    const double c0 = CpuSeconds();
    if (auto st = ExactTopK(keys.view(), queries.view(), k, ids, scores, &pool); !st.ok()) Fail(st);
    rows.push_back({"exact, all queries (ExactTopK, dot_batch_multi)", t, Since(t0),
                    CpuSeconds() - c0});
  }
  if (!old_ids.empty() && old_ids != ids) {
    std::printf("MISMATCH: the old scan and ExactTopK differ\n");
    return 1;
  }
  const size_t m = TrainingQueryCount(t, options);
  std::vector<int64_t> sampled_ids(m * ku);
  std::vector<float> sampled_scores(m * ku);
  std::vector<size_t> sample;
  {
    const auto t0 = Clock::now();
    const double c0 = CpuSeconds();
    if (auto st = TrainingTopK(keys.view(), queries.view(), k, options, &pool, sampled_ids,
                               sampled_scores, &sample);
        !st.ok()) {
      Fail(st);
    }
    rows.push_back({absl::StrFormat("TrainingTopK, sampled (max_train_queries %zu)",
                                    options.max_queries),
                    m, Since(t0), CpuSeconds() - c0});
  }
  for (size_t i = 0; i < m; ++i) {
    if (!std::equal(sampled_ids.begin() + i * ku, sampled_ids.begin() + (i + 1) * ku,
                    ids.begin() + sample[i] * ku)) {
      std::printf("MISMATCH: sampled row %zu differs from the exact row %zu\n", i, sample[i]);
      return 1;
    }
  }
  const double base = rows.front().seconds;
  const double base_cpu = rows.front().cpu_seconds;
  std::printf("\n| training top-k of one head | queries scanned | wall s | CPU s | "
              "speed-up (wall, CPU) |\n");
  std::printf("|---|---|---|---|---|\n");
  for (const Row& r : rows) {
    std::printf("| %s | %zu | %.2f | %.2f | %.1fx, %.1fx |\n", r.name.c_str(), r.queries,
                r.seconds, r.cpu_seconds, base / r.seconds, base_cpu / r.cpu_seconds);
  }
  std::printf("(ids identical between the exact rows; sampled rows equal the exact rows of "
              "their queries)\n");
  if (const std::string path = absl::GetFlag(FLAGS_json); !path.empty()) {
    std::ofstream f(path);
    f << "[\n";
    for (size_t i = 0; i < rows.size(); ++i) {
      f << absl::StrFormat("  {\"row\": \"%s\", \"keys\": %zu, \"queries\": %zu, \"dim\": %zu, "
                           "\"k\": %d, \"threads\": %d, \"seconds\": %.4f, \"cpu_seconds\": %.4f}%s\n",
                           rows[i].name, n, rows[i].queries, dim, k, threads, rows[i].seconds,
                           rows[i].cpu_seconds,
                           i + 1 < rows.size() ? "," : "");
    }
    f << "]\n";
  }
  return 0;
}

}  // namespace
}  // namespace kvr

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("training top-k of one head: old exact scan vs TrainingTopK");
  absl::ParseCommandLine(argc, argv);
  return kvr::Main();
}
