// End-to-end test of the generation API: a real kvr_worker process (CPU
// backend, in-process retrieval node, stories260K) on 127.0.0.1 (port read
// from its "kvr_worker listening on HOST:PORT" line), driven through the
// kvr.v1.Generation stubs. The expected outputs are computed in this process
// with the embedded engine API (worker::Generate) and the same settings.
//
//  * greedy "Once upon a time" streams exactly the embedded text and tokens;
//    the final message's usage counts are right;
//  * 8 concurrent streams (different prompts, seeds, sampling, modes) each
//    equal their solo embedded output;
//  * TryCancel mid-stream ends the stream with CANCELLED and the worker's
//    node then holds no shards (GetModelInfo.wait_finished_requests waits for
//    the clean-up, no polling);
//  * bad requests get INVALID_ARGUMENT / OUT_OF_RANGE naming the field and
//    the limit; a full queue gives RESOURCE_EXHAUSTED; the worker keeps
//    serving;
//  * health SERVING, reflection lists the service, SIGTERM exits 0.
//
//  * a worker on a real kvr_node (--nodes) streams the embedded output, and
//    a cancelled stream leaves no shards on that node;
//  * every stream starts with prefill progress (0 of N, one per layer, the
//    last N of N prompt tokens) before its first token;
//  * a long prompt's prefill does not block the streams already decoding:
//    their chunks arrive between its first progress and its first token;
//  * attention.chunk_tokens shards the sequence (same output as embedded);
//  * --backend: cpu by default (GetModelInfo.backend), clear errors else;
//  * the shared decode loop (RequestLoop) never ends a text piece inside a
//    UTF-8 sequence (real tokenizer byte tokens, forced by one-hot logits).
//
// Usage: generation_e2e_test --kvr_worker PATH [--kvr_node PATH] [gtest flags]
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "common/subprocess.h"
#include "tests/support/metrics_page.h"
#include "tests/support/reflection.h"
#include "tests/support/server_process.h"
#include "gpu_worker/backend/backend.h"
#include "gpu_worker/engine/generation.h"
#include "gpu_worker/model/llama2c_loader.h"
#include "gpu_worker/model/llama2c_tokenizer.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/client_context.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/generic/generic_stub.h"
#include "grpcpp/security/credentials.h"
#include "grpcpp/support/byte_buffer.h"
#include "gtest/gtest.h"
#include "kvr/v1/generation.grpc.pb.h"
#include "retrieval_node/client/in_process_client.h"

namespace kvr::worker {
namespace {

std::string g_worker_binary;  // --kvr_worker
std::string g_cuda_emulated_plugin;  // --cuda_emulated_plugin
std::string g_node_binary;    // --kvr_node (optional)

constexpr auto kCallTimeout = std::chrono::seconds(60);

using kvr::test_support::ServerProcess;

// The embedded engine (same model, node options and engine options as kvr_worker).
struct Embedded {
  std::shared_ptr<const LlamaWeights> weights;
  std::unique_ptr<Llama2cTokenizer> tokenizer;
  std::unique_ptr<Backend> backend;
  std::unique_ptr<retrieval::InProcessRetrievalClient> node;
  std::unique_ptr<RetrievalEngine> engine;

  static std::unique_ptr<Embedded> Create() {
    const char* dir = std::getenv("KVR_MODELS");
    if (dir == nullptr) {
      ADD_FAILURE() << "KVR_MODELS is not set";
      return nullptr;
    }
    auto e = std::make_unique<Embedded>();
    auto w = LoadLlama2c(std::string(dir) + "/stories260K.bin");
    if (!w.ok()) return ADD_FAILURE() << w.status(), nullptr;
    e->weights = *w;
    auto t = Llama2cTokenizer::Load(std::string(dir) + "/tok512.bin", e->weights->config.vocab_size);
    if (!t.ok()) return ADD_FAILURE() << t.status(), nullptr;
    e->tokenizer = *std::move(t);
    BackendOptions bo;
    bo.num_threads = 1;
    auto b = BackendRegistry::Create("cpu", bo);
    if (!b.ok()) return ADD_FAILURE() << b.status(), nullptr;
    e->backend = *std::move(b);
    auto n = retrieval::InProcessRetrievalClient::Create({});
    if (!n.ok()) return ADD_FAILURE() << n.status(), nullptr;
    e->node = *std::move(n);
    auto en = RetrievalEngine::Create(e->backend.get(), e->weights, e->node.get());
    if (!en.ok()) return ADD_FAILURE() << en.status(), nullptr;
    e->engine = *std::move(en);
    return e;
  }

  GenerateResult Run(const GenerateRequest& r) {
    absl::StatusOr<GenerateResult> res = Generate(*engine, *tokenizer, r);
    EXPECT_TRUE(res.ok()) << res.status();
    EXPECT_TRUE(engine->EndSequence().ok());
    return res.ok() ? *std::move(res) : GenerateResult{};
  }
};

// The same request for the embedded engine and for the API.
struct Case {
  std::string prompt;
  int max_tokens = 64;
  float temperature = 0.0f;
  int top_k = 0;
  float top_p = 1.0f;
  float repetition_penalty = 1.0f;
  uint64_t seed = 1;
  std::vector<std::string> stop;
  std::string mode = "retrieval";
  int chunk_tokens = 0;  // 0: the default

