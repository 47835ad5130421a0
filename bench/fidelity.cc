// fidelity: how closely RetrievalAttention decoding follows full attention
// on the bundled stories260K model.
//
//   build/bench/fidelity [--prompts 20] [--tokens 256] [--json out.json]
//
// For each of up to 20 fixed TinyStories-style prompt openings, full
// attention generates a greedy reference continuation of --tokens tokens
// (clamped so prompt + continuation fits the model's context). Each retrieval
// setting (static pattern of --sinks sinks + --window recent tokens, top-k
// from the in-process node with a graph, flat or IVF index) is then measured:
//  * prefix agreement: it decodes greedily on its own; tokens identical to
//    the reference before the first divergence, over all tokens;
//  * teacher-forced top-1 agreement: it is fed the reference continuation;
//    steps whose argmax equals the reference token, over all steps;
//  * KL(p_full || p_retrieval) of the next-token distributions (softmax at
//    temperature 1, in double) along the teacher-forced run: mean and max;
//  * tok/s of the greedy run (prefill included; one backend thread, the node
//    attends inline on the same thread by default);
//  * work per decode step and query head: tokens attended locally (sinks +
//    window), held by the node, retrieved (top-k), and keys scanned (distance
//    computations of the node's index and tail buffer, IVF centroids included).
// IVF runs at the graph's budget: unless --ivf_nprobe is given, nprobe is
// calibrated on the first prompts so IVF scans about as many keys per query
// as the graph did. Greedy runs continue through end-of-story tokens (fixed
// length). Prints a table; --json writes the rows. With --top_ks / --estimate
// it sweeps k x estimate off / on, and --exact_zone_keys_fractions adds an
// "on + exact zone" row per budget (the node's --exact_zone_keys_fraction;
// session 27).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "gpu_worker/model/bundled_model.h"
#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/status.h"
#include "gpu_worker/backend/backend.h"
#include "gpu_worker/engine/retrieval_engine.h"
#include "gpu_worker/model/llama2c_loader.h"
#include "gpu_worker/model/llama2c_tokenizer.h"
#include "retrieval_node/client/in_process_client.h"


ABSL_FLAG(std::string, model, "",
          "llama2.c checkpoint (default: stories260K.bin in $KVR_MODELS, else the "
          "repository's models/)");
ABSL_FLAG(std::string, tokenizer, "", "llama2.c tokenizer (default: tok512.bin beside the model)");
ABSL_FLAG(int, sinks, 4, "attention-sink tokens kept on the worker");
ABSL_FLAG(int, window, 16, "recent tokens kept on the worker");
ABSL_FLAG(int, top_k, 16, "keys retrieved per query head");
ABSL_FLAG(int, beam, 0, "graph search beam (0: index default)");
ABSL_FLAG(int, train_k, 32, "exact top-k per training query for the graph build");
ABSL_FLAG(int, tail_capacity, 64, "appended tokens kept flat before sealing into the index");
ABSL_FLAG(int, ivf_nprobe, 0, "IVF lists probed (0: calibrate to the graph's keys scanned)");
ABSL_FLAG(int, calibration_prompts, 3, "prompts used to calibrate the IVF nprobe");
ABSL_FLAG(int, tokens, 256, "generated tokens per prompt (clamped to the context)");
ABSL_FLAG(int, prompts, 20, "prompts used, 1..20");
ABSL_FLAG(std::string, modes, "graph,flat,ivf", "retrieval indexes to compare");
ABSL_FLAG(int, threads, 1, "CPU backend threads");
ABSL_FLAG(int, node_threads, 0, "in-process node threads (0: attend inline on the caller)");
ABSL_FLAG(std::string, json, "", "write the rows as JSON to this file");
ABSL_FLAG(std::string, top_ks, "",
          "comma-separated top-k values to sweep (issue 18: 8,16,32,64); empty: --top_k");
ABSL_FLAG(std::string, estimate, "off",
          "comma-separated remainder-estimation modes to compare per top-k: off, on "
          "(AttentionOptions::estimate)");
ABSL_FLAG(std::string, exact_zone_keys_fractions, "",
          "comma-separated exact-zone budgets (the in-process node's --exact_zone_keys_fraction, "
          "(0, 1]); each adds a row per top-k after every estimate-on row; empty: none");
