// index_bench: recall@k vs % of keys scanned vs µs/query for Flat, IVF, the
// attention-aware graph, faiss HNSW (inner product), faiss IVF (IndexIVFFlat,
// inner product: method "faiss_ivf", with --faiss_ivf or in --methods), hnswlib and (with
// --roargraph_bin_dir) the RoarGraph reference, on every family of
// out-of-distribution attention data (tools/attention_data) in one run, or on
// the user's own captured keys/queries (family "file"); plus the OOD gap (HNSW
// recall on key queries vs attention queries at equal budget) and single-head
// decode attention (retrieve + partial attention) vs the exact scan. Prints a
// table per family and size, then a summary: per family the cheapest setting
// of each method reaching --target_recall, the issue-17 target status and the
// worst family. --json writes every row (with its "family") machine-readably.
//
//   index_bench --sizes=131072                     # every family
//   index_bench --families=lowrank,flat --roargraph_bin_dir=/tmp/kvr-roargraph/bin
//   index_bench --keys=k.npy --queries=q.npy --train=t.fbin [--values=v.npy]
#include <faiss/IndexFlat.h>
#include <faiss/IndexHNSW.h>
#include <faiss/IndexIVFFlat.h>
#include <faiss/impl/DistanceComputer.h>
#include <hnswlib/hnswlib.h>
#include <omp.h>

#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <time.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <limits>
#include <map>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/time/time.h"
#include "common/attention.h"
#include "common/subprocess.h"
#include "tools/dataset_io.h"
#include "common/simd/kernels.h"
#include "common/thread_pool.h"
#include "common/train_topk.h"
#include "common/value_matrix.h"
#include "retrieval_node/index/attend.h"
#include "retrieval_node/index/attention_graph_index.h"
#include "retrieval_node/index/calibrate.h"
#include "retrieval_node/index/flat_index.h"
#include "retrieval_node/index/flat_sq8_index.h"
#include "retrieval_node/index/ivf_index.h"
#include "retrieval_node/index/pca_sq8_index.h"
#include "tools/attention_data.h"

ABSL_FLAG(std::string, sizes, "131072", "comma-separated key counts N (synthetic data)");
ABSL_FLAG(int, dim, 128, "head dimension d (synthetic data)");
ABSL_FLAG(int, k, 100, "top-k");
ABSL_FLAG(int64_t, n_train, -1,
          "training (prefill) queries per data set; -1: min(N, 65536) (synthetic data)");
ABSL_FLAG(int, train_k, 100, "top-k per training query given to the graph build");
ABSL_FLAG(int, n_test, 500, "decode queries evaluated (synthetic data)");
ABSL_FLAG(std::string, families, "all",
          "synthetic data families to run, comma-separated: topical, lowrank, flat, positional, "
          "sink (tools/attention_data.h); all = every family");
ABSL_FLAG(std::string, preset, "default",
          "difficulty preset of the topical family (and of sink's topical part): easy, default, "
          "hard");
ABSL_FLAG(uint64_t, seed, 1, "synthetic data seed");
ABSL_FLAG(std::string, keys, "", "keys file (.npy float32 2-D C order, or .fbin)");
ABSL_FLAG(std::string, queries, "", "decode queries file (.npy or .fbin)");
ABSL_FLAG(std::string, train, "", "training queries file (.npy or .fbin)");
ABSL_FLAG(std::string, values, "", "values file (.npy or .fbin); default: random values");
ABSL_FLAG(std::string, methods, "flat,ivf,graph,auto,faiss_hnsw,hnswlib,roargraph",
          "methods to run: flat, ivf, graph, auto (self-calibration), faiss_hnsw, faiss_ivf, hnswlib, "
          "roargraph (the last only with --roargraph_bin_dir), flat_sq8 and ivf_sq8 (SQ8 "
          "code scans with an exact rerank of --rerank_factor * k), pca_sq8 (SQ8 scan of the "
          "keys' top principal directions, a row per --pca_rerank_factors)");
ABSL_FLAG(std::string, roargraph_bin_dir, "",
          "directory with RoarGraph's test_build_roargraph and test_search_roargraph (and COMMIT), "
          "built outside the tree by bench/peers/build_roargraph.sh; empty: RoarGraph skipped");
ABSL_FLAG(std::string, roargraph_ls, "100,200,400,800,1600,3200",
          "RoarGraph search list sizes L_pq to sweep (each >= k)");
ABSL_FLAG(int, roargraph_timeout_s, 1800, "limit on each RoarGraph build or search run, seconds");
ABSL_FLAG(int, threads, 0, "build threads (0: all cores); searches are single-threaded");
ABSL_FLAG(int, graph_degree, 32, "attention graph out-degree M");
ABSL_FLAG(int, graph_entry_points, 16, "attention graph entry points");
ABSL_FLAG(double, graph_prune_alpha, 1.0, "attention graph occlusion-pruning alpha");
ABSL_FLAG(int, graph_pivots, 16, "attention graph pivots per training query (RoarGraph: 1)");
ABSL_FLAG(int, graph_routers, 1024,
          "attention graph query routers (0: off; at most one per 128 keys)");
ABSL_FLAG(bool, graph_query_routers, false,
          "attention graph: replace Build's routers (derived from the training top-k alone, as "
          "the node builds them) by the training queries themselves (SetRouters)");
ABSL_FLAG(int, graph_router_probe, 4, "routers whose keys seed each search");
ABSL_FLAG(int, graph_router_entries, 8, "keys remembered per router");
ABSL_FLAG(bool, graph_frequency_order, true,
          "attention graph: consider projection candidates most frequent first");
ABSL_FLAG(bool, graph_scan_bf16, false, "attention graph: walk the graph on bf16 keys");
ABSL_FLAG(int, graph_build_beam, 64, "attention graph beam when Add links appended keys in");
ABSL_FLAG(int, graph_link_beam, 16,
          "attention graph beam when Build links in the keys no training query reached");
ABSL_FLAG(bool, graph_saturate, true, "fill graph rows up to the degree with pruned candidates");
ABSL_FLAG(int, graph_recent_entries, 8,
          "attention graph: the most recent keys that also seed every search");
ABSL_FLAG(std::string, train_topk_cache, "",
          "if set (PATH.ibin or PATH.npy): read each data set's training top-k from "
          "PATH.<family>-<N>.ibin (.npy) when it exists and matches, else write it there (saves "
          "recomputing it between runs on the same data)");
ABSL_FLAG(std::string, train_topk, "exact",
          "training top-k of the graph build: exact (ExactTopK, cached by --train_topk_cache) "
          "or approx (TrainingTopK's approximate mode, never cached; the worker's "
          "--train_topk=approx)");
ABSL_FLAG(int64_t, train_topk_group_size, 64,
          "--train_topk=approx: TrainingTopKOptions::approx_group_size");
ABSL_FLAG(double, train_topk_candidate_fraction, 0.0625,
          "--train_topk=approx: TrainingTopKOptions::approx_candidate_fraction");
ABSL_FLAG(std::string, graph_beams, "100,120,150,200,250,300,400,500,700,1000",
          "attention graph beam widths to sweep");
ABSL_FLAG(bool, faiss_ivf, false,
          "also run the faiss IVF peer (method faiss_ivf: IndexIVFFlat, inner product), "
          "whatever --methods says");
ABSL_FLAG(int, faiss_ivf_nlist, 0, "faiss IVF lists (0: 4 * sqrt(N), like kvr's IVF)");
ABSL_FLAG(std::string, faiss_nprobes, "1,2,4,8,16,32,64,128,256,512",
          "faiss IVF nprobe sweep (stops once recall > 0.995)");
ABSL_FLAG(int, graph_search_repeats, 1,
          "attention graph: time each beam's query set this many times [1, 100] and report the "
          "fastest (a loaded machine's noise is mostly one-sided)");
ABSL_FLAG(bool, graph_cpu_clock, false,
          "attention graph: time searches by the search thread's CPU time instead of wall time "
          "(leaves out the time a loaded machine gives other processes)");
ABSL_FLAG(int, scan_search_repeats, 1,
          "flat, flat_sq8, ivf, ivf_sq8: time each setting's query set this many times [1, 100] "
          "and report the fastest");
ABSL_FLAG(bool, scan_cpu_clock, false,
          "flat, flat_sq8, ivf, ivf_sq8: time searches by the search thread's CPU time instead of "
          "wall time (leaves out the time a loaded machine gives other processes)");
ABSL_FLAG(int, hnsw_m, 32, "HNSW M (faiss and hnswlib)");
ABSL_FLAG(int, hnsw_ef_construction, 128, "HNSW efConstruction");
ABSL_FLAG(std::string, hnsw_efs, "100,200,400,800,1600,3200,6400",
          "HNSW efSearch values to sweep");
ABSL_FLAG(std::string, ivf_nprobes, "1,2,4,8,16,32,64,128,256,512",
          "IVF nprobe values to sweep");
ABSL_FLAG(int, ivf_nlist, 0, "IVF lists (0: 4 * sqrt(N))");
ABSL_FLAG(int, rerank_factor, 4,
          "flat_sq8 / ivf_sq8: candidates rescored exactly per result, [1, 64]");
ABSL_FLAG(std::string, flat_sq8_rerank_factors, "",
          "flat_sq8: comma-separated rerank factors, a row each (empty: --rerank_factor)");
ABSL_FLAG(std::string, pca_rerank_factors, "1,2,4,8,16,32,64",
          "pca_sq8: rerank factors, a row each, ascending (stops after recall > 0.995)");
ABSL_FLAG(int, pca_rank, 0,
          "pca_sq8: principal directions kept, [1, d] (0: from --pca_variance)");
ABSL_FLAG(double, pca_variance, 0.9,
          "pca_sq8 with --pca_rank=0: fraction of the key variance the kept directions hold");
ABSL_FLAG(int, auto_queries_per_search, 1,
          "auto: held-back queries per Search call when timing the candidates (a node "
          "uses the sequence's query heads per kv head), [1, 4096]");
ABSL_FLAG(int, search_batch, 0,
          "queries per Search call of the kvr indexes (0: all test queries in one call; a "
          "decode step passes one kv head's query group, e.g. 4 for Llama-3-8B)");