  GenerateRequest Embedded() const {
    GenerateRequest r;
    r.prompt = prompt;
    r.max_tokens = max_tokens;
    r.stop = stop;
    r.sampling.temperature = temperature;
    r.sampling.top_k = top_k;
    r.sampling.top_p = top_p;
    r.sampling.repetition_penalty = repetition_penalty;
    r.sampling.seed = seed;
    r.attention.mode = mode == "full" ? AttentionMode::kFull : AttentionMode::kRetrieval;
    if (chunk_tokens > 0) r.attention.chunk_tokens = chunk_tokens;
    return r;
  }
  v1::GenerateRequest Proto(const std::string& id) const {
    v1::GenerateRequest r;
    r.set_text(prompt);
    r.set_max_tokens(max_tokens);
    for (const std::string& s : stop) r.add_stop(s);
    r.mutable_sampling()->set_temperature(temperature);
    r.mutable_sampling()->set_top_k(top_k);
    r.mutable_sampling()->set_top_p(top_p);
    r.mutable_sampling()->set_repetition_penalty(repetition_penalty);
    r.mutable_sampling()->set_seed(seed);
    r.mutable_attention()->set_mode(mode);
    if (chunk_tokens > 0) r.mutable_attention()->set_chunk_tokens(chunk_tokens);
    r.set_request_id(id);
    return r;
  }
};

// What one Generate stream delivered.
struct Streamed {
  std::string text;
  std::vector<int32_t> tokens;
  int chunks = 0;
  std::vector<v1::PrefillProgress> progress;
  int progress_after_chunk = 0;  // progress messages after the first chunk
  std::optional<v1::GenerateFinal> summary;
  int messages_after_summary = 0;
  grpc::Status status;
};

void SetDeadline(grpc::ClientContext* ctx) {
  ctx->set_deadline(std::chrono::system_clock::now() + kCallTimeout);
}

Streamed Stream(v1::Generation::Stub* stub, const v1::GenerateRequest& request) {
  Streamed out;
  grpc::ClientContext ctx;
  SetDeadline(&ctx);
  auto reader = stub->Generate(&ctx, request);
  v1::GenerateResponse msg;
  while (reader->Read(&msg)) {
    if (out.summary.has_value()) ++out.messages_after_summary;
    if (msg.has_prefill_progress()) {
      out.progress.push_back(msg.prefill_progress());
      if (out.chunks > 0) ++out.progress_after_chunk;
    } else if (msg.has_chunk()) {
      ++out.chunks;
      out.text += msg.chunk().text();
      out.tokens.insert(out.tokens.end(), msg.chunk().token_ids().begin(),
                        msg.chunk().token_ids().end());
    } else if (msg.has_summary()) {
      out.summary = msg.summary();
    }
  }
  out.status = reader->Finish();
  return out;
}

v1::FinishReason ToProto(FinishReason r) {
  switch (r) {
    case FinishReason::kLength: return v1::FINISH_REASON_LENGTH;
    case FinishReason::kStop: return v1::FINISH_REASON_STOP;
    case FinishReason::kEos: return v1::FINISH_REASON_EOS;
    case FinishReason::kContextFull: return v1::FINISH_REASON_CONTEXT_FULL;
    case FinishReason::kCancelled: return v1::FINISH_REASON_CANCELLED;
  }
  return v1::FINISH_REASON_UNSPECIFIED;
}

void ExpectSame(const Streamed& got, const GenerateResult& want, const std::string& what) {
  ASSERT_TRUE(got.status.ok()) << what << ": " << got.status.error_message();
  ASSERT_TRUE(got.summary.has_value()) << what << ": no final message";
  EXPECT_EQ(got.messages_after_summary, 0) << what;
  EXPECT_EQ(got.text, want.text) << what;
  EXPECT_EQ(got.tokens, want.tokens) << what;
  EXPECT_EQ(got.summary->usage().prompt_tokens(), want.prompt_tokens) << what;
  EXPECT_EQ(got.summary->usage().completion_tokens(), static_cast<int64_t>(want.tokens.size()))
      << what;
  EXPECT_EQ(got.summary->finish_reason(), ToProto(want.finish)) << what;
  // Prefill progress comes first: 0 of N, ..., N of N (N = prompt tokens).
  ASSERT_GE(got.progress.size(), 2u) << what;
  EXPECT_EQ(got.progress_after_chunk, 0) << what;
  EXPECT_EQ(got.progress.front().prompt_tokens_done(), 0) << what;
  EXPECT_EQ(got.progress.back().prompt_tokens_done(), want.prompt_tokens) << what;
  EXPECT_EQ(got.progress.back().layers_done(), got.progress.back().layers_total()) << what;
  for (size_t i = 0; i < got.progress.size(); ++i) {
    const v1::PrefillProgress& p = got.progress[i];
    EXPECT_EQ(p.prompt_tokens_total(), want.prompt_tokens) << what;
    EXPECT_GT(p.layers_total(), 0) << what;
    // Per layer: done = total * layers_done / layers_total, increasing.
    EXPECT_EQ(p.prompt_tokens_done(), want.prompt_tokens * p.layers_done() / p.layers_total())
        << what;
    if (i > 0) {
      EXPECT_GT(p.layers_done(), got.progress[i - 1].layers_done()) << what;
    }
  }
}

// Reads the next message that is not prefill progress; false at the end.
template <typename Reader>
bool ReadPastProgress(Reader* reader, v1::GenerateResponse* msg) {
  while (reader->Read(msg)) {
    if (!msg->has_prefill_progress()) return true;
  }
  return false;
}

v1::GetModelInfoResponse Info(v1::Generation::Stub* stub, int64_t wait_finished = 0) {
  grpc::ClientContext ctx;
  SetDeadline(&ctx);
  v1::GetModelInfoRequest req;
  req.set_wait_finished_requests(wait_finished);
  v1::GetModelInfoResponse resp;
  const grpc::Status s = stub->GetModelInfo(&ctx, req, &resp);
  EXPECT_TRUE(s.ok()) << s.error_message();
  return resp;
}

// A prompt longer than sinks + window (20 tokens), so prefill offloads shards.
constexpr char kLongPrompt[] =
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the sun "
    "with her big red ball and her dog.";

class GenerationE2eTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    embedded_ = Embedded::Create().release();
    worker_ = ServerProcess::Start(g_worker_binary, "kvr_worker",
                                   {"--max_concurrent=4", "--max_queue=16"})
                  .release();
  }
  static void TearDownTestSuite() {
    if (worker_ != nullptr) {
      const std::optional<int> st = worker_->Stop(SIGTERM);
      EXPECT_TRUE(st.has_value() && WIFEXITED(*st) && WEXITSTATUS(*st) == 0)
          << "kvr_worker did not exit 0 on SIGTERM";
    }
    delete worker_;
    delete embedded_;
    worker_ = nullptr;
    embedded_ = nullptr;
  }
  void SetUp() override {
    ASSERT_NE(embedded_, nullptr);
    ASSERT_NE(worker_, nullptr);
    channel_ = grpc::CreateChannel(worker_->address(), grpc::InsecureChannelCredentials());
    stub_ = v1::Generation::NewStub(channel_);
  }

