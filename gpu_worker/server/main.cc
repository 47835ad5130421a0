// kvr_worker: a decode worker serving kvr.v1.Generation over gRPC (with
// grpc.health.v1 and server reflection).
//
//   kvr_worker --listen 127.0.0.1:0 --max_concurrent 8
//              [--nodes host:port,... | --nodes dns:///name:port] [--replicas R]
//              [--metrics_listen 127.0.0.1:0] [--backend cpu|cuda]
//
// Loads the model and tokenizer (default: the bundled stories260K), runs one
// RetrievalEngine (on --backend: "cpu", or "cuda" from the plugin
// libkvr_cuda_plugin.so, loaded at start from --cuda_plugin; printed as
// "kvr_worker backend: <Describe()>" on stdout and reported by GetModelInfo) against an in-process retrieval node or the
// kvr_node servers of --nodes (a static list, or every address of a DNS name
// — a Kubernetes headless service — re-resolved every
// --nodes_refresh_seconds; each new sequence is placed on the current set,
// running ones keep theirs; each chunk on --replicas of them). Prints "kvr_worker metrics on HOST:PORT" (unless
// --metrics_listen is empty) and then "kvr_worker listening on HOST:PORT" on
// stdout once serving (port 0 picks a free port). SIGTERM / SIGINT:
// health goes NOT_SERVING, streams drain (up to --drain_seconds, then they
// are cancelled and their shards dropped), exit 0.
#include <algorithm>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <pthread.h>
#include <unistd.h>

#include "absl/flags/flag.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "common/train_topk.h"
#include "gpu_worker/backend/backend.h"
#include "gpu_worker/backend/backend_plugin.h"
#include "gpu_worker/model/bundled_model.h"
#include "gpu_worker/model/llama2c_loader.h"
#include "gpu_worker/model/chat_config.h"
#include "gpu_worker/model/llama2c_tokenizer.h"
#include "gpu_worker/model/model_loader.h"
#include "gpu_worker/server/generation_scheduler.h"
#include "gpu_worker/server/worker_service.h"
#include "retrieval_node/client/client_factory.h"
#include "gpu_worker/server/worker_metrics.h"
#include "services/infra/metrics/metrics_endpoint.h"
#include "services/infra/rpc/grpc_server.h"
#include "services/infra/security/tls_flags.h"
#include "services/infra/server/serve_flags.h"
#include "services/infra/server/server_main.h"

ABSL_FLAG(std::string, listen, "127.0.0.1:0",
          "host:port to serve on; port 0 picks a free port (printed on stdout)");
ABSL_FLAG(std::string, model, "",
          "llama2.c checkpoint or Hugging Face checkpoint directory (default: stories260K.bin "
          "in the model dir: $KVR_MODELS, else the repository's models/)");
ABSL_FLAG(std::string, tokenizer, "",
          "tokenizer: tokenizer.json or a llama2.c tokenizer (default: "
          "tok512.bin beside a llama2.c --model; tokenizer.json in a Hugging Face --model "
          "directory)");
ABSL_FLAG(std::string, chat_template, "",
          "chat template overriding the model's (tokenizer_config.json chat_template): a "
          "tokenizer_config.json (its chat_template, bos_token, eos_token) or a raw Jinja file, "
          "at most 64 KiB; reported by GetModelInfo, rendered by the gateway");
ABSL_FLAG(std::string, nodes, "",
          "kvr_node retrieval nodes: host:port,... (static), dns:///name:port (every A/AAAA "
          "record of name, re-resolved every --nodes_refresh_seconds), or id=host:port,... "
          "(static, with stable ids); empty: an in-process node");
ABSL_FLAG(int, replicas, 0,
          "--nodes host:port,...: retrieval nodes holding each chunk (0: 2 when --nodes names "
          ">= 2 nodes, else 1); a sequence started while fewer nodes are live gets fewer, with a "
          "warning, and counts in kvr_worker_under_replicated_shards");
ABSL_FLAG(double, nodes_refresh_seconds, 10.0,
          "--nodes dns:///...: seconds between re-resolutions (> 0)");
ABSL_FLAG(std::string, metrics_listen, "127.0.0.1:0",
          "host:port of the Prometheus /metrics endpoint (port 0 picks a free port, printed on "
          "stdout); empty disables it");
ABSL_FLAG(int, max_concurrent, 8,
          "sequences decoded at once (one batched step over all of them); more requests wait");
