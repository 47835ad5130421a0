// Long generation: are keys appended during decode as retrievable as the
// prefill keys? One KV head of synthetic attention data (tools/attention_data):
// `prefill` keys indexed at prefill (AttentionGraphIndex::Build from the
// prefill queries' exact top-k, as the worker uploads them), then `generated`
// decode keys arriving in seal-sized steps (`seal` keys, kvr_node
// --tail_capacity), each step folded in as NodeCore seals a tail:
//
//   add      AttentionGraphIndex::Add of every sealed tail into the chunk's
//            graph (what the node does; Add links a key by a key-key search)
//   decode   the sealed keys in their own graph, rebuilt at each doubling of
//            the decode keys from the ring of the last `ring` decode queries
//            (BuildFromQueries: query-derived edges, as prefill keys get);
//            searched beside the prefill graph (two top-k, merged)
//
// For held-out decode queries (positions after every key) it prints
// recall@k at the default beam split by where the exact top-k keys came from
// (prefill or appended), the keys scanned, and the time one seal takes
// (the build a sequence's Attends no longer wait for). Deterministic.
//
// Usage: long_generation_bench [--prefill=32768] [--generated=32768]
//        [--seal=64] [--k=100] [--queries=500] [--ring=4096] [--preset=default]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "common/exact_topk.h"
#include "common/tensor.h"
#include "common/thread_pool.h"
#include "retrieval_node/index/attention_graph_index.h"
#include "tools/attention_data.h"

ABSL_FLAG(int64_t, prefill, 32768, "prefill keys (indexed from the prefill queries)");
ABSL_FLAG(int64_t, generated, 32768, "keys appended during decode");
ABSL_FLAG(int64_t, seal, 64, "keys per seal (kvr_node --tail_capacity)");
ABSL_FLAG(int, k, 100, "top-k");
ABSL_FLAG(int64_t, queries, 500, "held-out decode queries measured");
ABSL_FLAG(int64_t, ring, 4096, "decode queries in the ring (kvr_node --decode_train_queries)");
ABSL_FLAG(int64_t, train, 8192, "prefill training queries");
ABSL_FLAG(std::string, preset, "default", "attention data preset");

