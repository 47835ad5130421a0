// kvr: the command-line front end.
//
//   kvr generate --prompt "Once upon a time" --max_tokens 120
//
// runs the decode worker (CPU backend, or --backend cuda) with an in-process
// retrieval node on the bundled stories260K model, streams the text to stdout
// and prints a one-line summary to stderr. See `kvr generate --help`. With the services
// built (KVR_WITH_SERVICES) also
//
//   kvr cluster                 a local gateway + worker + 3 retrieval nodes
//   kvr client --target H:P     stream a generation from the gRPC API
//
// (tools/cluster.h, tools/client.h), and always
//
//   kvr capture --prompt P --out DIR   per-layer, per-head Q/K/V as .npy
//
// (tools/capture.h).
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <map>
#include <type_traits>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "gpu_worker/model/bundled_model.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "gpu_worker/backend/backend.h"
#include "gpu_worker/backend/backend_plugin.h"
#include "gpu_worker/engine/generation.h"
#include "gpu_worker/model/llama2c_loader.h"
#include "gpu_worker/model/llama2c_tokenizer.h"
#include "retrieval_node/client/client_factory.h"
#include "tools/capture.h"
#include "tools/cli_flags.h"
#ifdef KVR_WITH_NODE_CLIENT
#include "google/protobuf/stubs/common.h"
#include "tools/apikey.h"
#include "services/infra/security/tls_credentials.h"
#include "tools/client.h"
#include "tools/cluster.h"
#include "tools/eval.h"
#endif

namespace kvr {
namespace {

using worker::AttentionMode;

constexpr char kUsage[] = R"(kvr — RetrievalAttention LLM serving

Usage:
  kvr generate [flags]     generate text from a prompt (worker + in-process
                           retrieval node, one process; CPU backend unless
                           --backend cuda)
  kvr cluster [flags]      run a local cluster (gateway + worker + retrieval
                           nodes on 127.0.0.1) until Ctrl-C
  kvr client --target HOST:PORT [flags]
                           stream a generation from a gateway or worker
  kvr apikey --id ID       make a gateway API key (key, then its keys-file entry)
  kvr eval --url http://HOST:PORT [flags]
                           task accuracy (loglikelihood multiple choice,
                           passkey) through the HTTP API, full attention vs
                           retrieval
  kvr capture --prompt P --out DIR [flags]
                           write a model run's per-layer, per-head queries,
                           keys and values as .npy files for index_bench
  kvr --help               this text
  kvr COMMAND --help       the flags of COMMAND
)";

constexpr char kGenerateUsage[] = R"(Usage: kvr generate [flags]

Streams the prompt and its continuation to stdout; prints a one-line summary
(tokens, tok/s, tokens attended locally vs retrieved) to stderr.

Model:
  --model PATH            llama2.c checkpoint (default: stories260K.bin in the
                          model dir: $KVR_MODELS, else the repository's
                          models/; see models/README.md)
  --tokenizer PATH        llama2.c tokenizer (default: tok512.bin in the model dir)
Request:
  --prompt TEXT           prompt (default "Once upon a time")
  --max_tokens N          tokens to generate, [0, 1048576] (default 128)
  --stop TEXT             stop string (repeatable); the text is cut before it
Attention:
  --mode retrieval|full   retrieval attention or the full-attention baseline
                          (default retrieval)
  --sinks N               attention-sink tokens kept on the worker, >= 0 (default 4)
  --window N              recent tokens kept on the worker, >= 1 (default 16)
  --top_k N               keys retrieved per query head, [1, 4096] (default 16)
  --index NAME            retrieval index: graph|flat|ivf|auto|flat_sq8|ivf_sq8|pca_sq8
                          (default graph; auto: the node picks per head, the
                          fastest meeting its target recall; flat_sq8 / ivf_sq8:
                          SQ8 code scan (of all keys / of the probed IVF lists) +
                          exact rerank; pca_sq8: SQ8 scan of the keys' top
                          principal directions + exact rerank)
  --beam N                graph search beam, 0 = index default (default 0)
  --train_k N             exact top-k per prefill query for the graph build,
                          [1, 4096] (default 32)
  --tail_capacity N       appended tokens kept flat before sealing into the
                          index, >= 1 (default 64)
  --value_dtype f32|bf16|f16  how the node stores values (default f32)
  --estimate default|on|off  estimate the attention mass top-k leaves behind
                          from per-shard cluster summaries (on), exact top-k
                          only (off), or the node's --estimate (default;
                          the in-process node: off) (default on: the best
                          measured fidelity at equal cost, benchmarks §4)
  --exact_zone F          in-process node: per query, the estimated clusters of
                          most mass, up to this fraction of a chunk's keys, are
                          attended exactly (the node's exact zone), [0, 1], 0 =
                          off (default 0.5: at k 16 the best fidelity at equal
                          cost, benchmarks §4b "Exact zone"); with --nodes
                          each kvr_node's --exact_zone_keys_fraction applies
Sampling:
  --temperature T         0 = greedy (default 0)
  --sample_top_k N        sample among the N most likely tokens, 0 = all (default 0)
  --top_p P               nucleus mass in (0, 1] (default 1)
  --repetition_penalty R  > 0, 1 = off (default 1)
  --seed N                sampling seed (default 1)
Runtime:
  --backend cpu|cuda      compute backend (default cpu); cuda loads
                          libkvr_cuda_plugin.so (next to kvr, else the build
                          tree's lib/, else the loader's path)
  --cuda_plugin PATH      that plugin's path instead
  --device N              CUDA device, [0, 1023] (default 0)
  --threads N             CPU backend threads, 0 = all cores (default 1)
  --nodes HOST:PORT,...   use these kvr_node retrieval nodes over gRPC (shards
                          placed by rendezvous hashing) instead of the
                          in-process node (--tail_capacity is then set on
                          each kvr_node); also dns:///NAME:PORT (every
                          address of NAME) or ID=HOST:PORT,... (fixed ids)
  --replicas R            with --nodes: nodes holding each chunk, [0, 64]
                          (0 = default: 2 with >= 2 nodes, else 1; fewer
                          live nodes at the start reduce it, with a warning)
  --tls_cert_file PEM     with --nodes under mTLS: this process's certificate
  --tls_key_file PEM      (a kvr-worker one: nodes take kvr-worker and
  --tls_ca_file PEM       kvr-node by default), its key and the CA the nodes
                          are verified against; all three or none
)";