ABSL_FLAG(bool, ood_gap, true, "measure HNSW recall on key queries vs attention queries");
ABSL_FLAG(bool, attention, true, "measure single-head decode attention vs the exact scan");
ABSL_FLAG(double, target_recall, 0.95, "recall the summary reports the cheapest setting for");
ABSL_FLAG(std::string, json, "", "write every row as JSON to this file");

namespace kvr::bench {
namespace {

using Clock = std::chrono::steady_clock;
double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

struct Row {
  std::string family;  // data family ("file" for --keys data)
  std::string dataset;
  size_t n = 0;
  std::string method;
  std::string param;
  double recall = 0;
  double scanned_pct = 0;
  double us_per_query = 0;
  double build_s = 0;
};

struct DataSet {
  std::string family;
  std::string name;
  Matrix keys, train, test, values;
  Matrix key_queries;  // held-out keys used as in-distribution queries (may be empty)
};

void Fail(const absl::Status& s) {
  std::fprintf(stderr, "index_bench: %s\n", std::string(s.message()).c_str());
  std::exit(2);
}

std::vector<int> ParseInts(const std::string& csv, const char* flag) {
  std::vector<int> out;
  for (absl::string_view part : absl::StrSplit(csv, ',', absl::SkipEmpty())) {
    int v = 0;
    if (!absl::SimpleAtoi(part, &v) || v <= 0) {
      Fail(absl::InvalidArgumentError(
          absl::StrCat("--", flag, ": '", part, "' is not a positive integer")));
    }
    out.push_back(v);
  }
  return out;
}

// --families: "all" (every family of AttentionFamilyNames) or a comma list
// of known names, each once.
std::vector<std::string> ParseFamilies(const std::string& csv) {
  const std::vector<std::string> known = AttentionFamilyNames();
  if (csv == "all") return known;
  std::vector<std::string> out;
  for (absl::string_view part : absl::StrSplit(csv, ',', absl::SkipEmpty())) {
    const std::string name(part);
    if (std::find(known.begin(), known.end(), name) == known.end()) {
      Fail(absl::InvalidArgumentError(absl::StrCat(
          "--families: unknown family '", name, "' (known: ", absl::StrJoin(known, ", "),
          ", or all)")));
    }
    if (std::find(out.begin(), out.end(), name) == out.end()) out.push_back(name);
  }
  if (out.empty()) Fail(absl::InvalidArgumentError("--families: no family named"));
  return out;
}

// Prints the last `lines` lines of the text file at `path`, indented.
void PrintTail(const std::string& path, size_t lines) {
  std::ifstream f(path);
  std::vector<std::string> tail;
  for (std::string line; std::getline(f, line);) {
    tail.push_back(line);
    if (tail.size() > lines) tail.erase(tail.begin());
  }
  for (const std::string& line : tail) std::printf("    | %s\n", line.c_str());
}

Matrix Rows(const Matrix& m, size_t begin, size_t count) {
  Matrix out(count, m.cols);
  std::copy(m.row(begin), m.row(begin) + count * m.cols, out.data.begin());
  return out;
}

double Recall(const std::vector<int64_t>& truth, const std::vector<int64_t>& got, size_t rows,
              size_t k) {
  size_t hit = 0;
  std::vector<int64_t> t;
  for (size_t i = 0; i < rows; ++i) {
    t.assign(truth.begin() + i * k, truth.begin() + (i + 1) * k);
    std::sort(t.begin(), t.end());
    for (size_t j = 0; j < k; ++j) hit += std::binary_search(t.begin(), t.end(), got[i * k + j]);
  }
  return static_cast<double>(hit) / static_cast<double>(rows * k);
}

// Exact top-k ids of every row of `q`, best first; their scores into
// `scores_out` when given.
std::vector<int64_t> Truth(const Matrix& keys, const Matrix& q, int k, ThreadPool* pool,
                           std::vector<float>* scores_out = nullptr) {
  std::vector<int64_t> ids(q.rows * k);
  std::vector<float> scores(q.rows * k);
  if (auto s = ExactTopK(keys.view(), q.view(), k, ids, scores, pool); !s.ok()) Fail(s);
  if (scores_out != nullptr) *scores_out = std::move(scores);
  return ids;
}

// CPU time of the calling thread, in seconds.
double ThreadCpuSeconds() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

// Runs every query on this thread; returns recall, % scanned, µs/query.
template <typename SearchFn>
Row Measure(const Matrix& q, const std::vector<int64_t>& truth, size_t n, int k,
            SearchFn&& search) {
  std::vector<int64_t> ids(q.rows * k);
  const auto t0 = Clock::now();
  const int64_t dist = search(ids);
  const auto t1 = Clock::now();
  Row r;
  r.recall = Recall(truth, ids, q.rows, k);
  r.scanned_pct = 100.0 * static_cast<double>(dist) / static_cast<double>(q.rows * n);
  r.us_per_query = 1e6 * Seconds(t0, t1) / static_cast<double>(q.rows);
  return r;
}

Row MeasureKvr(const index::KeyIndex& idx, const Matrix& q, const std::vector<int64_t>& truth,
               int k, const index::SearchParams& p) {
  std::vector<float> scores(q.rows * k);
  const int batch_flag = absl::GetFlag(FLAGS_search_batch);
  if (batch_flag < 0) {
    Fail(absl::InvalidArgumentError(absl::StrCat("--search_batch ", batch_flag, " < 0")));
  }
  const size_t flag_batch = static_cast<size_t>(batch_flag);
  const size_t batch = flag_batch == 0 ? q.rows : flag_batch;
  const size_t kk = static_cast<size_t>(k);
  return Measure(q, truth, idx.size(), k, [&](std::vector<int64_t>& ids) {
    index::SearchStats st;
    for (size_t q0 = 0; q0 < q.rows; q0 += batch) {
      const size_t nq = std::min(batch, q.rows - q0);
      if (auto s = idx.Search(q.view().rows_slice(q0, nq), p,
                              std::span<int64_t>(ids.data() + q0 * kk, nq * kk),
                              std::span<float>(scores.data() + q0 * kk, nq * kk), &st);
          !s.ok()) {
        Fail(s);
      }
    }
    return st.distance_computations;
  });
}

// MeasureKvr `repeats` times ([1, 100], else exit 2 naming `repeats_flag`),
// keeping the least µs/query; with `cpu_clock` µs are the search thread's
// CPU time instead of wall time.
Row MeasureKvrBest(const index::KeyIndex& idx, const Matrix& q, const std::vector<int64_t>& truth,
                   int k, const index::SearchParams& p, int repeats, bool cpu_clock,
                   const char* repeats_flag) {
  if (repeats < 1 || repeats > 100) {
    Fail(absl::InvalidArgumentError(
        absl::StrCat("--", repeats_flag, "=", repeats, " outside [1, 100]")));
  }
  auto measure = [&] {
    const double c0 = ThreadCpuSeconds();
    Row m = MeasureKvr(idx, q, truth, k, p);
    if (cpu_clock) m.us_per_query = 1e6 * (ThreadCpuSeconds() - c0) / static_cast<double>(q.rows);
    return m;
  };
  Row r = measure();
  for (int rep = 1; rep < repeats; ++rep) {
    r.us_per_query = std::min(r.us_per_query, measure().us_per_query);
  }
  return r;
}

// MeasureKvrBest with the scan kinds' --scan_search_repeats / --scan_cpu_clock.
Row MeasureScan(const index::KeyIndex& idx, const Matrix& q, const std::vector<int64_t>& truth,
                int k, const index::SearchParams& p) {
  return MeasureKvrBest(idx, q, truth, k, p, absl::GetFlag(FLAGS_scan_search_repeats),
                        absl::GetFlag(FLAGS_scan_cpu_clock), "scan_search_repeats");
}

// hnswlib's own counter adds whole neighbour lists, visited or not; this
// space counts the distance computations it really makes.
class CountingIpSpace : public hnswlib::SpaceInterface<float> {
 public:
  explicit CountingIpSpace(size_t dim) : inner_(dim) { base_ = inner_.get_dist_func(); }
  size_t get_data_size() override { return inner_.get_data_size(); }
  hnswlib::DISTFUNC<float> get_dist_func() override { return &Dist; }
  void* get_dist_func_param() override { return inner_.get_dist_func_param(); }
  static thread_local int64_t count;

 private:
  static float Dist(const void* a, const void* b, const void* param) {
    ++count;
    return base_(a, b, param);
  }
  static hnswlib::DISTFUNC<float> base_;
  hnswlib::InnerProductSpace inner_;
};
thread_local int64_t CountingIpSpace::count = 0;
hnswlib::DISTFUNC<float> CountingIpSpace::base_ = nullptr;

// Flat inner-product storage for faiss HNSW that counts the distances the
// search computes (faiss's own counters are not filled in this version).
class CountingFlatIp : public faiss::IndexFlatIP {
 public:
  using faiss::IndexFlatIP::IndexFlatIP;
  static thread_local int64_t count;
  faiss::DistanceComputer* get_distance_computer() const override {
    return new Counter(faiss::IndexFlatIP::get_distance_computer());
  }

 private:
  struct Counter : faiss::DistanceComputer {
    explicit Counter(faiss::DistanceComputer* wrapped) : inner(wrapped) {}
    void set_query(const float* x) override { inner->set_query(x); }
    float operator()(faiss::Index::idx_t i) override {
      ++count;
      return (*inner)(i);
    }
    float symmetric_dis(faiss::Index::idx_t i, faiss::Index::idx_t j) override {
      return inner->symmetric_dis(i, j);
    }
    std::unique_ptr<faiss::DistanceComputer> inner;
  };
};
thread_local int64_t CountingFlatIp::count = 0;

class Runner {
 public:
  Runner(ThreadPool* pool) : pool_(pool) {}

