// gpu_decode_bench: decode seconds per token at long context on the CUDA
// backend, Llama-3-8B shape with random weights, batch 1, three ways side by
// side in one run (issue [cuda] benchmarks):
//   * gpu:       full attention, the whole KV cache in GPU memory (skipped
//                when it does not fit);
//   * stream:    full attention with the KV cache in pinned host memory,
//                copied to the GPU layer by layer every token (the offloading
//                baseline);
//   * retrieval: RetrievalAttention — sinks + window on the GPU, the rest on
//                an in-process retrieval node using the CPU cores; per layer
//                the query goes to the node (AttendAsync) while the GPU
//                computes the static-pattern partial, then the LSE merge,
//                and the token leaving the window is appended to the node.
// Breakdown per token (paper-style): attention (GPU attention, incl. the KV
// copies in stream mode and the partial + merge in retrieval mode),
// retrieval (blocked on the node after the local partial; "node" is the
// node's own Attend time), other (projections, FFN, norms, classifier).
// The layers are the worker's LlamaBlock; the attention part is the
// RetrievalEngine's decode step (DESIGN §1) on the Backend ops directly (the
// bench's AttentionHooks), over a synthetic KV cache of the given
// context (random keys/values: prefilling 128K+ tokens of a random model
// would take far longer and measures nothing more). The stream is
// synchronised around the attention part of every layer to time it, which
// adds a few microseconds per layer to every mode.
//
//   gpu_decode_bench [--contexts=32768,131072] [--layers=32] [--modes=gpu,stream,retrieval]
//                    [--steps=8] [--node_threads=0] [--index=graph] [--top_k=100]
//                    [--value_dtype=bf16] [--weights=bf16] [--json=out.json]
//   1M context: --contexts=1048576 --layers=4 (bf16 values on the node).
//
// Without a CUDA device it prints why and exits 0 (nothing measured).
// gpu_decode_bench_emulated is the same program on the CPU emulator of CUDA
// (gpu_worker/backend/cuda/emulator): a check that the benchmark runs end to
// end (a test runs it at the smallest shape); its timings mean nothing.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "bench/decode_common.h"
#include "common/attention.h"
#include "common/status.h"
#include "common/thread_pool.h"
#include "common/value_matrix.h"
#include "gpu_worker/backend/backend.h"
#include "gpu_worker/backend/cuda/cuda_api.h"
#include "gpu_worker/backend/cuda/cuda_backend.h"
#include "gpu_worker/model/device_weights.h"
#include "gpu_worker/model/llama_block.h"
#include "gpu_worker/model/random_weights.h"
#include "retrieval_node/client/in_process_client.h"

ABSL_FLAG(std::string, contexts, "32768,131072", "context lengths (tokens in the KV cache)");
ABSL_FLAG(int, layers, 32, "layers of the Llama-3-8B shape (32 = the real model)");
ABSL_FLAG(std::string, modes, "gpu,stream,retrieval", "modes to run");
ABSL_FLAG(int, steps, 8, "decode steps timed per mode and context (after one warm-up step)");
ABSL_FLAG(int, node_threads, 0, "retrieval node threads (0: all cores but one)");
ABSL_FLAG(std::string, index, "graph", "node index: graph, ivf, flat");
ABSL_FLAG(int, top_k, 100, "keys retrieved per query head (and chunk)");
ABSL_FLAG(int, sinks, 128, "sink tokens on the GPU");
ABSL_FLAG(int, window, 512, "recent tokens on the GPU");
ABSL_FLAG(int64_t, chunk_tokens, 131072, "tokens per node shard of one (layer, kv head)");
ABSL_FLAG(std::string, value_dtype, "bf16", "how the node stores values: f32, bf16, f16");
ABSL_FLAG(std::string, weights, "bf16", "weight storage: bf16 or f32");
ABSL_FLAG(int, device, 0, "CUDA device");
ABSL_FLAG(std::string, json, "", "write the rows as JSON to this file");