struct Flags {
  std::string model, tokenizer;
  worker::GenerateRequest request;
  int64_t tail_capacity = 64;
  // The in-process node's exact zone (NodeCoreOptions::exact_zone_keys_fraction).
  double exact_zone = 0.5;
  int64_t threads = 1;
  std::string backend = "cpu", cuda_plugin;
  int64_t device = 0;
  std::string nodes;  // empty: in-process node
  int64_t replicas = 0;  // --nodes only; 0: the factory's default
  std::string tls_cert_file, tls_key_file, tls_ca_file;  // --nodes under mTLS; all or none
};

absl::Status ParseGenerateFlags(const std::vector<std::string>& args, Flags* f, bool* help) {
  worker::GenerateRequest& r = f->request;
  // kvr generate estimates the remainder by default: at equal exact work it
  // measured the best fidelity (docs/benchmarks.md section 4).
  r.attention.estimate = worker::EstimateMode::kOn;
  r.prompt = "Once upon a time";
  r.max_tokens = 128;
  auto int_flag = [](int64_t lo, int64_t hi, auto* field) {
    return cli::IntFlag(lo, hi, field).handler;
  };
  auto float_flag = [](float* field) { return cli::FloatFlag(field).handler; };
  auto string_flag = [](std::string* field) { return cli::StringFlag(field).handler; };
  constexpr int64_t kMaxTokens = int64_t{1} << 24;
  using Handler = std::function<absl::Status(std::string_view, const std::string&)>;
  const std::map<std::string, Handler, std::less<>> handlers = {
      {"model", string_flag(&f->model)},
      {"tokenizer", string_flag(&f->tokenizer)},
      {"prompt", string_flag(&r.prompt)},
      {"max_tokens", int_flag(0, 1 << 20, &r.max_tokens)},
      {"stop",
       [&](std::string_view name, const std::string& v) -> absl::Status {
         if (v.empty()) return absl::InvalidArgumentError("--stop: empty stop string");
         r.stop.push_back(v);
         return absl::OkStatus();
       }},
      {"mode",
       [&](std::string_view, const std::string& v) -> absl::Status {
         absl::StatusOr<AttentionMode> m = worker::ParseAttentionMode(v);
         if (!m.ok()) return absl::InvalidArgumentError(absl::StrCat("--mode: ", m.status().message()));
         r.attention.mode = *m;
         return absl::OkStatus();
       }},
      {"sinks", int_flag(0, kMaxTokens, &r.attention.sinks)},
      {"window", int_flag(1, kMaxTokens, &r.attention.window)},
      {"top_k", int_flag(1, 4096, &r.attention.top_k)},
      {"beam", int_flag(0, 65536, &r.attention.beam)},
      {"train_k", int_flag(1, 4096, &r.attention.train_k)},
      {"estimate",
       [&](std::string_view, const std::string& v) -> absl::Status {
         absl::StatusOr<worker::EstimateMode> e = worker::ParseEstimateMode(v);
         if (!e.ok()) {
           return absl::InvalidArgumentError(absl::StrCat("--estimate: ", e.status().message()));
         }
         r.attention.estimate = *e;
         return absl::OkStatus();
       }},
      {"exact_zone",
       [&](std::string_view, const std::string& v) -> absl::Status {
         double x = 0;
         if (!absl::SimpleAtod(v, &x) || !(x >= 0.0 && x <= 1.0)) {
           return absl::InvalidArgumentError(
               absl::StrCat("--exact_zone: \"", v, "\" is not a number in [0, 1]"));
         }
         f->exact_zone = x;
         return absl::OkStatus();
       }},
      {"index",
       [&](std::string_view, const std::string& v) -> absl::Status {
         absl::StatusOr<retrieval::IndexType> t = retrieval::ParseIndexType(v);
         if (!t.ok()) return absl::InvalidArgumentError(absl::StrCat("--index: ", t.status().message()));
         r.attention.index = *t;
         return absl::OkStatus();
       }},
      {"value_dtype",
       [&](std::string_view, const std::string& v) -> absl::Status {
         absl::StatusOr<DType> t = ParseDType(v);
         if (!t.ok()) {
           return absl::InvalidArgumentError(absl::StrCat("--value_dtype: ", t.status().message()));
         }
         r.attention.value_dtype = *t;
         return absl::OkStatus();
       }},
      {"tail_capacity", int_flag(1, kMaxTokens, &f->tail_capacity)},
      {"temperature", float_flag(&r.sampling.temperature)},
      {"sample_top_k", int_flag(0, 1 << 24, &r.sampling.top_k)},
      {"top_p", float_flag(&r.sampling.top_p)},
      {"repetition_penalty", float_flag(&r.sampling.repetition_penalty)},
      {"seed",
       [&](std::string_view name, const std::string& v) -> absl::Status {
         if (!absl::SimpleAtoi(v, &r.sampling.seed)) {
           return absl::InvalidArgumentError(
               absl::StrCat("--seed: \"", v, "\" is not an unsigned integer"));
         }
         return absl::OkStatus();
       }},
      {"threads", int_flag(0, 1024, &f->threads)},
      {"backend", string_flag(&f->backend)},
      {"cuda_plugin", string_flag(&f->cuda_plugin)},
      {"device", int_flag(0, 1023, &f->device)},
      {"nodes", string_flag(&f->nodes)},
      {"replicas", int_flag(0, 64, &f->replicas)},
      {"tls_cert_file", string_flag(&f->tls_cert_file)},
      {"tls_key_file", string_flag(&f->tls_key_file)},
      {"tls_ca_file", string_flag(&f->tls_ca_file)},
  };
  cli::FlagTable flags;
  for (const auto& [name, handler] : handlers) flags[name] = cli::FlagSpec{handler};
  KVR_RETURN_IF_ERROR(cli::ParseFlags(args, flags, "generate", help));
  if (*help) return absl::OkStatus();
  // Float and cross-field checks. Their messages start with the field name,
  // which is the flag's: "temperature nan must be ..." -> "--temperature: nan ...".
  auto as_flag = [](const absl::Status& s) {
    std::string m(s.message());
    if (const size_t sp = m.find(' '); sp != std::string::npos) m.insert(sp, ":");
    return absl::InvalidArgumentError(absl::StrCat("--", m));
  };
  if (absl::Status s = worker::ValidateSampling(r.sampling); !s.ok()) return as_flag(s);
  if (absl::Status s = worker::ValidateAttentionOptions(r.attention); !s.ok()) return as_flag(s);
  // The --tls_* set is all or none, and only with --nodes: a flag error
  // (exit 2) before anything loads; the files are checked by RunGenerate.
  const bool any_tls =
      !f->tls_cert_file.empty() || !f->tls_key_file.empty() || !f->tls_ca_file.empty();
  const bool all_tls =
      !f->tls_cert_file.empty() && !f->tls_key_file.empty() && !f->tls_ca_file.empty();
  if (any_tls && !all_tls) {
    std::vector<std::string> missing;
    if (f->tls_cert_file.empty()) missing.push_back("--tls_cert_file");
    if (f->tls_key_file.empty()) missing.push_back("--tls_key_file");
    if (f->tls_ca_file.empty()) missing.push_back("--tls_ca_file");
    return absl::InvalidArgumentError(absl::StrCat(
        "mTLS to the nodes needs --tls_cert_file, --tls_key_file and --tls_ca_file together; "
        "missing ", absl::StrJoin(missing, ", ")));
  }
  if (any_tls && f->nodes.empty()) {
    return absl::InvalidArgumentError(
        "--tls_cert_file, --tls_key_file, --tls_ca_file need --nodes (the in-process node has "
        "no TLS)");
  }
  return absl::OkStatus();
}


