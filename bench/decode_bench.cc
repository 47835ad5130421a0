// decode_bench: CPU decode throughput vs context length and batch, full
// attention against retrieval attention (issue 20 item 1: the crossover).
//
// Model: random weights of Llama-3-8B's shape (32 query heads, 8 KV heads,
// head_dim 128, RoPE theta 500000, dim 4096, FFN 14336, untied classifier)
// with a few layers (--layers) on the worker's CPU backend. The layers are
// the worker's LlamaBlock; the attention is supplied per mode through
// AttentionHooks (as gpu_decode_bench does on CUDA):
//   * full:      full causal attention over the sequence's K/V cache on the
//                CPU backend (f32 cache, one per sequence and layer);
//   * retrieval: RetrievalEngine-style decode: sinks + window ring on the
//                worker (PartialAttention), the rest on an in-process
//                retrieval node (AttendAsync for every sequence of the batch
//                while the worker computes the local partials), LSE merge;
//                the token leaving the window is appended to the node;
//   * grpc:      the same with --nodes kvr_node processes (started here on
//                127.0.0.1 with ports chosen at run time, stopped at the end
//                of each row) behind a MultiNodeClient over gRPC;
//   * ucx:       the same, Attend over UCX (UcxRetrievalClient).
// --attend_batching=on (default) sends each layer's Attends of the whole
// batch as ONE AttendBatch (one per node) and its appends as ONE
// AppendBatch; off sends one Attend per sequence and one Append per
// (sequence, kv head), all in flight at once (the engine's path before
// batching). on,off runs both, side by side, in one run. --search_threads
// (comma-separated) sets the nodes' per-head parallel search (kvr_node
// --search_threads), one set-up per entry, rows side by side.
// The context is synthetic: K/V rows are Noise(seed, position * kv_dim + j)
// (so every mode sees the same K/V at the same position and the retrieval
// modes' logits can be compared with full attention's), written straight
// into the caches and uploaded to the nodes (UploadShard builds the index),
// no O(n^2) prefill. Every step feeds the same tokens in every mode.
// --prefill_contexts adds rows whose context is a real prefill instead
// (the model run over pseudo-random tokens in chunks of kPrefillChunk rows,
// causal full attention on the backend; its per-layer K/V then fill the
// caches and the nodes as the synthetic rows do), so retrieval's logits are
// compared with full attention's on keys a model produced (fill=prefill).
//
// Per row (mode, context, batch): seconds per decode step (one token of each
// of the batch's sequences) split into worker compute, retrieval wait (the
// worker blocked on the nodes after its local partials), merge and appends;
// tokens/s; node CPU-seconds per token (the in-process node's threads, or
// the node processes', from /proc); worker and node RSS; the memory-traffic
// bound (bytes of weights + K/V read per step / the streaming-read bandwidth
// measured at start); and, when full attention ran at the same shape, the
// largest |logit difference| and the top-1 agreement against it.
//
//   decode_bench [--contexts=4096,8192,32768] [--batches=1,4,16]
//                [--modes=full,retrieval,grpc,ucx] [--attend_batching=on,off]
//                [--search_threads=1,0] [--prefill_contexts=1024,4096]
//                [--layers=2] [--steps=3]
//                [--memory_budget_bytes=17179869184] [--json=out.json]
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "bench/decode_common.h"
#include "common/attention.h"
#include "common/status.h"
#include "common/subprocess.h"
#include "common/thread_pool.h"
#include "common/value_matrix.h"
#include "gpu_worker/backend/backend.h"
#include "gpu_worker/model/device_weights.h"
#include "gpu_worker/model/llama_block.h"
#include "gpu_worker/model/random_weights.h"
#include "retrieval_node/client/grpc_retrieval_client.h"
#include "retrieval_node/client/in_process_client.h"
#include "retrieval_node/client/multi_node_client.h"
#include "retrieval_node/client/ucx_retrieval_client.h"

ABSL_FLAG(std::string, contexts, "4096,8192,32768",
          "context lengths (tokens already in each sequence's cache), in [1024, 1048576]");
ABSL_FLAG(std::string, batches, "1,4,16", "decode batch sizes (sequences), in [1, 256]");
ABSL_FLAG(std::string, modes, "full,retrieval,grpc,ucx", "modes: full, retrieval, grpc, ucx");
ABSL_FLAG(int, layers, 2, "layers of the Llama-3-8B shape, in [1, 32]");
ABSL_FLAG(int, steps, 3, "decode steps timed per row (after one warm-up step), in [1, 1000]");
ABSL_FLAG(int, vocab, 128256, "classifier rows (128256 = Llama-3's), in [256, 128256]");
ABSL_FLAG(std::string, weights, "bf16", "weight storage: bf16 or f32");
ABSL_FLAG(int, threads, 0, "CPU backend threads (0: all cores)");
ABSL_FLAG(int, node_threads, 0, "Attend threads of each retrieval node (0: all cores)");
ABSL_FLAG(int, nodes, 3, "kvr_node processes of the grpc and ucx modes, in [1, 16]");
ABSL_FLAG(std::string, kvr_node, KVR_NODE_BINARY, "kvr_node binary of the grpc and ucx modes");
ABSL_FLAG(std::string, index, "ivf", "node index: graph, ivf, flat");
ABSL_FLAG(int, top_k, 100, "keys retrieved per query head and shard, in [1, 4096]");
ABSL_FLAG(int, sinks, 128, "sink tokens kept on the worker");
ABSL_FLAG(int, window, 512, "recent tokens kept on the worker");
ABSL_FLAG(int64_t, chunk_tokens, 131072, "tokens per node shard of one (layer, kv head)");
ABSL_FLAG(std::string, value_dtype, "bf16", "how the nodes store values: f32, bf16, f16");
ABSL_FLAG(int64_t, memory_budget_bytes, int64_t{16} << 30,
          "rows whose estimated memory (weights + caches + node shards) exceeds this are "
          "printed as skipped");
ABSL_FLAG(std::string, attend_batching, "on",
          "retrieval modes, comma-separated on / off: on = one AttendBatch per layer for the "
          "whole batch (one per node) and one AppendBatch per layer; off = one Attend per "
          "sequence and one Append per (sequence, kv head), all in flight at once (the "
          "engine's path before batching); on,off prints both rows side by side");
ABSL_FLAG(std::string, search_threads, "0",
          "retrieval modes, comma-separated: each entry sets the nodes' --search_threads "
          "(per-head parallel search within one Attend item; 0 = the node's attend pool lends "
          "idle workers, 1 = sequential), one set-up and row set per entry; e.g. 1,0 prints the "
          "sequential and the parallel rows side by side, in [0, 256]");
ABSL_FLAG(std::string, prefill_contexts, "",
          "comma-separated context lengths (in [1024, 65536]) whose context is filled by a real "
          "prefill of the random-weights model (chunked causal full attention over pseudo-random "
          "tokens) instead of synthetic K/V: the same modes and batches run on those "
          "attention-like keys (every sequence of a batch holds the same prefill), rows marked "
          "fill=prefill; empty = none");
ABSL_FLAG(std::string, json, "", "write the rows as a JSON array to this file");