  void Run(const DataSet& ds) {
    const int k = std::min<int>(absl::GetFlag(FLAGS_k), static_cast<int>(ds.keys.rows));
    const size_t n = ds.keys.rows;
    std::printf("\n=== %s: N=%zu d=%zu train=%zu test=%zu k=%d ===\n", ds.name.c_str(), n,
                ds.keys.cols, ds.train.rows, ds.test.rows, k);
    const auto t0 = Clock::now();
    std::vector<float> truth_scores;
    const auto truth = Truth(ds.keys, ds.test, k, pool_, &truth_scores);
    std::printf("ground truth: %.2f s\n", Seconds(t0, Clock::now()));
    const std::string methods = absl::GetFlag(FLAGS_methods);
    auto want = [&](const char* m) {
      for (absl::string_view part : absl::StrSplit(methods, ',')) {
        if (part == m) return true;
      }
      return false;
    };
    std::vector<Row> rows;
    auto add = [&](Row r, const std::string& method, const std::string& param, double build) {
      r.family = ds.family;
      r.dataset = ds.name;
      r.n = n;
      r.method = method;
      r.param = param;
      r.build_s = build;
      std::printf("  %-11s %-14s recall@%d=%.4f scanned=%7.3f%% %9.1f us/q build=%.2fs\n",
                  method.c_str(), param.c_str(), k, r.recall, r.scanned_pct, r.us_per_query,
                  build);
      std::fflush(stdout);
      rows.push_back(r);
    };

    const bool roargraph =
        want("roargraph") && !absl::GetFlag(FLAGS_roargraph_bin_dir).empty() && ds.train.rows > 0;
    const int train_k = std::min<int>(absl::GetFlag(FLAGS_train_k), static_cast<int>(n));
    std::vector<int64_t> train_topk;
    double knn_s = 0;
    if ((want("graph") || roargraph) && ds.train.rows > 0) {
      train_topk = TrainTopK(ds, train_k, &knn_s);
    }
    if (want("flat")) RunFlat(ds, truth, k, add);
    if (want("ivf")) RunIvf(ds, truth, k, add);
    if (want("flat_sq8")) RunFlatSq8(ds, truth, k, add);
    if (want("ivf_sq8")) RunIvf(ds, truth, k, add, /*sq8=*/true);
    if (want("pca_sq8")) RunPcaSq8(ds, truth, k, add);
    std::unique_ptr<index::AttentionGraphIndex> graph;
    if (want("graph") && ds.train.rows > 0) {
      graph = RunGraph(ds, truth, k, train_topk, train_k, knn_s, add);
    }
    if (want("faiss_hnsw")) RunFaiss(ds, truth, k, add);
    if (want("faiss_ivf") || absl::GetFlag(FLAGS_faiss_ivf)) RunFaissIvf(ds, truth, k, add);
    if (want("hnswlib")) RunHnswlib(ds, truth, k, add);
    if (want("auto")) RunAuto(ds, truth, k, add);
    if (roargraph) RunRoarGraph(ds, truth, truth_scores, k, train_topk, train_k, add);

    PrintTable(rows, k);
    if (absl::GetFlag(FLAGS_attention) && graph != nullptr) RunAttention(ds, *graph, rows, k);
    all_rows_.insert(all_rows_.end(), rows.begin(), rows.end());
  }

  const std::vector<Row>& rows() const { return all_rows_; }

 private:
  template <typename Add>
  void RunFlat(const DataSet& ds, const std::vector<int64_t>& truth, int k, Add&& add) {
    const auto t0 = Clock::now();
    auto flat = index::FlatIndex::Create(ds.keys.cols);
    if (!flat.ok()) Fail(flat.status());
    if (auto s = (*flat)->Add(ds.keys.view()); !s.ok()) Fail(s);
    const double build = Seconds(t0, Clock::now());
    index::SearchParams p;
    p.k = k;
    add(MeasureScan(**flat, ds.test, truth, k, p), "flat", "exact", build);
  }

  // flat_sq8: every key's SQ8 codes scanned, rerank_factor * k rescored.
  template <typename Add>
  void RunFlatSq8(const DataSet& ds, const std::vector<int64_t>& truth, int k, Add&& add) {
    const int factor = absl::GetFlag(FLAGS_rerank_factor);
    const auto t0 = Clock::now();
    auto flat = index::FlatSq8Index::Create(ds.keys.cols, factor);
    if (!flat.ok()) Fail(flat.status());
    if (auto s = (*flat)->Add(ds.keys.view()); !s.ok()) Fail(s);
    const double build = Seconds(t0, Clock::now());
    const std::string sweep = absl::GetFlag(FLAGS_flat_sq8_rerank_factors);
    const std::vector<int> factors =
        sweep.empty() ? std::vector<int>{factor} : ParseInts(sweep, "flat_sq8_rerank_factors");
    for (int f : factors) {
      index::SearchParams p;
      p.k = k;
      p.rerank_factor = f;
      add(MeasureScan(**flat, ds.test, truth, k, p), "flat_sq8", absl::StrFormat("rerank=%d", f),
          build);
    }
  }

  index::PcaSq8Options PcaOptions() const {
    index::PcaSq8Options o;
    o.rank = absl::GetFlag(FLAGS_pca_rank);
    o.variance = absl::GetFlag(FLAGS_pca_variance);
    return o;
  }

  template <typename Add>
  void RunPcaSq8(const DataSet& ds, const std::vector<int64_t>& truth, int k, Add&& add) {
    const auto t0 = Clock::now();
    auto pca = index::PcaSq8Index::Create(ds.keys.cols, PcaOptions());
    if (!pca.ok()) Fail(pca.status());
    if (auto s = (*pca)->Add(ds.keys.view()); !s.ok()) Fail(s);
    const double build = Seconds(t0, Clock::now());
    for (int f : ParseInts(absl::GetFlag(FLAGS_pca_rerank_factors), "pca_rerank_factors")) {
      index::SearchParams p;
      p.k = k;
      p.rerank_factor = f;
      Row r = MeasureScan(**pca, ds.test, truth, k, p);
      add(r, "pca_sq8", absl::StrFormat("r=%zu,rerank=%d", (*pca)->rank(), f), build);
      if (r.recall > 0.995) break;
    }
  }

  template <typename Add>
  void RunIvf(const DataSet& ds, const std::vector<int64_t>& truth, int k, Add&& add,
              bool sq8 = false) {
    index::IvfOptions o;
    o.sq8 = sq8;
    o.rerank_factor = absl::GetFlag(FLAGS_rerank_factor);
    const int nlist_flag = absl::GetFlag(FLAGS_ivf_nlist);
    o.nlist = nlist_flag > 0 ? static_cast<size_t>(nlist_flag)
                             : static_cast<size_t>(4.0 * std::sqrt(ds.keys.rows));
    const auto t0 = Clock::now();
    auto ivf = index::IvfIndex::Build(ds.keys.view(), o, pool_);
    if (!ivf.ok()) Fail(ivf.status());
    const double build = Seconds(t0, Clock::now());
    for (int nprobe : ParseInts(absl::GetFlag(FLAGS_ivf_nprobes), "ivf_nprobes")) {
      if (static_cast<size_t>(nprobe) > (*ivf)->nlist()) break;
      index::SearchParams p;
      p.k = k;
      p.nprobe = nprobe;
      Row r = MeasureScan(**ivf, ds.test, truth, k, p);
      add(r, sq8 ? "ivf_sq8" : "ivf", absl::StrFormat("nlist=%zu,np=%d", (*ivf)->nlist(), nprobe),
          build);
      if (r.recall > 0.995) break;
    }
  }

  // Every training query's exact top-train_k key ids (rows x train_k, best
  // first): what the decode worker computes on the GPU during prefill; from
  // --train_topk_cache when it matches the data. `seconds` gets the time.
  std::vector<int64_t> TrainTopK(const DataSet& ds, int train_k, double* seconds) {
    // The training top-k is what the decode worker computes on the GPU during
    // prefill; it is timed separately from the graph build.
    auto t0 = Clock::now();
    std::vector<int64_t> topk(ds.train.rows * train_k);
    const std::string cache_flag = absl::GetFlag(FLAGS_train_topk_cache);
    // PATH.ibin -> PATH.<family>-<N>.ibin (the same for .npy).
    std::string cache;
    if (!cache_flag.empty()) {
      const size_t dot = cache_flag.rfind('.');
      const std::string ext = dot == std::string::npos ? "" : cache_flag.substr(dot);
      const bool known = ext == ".ibin" || ext == ".npy";
      cache = absl::StrFormat("%s.%s-%zu%s", known ? cache_flag.substr(0, dot) : cache_flag,
                              ds.family, ds.keys.rows, known ? ext : ".ibin");
    }
    const auto mode = ParseTrainingTopKMode(absl::GetFlag(FLAGS_train_topk));
    if (!mode.has_value()) {
      Fail(absl::InvalidArgumentError(absl::StrCat(
          "--train_topk=", absl::GetFlag(FLAGS_train_topk), " is not exact or approx")));
    }
    if (*mode == TrainingTopKMode::kApprox) {
      TrainingTopKOptions o;
      o.max_queries = 0;
      o.mode = TrainingTopKMode::kApprox;
      o.approx_min_keys = 0;
      o.approx_group_size =
          static_cast<size_t>(std::max<int64_t>(0, absl::GetFlag(FLAGS_train_topk_group_size)));
      o.approx_candidate_fraction = absl::GetFlag(FLAGS_train_topk_candidate_fraction);
      std::vector<float> scores(topk.size());
      if (auto s = TrainingTopK(ds.keys.view(), ds.train.view(), train_k, o, pool_, topk, scores);
          !s.ok()) {
        Fail(s);
      }
      *seconds = Seconds(t0, Clock::now());
      std::printf("  graph: approximate training top-%d (group size %zu, candidate fraction "
                  "%.4f): %.2f s\n",
                  train_k, o.approx_group_size, o.approx_candidate_fraction, *seconds);
      return topk;
    }
    bool cached = false;
    if (!cache.empty()) {
      if (auto ids = ReadIdMatrixFile(cache);
          ids.ok() && ids->rows == ds.train.rows && ids->cols == static_cast<size_t>(train_k)) {
        // The cache must belong to this data: spot-check rows against the
        // exact top-1 before trusting it.
        cached = true;
        for (size_t r = 0; r < ds.train.rows && cached; r += std::max<size_t>(1, ds.train.rows / 16)) {
          std::vector<float> s(ds.keys.rows);
          simd::Active().dot_batch(ds.train.row(r), ds.keys.data.data(), ds.keys.rows,
                                   ds.keys.cols, ds.keys.cols, s.data());
          const size_t best = std::max_element(s.begin(), s.end()) - s.begin();
          cached = s[best] == s[ids->row(r)[0]];
        }
        if (cached) {
          std::copy(ids->data.begin(), ids->data.end(), topk.begin());
        } else {
          std::printf("  graph: --train_topk_cache %s does not match this data; recomputing\n",
                      cache.c_str());
        }
      }
    }
    if (!cached) {
      std::vector<float> scores(topk.size());
      if (auto s = ExactTopK(ds.keys.view(), ds.train.view(), train_k, topk, scores, pool_);
          !s.ok()) {
        Fail(s);
      }
      if (!cache.empty()) {
        IdMatrix ids;
        ids.rows = ds.train.rows;
        ids.cols = static_cast<size_t>(train_k);
        ids.data.assign(topk.begin(), topk.end());
        if (auto s = WriteIdMatrixFile(cache, ids); !s.ok()) Fail(s);
      }
    }
    *seconds = Seconds(t0, Clock::now());
    return topk;
  }

