// Fuzzes the decode worker's kvr.v1.Generation service (WorkerService,
// gpu_worker/server/worker_service.h: Generate, Tokenize, Detokenize,
// GetModelInfo) as a hostile client drives it, through the real service
// object on an in-process gRPC server (InProcessChannel, no sockets) over
// the bundled stories260K model (models/, or $KVR_MODELS), a CPU backend, a
// GenerationScheduler and an in-process retrieval node.
//
// Input: a stream of operations (fuzz_input.h WorkerOp): requests built
// from fields (ByteReader: small values or raw extremes; prompt text,
// stop strings and request ids taken from the bytes), or request protos
// parsed from the bytes. Every GenerateRequest is capped at kMaxTokens
// generated tokens (and long prompts at chunk_tokens >= 16) so one input
// stays cheap; everything else reaches the service as sent.
//
// Checks, besides "no crash, no sanitizer report": an OK Generate stream
// ends with one summary per choice (n x prompts; GenerateFinal.index) whose
// completion_tokens equals the tokens streamed for that index and is at
// most max_tokens; Tokenize ids lie in the vocabulary;
// GetModelInfo reports the model's vocabulary; and once the input's
// requests have ended the scheduler holds no request and the node no
// sequence and no accounted memory (polled, 10 s).
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <string>
#include <thread>

#include "fuzz/fuzz_input.h"
#include "fuzz/fuzz_support.h"
#include "gpu_worker/backend/backend.h"
#include "gpu_worker/engine/retrieval_engine.h"
#include "gpu_worker/model/llama2c_loader.h"
#include "gpu_worker/model/llama2c_tokenizer.h"
#include "gpu_worker/server/generation_scheduler.h"
#include "gpu_worker/server/worker_service.h"
#include "google/protobuf/stubs/logging.h"
#include "grpcpp/client_context.h"
#include "kvr/v1/generation.grpc.pb.h"
#include "retrieval_node/client/in_process_client.h"

namespace {

using kvr::fuzz::ByteReader;
namespace v1 = kvr::v1;
namespace worker = kvr::worker;
namespace retrieval = kvr::retrieval;

constexpr int32_t kMaxTokens = 4;        // generated tokens per Generate
constexpr size_t kLongPromptBytes = 128;  // longer text / more ids: chunk_tokens >= 16
constexpr int kLongPromptIds = 64;
constexpr int kMinLongChunk = 16;
constexpr int kMaxOps = 16;
constexpr int64_t kDeadlineMs = 30000;

[[noreturn]] void Fail(const std::string& what) {
  std::fprintf(stderr, "worker_fuzzer: %s\n", what.c_str());
  std::abort();
}

template <typename T>
T OrDie(absl::StatusOr<T> v, const char* what) {
  if (!v.ok()) Fail(std::string(what) + ": " + v.status().ToString());
  return *std::move(v);
}

struct Worker {
  std::shared_ptr<const worker::LlamaWeights> weights;
  std::unique_ptr<worker::Llama2cTokenizer> tokenizer;
  std::unique_ptr<worker::Backend> backend;
  std::unique_ptr<retrieval::InProcessRetrievalClient> node;
  std::unique_ptr<worker::RetrievalEngine> engine;
  std::unique_ptr<worker::GenerationScheduler> scheduler;
  std::unique_ptr<worker::WorkerService> service;
  std::unique_ptr<kvr::fuzz::InProcessServer<worker::WorkerService>> server;
  std::unique_ptr<v1::Generation::Stub> stub;