namespace kvr {
namespace {

using bench::Clock;
using bench::Noise;
using bench::Since;
using worker::AttentionHookFns;
using worker::Backend;
using worker::KvRun;
using worker::Tensor;

constexpr uint64_t kKeySeed = 11, kValueSeed = 12;
// Rows per Forward of the prefill (bounds its activations).
constexpr int64_t kPrefillChunk = 256;

// ---- /proc readings ----------------------------------------------------------

// VmRSS of process `pid` ("self" when 0) in bytes; 0 when unreadable.
int64_t RssBytes(pid_t pid) {
  std::ifstream in(pid == 0 ? std::string("/proc/self/status")
                            : absl::StrCat("/proc/", pid, "/status"));
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  return bench::ParseVmRssBytes(text);
}

// utime + stime in seconds of a /proc/.../stat file; 0 when unreadable.
double StatCpuSeconds(const std::string& path) {
  std::ifstream in(path);
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const size_t paren = text.rfind(')');  // the command name may hold spaces
  if (paren == std::string::npos) return 0;
  std::vector<std::string> f = absl::StrSplit(text.substr(paren + 2), ' ');
  // After ") ": field 3 (state) is f[0]; utime = field 14, stime = field 15.
  int64_t ut = 0, st = 0;
  if (f.size() < 13 || !absl::SimpleAtoi(f[11], &ut) || !absl::SimpleAtoi(f[12], &st)) return 0;
  return static_cast<double>(ut + st) / static_cast<double>(sysconf(_SC_CLK_TCK));
}

// The thread ids of this process now.
std::set<std::string> ThreadIds() {
  std::set<std::string> out;
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator("/proc/self/task", ec)) {
    out.insert(e.path().filename().string());
  }
  return out;
}

// CPU seconds used so far by the threads `tids` of this process.
double ThreadsCpuSeconds(const std::set<std::string>& tids) {
  double s = 0;
  for (const std::string& t : tids) s += StatCpuSeconds(absl::StrCat("/proc/self/task/", t, "/stat"));
  return s;
}

// Streaming-read bandwidth (bytes/s): the best of 3 parallel sums over a
// buffer of `bytes`, on `pool`.
double MeasureBandwidth(ThreadPool& pool, size_t bytes) {
  std::vector<float> buf(bytes / sizeof(float));
  bench::Fill(pool, buf.data(), buf.size(), 7);
  double best = 0;
  for (int rep = 0; rep < 3; ++rep) {
    std::atomic<int64_t> sink{0};
    const Clock::time_point t = Clock::now();
    pool.ParallelFor(buf.size(), 1 << 22, [&](size_t b, size_t e) {
      float acc[8] = {};
      for (size_t i = b; i + 8 <= e; i += 8) {
        for (int j = 0; j < 8; ++j) acc[j] += buf[i + static_cast<size_t>(j)];
      }
      float s = 0;
      for (float a : acc) s += a;
      sink += static_cast<int64_t>(s);
    });
    best = std::max(best, static_cast<double>(bytes) / Since(t));
  }
  return best;
}

// ---- kvr_node processes ----------------------------------------------------------

// `count` kvr_node processes on 127.0.0.1 (ports chosen by the nodes, read
// from their "listening on" lines; UCX listeners too when `ucx`), stopped
// (SIGTERM, then waited for) when this object goes.
class NodeProcesses {
 public:
  static absl::StatusOr<std::unique_ptr<NodeProcesses>> Start(const std::string& binary,
                                                               int count, int threads,
                                                               int search_threads, bool ucx) {
    auto out = std::unique_ptr<NodeProcesses>(new NodeProcesses());
    for (int i = 0; i < count; ++i) {
      std::vector<std::string> argv = {binary, "--listen=127.0.0.1:0", "--metrics_listen=",
                                       absl::StrCat("--threads=", threads),
                                       absl::StrCat("--search_threads=", search_threads)};
      if (ucx) argv.push_back("--ucx_listen=127.0.0.1:0");
      KVR_ASSIGN_OR_RETURN(std::unique_ptr<Subprocess> proc, Subprocess::Start(std::move(argv)));
      out->procs_.push_back(std::move(proc));
      KVR_ASSIGN_OR_RETURN(std::string address,
                           out->procs_.back()->WaitForLine("kvr_node listening on ",
                                                           absl::Seconds(60)));
      out->addresses_.push_back(address);
    }
    return out;
  }
  ~NodeProcesses() {
    for (auto& p : procs_) (void)p->Stop(SIGTERM, absl::Seconds(30));
  }
  const std::vector<std::string>& addresses() const { return addresses_; }
  double CpuSeconds() const {
    double s = 0;
    for (const auto& p : procs_) s += StatCpuSeconds(absl::StrCat("/proc/", p->pid(), "/stat"));
    return s;
  }
  int64_t RssBytes() const {
    int64_t s = 0;
    for (const auto& p : procs_) s += kvr::RssBytes(p->pid());
    return s;
  }

 private:
  NodeProcesses() = default;
  std::vector<std::unique_ptr<Subprocess>> procs_;
  std::vector<std::string> addresses_;
};

// ---- rows ------------------------------------------------------------------------

struct Row {
  std::string mode;
  std::string attend_batching = "-";  // on / off (retrieval modes), "-" (full)
  int search_threads = -1;  // the nodes' --search_threads (retrieval modes), -1 (full)
  std::string fill = "synthetic";  // how the context was filled: synthetic / prefill
  int64_t context = 0;
  int batch = 0;
  // Per decode step (one token of each sequence), seconds.
  double step_s = 0, compute_s = 0, wait_s = 0, merge_s = 0, append_s = 0;
  double tokens_per_second = 0;
  double node_cpu_s_per_token = 0;
  int64_t worker_rss_bytes = 0, node_rss_bytes = 0;  // node: -1 in process
  double bytes_per_step = 0, bound_tokens_per_second = 0;
  double setup_s = 0;  // filling caches / uploading and building the node indexes
  double max_abs_logit_diff = -1, logits_max_abs = 0, top1_agreement = -1;
  std::string note;
};

// First-step-onwards logits of full attention per (context, batch), the
// reference of the retrieval modes.
// Keyed by (context, batch, filled by a prefill).
using LogitKey = std::tuple<int64_t, int, bool>;

class Bench {
 public:
  absl::Status Init() {
    const std::string wd = absl::GetFlag(FLAGS_weights);
    if (wd != "bf16" && wd != "f32") {
      return absl::InvalidArgumentError(absl::StrCat("--weights: \"", wd, "\" is not bf16 or f32"));
    }
    weight_bytes_per_param_ = wd == "bf16" ? 2 : 4;
    worker::RandomWeightsOptions wo;
    wo.n_layers_override = absl::GetFlag(FLAGS_layers);
    wo.dtype = wd == "bf16" ? DType::kBf16 : DType::kF32;
    wo.pool = &pool_;
    const Clock::time_point t = Clock::now();
    KVR_ASSIGN_OR_RETURN(weights_,
                         worker::MakeRandomWeights(bench::Llama3_8BConfig(absl::GetFlag(FLAGS_vocab)), wo));
    worker::BackendOptions bo;
    bo.num_threads = absl::GetFlag(FLAGS_threads);
    KVR_ASSIGN_OR_RETURN(backend_, worker::BackendRegistry::Create("cpu", bo));
    KVR_ASSIGN_OR_RETURN(w_, worker::DeviceWeights::Import(backend_.get(), *weights_));
    block_ = worker::LlamaBlock(backend_.get(), &weights_->config, &w_);
    const worker::LlamaConfig& c = config();
    weight_bytes_ = static_cast<double>(weight_bytes_per_param_) *
                    (static_cast<double>(c.n_layers) * static_cast<double>(c.LayerParameterCount()) +
                     static_cast<double>(c.vocab_size) * c.dim);
    bandwidth_ = MeasureBandwidth(pool_, size_t{1} << 30);
    std::printf("model: Llama-3-8B shape, %d layers, vocab %d, %s weights (random, %.2f GiB read "
                "per step), built in %.1f s\nbackend: %s\nstreaming read bandwidth: %.1f GB/s\n",
                c.n_layers, c.vocab_size, wd.c_str(), weight_bytes_ / (1 << 30), Since(t),
                backend_->Describe().c_str(), bandwidth_ * 1e-9);
    return absl::OkStatus();
  }