  static Embedded* embedded_;
  static ServerProcess* worker_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::Generation::Stub> stub_;
};
Embedded* GenerationE2eTest::embedded_ = nullptr;
ServerProcess* GenerationE2eTest::worker_ = nullptr;

TEST_F(GenerationE2eTest, GreedyStreamEqualsEmbedded) {
  for (const std::string mode : {"retrieval", "full"}) {
    Case c;
    c.prompt = "Once upon a time";
    c.max_tokens = 120;
    c.mode = mode;
    const GenerateResult want = embedded_->Run(c.Embedded());
    ASSERT_EQ(want.tokens.size(), 120u);
    // Tokens sampled while a write is in flight join the next chunk (by
    // design: a slow reader never blocks the engine). On a loaded machine the
    // first write's completion (a gRPC callback thread) could come after all
    // 120 tokens (~0.1-0.6 s) were sampled, so one stream could legitimately
    // be a single chunk. A worker that does not stream at all gives one chunk
    // every time: up to 3 streams, each checked token for token, and at least
    // one of them must arrive in several chunks.
    Streamed got;
    std::vector<int> chunk_counts;
    for (int attempt = 0; attempt < 3 && (chunk_counts.empty() || got.chunks <= 1); ++attempt) {
      got = Stream(stub_.get(), c.Proto("greedy-" + mode));
      ExpectSame(got, want, mode);
      chunk_counts.push_back(got.chunks);
    }
    EXPECT_GT(got.chunks, 1) << "the text must stream, not arrive at once (chunks per stream: "
                             << ::testing::PrintToString(chunk_counts) << ")";
    ASSERT_TRUE(got.summary.has_value());
    EXPECT_EQ(got.summary->request_id(), "greedy-" + mode);
    EXPECT_EQ(got.summary->usage().prompt_tokens(), 5);  // BOS + 4 tokens
    const v1::Timings& t = got.summary->timings();
    EXPECT_GT(t.time_to_first_token_seconds(), 0.0);
    EXPECT_GT(t.mean_token_latency_seconds(), 0.0);
    EXPECT_GE(t.total_seconds(), t.time_to_first_token_seconds());
  }
}

TEST_F(GenerationE2eTest, StopStringsAndTokenPrompt) {
  Case c;
  c.prompt = "Once upon a time";
  c.max_tokens = 200;
  c.stop = {"."};
  const GenerateResult want = embedded_->Run(c.Embedded());
  ASSERT_EQ(want.finish, FinishReason::kStop);
  ExpectSame(Stream(stub_.get(), c.Proto("stop")), want, "stop");

  // The same prompt as token ids gives the same output.
  auto ids = embedded_->tokenizer->Encode(c.prompt, /*add_bos=*/true);
  ASSERT_TRUE(ids.ok());
  v1::GenerateRequest r = c.Proto("ids");
  r.mutable_tokens()->mutable_ids()->Add(ids->begin(), ids->end());
  ExpectSame(Stream(stub_.get(), r), want, "token prompt");
}

TEST_F(GenerationE2eTest, ConcurrentStreamsEqualSolo) {
  const std::vector<std::string> prompts = {
      "Once upon a time", "The cat", "Lily and Tom went to the park", kLongPrompt,
      "One day, a little bird", "The sun was shining", "Ben had a red car", "Sara liked to"};
  std::vector<Case> cases(prompts.size());
  std::vector<GenerateResult> want(cases.size());
  for (size_t i = 0; i < cases.size(); ++i) {
    Case& c = cases[i];
    c.prompt = prompts[i];
    c.max_tokens = 60 + 20 * static_cast<int>(i);
    c.seed = 100 + i;
    c.temperature = i % 4 == 0 ? 0.0f : 0.9f;
    c.top_p = i % 3 == 0 ? 0.9f : 1.0f;
    c.top_k = i % 2 == 0 ? 40 : 0;
    c.repetition_penalty = i == 5 ? 1.2f : 1.0f;
    c.mode = i == 2 || i == 7 ? "full" : "retrieval";  // kLongPrompt (3) offloads
    want[i] = embedded_->Run(c.Embedded());
  }
  std::vector<Streamed> got(cases.size());
  std::vector<std::thread> threads;
  for (size_t i = 0; i < cases.size(); ++i) {
    threads.emplace_back([&, i] {
      got[i] = Stream(stub_.get(), cases[i].Proto("c" + std::to_string(i)));
    });
  }
  for (std::thread& t : threads) t.join();
  for (size_t i = 0; i < cases.size(); ++i) {
    ExpectSame(got[i], want[i], "stream " + std::to_string(i));
  }
}