  Worker() {
    // Requests with invalid UTF-8 in string fields are refused by the parser
    // (and logged per call): keep the fuzzer's output to its own findings.
    if (std::getenv("KVR_FUZZ_TRACE") == nullptr) google::protobuf::SetLogHandler(nullptr);
    const std::string models = kvr::fuzz::ModelsDir();
    weights = OrDie(worker::LoadLlama2c(models + "/stories260K.bin"), "stories260K.bin");
    tokenizer = OrDie(worker::Llama2cTokenizer::Load(models + "/tok512.bin",
                                                     weights->config.vocab_size),
                      "tok512.bin");
    worker::BackendOptions bo;
    bo.num_threads = 1;
    backend = OrDie(worker::BackendRegistry::Create("cpu", bo), "cpu backend");
    retrieval::NodeCoreOptions no;
    no.threads = 1;
    no.tail_capacity = 16;
    no.train_k = 8;
    node = OrDie(retrieval::InProcessRetrievalClient::Create(no), "node");
    engine = OrDie(worker::RetrievalEngine::Create(backend.get(), weights, node.get()), "engine");
    worker::SchedulerOptions so;
    so.max_concurrent = 2;
    so.max_queue = 4;
    so.memory_budget_bytes = int64_t{256} << 20;
    so.max_finish_waiters = 4;
    scheduler = OrDie(worker::GenerationScheduler::Create(engine.get(), tokenizer.get(), so),
                      "scheduler");
    worker::WorkerServiceOptions wo;
    wo.model_name = "stories260K";
    wo.backend = backend->Describe();
    service = std::make_unique<worker::WorkerService>(scheduler.get(), tokenizer.get(),
                                                      node.get(), weights->config,
                                                      engine->max_seq_len(), wo);
    server = std::make_unique<kvr::fuzz::InProcessServer<worker::WorkerService>>(service.get());
    stub = v1::Generation::NewStub(server->channel());
  }
};

Worker& TheWorker() {
  static Worker* w = new Worker();  // lives for the process (threads inside)
  return *w;
}

// The harness's cost caps on a request (everything else is left as sent).
void Cap(v1::GenerateRequest* r) {
  if (!r->has_max_tokens() || r->max_tokens() > kMaxTokens) {
    r->set_max_tokens(r->has_max_tokens() ? std::min(r->max_tokens(), kMaxTokens) : kMaxTokens);
  }
  const bool long_prompt = r->text().size() > kLongPromptBytes ||
                           (r->has_tokens() && r->tokens().ids_size() > kLongPromptIds);
  v1::AttentionParams* a = r->mutable_attention();
  if (long_prompt && a->has_chunk_tokens() && a->chunk_tokens() >= 1 &&
      a->chunk_tokens() < kMinLongChunk) {
    a->set_chunk_tokens(kMinLongChunk);
  }
  // Several choices (n, prompts) stay cheap: at most 3 choices of at most 2
  // prompts (out-of-range values still reach the service as sent).
  if (r->has_n() && r->n() > 3 && r->n() <= 16) r->set_n(3);
  while (r->prompts_size() > 2 && r->prompts_size() <= 16) r->mutable_prompts()->RemoveLast();
  for (v1::Prompt& p : *r->mutable_prompts()) {
    if (p.text().size() > kLongPromptBytes) p.mutable_text()->resize(kLongPromptBytes);
    if (p.has_tokens() && p.tokens().ids_size() > kLongPromptIds) {
      p.mutable_tokens()->mutable_ids()->Truncate(kLongPromptIds);
    }
  }
}

class Session {
 public:
  Session(const uint8_t* data, size_t size) : in_(data, size), w_(TheWorker()) {}

  void Run() {
    for (int i = 0; i < kMaxOps && !in_.done(); ++i) {
      switch (in_.Byte() % kvr::fuzz::kWorkerOps) {
        case kvr::fuzz::kWorkerGenerate: {
          v1::GenerateRequest r = Build();
          Generate(r, /*cancel=*/false);
          break;
        }
        case kvr::fuzz::kWorkerGenerateRaw: {
          v1::GenerateRequest r;
          if (r.ParseFromString(in_.Blob())) Generate(r, /*cancel=*/in_.Byte() == 1);
          break;
        }
        case kvr::fuzz::kWorkerGenerateCancel: {
          v1::GenerateRequest r = Build();
          Generate(r, /*cancel=*/true);
          break;
        }
        case kvr::fuzz::kWorkerTokenize: {
          v1::TokenizeRequest r;
          r.set_text(in_.Blob());
          r.set_add_bos(in_.Byte() % 2 == 1);
          Tokenize(r);
          break;
        }
        case kvr::fuzz::kWorkerDetokenize: {
          v1::DetokenizeRequest r;
          const int32_t n = std::clamp(in_.Int32(16), 0, 4096);
          for (int32_t j = 0; j < n; ++j) r.add_ids(in_.Int32(600));
          Detokenize(r);
          break;
        }
        case kvr::fuzz::kWorkerInfo:
          Info(in_.Byte());
          break;
        default:
          Raw();
          break;
      }
    }
    CheckIdle();
  }