namespace kvr {
namespace {

using bench::Clock;
using bench::Fill;
using bench::Since;
using worker::AttentionHookFns;
using worker::Backend;
using worker::KvRun;
using worker::Tensor;

// Pinned host memory (the streaming baseline copies from it at full PCIe /
// NVLink-C2C bandwidth).
struct PinnedBuffer {
  float* data = nullptr;
  size_t n = 0;
  absl::Status Allocate(size_t count) {
    void* p = nullptr;
    if (cudaError_t e = cudaMallocHost(&p, count * sizeof(float)); e != cudaSuccess) {
      return absl::ResourceExhaustedError(absl::StrCat("cudaMallocHost(", count * sizeof(float),
                                                       " bytes): ", cudaGetErrorString(e)));
    }
    data = static_cast<float*>(p);
    n = count;
    return absl::OkStatus();
  }
  ~PinnedBuffer() {
    if (data != nullptr) cudaFreeHost(data);
  }
};

struct Breakdown {
  std::string mode;
  int64_t context = 0;
  double total = 0, attention = 0, retrieval = 0, node = 0;
  double gpu_kv_fraction = 1.0;  // share of the KV held on the GPU
  std::string note;
};

class Bench {
 public:
  absl::Status Init() {
    const worker::LlamaConfig c = bench::Llama3_8BConfig();
    worker::RandomWeightsOptions wo;
    wo.n_layers_override = absl::GetFlag(FLAGS_layers);
    const std::string wd = absl::GetFlag(FLAGS_weights);
    if (wd != "bf16" && wd != "f32") {
      return absl::InvalidArgumentError(absl::StrCat("--weights: \"", wd, "\" is not bf16 or f32"));
    }
    wo.dtype = wd == "bf16" ? DType::kBf16 : DType::kF32;
    wo.pool = &pool_;
    const Clock::time_point t = Clock::now();
    KVR_ASSIGN_OR_RETURN(weights_, worker::MakeRandomWeights(c, wo));
    worker::BackendOptions bo;
    bo.device = absl::GetFlag(FLAGS_device);
    KVR_ASSIGN_OR_RETURN(backend_, worker::BackendRegistry::Create("cuda", bo));
    KVR_ASSIGN_OR_RETURN(w_, worker::DeviceWeights::Import(backend_.get(), *weights_));
    const worker::LlamaConfig& cfg = weights_->config;
    block_ = worker::LlamaBlock(backend_.get(), &cfg, &w_);
    KVR_ASSIGN_OR_RETURN(act_, worker::BlockActivations::Allocate(*backend_, cfg, 1, 1));
    auto rows = [&](int64_t cols) { return backend_->Allocate(DType::kF32, 1, cols); };
    KVR_ASSIGN_OR_RETURN(o2_, rows(cfg.q_dim()));
    KVR_ASSIGN_OR_RETURN(m_, rows(cfg.n_heads));
    KVR_ASSIGN_OR_RETURN(l_, rows(cfg.n_heads));
    KVR_ASSIGN_OR_RETURN(m2_, rows(cfg.n_heads));
    KVR_ASSIGN_OR_RETURN(l2_, rows(cfg.n_heads));
    KVR_ASSIGN_OR_RETURN(logits_, rows(cfg.vocab_size));
    KVR_RETURN_IF_ERROR(backend_->Synchronize());
    std::printf("model: Llama-3-8B shape, %d layers, %s weights (random), built in %.1f s\n",
                cfg.n_layers, wd.c_str(), Since(t));
    return absl::OkStatus();
  }

  const worker::LlamaConfig& config() const { return weights_->config; }