// Issue 7: one long request does not block the others. Stream A decodes
// while stream B's ~490-token prompt prefills; both readers append what
// they receive to one ordered log. The worker lets one decode step run after
// each prefill layer (and streams its tokens before the next layer starts),
// so A's chunks arrive between B's first prefill progress and B's first
// token — B's prefill is n_layers layers of a near-full context, each
// followed by a step of A, which leaves far more room than the order of two
// reader threads can blur. Both outputs equal their solo embedded runs.
TEST_F(GenerationE2eTest, LongPrefillDoesNotBlockOtherStreams) {
  Case a;
  a.prompt = "Once upon a time";
  a.max_tokens = 400;
  Case b;
  while (embedded_->tokenizer->Encode(b.prompt + kLongPrompt + " ", true)->size() < 500) {
    b.prompt += std::string(kLongPrompt) + " ";
  }
  b.max_tokens = 8;
  const GenerateResult want_a = embedded_->Run(a.Embedded());
  const GenerateResult want_b = embedded_->Run(b.Embedded());
  // A must outlast B's prefill: it decodes hundreds of tokens.
  ASSERT_GE(want_a.tokens.size(), 300u);
  ASSERT_GE(want_b.prompt_tokens, 450);

  struct Event {
    char stream;
    enum Kind { kProgress, kChunk, kSummary } kind;
    int layers_done = 0;
  };
  std::mutex mu;
  std::condition_variable cv;
  std::vector<Event> log;
  Streamed got[2];
  auto read = [&](int i, const Case& c) {
    const char name = i == 0 ? 'A' : 'B';
    Streamed& out = got[i];
    grpc::ClientContext ctx;
    SetDeadline(&ctx);
    auto reader = stub_->Generate(&ctx, c.Proto(std::string(1, name)));
    v1::GenerateResponse msg;
    while (reader->Read(&msg)) {
      std::lock_guard<std::mutex> lock(mu);
      if (msg.has_prefill_progress()) {
        out.progress.push_back(msg.prefill_progress());
        if (out.chunks > 0) ++out.progress_after_chunk;
        log.push_back({name, Event::kProgress, msg.prefill_progress().layers_done()});
      } else if (msg.has_chunk()) {
        ++out.chunks;
        out.text += msg.chunk().text();
        out.tokens.insert(out.tokens.end(), msg.chunk().token_ids().begin(),
                          msg.chunk().token_ids().end());
        log.push_back({name, Event::kChunk});
      } else if (msg.has_summary()) {
        out.summary = msg.summary();
        log.push_back({name, Event::kSummary});
      }
      cv.notify_all();
    }
    out.status = reader->Finish();
  };
  std::thread thread_a(read, 0, a);
  {
    // B goes out once A is admitted (its first message): A is then prefilled
    // first and decodes while B prefills.
    std::unique_lock<std::mutex> lock(mu);
    EXPECT_TRUE(cv.wait_for(lock, kCallTimeout, [&] { return !log.empty(); }));
  }
  std::thread thread_b(read, 1, b);
  thread_a.join();
  thread_b.join();
  ExpectSame(got[0], want_a, "A");
  ExpectSame(got[1], want_b, "B");

  size_t b_first_progress = log.size(), b_first_chunk = log.size();
  for (size_t i = 0; i < log.size(); ++i) {
    if (log[i].stream != 'B') continue;
    if (log[i].kind == Event::kProgress && b_first_progress == log.size()) b_first_progress = i;
    if (log[i].kind == Event::kChunk && b_first_chunk == log.size()) b_first_chunk = i;
  }
  ASSERT_LT(b_first_progress, b_first_chunk);
  int a_chunks = 0;
  for (size_t i = b_first_progress + 1; i < b_first_chunk; ++i) {
    if (log[i].stream == 'A' && log[i].kind == Event::kChunk) ++a_chunks;
  }
  EXPECT_GE(a_chunks, 1) << "stream A got no token while B's prompt prefilled";
  // B's prefill reported its layers (some progress messages may coalesce).
  EXPECT_GE(got[1].progress.size(), 2u);
  EXPECT_EQ(got[1].progress.back().layers_total(), embedded_->weights->config.n_layers);
  ASSERT_TRUE(got[1].summary.has_value());
  std::printf("B: %lld prompt tokens prefilled in %.1f ms; %d chunks of A meanwhile\n",
              static_cast<long long>(want_b.prompt_tokens),
              got[1].summary->timings().prefill_seconds() * 1e3, a_chunks);
}

TEST_F(GenerationE2eTest, CancelMidStreamFreesShards) {
  const int64_t finished_before = Info(stub_.get()).finished_requests();
  Case c;
  c.prompt = kLongPrompt;
  c.max_tokens = 400;
  grpc::ClientContext ctx;
  SetDeadline(&ctx);
  auto reader = stub_->Generate(&ctx, c.Proto("cancel-me"));
  v1::GenerateResponse msg;
  size_t tokens = 0;
  while (tokens < 8 && ReadPastProgress(reader.get(), &msg)) {
    ASSERT_TRUE(msg.has_chunk()) << "the stream ended before it could be cancelled";
    tokens += static_cast<size_t>(msg.chunk().token_ids_size());
  }
  // Mid-stream: the prompt's middle tokens are on the node.
  const v1::GetModelInfoResponse during = Info(stub_.get());
  EXPECT_GT(during.node_shards(), 0);
  EXPECT_EQ(during.active_sequences(), 1);
  ctx.TryCancel();
  bool saw_summary = false;
  while (reader->Read(&msg)) saw_summary |= msg.has_summary();
  const grpc::Status st = reader->Finish();
  EXPECT_EQ(st.error_code(), grpc::StatusCode::CANCELLED) << st.error_message();
  EXPECT_FALSE(saw_summary);
  // Waits (server side, no polling) until the cancelled request has ended.
  const v1::GetModelInfoResponse after = Info(stub_.get(), finished_before + 1);
  EXPECT_EQ(after.finished_requests(), finished_before + 1);
  EXPECT_EQ(after.node_shards(), 0);
  EXPECT_EQ(after.node_sequences(), 0);
  EXPECT_EQ(after.active_sequences(), 0);
  // And it keeps serving.
  Case ok;
  ok.prompt = "The cat";
  ok.max_tokens = 16;
  ExpectSame(Stream(stub_.get(), ok.Proto("after-cancel")), embedded_->Run(ok.Embedded()),
             "after cancel");
}