absl::Status RunGenerate(const Flags& f) {
  KVR_ASSIGN_OR_RETURN(const worker::ModelPaths paths,
                       worker::ResolveModelPaths(f.model, f.tokenizer));
  KVR_ASSIGN_OR_RETURN(std::shared_ptr<const worker::LlamaWeights> weights,
                       worker::LoadLlama2c(paths.model));
  KVR_ASSIGN_OR_RETURN(std::unique_ptr<worker::Llama2cTokenizer> tok,
                       worker::Llama2cTokenizer::Load(paths.tokenizer, weights->config.vocab_size));
  worker::BackendOptions bo;
  bo.num_threads = static_cast<int>(f.threads);
  bo.device = static_cast<int>(f.device);
  KVR_ASSIGN_OR_RETURN(std::unique_ptr<worker::Backend> backend,
                       worker::CreateBackendForFlag(f.backend, bo, f.cuda_plugin));
  retrieval::RetrievalClientOptions ro;
  ro.in_process.tail_capacity = static_cast<size_t>(f.tail_capacity);
  ro.in_process.train_k = f.request.attention.train_k;
  ro.in_process.exact_zone_keys_fraction = f.exact_zone;
  ro.replicas = static_cast<int>(f.replicas);
  if (!f.tls_cert_file.empty() || !f.tls_key_file.empty() || !f.tls_ca_file.empty()) {
#ifdef KVR_WITH_NODE_CLIENT
    KVR_ASSIGN_OR_RETURN(
        const std::optional<security::TlsFiles> tls,
        security::CheckTlsFiles(f.tls_cert_file, f.tls_key_file, f.tls_ca_file, 10));
    if (f.nodes.empty()) {
      return absl::InvalidArgumentError("--tls_cert_file, --tls_key_file, --tls_ca_file need --nodes");
    }
    ro.credentials = security::MakeMtlsChannelCredentials(*tls);
#else
    return absl::UnimplementedError("--tls_*: this kvr was built without KVR_WITH_SERVICES");
#endif
  }
  KVR_ASSIGN_OR_RETURN(std::unique_ptr<retrieval::RetrievalClient> node,
                       retrieval::MakeRetrievalClient(f.nodes, ro));
  KVR_ASSIGN_OR_RETURN(std::unique_ptr<worker::RetrievalEngine> engine,
                       worker::RetrievalEngine::Create(backend.get(), weights, node.get()));

  std::fwrite(f.request.prompt.data(), 1, f.request.prompt.size(), stdout);
  std::fflush(stdout);
  const auto start = std::chrono::steady_clock::now();
  KVR_ASSIGN_OR_RETURN(worker::GenerateResult result,
                       worker::Generate(*engine, *tok, f.request, [](std::string_view piece) {
                         std::fwrite(piece.data(), 1, piece.size(), stdout);
                         std::fflush(stdout);
                       }));
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::fputc('\n', stdout);
  std::fflush(stdout);

  const worker::EngineStats& s = result.stats;
  const double steps = s.decode_steps > 0 ? static_cast<double>(s.decode_steps) : 1.0;
  const size_t n = result.tokens.size();
  const worker::AttentionOptions& a = f.request.attention;
  std::string attention =
      a.mode == AttentionMode::kFull
          ? absl::StrFormat("full attention: %.1f tokens/step attended locally",
                            s.local_tokens / steps)
          : absl::StrFormat(
                "retrieval (sinks %d, window %d, top_k %d, index %s): per step and head "
                "%.1f tokens local + %.1f retrieved of %.1f offloaded",
                a.sinks, a.window, a.top_k, std::string(retrieval::IndexTypeName(a.index)),
                s.local_tokens / steps, s.retrieved_tokens / steps, s.node_held_tokens / steps);
  std::fprintf(stderr,
               "kvr: %zu tokens in %.3f s (%.1f tok/s; prompt %lld tokens, prefill %.1f ms); "
               "%s; finish %s\n",
               n, seconds, seconds > 0 ? static_cast<double>(n) / seconds : 0.0,
               static_cast<long long>(result.prompt_tokens), s.prefill_seconds * 1e3,
               attention.c_str(), std::string(worker::FinishReasonName(result.finish)).c_str());
  return absl::OkStatus();
}