  template <typename Add>
  std::unique_ptr<index::AttentionGraphIndex> RunGraph(const DataSet& ds,
                                                       const std::vector<int64_t>& truth, int k,
                                                       const std::vector<int64_t>& topk,
                                                       int train_k, double knn_s, Add&& add) {
    auto t0 = Clock::now();

    {
      // How much of what decode queries want did some training query want?
      std::vector<uint8_t> seen(ds.keys.rows, 0);
      for (int64_t id : topk) {
        if (id >= 0) seen[id] = 1;
      }
      size_t hit = 0;
      for (int64_t id : truth) hit += (id >= 0 && seen[id]) ? 1 : 0;
      std::printf("  graph: %.1f%% of decode queries' top-%d keys are in some training query's "
                  "top-%d\n",
                  100.0 * static_cast<double>(hit) / static_cast<double>(truth.size()), k, train_k);
    }
    index::AttentionGraphOptions o;
    o.degree = absl::GetFlag(FLAGS_graph_degree);
    o.entry_points = absl::GetFlag(FLAGS_graph_entry_points);
    o.prune_alpha = static_cast<float>(absl::GetFlag(FLAGS_graph_prune_alpha));
    o.saturate = absl::GetFlag(FLAGS_graph_saturate);
    o.pivots_per_query = absl::GetFlag(FLAGS_graph_pivots);
    o.recent_entries = absl::GetFlag(FLAGS_graph_recent_entries);
    o.routers = absl::GetFlag(FLAGS_graph_routers);
    o.frequency_order = absl::GetFlag(FLAGS_graph_frequency_order);
    o.scan_bf16 = absl::GetFlag(FLAGS_graph_scan_bf16);
    o.build_beam = absl::GetFlag(FLAGS_graph_build_beam);
    o.link_beam = absl::GetFlag(FLAGS_graph_link_beam);
    o.router_probe = absl::GetFlag(FLAGS_graph_router_probe);
    o.router_entries = absl::GetFlag(FLAGS_graph_router_entries);
    t0 = Clock::now();
    auto graph = index::AttentionGraphIndex::Build(ds.keys.view(), topk,
                                                   static_cast<size_t>(train_k), o, pool_);
    if (!graph.ok()) Fail(graph.status());
    if (absl::GetFlag(FLAGS_graph_query_routers)) {
      if (auto s = (*graph)->SetRouters(ds.train.view(), topk, static_cast<size_t>(train_k));
          !s.ok()) {
        Fail(s);
      }
    }
    const double build = Seconds(t0, Clock::now());
    const auto& bs = (*graph)->build_stats();
    std::printf("  graph: training top-%d of %zu queries %.2f s (GPU work in production), "
                "build %.2f s with %zu threads, %.2f CPU s (projection %.2f, reverse %.2f, "
                "link %.2f s; %zu keys covered by projection, %zu linked with %.1fM distances)\n",
                train_k, ds.train.rows, knn_s, build, pool_->size() + 1, bs.cpu_seconds,
                bs.projection_seconds, bs.reverse_seconds, bs.link_seconds, bs.keys_covered,
                bs.keys_linked, 1e-6 * static_cast<double>(bs.link_distance_computations));
    for (int beam : ParseInts(absl::GetFlag(FLAGS_graph_beams), "graph_beams")) {
      if (beam < k) continue;
      index::SearchParams p;
      p.k = k;
      p.beam = beam;
      // Wall time by default; with --graph_cpu_clock this thread's CPU time.
      const Row r = MeasureKvrBest(**graph, ds.test, truth, k, p,
                                   absl::GetFlag(FLAGS_graph_search_repeats),
                                   absl::GetFlag(FLAGS_graph_cpu_clock), "graph_search_repeats");
      add(r, "graph", absl::StrFormat("M=%d,L=%d", o.degree, beam), build);
      if (r.recall > 0.995) break;
    }
    return std::move(*graph);
  }

  // `auto` (issue 17 item 4): self-calibration as the node runs it. Every
  // 8th training query (at most 512, spread over positions) is held back with
  // its exact top-k, as the worker uploads them; the rest train the graph.
  // Rows: the graph and IVF each calibrated for --target_recall
  // ("auto-graph", "auto-ivf"), the kind IndexType::kAuto chose by the cost
  // model alone ("auto-model", the session-25 rule) and by measured time
  // ("auto", the default), measured on the decode queries at the calibrated
  // effort; build_s includes the calibration (and the timing). Also prints
  // ns per distance computation of each kind (the cost constants of
  // calibrate.h) and every candidate auto timed.
  template <typename Add>
  void RunAuto(const DataSet& ds, const std::vector<int64_t>& truth, int k, Add&& add) {
    if (ds.train.rows < 16) {
      std::printf("  auto: skipped (needs >= 16 training queries)\n");
      return;
    }
    const size_t stride = std::max<size_t>(8, (ds.train.rows + 511) / 512);
    Matrix train(ds.train.rows - ds.train.rows / stride, ds.keys.cols);
    Matrix held(ds.train.rows / stride, ds.keys.cols);
    for (size_t i = 0, t = 0, h = 0; i < ds.train.rows; ++i) {
      float* dst = (i % stride == stride - 1 && h < held.rows) ? held.row(h++) : train.row(t++);
      std::copy_n(ds.train.row(i), ds.keys.cols, dst);
    }
    const int train_k = std::min<int>(absl::GetFlag(FLAGS_train_k), static_cast<int>(ds.keys.rows));
    const std::vector<int64_t> train_topk = Truth(ds.keys, train, train_k, pool_);
    const std::vector<int64_t> held_topk = Truth(ds.keys, held, k, pool_);
    const index::Holdout holdout{held.view(), held_topk, static_cast<size_t>(k)};
    index::CalibratedBuildOptions o;
    o.calibration.target_recall = absl::GetFlag(FLAGS_target_recall);
    o.calibration.k = k;
    const int per_search = absl::GetFlag(FLAGS_auto_queries_per_search);
    if (per_search < 1) {
      Fail(absl::InvalidArgumentError(
          absl::StrCat("--auto_queries_per_search ", per_search, " < 1")));
    }
    o.calibration.queries_per_search = static_cast<size_t>(per_search);
    if (auto s = index::ValidateCalibrationOptions(o.calibration); !s.ok()) Fail(s);
    o.pca = PcaOptions();
    o.pca_candidate = true;
    double flat_ns = 0;
    {  // one query at a time, as a node shard sees one kv head's query group
      auto flat = index::FlatIndex::Create(ds.keys.cols);
      if (!flat.ok()) Fail(flat.status());
      if (auto s = (*flat)->Add(ds.keys.view()); !s.ok()) Fail(s);
      index::SearchParams p;
      p.k = k;
      std::vector<int64_t> ids(k);
      std::vector<float> scores(k);
      const size_t nq = std::min<size_t>(ds.test.rows, 200);
      const auto t0 = Clock::now();
      for (size_t i = 0; i < nq; ++i) {
        if (auto s = (*flat)->Search(ds.test.view().rows_slice(i, 1), p, ids, scores); !s.ok()) {
          Fail(s);
        }
      }
      flat_ns = 1e9 * Seconds(t0, Clock::now()) / static_cast<double>(nq * ds.keys.rows);
    }
    std::printf("  auto: %zu held-back queries (every %zu-th), flat %.2f ns/distance "
                "(one query per search)\n",
                held.rows, stride, flat_ns);
    for (int variant = 0; variant < 4; ++variant) {
      const index::IndexType type = variant == 0   ? index::IndexType::kGraph
                                    : variant == 1 ? index::IndexType::kIvf
                                                   : index::IndexType::kAuto;
      // Build without held-back queries, then calibrate, timing each (for
      // kAuto the one call builds every candidate and calibrates them).
      const bool one_kind = type != index::IndexType::kAuto;
      std::vector<index::AutoCandidate> candidates;
      o.auto_by_time = variant == 3;
      o.candidates = variant == 3 ? &candidates : nullptr;
      auto t0 = Clock::now();
      auto built = index::BuildCalibrated(type, ds.keys.view(), train_topk,
                                          static_cast<size_t>(train_k),
                                          one_kind ? index::Holdout{} : holdout, o, pool_);
      if (!built.ok()) Fail(built.status());
      const double build = Seconds(t0, Clock::now());
      index::CalibrationResult c = *(*built)->calibration();
      double calibrate_s = 0;
      if (one_kind) {
        t0 = Clock::now();
        auto chosen = index::CalibrateEffort((*built)->inner(), holdout, o.calibration, pool_);
        if (!chosen.ok()) Fail(chosen.status());
        calibrate_s = Seconds(t0, Clock::now());
        c = *chosen;
      }
      index::SearchParams p;
      p.k = k;
      p.beam = c.beam;
      p.nprobe = c.nprobe;
      const Row r = MeasureKvr(**built, ds.test, truth, k, p);
      const std::string kind(index::IndexTypeName(c.kind));
      const int effort = index::CalibratedEffort(c);
      const std::string method = one_kind       ? absl::StrCat("auto-", kind)
                                 : variant == 2 ? std::string("auto-model")
                                                : std::string("auto");
      double timing_s = 0;
      for (const index::AutoCandidate& a : candidates) {
        const index::CalibrationResult& ac = a.calibration;
        timing_s += a.timing_seconds;
        std::printf("  auto: candidate %-8s effort %4d: held-back recall %.4f (%s), modelled "
                    "%.0f, measured %s\n",
                    std::string(index::IndexTypeName(ac.kind)).c_str(),
                    index::CalibratedEffort(ac),
                    ac.expected_recall, a.meets_target ? "meets" : "misses", ac.cost_per_query,
                    absl::StrFormat("%.1f us/query (%s; timing %.3f s)", a.measured_us,
                                    !a.meets_target ? "not timed"
                                    : a.pruned      ? "one pass, pruned"
                                                    : "median",
                                    a.timing_seconds)
                        .c_str());
      }
      if (!candidates.empty()) {
        std::printf("  auto: timing the candidates took %.3f s of the %.2f s build\n", timing_s,
                    build);
      }
      add(r, method, absl::StrFormat("%s,e=%d,exp=%.3f", kind, effort, c.expected_recall),
          build + calibrate_s);
      const double dist = r.scanned_pct / 100.0 * static_cast<double>(ds.keys.rows);
      std::printf("  auto: %s chose %s effort %d: expected recall %.4f, cost %.0f flat-distances "
                  "(flat %zu), %.2f ns/distance = %.2f x flat; build %.2f s + calibration "
                  "%.2f s\n",
                  method.c_str(), kind.c_str(), effort, c.expected_recall, c.cost_per_query,
                  ds.keys.rows, 1e3 * r.us_per_query / std::max(1.0, dist),
                  1e3 * r.us_per_query / std::max(1.0, dist) / flat_ns, build, calibrate_s);
    }
  }