  // Full attention over [0, context] with the cache on the GPU (stream: the
  // cache is copied from pinned host memory before each layer's attention).
  absl::StatusOr<Breakdown> RunFull(int64_t context, bool stream) {
    const worker::LlamaConfig& c = config();
    Breakdown out;
    out.mode = stream ? "stream" : "gpu";
    out.context = context;
    const size_t kv = static_cast<size_t>(c.kv_dim());
    const int64_t rows = context + 1;
    const int layers_on_gpu = stream ? 1 : c.n_layers;
    size_t free_bytes = 0, total_bytes = 0;
    cudaMemGetInfo(&free_bytes, &total_bytes);
    const double need = 2.0 * layers_on_gpu * rows * kv * sizeof(float);
    if (need > 0.9 * static_cast<double>(free_bytes)) {
      out.note = absl::StrFormat("KV %.1f GiB does not fit (%.1f GiB free)", need / (1 << 30),
                                 free_bytes / double(1 << 30));
      return out;
    }
    // gpu: one cache per layer (real memory use); stream: one device buffer
    // reused by every layer, refilled from the host copy.
    std::vector<Tensor> k(layers_on_gpu), v(layers_on_gpu);
    PinnedBuffer host_k, host_v;
    if (stream) {
      KVR_RETURN_IF_ERROR(host_k.Allocate(static_cast<size_t>(context) * kv));
      KVR_RETURN_IF_ERROR(host_v.Allocate(static_cast<size_t>(context) * kv));
      Fill(pool_, host_k.data, host_k.n, 1);
      Fill(pool_, host_v.data, host_v.n, 2);
    }
    {
      std::vector<float> init(static_cast<size_t>(context) * kv);
      Fill(pool_, init.data(), init.size(), 1);
      for (int l = 0; l < layers_on_gpu; ++l) {
        KVR_ASSIGN_OR_RETURN(k[l], backend_->Allocate(DType::kF32, rows, c.kv_dim()));
        KVR_ASSIGN_OR_RETURN(v[l], backend_->Allocate(DType::kF32, rows, c.kv_dim()));
        if (!stream) {
          KVR_RETURN_IF_ERROR(backend_->UploadF32(init, k[l].Rows(0, context)));
          KVR_RETURN_IF_ERROR(backend_->UploadF32(init, v[l].Rows(0, context)));
        }
      }
    }
    // The new token's k / v go to row `context` of the layer's cache, and
    // the attention over [0, context] is timed on its own.
    double attention = 0;
    KvRun new_kv;  // the new token's k / v row
    auto full_attention = AttentionHookFns(
        [&](int l) -> absl::StatusOr<std::span<const KvRun>> {
          const int cl = stream ? 0 : l;
          new_kv = {0, 1, k[cl].Rows(context, 1), v[cl].Rows(context, 1), nullptr};
          return std::span<const KvRun>(&new_kv, 1);
        },
        [&](int l, const Tensor& q, const Tensor& o) -> absl::Status {
          const int cl = stream ? 0 : l;
          KVR_RETURN_IF_ERROR(backend_->Synchronize());
          const Clock::time_point a = Clock::now();
          if (stream) {
            KVR_RETURN_IF_ERROR(
                backend_->UploadF32({host_k.data, host_k.n}, k[0].Rows(0, context)));
            KVR_RETURN_IF_ERROR(
                backend_->UploadF32({host_v.data, host_v.n}, v[0].Rows(0, context)));
          }
          KVR_RETURN_IF_ERROR(
              backend_->Attention(q, k[cl], v[cl], c.attention_shape(), context, o));
          KVR_RETURN_IF_ERROR(backend_->Synchronize());
          attention += Since(a);
          return absl::OkStatus();
        });
    const int steps = absl::GetFlag(FLAGS_steps);
    for (int step = -1; step < steps; ++step) {  // step -1: warm-up
      attention = 0;
      const Clock::time_point start = Clock::now();
      KVR_RETURN_IF_ERROR(Embed(step));
      const int32_t pos = static_cast<int32_t>(context);
      for (int l = 0; l < c.n_layers; ++l) {
        KVR_RETURN_IF_ERROR(
            block_.Forward(l, std::span<const int32_t>(&pos, 1), act_, full_attention));
      }
      KVR_RETURN_IF_ERROR(Classify());
      if (step >= 0) {
        out.total += Since(start) / steps;
        out.attention += attention / steps;
      }
    }
    out.gpu_kv_fraction = stream ? 1.0 / c.n_layers : 1.0;  // one layer's KV resident at a time
    return out;
  }