  const worker::LlamaConfig& config() const { return weights_->config; }
  // The nodes' --search_threads of the next retrieval Run.
  void set_search_threads(int n) { search_threads_ = n; }

  // Fills the context of the next Runs (which must use context `n`) by a
  // real prefill of n pseudo-random tokens: per layer, the K and V rows the
  // model computes (chunks of kPrefillChunk rows, causal full attention).
  // Prints its time. n in [1, 2^20].
  absl::Status Prefill(int64_t n) {
    const worker::LlamaConfig& c = config();
    const Clock::time_point t = Clock::now();
    const int64_t chunk = std::min(kPrefillChunk, n);
    KVR_ASSIGN_OR_RETURN(worker::BlockActivations a,
                         worker::BlockActivations::Allocate(*backend_, c, chunk, chunk));
    std::vector<Tensor> k, v;
    for (int l = 0; l < c.n_layers; ++l) {
      KVR_ASSIGN_OR_RETURN(Tensor kt, backend_->Allocate(DType::kF32, n, c.kv_dim()));
      KVR_ASSIGN_OR_RETURN(Tensor vt, backend_->Allocate(DType::kF32, n, c.kv_dim()));
      k.push_back(kt);
      v.push_back(vt);
    }
    int64_t first = 0, rows = 0;
    KvRun run;
    auto hook = AttentionHookFns(
        [&](int l) -> absl::StatusOr<std::span<const KvRun>> {
          run = {0, rows, k[static_cast<size_t>(l)].Rows(first, rows),
                 v[static_cast<size_t>(l)].Rows(first, rows), nullptr};
          return std::span<const KvRun>(&run, 1);
        },
        [&](int l, const Tensor& q, const Tensor& o) -> absl::Status {
          return backend_->Attention(q, k[static_cast<size_t>(l)], v[static_cast<size_t>(l)],
                                     c.attention_shape(), first, o);
        });
    std::vector<int32_t> tokens, positions;
    for (first = 0; first < n; first += chunk) {
      rows = std::min(chunk, n - first);
      tokens.clear();
      positions.clear();
      for (int64_t i = first; i < first + rows; ++i) {
        tokens.push_back(static_cast<int32_t>((17 + 7919 * i + (i * i) % 104729) % c.vocab_size));
        positions.push_back(static_cast<int32_t>(i));
      }
      const worker::BlockActivations ar = a.Rows(rows);
      KVR_RETURN_IF_ERROR(block_.Embed(tokens, ar.x));
      for (int l = 0; l < c.n_layers; ++l) KVR_RETURN_IF_ERROR(block_.Forward(l, positions, ar, hook));
    }
    prefill_k_.assign(k.size(), {});
    prefill_v_.assign(v.size(), {});
    const size_t floats = static_cast<size_t>(n) * static_cast<size_t>(c.kv_dim());
    for (size_t l = 0; l < k.size(); ++l) {
      prefill_k_[l].resize(floats);
      prefill_v_[l].resize(floats);
      KVR_RETURN_IF_ERROR(backend_->DownloadF32(k[l], prefill_k_[l]));
      KVR_RETURN_IF_ERROR(backend_->DownloadF32(v[l], prefill_v_[l]));
    }
    prefill_rows_ = n;
    std::printf("prefill: %lld tokens x %d layers in %.1f s\n", static_cast<long long>(n),
                c.n_layers, Since(t));
    std::fflush(stdout);
    return absl::OkStatus();
  }
  // Back to synthetic contexts.
  void ClearPrefill() {
    prefill_k_.clear();
    prefill_v_.clear();
    prefill_rows_ = 0;
  }
  bool prefilled() const { return prefill_rows_ > 0; }

  // Estimated peak bytes of a row (weights + caches + node shards + staging).
  double EstimateBytes(const std::string& mode, int64_t context, int batch) const {
    const worker::LlamaConfig& c = config();
    const double kv = static_cast<double>(c.kv_dim()), layers = c.n_layers;
    const double staging = 2.0 * static_cast<double>(context) * kv * 4;
    const double weights = weight_bytes_ + static_cast<double>(c.vocab_size) * c.dim *
                                               weight_bytes_per_param_;  // + embedding table
    if (mode == "full") {
      return weights + staging +
             batch * layers * static_cast<double>(context + FullSteps() + 1) * kv * 8;
    }
    const double value_bytes = value_dtype_ == DType::kF32 ? 4 : 2;
    // Keys f32 + values + about 25% for the index and positions.
    return weights + staging + batch * layers * static_cast<double>(context) * kv *
                                   (4 + value_bytes) * 1.25;
  }

  static int Steps() { return absl::GetFlag(FLAGS_steps); }
  // Timed steps of full attention: every retrieval variant's positions.
  int FullSteps() const { return variants_ * (Steps() + 1) - 1; }

  absl::Status ParseNodeFlags() {
    KVR_ASSIGN_OR_RETURN(index_, retrieval::ParseIndexType(absl::GetFlag(FLAGS_index)));
    KVR_ASSIGN_OR_RETURN(value_dtype_, kvr::ParseDType(absl::GetFlag(FLAGS_value_dtype)));
    return absl::OkStatus();
  }

  // The rows of `mode` at (context, batch): one for full attention; one per
  // entry of `batchings` (--attend_batching) for a retrieval mode, all timed
  // on ONE set-up (the same node state), one after the other: variant v
  // decodes positions context + v * (steps + 1) + [0, steps], which full
  // attention (run over every variant's positions) has logits for.
  absl::StatusOr<std::vector<Row>> Run(const std::string& mode, int64_t context, int batch,
                                       const std::vector<bool>& batchings) {
    variants_ = static_cast<int>(batchings.size());
    Row row;
    row.mode = mode;
    row.context = context;
    row.batch = batch;
    row.fill = prefilled() ? "prefill" : "synthetic";
    std::vector<Row> out;
    const double need = EstimateBytes(mode, context, batch);
    const double budget = static_cast<double>(absl::GetFlag(FLAGS_memory_budget_bytes));
    if (need > budget) {
      row.note = absl::StrFormat("skipped: needs ~%.1f GiB > --memory_budget_bytes %.1f GiB",
                                 need / (1 << 30), budget / (1 << 30));
      out.push_back(row);
      return out;
    }
    KVR_ASSIGN_OR_RETURN(act_, worker::BlockActivations::Allocate(*backend_, config(), batch, batch));
    auto rows = [&](int64_t cols) { return backend_->Allocate(DType::kF32, batch, cols); };
    KVR_ASSIGN_OR_RETURN(logits_, rows(config().vocab_size));
    if (mode == "full") {
      KVR_RETURN_IF_ERROR(RunFull(row));
      out.push_back(row);
    } else {
      KVR_RETURN_IF_ERROR(RunRetrieval(row, batchings, &out));
    }
    for (Row& r : out) {
      r.tokens_per_second = batch / r.step_s;
      r.bound_tokens_per_second = batch * bandwidth_ / r.bytes_per_step;
    }
    return out;
  }