  template <typename Add>
  void RunFaiss(const DataSet& ds, const std::vector<int64_t>& truth, int k, Add&& add) {
    const int m = absl::GetFlag(FLAGS_hnsw_m);
    faiss::IndexHNSW hnsw(new CountingFlatIp(static_cast<faiss::Index::idx_t>(ds.keys.cols)), m);
    hnsw.own_fields = true;
    hnsw.hnsw.efConstruction = absl::GetFlag(FLAGS_hnsw_ef_construction);
    const auto t0 = Clock::now();
    omp_set_num_threads(static_cast<int>(pool_->size() + 1));
    hnsw.add(static_cast<faiss::Index::idx_t>(ds.keys.rows), ds.keys.data.data());
    const double build = Seconds(t0, Clock::now());
    // Searches are single-threaded like every other method's (an OpenMP team
    // spinning beside a one-query search only adds noise).
    omp_set_num_threads(1);
    for (int ef : ParseInts(absl::GetFlag(FLAGS_hnsw_efs), "hnsw_efs")) {
      if (ef < k) continue;
      hnsw.hnsw.efSearch = ef;
      std::vector<faiss::Index::idx_t> labels(ds.test.rows * k);
      std::vector<float> dist(ds.test.rows * k);
      Row r = Measure(ds.test, truth, ds.keys.rows, k, [&](std::vector<int64_t>& ids) {
        CountingFlatIp::count = 0;
        // One query per call keeps faiss on this thread (its OpenMP loop is
        // over queries).
        for (size_t i = 0; i < ds.test.rows; ++i) {
          hnsw.search(1, ds.test.row(i), k, dist.data() + i * k, labels.data() + i * k);
        }
        for (size_t i = 0; i < labels.size(); ++i) ids[i] = labels[i];
        return CountingFlatIp::count;
      });
      add(r, "faiss_hnsw", absl::StrFormat("M=%d,ef=%d", m, ef), build);
      if (r.recall > 0.995) break;
    }
  }

  // faiss's IVF (IndexIVFFlat over an IndexFlatIP quantizer, inner product):
  // k-means on the keys with faiss's defaults (2 threads), then the nprobe
  // sweep single-threaded, one query per call. % scanned = nlist (the
  // coarse scan) + the probed lists' sizes, per query.
  template <typename Add>
  void RunFaissIvf(const DataSet& ds, const std::vector<int64_t>& truth, int k, Add&& add) {
    const size_t n = ds.keys.rows, d = ds.keys.cols;
    const int nlist_flag = absl::GetFlag(FLAGS_faiss_ivf_nlist);
    const size_t nlist = std::clamp<size_t>(
        nlist_flag > 0 ? static_cast<size_t>(nlist_flag)
                       : static_cast<size_t>(4.0 * std::sqrt(static_cast<double>(n))),
        1, n);
    faiss::IndexFlatIP quantizer(static_cast<faiss::Index::idx_t>(d));
    faiss::IndexIVFFlat ivf(&quantizer, d, nlist, faiss::METRIC_INNER_PRODUCT);
    const auto t0 = Clock::now();
    omp_set_num_threads(static_cast<int>(pool_->size() + 1));
    ivf.train(static_cast<faiss::Index::idx_t>(n), ds.keys.data.data());
    ivf.add(static_cast<faiss::Index::idx_t>(n), ds.keys.data.data());
    const double build = Seconds(t0, Clock::now());
    omp_set_num_threads(1);
    for (int nprobe : ParseInts(absl::GetFlag(FLAGS_faiss_nprobes), "faiss_nprobes")) {
      if (nprobe < 1 || static_cast<size_t>(nprobe) > nlist) break;
      ivf.nprobe = static_cast<size_t>(nprobe);
      // Keys scanned: the coarse scan plus the lists each query probes
      // (counted outside the timed searches).
      int64_t scanned = 0;
      {
        std::vector<faiss::Index::idx_t> lists(static_cast<size_t>(nprobe));
        std::vector<float> dist(static_cast<size_t>(nprobe));
        for (size_t i = 0; i < ds.test.rows; ++i) {
          quantizer.search(1, ds.test.row(i), nprobe, dist.data(), lists.data());
          scanned += static_cast<int64_t>(nlist);
          for (faiss::Index::idx_t l : lists) {
            if (l >= 0) scanned += static_cast<int64_t>(ivf.invlists->list_size(l));
          }
        }
      }
      std::vector<faiss::Index::idx_t> labels(ds.test.rows * k);
      std::vector<float> dist(ds.test.rows * k);
      Row r = Measure(ds.test, truth, n, k, [&](std::vector<int64_t>& ids) {
        for (size_t i = 0; i < ds.test.rows; ++i) {
          ivf.search(1, ds.test.row(i), k, dist.data() + i * k, labels.data() + i * k);
        }
        for (size_t i = 0; i < labels.size(); ++i) ids[i] = labels[i];
        return scanned;
      });
      add(r, "faiss_ivf", absl::StrFormat("nlist=%zu,np=%d", nlist, nprobe), build);
      if (r.recall > 0.995) break;
    }
  }

  template <typename Add>
  void RunHnswlib(const DataSet& ds, const std::vector<int64_t>& truth, int k, Add&& add) {
    auto index = BuildHnswlib(ds.keys);
    for (int ef : ParseInts(absl::GetFlag(FLAGS_hnsw_efs), "hnsw_efs")) {
      if (ef < k) continue;
      Row r = MeasureHnswlib(*index.second, ds.test, truth, k, ef);
      add(r, "hnswlib", absl::StrFormat("M=%d,ef=%d", absl::GetFlag(FLAGS_hnsw_m), ef),
          index.first);
      if (r.recall > 0.995) break;
    }
    if (absl::GetFlag(FLAGS_ood_gap) && ds.key_queries.rows > 0) {
      // The same graph, the same budget: key queries (in distribution) vs
      // attention queries (out of distribution).
      const auto key_truth = Truth(ds.keys, ds.key_queries, k, pool_);
      std::printf("\n  OOD gap, hnswlib M=%d (recall@%d at equal ef):\n", absl::GetFlag(FLAGS_hnsw_m),
                  k);
      std::printf("  %8s %14s %14s %16s %16s\n", "ef", "key queries", "attn queries",
                  "key scanned %", "attn scanned %");
      for (int ef : {k, 2 * k, 4 * k}) {
        Row key_r = MeasureHnswlib(*index.second, ds.key_queries, key_truth, k, ef);
        Row attn_r = MeasureHnswlib(*index.second, ds.test, truth, k, ef);
        std::printf("  %8d %14.4f %14.4f %16.3f %16.3f\n", ef, key_r.recall, attn_r.recall,
                    key_r.scanned_pct, attn_r.scanned_pct);
        key_r.family = attn_r.family = ds.family;
        key_r.dataset = attn_r.dataset = ds.name;
        key_r.n = attn_r.n = ds.keys.rows;
        key_r.method = "hnswlib_key_queries";
        attn_r.method = "hnswlib_attn_queries";
        key_r.param = attn_r.param = absl::StrFormat("ef=%d", ef);
        gap_rows_.push_back(key_r);
        gap_rows_.push_back(attn_r);
      }
    }
  }