TEST_F(GenerationE2eTest, BadRequestsGetPreciseErrors) {
  Case base;
  base.prompt = "Once upon a time";
  base.max_tokens = 8;
  struct Bad {
    std::string name;
    v1::GenerateRequest request;
    grpc::StatusCode code;
    std::vector<std::string> message_has;
  };
  std::vector<Bad> bad;
  {
    v1::GenerateRequest r = base.Proto("neg");
    r.set_max_tokens(-1);
    bad.push_back({"negative max_tokens", r, grpc::StatusCode::INVALID_ARGUMENT,
                   {"max_tokens", "-1", ">= 0"}});
  }
  {
    v1::GenerateRequest r = base.Proto("nan");
    r.mutable_sampling()->set_temperature(std::numeric_limits<float>::quiet_NaN());
    bad.push_back({"NaN temperature", r, grpc::StatusCode::INVALID_ARGUMENT,
                   {"sampling.temperature", "nan"}});
  }
  {
    v1::GenerateRequest r = base.Proto("top_p");
    r.mutable_sampling()->set_top_p(1.5f);
    bad.push_back({"top_p 1.5", r, grpc::StatusCode::INVALID_ARGUMENT,
                   {"sampling.top_p", "(0, 1]"}});
  }
  {
    v1::GenerateRequest r = base.Proto("mode");
    r.mutable_attention()->set_mode("sparse");
    bad.push_back({"unknown attention mode", r, grpc::StatusCode::INVALID_ARGUMENT,
                   {"attention.mode", "sparse"}});
  }
  {
    v1::GenerateRequest r = base.Proto("window");
    r.mutable_attention()->set_window(0);
    bad.push_back({"window 0", r, grpc::StatusCode::INVALID_ARGUMENT, {"attention.window"}});
  }
  {
    v1::GenerateRequest r = base.Proto("chunk");
    r.mutable_attention()->set_chunk_tokens(0);
    bad.push_back({"chunk_tokens 0", r, grpc::StatusCode::INVALID_ARGUMENT,
                   {"attention.chunk_tokens", "0", "[1, 16777216]"}});
  }
  {
    v1::GenerateRequest r = base.Proto("long-text");
    std::string text;
    for (int i = 0; i < 300; ++i) text += "Once upon a time ";
    r.set_text(text);
    bad.push_back({"prompt text over the context", r, grpc::StatusCode::OUT_OF_RANGE,
                   {"prompt", "512"}});
  }
  {
    v1::GenerateRequest r = base.Proto("long-ids");
    for (int i = 0; i < 513; ++i) r.mutable_tokens()->add_ids(1 + i % 300);
    bad.push_back({"prompt ids over the context", r, grpc::StatusCode::OUT_OF_RANGE,
                   {"513", "512"}});
  }
  {
    v1::GenerateRequest r = base.Proto("bad-id");
    r.mutable_tokens()->add_ids(1);
    r.mutable_tokens()->add_ids(512);
    bad.push_back({"token id out of vocab", r, grpc::StatusCode::INVALID_ARGUMENT,
                   {"[1]", "512"}});
  }
  {
    v1::GenerateRequest r = base.Proto("empty-stop");
    r.add_stop("");
    bad.push_back({"empty stop", r, grpc::StatusCode::INVALID_ARGUMENT, {"stop[0]"}});
  }
  {
    v1::GenerateRequest r;
    r.set_max_tokens(4);
    bad.push_back({"no prompt", r, grpc::StatusCode::INVALID_ARGUMENT, {"prompt"}});
  }
  const int64_t finished_before = Info(stub_.get()).finished_requests();
  for (const Bad& b : bad) {
    const Streamed got = Stream(stub_.get(), b.request);
    EXPECT_EQ(got.status.error_code(), b.code) << b.name << ": " << got.status.error_message();
    for (const std::string& part : b.message_has) {
      EXPECT_NE(got.status.error_message().find(part), std::string::npos)
          << b.name << ": \"" << got.status.error_message() << "\" lacks \"" << part << "\"";
    }
    EXPECT_TRUE(got.tokens.empty()) << b.name;
  }
  // Rejected requests never reached the scheduler; the worker still serves.
  EXPECT_EQ(Info(stub_.get()).finished_requests(), finished_before);
  ExpectSame(Stream(stub_.get(), base.Proto("good")), embedded_->Run(base.Embedded()),
             "after bad requests");
}

TEST_F(GenerationE2eTest, TokenizeDetokenizeAndModelInfo) {
  grpc::ClientContext c1;
  SetDeadline(&c1);
  v1::TokenizeRequest tr;
  tr.set_text("Once upon a time");
  tr.set_add_bos(true);
  v1::TokenizeResponse tresp;
  ASSERT_TRUE(stub_->Tokenize(&c1, tr, &tresp).ok());
  auto want = embedded_->tokenizer->Encode("Once upon a time", true);
  ASSERT_TRUE(want.ok());
  EXPECT_EQ(std::vector<int32_t>(tresp.ids().begin(), tresp.ids().end()), *want);

  grpc::ClientContext c2;
  SetDeadline(&c2);
  v1::DetokenizeRequest dr;
  dr.mutable_ids()->Add(tresp.ids().begin() + 1, tresp.ids().end());  // without BOS
  v1::DetokenizeResponse dresp;
  ASSERT_TRUE(stub_->Detokenize(&c2, dr, &dresp).ok());
  EXPECT_EQ(dresp.text(), "Once upon a time");

  grpc::ClientContext c3;
  SetDeadline(&c3);
  dr.add_ids(-3);
  const grpc::Status bad = stub_->Detokenize(&c3, dr, &dresp);
  EXPECT_EQ(bad.error_code(), grpc::StatusCode::INVALID_ARGUMENT);

  const v1::GetModelInfoResponse info = Info(stub_.get());
  EXPECT_EQ(info.vocab_size(), 512);
  EXPECT_EQ(info.max_context_tokens(), 512);
  EXPECT_EQ(info.n_layers(), embedded_->weights->config.n_layers);
  EXPECT_EQ(info.max_concurrent(), 4);
  EXPECT_EQ(info.max_queue(), 16);
  EXPECT_EQ(info.node_shards(), 0);
  // The default backend, as Backend::Describe() puts it ("cpu (1 threads, ...").
  EXPECT_EQ(info.backend().rfind("cpu", 0), 0u) << info.backend();
}

// chunk_tokens reaches the engine: small placement chunks (several per
// (layer, kv head) for this prompt) give the embedded output with the same
// setting, and more shards on the node than the default one chunk.
TEST_F(GenerationE2eTest, ChunkTokensShardsTheSequence) {
  const int64_t finished_before = Info(stub_.get()).finished_requests();
  Case c;
  c.prompt = kLongPrompt;
  c.max_tokens = 40;
  c.chunk_tokens = 4;
  ExpectSame(Stream(stub_.get(), c.Proto("chunks")), embedded_->Run(c.Embedded()),
             "chunk_tokens 4");

  // Shards held mid-stream: chunk_tokens 4 vs the default (one chunk).
  auto shards_mid_stream = [&](int chunk_tokens, int64_t finished) {
    Case h = c;
    h.max_tokens = 400;
    h.chunk_tokens = chunk_tokens;
    grpc::ClientContext ctx;
    SetDeadline(&ctx);
    auto reader = stub_->Generate(&ctx, h.Proto("chunks-held"));
    v1::GenerateResponse msg;
    // Past the first decode step, which waits for the prefill hand-off.
    for (int tokens = 0; tokens < 4;) {
      if (!ReadPastProgress(reader.get(), &msg) || !msg.has_chunk()) {
        ADD_FAILURE() << "the stream ended early";
        return int64_t{-1};
      }
      tokens += msg.chunk().token_ids_size();
    }
    const int64_t shards = Info(stub_.get()).node_shards();
    ctx.TryCancel();
    while (reader->Read(&msg)) {
    }
    EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
    EXPECT_EQ(Info(stub_.get(), finished).node_shards(), 0);
    return shards;
  };
  const int64_t chunked = shards_mid_stream(4, finished_before + 2);
  const int64_t whole = shards_mid_stream(0, finished_before + 3);
  EXPECT_GT(whole, 0);
  EXPECT_GT(chunked, whole);
}