 private:
  v1::GenerateRequest Build() {
    v1::GenerateRequest r;
    switch (in_.Byte() % 4) {
      case 0:
      case 3:
        r.set_text(in_.Blob());
        break;
      case 1: {
        const int32_t n = std::clamp(in_.Int32(24), 0, 4096);
        v1::TokenIds* ids = r.mutable_tokens();
        for (int32_t j = 0; j < n; ++j) ids->add_ids(in_.Int32(600));
        break;
      }
      default:
        break;  // no prompt
    }
    if (in_.Byte() != 1) r.set_max_tokens(in_.Int32(kMaxTokens + 1));
    const int32_t stops = std::clamp(in_.Int32(3), 0, 20);
    for (int32_t j = 0; j < stops; ++j) r.add_stop(in_.Blob());
    v1::SamplingParams* s = r.mutable_sampling();
    s->set_temperature(in_.Float());
    s->set_top_k(in_.Int32(50));
    const uint8_t opt = in_.Byte();
    if (opt & 1) s->set_top_p(in_.Float());
    if (opt & 2) s->set_repetition_penalty(in_.Float());
    if (opt & 4) s->set_seed(in_.Uint64(1000));
    v1::AttentionParams* a = r.mutable_attention();
    switch (in_.Byte() % 4) {
      case 1: a->set_mode("full"); break;
      case 2: a->set_mode("retrieval"); break;
      case 3: a->set_mode(in_.Blob()); break;
      default: break;
    }
    const uint8_t aopt = in_.Byte();
    if (aopt & 1) a->set_sinks(in_.Int32(8));
    if (aopt & 2) a->set_window(in_.Int32(32));
    if (aopt & 4) a->set_top_k(in_.Int32(20));
    if (aopt & 8) a->set_beam(in_.Int32(20));
    if (aopt & 16) a->set_chunk_tokens(in_.Int32(64));
    if (aopt & 32) r.set_request_id(in_.Blob());
    return r;
  }

  // Streams `r` (capped) to the end, or cancels it after its first message.
  void Generate(v1::GenerateRequest r, bool cancel) {
    Cap(&r);
    grpc::ClientContext c;
    kvr::fuzz::SetDeadline(&c, kDeadlineMs);
    std::unique_ptr<grpc::ClientReader<v1::GenerateResponse>> reader = w_.stub->Generate(&c, r);
    v1::GenerateResponse m;
    // Per choice (GenerateChunk / GenerateFinal index; one for n = 1).
    std::map<int32_t, int64_t> tokens, completion;
    int64_t finals = 0;
    while (reader->Read(&m)) {
      if (cancel) c.TryCancel();
      if (m.has_chunk()) tokens[m.chunk().index()] += m.chunk().token_ids_size();
      if (m.has_summary()) {
        ++finals;
        completion[m.summary().index()] = m.summary().usage().completion_tokens();
      }
    }
    const grpc::Status st = reader->Finish();
    if (std::getenv("KVR_FUZZ_TRACE") != nullptr) {  // what the seeds reach
      std::fprintf(stderr, "Generate: %d %s (%zu choices)\n", st.error_code(),
                   st.error_message().c_str(), completion.size());
    }
    if (!st.ok() || cancel) return;
    const int64_t choices = int64_t{r.has_n() ? r.n() : 1} * std::max(1, r.prompts_size());
    if (finals != choices || static_cast<int64_t>(completion.size()) != choices) {
      Fail("Generate OK with " + std::to_string(finals) + " summaries for " +
           std::to_string(choices) + " choices");
    }
    for (const auto& [index, done] : completion) {
      const int64_t streamed = tokens.count(index) != 0 ? tokens.at(index) : 0;
      if (index < 0 || index >= choices || done != streamed || done > r.max_tokens()) {
        Fail("Generate OK with choice " + std::to_string(index) + " completion_tokens " +
             std::to_string(done) + ", " + std::to_string(streamed) +
             " tokens streamed, max_tokens " + std::to_string(r.max_tokens()));
      }
    }
  }