  // The RoarGraph reference (its public code, built outside the tree by
  // bench/peers/build_roargraph.sh): the same keys, training queries and
  // training top-k go to its programs as .fbin/.bin files in a temp dir; its
  // build is timed here (wall clock, --threads), its search runs one thread
  // and reports recall@k, mean latency and average visited keys per L.
  template <typename Add>
  void RunRoarGraph(const DataSet& ds, const std::vector<int64_t>& truth,
                    const std::vector<float>& truth_scores, int k,
                    const std::vector<int64_t>& train_topk, int train_k, Add&& add) {
    const std::string bin = absl::GetFlag(FLAGS_roargraph_bin_dir);
    if (ds.test.rows < 100) {
      // Its search program warms up on queries 0..99.
      std::printf("  roargraph: skipped (its search needs >= 100 test queries, have %zu)\n",
                  ds.test.rows);
      return;
    }
    std::string commit = "unknown";
    if (std::ifstream f(bin + "/COMMIT"); f) std::getline(f, commit);
    const std::string short_commit = commit.substr(0, 12);
    std::string tmpl = (std::filesystem::temp_directory_path() / "kvr-roar-XXXXXX").string();
    if (mkdtemp(tmpl.data()) == nullptr) {
      Fail(absl::InternalError(absl::StrCat("mkdtemp ", tmpl, ": ", std::strerror(errno))));
    }
    const std::string dir = tmpl;
    struct Cleanup {
      std::string path;
      ~Cleanup() {
        std::error_code ec;
        std::filesystem::remove_all(path, ec);
      }
    } cleanup{dir};
    auto write_u32s = [](std::ofstream& f, std::initializer_list<uint32_t> v) {
      for (uint32_t x : v) f.write(reinterpret_cast<const char*>(&x), sizeof(x));
    };
    auto write_fbin = [&](const std::string& path, const Matrix& m) {
      std::ofstream f(path, std::ios::binary);
      write_u32s(f, {static_cast<uint32_t>(m.rows), static_cast<uint32_t>(m.cols)});
      f.write(reinterpret_cast<const char*>(m.data.data()),
              static_cast<std::streamsize>(m.data.size() * sizeof(float)));
      if (!f) Fail(absl::InternalError(absl::StrCat("cannot write ", path)));
    };
    // ids (rows x cols, best first) as uint32, then optional distances.
    auto write_gt = [&](const std::string& path, const std::vector<int64_t>& ids, size_t rows,
                        size_t cols, const std::vector<float>* scores) {
      std::ofstream f(path, std::ios::binary);
      write_u32s(f, {static_cast<uint32_t>(rows), static_cast<uint32_t>(cols)});
      std::vector<uint32_t> u(ids.size());
      for (size_t i = 0; i < ids.size(); ++i) u[i] = static_cast<uint32_t>(std::max<int64_t>(ids[i], 0));
      f.write(reinterpret_cast<const char*>(u.data()),
              static_cast<std::streamsize>(u.size() * sizeof(uint32_t)));
      if (scores != nullptr) {
        // Inner product: RoarGraph's distance is the negated score.
        std::vector<float> dist(scores->size());
        for (size_t i = 0; i < dist.size(); ++i) dist[i] = -(*scores)[i];
        f.write(reinterpret_cast<const char*>(dist.data()),
                static_cast<std::streamsize>(dist.size() * sizeof(float)));
      }
      if (!f) Fail(absl::InternalError(absl::StrCat("cannot write ", path)));
    };
    write_fbin(dir + "/keys.fbin", ds.keys);
    write_fbin(dir + "/train.fbin", ds.train);
    write_fbin(dir + "/queries.fbin", ds.test);
    write_gt(dir + "/train_gt.bin", train_topk, ds.train.rows, static_cast<size_t>(train_k), nullptr);
    write_gt(dir + "/gt.bin", truth, ds.test.rows, static_cast<size_t>(k), &truth_scores);

    const absl::Duration limit = absl::Seconds(absl::GetFlag(FLAGS_roargraph_timeout_s));
    // Runs one program to completion, its output in `log`; false on failure.
    auto run = [&](std::vector<std::string> argv, const std::string& log) {
      const std::string program = argv.empty() ? "" : argv[0];
      SubprocessOptions so;
      so.merge_stderr = true;
      so.log_path = log;
      so.keep_line = [](absl::string_view) { return false; };
      auto child = Subprocess::Start(std::move(argv), so);
      if (!child.ok()) {
        std::printf("  roargraph: %s\n", std::string(child.status().message()).c_str());
        return false;
      }
      // Drain its output until it exits (the prefix never appears).
      const auto wait = (*child)->WaitForLine("\x01", limit);
      if (absl::IsDeadlineExceeded(wait.status())) {
        std::printf("  roargraph: no exit within %s (log %s)\n",
                    absl::FormatDuration(limit).c_str(), log.c_str());
        return false;
      }
      const absl::StatusOr<int> status = (*child)->Stop(0, absl::Seconds(30));
      if (!status.ok() || !WIFEXITED(*status) || WEXITSTATUS(*status) != 0) {
        std::printf("  roargraph: %s failed (log %s)\n", program.c_str(), log.c_str());
        return false;
      }
      return true;
    };
    const std::string threads = std::to_string(pool_->size() + 1);
    const auto t0 = Clock::now();
    if (!run({bin + "/test_build_roargraph", "--data_type", "float", "--dist", "ip",
              "--base_data_path", dir + "/keys.fbin", "--sampled_query_data_path",
              dir + "/train.fbin", "--projection_index_save_path", dir + "/roar.index",
              "--learn_base_nn_path", dir + "/train_gt.bin", "--M_sq", std::to_string(train_k),
              "--M_pjbp", "35", "--L_pjpq", "500", "-T", threads},
             dir + "/build.log")) {
      PrintTail(dir + "/build.log", 5);
      return;
    }
    const double build = Seconds(t0, Clock::now());
    std::vector<std::string> argv = {bin + "/test_search_roargraph", "--data_type", "float",
                                     "--dist", "ip", "--base_data_path", dir + "/keys.fbin",
                                     "--projection_index_save_path", dir + "/roar.index",
                                     "--gt_path", dir + "/gt.bin", "--query_path",
                                     dir + "/queries.fbin", "--k", std::to_string(k), "-T", "1",
                                     "--evaluation_save_path", dir + "/eval.csv", "--L_pq"};
    size_t ls = 0;
    for (int l : ParseInts(absl::GetFlag(FLAGS_roargraph_ls), "roargraph_ls")) {
      if (l < k) continue;
      argv.push_back(std::to_string(l));
      ++ls;
    }
    if (ls == 0) {
      std::printf("  roargraph: no --roargraph_ls value >= k = %d\n", k);
      return;
    }
    if (!run(argv, dir + "/search.log")) {
      PrintTail(dir + "/search.log", 5);
      return;
    }
    // eval.csv: L, QPS, avg visited, mean latency (ms), recall@k, avg hops.
    std::ifstream eval(dir + "/eval.csv");
    std::string line;
    while (std::getline(eval, line)) {
      const std::vector<std::string> f = absl::StrSplit(line, ',');
      double l = 0, visited = 0, ms = 0, recall = 0;
      if (f.size() < 5 || !absl::SimpleAtod(f[0], &l) || !absl::SimpleAtod(f[2], &visited) ||
          !absl::SimpleAtod(f[3], &ms) || !absl::SimpleAtod(f[4], &recall)) {
        continue;
      }
      Row r;
      r.recall = recall;
      r.scanned_pct = 100.0 * visited / static_cast<double>(ds.keys.rows);
      r.us_per_query = 1000.0 * ms;
      add(r, "roargraph", absl::StrFormat("%s,L=%d", short_commit, static_cast<int>(l)), build);
    }
  }

  using Hnsw = hnswlib::HierarchicalNSW<float>;
  std::pair<double, std::unique_ptr<Hnsw>> BuildHnswlib(const Matrix& keys) {
    space_ = std::make_unique<CountingIpSpace>(keys.cols);
    auto index = std::make_unique<Hnsw>(space_.get(), keys.rows, absl::GetFlag(FLAGS_hnsw_m),
                                        absl::GetFlag(FLAGS_hnsw_ef_construction));
    const auto t0 = Clock::now();
    index->addPoint(keys.row(0), 0);
    pool_->ParallelFor(keys.rows - 1, 256, [&](size_t b, size_t e) {
      for (size_t i = b; i < e; ++i) index->addPoint(keys.row(i + 1), i + 1);
    });
    return {Seconds(t0, Clock::now()), std::move(index)};
  }

  Row MeasureHnswlib(Hnsw& index, const Matrix& q, const std::vector<int64_t>& truth, int k,
                     int ef) {
    index.setEf(static_cast<size_t>(ef));
    return Measure(q, truth, index.cur_element_count, k, [&](std::vector<int64_t>& ids) {
      CountingIpSpace::count = 0;
      for (size_t i = 0; i < q.rows; ++i) {
        auto result = index.searchKnn(q.row(i), static_cast<size_t>(k));
        // The priority queue pops worst first.
        for (int j = k - 1; j >= 0; --j) {
          ids[i * k + j] = result.empty() ? -1 : static_cast<int64_t>(result.top().second);
          if (!result.empty()) result.pop();
        }
      }
      return CountingIpSpace::count;
    });
  }