 private:
  // K (seed kKeySeed) or V (kValueSeed) rows [first, first + n) of layer
  // `layer`'s context: the prefill's when there is one (rows within it),
  // else the synthetic ones (the same for every layer).
  std::vector<float> ContextRows(int layer, uint64_t seed, int64_t first, int64_t n) {
    if (!prefilled()) return Synthetic(seed, first, n);
    KVR_CHECK(first >= 0 && n >= 0 && first + n <= prefill_rows_);
    const size_t kv = static_cast<size_t>(config().kv_dim());
    const std::vector<float>& src =
        (seed == kKeySeed ? prefill_k_ : prefill_v_)[static_cast<size_t>(layer)];
    const auto begin = src.begin() + static_cast<std::ptrdiff_t>(static_cast<size_t>(first) * kv);
    return std::vector<float>(begin, begin + static_cast<std::ptrdiff_t>(static_cast<size_t>(n) * kv));
  }

  // K (seed kKeySeed) or V rows [first, first + n) of the synthetic context.
  std::vector<float> Synthetic(uint64_t seed, int64_t first, int64_t n) {
    const size_t kv = static_cast<size_t>(config().kv_dim());
    std::vector<float> out(static_cast<size_t>(n) * kv);
    const size_t base = static_cast<size_t>(first) * kv;
    pool_.ParallelFor(out.size(), 1 << 20, [&](size_t b, size_t e) {
      for (size_t i = b; i < e; ++i) out[i] = Noise(seed, base + i);
    });
    return out;
  }

  // The step's tokens (the same in every mode): one per sequence.
  absl::Status Embed(int step, int batch) {
    std::vector<int32_t> tokens(static_cast<size_t>(batch));
    for (int b = 0; b < batch; ++b) {
      tokens[static_cast<size_t>(b)] = static_cast<int32_t>(
          (1000 + 7919 * int64_t{step + 1} + 104729 * int64_t{b}) % config().vocab_size);
    }
    return block_.Embed(tokens, act_.x);
  }

  // Logits of the step into `out` (batch x vocab).
  absl::Status Classify(std::vector<float>& out) {
    KVR_RETURN_IF_ERROR(block_.Logits(act_.x, act_.xb, logits_));
    out.resize(static_cast<size_t>(logits_.rows() * logits_.cols()));
    return backend_->DownloadF32(logits_, out);
  }

  // Compares step logits with full attention's at the same shape, if any;
  // logits[s] is full attention's step offset + s.
  void Compare(Row& row, const std::vector<std::vector<float>>& logits, size_t offset) {
    auto it = reference_.find({row.context, row.batch, prefilled()});
    if (it == reference_.end()) return;
    double diff = 0, max_abs = 0;
    int64_t agree = 0, total = 0;
    const size_t vocab = static_cast<size_t>(config().vocab_size);
    for (size_t s = 0; s < logits.size() && offset + s < it->second.size(); ++s) {
      const std::vector<float>& a = logits[s];
      const std::vector<float>& r = it->second[offset + s];
      for (size_t i = 0; i < a.size(); ++i) {
        diff = std::max(diff, static_cast<double>(std::fabs(a[i] - r[i])));
        max_abs = std::max(max_abs, static_cast<double>(std::fabs(r[i])));
      }
      for (size_t b = 0; b * vocab < a.size(); ++b) {
        const auto best = [&](const std::vector<float>& v) {
          return std::max_element(v.begin() + static_cast<std::ptrdiff_t>(b * vocab),
                                  v.begin() + static_cast<std::ptrdiff_t>((b + 1) * vocab)) -
                 v.begin();
        };
        agree += best(a) == best(r) ? 1 : 0;
        ++total;
      }
    }
    row.max_abs_logit_diff = diff;
    row.logits_max_abs = max_abs;
    row.top1_agreement = total > 0 ? static_cast<double>(agree) / static_cast<double>(total) : -1;
  }

  absl::Status RunFull(Row& row) {
    const worker::LlamaConfig& c = config();
    const int batch = row.batch;
    const int64_t context = row.context;
    const int steps = FullSteps();
    const int64_t cache_rows = context + steps + 1;
    const Clock::time_point setup = Clock::now();
    // One f32 cache per (layer, sequence), rows [0, context) synthetic.
    std::vector<std::vector<Tensor>> k(static_cast<size_t>(c.n_layers)), v(k.size());
    for (size_t l = 0; l < k.size(); ++l) {
      const std::vector<float> ks = ContextRows(static_cast<int>(l), kKeySeed, 0, context);
      const std::vector<float> vs = ContextRows(static_cast<int>(l), kValueSeed, 0, context);
      {
        for (int b = 0; b < batch; ++b) {
          KVR_ASSIGN_OR_RETURN(Tensor kt, backend_->Allocate(DType::kF32, cache_rows, c.kv_dim()));
          KVR_ASSIGN_OR_RETURN(Tensor vt, backend_->Allocate(DType::kF32, cache_rows, c.kv_dim()));
          KVR_RETURN_IF_ERROR(backend_->UploadF32(ks, kt.Rows(0, context)));
          KVR_RETURN_IF_ERROR(backend_->UploadF32(vs, vt.Rows(0, context)));
          k[l].push_back(kt);
          v[l].push_back(vt);
        }
      }
    }
    row.setup_s = Since(setup);
    int64_t pos = context;
    std::vector<KvRun> runs(static_cast<size_t>(batch));
    auto hook = AttentionHookFns(
        [&](int l) -> absl::StatusOr<std::span<const KvRun>> {
          for (int b = 0; b < batch; ++b) {
            const size_t bi = static_cast<size_t>(b);
            runs[bi] = {b, 1, k[static_cast<size_t>(l)][bi].Rows(pos, 1),
                        v[static_cast<size_t>(l)][bi].Rows(pos, 1), nullptr};
          }
          return std::span<const KvRun>(runs);
        },
        [&](int l, const Tensor& q, const Tensor& o) -> absl::Status {
          for (int b = 0; b < batch; ++b) {
            const size_t bi = static_cast<size_t>(b);
            KVR_RETURN_IF_ERROR(backend_->Attention(q.Rows(b, 1), k[static_cast<size_t>(l)][bi],
                                                    v[static_cast<size_t>(l)][bi],
                                                    c.attention_shape(), pos, o.Rows(b, 1)));
          }
          return absl::OkStatus();
        });
    std::vector<std::vector<float>> logits(static_cast<size_t>(steps));
    std::vector<float> warm;
    for (int step = -1; step < steps; ++step) {
      pos = context + step + 1;
      const Clock::time_point start = Clock::now();
      KVR_RETURN_IF_ERROR(Forward(step, batch, pos, hook));
      KVR_RETURN_IF_ERROR(Classify(step >= 0 ? logits[static_cast<size_t>(step)] : warm));
      if (step >= 0) row.step_s += Since(start) / steps;
    }
    row.compute_s = row.step_s;  // no nodes: all of it is the worker's
    row.worker_rss_bytes = RssBytes(0);
    row.node_rss_bytes = 0;
    // Weights + every K/V row attended (mean over the timed steps).
    row.bytes_per_step =
        weight_bytes_ + static_cast<double>(batch) * c.n_layers *
                            static_cast<double>(context + 1 + steps / 2) *
                            static_cast<double>(c.kv_dim()) * 8;
    reference_[{context, batch, prefilled()}] = std::move(logits);
    return absl::OkStatus();
  }

  absl::Status Forward(int step, int batch, int64_t pos, worker::AttentionHook& hook) {
    KVR_RETURN_IF_ERROR(Embed(step, batch));
    const std::vector<int32_t> positions(static_cast<size_t>(batch), static_cast<int32_t>(pos));
    for (int l = 0; l < config().n_layers; ++l) {
      KVR_RETURN_IF_ERROR(block_.Forward(l, positions, act_, hook));
    }
    return absl::OkStatus();
  }

