// GenerateCall's resumption rules (services/gateway/generate_call.h) against
// scripted in-process kvr.v1.Generation workers on 127.0.0.1: each call a
// worker receives follows the script entry of its global call index (how
// many tokens to stream, then which status), so the tests choose exactly
// where a worker is "lost".
//
//  * a worker that sends its prefill_progress and then fails with
//    UNAVAILABLE (before any token) is retried on the other worker: the
//    gateway used to retry only before the first response, and workers
//    always send a progress message first, so it never retried;
//  * a worker lost after 5 tokens: the next call carries resume_tokens = those
//    5 ids, the client sees every token once, in order, and no progress
//    message after tokens;
//  * INVALID_ARGUMENT / RESOURCE_EXHAUSTED mid-stream are passed on, never
//    resumed;
//  * resumes are bounded by max_resumes (4 workers all failing: 1 + 2 calls,
//    then UNAVAILABLE);
//  * kvr_gateway_resumed_streams_total / kvr_gateway_stream_resumes_total;
//  * an API key is charged each prompt and completion token once across a
//    resume, and its slot is released when the call ends.
#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "grpcpp/grpcpp.h"
#include "grpcpp/health_check_service_interface.h"
#include "gtest/gtest.h"
#include "kvr/v1/generation.grpc.pb.h"
#include "prometheus/collectable.h"
#include "prometheus/text_serializer.h"
#include "services/gateway/api_keys.h"
#include "services/gateway/gateway_metrics.h"
#include "services/gateway/generate_call.h"
#include "services/gateway/worker_pool.h"
#include "tests/support/metrics_page.h"

namespace kvr::gateway {
namespace {

constexpr int kMaxTokens = 12;
// The token generated at completion index i (what every scripted worker
// streams: a resumed call continues at i = resume_tokens size).
int32_t TokenAt(int i) { return 100 + i; }
std::string TextAt(int i) { return "t" + std::to_string(i) + " "; }

// What a call does: stream tokens until `fail_after` of them were generated
// in all (counting the resumed ones; -1: never), then end with `code`.
struct Step {
  int fail_after = -1;
  grpc::StatusCode code = grpc::StatusCode::OK;
};

// The calls all scripted workers received, in order, and the script.
struct Script {
  std::mutex mu;
  std::vector<Step> steps;  // by global call index; beyond it: serve
  std::vector<v1::GenerateRequest> received;
};

class ScriptedWorker final : public v1::Generation::Service {
 public:
  explicit ScriptedWorker(Script* script) : script_(script) {}

  grpc::Status Generate(grpc::ServerContext*, const v1::GenerateRequest* request,
                        grpc::ServerWriter<v1::GenerateResponse>* writer) override {
    Step step;
    {
      std::lock_guard<std::mutex> lock(script_->mu);
      const size_t index = script_->received.size();
      if (index < script_->steps.size()) step = script_->steps[index];
      script_->received.push_back(*request);
    }
    v1::GenerateResponse progress;
    progress.mutable_prefill_progress()->set_prompt_tokens_total(3);
    writer->Write(progress);
    int i = request->resume_tokens_size();
    for (; i < request->max_tokens(); ++i) {
      if (i == step.fail_after) return grpc::Status(step.code, "scripted failure");
      v1::GenerateResponse chunk;
      chunk.mutable_chunk()->add_token_ids(TokenAt(i));
      chunk.mutable_chunk()->set_text(TextAt(i));
      writer->Write(chunk);
    }
    v1::GenerateResponse summary;
    summary.mutable_summary()->set_finish_reason(v1::FINISH_REASON_LENGTH);
    summary.mutable_summary()->mutable_usage()->set_prompt_tokens(3);
    summary.mutable_summary()->mutable_usage()->set_completion_tokens(i);
    writer->Write(summary);
    return grpc::Status::OK;
  }