ABSL_FLAG(int, max_queue, 64,
          "requests waiting beyond --max_concurrent; more get RESOURCE_EXHAUSTED");
ABSL_FLAG(int64_t, host_memory_budget_bytes, -1,
          "host memory the accepted requests may hold together (by RetrievalEngine::"
          "SequenceBytes: logits, token history, retrieval mode's host K/V copies, and the K/V "
          "caches themselves on the CPU backend); a request beyond it gets RESOURCE_EXHAUSTED "
          "naming this flag before any work starts. -1 (default): half the memory this process "
          "may use (the cgroup's memory.max, else the machine's RAM); 0: no budget");
ABSL_FLAG(int64_t, memory_budget_bytes, -1,
          "deprecated name of --host_memory_budget_bytes (-1: not set)");
ABSL_FLAG(int64_t, device_memory_budget_bytes, -1,
          "with a device backend (--backend=cuda): device memory the accepted requests' K/V "
          "caches (RetrievalEngine::SequenceBackendBytes) may hold together; a request beyond "
          "it gets RESOURCE_EXHAUSTED naming this flag before any work starts. -1 (default): "
          "90% of the device memory free once the model is loaded; 0: no budget. Ignored on "
          "the CPU backend (its tensors are host memory, under --host_memory_budget_bytes)");
ABSL_FLAG(int, max_n, 16,
          "most choices per prompt a Generate may ask for (GenerateRequest.n; the prompt is "
          "prefilled once and forked); more: INVALID_ARGUMENT naming n; [1, 128]");
ABSL_FLAG(int, max_prompts, 16,
          "most prompts in one Generate (GenerateRequest.prompts); more: INVALID_ARGUMENT "
          "naming prompts; [1, 128]");
ABSL_FLAG(int, max_finish_waiters, 64,
          "GetModelInfo calls waiting (wait_finished_requests) at once; more get "
          "RESOURCE_EXHAUSTED");
ABSL_FLAG(int, max_recomputes, 2,
          "times a decoding request whose retrieval nodes lost every replica of a shard "
          "(UNAVAILABLE) is recomputed from its token ids (prefilled again on the live nodes, "
          "continuing token-identically) before it fails; [0, 16]");
ABSL_FLAG(std::string, backend, "cpu",
          "compute backend: cpu, or cuda (loads the CUDA backend plugin, see --cuda_plugin)");
ABSL_FLAG(int, device, 0, "--backend=cuda: CUDA device ordinal");
ABSL_FLAG(std::string, cuda_plugin, "",
          "--backend=cuda: path of libkvr_cuda_plugin.so (empty: next to this executable, "
          "else the build tree's, else the dynamic loader's search path)");
ABSL_FLAG(int, threads, 1, "CPU backend threads, 0 = all cores");
ABSL_FLAG(int, tail_capacity, 64,
          "in-process node: appended keys kept flat before sealing into the index");
ABSL_FLAG(int, train_k, 32, "in-process node: exact top-k per training query");
ABSL_FLAG(int64_t, max_train_queries, 16384,
          "prefill queries per kv head and chunk whose exact top-k trains the node's graph "
          "(a stratified sample; 0 = every query, at most 4194304)");
ABSL_FLAG(std::string, train_topk, "approx",
          "how the CPU path finds the sampled prefill queries' top-k for the graph: approx "
          "(queries grouped, each group scans ~1/16 of a chunk's keys; chunks under 4096 keys "
          "exact) or exact (every key)");
ABSL_FLAG(int, max_message_bytes, 4 << 20, "largest gRPC message received or sent, bytes");
ABSL_FLAG(double, max_deadline_seconds, 3600.0,
          "longest a Generate or a waiting GetModelInfo call may run, seconds: one whose "
          "deadline is later, or that has none, is served but cut this long after it arrived "
          "(DEADLINE_EXCEEDED naming this flag; its request cancelled); [0, 1 year], 0 = no "
          "cap. Default: the gateway's --max_request_timeout_seconds default (a gateway's calls "
          "carry at most that)");
ABSL_FLAG(double, drain_seconds, 10.0,
          "on SIGTERM / SIGINT, how long streams may run before they are cancelled");