  void Tokenize(const v1::TokenizeRequest& r) {
    grpc::ClientContext c;
    kvr::fuzz::SetDeadline(&c, kDeadlineMs);
    v1::TokenizeResponse out;
    if (!w_.stub->Tokenize(&c, r, &out).ok()) return;
    for (int32_t id : out.ids()) {
      if (id < 0 || id >= w_.weights->config.vocab_size) {
        Fail("Tokenize gave id " + std::to_string(id) + " outside the vocabulary");
      }
    }
  }

  void Detokenize(const v1::DetokenizeRequest& r) {
    grpc::ClientContext c;
    kvr::fuzz::SetDeadline(&c, kDeadlineMs);
    v1::DetokenizeResponse out;
    (void)w_.stub->Detokenize(&c, r, &out);
  }

  // GetModelInfo, waiting for no request, for the requests already ended
  // (answered at once), or for a raw count (a 20 ms deadline: the waiter is
  // cancelled).
  void Info(uint8_t how) {
    v1::GetModelInfoRequest r;
    grpc::ClientContext c;
    int64_t ms = kDeadlineMs;
    switch (how % 3) {
      case 1:
        r.set_wait_finished_requests(w_.scheduler->load().finished);
        break;
      case 2:
        r.set_wait_finished_requests(in_.Int64(4));
        ms = 20;
        break;
      default:
        break;
    }
    kvr::fuzz::SetDeadline(&c, ms);
    v1::GetModelInfoResponse out;
    if (!w_.stub->GetModelInfo(&c, r, &out).ok()) return;
    if (out.vocab_size() != w_.weights->config.vocab_size) Fail("GetModelInfo: wrong vocab_size");
  }

  void Raw() {
    const uint8_t which = in_.Byte() % 3;
    const std::string blob = in_.Blob();
    if (which == 0) {
      v1::TokenizeRequest r;
      if (r.ParseFromString(blob)) Tokenize(r);
    } else if (which == 1) {
      v1::DetokenizeRequest r;
      if (r.ParseFromString(blob)) Detokenize(r);
    } else {
      v1::GetModelInfoRequest r;
      if (!r.ParseFromString(blob)) return;
      grpc::ClientContext c;
      kvr::fuzz::SetDeadline(&c, 20);
      v1::GetModelInfoResponse out;
      (void)w_.stub->GetModelInfo(&c, r, &out);
    }
  }

  // Every request of this input has ended: the scheduler must come back to
  // idle and the node to empty (shards of ended sequences dropped).
  void CheckIdle() {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (true) {
      const worker::SchedulerLoad load = w_.scheduler->load();
      absl::StatusOr<retrieval::NodeStats> stats = w_.node->core().Stats();
      const int64_t used = w_.node->core().MemoryUsedBytes();
      const bool idle = load.active == 0 && load.queued == 0 && load.reserved_bytes == 0 &&
                        stats.ok() && stats->sequences == 0 && used == 0;
      if (idle) return;
      if (std::chrono::steady_clock::now() > deadline) {
        Fail("not idle 10 s after the input: active " + std::to_string(load.active) +
             ", queued " + std::to_string(load.queued) + ", reserved_bytes " +
             std::to_string(load.reserved_bytes) + ", node sequences " +
             (stats.ok() ? std::to_string(stats->sequences) : "?") + ", node memory " +
             std::to_string(used));
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
  }

  ByteReader in_;
  Worker& w_;
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  Session(data, size).Run();
  return 0;
}