 private:
  Script* script_;
};

// `n` scripted workers, a WorkerPool over them and the gateway metrics.
class Fixture {
 public:
  Fixture(int n, int max_resumes) {
    grpc::EnableDefaultHealthCheckService(true);
    std::vector<std::string> addresses;
    for (int i = 0; i < n; ++i) {
      services_.push_back(std::make_unique<ScriptedWorker>(&script_));
      grpc::ServerBuilder b;
      int port = 0;
      b.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
      b.RegisterService(services_.back().get());
      servers_.push_back(b.BuildAndStart());
      EXPECT_NE(servers_.back(), nullptr);
      EXPECT_GT(port, 0);
      servers_.back()->GetHealthCheckService()->SetServingStatus("kvr.v1.Generation", true);
      addresses.push_back("127.0.0.1:" + std::to_string(port));
    }
    WorkerPoolOptions o;
    o.health_interval = absl::Seconds(1000);  // only the first round
    o.max_resumes = max_resumes;
    o.resume_backoff = absl::Milliseconds(1);
    auto pool = WorkerPool::Create(o);
    EXPECT_TRUE(pool.ok()) << pool.status();
    pool_ = *std::move(pool);
    pool_->SetWorkers(addresses);
    pool_->CheckHealthNow();
  }
  ~Fixture() {
    EXPECT_TRUE(pool_->WaitForCalls(absl::Seconds(10)));
    pool_.reset();
    for (auto& s : servers_) s->Shutdown(std::chrono::system_clock::now());
  }

  Script& script() { return script_; }

  // What the client of one GenerateCall saw.
  struct Seen {
    std::vector<v1::GenerateResponse> responses;
    std::vector<int32_t> tokens;
    std::string text;
    int progress = 0;
    bool progress_after_tokens = false;
    grpc::Status status;
  };

  // Runs one call to its end (bounded by a 30 s deadline), charged to
  // `key` when set.
  Seen Run(std::shared_ptr<ApiKeyGrant> key = nullptr) {
    v1::GenerateRequest request;
    request.set_text("prompt");
    request.set_max_tokens(kMaxTokens);
    struct Shared {
      std::mutex mu;
      std::condition_variable cv;
      bool done = false;
      Seen seen;
      std::shared_ptr<GenerateCall> call;
    };
    auto shared = std::make_shared<Shared>();
    const absl::Time now = absl::Now();
    std::weak_ptr<Shared> weak = shared;
    shared->call = GenerateCall::Create(
        pool_.get(), &metrics_, Api::kGrpc, request, now, now + absl::Seconds(30),
        [weak](v1::GenerateResponse r) {
          std::shared_ptr<Shared> s = weak.lock();
          if (s == nullptr) return;
          std::shared_ptr<GenerateCall> call;
          {
            std::lock_guard<std::mutex> lock(s->mu);
            Seen& seen = s->seen;
            if (r.has_prefill_progress()) {
              ++seen.progress;
              if (!seen.tokens.empty()) seen.progress_after_tokens = true;
            }
            if (r.has_chunk()) {
              seen.tokens.insert(seen.tokens.end(), r.chunk().token_ids().begin(),
                                 r.chunk().token_ids().end());
              seen.text += r.chunk().text();
            }
            seen.responses.push_back(std::move(r));
            call = s->call;
          }
          call->RequestNext();
        },
        [weak](const grpc::Status& status) {
          std::shared_ptr<Shared> s = weak.lock();
          if (s == nullptr) return;
          std::lock_guard<std::mutex> lock(s->mu);
          s->seen.status = status;
          s->done = true;
          s->call.reset();  // no cycle once it ended
          s->cv.notify_all();
        });
    std::shared_ptr<GenerateCall> call = shared->call;
    if (key != nullptr) call->SetApiKey(std::move(key));
    call->Start();
    call.reset();
    std::unique_lock<std::mutex> lock(shared->mu);
    EXPECT_TRUE(shared->cv.wait_for(lock, std::chrono::seconds(40), [&] { return shared->done; }))
        << "the call never finished";
    return shared->seen;
  }