namespace kvr::worker {
namespace {

constexpr char kProgram[] = "kvr_worker";
constexpr char kServiceName[] = "kvr.v1.Generation";
// Who may call kvr.v1.Generation over mTLS by default: the gateway.
constexpr char kDefaultAllowedPeers[] = "kvr-gateway";

pthread_t g_main_thread;

// Threads started before main — OpenBLAS's pool, from its library
// constructor — do not block the stop signals, so the kernel may deliver
// SIGTERM to one of them, whose default action kills the worker without a
// drain. Only such threads can run this handler (every later thread inherits
// the blocked mask): it hands the signal to the main thread, where
// ServeUntilSignal's sigwait takes it. pthread_kill is async-signal-safe.
extern "C" void ForwardStopSignal(int sig) { pthread_kill(g_main_thread, sig); }

void ForwardStopSignalsToMain(const sigset_t& stop_signals) {
  g_main_thread = pthread_self();
  struct sigaction sa = {};
  sa.sa_handler = ForwardStopSignal;
  sigfillset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  for (int sig : {SIGTERM, SIGINT}) {
    if (sigismember(&stop_signals, sig) == 1) sigaction(sig, &sa, nullptr);
  }
}

int Fail(absl::string_view message) { return server::Fail(kProgram, message); }

// Half of the memory this process may use: the cgroup v2 limit
// (/sys/fs/cgroup/memory.max) when one is set, else the machine's RAM.
int64_t DefaultMemoryBudget() {
  int64_t limit = static_cast<int64_t>(sysconf(_SC_PHYS_PAGES)) * sysconf(_SC_PAGE_SIZE);
  if (std::FILE* f = std::fopen("/sys/fs/cgroup/memory.max", "r"); f != nullptr) {
    long long v = 0;
    if (std::fscanf(f, "%lld", &v) == 1 && v > 0 && v < limit) limit = v;  // "max": no limit
    std::fclose(f);
  }
  return limit > 0 ? limit / 2 : 0;
}

// The Backend of --backend / --threads / --device, by registry name.
absl::StatusOr<std::unique_ptr<Backend>> MakeBackend() {
  const std::string name = absl::GetFlag(FLAGS_backend);
  const int device = absl::GetFlag(FLAGS_device);
  if (device < 0 || device > 1023) {
    return absl::InvalidArgumentError(absl::StrCat("--device ", device, " outside [0, 1023]"));
  }
  BackendOptions bo;
  bo.num_threads = absl::GetFlag(FLAGS_threads);
  bo.device = device;
  return CreateBackendForFlag(name, bo, absl::GetFlag(FLAGS_cuda_plugin));
}

int Main(int argc, char** argv) {
  server::ParseFlags(
      "gpu_worker/server/main.cc",
      "decode worker (kvr.v1.Generation over gRPC, grpc.health.v1, reflection).\n"
      "  kvr_worker --listen 127.0.0.1:0 [--max_concurrent N] [--nodes host:port,...|dns:///name:port]\n"
      "             [--metrics_listen 127.0.0.1:0] [--backend cpu|cuda]",
      argc, argv);

  const sigset_t stop_signals = rpc::BlockStopSignals();
  ForwardStopSignalsToMain(stop_signals);

  const int threads = absl::GetFlag(FLAGS_threads);
  const int max_message_bytes = absl::GetFlag(FLAGS_max_message_bytes);
  const absl::Status flags_ok = server::FlagChecks()
                                    .InRange("threads", threads, 0, 1024)
                                    .AtLeast("max_message_bytes", max_message_bytes, 1 << 16)
                                    .AtLeast("tail_capacity", absl::GetFlag(FLAGS_tail_capacity), 1)
                                    .InRange("max_n", absl::GetFlag(FLAGS_max_n), 1, 128)
                                    .InRange("max_prompts", absl::GetFlag(FLAGS_max_prompts), 1,
                                             128)
                                    .InRange("max_deadline_seconds",
                                             absl::GetFlag(FLAGS_max_deadline_seconds), 0.0,
                                             365.0 * 86400.0)
                                    .status();
  if (!flags_ok.ok()) return Fail(flags_ok.message());
  const absl::StatusOr<server::ServeBounds> bounds = server::ServeBoundsFromFlags();
  if (!bounds.ok()) return Fail(bounds.status().message());

  absl::StatusOr<LoadedModel> loaded =
      LoadModel(absl::GetFlag(FLAGS_model), absl::GetFlag(FLAGS_tokenizer));
  if (!loaded.ok()) return Fail(loaded.status().ToString());
  const std::shared_ptr<const LlamaWeights> weights = loaded->weights;
  absl::StatusOr<ChatConfig> chat =
      ReadChatConfig(loaded->hf_dir ? loaded->model : std::string(),
                     absl::GetFlag(FLAGS_chat_template), *loaded->tokenizer);
  if (!chat.ok()) return Fail(chat.status().ToString());
  // Every request stops at the model's end-of-turn ids (generation_config's
  // eos_token_id list), as Hugging Face's generate does.
  const auto stop_tokenizer =
      std::make_unique<StopTokenTokenizer>(loaded->tokenizer.get(), chat->stop_token_ids);
  const Tokenizer* const tokenizer = stop_tokenizer.get();
  absl::StatusOr<std::unique_ptr<Backend>> backend = MakeBackend();
  if (!backend.ok()) return Fail(std::string(backend.status().message()));
  std::printf("kvr_worker backend: %s\n", (*backend)->Describe().c_str());
  std::fflush(stdout);
  // After the backend line (the first line scripts and tests read).
  absl::StatusOr<security::ProcessTls> tls =
      security::ProcessTlsFromFlags(kProgram, kDefaultAllowedPeers);
  if (!tls.ok()) return Fail(tls.status().message());

  const double refresh_seconds = absl::GetFlag(FLAGS_nodes_refresh_seconds);
  if (!(refresh_seconds > 0.0 && refresh_seconds <= 86400.0)) {
    return Fail(absl::StrCat("--nodes_refresh_seconds ", refresh_seconds,
                             " outside (0, 86400]"));
  }
  retrieval::RetrievalClientOptions ro;
  ro.in_process.tail_capacity = static_cast<size_t>(absl::GetFlag(FLAGS_tail_capacity));
  ro.in_process.train_k = absl::GetFlag(FLAGS_train_k);
  ro.refresh = absl::Seconds(refresh_seconds);
  ro.replicas = absl::GetFlag(FLAGS_replicas);
  ro.credentials = tls->channel;
  ro.on_node_set_error = [](const absl::Status& s) {
    std::fprintf(stderr, "kvr_worker: keeping the previous node set: %s\n",
                 std::string(s.message()).c_str());
  };
  absl::StatusOr<std::unique_ptr<retrieval::RetrievalClient>> made =
      retrieval::MakeRetrievalClient(absl::GetFlag(FLAGS_nodes), ro);
  if (!made.ok()) return Fail(made.status().ToString());
  std::unique_ptr<retrieval::RetrievalClient> node = *std::move(made);
  EngineOptions eo;
  eo.max_train_queries = absl::GetFlag(FLAGS_max_train_queries);
  const std::optional<TrainingTopKMode> train_topk =
      ParseTrainingTopKMode(absl::GetFlag(FLAGS_train_topk));
  if (!train_topk.has_value()) {
    return Fail(absl::StrCat("--train_topk=", absl::GetFlag(FLAGS_train_topk),
                             " is not exact or approx"));
  }
  eo.train_topk = *train_topk;
  absl::StatusOr<std::unique_ptr<RetrievalEngine>> engine =
      RetrievalEngine::Create(backend->get(), weights, node.get(), eo);
  if (!engine.ok()) return Fail(engine.status().ToString());

  auto metrics = std::make_unique<WorkerMetrics>();
  SchedulerOptions so;
  so.max_concurrent = absl::GetFlag(FLAGS_max_concurrent);
  so.max_queue = absl::GetFlag(FLAGS_max_queue);
  int64_t host_budget = absl::GetFlag(FLAGS_host_memory_budget_bytes);
  if (const int64_t old = absl::GetFlag(FLAGS_memory_budget_bytes); old != -1) {
    if (host_budget != -1) {
      return Fail("set --host_memory_budget_bytes or its old name --memory_budget_bytes, not both");
    }
    host_budget = old;
  }
  const int64_t device_budget = absl::GetFlag(FLAGS_device_memory_budget_bytes);
  if (host_budget < -1 || device_budget < -1) {
    return Fail(absl::StrCat(host_budget < -1 ? "--host_memory_budget_bytes "
                                              : "--device_memory_budget_bytes ",
                             host_budget < -1 ? host_budget : device_budget, " must be >= -1"));
  }
  so.memory_budget_bytes = host_budget == -1 ? DefaultMemoryBudget() : host_budget;
  // Device memory: measured now, with the weights on the device; the 10%
  // kept back is headroom for the engine's shared buffers (prefill
  // activations grow with the longest prompt) and the backend's scratch.
  if (const std::optional<Backend::DeviceMemory> device = (*backend)->DeviceMemoryNow()) {
    so.backend_on_device = true;
    so.device_memory_budget_bytes =
        device_budget == -1 ? device->free_bytes / 10 * 9 : device_budget;
  }
  so.max_finish_waiters = absl::GetFlag(FLAGS_max_finish_waiters);
  so.max_recomputes = absl::GetFlag(FLAGS_max_recomputes);
  std::fprintf(stderr,
               "kvr_worker: memory budgets: host %lld bytes, device %lld bytes (0: none)\n",
               static_cast<long long>(so.memory_budget_bytes),
               static_cast<long long>(so.device_memory_budget_bytes));
  so.observer = metrics.get();
  absl::StatusOr<std::unique_ptr<GenerationScheduler>> scheduler =
      GenerationScheduler::Create(engine->get(), tokenizer, so);
  if (!scheduler.ok()) return Fail(absl::StrCat("--", scheduler.status().message()));

  metrics->SetLoadSource([s = scheduler->get(), n = node.get()] {
    const SchedulerLoad load = s->load();
    WorkerLoad l;
    l.requests_running = load.active;
    l.requests_waiting = load.queued;
    l.retrieval_nodes = static_cast<int64_t>(n->num_nodes());
    retrieval::ReplicationStats r;
    if (n->GetReplicationStats(&r)) {
      l.retrieval_nodes_up = r.nodes_up;
      l.under_replicated_shards = r.under_replicated_shards;
      l.failovers_unavailable = r.attend_failovers_unavailable;
      l.failovers_deadline = r.attend_failovers_deadline;
      l.failovers_down = r.attend_failovers_down;
      l.syncs_started = r.syncs_started;
      l.syncs_succeeded = r.syncs_succeeded;
      l.syncs_failed = r.syncs_failed;
      l.keys_synced = r.keys_synced;
    } else {
      l.retrieval_nodes_up = l.retrieval_nodes;
    }
    return l;
  });
  absl::StatusOr<std::unique_ptr<metrics::MetricsEndpoint>> metrics_endpoint =
      server::ServeMetrics(kProgram, absl::GetFlag(FLAGS_metrics_listen), metrics->collectable());
  if (!metrics_endpoint.ok()) {
    return Fail(absl::StrCat("--metrics_listen: ", metrics_endpoint.status().message()));
  }

  WorkerServiceOptions wo;
  wo.model_name = loaded->model;
  wo.chat = *chat;
  wo.backend = (*backend)->Describe();
  wo.max_deadline_seconds = absl::GetFlag(FLAGS_max_deadline_seconds);
  wo.max_n = absl::GetFlag(FLAGS_max_n);
  wo.max_prompts = absl::GetFlag(FLAGS_max_prompts);
  wo.on_generate_finished = [m = metrics.get()](absl::StatusCode code) { m->RecordRequest(code); };
  auto service = std::make_unique<WorkerService>(scheduler->get(), tokenizer, node.get(),
                                                 weights->config, (*engine)->max_seq_len(), wo);

  const absl::Status served =
      rpc::ServeUntilSignal({service.get()},
                            {.name = kProgram,
                             .listen = absl::GetFlag(FLAGS_listen),
                             .max_message_bytes = max_message_bytes,
                             .health_services = {kServiceName},
                             .drain_seconds = absl::GetFlag(FLAGS_drain_seconds),
                             .max_concurrent_streams = bounds->max_concurrent_streams,
                             .memory_quota_bytes = bounds->memory_quota_bytes,
                             .max_threads = bounds->max_threads,
                             .credentials = tls->server},
                            stop_signals);
  if (!served.ok()) return Fail(served.message());
  metrics_endpoint->reset();  // its load source reads the scheduler
  scheduler->reset();  // ends every request still open (their shards dropped)
  service.reset();
  engine->reset();
  node.reset();  // a --nodes dns:/// membership stops first
  std::fprintf(stderr, "kvr_worker: stopped\n");
  return 0;
}

}  // namespace
}  // namespace kvr::worker

int main(int argc, char** argv) {
  // Also makes libprotobuf precede libsentencepiece in DT_NEEDED (see CMakeLists.txt).
  GOOGLE_PROTOBUF_VERIFY_VERSION;
  return kvr::worker::Main(argc, argv);
}