TEST_F(GenerationE2eTest, HealthServingAndReflection) {
  auto health = grpc::health::v1::Health::NewStub(channel_);
  for (const std::string service : {"", "kvr.v1.Generation"}) {
    grpc::ClientContext ctx;
    SetDeadline(&ctx);
    grpc::health::v1::HealthCheckRequest req;
    req.set_service(service);
    grpc::health::v1::HealthCheckResponse resp;
    ASSERT_TRUE(health->Check(&ctx, req, &resp).ok()) << service;
    EXPECT_EQ(resp.status(), grpc::health::v1::HealthCheckResponse::SERVING) << service;
  }
  // grpc.reflection.v1alpha: ListServices names the service.
  auto bytes = test_support::ReflectionListServices(worker_->address());
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  EXPECT_NE(bytes->find("kvr.v1.Generation"), std::string::npos);
}

// --backend: cpu is the default (printed at startup); an unknown name and,
// in a build without CUDA or on a host without a device, cuda exit 2 with an
// error naming the flag; on a GPU host cuda serves and GetModelInfo says so.
TEST(GenerationBackendTest, BackendFlag) {
  // Errors go to stderr. A server that runs must keep its stderr (it writes
  // there after SIGTERM, when the pipe may be gone).
  auto start = [](const std::string& flag, bool merge_stderr) {
    auto p = Subprocess::Start({g_worker_binary, "--listen=127.0.0.1:0", "--metrics_listen=",
                                flag},
                               merge_stderr);
    EXPECT_TRUE(p.ok()) << p.status();
    return p.ok() ? *std::move(p) : nullptr;
  };
  {
    auto p = start("--backend=cpu", /*merge_stderr=*/false);
    ASSERT_NE(p, nullptr);
    auto described = p->WaitForLine("kvr_worker backend: ", absl::Seconds(60));
    ASSERT_TRUE(described.ok()) << described.status() << "\n" << p->Output();
    EXPECT_EQ(described->rfind("cpu", 0), 0u) << *described;
    ASSERT_TRUE(p->WaitForLine("kvr_worker listening on ", absl::Seconds(60)).ok());
    auto st = p->Stop(SIGTERM, absl::Seconds(30));
    ASSERT_TRUE(st.ok()) << st.status();
    EXPECT_TRUE(WIFEXITED(*st) && WEXITSTATUS(*st) == 0) << "wait status " << *st;
  }
  {
    auto p = start("--backend=tpu", /*merge_stderr=*/true);
    ASSERT_NE(p, nullptr);
    auto error = p->WaitForLine("kvr_worker: ", absl::Seconds(60));
    ASSERT_TRUE(error.ok()) << error.status() << "\n" << p->Output();
    EXPECT_NE(error->find("--backend \"tpu\" is not one of cpu, cuda"), std::string::npos)
        << *error;
    auto st = p->Stop(0, absl::Seconds(30));
    ASSERT_TRUE(st.ok()) << st.status();
    EXPECT_TRUE(WIFEXITED(*st) && WEXITSTATUS(*st) == 2);
  }
  {
    auto p = start("--backend=cuda", /*merge_stderr=*/true);
    ASSERT_NE(p, nullptr);
    auto line = p->WaitForLine("kvr_worker", absl::Seconds(60));
    ASSERT_TRUE(line.ok()) << line.status() << "\n" << p->Output();
    if (line->rfind(": --backend cuda: ", 0) == 0) {
      // Built without CUDA, or no usable device here.
      auto st = p->Stop(0, absl::Seconds(30));
      ASSERT_TRUE(st.ok()) << st.status();
      EXPECT_TRUE(WIFEXITED(*st) && WEXITSTATUS(*st) == 2);
    } else {
      EXPECT_EQ(line->rfind(" backend: cuda", 0), 0u) << *line;
      auto address = p->WaitForLine("kvr_worker listening on ", absl::Seconds(60));
      ASSERT_TRUE(address.ok()) << address.status();
      auto stub = v1::Generation::NewStub(
          grpc::CreateChannel(*address, grpc::InsecureChannelCredentials()));
      EXPECT_EQ(Info(stub.get()).backend().rfind("cuda", 0), 0u);
      auto st = p->Stop(SIGTERM, absl::Seconds(30));
      ASSERT_TRUE(st.ok()) << st.status();
      // Exit 0, or SIGPIPE on its stderr (merged into the pipe Stop closes).
      EXPECT_TRUE(WIFEXITED(*st) ? WEXITSTATUS(*st) == 0 : WTERMSIG(*st) == SIGPIPE);
    }
  }
}