  // Retrieval attention: sinks + window on the GPU, [sinks, context - window)
  // on the in-process node.
  absl::StatusOr<Breakdown> RunRetrieval(int64_t context) {
    const worker::LlamaConfig& c = config();
    Breakdown out;
    out.mode = "retrieval";
    out.context = context;
    const int64_t s = absl::GetFlag(FLAGS_sinks), w = absl::GetFlag(FLAGS_window);
    if (context <= s + w) return absl::InvalidArgumentError("context <= sinks + window");
    const size_t kv = static_cast<size_t>(c.kv_dim()), d = static_cast<size_t>(c.head_dim);
    const int64_t mid = context - s - w;
    KVR_ASSIGN_OR_RETURN(retrieval::IndexType index,
                         retrieval::ParseIndexType(absl::GetFlag(FLAGS_index)));
    KVR_ASSIGN_OR_RETURN(kvr::DType value_dtype, kvr::ParseDType(absl::GetFlag(FLAGS_value_dtype)));
    retrieval::NodeCoreOptions no;
    int node_threads = absl::GetFlag(FLAGS_node_threads);
    if (node_threads <= 0) {
      node_threads = std::max(1, static_cast<int>(std::thread::hardware_concurrency()) - 1);
    }
    no.threads = static_cast<size_t>(node_threads);
    KVR_ASSIGN_OR_RETURN(auto node, retrieval::InProcessRetrievalClient::Create(no));
    retrieval::SequenceSpec spec;
    spec.sequence_id = 1;
    spec.n_layers = c.n_layers;
    spec.n_heads = c.n_heads;
    spec.n_kv_heads = c.n_kv_heads;
    spec.head_dim = c.head_dim;
    spec.value_dtype = value_dtype;
    spec.index_type = index;
    KVR_RETURN_IF_ERROR(node->CreateSequence(spec));

    // The node's part: the same synthetic keys/values for every (layer, kv
    // head), uploaded in chunks, (layer, head, chunk) uploads in parallel.
    const Clock::time_point build = Clock::now();
    std::vector<float> keys(static_cast<size_t>(mid) * kv), values(keys.size());
    Fill(pool_, keys.data(), keys.size(), 1);
    Fill(pool_, values.data(), values.size(), 2);
    const int64_t chunk = std::max<int64_t>(1, absl::GetFlag(FLAGS_chunk_tokens));
    const int64_t chunks = (mid + chunk - 1) / chunk;
    std::atomic<int> failed{0};
    absl::Status first_error;
    std::mutex error_mu;
    {
      ThreadPool uploads(static_cast<size_t>(node_threads));
      for (int l = 0; l < c.n_layers; ++l) {
        for (int g = 0; g < c.n_kv_heads; ++g) {
          uploads.Schedule([&, l, g] {
            for (int64_t ci = 0; ci < chunks; ++ci) {
              const int64_t begin = ci * chunk, n = std::min(chunk, mid - begin);
              retrieval::ShardUpload up;
              up.key = {spec.sequence_id, l, g, static_cast<int32_t>(ci)};
              up.first_position = s + begin;
              up.keys = ConstMatrixView(keys.data() + begin * kv + g * d, n, d, kv);
              up.values = ConstMatrixView(values.data() + begin * kv + g * d, n, d, kv);
              if (absl::Status st = node->UploadShard(up); !st.ok()) {
                std::lock_guard<std::mutex> lock(error_mu);
                if (failed.fetch_add(1) == 0) first_error = st;
                return;
              }
            }
          });
        }
      }
    }  // joins
    if (failed.load() != 0) return first_error;
    std::printf("  node: %lld tokens x %d layers x %d kv heads in %lld chunk(s) each, %s index, "
                "built in %.1f s on %d threads\n",
                static_cast<long long>(mid), c.n_layers, c.n_kv_heads,
                static_cast<long long>(chunks),
                std::string(retrieval::IndexTypeName(index)).c_str(), Since(build), node_threads);
    std::fflush(stdout);

    // GPU: the static pattern per layer (sinks, then the window ring).
    const int64_t local = s + w;
    std::vector<Tensor> k(c.n_layers), v(c.n_layers);
    {
      std::vector<float> init(static_cast<size_t>(local) * kv);
      Fill(pool_, init.data(), init.size(), 3);
      for (int l = 0; l < c.n_layers; ++l) {
        KVR_ASSIGN_OR_RETURN(k[l], backend_->Allocate(DType::kF32, local, c.kv_dim()));
        KVR_ASSIGN_OR_RETURN(v[l], backend_->Allocate(DType::kF32, local, c.kv_dim()));
        KVR_RETURN_IF_ERROR(backend_->UploadF32(init, k[l]));
        KVR_RETURN_IF_ERROR(backend_->UploadF32(init, v[l]));
      }
    }
    Partials partials(static_cast<size_t>(c.n_heads), d);
    std::vector<float> q_host(static_cast<size_t>(c.q_dim()));
    std::vector<float> k_row(kv), v_row(kv);
    const int steps = absl::GetFlag(FLAGS_steps);
    const int top_k = absl::GetFlag(FLAGS_top_k);
    int64_t node_end = s + mid;  // the node holds [s, node_end)
    int64_t slot = 0;             // this step's ring slot (of pos, and of pos - w, leaving)
    double attention = 0, retrieval_wait = 0, node_time = 0;
    KvRun new_kv;  // the new token's k / v row
    auto retrieval_attention = AttentionHookFns(
        // The token leaving the window goes to the node (per kv head), then
        // the new token's k / v take its slot.
        [&](int l) -> absl::StatusOr<std::span<const KvRun>> {
          const Tensor k_slot = k[l].Rows(slot, 1), v_slot = v[l].Rows(slot, 1);
          KVR_RETURN_IF_ERROR(backend_->DownloadF32(k_slot, k_row));
          KVR_RETURN_IF_ERROR(backend_->DownloadF32(v_slot, v_row));
          for (int g = 0; g < c.n_kv_heads; ++g) {
            retrieval::AppendRequest req;
            req.sequence_id = spec.sequence_id;
            req.layer = l;
            req.kv_head = g;
            req.first_position = node_end;
            req.keys = ConstMatrixView(k_row.data() + g * d, 1, d);
            req.values = ConstMatrixView(v_row.data() + g * d, 1, d);
            KVR_RETURN_IF_ERROR(node->Append(req));
          }
          new_kv = {0, 1, k_slot, v_slot, nullptr};
          return std::span<const KvRun>(&new_kv, 1);
        },
        // The node's top-k partial (AttendAsync) while the GPU computes the
        // static pattern's, then the merge.
        [&](int l, const Tensor& q, const Tensor& o) -> absl::Status {
          KVR_RETURN_IF_ERROR(backend_->DownloadF32(q, q_host));  // waits for q
          const Clock::time_point a = Clock::now();
          retrieval::StatusWaiter waiter;
          retrieval::AttendRequest req;
          req.sequence_id = spec.sequence_id;
          req.layer = l;
          req.queries = ConstMatrixView(q_host.data(), static_cast<size_t>(c.n_heads), d);
          req.k = top_k;
          std::atomic<int64_t> node_ns{0};
          auto done = waiter.callback();
          node->AttendAsync(req, partials.view(), nullptr,
                            [&node_ns, a, done = std::move(done)](absl::Status st) {
                              node_ns = std::chrono::duration_cast<std::chrono::nanoseconds>(
                                            Clock::now() - a)
                                            .count();
                              done(std::move(st));
                            });
          absl::Status local_st = backend_->PartialAttention(q, k[l], v[l], c.attention_shape(),
                                                             local, 0, local, o, m_, l_);
          if (local_st.ok()) local_st = backend_->Synchronize();
          attention += Since(a);
          // Always wait: the node writes into `partials` and `node_ns`.
          const Clock::time_point wait = Clock::now();
          const absl::Status remote_st = waiter.Wait();
          retrieval_wait += Since(wait);
          KVR_RETURN_IF_ERROR(local_st);
          KVR_RETURN_IF_ERROR(remote_st);
          node_time += static_cast<double>(node_ns.load()) * 1e-9;
          const Clock::time_point merge = Clock::now();
          KVR_RETURN_IF_ERROR(backend_->UploadF32(partials.o.data, o2_));
          KVR_RETURN_IF_ERROR(backend_->UploadF32(partials.m, m2_));
          KVR_RETURN_IF_ERROR(backend_->UploadF32(partials.l, l2_));
          KVR_RETURN_IF_ERROR(backend_->MergeAttention(o, m_, l_, o2_, m2_, l2_, c.head_dim));
          KVR_RETURN_IF_ERROR(backend_->Synchronize());
          attention += Since(merge);
          return absl::OkStatus();
        });
    for (int step = -1; step < steps; ++step) {
      const int64_t pos = context + step + 1;
      slot = s + (pos - s) % w;
      attention = retrieval_wait = node_time = 0;
      const Clock::time_point start = Clock::now();
      KVR_RETURN_IF_ERROR(Embed(step));
      const int32_t pos32 = static_cast<int32_t>(pos);
      for (int l = 0; l < c.n_layers; ++l) {
        KVR_RETURN_IF_ERROR(
            block_.Forward(l, std::span<const int32_t>(&pos32, 1), act_, retrieval_attention));
      }
      ++node_end;
      KVR_RETURN_IF_ERROR(Classify());
      if (step >= 0) {
        out.total += Since(start) / steps;
        out.attention += attention / steps;
        out.retrieval += retrieval_wait / steps;
        out.node += node_time / steps;
      }
    }
    out.gpu_kv_fraction = static_cast<double>(local) / static_cast<double>(context);
    KVR_RETURN_IF_ERROR(node->DropSequence(spec.sequence_id));
    return out;
  }