  double Metric(const std::string& name, const std::map<std::string, std::string>& labels = {}) {
    const std::string page =
        prometheus::TextSerializer().Serialize(metrics_.collectable()->Collect());
    return test_support::Get(test_support::ParseExposition(page), name, labels);
  }

 private:
  Script script_;
  std::vector<std::unique_ptr<ScriptedWorker>> services_;
  std::vector<std::unique_ptr<grpc::Server>> servers_;
  GatewayMetrics metrics_;
  std::unique_ptr<WorkerPool> pool_;
};

// The first `n` tokens of a whole completion.
std::vector<int32_t> FirstTokens(int n) {
  std::vector<int32_t> t;
  for (int i = 0; i < n; ++i) t.push_back(TokenAt(i));
  return t;
}
std::vector<int32_t> AllTokens() { return FirstTokens(kMaxTokens); }
std::string AllText() {
  std::string t;
  for (int i = 0; i < kMaxTokens; ++i) t += TextAt(i);
  return t;
}

TEST(GatewayResumeTest, ProgressThenUnavailableIsRetriedElsewhere) {
  Fixture f(2, 2);
  f.script().steps = {{0, grpc::StatusCode::UNAVAILABLE}};  // progress, then lost
  const Fixture::Seen seen = f.Run();
  ASSERT_TRUE(seen.status.ok()) << seen.status.error_message();
  EXPECT_EQ(seen.tokens, AllTokens());
  EXPECT_EQ(seen.text, AllText());
  ASSERT_EQ(f.script().received.size(), 2u);
  EXPECT_EQ(f.script().received[1].resume_tokens_size(), 0);
  // Both attempts' progress went out: no token had yet.
  EXPECT_EQ(seen.progress, 2);
  EXPECT_EQ(f.Metric("kvr_gateway_resumed_streams_total", {{"outcome", "ok"}}), 1);
  EXPECT_EQ(f.Metric("kvr_gateway_stream_resumes_total"), 1);
}

TEST(GatewayResumeTest, MidStreamLossResumesWithTheTokensSent) {
  Fixture f(2, 2);
  f.script().steps = {{5, grpc::StatusCode::UNAVAILABLE}};
  const Fixture::Seen seen = f.Run();
  ASSERT_TRUE(seen.status.ok()) << seen.status.error_message();
  EXPECT_EQ(seen.tokens, AllTokens());  // each once, in order
  EXPECT_EQ(seen.text, AllText());
  ASSERT_EQ(f.script().received.size(), 2u);
  const v1::GenerateRequest& resumed = f.script().received[1];
  EXPECT_EQ(std::vector<int32_t>(resumed.resume_tokens().begin(), resumed.resume_tokens().end()),
            FirstTokens(5));
  EXPECT_EQ(resumed.text(), "prompt");
  EXPECT_EQ(resumed.max_tokens(), kMaxTokens);
  EXPECT_EQ(seen.progress, 1);
  EXPECT_FALSE(seen.progress_after_tokens);
  ASSERT_TRUE(seen.responses.back().has_summary());
  EXPECT_EQ(seen.responses.back().summary().usage().completion_tokens(), kMaxTokens);
  EXPECT_EQ(f.Metric("kvr_gateway_resumed_streams_total", {{"outcome", "ok"}}), 1);
}

TEST(GatewayResumeTest, ApplicationErrorsAreNotResumed) {
  for (grpc::StatusCode code : {grpc::StatusCode::INVALID_ARGUMENT,
                                grpc::StatusCode::RESOURCE_EXHAUSTED,
                                grpc::StatusCode::INTERNAL}) {
    Fixture f(2, 2);
    f.script().steps = {{3, code}};
    const Fixture::Seen seen = f.Run();
    EXPECT_EQ(seen.status.error_code(), code);
    EXPECT_EQ(seen.tokens.size(), 3u);
    EXPECT_EQ(f.script().received.size(), 1u) << "resumed on code " << code;
    EXPECT_EQ(f.Metric("kvr_gateway_stream_resumes_total"), 0);
  }
}

TEST(GatewayResumeTest, ResumesAreBoundedByMaxResumes) {
  Fixture f(4, 2);
  // Every call loses its worker one token later than the previous.
  f.script().steps = {{1, grpc::StatusCode::UNAVAILABLE},
                      {2, grpc::StatusCode::UNAVAILABLE},
                      {3, grpc::StatusCode::UNAVAILABLE},
                      {4, grpc::StatusCode::UNAVAILABLE}};
  const Fixture::Seen seen = f.Run();
  EXPECT_EQ(seen.status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_EQ(f.script().received.size(), 3u);  // 1 + max_resumes
  EXPECT_EQ(seen.tokens, FirstTokens(3));
  EXPECT_EQ(f.Metric("kvr_gateway_resumed_streams_total", {{"outcome", "error"}}), 1);
  EXPECT_EQ(f.Metric("kvr_gateway_stream_resumes_total"), 2);

  Fixture never(2, 0);  // --max_resumes=0: the old behaviour minus the retry
  never.script().steps = {{0, grpc::StatusCode::UNAVAILABLE}};
  EXPECT_EQ(never.Run().status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_EQ(never.script().received.size(), 1u);
}

// An API key's tokens_per_minute budget is charged the prompt once and each
// token once across a resume (every attempt reports its prefill of the
// prompt; the resumed one streams only the tokens after those replayed),
// and its max_concurrent slot is free once the call has ended.
TEST(GatewayResumeTest, ApiKeyIsChargedEachTokenOnceAcrossAResume) {
  Fixture f(2, 2);
  f.script().steps = {{5, grpc::StatusCode::UNAVAILABLE}};
  constexpr int64_t kPrompt = 3;  // what the scripted workers report
  constexpr int64_t kSpare = 100;
  absl::StatusOr<MadeApiKey> made = MakeApiKey("k", {1, kPrompt + kMaxTokens + kSpare});
  ASSERT_TRUE(made.ok());
  absl::StatusOr<std::vector<ApiKeyEntry>> entries =
      ParseApiKeys("{\"keys\": [" + made->entry + "]}");
  ASSERT_TRUE(entries.ok()) << entries.status();
  const absl::Time now = absl::Now();  // a frozen clock: no refill
  ApiKeyStoreOptions options;
  options.clock = [now] { return now; };
  std::unique_ptr<ApiKeyStore> keys = ApiKeyStore::FromEntries(*entries, options);
  const std::string bearer = "Bearer " + made->key;
  ApiKeyDecision admitted = keys->Admit(bearer);
  ASSERT_EQ(admitted.outcome, ApiKeyDecision::Outcome::kOk);

  const Fixture::Seen seen = f.Run(std::move(admitted.grant));
  EXPECT_TRUE(seen.status.ok()) << seen.status.error_message();
  EXPECT_EQ(seen.tokens, FirstTokens(kMaxTokens));
  EXPECT_EQ(f.script().received.size(), 2u);  // resumed once
  EXPECT_EQ(f.Metric("kvr_gateway_key_tokens_total", {{"key", "k"}}), kPrompt + kMaxTokens);
  EXPECT_EQ(f.Metric("kvr_gateway_key_requests_total", {{"key", "k"}, {"code", "OK"}}), 1);

  // Exactly kSpare tokens are left, and the slot is free again.
  ApiKeyDecision next = keys->Admit(bearer);
  ASSERT_EQ(next.outcome, ApiKeyDecision::Outcome::kOk) << next.message;
  next.grant->Debit(kSpare);
  next.grant.reset();
  const ApiKeyDecision spent = keys->Admit(bearer);
  EXPECT_EQ(spent.outcome, ApiKeyDecision::Outcome::kOutOfTokens);
  EXPECT_NE(spent.message.find("available 0."), std::string::npos) << spent.message;
}

}  // namespace
}  // namespace kvr::gateway