  // The retrieval client of `mode`; `nodes` gets the node processes (remote
  // modes) and `node_tids` the in-process node's threads.
  absl::StatusOr<std::unique_ptr<retrieval::RetrievalClient>> MakeClient(
      const std::string& mode, std::unique_ptr<NodeProcesses>& nodes,
      std::set<std::string>& node_tids, std::string& note) {
    int node_threads = absl::GetFlag(FLAGS_node_threads);
    if (node_threads <= 0) node_threads = std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
    if (mode == "retrieval") {
      retrieval::NodeCoreOptions no;
      no.threads = static_cast<size_t>(node_threads);
      no.search_threads = static_cast<size_t>(search_threads_);
      const std::set<std::string> before = ThreadIds();
      KVR_ASSIGN_OR_RETURN(auto client, retrieval::InProcessRetrievalClient::Create(no));
      for (const std::string& t : ThreadIds()) {
        if (!before.contains(t)) node_tids.insert(t);
      }
      return std::unique_ptr<retrieval::RetrievalClient>(std::move(client));
    }
    const bool ucx = mode == "ucx";
    if (ucx) {
      setenv("UCX_TLS", "tcp", /*overwrite=*/0);  // inherited by the nodes
      setenv("UCX_NET_DEVICES", "lo", 0);
      setenv("UCX_WARN_UNUSED_ENV_VARS", "n", 0);
    }
    KVR_ASSIGN_OR_RETURN(nodes, NodeProcesses::Start(absl::GetFlag(FLAGS_kvr_node),
                                                     absl::GetFlag(FLAGS_nodes), node_threads,
                                                     search_threads_, ucx));
    std::vector<placement::NodeInfo> infos;
    std::vector<std::unique_ptr<retrieval::RetrievalClient>> clients;
    retrieval::GrpcClientOptions go;
    go.attend_timeout = absl::Seconds(120);
    go.upload_timeout = absl::Seconds(300);  // < kvr_node --max_deadline_seconds
    go.control_timeout = absl::Seconds(60);
    for (const std::string& address : nodes->addresses()) {
      KVR_ASSIGN_OR_RETURN(auto grpc, retrieval::GrpcRetrievalClient::Create(address, go));
      KVR_RETURN_IF_ERROR(grpc->WaitForReady(absl::Seconds(30)));
      infos.push_back({address, address});
      if (ucx) {
        retrieval::UcxClientOptions uo;
        uo.attend_timeout = absl::Seconds(120);
        KVR_ASSIGN_OR_RETURN(auto u, retrieval::UcxRetrievalClient::Create(std::move(grpc), uo));
        if (!u->using_ucx()) note = absl::StrCat("UCX fell back to gRPC: ", u->fallback_reason().ToString());
        clients.push_back(std::move(u));
      } else {
        clients.push_back(std::move(grpc));
      }
    }
    retrieval::MultiNodeOptions mo;
    mo.replicas = 1;
    KVR_ASSIGN_OR_RETURN(auto multi, retrieval::MultiNodeClient::Create(
                                         std::move(infos), std::move(clients), nullptr, mo));
    return std::unique_ptr<retrieval::RetrievalClient>(std::move(multi));
  }