 private:
  absl::Status Embed(int step) {
    const int32_t token = static_cast<int32_t>((1000 + 7919 * (step + 1)) % config().vocab_size);
    return block_.Embed(std::span<const int32_t>(&token, 1), act_.x);
  }

  absl::Status Classify() {
    KVR_RETURN_IF_ERROR(block_.Logits(act_.x, act_.xb, logits_));
    int32_t next = 0;
    return backend_->Argmax(logits_, std::span<int32_t>(&next, 1));  // waits for the step
  }

  ThreadPool pool_{std::max(1u, std::thread::hardware_concurrency())};
  std::shared_ptr<const worker::LlamaWeights> weights_;
  std::unique_ptr<Backend> backend_;
  worker::DeviceWeights w_;
  worker::LlamaBlock block_;  // over w_
  worker::BlockActivations act_;  // one row
  Tensor o2_, m_, l_, m2_, l2_, logits_;
};

absl::Status Run() {
  KVR_ASSIGN_OR_RETURN(const std::vector<int64_t> contexts,
                       bench::ParseIntList("contexts", absl::GetFlag(FLAGS_contexts), 1024,
                                           int64_t{1} << 22));
  std::vector<std::string> modes;
  for (absl::string_view m : absl::StrSplit(absl::GetFlag(FLAGS_modes), ',')) {
    if (m != "gpu" && m != "stream" && m != "retrieval") {
      return absl::InvalidArgumentError(
          absl::StrCat("--modes: \"", std::string(m), "\" is not one of gpu, stream, retrieval"));
    }
    modes.emplace_back(m);
  }
  if (absl::GetFlag(FLAGS_steps) < 1) return absl::InvalidArgumentError("--steps must be >= 1");
  const int layers = absl::GetFlag(FLAGS_layers);
  if (layers < 1 || layers > 32) return absl::InvalidArgumentError("--layers outside [1, 32]");

  Bench bench;
  KVR_RETURN_IF_ERROR(bench.Init());
  cudaDeviceProp prop{};
  int driver = 0;
  cudaGetDeviceProperties(&prop, absl::GetFlag(FLAGS_device));
  cudaDriverGetVersion(&driver);
  std::printf("device: %s, driver %d.%d, %u CPU threads\n\n", prop.name, driver / 1000,
              (driver % 1000) / 10, std::thread::hardware_concurrency());
  std::printf("%-10s %8s | %10s %10s %10s %10s %10s | %9s %s\n", "mode", "context", "s/token",
              "attention", "retrieval", "node", "other", "GPU KV", "x32 layers s/token");
  std::vector<Breakdown> rows;
  for (int64_t context : contexts) {
    for (const std::string& mode : modes) {
      absl::StatusOr<Breakdown> r = mode == "retrieval"
                                        ? bench.RunRetrieval(context)
                                        : bench.RunFull(context, mode == "stream");
      if (!r.ok()) return r.status();
      const Breakdown& b = *r;
      if (!b.note.empty()) {
        std::printf("%-10s %8lld | %s\n", b.mode.c_str(), static_cast<long long>(context),
                    b.note.c_str());
      } else {
        const double other = b.total - b.attention - b.retrieval;
        std::printf("%-10s %8lld | %10.4f %10.4f %10.4f %10.4f %10.4f | %8.2f%% %10.4f\n",
                    b.mode.c_str(), static_cast<long long>(context), b.total, b.attention,
                    b.retrieval, b.node, other, 100.0 * b.gpu_kv_fraction,
                    b.total * 32.0 / layers);
      }
      std::fflush(stdout);
      rows.push_back(b);
    }
  }
  std::printf("\nattention: GPU attention (stream: + host->GPU KV copies; retrieval: window "
              "partial + merge); retrieval: blocked on the node after the window partial; node: "
              "the node's Attend time; other: the rest; GPU KV: share of the KV cache on the GPU "
              "at once. Measured with %d layers; the last column scales to 32.\n",
              layers);
  const std::string json = absl::GetFlag(FLAGS_json);
  if (!json.empty()) {
    std::vector<std::string> texts;
    for (const Breakdown& b : rows) {
      texts.push_back(absl::StrFormat(
          "{\"mode\": \"%s\", \"context\": %d, \"layers\": %d, \"s_per_token\": %.6f, "
          "\"attention_s\": %.6f, \"retrieval_s\": %.6f, \"node_s\": %.6f, "
          "\"gpu_kv_fraction\": %.6f, \"note\": \"%s\"}",
          b.mode, b.context, layers, b.total, b.attention, b.retrieval, b.node,
          b.gpu_kv_fraction, b.note));
    }
    KVR_RETURN_IF_ERROR(bench::WriteJsonRows(json, texts));
  }
  return absl::OkStatus();
}

}  // namespace
}  // namespace kvr

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("decode s/token at long context on the GPU (see the file comment)");
  absl::ParseCommandLine(argc, argv);
  if (absl::Status st = kvr::worker::RegisterCudaBackend(); !st.ok()) {
    std::fprintf(stderr, "gpu_decode_bench: %s\n", std::string(st.message()).c_str());
    return 1;
  }
  std::string why;
  if (kvr::worker::CudaDeviceCount(&why) == 0) {
    std::printf("gpu_decode_bench: no CUDA device (%s); nothing measured\n", why.c_str());
    return 0;
  }
  const absl::Status st = kvr::Run();
  if (!st.ok()) {
    std::fprintf(stderr, "gpu_decode_bench: %s\n", std::string(st.message()).c_str());
    return 1;
  }
  return 0;
}