int MainGenerate(const std::vector<std::string>& args) {
  Flags flags;
  bool help = false;
  if (absl::Status s = ParseGenerateFlags(args, &flags, &help); !s.ok()) {
    std::fprintf(stderr, "kvr generate: %s\n", std::string(s.message()).c_str());
    return 2;
  }
  if (help) {
    std::fputs(kGenerateUsage, stdout);
    return 0;
  }
  if (absl::Status s = RunGenerate(flags); !s.ok()) {
    std::fprintf(stderr, "\nkvr generate: %s\n", s.ToString().c_str());
    return 1;
  }
  return 0;
}

#ifdef KVR_WITH_NODE_CLIENT
int MainCluster(const std::vector<std::string>& args) {
  cluster::ClusterOptions options;
  bool help = false;
  if (absl::Status s = cluster::ParseClusterFlags(args, &options, &help); !s.ok()) {
    std::fprintf(stderr, "kvr cluster: %s\n", std::string(s.message()).c_str());
    return 2;
  }
  if (help) {
    std::fputs(cluster::kClusterUsage, stdout);
    return 0;
  }
  if (absl::Status s = cluster::RunCluster(options); !s.ok()) {
    std::fprintf(stderr, "kvr cluster: %s\n", std::string(s.message()).c_str());
    return 1;
  }
  return 0;
}

