// ttft_bench: time to first token vs prompt length, full-attention prefill
// vs RetrievalAttention prefill side by side, and what the first decode step
// then waits for.
//
//   build/bench/ttft_bench [--models=random,stories] [--lengths=128,512,2048,8192]
//                          [--threads=2] [--index=graph] [--reps=1] [--json=out.json]
//                          [--train_topk=approx] [--exact_topk]
//
// For each model and prompt length (a prompt longer than the model's context
// is clamped to it, less one decode step):
//  * full: RetrievalEngine prefill in full-attention mode (chunked causal
//    attention, the whole KV cache on the worker) = TTFT less sampling;
//  * retrieval (pipelined): the same prefill with the hand-off of each layer's
//    middle tokens (training top-k + UploadShard, i.e. the node's index
//    build) on a background thread while later layers compute (the engine
//    default); "hand-off done" is when the last upload finished, measured
//    from the start of prefill;
//  * retrieval (synchronous, --sync): each layer's uploads finish before the
//    next layer starts (handoff_threads = 0), the no-overlap reference;
//  * the first decode step after each prefill, and of it the time blocked on
//    pending hand-off uploads ("wait");
//  * with --exact_train, the pipelined prefill again with every prefill
//    query's exact training top-k (max_train_queries 0: before sampling).
//  * --defer_index_build (default "true,false"): the pipelined retrieval run
//    once per value, each on its own in-process node with
//    NodeCoreOptions::defer_index_build set so (true: UploadShard replies
//    before the index is built, the chunk is searched exactly until a
//    background build installs it; kvr_node's default), printed one row per
//    value; "built" is when the node's last deferred build installed,
//    measured from the start of prefill (polled after the first decode step;
//    = hand-off done without deferral). The other runs use the first value.
//  * with --exact_topk, the pipelined prefill again with --train_topk=exact
//    (the sampled queries' exact top-k: the behaviour before the approximate
//    training top-k).
// The training top-k of the retrieval runs covers at most
// --max_train_queries sampled queries per kv head and chunk (default 16384),
// found by --train_topk (default approx, the worker's default).
// The node is in-process (--node_threads threads); everything shares the
// machine's cores, as the embedded mode does.
//
// Models: "random" is a deterministic random-weight Llama of the shape given
// by --dim/--layers/--heads/--kv_heads/--hidden/--vocab (default a moderate
// shape that runs 8K-token prompts on 2 cores); "stories" is the bundled
// stories260K (512-token context), prompted with its tokenizer's encoding of
// a repeated story opening.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/status.h"
#include "common/train_topk.h"
#include "gpu_worker/backend/backend.h"
#include "gpu_worker/engine/retrieval_engine.h"
#include "gpu_worker/model/bundled_model.h"
#include "gpu_worker/model/llama2c_loader.h"
#include "gpu_worker/model/llama2c_tokenizer.h"
#include "gpu_worker/model/random_weights.h"
#include "retrieval_node/client/in_process_client.h"

ABSL_FLAG(std::string, models, "random,stories", "models to measure: random, stories");
ABSL_FLAG(std::string, lengths, "128,512,2048,8192", "prompt lengths in tokens");
ABSL_FLAG(int, threads, 2, "CPU backend threads");
ABSL_FLAG(int, node_threads, 1, "in-process node threads (Attend and index builds)");
ABSL_FLAG(int, handoff_threads, 1, "engine hand-off threads in the pipelined runs");
ABSL_FLAG(std::string, index, "graph", "node index: graph, flat, ivf");
ABSL_FLAG(int, sinks, 128, "sink tokens kept on the worker (random model)");
ABSL_FLAG(int, window, 512, "recent tokens kept on the worker (random model)");
ABSL_FLAG(int, stories_sinks, 4, "sink tokens for stories260K");
ABSL_FLAG(int, stories_window, 16, "recent tokens for stories260K");
ABSL_FLAG(int, top_k, 100, "keys retrieved per query head (stories260K: min(top_k, 16))");
ABSL_FLAG(bool, sync, true, "also run the synchronous hand-off");
ABSL_FLAG(int64_t, max_train_queries, 16384,
          "engine: prefill queries per kv head and chunk whose exact top-k trains the graph "
          "(the worker's --max_train_queries; 0 = every query)");
ABSL_FLAG(bool, exact_train, false,
          "also run the pipelined hand-off with every prefill query's exact top-k "
          "(max_train_queries 0, the behaviour before sampling)");
