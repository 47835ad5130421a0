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
// Then stalls: a NodeCore (2 threads) holding the prefill chunk takes the
// generated keys one append per step while another thread attends the same
// sequence back to back; it prints the Attend and Append latencies with the
// seal in place under the sequence lock (background_seals false, the old
// node) and in the background (the default).
//
// The node rows run NodeCore's own decode loop (an Attend of a decode
// query, which fills the node's ring, then the append; seals as kvr_node
// makes them) with --recalibrate_every 0 and with the flag's value, and
// report the same split of recall (NodeCore::SearchPositions, default
// effort): the effect of calibrating seals and chunks on decode queries.
//
// Usage: long_generation_bench [--prefill=32768] [--generated=32768]
//        [--seal=64] [--k=100] [--queries=500] [--ring=4096] [--preset=default]
//        [--recalibrate_every=1024] [--sections=index,node,stalls]
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <memory>
#include <numeric>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "common/exact_topk.h"
#include "common/tensor.h"
#include "common/thread_pool.h"
#include "retrieval_node/core/node_core.h"
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
ABSL_FLAG(int64_t, recalibrate_every, 1024,
          "node rows: kvr_node --recalibrate_every of the recalibrating run (the other runs 0)");
ABSL_FLAG(std::string, sections, "index,node,stalls",
          "what to run: index (add / decode rows on the index alone), node (a NodeCore decode "
          "loop without and with calibration on decode queries), stalls");

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

struct Stalls {
  double attend_p50_ms = 0, attend_p99_ms = 0, attend_max_ms = 0, append_max_ms = 0;
  size_t attends = 0;
  int64_t seals = 0;
  double seconds = 0;
};

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<size_t>(p * double(v.size())))];
}

// Creates sequence 1 (one layer, head and kv head, graph index) on `node`
// and uploads the first `prefill` keys and values of `data` as its chunk 0.
absl::Status UploadPrefill(retrieval::NodeCore& node, const AttentionData& data, size_t prefill,
                           std::span<const int64_t> train_topk, size_t train_width) {
  retrieval::SequenceSpec spec;
  spec.sequence_id = 1;
  spec.n_layers = 1;
  spec.n_heads = 1;
  spec.n_kv_heads = 1;
  spec.head_dim = static_cast<int32_t>(data.keys.cols);
  spec.index_type = retrieval::IndexType::kGraph;
  KVR_RETURN_IF_ERROR(node.CreateSequence(spec));
  retrieval::ShardUpload up;
  up.key = {1, 0, 0, 0};
  up.keys = data.keys.view().rows_slice(0, prefill);
  up.values = data.values.view().rows_slice(0, prefill);
  up.train_topk = train_topk;
  up.train_topk_width = train_width;
  return node.UploadShard(up);
}

// One decode run on a NodeCore: upload the prefill chunk, append the
// generated keys one per step while a thread attends back to back.
absl::StatusOr<Stalls> RunNode(bool background, const AttentionData& data, size_t prefill,
                               size_t generated, size_t seal, std::span<const int64_t> train_topk,
                               size_t train_width, ConstMatrixView eval) {
  using retrieval::NodeCore;
  retrieval::NodeCoreOptions o;
  o.threads = 2;
  o.tail_capacity = seal;
  o.background_seals = background;
  KVR_ASSIGN_OR_RETURN(std::unique_ptr<NodeCore> node, NodeCore::Create(o));
  const size_t d = data.keys.cols;
  KVR_RETURN_IF_ERROR(UploadPrefill(*node, data, prefill, train_topk, train_width));
  std::atomic<bool> stop{false};
  std::vector<double> attend_ms;
  absl::Status attend_status;
  std::thread attender([&] {
    Partials out(1, d);
    for (size_t i = 0; !stop.load(); ++i) {
      retrieval::AttendRequest r;
      r.sequence_id = 1;
      r.queries = eval.rows_slice(i % eval.rows(), 1);
      r.k = 100;
      const auto t = Clock::now();
      retrieval::StatusWaiter waiter;
      node->AttendAsync(r, out.view(), nullptr, waiter.callback());
      attend_status.Update(waiter.Wait());
      attend_ms.push_back(Since(t) * 1e3);
    }
  });
  Stalls s;
  const auto t0 = Clock::now();
  absl::Status status;
  for (size_t i = 0; i < generated && status.ok(); ++i) {
    retrieval::AppendRequest a;
    a.sequence_id = 1;
    a.first_position = static_cast<int64_t>(prefill + i);
    a.keys = data.keys.view().rows_slice(prefill + i, 1);
    a.values = data.values.view().rows_slice(prefill + i, 1);
    const auto t = Clock::now();
    status = node->Append(a);
    s.append_max_ms = std::max(s.append_max_ms, Since(t) * 1e3);
  }
  s.seconds = Since(t0);
  stop.store(true);
  attender.join();
  KVR_RETURN_IF_ERROR(status);
  KVR_RETURN_IF_ERROR(attend_status);
  s.attends = attend_ms.size();
  s.attend_p50_ms = Percentile(attend_ms, 0.5);
  s.attend_p99_ms = Percentile(attend_ms, 0.99);
  s.attend_max_ms = Percentile(attend_ms, 1.0);
  KVR_ASSIGN_OR_RETURN(retrieval::NodeStats st, node->Stats());
  s.seals = st.seals;
  return s;
}