ABSL_FLAG(int, estimate_clusters_per_chunk, 256,
          "the in-process node's --estimate_clusters_per_chunk");
ABSL_FLAG(bool, estimate_second_order, false,
          "the in-process node's --estimate_second_order (false: the mean-key estimate)");

namespace kvr {
namespace {

using Clock = std::chrono::steady_clock;
using retrieval::IndexType;
using worker::AttentionMode;
using worker::AttentionOptions;
using worker::RetrievalEngine;

constexpr const char* kPrompts[] = {
    "Once upon a time",
    "The little dog",
    "Tom and Sue went to",
    "One day, a girl named Lily",
    "There was a big red ball",
    "Ben was a happy boy who",
    "In the park, the sun was",
    "Mom said to Tim,",
    "The cat saw a bird",
    "Sara wanted to play with",
    "Once there was a little car",
    "A small bunny lived in",
    "The old man had a",
    "Max and his friend found a",
    "It was a rainy day and",
    "The princess looked at the",
    "Anna liked to draw",
    "The bear was hungry, so",
    "Lucy went to the store with",
    "Jack had a toy boat",
};
constexpr int kNumPrompts = static_cast<int>(std::size(kPrompts));

// Sums the node's AttendStats of every completed Attend; forwards the rest.
class CountingClient final : public retrieval::RetrievalClient {
 public:
  struct Totals {
    int64_t calls = 0;
    int64_t queries = 0;  // query heads searched (n_heads per call)
    int64_t keys_held = 0;
    int64_t keys_attended = 0;
    int64_t distance_computations = 0;
    int64_t keys_estimated = 0;
    int64_t clusters_estimated = 0;
    int64_t keys_exact_zone = 0;
  };

  explicit CountingClient(retrieval::RetrievalClient* inner) : inner_(inner) {}

  absl::Status CreateSequence(const retrieval::SequenceSpec& spec) override {
    return inner_->CreateSequence(spec);
  }
  absl::Status CreateSequence(const retrieval::SequenceSpec& spec,
                              std::string_view capability) override {
    return inner_->CreateSequence(spec, capability);
  }
  absl::Status UploadShard(const retrieval::ShardUpload& upload) override {
    return inner_->UploadShard(upload);
  }
  absl::Status Append(const retrieval::AppendRequest& request) override {
    return inner_->Append(request);
  }
  void AttendAsync(const retrieval::AttendRequest& request, PartialsView out,
                   retrieval::AttendStats* stats, retrieval::StatusCallback done) override {
    const int64_t queries = static_cast<int64_t>(request.queries.rows());
    inner_->AttendAsync(request, out, stats,
                        [this, stats, queries, done = std::move(done)](absl::Status st) {
                          if (st.ok() && stats != nullptr) {
                            std::lock_guard<std::mutex> lock(mu_);
                            totals_.calls += 1;
                            totals_.queries += queries;
                            totals_.keys_held += stats->keys_held;
                            totals_.keys_attended += stats->keys_attended;
                            totals_.distance_computations += stats->distance_computations;
                            totals_.keys_estimated += stats->keys_estimated;
                            totals_.clusters_estimated += stats->clusters_estimated;
                            totals_.keys_exact_zone += stats->keys_exact_zone;
                          }
                          done(std::move(st));
                        });
  }
  absl::Status DropSequence(uint64_t sequence_id) override {
    return inner_->DropSequence(sequence_id);
  }
  absl::Status DropSequence(uint64_t sequence_id, std::string_view capability) override {
    return inner_->DropSequence(sequence_id, capability);
  }
  absl::StatusOr<retrieval::NodeStats> Stats() override { return inner_->Stats(); }

  Totals totals() {
    std::lock_guard<std::mutex> lock(mu_);
    return totals_;
  }
  void Reset() {
    std::lock_guard<std::mutex> lock(mu_);
    totals_ = {};
  }