  // Sets up `proto`'s shape once and appends one row per `batchings` entry.
  absl::Status RunRetrieval(const Row& proto, const std::vector<bool>& batchings,
                            std::vector<Row>* out) {
    Row row = proto;
    const worker::LlamaConfig& c = config();
    const int batch = row.batch;
    const size_t nb = static_cast<size_t>(batch);
    const int64_t context = row.context;
    const int64_t s = absl::GetFlag(FLAGS_sinks), w = absl::GetFlag(FLAGS_window);
    if (s < 0 || w < 1 || context <= s + w) {
      return absl::InvalidArgumentError(absl::StrCat("--sinks ", s, " + --window ", w,
                                                     " must be < the context ", context));
    }
    const size_t kv = static_cast<size_t>(c.kv_dim()), d = static_cast<size_t>(c.head_dim);
    const int64_t mid_end = context - w;  // the node holds [s, mid_end) at start
    std::unique_ptr<NodeProcesses> nodes;
    std::set<std::string> node_tids;
    KVR_ASSIGN_OR_RETURN(std::unique_ptr<retrieval::RetrievalClient> node,
                         MakeClient(row.mode, nodes, node_tids, row.note));
    const Clock::time_point setup = Clock::now();
    std::vector<retrieval::SequenceSpec> specs(nb);
    for (size_t b = 0; b < nb; ++b) {
      specs[b].sequence_id = 1 + b;
      specs[b].n_layers = c.n_layers;
      specs[b].n_heads = c.n_heads;
      specs[b].n_kv_heads = c.n_kv_heads;
      specs[b].head_dim = c.head_dim;
      specs[b].value_dtype = value_dtype_;
      specs[b].index_type = index_;
      KVR_RETURN_IF_ERROR(node->CreateSequence(specs[b]));
    }
    {
      // Positions [s, mid_end) of every (sequence, layer, kv head), in chunks.
      // Per layer (one shared copy when synthetic: every layer's is the same).
      std::vector<std::shared_ptr<const std::vector<float>>> layer_ks, layer_vs;
      for (int l = 0; l < c.n_layers; ++l) {
        if (l > 0 && !prefilled()) {
          layer_ks.push_back(layer_ks.front());
          layer_vs.push_back(layer_vs.front());
          continue;
        }
        layer_ks.push_back(std::make_shared<const std::vector<float>>(
            ContextRows(l, kKeySeed, s, mid_end - s)));
        layer_vs.push_back(std::make_shared<const std::vector<float>>(
            ContextRows(l, kValueSeed, s, mid_end - s)));
      }
      const int64_t chunk = std::max<int64_t>(1, absl::GetFlag(FLAGS_chunk_tokens));
      const int64_t n_mid = mid_end - s, chunks = (n_mid + chunk - 1) / chunk;
      std::mutex mu;
      absl::Status first_error;
      {
      ThreadPool uploads(std::max<size_t>(2, std::thread::hardware_concurrency()));
      for (size_t b = 0; b < nb; ++b) {
        for (int l = 0; l < c.n_layers; ++l) {
          for (int g = 0; g < c.n_kv_heads; ++g) {
            uploads.Schedule([&, b, l, g] {
              const std::vector<float>& ks = *layer_ks[static_cast<size_t>(l)];
              const std::vector<float>& vs = *layer_vs[static_cast<size_t>(l)];
              for (int64_t ci = 0; ci < chunks; ++ci) {
                const int64_t begin = ci * chunk, n = std::min(chunk, n_mid - begin);
                retrieval::ShardUpload up;
                up.key = {specs[b].sequence_id, l, g, static_cast<int32_t>(ci)};
                up.first_position = s + begin;
                const size_t off = static_cast<size_t>(begin) * kv + static_cast<size_t>(g) * d;
                up.keys = ConstMatrixView(ks.data() + off, static_cast<size_t>(n), d, kv);
                up.values = ConstMatrixView(vs.data() + off, static_cast<size_t>(n), d, kv);
                if (absl::Status st = node->UploadShard(up); !st.ok()) {
                  std::lock_guard<std::mutex> lock(mu);
                  if (first_error.ok()) first_error = st;
                  return;
                }
              }
            });
          }
        }
      }
      }  // joins the uploads
      KVR_RETURN_IF_ERROR(first_error);
    }
    // The worker's part per (layer, sequence): sinks [0, s) at rows [0, s),
    // position p of the window at ring slot s + (p - s) % w.
    const int64_t local = s + w;
    std::vector<std::vector<Tensor>> k(static_cast<size_t>(c.n_layers)), v(k.size());
    for (size_t l = 0; l < k.size(); ++l) {
      const int layer = static_cast<int>(l);
      std::vector<float> lk(static_cast<size_t>(local) * kv), lv(lk.size());
      const std::vector<float> sk = ContextRows(layer, kKeySeed, 0, s);
      const std::vector<float> sv = ContextRows(layer, kValueSeed, 0, s);
      std::copy(sk.begin(), sk.end(), lk.begin());
      std::copy(sv.begin(), sv.end(), lv.begin());
      const std::vector<float> wk = ContextRows(layer, kKeySeed, mid_end, w);
      const std::vector<float> wv = ContextRows(layer, kValueSeed, mid_end, w);
      for (int64_t p = mid_end; p < context; ++p) {
        const size_t slot = static_cast<size_t>(s + (p - s) % w);
        const size_t src = static_cast<size_t>(p - mid_end) * kv;
        std::copy_n(wk.begin() + static_cast<std::ptrdiff_t>(src), kv,
                    lk.begin() + static_cast<std::ptrdiff_t>(slot * kv));
        std::copy_n(wv.begin() + static_cast<std::ptrdiff_t>(src), kv,
                    lv.begin() + static_cast<std::ptrdiff_t>(slot * kv));
      }
      {
        for (size_t b = 0; b < nb; ++b) {
          KVR_ASSIGN_OR_RETURN(Tensor kt, backend_->Allocate(DType::kF32, local, c.kv_dim()));
          KVR_ASSIGN_OR_RETURN(Tensor vt, backend_->Allocate(DType::kF32, local, c.kv_dim()));
          KVR_RETURN_IF_ERROR(backend_->UploadF32(lk, kt));
          KVR_RETURN_IF_ERROR(backend_->UploadF32(lv, vt));
          k[l].push_back(kt);
          v[l].push_back(vt);
        }
      }
    }
    const double setup_s = Since(setup);
    row.setup_s = setup_s;
    std::printf("  %s: %lld tokens x %d layers x %d kv heads x %d sequences on %s, %s index, "
                "set up in %.1f s\n",
                row.mode.c_str(), static_cast<long long>(mid_end - s), c.n_layers, c.n_kv_heads,
                batch, nodes ? absl::StrCat(absl::GetFlag(FLAGS_nodes), " kvr_node").c_str() : "1 in-process node",
                std::string(retrieval::IndexTypeName(index_)).c_str(), row.setup_s);
    std::fflush(stdout);

    auto rows = [&](int64_t cols) { return backend_->Allocate(DType::kF32, batch, cols); };
    KVR_ASSIGN_OR_RETURN(Tensor o2, rows(c.q_dim()));
    KVR_ASSIGN_OR_RETURN(Tensor m1, rows(c.n_heads));
    KVR_ASSIGN_OR_RETURN(Tensor l1, rows(c.n_heads));
    KVR_ASSIGN_OR_RETURN(Tensor m2, rows(c.n_heads));
    KVR_ASSIGN_OR_RETURN(Tensor l2, rows(c.n_heads));
    std::vector<Partials> partials;
    for (size_t b = 0; b < nb; ++b) partials.emplace_back(static_cast<size_t>(c.n_heads), d);
    std::vector<float> q_host(nb * static_cast<size_t>(c.q_dim()));
    std::vector<float> o2_host(q_host.size()), m2_host(nb * static_cast<size_t>(c.n_heads)),
        l2_host(m2_host.size());
    bool batching = true;  // the variant being timed
    std::vector<float> spill(nb * 2 * kv);  // each sequence's leaving k then v row
    std::vector<retrieval::AppendBatchItem> append_items;
    std::vector<retrieval::AttendBatchItem> attend_items;
    const int top_k = absl::GetFlag(FLAGS_top_k);
    int64_t pos = context, slot = 0;
    double wait_s = 0, merge_s = 0, append_s = 0;
    std::vector<KvRun> runs(nb);
    auto hook = AttentionHookFns(
        // The token leaving each sequence's window goes to the node (per kv
        // head), then the new token's k / v take its slot.
        [&](int l) -> absl::StatusOr<std::span<const KvRun>> {
          const Clock::time_point a = Clock::now();
          append_items.clear();
          std::vector<std::unique_ptr<retrieval::StatusWaiter>> waiters;
          for (size_t b = 0; b < nb; ++b) {
            const Tensor ks = k[static_cast<size_t>(l)][b].Rows(slot, 1);
            const Tensor vs = v[static_cast<size_t>(l)][b].Rows(slot, 1);
            const std::span<float> k_row(spill.data() + b * 2 * kv, kv);
            const std::span<float> v_row(spill.data() + b * 2 * kv + kv, kv);
            KVR_RETURN_IF_ERROR(backend_->DownloadF32(ks, k_row));
            KVR_RETURN_IF_ERROR(backend_->DownloadF32(vs, v_row));
            for (int g = 0; g < c.n_kv_heads; ++g) {
              retrieval::AppendRequest req;
              req.sequence_id = specs[b].sequence_id;
              req.layer = l;
              req.kv_head = g;
              req.first_position = pos - w;
              req.keys = ConstMatrixView(k_row.data() + static_cast<size_t>(g) * d, 1, d);
              req.values = ConstMatrixView(v_row.data() + static_cast<size_t>(g) * d, 1, d);
              if (batching) {
                append_items.push_back({std::move(req), absl::OkStatus()});
              } else {
                waiters.push_back(std::make_unique<retrieval::StatusWaiter>());
                node->AppendAsync(req, waiters.back()->callback());
              }
            }
            runs[b] = {static_cast<int64_t>(b), 1, ks, vs, nullptr};
          }
          absl::Status appended;
          if (batching) {
            appended = node->AppendBatch(append_items);
            for (const retrieval::AppendBatchItem& item : append_items) {
              if (appended.ok()) appended = item.status;
            }
          }
          for (auto& waiter : waiters) {  // always wait: the node reads the rows
            absl::Status st = waiter->Wait();
            if (appended.ok()) appended = std::move(st);
          }
          KVR_RETURN_IF_ERROR(appended);
          append_s += Since(a);
          return std::span<const KvRun>(runs);
        },
        // Every sequence's node partial (AttendAsync) while the worker
        // computes the local ones, then one merge over the batch.
        [&](int l, const Tensor& q, const Tensor& o) -> absl::Status {
          KVR_RETURN_IF_ERROR(backend_->DownloadF32(q, q_host));
          std::vector<retrieval::StatusWaiter> waiters(batching ? 1 : nb);
          std::vector<retrieval::AttendRequest> reqs(nb);
          attend_items.clear();
          for (size_t b = 0; b < nb; ++b) {
            reqs[b].sequence_id = specs[b].sequence_id;
            reqs[b].layer = l;
            reqs[b].queries = ConstMatrixView(q_host.data() + b * static_cast<size_t>(c.q_dim()),
                                              static_cast<size_t>(c.n_heads), d);
            reqs[b].k = top_k;
            if (batching) {
              attend_items.push_back({reqs[b], partials[b].view(), nullptr, absl::OkStatus()});
            } else {
              node->AttendAsync(reqs[b], partials[b].view(), nullptr, waiters[b].callback());
            }
          }
          if (batching) node->AttendBatchAsync(attend_items, waiters[0].callback());
          absl::Status local_st;
          for (int b = 0; b < batch && local_st.ok(); ++b) {
            local_st = backend_->PartialAttention(q.Rows(b, 1), k[static_cast<size_t>(l)][static_cast<size_t>(b)],
                                                  v[static_cast<size_t>(l)][static_cast<size_t>(b)],
                                                  c.attention_shape(), local, 0, local, o.Rows(b, 1),
                                                  m1.Rows(b, 1), l1.Rows(b, 1));
          }
          const Clock::time_point wait = Clock::now();
          absl::Status remote_st;
          for (retrieval::StatusWaiter& waiter : waiters) {  // always wait: the node writes
            absl::Status st = waiter.Wait();
            if (remote_st.ok()) remote_st = st;
          }
          for (const retrieval::AttendBatchItem& item : attend_items) {
            if (remote_st.ok()) remote_st = item.status;
          }
          wait_s += Since(wait);
          KVR_RETURN_IF_ERROR(local_st);
          KVR_RETURN_IF_ERROR(remote_st);
          const Clock::time_point merge = Clock::now();
          const size_t qd = static_cast<size_t>(c.q_dim()), h = static_cast<size_t>(c.n_heads);
          for (size_t b = 0; b < nb; ++b) {
            std::copy_n(partials[b].o.data.data(), qd, o2_host.begin() + static_cast<std::ptrdiff_t>(b * qd));
            std::copy_n(partials[b].m.data(), h, m2_host.begin() + static_cast<std::ptrdiff_t>(b * h));
            std::copy_n(partials[b].l.data(), h, l2_host.begin() + static_cast<std::ptrdiff_t>(b * h));
          }
          KVR_RETURN_IF_ERROR(backend_->UploadF32(o2_host, o2));
          KVR_RETURN_IF_ERROR(backend_->UploadF32(m2_host, m2));
          KVR_RETURN_IF_ERROR(backend_->UploadF32(l2_host, l2));
          KVR_RETURN_IF_ERROR(backend_->MergeAttention(o, m1, l1, o2, m2, l2, c.head_dim));
          merge_s += Since(merge);
          return absl::OkStatus();
        });
    for (size_t variant = 0; variant < batchings.size(); ++variant) {
      batching = batchings[variant];
      row = proto;
      row.attend_batching = batching ? "on" : "off";
      row.search_threads = search_threads_;
      row.fill = prefilled() ? "prefill" : "synthetic";
      row.setup_s = setup_s;
      const int64_t first = context + static_cast<int64_t>(variant) * (Steps() + 1);
      std::vector<std::vector<float>> logits(static_cast<size_t>(Steps()));
      std::vector<float> warm;
      double cpu0 = 0;
      for (int step = -1; step < Steps(); ++step) {
        if (step == 0) {
          cpu0 = nodes ? nodes->CpuSeconds() : ThreadsCpuSeconds(node_tids);
          wait_s = merge_s = append_s = 0;
        }
        pos = first + step + 1;
        slot = s + (pos - s) % w;
        const Clock::time_point start = Clock::now();
        KVR_RETURN_IF_ERROR(Forward(static_cast<int>(pos - context - 1), batch, pos, hook));
        KVR_RETURN_IF_ERROR(Classify(step >= 0 ? logits[static_cast<size_t>(step)] : warm));
        if (step >= 0) row.step_s += Since(start) / Steps();
      }
      const double cpu1 = nodes ? nodes->CpuSeconds() : ThreadsCpuSeconds(node_tids);
      row.wait_s = wait_s / Steps();
      row.merge_s = merge_s / Steps();
      row.append_s = append_s / Steps();
      row.compute_s = row.step_s - row.wait_s - row.merge_s - row.append_s;
      row.node_cpu_s_per_token = (cpu1 - cpu0) / (static_cast<double>(Steps()) * batch);
      row.worker_rss_bytes = RssBytes(0);
      row.node_rss_bytes = nodes ? nodes->RssBytes() : -1;
      // Weights + the local K/V + the retrieved keys and values (the index's
      // own reads, e.g. IVF centroids and lists scanned, are not counted).
      const double value_bytes = value_dtype_ == DType::kF32 ? 4 : 2;
      row.bytes_per_step =
          weight_bytes_ + static_cast<double>(batch) * c.n_layers *
                              (static_cast<double>(local) * static_cast<double>(kv) * 8 +
                               static_cast<double>(c.n_heads) * top_k * c.head_dim * (4 + value_bytes));
      Compare(row, logits, static_cast<size_t>(first - context));
      out->push_back(row);
    }
    for (const retrieval::SequenceSpec& spec : specs) {
      KVR_RETURN_IF_ERROR(node->DropSequence(spec.sequence_id));
    }
    return absl::OkStatus();
  }