// Recall of a NodeCore decode loop: upload the prefill chunk (graph from
// the prefill queries' exact top-k), then per generated key one Attend of a
// decode query (rows of `ring_q` in turn: they fill the node's ring) and its
// append; seals of `seal` keys as kvr_node makes them. Then the held-out
// decode queries' positions as the node would attend them (SearchPositions).
struct NodeRecall {
  Recall recall;
  int64_t seals = 0, recalibrations = 0;
  double seconds = 0;
};
absl::StatusOr<NodeRecall> RunNodeRecall(size_t recalibrate_every, const AttentionData& data,
                                         size_t prefill, size_t generated, size_t seal,
                                         size_t ring, std::span<const int64_t> train_topk,
                                         size_t train_width, ConstMatrixView ring_q,
                                         ConstMatrixView eval, const std::vector<int64_t>& exact,
                                         size_t k) {
  using retrieval::NodeCore;
  retrieval::NodeCoreOptions o;
  o.threads = 2;
  o.tail_capacity = seal;
  o.decode_train_queries = ring;
  o.recalibrate_every = recalibrate_every;
  KVR_ASSIGN_OR_RETURN(std::unique_ptr<NodeCore> node, NodeCore::Create(o));
  const size_t d = data.keys.cols;
  KVR_RETURN_IF_ERROR(UploadPrefill(*node, data, prefill, train_topk, train_width));
  NodeRecall out;
  const auto t0 = Clock::now();
  Partials partial(1, d);
  for (size_t i = 0; i < generated; ++i) {
    retrieval::AttendRequest r;
    r.sequence_id = 1;
    r.queries = ring_q.rows_slice(i % ring_q.rows(), 1);
    r.k = static_cast<int>(k);
    retrieval::StatusWaiter waiter;
    node->AttendAsync(r, partial.view(), nullptr, waiter.callback());
    KVR_RETURN_IF_ERROR(waiter.Wait());
    retrieval::AppendRequest a;
    a.sequence_id = 1;
    a.first_position = static_cast<int64_t>(prefill + i);
    a.keys = data.keys.view().rows_slice(prefill + i, 1);
    a.values = data.values.view().rows_slice(prefill + i, 1);
    KVR_RETURN_IF_ERROR(node->Append(a));
  }
  out.seconds = Since(t0);
  KVR_ASSIGN_OR_RETURN(std::vector<int64_t> got,
                       node->SearchPositions(1, 0, 0, eval, static_cast<int>(k)));
  out.recall = Measure(exact, got, k, prefill);  // key i sits at position i
  KVR_ASSIGN_OR_RETURN(retrieval::NodeStats st, node->Stats());
  out.seals = st.seals;
  out.recalibrations = st.recalibrations;
  return out;
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

  const std::string sections = absl::GetFlag(FLAGS_sections);
  const auto wants = [&](const char* section) {
    return sections.find(section) != std::string::npos;
  };
  // --- node: NodeCore's decode loop, without and with calibration on the ring ---
  if (wants("node")) {
    for (size_t every : {size_t{0}, static_cast<size_t>(absl::GetFlag(FLAGS_recalibrate_every))}) {
      absl::StatusOr<NodeRecall> r = RunNodeRecall(every, *data, prefill, generated, seal, ring,
                                                   train_topk, train_k, ring_q, eval, exact, k);
      if (!r.ok()) {
        std::fprintf(stderr, "%s\n", r.status().ToString().c_str());
        return 2;
      }
      std::printf("node recalibrate_every %zu: recall %.3f prefill %.3f appended %.3f "
                  "(seals %lld, recalibrations %lld, decode loop %.1f s)\n",
                  every, r->recall.all, r->recall.prefill, r->recall.appended,
                  static_cast<long long>(r->seals), static_cast<long long>(r->recalibrations),
                  r->seconds);
    }
  }

  if (wants("index")) {
    std::printf("%-8s %10s %10s %10s %10s %9s %12s\n", "mode", "recall", "prefill", "appended",
                "scanned%", "us/query", "seal ms");
  }
  // --- add: what NodeCore did before calibration on decode queries ---
  if (wants("index")) {
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
  if (wants("index")) {
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

  if (!wants("stalls")) return 0;
  std::printf("\nstalls: one append per step, Attends (k %zu) back to back on another thread\n",
              k);
  std::printf("%-22s %8s %10s %10s %10s %12s %8s %8s\n", "seals", "attends", "p50 ms",
              "p99 ms", "max ms", "append max", "seals", "run s");
  for (bool background : {false, true}) {
    absl::StatusOr<Stalls> s =
        RunNode(background, *data, prefill, generated, seal, train_topk, train_k, eval);
    if (!s.ok()) {
      std::fprintf(stderr, "%s\n", s.status().ToString().c_str());
      return 2;
    }
    std::printf("%-22s %8zu %10.3f %10.3f %10.3f %12.3f %8lld %8.1f\n",
                background ? "background (new)" : "under the lock (old)", s->attends,
                s->attend_p50_ms, s->attend_p99_ms, s->attend_max_ms, s->append_max_ms,
                static_cast<long long>(s->seals), s->seconds);
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