  // Single-head decode attention: Attend (graph top-k + partial attention)
  // vs the exact scan over every key, at the cheapest beam that reached the
  // target recall.
  void RunAttention(const DataSet& ds, const index::AttentionGraphIndex& graph,
                    const std::vector<Row>& rows, int k) {
    int beam = 0;
    for (const Row& r : rows) {
      if (r.method == "graph" && r.recall >= absl::GetFlag(FLAGS_target_recall)) {
        beam = std::stoi(r.param.substr(r.param.find("L=") + 2));
        break;
      }
    }
    if (beam == 0) beam = std::max(k, 1000);
    const ValueMatrix values = ValueMatrix::FromFloat(DType::kBf16, ds.values.view());
    const float scale = 1.0f / std::sqrt(static_cast<float>(ds.keys.cols));
    const size_t nq = ds.test.rows;
    Partials exact(nq, ds.values.cols), approx(nq, ds.values.cols);
    auto t0 = Clock::now();
    for (size_t i = 0; i < nq; ++i) {
      if (auto s = ExactAttention(ds.test.view().rows_slice(i, 1), ds.keys.view(), values, scale,
                                  exact.view().slice(i, 1));
          !s.ok()) {
        Fail(s);
      }
    }
    const double exact_us = 1e6 * Seconds(t0, Clock::now()) / static_cast<double>(nq);
    index::AttendParams ap;
    ap.search.k = k;
    ap.search.beam = beam;
    ap.scale = scale;
    index::AttendScratch scratch;
    t0 = Clock::now();
    for (size_t i = 0; i < nq; ++i) {
      if (auto s = index::Attend(ds.test.view().rows_slice(i, 1), graph, values, ap,
                                 approx.view().slice(i, 1), &scratch);
          !s.ok()) {
        Fail(s);
      }
    }
    const double graph_us = 1e6 * Seconds(t0, Clock::now()) / static_cast<double>(nq);
    // The best any top-k retrieval can do: exact top-k (flat) + partial attention.
    Partials oracle(nq, ds.values.cols);
    auto flat = index::FlatIndex::Create(ds.keys.cols);
    if (!flat.ok()) Fail(flat.status());
    if (auto s = (*flat)->Add(ds.keys.view()); !s.ok()) Fail(s);
    for (size_t i = 0; i < nq; ++i) {
      if (auto s = index::Attend(ds.test.view().rows_slice(i, 1), **flat, values, ap,
                                 oracle.view().slice(i, 1), &scratch);
          !s.ok()) {
        Fail(s);
      }
    }
    // Relative L2 error of `a` against `ref`, mean and max over queries.
    auto rel_err = [&](const Partials& a, const Partials& ref) {
      double sum = 0, worst = 0;
      for (size_t i = 0; i < nq; ++i) {
        double num = 0, den = 0;
        for (size_t j = 0; j < ds.values.cols; ++j) {
          const double e = ref.o.row(i)[j], x = a.o.row(i)[j];
          num += (x - e) * (x - e);
          den += e * e;
        }
        const double rel = std::sqrt(num / std::max(den, 1e-30));
        sum += rel;
        worst = std::max(worst, rel);
      }
      return std::pair<double, double>(sum / static_cast<double>(nq), worst);
    };
    const auto [graph_mean, graph_max] = rel_err(approx, exact);
    const auto [oracle_mean, oracle_max] = rel_err(oracle, exact);
    const auto [index_mean, index_max] = rel_err(approx, oracle);
    std::printf("\n  single-head decode attention, N=%zu, values bf16, one thread "
                "(errors: relative L2 of the output):\n",
                ds.keys.rows);
    std::printf("  %-36s %10s %9s %22s %22s\n", "method", "us/query", "speedup",
                "vs full attn mean/max", "vs exact top-k mean/max");
    std::printf("  %-36s %10.1f %9s %22s %22s\n", "exact scan attention (all keys)", exact_us,
                "1.0x", "0 / 0", "-");
    std::printf("  %-36s %10s %9s %11.4f /%9.4f %22s\n",
                absl::StrFormat("exact top-%d (flat) + partial attn", k).c_str(), "-", "-",
                oracle_mean, oracle_max, "0 / 0");
    std::printf("  %-36s %10.1f %8.1fx %11.4f /%9.4f %11.4f /%9.4f\n",
                absl::StrFormat("graph top-%d, L=%d + partial attn", k, beam).c_str(), graph_us,
                exact_us / graph_us, graph_mean, graph_max, index_mean, index_max);
    Row ex;
    ex.family = ds.family;
    ex.dataset = ds.name;
    ex.n = ds.keys.rows;
    ex.method = "attention_exact_scan";
    ex.us_per_query = exact_us;
    ex.scanned_pct = 100;
    ex.recall = 1;
    Row gr = ex;
    gr.method = "attention_graph";
    gr.param = absl::StrFormat(
        "L=%d,err_vs_full_mean=%.5f,err_vs_full_max=%.5f,err_vs_exact_topk_mean=%.5f,"
        "exact_topk_err_vs_full_mean=%.5f",
        beam, graph_mean, graph_max, index_mean, oracle_mean);
    gr.us_per_query = graph_us;
    gap_rows_.push_back(ex);
    gap_rows_.push_back(gr);
  }

  void PrintTable(const std::vector<Row>& rows, int k) {
    const double target = absl::GetFlag(FLAGS_target_recall);
    std::printf("\n  cheapest setting per method reaching recall@%d >= %.2f:\n", k, target);
    std::printf("  %-11s %-16s %10s %11s %11s %9s\n", "method", "param", "recall", "scanned %",
                "us/query", "build s");
    std::vector<std::string> seen;
    for (const Row& r : rows) {
      if (std::find(seen.begin(), seen.end(), r.method) != seen.end()) continue;
      const Row* best = nullptr;
      for (const Row& c : rows) {
        if (c.method == r.method && c.recall >= target &&
            (best == nullptr || c.scanned_pct < best->scanned_pct)) {
          best = &c;
        }
      }
      seen.push_back(r.method);
      if (best == nullptr) {
        std::printf("  %-11s %-16s %10s\n", r.method.c_str(), "(not reached)", "-");
      } else {
        std::printf("  %-11s %-16s %10.4f %11.3f %11.1f %9.2f\n", best->method.c_str(),
                    best->param.c_str(), best->recall, best->scanned_pct, best->us_per_query,
                    best->build_s);
      }
    }
  }

 public:
  // Per data set (family, N): the cheapest setting (least µs/query) of each
  // method reaching --target_recall; then the issue-17 target per family
  // (the graph at >= target recall in <= 0.5x the µs of the best peer
  // reaching it, and no slower than the exact scan) and the worst family.
  void PrintSummary() const {
    const double target = absl::GetFlag(FLAGS_target_recall);
    const char* const kPeers[] = {"ivf", "faiss_ivf", "faiss_hnsw", "hnswlib", "roargraph"};
    std::vector<std::pair<std::string, size_t>> sets;
    for (const Row& r : all_rows_) {
      if (std::find(sets.begin(), sets.end(), std::make_pair(r.family, r.n)) == sets.end()) {
        sets.emplace_back(r.family, r.n);
      }
    }
    auto cheapest = [&](const std::string& family, size_t n, const std::string& method) {
      const Row* best = nullptr;
      for (const Row& r : all_rows_) {
        if (r.family == family && r.n == n && r.method == method && r.recall >= target &&
            (best == nullptr || r.us_per_query < best->us_per_query)) {
          best = &r;
        }
      }
      return best;
    };
    std::printf("\n=== summary: cheapest setting (least us/query) per method reaching "
                "recall >= %.2f ===\n", target);
    std::printf("  %-10s %8s %-11s %-24s %8s %10s %10s %9s\n", "family", "N", "method", "param",
                "recall", "scanned %", "us/query", "build s");
    for (const auto& [family, n] : sets) {
      std::vector<std::string> methods;
      for (const Row& r : all_rows_) {
        if (r.family == family && r.n == n &&
            std::find(methods.begin(), methods.end(), r.method) == methods.end()) {
          methods.push_back(r.method);
        }
      }
      for (const std::string& m : methods) {
        const Row* b = cheapest(family, n, m);
        if (b == nullptr) {
          std::printf("  %-10s %8zu %-11s %-24s\n", family.c_str(), n, m.c_str(), "(not reached)");
        } else {
          std::printf("  %-10s %8zu %-11s %-24s %8.4f %10.3f %10.1f %9.2f\n", family.c_str(), n,
                      m.c_str(), b->param.c_str(), b->recall, b->scanned_pct, b->us_per_query,
                      b->build_s);
        }
      }
    }
    std::printf("\n=== target: graph recall >= %.2f at <= 0.5x the best peer's us/query (peers: "
                "ivf, faiss_ivf, faiss_hnsw, hnswlib, roargraph) and <= the exact scan ===\n", target);
    std::printf("  %-10s %8s %12s %-24s %9s %10s  %s\n", "family", "N", "graph us", "best peer",
                "graph/peer", "exact us", "status");
    std::string worst;
    double worst_ratio = -1;
    for (const auto& [family, n] : sets) {
      const Row* g = cheapest(family, n, "graph");
      const Row* flat = cheapest(family, n, "flat");
      const Row* peer = nullptr;
      for (const char* m : kPeers) {
        const Row* b = cheapest(family, n, m);
        if (b != nullptr && (peer == nullptr || b->us_per_query < peer->us_per_query)) peer = b;
      }
      const double inf = std::numeric_limits<double>::infinity();
      const double ratio = g == nullptr ? inf : peer == nullptr ? 0.0 : g->us_per_query / peer->us_per_query;
      const bool vs_peer = g != nullptr && (peer == nullptr || ratio <= 0.5);
      const bool vs_exact = g != nullptr && (flat == nullptr || g->us_per_query <= flat->us_per_query);
      std::string status = g == nullptr ? "MISSED (graph never reaches the recall)"
                           : vs_peer && vs_exact ? "met"
                           : !vs_exact           ? "MISSED (slower than exact)"
                                                 : "MISSED (> 0.5x best peer)";
      std::printf("  %-10s %8zu %12s %-24s %9s %10s  %s\n", family.c_str(), n,
                  g == nullptr ? "-" : absl::StrFormat("%.1f", g->us_per_query).c_str(),
                  peer == nullptr ? "(none reached)"
                                  : absl::StrFormat("%s %.1f", peer->method, peer->us_per_query).c_str(),
                  g == nullptr || peer == nullptr ? "-" : absl::StrFormat("%.2fx", ratio).c_str(),
                  flat == nullptr ? "-" : absl::StrFormat("%.1f", flat->us_per_query).c_str(),
                  status.c_str());
      if (ratio > worst_ratio) {
        worst_ratio = ratio;
        worst = absl::StrFormat("%s (N=%zu)", family, n);
      }
    }
    if (!worst.empty()) {
      std::printf("  worst family: %s, graph/best peer = %s\n", worst.c_str(),
                  std::isinf(worst_ratio) ? "target recall not reached"
                                          : absl::StrFormat("%.2fx", worst_ratio).c_str());
    }
  }

  void WriteJson(const std::string& path) const {
    std::ofstream f(path);
    f << "[\n";
    std::vector<Row> all = all_rows_;
    all.insert(all.end(), gap_rows_.begin(), gap_rows_.end());
    for (size_t i = 0; i < all.size(); ++i) {
      const Row& r = all[i];
      f << absl::StrFormat(
          "  {\"family\": \"%s\", \"dataset\": \"%s\", \"n\": %zu, \"method\": \"%s\", "
          "\"param\": \"%s\", \"recall\": %.6f, \"scanned_pct\": %.6f, \"us_per_query\": %.3f, "
          "\"build_s\": %.3f}%s\n",
          r.family, r.dataset, r.n, r.method, r.param, r.recall, r.scanned_pct, r.us_per_query, r.build_s,
          i + 1 < all.size() ? "," : "");
    }
    f << "]\n";
  }