  ThreadPool pool_{std::max(1u, std::thread::hardware_concurrency())};
  std::shared_ptr<const worker::LlamaWeights> weights_;
  std::unique_ptr<Backend> backend_;
  worker::DeviceWeights w_;
  worker::LlamaBlock block_;       // over w_
  worker::BlockActivations act_;   // batch rows
  Tensor logits_;
  double weight_bytes_ = 0;        // read per step (layers + classifier)
  int weight_bytes_per_param_ = 2;
  double bandwidth_ = 0;           // bytes/s
  retrieval::IndexType index_ = retrieval::IndexType::kIvf;
  DType value_dtype_ = DType::kBf16;
  std::map<LogitKey, std::vector<std::vector<float>>> reference_;
  int variants_ = 1;  // retrieval variants per shape (--attend_batching entries)
  int search_threads_ = 0;  // the nodes' --search_threads (set_search_threads)
  // Prefill (Prefill): per layer, the K and V rows [prefill_rows_ x kv_dim]; empty: synthetic.
  std::vector<std::vector<float>> prefill_k_, prefill_v_;
  int64_t prefill_rows_ = 0;
};

std::string JsonRow(const Row& r, int layers) {
  return absl::StrFormat(
      "{\"mode\": \"%s\", \"attend_batching\": \"%s\", \"search_threads\": %d, \"fill\": \"%s\", "
      "\"context\": %d, \"batch\": %d, \"layers\": %d, "
      "\"tokens_per_second\": %.6g, \"step_s\": %.6g, \"worker_compute_s\": %.6g, "
      "\"retrieval_wait_s\": %.6g, \"merge_s\": %.6g, \"append_s\": %.6g, "
      "\"node_cpu_s_per_token\": %.6g, \"worker_rss_bytes\": %d, \"node_rss_bytes\": %d, "
      "\"bytes_per_step\": %.6g, \"bound_tokens_per_second\": %.6g, \"setup_s\": %.6g, "
      "\"max_abs_logit_diff\": %.6g, \"logits_max_abs\": %.6g, \"top1_agreement\": %.6g, "
      "\"note\": \"%s\"}",
      r.mode, r.attend_batching, r.search_threads, r.fill, r.context, r.batch, layers, r.tokens_per_second, r.step_s, r.compute_s, r.wait_s,
      r.merge_s, r.append_s, r.node_cpu_s_per_token, r.worker_rss_bytes, r.node_rss_bytes,
      r.bytes_per_step, r.bound_tokens_per_second, r.setup_s, r.max_abs_logit_diff,
      r.logits_max_abs, r.top1_agreement, absl::StrReplaceAll(r.note, {{"\"", "'"}, {"\\", "/"}}));
}

// The row's search_threads column: "-" for full attention.
std::string SearchThreadsText(const Row& r) {
  return r.search_threads < 0 ? "-" : absl::StrCat(r.search_threads);
}

absl::Status Run() {
  KVR_ASSIGN_OR_RETURN(const std::vector<int64_t> contexts,
                       bench::ParseIntList("contexts", absl::GetFlag(FLAGS_contexts), 1024,
                                           int64_t{1} << 20));
  KVR_ASSIGN_OR_RETURN(const std::vector<int64_t> batches,
                       bench::ParseIntList("batches", absl::GetFlag(FLAGS_batches), 1, 256));
  std::vector<std::string> modes;
  for (absl::string_view m : absl::StrSplit(absl::GetFlag(FLAGS_modes), ',')) {
    if (m != "full" && m != "retrieval" && m != "grpc" && m != "ucx") {
      return absl::InvalidArgumentError(absl::StrCat(
          "--modes: \"", m, "\" is not one of full, retrieval, grpc, ucx"));
    }
    modes.emplace_back(m);
  }
  std::vector<bool> batchings;
  for (absl::string_view b : absl::StrSplit(absl::GetFlag(FLAGS_attend_batching), ',')) {
    if (b != "on" && b != "off") {
      return absl::InvalidArgumentError(
          absl::StrCat("--attend_batching: \"", b, "\" is not on or off"));
    }
    batchings.push_back(b == "on");
  }
  std::vector<int64_t> prefill_contexts;
  if (!absl::GetFlag(FLAGS_prefill_contexts).empty()) {
    KVR_ASSIGN_OR_RETURN(prefill_contexts,
                         bench::ParseIntList("prefill_contexts",
                                             absl::GetFlag(FLAGS_prefill_contexts), 1024, 65536));
  }
  KVR_ASSIGN_OR_RETURN(const std::vector<int64_t> search_threads,
                       bench::ParseIntList("search_threads", absl::GetFlag(FLAGS_search_threads),
                                           0, 256));
  if (const int s = absl::GetFlag(FLAGS_steps); s < 1 || s > 1000) {
    return absl::InvalidArgumentError(absl::StrCat("--steps ", s, " outside [1, 1000]"));
  }
  if (const int l = absl::GetFlag(FLAGS_layers); l < 1 || l > 32) {
    return absl::InvalidArgumentError(absl::StrCat("--layers ", l, " outside [1, 32]"));
  }
  if (const int v = absl::GetFlag(FLAGS_vocab); v < 256 || v > 128256) {
    return absl::InvalidArgumentError(absl::StrCat("--vocab ", v, " outside [256, 128256]"));
  }
  if (const int n = absl::GetFlag(FLAGS_nodes); n < 1 || n > 16) {
    return absl::InvalidArgumentError(absl::StrCat("--nodes ", n, " outside [1, 16]"));
  }
  if (const int k = absl::GetFlag(FLAGS_top_k); k < 1 || k > 4096) {
    return absl::InvalidArgumentError(absl::StrCat("--top_k ", k, " outside [1, 4096]"));
  }
  if (absl::GetFlag(FLAGS_memory_budget_bytes) < 1) {
    return absl::InvalidArgumentError("--memory_budget_bytes must be >= 1");
  }
  Bench bench;
  KVR_RETURN_IF_ERROR(bench.ParseNodeFlags());
  KVR_RETURN_IF_ERROR(bench.Init());
  const int layers = bench.config().n_layers;
  std::printf("%u CPU threads; load average at start: ", std::thread::hardware_concurrency());
  {
    std::ifstream la("/proc/loadavg");
    std::string text;
    std::getline(la, text);
    std::printf("%s\n\n", text.c_str());
  }
  std::printf("%-9s %3s %3s %7s %5s | %9s %8s | %8s %8s %8s %8s | %8s %7s %7s | %9s %5s | %s\n",
              "mode", "bat", "st", "context", "batch", "tok/s", "bound", "step s", "compute", "wait", "merge",
              "nodeCPU/t", "wRSS", "nRSS", "logit d", "top1", "note");
  std::vector<Row> rows;
  // Every (context, batch, mode) row of `shape_contexts` (the context filled
  // as the bench is set: synthetic, or the prefill).
  auto run_shapes = [&](const std::vector<int64_t>& shape_contexts) -> absl::Status {
    for (int64_t context : shape_contexts) {
      for (int64_t batch : batches) {
        for (const std::string& mode : modes) {
          std::vector<Row> shape_rows;
          for (size_t t = 0; t < (mode == "full" ? 1 : search_threads.size()); ++t) {
            bench.set_search_threads(static_cast<int>(search_threads[t]));
            KVR_ASSIGN_OR_RETURN(std::vector<Row> one,
                                 bench.Run(mode, context, static_cast<int>(batch), batchings));
            for (Row& r : one) shape_rows.push_back(std::move(r));
          }
          for (Row& r : shape_rows) {
            const std::string note =
                r.fill == "prefill" ? absl::StrCat("prefill ", r.note) : r.note;
            if (r.step_s <= 0) {
              std::printf("%-9s %3s %3s %7lld %5d | %s\n", r.mode.c_str(),
                          r.attend_batching.c_str(), SearchThreadsText(r).c_str(),
                          static_cast<long long>(context), r.batch, note.c_str());
            } else {
              std::printf("%-9s %3s %3s %7lld %5d | %9.2f %8.2f | %8.4f %8.4f %8.4f %8.4f | "
                          "%8.4f %6.1fG %6.1fG | %9.2g %5.2f | %s\n",
                          r.mode.c_str(), r.attend_batching.c_str(),
                          SearchThreadsText(r).c_str(), static_cast<long long>(context), r.batch,
                          r.tokens_per_second, r.bound_tokens_per_second, r.step_s, r.compute_s,
                          r.wait_s, r.merge_s + r.append_s, r.node_cpu_s_per_token,
                          r.worker_rss_bytes / double(1 << 30),
                          std::max<int64_t>(0, r.node_rss_bytes) / double(1 << 30),
                          r.max_abs_logit_diff, r.top1_agreement, note.c_str());
            }
            std::fflush(stdout);
            rows.push_back(std::move(r));
          }
        }
      }
    }
    return absl::OkStatus();
  };
  KVR_RETURN_IF_ERROR(run_shapes(contexts));
  for (int64_t p : prefill_contexts) {
    KVR_RETURN_IF_ERROR(bench.Prefill(p));
    KVR_RETURN_IF_ERROR(run_shapes({p}));
    bench.ClearPrefill();
  }
  std::printf("\nper decode step (one token of every sequence): compute = the worker's own work "
              "(layers, local partials, classifier); wait = blocked on the nodes after the local "
              "partials; merge = LSE merge + the appends of tokens leaving the window; bound = "
              "tokens/s if the step only streamed its weights and K/V at the measured "
              "bandwidth; logit d = max |logit - full attention's| at the same shape (and "
              "fill), top1 = share of next tokens equal to full attention's; prefill rows: "
              "the context filled by a real prefill (--prefill_contexts).\n");
  const std::string json = absl::GetFlag(FLAGS_json);
  if (!json.empty()) {
    std::vector<std::string> texts;
    for (const Row& r : rows) texts.push_back(JsonRow(r, layers));
    KVR_RETURN_IF_ERROR(bench::WriteJsonRows(json, texts));
  }
  return absl::OkStatus();
}

}  // namespace
}  // namespace kvr

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("CPU decode tokens/s vs context: full vs retrieval attention "
                               "(see the file comment)");
  absl::ParseCommandLine(argc, argv);
  const absl::Status st = kvr::Run();
  if (!st.ok()) {
    std::fprintf(stderr, "decode_bench: %s\n", std::string(st.message()).c_str());
    return 1;
  }
  return 0;
}