ABSL_FLAG(std::string, train_topk, "approx",
          "engine: training top-k mode of the retrieval runs (the worker's --train_topk: "
          "exact or approx)");
ABSL_FLAG(bool, exact_topk, false,
          "also run the pipelined hand-off with --train_topk=exact (sampled queries, exact "
          "top-k: the behaviour before the approximate training top-k)");
ABSL_FLAG(std::string, defer_index_build, "true,false",
          "node index builds deferred off UploadShard (true) or not (false); a list runs the "
          "pipelined retrieval prefill once per value");
ABSL_FLAG(int, reps, 1, "repetitions per cell (the median is reported)");
ABSL_FLAG(int, dim, 512, "random model: width");
ABSL_FLAG(int, layers, 4, "random model: layers");
ABSL_FLAG(int, heads, 8, "random model: query heads");
ABSL_FLAG(int, kv_heads, 2, "random model: kv heads");
ABSL_FLAG(int, hidden, 1536, "random model: FFN width");
ABSL_FLAG(int, vocab, 4096, "random model: vocabulary");
ABSL_FLAG(std::string, json, "", "write the rows as JSON to this file");

namespace kvr {
namespace {

using Clock = std::chrono::steady_clock;
using worker::AttentionMode;
using worker::AttentionOptions;
using worker::EngineOptions;
using worker::RetrievalEngine;

struct Model {
  std::string name;
  std::shared_ptr<const worker::LlamaWeights> weights;
  std::vector<int32_t> text;  // tokens to draw prompts from (empty: random ids)
  int sinks = 0, window = 0, top_k = 0;
};

struct Cell {
  double prefill = 0, handoff_done = 0, first_step = 0, wait = 0;
  double built = 0;  // prefill start until the node's deferred builds installed
};

struct Row {
  std::string model;
  int64_t tokens = 0;
  Cell full, pipelined, sync, exact;
  std::vector<std::pair<bool, Cell>> deferral;  // pipelined per --defer_index_build value
  bool has_sync = false;
  bool has_exact = false;
  Cell exact_topk;
  bool has_exact_topk = false;
};

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

absl::StatusOr<Model> LoadModel(const std::string& name) {
  Model m;
  m.name = name;
  if (name == "random") {
    worker::LlamaConfig c;
    c.dim = absl::GetFlag(FLAGS_dim);
    c.n_layers = absl::GetFlag(FLAGS_layers);
    c.n_heads = absl::GetFlag(FLAGS_heads);
    c.n_kv_heads = absl::GetFlag(FLAGS_kv_heads);
    c.head_dim = c.n_heads > 0 ? c.dim / c.n_heads : 0;
    c.hidden_dim = absl::GetFlag(FLAGS_hidden);
    c.vocab_size = absl::GetFlag(FLAGS_vocab);
    c.seq_len = 1 << 20;
    c.rope_theta = 500000.0f;
    KVR_ASSIGN_OR_RETURN(m.weights, worker::MakeRandomWeights(c));
    m.name = absl::StrCat("random ", c.n_layers, "L d", c.dim, " h", c.n_heads, "/", c.n_kv_heads);
    m.sinks = absl::GetFlag(FLAGS_sinks);
    m.window = absl::GetFlag(FLAGS_window);
    m.top_k = absl::GetFlag(FLAGS_top_k);
    return m;
  }
  if (name == "stories") {
    KVR_ASSIGN_OR_RETURN(const worker::ModelPaths paths, worker::ResolveModelPaths("", ""));
    KVR_ASSIGN_OR_RETURN(m.weights, worker::LoadLlama2c(paths.model));
    KVR_ASSIGN_OR_RETURN(auto tok, worker::Llama2cTokenizer::Load(paths.tokenizer,
                                                                  m.weights->config.vocab_size));
    std::string story;
    for (int i = 0; i < 20; ++i) {
      story += "Once upon a time, there was a little girl named Lily. She loved to play "
               "outside in the park with her friends. ";
    }
    KVR_ASSIGN_OR_RETURN(m.text, tok->Encode(story, /*add_bos=*/true));
    m.name = "stories260K";
    m.sinks = absl::GetFlag(FLAGS_stories_sinks);
    m.window = absl::GetFlag(FLAGS_stories_window);
    m.top_k = std::min(absl::GetFlag(FLAGS_top_k), 16);
    return m;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("--models: \"", name, "\" is not one of random, stories"));
}

std::vector<int32_t> Prompt(const Model& m, int64_t n) {
  std::vector<int32_t> p(static_cast<size_t>(n));
  if (!m.text.empty()) {
    for (int64_t i = 0; i < n; ++i) p[i] = m.text[static_cast<size_t>(i) % m.text.size()];
    return p;
  }
  std::mt19937 rng(7);
  std::uniform_int_distribution<int32_t> id(0, m.weights->config.vocab_size - 1);
  for (int32_t& t : p) t = id(rng);
  return p;
}

// One prefill + first decode step of `prompt`; then waits for `node`'s
// deferred index builds (Cell::built) before ending the sequence.
absl::StatusOr<Cell> Measure(RetrievalEngine& engine, const std::vector<int32_t>& prompt,
                             const AttentionOptions& options,
                             retrieval::InProcessRetrievalClient* node) {
  Cell cell;
  const Clock::time_point prefill_start = Clock::now();
  KVR_ASSIGN_OR_RETURN(auto logits, engine.Prefill(prompt, options));
  cell.prefill = engine.stats().prefill_seconds;
  const int32_t next = static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) -
                                            logits.begin());
  const Clock::time_point start = Clock::now();
  KVR_RETURN_IF_ERROR(engine.DecodeStep(next).status());
  cell.first_step = std::chrono::duration<double>(Clock::now() - start).count();
  cell.wait = engine.stats().handoff_wait_seconds;
  cell.handoff_done = engine.stats().handoff_seconds;
  cell.built = cell.handoff_done;
  if (node != nullptr) {
    const Clock::time_point deadline = Clock::now() + std::chrono::hours(1);
    for (;;) {
      KVR_ASSIGN_OR_RETURN(retrieval::NodeStats st, node->Stats());
      if (st.index_builds_pending == 0) break;
      if (Clock::now() > deadline) {
        return absl::DeadlineExceededError("deferred index builds still pending after 1 h");
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
      cell.built = std::chrono::duration<double>(Clock::now() - prefill_start).count();
    }
  }
  KVR_RETURN_IF_ERROR(engine.EndSequence());
  return cell;
}

absl::StatusOr<Cell> MeasureMedian(RetrievalEngine& engine, const std::vector<int32_t>& prompt,
                                   const AttentionOptions& options, int reps,
                                   retrieval::InProcessRetrievalClient* node = nullptr) {
  std::vector<double> prefill, done, step, wait, built;
  for (int r = 0; r < reps; ++r) {
    KVR_ASSIGN_OR_RETURN(Cell c, Measure(engine, prompt, options, node));
    prefill.push_back(c.prefill);
    done.push_back(c.handoff_done);
    step.push_back(c.first_step);
    wait.push_back(c.wait);
    built.push_back(c.built);
  }
  return Cell{Median(prefill), Median(done), Median(step), Median(wait), Median(built)};
}

absl::Status Run() {
  std::vector<int64_t> lengths;
  for (absl::string_view s : absl::StrSplit(absl::GetFlag(FLAGS_lengths), ',')) {
    int64_t n = 0;
    if (!absl::SimpleAtoi(s, &n) || n < 1) {
      return absl::InvalidArgumentError(
          absl::StrCat("--lengths: \"", std::string(s), "\" is not a positive integer"));
    }
    lengths.push_back(n);
  }
  std::vector<bool> defer_values;
  for (absl::string_view s : absl::StrSplit(absl::GetFlag(FLAGS_defer_index_build), ',')) {
    if (s != "true" && s != "false") {
      return absl::InvalidArgumentError(absl::StrCat(
          "--defer_index_build: \"", std::string(s), "\" is not true or false"));
    }
    defer_values.push_back(s == "true");
  }
  const int reps = absl::GetFlag(FLAGS_reps);
  if (reps < 1) return absl::InvalidArgumentError("--reps must be >= 1");
  KVR_ASSIGN_OR_RETURN(retrieval::IndexType index,
                       retrieval::ParseIndexType(absl::GetFlag(FLAGS_index)));
  worker::BackendOptions bo;
  bo.num_threads = absl::GetFlag(FLAGS_threads);
  KVR_ASSIGN_OR_RETURN(auto backend, worker::BackendRegistry::Create("cpu", bo));
  std::printf("backend: %s; node: in-process, %d thread(s), %s index\n",
              backend->Describe().c_str(), absl::GetFlag(FLAGS_node_threads),
              std::string(retrieval::IndexTypeName(index)).c_str());

  std::vector<Row> rows;
  const bool sync = absl::GetFlag(FLAGS_sync);
  std::printf("\n%-22s %6s | %9s %9s | %5s %9s %7s %10s %9s %9s %9s |%s\n", "model", "tokens",
              "full s", "step s", "defer", "retr s", "/full", "handoff s", "step s", "wait s",
              "built s", sync ? "  sync s   /full  step s" : "");
  for (absl::string_view name : absl::StrSplit(absl::GetFlag(FLAGS_models), ',')) {
    KVR_ASSIGN_OR_RETURN(Model m, LoadModel(std::string(name)));
    const worker::LlamaConfig& c = m.weights->config;
    int64_t max_len = 0;
    for (int64_t n : lengths) max_len = std::max(max_len, std::min<int64_t>(n, c.seq_len - 1));
    // One in-process node per --defer_index_build value; the first serves
    // every other run.
    std::vector<std::unique_ptr<retrieval::InProcessRetrievalClient>> nodes;
    for (bool defer : defer_values) {
      auto node_options = retrieval::NodeCoreOptions{};
      node_options.threads = static_cast<size_t>(absl::GetFlag(FLAGS_node_threads));
      node_options.defer_index_build = defer;
      KVR_ASSIGN_OR_RETURN(auto one, retrieval::InProcessRetrievalClient::Create(node_options));
      nodes.push_back(std::move(one));
    }
    retrieval::InProcessRetrievalClient* const node = nodes.front().get();
    EngineOptions pipelined, synchronous;
    pipelined.max_seq_len = synchronous.max_seq_len = max_len + 1;
    pipelined.handoff_threads = absl::GetFlag(FLAGS_handoff_threads);
    synchronous.handoff_threads = 0;
    pipelined.max_train_queries = synchronous.max_train_queries =
        absl::GetFlag(FLAGS_max_train_queries);
    const std::optional<TrainingTopKMode> mode =
        ParseTrainingTopKMode(absl::GetFlag(FLAGS_train_topk));
    if (!mode.has_value()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--train_topk=", absl::GetFlag(FLAGS_train_topk), " is not exact or approx"));
    }
    pipelined.train_topk = synchronous.train_topk = *mode;
    EngineOptions exact = pipelined;
    exact.max_train_queries = 0;
    EngineOptions exact_topk_options = pipelined;
    exact_topk_options.train_topk = TrainingTopKMode::kExact;
    std::vector<std::unique_ptr<RetrievalEngine>> deferral_engines;
    for (const auto& n : nodes) {
      KVR_ASSIGN_OR_RETURN(auto e,
                           RetrievalEngine::Create(backend.get(), m.weights, n.get(), pipelined));
      deferral_engines.push_back(std::move(e));
    }
    RetrievalEngine* const engine = deferral_engines.front().get();
    KVR_ASSIGN_OR_RETURN(auto sync_engine, RetrievalEngine::Create(backend.get(), m.weights,
                                                                   node, synchronous));
    KVR_ASSIGN_OR_RETURN(auto exact_engine,
                         RetrievalEngine::Create(backend.get(), m.weights, node, exact));
    KVR_ASSIGN_OR_RETURN(auto exact_topk_engine,
                         RetrievalEngine::Create(backend.get(), m.weights, node,
                                                 exact_topk_options));
    std::vector<int64_t> done_lengths;
    for (int64_t asked : lengths) {
      const int64_t n = std::min<int64_t>(asked, c.seq_len - 1);
      if (std::find(done_lengths.begin(), done_lengths.end(), n) != done_lengths.end()) continue;
      done_lengths.push_back(n);
      const std::vector<int32_t> prompt = Prompt(m, n);
      AttentionOptions full;
      full.mode = AttentionMode::kFull;
      AttentionOptions retr;
      retr.sinks = m.sinks;
      retr.window = m.window;
      retr.top_k = m.top_k;
      retr.index = index;
      Row row;
      row.model = m.name;
      row.tokens = n;
      KVR_ASSIGN_OR_RETURN(row.full, MeasureMedian(*engine, prompt, full, reps));
      for (size_t i = 0; i < nodes.size(); ++i) {
        KVR_ASSIGN_OR_RETURN(Cell cell, MeasureMedian(*deferral_engines[i], prompt, retr, reps,
                                                      nodes[i].get()));
        row.deferral.emplace_back(defer_values[i], cell);
      }
      row.pipelined = row.deferral.front().second;
      if (sync) {
        KVR_ASSIGN_OR_RETURN(row.sync, MeasureMedian(*sync_engine, prompt, retr, reps, node));
        row.has_sync = true;
      }
      if (absl::GetFlag(FLAGS_exact_train)) {
        KVR_ASSIGN_OR_RETURN(row.exact, MeasureMedian(*exact_engine, prompt, retr, reps));
        row.has_exact = true;
      }
      if (absl::GetFlag(FLAGS_exact_topk)) {
        KVR_ASSIGN_OR_RETURN(row.exact_topk,
                             MeasureMedian(*exact_topk_engine, prompt, retr, reps));
        row.has_exact_topk = true;
      }
      const double full_s = std::max(row.full.prefill, 1e-12);
      std::string sync_cols;
      if (sync) {
        sync_cols = absl::StrFormat(" %8.3f %6.2fx %7.3f", row.sync.prefill,
                                    row.sync.prefill / full_s, row.sync.first_step);
      }
      if (row.has_exact) {
        sync_cols += absl::StrFormat(" exact-train %8.3f %6.2fx handoff %8.3f step %7.3f",
                                     row.exact.prefill, row.exact.prefill / full_s,
                                     row.exact.handoff_done, row.exact.first_step);
      }
      if (row.has_exact_topk) {
        sync_cols += absl::StrFormat(" exact-topk %8.3f %6.2fx handoff %8.3f step %7.3f",
                                     row.exact_topk.prefill, row.exact_topk.prefill / full_s,
                                     row.exact_topk.handoff_done, row.exact_topk.first_step);
      }
      for (size_t i = 0; i < row.deferral.size(); ++i) {
        const Cell& d = row.deferral[i].second;
        std::printf("%-22s %6lld | %9.3f %9.4f | %5s %9.3f %6.2fx %10.3f %9.4f %9.4f %9.3f |%s\n",
                    m.name.c_str(), static_cast<long long>(n), row.full.prefill,
                    row.full.first_step, row.deferral[i].first ? "true" : "false", d.prefill,
                    d.prefill / full_s, d.handoff_done, d.first_step, d.wait, d.built,
                    i == 0 ? sync_cols.c_str() : "");
      }
      std::fflush(stdout);
      rows.push_back(row);
    }
  }
  std::printf("\nfull s / retr s / sync s: prefill until the first token's logits; handoff s: "
              "prefill start until the last upload replied; step s: the first decode "
              "step, of which wait s blocked on hand-off uploads; built s: prefill start until "
              "the node's deferred index builds installed (defer = --defer_index_build).\n");

  const std::string json = absl::GetFlag(FLAGS_json);
  if (!json.empty()) {
    std::ofstream out(json);
    out << "[\n";
    for (size_t i = 0; i < rows.size(); ++i) {
      const Row& r = rows[i];
      auto cell = [](const Cell& c) {
        return absl::StrFormat(
            "{\"prefill_s\": %.6f, \"handoff_done_s\": %.6f, \"first_step_s\": %.6f, "
            "\"handoff_wait_s\": %.6f, \"built_s\": %.6f}",
            c.prefill, c.handoff_done, c.first_step, c.wait, c.built);
      };
      out << absl::StrFormat("  {\"model\": \"%s\", \"tokens\": %d, \"full\": %s, "
                             "\"retrieval_pipelined\": %s",
                             r.model, r.tokens, cell(r.full), cell(r.pipelined));
      for (const auto& [defer, c] : r.deferral) {
        out << ", \"retrieval_pipelined_defer_" << (defer ? "true" : "false") << "\": " << cell(c);
      }
      if (r.has_sync) out << ", \"retrieval_sync\": " << cell(r.sync);
      if (r.has_exact) out << ", \"retrieval_exact_train\": " << cell(r.exact);
      if (r.has_exact_topk) out << ", \"retrieval_exact_topk\": " << cell(r.exact_topk);
      out << "}" << (i + 1 < rows.size() ? "," : "") << "\n";
    }
    out << "]\n";
    if (!out) return absl::InternalError(absl::StrCat("--json: cannot write ", json));
  }
  return absl::OkStatus();
}

}  // namespace
}  // namespace kvr

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "time to first token vs prompt length: full vs retrieval prefill (see the file comment)");
  absl::ParseCommandLine(argc, argv);
  const absl::Status st = kvr::Run();
  if (!st.ok()) {
    std::fprintf(stderr, "ttft_bench: %s\n", std::string(st.message()).c_str());
    return 1;
  }
  return 0;
}