 private:
  ThreadPool* pool_;
  std::unique_ptr<CountingIpSpace> space_;
  std::vector<Row> all_rows_;
  std::vector<Row> gap_rows_;
};

// Bytes MemAvailable in /proc/meminfo says (0 when unknown).
uint64_t MemAvailableBytes() {
  std::ifstream f("/proc/meminfo");
  std::string key;
  uint64_t kib = 0;
  std::string unit;
  while (f >> key >> kib >> unit) {
    if (key == "MemAvailable:") return kib * 1024;
  }
  return 0;
}

// A rough upper estimate of the peak memory of one synthetic run of n keys
// (d, n_train training and n_test decode queries, the given methods): the
// generator's output and the data set cut from it (keys and values twice),
// plus the largest index built (each method's index lives only through its
// rows, except the graph, which stays for the attention measurement) and the
// training top-k. In bytes; saturating.
uint64_t EstimatePeakBytes(uint64_t n, uint64_t d, uint64_t n_train, uint64_t n_test,
                           uint64_t k, uint64_t train_k, const std::string& methods) {
  auto want = [&](absl::string_view m) {
    for (absl::string_view part : absl::StrSplit(methods, ',')) {
      if (part == m) return true;
    }
    return false;
  };
  const long double f = 4;  // float bytes
  const long double keys = static_cast<long double>(n) * d * f;
  const long double deg = static_cast<long double>(absl::GetFlag(FLAGS_graph_degree));
  const long double hm = static_cast<long double>(absl::GetFlag(FLAGS_hnsw_m));
  long double data = 4 * keys + (static_cast<long double>(n_train) + 2.0L * n_test) * d * f +
                     static_cast<long double>(n_test) * k * 12;
  long double train = 0, graph = 0, largest = 0;
  if (want("graph") || want("roargraph")) {
    train = static_cast<long double>(n_train) * train_k * 12;
  }
  if (want("graph") || want("auto")) graph = keys + static_cast<long double>(n) * deg * 4 * 3;
  if (want("flat")) largest = std::max(largest, keys);
  if (want("ivf") || want("faiss_ivf") || want("auto")) {
    largest = std::max(largest, keys + static_cast<long double>(n) * 8);
  }
  if (want("hnswlib") || want("faiss_hnsw")) {
    largest = std::max(largest, keys + static_cast<long double>(n) * (2 * hm * 4 + 32) * 1.5L);
  }
  const long double total = data + train + graph + largest;
  return total >= 1.8e19L ? std::numeric_limits<uint64_t>::max() : static_cast<uint64_t>(total);
}

// Prints the estimate for a synthetic run of n keys and exits with a clear
// message when it exceeds MemAvailable (the run would be killed or swap).
void CheckMemory(size_t n, const std::string& family) {
  const uint64_t d = static_cast<uint64_t>(absl::GetFlag(FLAGS_dim));
  const int64_t n_train_flag = absl::GetFlag(FLAGS_n_train);
  const uint64_t n_train =
      n_train_flag < 0 ? std::min<uint64_t>(n, 65536) : static_cast<uint64_t>(n_train_flag);
  const uint64_t need = EstimatePeakBytes(
      n, d, n_train, static_cast<uint64_t>(std::max(0, absl::GetFlag(FLAGS_n_test))),
      static_cast<uint64_t>(std::max(0, absl::GetFlag(FLAGS_k))),
      static_cast<uint64_t>(std::max(0, absl::GetFlag(FLAGS_train_k))),
      absl::GetFlag(FLAGS_methods));
  const uint64_t have = MemAvailableBytes();
  const double gib = 1024.0 * 1024.0 * 1024.0;
  std::printf("index_bench: %s N=%zu: estimated peak memory %.1f GiB (MemAvailable %.1f GiB)\n",
              family.c_str(), n, static_cast<double>(need) / gib, static_cast<double>(have) / gib);
  if (have > 0 && need > have) {
    Fail(absl::ResourceExhaustedError(absl::StrFormat(
        "%s at N=%zu needs about %.1f GiB but MemAvailable is %.1f GiB: use smaller --sizes, "
        "fewer --methods or a smaller --n_train",
        family, n, static_cast<double>(need) / gib, static_cast<double>(have) / gib)));
  }
}

DataSet Synthetic(size_t n, const std::string& family, ThreadPool* pool) {
  CheckMemory(n, family);
  auto opts = AttentionDataPreset(absl::GetFlag(FLAGS_preset));
  if (!opts.ok()) Fail(opts.status());
  opts->family = family;
  opts->n_keys = n + static_cast<size_t>(absl::GetFlag(FLAGS_n_test));  // tail: key queries
  const int64_t n_train = absl::GetFlag(FLAGS_n_train);
  opts->n_train = n_train < 0 ? std::min<size_t>(n, 65536) : static_cast<size_t>(n_train);
  opts->n_test = static_cast<size_t>(absl::GetFlag(FLAGS_n_test));
  opts->dim = static_cast<size_t>(absl::GetFlag(FLAGS_dim));
  opts->seed = absl::GetFlag(FLAGS_seed);
  const auto t0 = Clock::now();
  auto data = GenerateAttentionData(*opts, pool);
  if (!data.ok()) Fail(data.status());
  DataSet ds;
  ds.family = family;
  ds.name = family == "topical" || family == "sink"
                ? absl::StrFormat("synthetic-%s-%s", family, absl::GetFlag(FLAGS_preset))
                : absl::StrFormat("synthetic-%s", family);
  // The first n_test keys are held out as in-distribution (key) queries and
  // the index gets the n keys after them, so decode queries (positions after
  // the last key) follow the newest indexed key directly: holding out the
  // tail instead put n_test positions between them, which changed what a
  // recency (positional) head attends to.
  const size_t held = opts->n_test;
  ds.keys = Rows(data->keys, held, n);
  ds.values = Rows(data->values, held, n);
  ds.key_queries = Rows(data->keys, 0, held);
  // Training queries must come from positions of the kept keys.
  size_t first = 0;
  while (first < data->train_positions.size() &&
         data->train_positions[first] < static_cast<int64_t>(held)) {
    ++first;
  }
  ds.train = Rows(data->train_queries, first, data->train_queries.rows - first);
  ds.test = std::move(data->test_queries);
  std::printf("generated %s N=%zu in %.2f s\n", ds.name.c_str(), n, Seconds(t0, Clock::now()));
  if (auto st = ComputeOodStats(ds.keys.view(), ds.test.view(), {}, pool); st.ok()) {
    std::printf("%s\n", st->ToString().c_str());
  }
  return ds;
}

DataSet External(ThreadPool* pool) {
  DataSet ds;
  ds.family = "file";
  ds.name = "external";
  auto load = [](const std::string& path, const char* flag) {
    auto m = ReadMatrixFile(path);
    if (!m.ok()) Fail(absl::InvalidArgumentError(absl::StrCat("--", flag, ": ", m.status().message())));
    return std::move(*m);
  };
  ds.keys = load(absl::GetFlag(FLAGS_keys), "keys");
  if (absl::GetFlag(FLAGS_queries).empty()) Fail(absl::InvalidArgumentError("--queries is required with --keys"));
  ds.test = load(absl::GetFlag(FLAGS_queries), "queries");
  if (!absl::GetFlag(FLAGS_train).empty()) ds.train = load(absl::GetFlag(FLAGS_train), "train");
  if (ds.test.cols != ds.keys.cols || (ds.train.rows > 0 && ds.train.cols != ds.keys.cols)) {
    Fail(absl::InvalidArgumentError(absl::StrFormat(
        "dimension mismatch: keys d=%zu, queries d=%zu, train d=%zu", ds.keys.cols, ds.test.cols,
        ds.train.cols)));
  }
  if (!absl::GetFlag(FLAGS_values).empty()) {
    ds.values = load(absl::GetFlag(FLAGS_values), "values");
    if (ds.values.rows != ds.keys.rows) {
      Fail(absl::InvalidArgumentError(absl::StrFormat("--values has %zu rows, --keys has %zu",
                                                      ds.values.rows, ds.keys.rows)));
    }
  } else {
    ds.values = Matrix(ds.keys.rows, ds.keys.cols);
    std::mt19937 rng(1);
    std::normal_distribution<float> g;
    for (float& v : ds.values.data) v = g(rng);
  }
  if (auto st = ComputeOodStats(ds.keys.view(), ds.test.view(), {}, pool); st.ok()) {
    std::printf("%s\n", st->ToString().c_str());
  }
  return ds;
}

}  // namespace
}  // namespace kvr::bench

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "Index benchmark: recall vs keys scanned vs latency on attention (OOD) queries.\n"
      "  index_bench --sizes=131072,1048576\n"
      "  index_bench --keys=keys.npy --queries=queries.npy --train=train.npy");
  absl::ParseCommandLine(argc, argv);
  using namespace kvr;
  const int threads_flag = absl::GetFlag(FLAGS_threads);
  const size_t threads = threads_flag > 0 ? static_cast<size_t>(threads_flag)
                                          : std::max(1u, std::thread::hardware_concurrency());
  ThreadPool pool(threads - 1);
  std::printf("kvr index_bench: simd=%s, build threads=%zu, search threads=1\n",
              simd::Active().name, threads);
  bench::Runner runner(&pool);
  if (!absl::GetFlag(FLAGS_keys).empty()) {
    runner.Run(bench::External(&pool));
  } else {
    const std::vector<std::string> families = bench::ParseFamilies(absl::GetFlag(FLAGS_families));
    for (int n : bench::ParseInts(absl::GetFlag(FLAGS_sizes), "sizes")) {
      for (const std::string& family : families) {
        runner.Run(bench::Synthetic(static_cast<size_t>(n), family, &pool));
      }
    }
  }
  runner.PrintSummary();
  if (!absl::GetFlag(FLAGS_json).empty()) runner.WriteJson(absl::GetFlag(FLAGS_json));
  return 0;
}