int MainClient(const std::vector<std::string>& args) {
  client::ClientOptions options;
  bool help = false;
  if (absl::Status s = client::ParseClientFlags(args, &options, &help); !s.ok()) {
    std::fprintf(stderr, "kvr client: %s\n", std::string(s.message()).c_str());
    return 2;
  }
  if (help) {
    std::fputs(client::kClientUsage, stdout);
    return 0;
  }
  return client::RunClient(options);
}
#endif

int Main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.empty() || args[0] == "--help" || args[0] == "-h" || args[0] == "help") {
    std::fputs(kUsage, args.empty() ? stderr : stdout);
    return args.empty() ? 2 : 0;
  }
  const std::string command = args[0];
  args.erase(args.begin());
  if (command == "generate") return MainGenerate(args);
  if (command == "capture") return capture::MainCapture(args);
#ifdef KVR_WITH_NODE_CLIENT
  if (command == "cluster") return MainCluster(args);
  if (command == "client") return MainClient(args);
  if (command == "apikey") return apikey::RunApiKey(args);
  if (command == "eval") return eval::RunEval(args);
#else
  if (command == "cluster" || command == "client" || command == "apikey" || command == "eval") {
    std::fprintf(stderr, "kvr %s: this kvr was built without KVR_WITH_SERVICES\n",
                 command.c_str());
    return 2;
  }
#endif
  std::fprintf(stderr,
               "kvr: unknown command \"%s\" (commands: generate, capture, cluster, client, apikey, eval; "
               "see kvr --help)\n",
               command.c_str());
  return 2;
}

}  // namespace
}  // namespace kvr

int main(int argc, char** argv) {
#ifdef KVR_WITH_NODE_CLIENT
  // Also makes libprotobuf precede libsentencepiece in DT_NEEDED (see
  // tools/CMakeLists.txt).
  GOOGLE_PROTOBUF_VERIFY_VERSION;
#endif
  return kvr::Main(argc, argv);
}