 private:
  retrieval::RetrievalClient* inner_;
  std::mutex mu_;
  Totals totals_;
};

int32_t Argmax(std::span<const float> v) {
  return static_cast<int32_t>(std::max_element(v.begin(), v.end()) - v.begin());
}

double LogSumExp(std::span<const float> x) {
  double m = -INFINITY;
  for (float v : x) m = std::max(m, static_cast<double>(v));
  double s = 0.0;
  for (float v : x) s += std::exp(static_cast<double>(v) - m);
  return m + std::log(s);
}

// KL(softmax(p) || softmax(q)) in nats.
double KlDivergence(std::span<const float> p, std::span<const float> q) {
  const double lp = LogSumExp(p), lq = LogSumExp(q);
  double kl = 0.0;
  for (size_t i = 0; i < p.size(); ++i) {
    const double log_p = p[i] - lp, log_q = q[i] - lq;
    kl += std::exp(log_p) * (log_p - log_q);
  }
  return std::max(0.0, kl);
}


// One prompt's full-attention reference: the greedy continuation and the
// logits that chose each of its tokens.
struct Reference {
  std::vector<int32_t> prompt;
  std::vector<int32_t> tokens;
  std::vector<float> logits;  // tokens.size() x vocab
};

// One row of the table.
struct Row {
  std::string name;
  std::string settings;
  int nprobe = 0;
  int64_t tokens = 0;       // generated tokens, all prompts
  int64_t prefix_tokens = 0;  // greedy tokens before the first divergence
  int64_t tf_agree = 0;     // teacher-forced steps whose argmax matched
  double kl_sum = 0.0, kl_max = 0.0;
  double greedy_seconds = 0.0;
  std::vector<int64_t> prefix_per_prompt;
  // Engine stats of the greedy runs (per decode step and query head).
  int64_t decode_steps = 0;
  double local_tokens = 0.0, node_held_tokens = 0.0, retrieved_tokens = 0.0;
  // Node work over both runs.
  CountingClient::Totals node;

  double prefix_agreement() const { return tokens ? double(prefix_tokens) / tokens : 0.0; }
  double tf_agreement() const { return tokens ? double(tf_agree) / tokens : 0.0; }
  double mean_kl() const { return tokens ? kl_sum / tokens : 0.0; }
  double tok_per_s() const { return greedy_seconds > 0 ? tokens / greedy_seconds : 0.0; }
  double per_step(double v) const { return decode_steps ? v / decode_steps : 0.0; }
  double scanned_per_query() const {
    return node.queries ? double(node.distance_computations) / node.queries : 0.0;
  }
  double held_per_query() const {
    return node.queries ? double(node.keys_held) / node.queries : 0.0;
  }
  double clusters_per_query() const {
    return node.queries ? double(node.clusters_estimated) / node.queries : 0.0;
  }
  double attended_per_query() const {
    return node.queries ? double(node.keys_attended) / node.queries : 0.0;
  }
};

class Bench {
 public:
  absl::Status Init() {
    KVR_ASSIGN_OR_RETURN(const worker::ModelPaths paths,
                         worker::ResolveModelPaths(absl::GetFlag(FLAGS_model),
                                                   absl::GetFlag(FLAGS_tokenizer)));
    model_path_ = paths.model;
    KVR_ASSIGN_OR_RETURN(weights_, worker::LoadLlama2c(paths.model));
    KVR_ASSIGN_OR_RETURN(tokenizer_, worker::Llama2cTokenizer::Load(paths.tokenizer,
                                                                     weights_->config.vocab_size));
    worker::BackendOptions bo;
    bo.num_threads = absl::GetFlag(FLAGS_threads);
    KVR_ASSIGN_OR_RETURN(backend_, worker::BackendRegistry::Create("cpu", bo));

    attention_.sinks = absl::GetFlag(FLAGS_sinks);
    attention_.window = absl::GetFlag(FLAGS_window);
    attention_.top_k = absl::GetFlag(FLAGS_top_k);
    attention_.beam = absl::GetFlag(FLAGS_beam);
    attention_.train_k = absl::GetFlag(FLAGS_train_k);
    KVR_RETURN_IF_ERROR(worker::ValidateAttentionOptions(attention_));

    const int n_prompts = absl::GetFlag(FLAGS_prompts);
    if (n_prompts < 1 || n_prompts > kNumPrompts) {
      return absl::InvalidArgumentError(
          absl::StrCat("--prompts ", n_prompts, " outside [1, ", kNumPrompts, "]"));
    }
    const int tokens = absl::GetFlag(FLAGS_tokens);
    if (tokens < 1) return absl::InvalidArgumentError(absl::StrCat("--tokens ", tokens, " < 1"));
    vocab_ = static_cast<size_t>(weights_->config.vocab_size);
    const int64_t context = weights_->config.seq_len;
    for (int i = 0; i < n_prompts; ++i) {
      Reference ref;
      KVR_ASSIGN_OR_RETURN(ref.prompt, tokenizer_->Encode(kPrompts[i], /*add_bos=*/true));
      const int64_t room = context - static_cast<int64_t>(ref.prompt.size());
      if (room < 1) return absl::InvalidArgumentError("prompt longer than the context");
      ref.tokens.resize(static_cast<size_t>(std::min<int64_t>(tokens, room)));
      refs_.push_back(std::move(ref));
    }
    return absl::OkStatus();
  }