// --backend=cuda through the plugin loader, with the CUDA backend's sources
// built on the CPU emulator (libkvr_cuda_emulated_plugin.so): the worker
// serves the embedded CPU engine's greedy tokens, offloaded prompt included,
// reports the backend, and its /metrics threads start with the plugin loaded.
TEST(GenerationCudaPluginTest, EmulatedCudaWorkerEqualsEmbedded) {
  if (g_cuda_emulated_plugin.empty()) GTEST_SKIP() << "no --cuda_emulated_plugin given";
  auto embedded = Embedded::Create();
  auto worker = ServerProcess::Start(
      g_worker_binary, "kvr_worker",
      {"--backend=cuda", "--cuda_plugin=" + g_cuda_emulated_plugin,
       "--metrics_listen=127.0.0.1:0"});
  ASSERT_NE(worker, nullptr);
  auto stub = v1::Generation::NewStub(
      grpc::CreateChannel(worker->address(), grpc::InsecureChannelCredentials()));
  EXPECT_EQ(Info(stub.get()).backend().rfind("cuda", 0), 0u) << Info(stub.get()).backend();
  for (const std::string mode : {"retrieval", "full"}) {
    for (const char* prompt : {"Once upon a time", kLongPrompt}) {
      Case c;
      c.prompt = prompt;
      c.max_tokens = 48;
      c.mode = mode;
      ExpectSame(Stream(stub.get(), c.Proto("cuda-" + mode)), embedded->Run(c.Embedded()),
                 mode + " / " + std::string(prompt));
    }
  }
  ASSERT_FALSE(worker->metrics_address().empty());
  const std::optional<std::string> page = test_support::HttpGetMetrics(worker->metrics_address());
  ASSERT_TRUE(page.has_value());
  EXPECT_NE(page->find("kvr_worker_requests_total"), std::string::npos);
  const std::optional<int> st = worker->Stop(SIGTERM);
  ASSERT_TRUE(st.has_value());
  EXPECT_TRUE(WIFEXITED(*st) && WEXITSTATUS(*st) == 0);

  // A shared object that is not a kvr backend plugin: exit 2, naming why.
  auto p = Subprocess::Start({g_worker_binary, "--listen=127.0.0.1:0", "--metrics_listen=",
                              "--backend=cuda", "--cuda_plugin=libm.so.6"},
                             /*merge_stderr=*/true);
  ASSERT_TRUE(p.ok()) << p.status();
  auto error = (*p)->WaitForLine("kvr_worker: ", absl::Seconds(60));
  ASSERT_TRUE(error.ok()) << error.status() << "\n" << (*p)->Output();
  EXPECT_NE(error->find("backend plugin libm.so.6 has no kvr_backend_plugin_v1"),
            std::string::npos)
      << *error;
  auto exit = (*p)->Stop(0, absl::Seconds(30));
  ASSERT_TRUE(exit.ok()) << exit.status();
  EXPECT_TRUE(WIFEXITED(*exit) && WEXITSTATUS(*exit) == 2);
}

// A worker with one decode slot and no queue: while a stream holds the slot,
// another request gets RESOURCE_EXHAUSTED with retry advice.
TEST(GenerationOverloadTest, FullQueueIsResourceExhausted) {
  auto worker =
      ServerProcess::Start(g_worker_binary, "kvr_worker", {"--max_concurrent=1", "--max_queue=0"});
  ASSERT_NE(worker, nullptr);
  {
    auto stub = v1::Generation::NewStub(
        grpc::CreateChannel(worker->address(), grpc::InsecureChannelCredentials()));
    Case c;
    c.prompt = "Once upon a time";
    c.max_tokens = 400;
    grpc::ClientContext ctx;
    SetDeadline(&ctx);
    auto reader = stub->Generate(&ctx, c.Proto("holder"));
    v1::GenerateResponse msg;
    ASSERT_TRUE(ReadPastProgress(reader.get(), &msg));
    ASSERT_TRUE(msg.has_chunk());
    const Streamed rejected = Stream(stub.get(), c.Proto("rejected"));
    EXPECT_EQ(rejected.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED)
        << rejected.status.error_message();
    EXPECT_NE(rejected.status.error_message().find("retry"), std::string::npos)
        << rejected.status.error_message();
    ctx.TryCancel();
    while (reader->Read(&msg)) {
    }
    EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
    // The slot is free again once the cancelled stream has ended.
    EXPECT_EQ(Info(stub.get(), 1).active_sequences(), 0);
    Case small;
    small.prompt = "The cat";
    small.max_tokens = 8;
    const Streamed after = Stream(stub.get(), small.Proto("after"));
    EXPECT_TRUE(after.status.ok()) << after.status.error_message();
  }  // the client's calls and channel are gone: shutdown need not wait for them
  const auto t0 = std::chrono::steady_clock::now();
  const std::optional<int> st = worker->Stop(SIGTERM);
  ASSERT_TRUE(st.has_value());
  EXPECT_TRUE(WIFEXITED(*st) && WEXITSTATUS(*st) == 0);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(4))
      << "an idle worker should stop promptly on SIGTERM";
}

// Utf8CompletePrefix against hand-checked cases: complete text is kept,
// a lead byte waiting for its continuation bytes is cut, malformed bytes are
// not held.
TEST(Utf8, CompletePrefix) {
  EXPECT_EQ(Utf8CompletePrefix(""), 0u);
  EXPECT_EQ(Utf8CompletePrefix("abc"), 3u);
  EXPECT_EQ(Utf8CompletePrefix("a\xC3\xA9"), 3u);          // é complete
  EXPECT_EQ(Utf8CompletePrefix("a\xC3"), 1u);              // é missing 1
  EXPECT_EQ(Utf8CompletePrefix("a\xE2\x82"), 1u);          // € missing 1
  EXPECT_EQ(Utf8CompletePrefix("a\xE2\x82\xAC"), 4u);      // € complete
  EXPECT_EQ(Utf8CompletePrefix("\xF0\x9F\x98"), 0u);        // 😀 missing 1
  EXPECT_EQ(Utf8CompletePrefix("\xF0\x9F\x98\x80"), 4u);    // 😀 complete
  EXPECT_EQ(Utf8CompletePrefix("a\x80\x80"), 3u);          // stray continuations
  EXPECT_EQ(Utf8CompletePrefix("a\xFF"), 2u);              // invalid lead
}