namespace kvr {
namespace {

using Clock = std::chrono::steady_clock;
double Since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

struct Recall {
  double prefill = 0, appended = 0, all = 0, scanned = 0;
};

// Recall of `got` (rows of k ids, -1 padded) against `exact`, split by
// whether the exact key is a prefill key (id < prefill).
Recall Measure(const std::vector<int64_t>& exact, const std::vector<int64_t>& got, size_t k,
               size_t prefill) {
  size_t hit[2] = {0, 0}, total[2] = {0, 0};
  const size_t rows = exact.size() / k;
  for (size_t q = 0; q < rows; ++q) {
    std::vector<int64_t> g(got.begin() + q * k, got.begin() + (q + 1) * k);
    std::sort(g.begin(), g.end());
    for (size_t j = 0; j < k; ++j) {
      const int64_t id = exact[q * k + j];
      const int side = static_cast<size_t>(id) < prefill ? 0 : 1;
      total[side] += 1;
      hit[side] += std::binary_search(g.begin(), g.end(), id) ? 1 : 0;
    }
  }
  Recall r;
  r.prefill = total[0] ? double(hit[0]) / double(total[0]) : 0;
  r.appended = total[1] ? double(hit[1]) / double(total[1]) : 0;
  r.all = double(hit[0] + hit[1]) / double(total[0] + total[1]);
  return r;
}

// Top-k of two searched parts merged by score (part b's ids offset by `b_first`).
void Merge(std::span<const int64_t> a_ids, std::span<const float> a_s,
           std::span<const int64_t> b_ids, std::span<const float> b_s, int64_t b_first, size_t k,
           std::span<int64_t> out) {
  std::vector<std::pair<float, int64_t>> all;
  for (size_t j = 0; j < a_ids.size(); ++j) {
    if (a_ids[j] >= 0) all.emplace_back(a_s[j], a_ids[j]);
  }
  for (size_t j = 0; j < b_ids.size(); ++j) {
    if (b_ids[j] >= 0) all.emplace_back(b_s[j], b_ids[j] + b_first);
  }
  std::sort(all.begin(), all.end(), [](const auto& x, const auto& y) { return x.first > y.first; });
  for (size_t j = 0; j < k; ++j) out[j] = j < all.size() ? all[j].second : -1;
}

int Run() {
  const size_t prefill = static_cast<size_t>(absl::GetFlag(FLAGS_prefill));
  const size_t generated = static_cast<size_t>(absl::GetFlag(FLAGS_generated));
  const size_t seal = static_cast<size_t>(std::max<int64_t>(1, absl::GetFlag(FLAGS_seal)));
  const size_t k = static_cast<size_t>(absl::GetFlag(FLAGS_k));
  const size_t n_eval = static_cast<size_t>(absl::GetFlag(FLAGS_queries));
  const size_t ring = static_cast<size_t>(absl::GetFlag(FLAGS_ring));
  ThreadPool* pool = &ThreadPool::Default();

  absl::StatusOr<AttentionDataOptions> o = AttentionDataPreset(absl::GetFlag(FLAGS_preset));
  if (!o.ok()) {
    std::fprintf(stderr, "%s\n", o.status().ToString().c_str());
    return 2;
  }
  o->n_keys = prefill + generated;
  o->n_train = std::min<size_t>(o->n_keys, static_cast<size_t>(absl::GetFlag(FLAGS_train)) *
                                               (prefill + generated) / prefill);
  o->n_test = ring + n_eval;
  absl::StatusOr<AttentionData> data = GenerateAttentionData(*o, pool);
  if (!data.ok()) {
    std::fprintf(stderr, "%s\n", data.status().ToString().c_str());
    return 2;
  }
  const size_t d = data->keys.cols;
  const ConstMatrixView keys = data->keys.view();
  const ConstMatrixView prefill_keys = keys.rows_slice(0, prefill);
  // Prefill training queries: those at prefill positions.
  size_t n_train = 0;
  while (n_train < data->train_positions.size() &&
         data->train_positions[n_train] < static_cast<int64_t>(prefill)) {
    ++n_train;
  }
  const ConstMatrixView train = data->train_queries.view().rows_slice(0, n_train);
  const ConstMatrixView ring_q = data->test_queries.view().rows_slice(0, ring);
  const ConstMatrixView eval = data->test_queries.view().rows_slice(ring, n_eval);
  const int train_k = 100;
  std::vector<int64_t> train_topk(n_train * train_k);
  std::vector<float> train_s(train_topk.size());
  if (absl::Status st = ExactTopK(prefill_keys, train, train_k, train_topk, train_s, pool);
      !st.ok()) {
    std::fprintf(stderr, "%s\n", st.ToString().c_str());
    return 2;
  }
  std::vector<int64_t> exact(n_eval * k);
  std::vector<float> exact_s(exact.size());
  (void)ExactTopK(keys, eval, static_cast<int>(k), exact, exact_s, pool);

  index::AttentionGraphOptions go;
  std::printf("long generation: %zu prefill + %zu generated keys, d %zu, preset %s, seals of %zu "
              "keys, k %zu, default beam %d, %zu prefill training queries, ring %zu, %zu "
              "decode queries measured\n",
              prefill, generated, d, absl::GetFlag(FLAGS_preset).c_str(), seal, k,
              go.default_beam, n_train, ring, n_eval);
  std::printf("%-8s %10s %10s %10s %10s %9s %12s\n", "mode", "recall", "prefill", "appended",
              "scanned%", "us/query", "seal ms");

  // --- add: what NodeCore does ---
  {
    auto g = index::AttentionGraphIndex::Build(prefill_keys, train_topk, train_k, go, pool);
    if (!g.ok()) {
      std::fprintf(stderr, "%s\n", g.status().ToString().c_str());
      return 2;
    }
    double seal_s = 0, max_seal = 0;
    size_t seals = 0;
    for (size_t at = prefill; at < prefill + generated; at += seal) {
      const size_t n = std::min(seal, prefill + generated - at);
      // The node's background seal: copy the chunk's index, add the rows.
      const auto t = Clock::now();
      std::vector<uint8_t> blob;
      (void)(*g)->Serialize(&blob);
      auto copy = index::LoadIndex(blob);
      if (!copy.ok() || !(*copy)->Add(keys.rows_slice(at, n)).ok()) return 2;
      const double s = Since(t);
      seal_s += s;
      max_seal = std::max(max_seal, s);
      ++seals;
      g = std::unique_ptr<index::AttentionGraphIndex>(
          static_cast<index::AttentionGraphIndex*>(copy->release()));
    }
    std::vector<int64_t> got(n_eval * k);
    std::vector<float> got_s(got.size());
    index::SearchParams p;
    p.k = static_cast<int>(k);
    index::SearchStats ss;
    const auto t = Clock::now();
    (void)(*g)->Search(eval, p, got, got_s, &ss);
    const double us = Since(t) * 1e6 / double(n_eval);
    const Recall r = Measure(exact, got, k, prefill);
    std::printf("%-8s %10.3f %10.3f %10.3f %10.2f %9.0f %6.1f/%5.1f\n", "add", r.all, r.prefill,
                r.appended,
                100.0 * double(ss.distance_computations) / double(n_eval) /
                    double(prefill + generated),
                us, 1e3 * seal_s / double(seals), 1e3 * max_seal);
  }

  // --- decode: appended keys in their own query-trained graph ---
  {
    auto g = index::AttentionGraphIndex::Build(prefill_keys, train_topk, train_k, go, pool);
    if (!g.ok()) return 2;
    const ConstMatrixView decode_keys = keys.rows_slice(prefill, generated);
    const int dk = static_cast<int>(std::min<size_t>(train_k, generated));
    const auto t0 = Clock::now();
    auto dg = index::AttentionGraphIndex::BuildFromQueries(decode_keys, ring_q, dk, go, pool);
    const double build_s = Since(t0);
    if (!dg.ok()) {
      std::fprintf(stderr, "%s\n", dg.status().ToString().c_str());
      return 2;
    }
    std::vector<int64_t> a(n_eval * k), b(n_eval * k), got(n_eval * k);
    std::vector<float> as(a.size()), bs(b.size());
    index::SearchParams p;
    p.k = static_cast<int>(k);
    index::SearchStats ss;
    const auto t = Clock::now();
    (void)(*g)->Search(eval, p, a, as, &ss);
    (void)(*dg)->Search(eval, p, b, bs, &ss);
    for (size_t q = 0; q < n_eval; ++q) {
      Merge(std::span(a).subspan(q * k, k), std::span(as).subspan(q * k, k),
            std::span(b).subspan(q * k, k), std::span(bs).subspan(q * k, k),
            static_cast<int64_t>(prefill), k, std::span(got).subspan(q * k, k));
    }
    const double us = Since(t) * 1e6 / double(n_eval);
    const Recall r = Measure(exact, got, k, prefill);
    std::printf("%-8s %10.3f %10.3f %10.3f %10.2f %9.0f %12.1f\n", "decode", r.all, r.prefill,
                r.appended,
                100.0 * double(ss.distance_computations) / double(n_eval) /
                    double(prefill + generated),
                us, 1e3 * build_s);
  }
  return 0;
}

}  // namespace
}  // namespace kvr

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("recall of decode-appended keys vs prefill keys");
  absl::ParseCommandLine(argc, argv);
  return kvr::Run();
}