  // Full attention: the references (greedy tokens and their logits) and the
  // baseline row.
  absl::StatusOr<Row> RunFull() {
    KVR_ASSIGN_OR_RETURN(std::unique_ptr<RetrievalEngine> engine,
                         RetrievalEngine::Create(backend_.get(), weights_, nullptr));
    AttentionOptions a = attention_;
    a.mode = AttentionMode::kFull;
    Row row;
    row.name = "full (reference)";
    row.settings = "exact attention over [0, pos]";
    for (Reference& ref : refs_) {
      const size_t n = ref.tokens.size();
      ref.logits.resize(n * vocab_);
      const Clock::time_point start = Clock::now();
      KVR_ASSIGN_OR_RETURN(std::span<const float> logits, engine->Prefill(ref.prompt, a));
      for (size_t i = 0; i < n; ++i) {
        std::copy(logits.begin(), logits.end(), ref.logits.begin() + i * vocab_);
        ref.tokens[i] = Argmax(logits);
        if (i + 1 < n) {
          KVR_ASSIGN_OR_RETURN(logits, engine->DecodeStep(ref.tokens[i]));
        }
      }
      row.greedy_seconds += std::chrono::duration<double>(Clock::now() - start).count();
      AddEngineStats(engine->stats(), &row);
      row.tokens += static_cast<int64_t>(n);
      row.prefix_tokens += static_cast<int64_t>(n);
      row.tf_agree += static_cast<int64_t>(n);
      row.prefix_per_prompt.push_back(static_cast<int64_t>(n));
    }
    KVR_RETURN_IF_ERROR(engine->EndSequence());
    return row;
  }