// The shared decode loop with the real tokenizer: the model's byte tokens
// (<0xC3> ...) are forced one at a time by one-hot logits (greedy sampling),
// spelling "aé€😀b". No streamed piece ends inside a character; the pieces
// concatenated equal the text; an unfinished character at the end is flushed.
TEST(RequestLoopUtf8, PiecesNeverSplitACharacter) {
  const char* dir = std::getenv("KVR_MODELS");
  ASSERT_NE(dir, nullptr);
  auto tok = Llama2cTokenizer::Load(std::string(dir) + "/tok512.bin", 512);
  ASSERT_TRUE(tok.ok()) << tok.status();
  // The oracle for "which id is byte b": the id whose decoded text is b.
  const int32_t prev = (*tok)->Encode("a", false)->back();
  std::map<unsigned char, int32_t> byte_id;
  for (int32_t id = 0; id < 512; ++id) {
    auto piece = (*tok)->Decode(prev, id);
    if (piece.ok() && piece->size() == 1 && !byte_id.count(static_cast<unsigned char>((*piece)[0]))) {
      byte_id[static_cast<unsigned char>((*piece)[0])] = id;
    }
  }
  const std::string want = "a\xC3\xA9\xE2\x82\xAC\xF0\x9F\x98\x80" "b\xE2\x82";
  std::vector<int32_t> ids;
  for (unsigned char c : want) {
    ASSERT_TRUE(byte_id.count(c)) << "no byte token for " << int(c);
    ids.push_back(byte_id[c]);
  }
  auto sampler = Sampler::Create(SamplingParams{}, 512);
  ASSERT_TRUE(sampler.ok());
  RequestLoop loop({(*tok)->bos_id(), prev}, static_cast<int>(ids.size()), {}, *sampler, **tok);
  std::vector<float> logits(512);
  std::string streamed;
  std::vector<int32_t> got_ids;
  for (size_t i = 0; i < ids.size(); ++i) {
    std::fill(logits.begin(), logits.end(), 0.0f);
    logits[static_cast<size_t>(ids[i])] = 10.0f;
    absl::StatusOr<bool> done = loop.Advance(logits, static_cast<int64_t>(2 + i), 512);
    ASSERT_TRUE(done.ok()) << done.status();
    std::string piece;
    loop.TakeNew(&got_ids, &piece);
    if (!*done) {
      EXPECT_EQ(Utf8CompletePrefix(piece), piece.size()) << "piece ends inside a character";
      EXPECT_TRUE(piece.empty() || (static_cast<unsigned char>(piece[0]) & 0xC0) != 0x80)
          << "piece starts with a continuation byte";
    }
    streamed += piece;
    EXPECT_EQ(*done, i + 1 == ids.size());
  }
  EXPECT_EQ(loop.finish(), FinishReason::kLength);
  EXPECT_EQ(streamed, want);  // the trailing incomplete "\xE2\x82" flushed at the end
  EXPECT_EQ(loop.text(), want);
  EXPECT_EQ(got_ids, ids);
}

// The worker on a real kvr_node process (--nodes): the same output as the
// embedded engine with its in-process node; cancellation frees the remote shards.
TEST(GenerationRemoteNodeTest, WorkerOnKvrNode) {
  if (g_node_binary.empty()) GTEST_SKIP() << "no --kvr_node given";
  auto node = ServerProcess::Start(g_node_binary, "kvr_node", {"--metrics_listen="});
  ASSERT_NE(node, nullptr);
  auto worker = ServerProcess::Start(g_worker_binary, "kvr_worker", {"--nodes=" + node->address()});
  ASSERT_NE(worker, nullptr);
  std::unique_ptr<Embedded> embedded = Embedded::Create();
  ASSERT_NE(embedded, nullptr);
  {
    auto stub = v1::Generation::NewStub(
        grpc::CreateChannel(worker->address(), grpc::InsecureChannelCredentials()));
    Case c;
    c.prompt = kLongPrompt;  // prefill offloads shards to the node
    c.max_tokens = 100;
    ExpectSame(Stream(stub.get(), c.Proto("remote")), embedded->Run(c.Embedded()), "remote node");
    EXPECT_EQ(Info(stub.get(), 1).node_shards(), 0);

    c.max_tokens = 400;
    grpc::ClientContext ctx;
    SetDeadline(&ctx);
    auto reader = stub->Generate(&ctx, c.Proto("remote-cancel"));
    v1::GenerateResponse msg;
    // Past the first decode steps, which wait for the prefill hand-off: the
    // prompt's middle tokens are on the node.
    for (int tokens = 0; tokens < 8;) {
      ASSERT_TRUE(ReadPastProgress(reader.get(), &msg));
      ASSERT_TRUE(msg.has_chunk()) << "the stream ended before it could be cancelled";
      tokens += msg.chunk().token_ids_size();
    }
    EXPECT_GT(Info(stub.get()).node_shards(), 0);
    ctx.TryCancel();
    while (reader->Read(&msg)) {
    }
    EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
    const v1::GetModelInfoResponse after = Info(stub.get(), 2);
    EXPECT_EQ(after.node_shards(), 0);
    EXPECT_EQ(after.node_sequences(), 0);
  }
  const std::optional<int> ws = worker->Stop(SIGTERM);
  ASSERT_TRUE(ws.has_value());
  EXPECT_TRUE(WIFEXITED(*ws) && WEXITSTATUS(*ws) == 0);
  const std::optional<int> ns = node->Stop(SIGTERM);
  ASSERT_TRUE(ns.has_value());
  EXPECT_TRUE(WIFEXITED(*ns) && WEXITSTATUS(*ns) == 0);
}

}  // namespace
}  // namespace kvr::worker

int main(int argc, char** argv) {
  // Also makes libprotobuf precede libsentencepiece in DT_NEEDED (see generation.cmake).
  GOOGLE_PROTOBUF_VERIFY_VERSION;
  ::testing::InitGoogleTest(&argc, argv);
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--kvr_worker" && i + 1 < argc) {
      kvr::worker::g_worker_binary = argv[++i];
    } else if (a.rfind("--kvr_worker=", 0) == 0) {
      kvr::worker::g_worker_binary = a.substr(13);
    } else if (a == "--cuda_emulated_plugin" && i + 1 < argc) {
      kvr::worker::g_cuda_emulated_plugin = argv[++i];
    } else if (a == "--kvr_node" && i + 1 < argc) {
      kvr::worker::g_node_binary = argv[++i];
    } else if (a.rfind("--kvr_node=", 0) == 0) {
      kvr::worker::g_node_binary = a.substr(11);
    }
  }
  if (kvr::worker::g_worker_binary.empty()) {
    std::fprintf(stderr, "usage: %s --kvr_worker PATH [gtest flags]\n", argv[0]);
    return 2;
  }
  signal(SIGPIPE, SIG_IGN);
  return RUN_ALL_TESTS();
}