  // One retrieval setting over the first `n_prompts` references.
  absl::StatusOr<Row> RunRetrieval(IndexType index, int nprobe, size_t n_prompts,
                                   bool teacher_forced_only, int top_k = 0,
                                   worker::EstimateMode estimate = worker::EstimateMode::kOff,
                                   double exact_zone = 0.0) {
    retrieval::NodeCoreOptions no;
    no.exact_zone_keys_fraction = exact_zone;
    no.estimate_clusters_per_chunk =
        static_cast<size_t>(absl::GetFlag(FLAGS_estimate_clusters_per_chunk));
    no.estimate_second_order = absl::GetFlag(FLAGS_estimate_second_order);
    no.threads = static_cast<size_t>(absl::GetFlag(FLAGS_node_threads));
    no.tail_capacity = static_cast<size_t>(absl::GetFlag(FLAGS_tail_capacity));
    no.train_k = attention_.train_k;
    if (nprobe > 0) no.ivf.default_nprobe = nprobe;
    KVR_ASSIGN_OR_RETURN(std::unique_ptr<retrieval::InProcessRetrievalClient> node,
                         retrieval::InProcessRetrievalClient::Create(no));
    CountingClient client(node.get());
    KVR_ASSIGN_OR_RETURN(std::unique_ptr<RetrievalEngine> engine,
                         RetrievalEngine::Create(backend_.get(), weights_, &client));
    AttentionOptions a = attention_;
    a.mode = AttentionMode::kRetrieval;
    a.index = index;
    if (top_k > 0) a.top_k = top_k;
    a.estimate = estimate;

    Row row;
    row.name = absl::StrCat("retrieval-", std::string(retrieval::IndexTypeName(index)));
    if (top_k > 0) {
      absl::StrAppend(&row.name, " k", a.top_k,
                      estimate == worker::EstimateMode::kOn ? " +est" : "");
      if (exact_zone > 0.0) absl::StrAppend(&row.name, " +zone ", exact_zone);
    }
    row.nprobe = index == IndexType::kIvf ? no.ivf.default_nprobe : 0;
    row.settings = absl::StrFormat("sinks %d, window %d, top_k %d, estimate %s", a.sinks,
                                   a.window, a.top_k,
                                   std::string(worker::EstimateModeName(a.estimate)));
    if (exact_zone > 0.0) absl::StrAppend(&row.settings, ", exact zone ", exact_zone);
    if (index == IndexType::kGraph) {
      absl::StrAppend(&row.settings, ", beam ",
                      a.beam > 0 ? a.beam : no.graph.default_beam);
    } else if (index == IndexType::kIvf) {
      absl::StrAppend(&row.settings, ", nprobe ", row.nprobe, " (nlist sqrt(n) at first seal)");
    }
    for (size_t p = 0; p < n_prompts; ++p) {
      const Reference& ref = refs_[p];
      const size_t n = ref.tokens.size();
      if (!teacher_forced_only) {
        // Free-running greedy decode.
        const Clock::time_point start = Clock::now();
        KVR_ASSIGN_OR_RETURN(std::span<const float> logits, engine->Prefill(ref.prompt, a));
        int64_t prefix = -1;
        for (size_t i = 0; i < n; ++i) {
          const int32_t token = Argmax(logits);
          if (prefix < 0 && token != ref.tokens[i]) prefix = static_cast<int64_t>(i);
          if (i + 1 < n) {
            KVR_ASSIGN_OR_RETURN(logits, engine->DecodeStep(token));
          }
        }
        row.greedy_seconds += std::chrono::duration<double>(Clock::now() - start).count();
        if (prefix < 0) prefix = static_cast<int64_t>(n);
        row.prefix_tokens += prefix;
        row.prefix_per_prompt.push_back(prefix);
        AddEngineStats(engine->stats(), &row);
      }
      // Teacher forcing with the reference continuation.
      KVR_ASSIGN_OR_RETURN(std::span<const float> logits, engine->Prefill(ref.prompt, a));
      for (size_t i = 0; i < n; ++i) {
        const std::span<const float> want(ref.logits.data() + i * vocab_, vocab_);
        row.tf_agree += Argmax(logits) == ref.tokens[i];
        const double kl = KlDivergence(want, logits);
        row.kl_sum += kl;
        row.kl_max = std::max(row.kl_max, kl);
        if (i + 1 < n) {
          KVR_ASSIGN_OR_RETURN(logits, engine->DecodeStep(ref.tokens[i]));
        }
      }
      row.tokens += static_cast<int64_t>(n);
    }
    KVR_RETURN_IF_ERROR(engine->EndSequence());
    row.node = client.totals();
    return row;
  }

  // Picks the IVF nprobe whose keys scanned per query on the calibration
  // prompts is closest to `target`.
  absl::StatusOr<int> CalibrateNprobe(double target) {
    const size_t n = std::min<size_t>(
        refs_.size(), static_cast<size_t>(std::max(1, absl::GetFlag(FLAGS_calibration_prompts))));
    std::printf("IVF nprobe calibration on %zu prompt(s), target %.1f keys scanned/query "
                "(the graph's):\n", n, target);
    int best = 1;
    double best_gap = INFINITY, previous = -1.0;
    for (int nprobe = 1; nprobe <= 64; ++nprobe) {
      KVR_ASSIGN_OR_RETURN(Row r, RunRetrieval(IndexType::kIvf, nprobe, n, true));
      const double scanned = r.scanned_per_query();
      std::printf("  nprobe %2d: %7.1f keys scanned/query (%.1f%% of %.1f held)\n", nprobe,
                  scanned, 100.0 * scanned / std::max(1.0, r.held_per_query()),
                  r.held_per_query());
      if (std::abs(scanned - target) < best_gap) {
        best_gap = std::abs(scanned - target);
        best = nprobe;
      }
      if (scanned >= target || scanned <= previous) break;  // reached, or every list probed
      previous = scanned;
    }
    std::printf("  -> nprobe %d\n\n", best);
    return best;
  }

  size_t num_prompts() const { return refs_.size(); }
  const std::string& model_path() const { return model_path_; }

 private:
  static void AddEngineStats(const worker::EngineStats& s, Row* row) {
    row->decode_steps += s.decode_steps;
    row->local_tokens += static_cast<double>(s.local_tokens);
    row->node_held_tokens += static_cast<double>(s.node_held_tokens);
    row->retrieved_tokens += s.retrieved_tokens;
  }

  std::string model_path_;
  std::shared_ptr<const worker::LlamaWeights> weights_;
  std::unique_ptr<worker::Llama2cTokenizer> tokenizer_;
  std::unique_ptr<worker::Backend> backend_;
  AttentionOptions attention_;
  size_t vocab_ = 0;
  std::vector<Reference> refs_;
};

void PrintTables(const std::vector<Row>& rows) {
  std::printf("%-18s %9s %9s %10s %10s %8s\n", "mode", "prefix", "tf_top1", "mean_KL",
              "max_KL", "tok/s");
  for (const Row& r : rows) {
    std::printf("%-18s %9.4f %9.4f %10.3g %10.3g %8.1f\n", r.name.c_str(), r.prefix_agreement(),
                r.tf_agreement(), r.mean_kl(), r.kl_max, r.tok_per_s());
  }
  std::printf(
      "\nwork per decode step and query head, averaged over the greedy runs' steps: tokens "
      "attended\nlocally (sinks + window), held by the node, retrieved (top-k per shard: index "
      "and tail\nbuffer each); per node call and query head: keys held and keys scanned "
      "(distance\ncomputations over index + tail, IVF centroids included):\n");
  std::printf("%-18s %7s %7s %9s %8s %8s %7s  %s\n", "mode", "local", "held", "retrieved",
              "held/q", "scanned", "scan%", "settings");
  for (const Row& r : rows) {
    const double held = r.held_per_query();
    std::printf("%-18s %7.1f %7.1f %9.1f %8.1f %8.1f %6.1f%%  %s\n", r.name.c_str(),
                r.per_step(r.local_tokens), r.per_step(r.node_held_tokens),
                r.per_step(r.retrieved_tokens), held, r.scanned_per_query(),
                held > 0 ? 100.0 * r.scanned_per_query() / held : 0.0, r.settings.c_str());
  }
  std::printf("\nper node call and query head: keys attended exactly (top-k and tails), keys "
              "and cluster pseudo-keys estimated, keys in the exact zone:\n");
  for (const Row& r : rows) {
    if (r.name.rfind("retrieval", 0) != 0) continue;
    std::printf("  %-26s %8.1f %8.1f %8.1f %8.1f\n", r.name.c_str(), r.attended_per_query(),
                r.node.queries ? double(r.node.keys_estimated) / r.node.queries : 0.0,
                r.clusters_per_query(),
                r.node.queries ? double(r.node.keys_exact_zone) / r.node.queries : 0.0);
  }
  std::printf("\ngreedy tokens before the first divergence, per prompt:\n");
  for (const Row& r : rows) {
    if (r.name.rfind("retrieval", 0) != 0) continue;
    std::printf("  %-16s %s\n", r.name.c_str(), absl::StrJoin(r.prefix_per_prompt, " ").c_str());
  }
}

absl::Status WriteJson(const std::string& path, const std::vector<Row>& rows,
                       const std::string& model, size_t prompts) {
  std::ofstream out(path);
  if (!out) return absl::UnavailableError(absl::StrCat("cannot write ", path));
  out << "{\n  \"benchmark\": \"fidelity\",\n";
  out << absl::StrFormat(
      "  \"model\": \"%s\",\n  \"prompts\": %d,\n  \"tokens\": %d,\n  \"sinks\": %d,\n"
      "  \"window\": %d,\n  \"top_k\": %d,\n  \"beam\": %d,\n  \"rows\": [\n",
      model, prompts, absl::GetFlag(FLAGS_tokens), absl::GetFlag(FLAGS_sinks),
      absl::GetFlag(FLAGS_window), absl::GetFlag(FLAGS_top_k), absl::GetFlag(FLAGS_beam));
  for (size_t i = 0; i < rows.size(); ++i) {
    const Row& r = rows[i];
    out << absl::StrFormat(
        "    {\"mode\": \"%s\", \"settings\": \"%s\", \"nprobe\": %d, \"tokens\": %d, "
        "\"prefix_agreement\": %.6f, \"teacher_forced_top1\": %.6f, \"mean_kl\": %.6g, "
        "\"max_kl\": %.6g, \"tok_per_s\": %.2f, \"local_per_step\": %.2f, "
        "\"held_per_step\": %.2f, \"retrieved_per_step\": %.2f, "
        "\"scanned_per_query\": %.2f, \"held_per_query\": %.2f, \"prefix_per_prompt\": [%s]}%s\n",
        r.name, r.settings, r.nprobe, r.tokens, r.prefix_agreement(), r.tf_agreement(),
        r.mean_kl(), r.kl_max, r.tok_per_s(), r.per_step(r.local_tokens),
        r.per_step(r.node_held_tokens), r.per_step(r.retrieved_tokens), r.scanned_per_query(),
        r.held_per_query(), absl::StrJoin(r.prefix_per_prompt, ", "),
        i + 1 < rows.size() ? "," : "");
  }
  out << "  ]\n}\n";
  return out.good() ? absl::OkStatus()
                    : absl::UnavailableError(absl::StrCat("error writing ", path));
}

absl::Status Run() {
  Bench bench;
  KVR_RETURN_IF_ERROR(bench.Init());
  std::vector<IndexType> modes;
  const std::vector<std::string> names =
      absl::StrSplit(absl::GetFlag(FLAGS_modes), ',', absl::SkipEmpty());
  for (const std::string& m : names) {
    absl::StatusOr<IndexType> t = retrieval::ParseIndexType(m);
    if (!t.ok()) return absl::InvalidArgumentError(absl::StrCat("--modes: ", t.status().message()));
    modes.push_back(*t);
  }
  std::printf("fidelity: %s, %zu prompts x %d tokens (clamped to the context), sinks %d, "
              "window %d, top_k %d\n\n",
              bench.model_path().c_str(), bench.num_prompts(), absl::GetFlag(FLAGS_tokens),
              absl::GetFlag(FLAGS_sinks), absl::GetFlag(FLAGS_window), absl::GetFlag(FLAGS_top_k));
  std::vector<Row> rows;
  KVR_ASSIGN_OR_RETURN(Row full, bench.RunFull());
  rows.push_back(std::move(full));
  // Issue 18 sweep: every top-k x estimation mode x index.
  std::vector<int> top_ks;
  for (absl::string_view k : absl::StrSplit(absl::GetFlag(FLAGS_top_ks), ',', absl::SkipEmpty())) {
    int v = 0;
    if (!absl::SimpleAtoi(k, &v) || v < 1 || v > 4096) {
      return absl::InvalidArgumentError(
          absl::StrCat("--top_ks: \"", k, "\" is not an integer in [1, 4096]"));
    }
    top_ks.push_back(v);
  }
  std::vector<worker::EstimateMode> estimates;
  for (absl::string_view e : absl::StrSplit(absl::GetFlag(FLAGS_estimate), ',', absl::SkipEmpty())) {
    absl::StatusOr<worker::EstimateMode> m = worker::ParseEstimateMode(std::string_view(e.data(), e.size()));
    if (!m.ok() || *m == worker::EstimateMode::kDefault) {
      return absl::InvalidArgumentError(absl::StrCat("--estimate: \"", e, "\" is not off or on"));
    }
    estimates.push_back(*m);
  }
  if (estimates.empty()) return absl::InvalidArgumentError("--estimate: empty");
  std::vector<double> zones;
  for (absl::string_view z :
       absl::StrSplit(absl::GetFlag(FLAGS_exact_zone_keys_fractions), ',', absl::SkipEmpty())) {
    double v = 0;
    if (!absl::SimpleAtod(z, &v) || !(v > 0.0 && v <= 1.0)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--exact_zone_keys_fractions: \"", z, "\" is not a number in (0, 1]"));
    }
    zones.push_back(v);
  }
  if (!top_ks.empty() || estimates.size() > 1 || estimates[0] != worker::EstimateMode::kOff) {
    if (top_ks.empty()) top_ks.push_back(absl::GetFlag(FLAGS_top_k));
    for (int k : top_ks) {
      for (worker::EstimateMode e : estimates) {
        for (IndexType t : modes) {
          const int nprobe = t == IndexType::kIvf ? absl::GetFlag(FLAGS_ivf_nprobe) : 0;
          if (t == IndexType::kIvf && nprobe <= 0) {
            return absl::InvalidArgumentError("ivf in a --top_ks / --estimate sweep needs "
                                              "--ivf_nprobe");
          }
          // Estimate on: also once per exact-zone budget.
          std::vector<double> runs = {0.0};
          if (e == worker::EstimateMode::kOn) runs.insert(runs.end(), zones.begin(), zones.end());
          for (const double zone : runs) {
            KVR_ASSIGN_OR_RETURN(
                Row row, bench.RunRetrieval(t, nprobe, bench.num_prompts(), false, k, e, zone));
            std::printf("  %-26s prefix %.4f  tf_top1 %.4f  mean_KL %.3g\n", row.name.c_str(),
                        row.prefix_agreement(), row.tf_agreement(), row.mean_kl());
            std::fflush(stdout);
            rows.push_back(std::move(row));
          }
        }
      }
    }
    std::printf("\n");
    PrintTables(rows);
    std::printf("\ntargets (issue 18, k 16 with sinks 4 + window 16): greedy prefix agreement "
                ">= 0.90, mean KL <= 0.001\n");
    for (const Row& r : rows) {
      if (r.name.rfind("retrieval", 0) != 0) continue;
      std::printf("  %-26s prefix %s, mean KL %s\n", r.name.c_str(),
                  r.prefix_agreement() >= 0.90 ? "met" : "NOT met",
                  r.mean_kl() <= 0.001 ? "met" : "NOT met");
    }
    if (const std::string path = absl::GetFlag(FLAGS_json); !path.empty()) {
      KVR_RETURN_IF_ERROR(WriteJson(path, rows, bench.model_path(), bench.num_prompts()));
      std::printf("\nwrote %s\n", path.c_str());
    }
    return absl::OkStatus();
  }
  double graph_scanned = -1.0;
  // The graph first: IVF's budget is calibrated to it.
  std::stable_sort(modes.begin(), modes.end(), [](IndexType a, IndexType b) {
    return (a == IndexType::kGraph) > (b == IndexType::kGraph);
  });
  for (IndexType t : modes) {
    int nprobe = 0;
    if (t == IndexType::kIvf) {
      nprobe = absl::GetFlag(FLAGS_ivf_nprobe);
      if (nprobe <= 0) {
        if (graph_scanned < 0) {
          return absl::InvalidArgumentError(
              "--ivf_nprobe 0 (calibrate) needs graph in --modes");
        }
        KVR_ASSIGN_OR_RETURN(nprobe, bench.CalibrateNprobe(graph_scanned));
      }
    }
    KVR_ASSIGN_OR_RETURN(Row row, bench.RunRetrieval(t, nprobe, bench.num_prompts(), false));
    if (t == IndexType::kGraph) graph_scanned = row.scanned_per_query();
    rows.push_back(std::move(row));
  }
  PrintTables(rows);
  std::printf("\ntargets (issue): agreement >= 0.98, mean KL <= 0.01\n");
  for (const Row& r : rows) {
    if (r.name.rfind("retrieval", 0) != 0) continue;
    std::printf("  %-16s prefix %s, teacher-forced top-1 %s, mean KL %s\n", r.name.c_str(),
                r.prefix_agreement() >= 0.98 ? "met" : "NOT met",
                r.tf_agreement() >= 0.98 ? "met" : "NOT met",
                r.mean_kl() <= 0.01 ? "met" : "NOT met");
  }
  if (const std::string path = absl::GetFlag(FLAGS_json); !path.empty()) {
    KVR_RETURN_IF_ERROR(WriteJson(path, rows, bench.model_path(), bench.num_prompts()));
    std::printf("\nwrote %s\n", path.c_str());
  }
  return absl::OkStatus();
}

}  // namespace
}  // namespace kvr

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "fidelity of retrieval attention vs full attention on stories260K: greedy prefix "
      "agreement, teacher-forced top-1 agreement, KL, tok/s per index");
  absl::ParseCommandLine(argc, argv);
  if (absl::Status s = kvr::Run(); !s.ok()) {
    std::fprintf(stderr, "fidelity: %s\n", s.ToString().c_str());
    return 1;
  }
  return 0;
}
