// Worker loss under the gateway (issue 15, item 4): a kvr_gateway in front of
// two real kvr_worker processes (CPU backend, in-process retrieval node,
// stories260K), all on 127.0.0.1 with ports read from their printed lines.
// A long stream is read until its k-th token; then the worker serving it
// (the one whose GetModelInfo shows the sequence still decoding) is killed
// with SIGKILL, and the rest of the stream must come from the other worker:
//
//  * gRPC Generate, greedy and seeded sampled (temperature, top_p): the
//    client's stream ends OK with tokens, text, usage and finish reason
//    identical to a fault-free run of the same request (straight to a
//    worker), and kvr_gateway_resumed_streams_total{outcome="ok"} is 1;
//  * HTTP /v1/completions streamed as SSE, sampled without a seed: the same
//    text, usage and finish reason; and not streamed (the kill waits for
//    the worker's generated-tokens counter): the same text, token ids, usage;
//  * bad resume_tokens sent straight to a worker are refused, naming the
//    field and the limit;
//  * both workers killed mid-stream: the stream ends with UNAVAILABLE within
//    a bounded time (resumes are bounded), the next HTTP request gets 503,
//    and the resumed counter says {outcome="error"} 1.
//
// The kill is ordered by the stream, not by time: the test waits for the
// k-th token, then checks that the request is still decoding on a worker
// (the generation is 400 tokens long) and kills that one.
//
// Usage: resume_e2e_test --kvr_gateway PATH --kvr_worker PATH [gtest flags]
#include <signal.h>

#include <httplib.h>

#include <algorithm>
#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "grpcpp/client_context.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "gtest/gtest.h"
#include "kvr/v1/generation.grpc.pb.h"
#include "nlohmann/json.hpp"
#include "tests/support/gateway_process.h"
#include "tests/support/generate_stream.h"
#include "tests/support/metrics_page.h"
#include "tests/support/server_process.h"

namespace kvr::gateway {
namespace {

using nlohmann::json;
using test_support::GatewayProcess;
using test_support::ServerProcess;

std::string g_gateway_binary;  // --kvr_gateway
std::string g_worker_binary;   // --kvr_worker

constexpr auto kCallTimeout = std::chrono::seconds(120);
constexpr char kPrompt[] = "Once upon a time, there was a little girl named Lily. She";
// Long enough that the worker is still decoding when the k-th token has
// reached the client (checked, not assumed: see ServingWorker).
constexpr int kMaxTokens = 400;
constexpr int kKillAfterTokens = 8;

std::unique_ptr<v1::Generation::Stub> Stub(const std::string& address) {
  return v1::Generation::NewStub(grpc::CreateChannel(address, grpc::InsecureChannelCredentials()));
}

v1::GenerateRequest Request(float temperature, float top_p, uint64_t seed) {
  v1::GenerateRequest r;
  r.set_text(kPrompt);
  r.set_max_tokens(kMaxTokens);
  r.mutable_sampling()->set_temperature(temperature);
  r.mutable_sampling()->set_top_p(top_p);
  r.mutable_sampling()->set_seed(seed);
  return r;
}

// What one stream delivered, and for a stream with a kill, how long it
// ran on after the kill.
struct Streamed : test_support::GenerateStream {
  double seconds_after_kill = 0.0;
};

// Two workers and a gateway in front of them; every process stops with
// the object (ServerProcess and GatewayProcess kill theirs on destruction).
struct Cluster {
  std::unique_ptr<ServerProcess> workers[2];
  std::unique_ptr<GatewayProcess> gateway;

  bool Start() {
    for (auto& w : workers) {
      w = ServerProcess::Start(g_worker_binary, "kvr_worker", {"--max_concurrent=2"});
      if (w == nullptr) return false;
    }
    // Health checks only at start: a killed worker leaves rotation through
    // the failed call itself, which is what is tested here.
    gateway = GatewayProcess::Start(
        g_gateway_binary, {"--workers=" + workers[0]->address() + "," + workers[1]->address(),
                           "--health_check_seconds=1000"});
    return gateway != nullptr;
  }

  // The worker still decoding the only request in flight: its index, or -1
  // when none is (the generation already ended: the test cannot kill it
  // mid-stream).
  int ServingWorker() {
    for (int i = 0; i < 2; ++i) {
      if (workers[i] == nullptr) continue;
      grpc::ClientContext ctx;
      ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
      v1::GetModelInfoResponse info;
      const grpc::Status s =
          Stub(workers[i]->address())->GetModelInfo(&ctx, v1::GetModelInfoRequest(), &info);
      EXPECT_TRUE(s.ok()) << s.error_message();
      if (s.ok() && info.active_sequences() + info.queued_requests() > 0) return i;
    }
    return -1;
  }

  // SIGKILL, waited for.
  void Kill(int i) {
    ASSERT_TRUE(workers[i]->Stop(SIGKILL).has_value());
    workers[i].reset();
  }

  test_support::Samples Metrics() {
    const std::optional<std::string> page = test_support::HttpGetMetrics(gateway->metrics());
    EXPECT_TRUE(page.has_value());
    return page.has_value() ? test_support::ParseExposition(*page) : test_support::Samples{};
  }
};

// The whole stream, no fault.
Streamed Stream(v1::Generation::Stub* stub, const v1::GenerateRequest& request) {
  Streamed out;
  static_cast<test_support::GenerateStream&>(out) =
      test_support::ReadGenerate(stub, request, kCallTimeout);
  return out;
}

// Through the gateway; once kKillAfterTokens tokens arrived, `kill` runs
// (it kills workers), then the rest is read.
template <typename Kill>
Streamed StreamAndKill(Cluster& c, const v1::GenerateRequest& request, Kill kill) {
  Streamed out;
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + kCallTimeout);
  auto reader = Stub(c.gateway->grpc())->Generate(&ctx, request);
  v1::GenerateResponse msg;
  bool killed = false;
  std::chrono::steady_clock::time_point killed_at;
  size_t last_tokens = 0;
  std::chrono::steady_clock::time_point last_at;
  double max_gap = 0.0;
  while (reader->Read(&msg)) {
    out.Append(msg);
    if (killed && out.tokens.size() > last_tokens) {
      // The failover pause as the client sees it: the longest wait for
      // tokens after the kill (tokens the lost worker had sent still arrive
      // first, then the resumed worker's after its prefill and replay).
      const auto now = std::chrono::steady_clock::now();
      max_gap = std::max(max_gap, std::chrono::duration<double>(now - last_at).count());
      last_at = now;
      last_tokens = out.tokens.size();
    }
    if (!killed && out.tokens.size() >= static_cast<size_t>(kKillAfterTokens)) {
      killed = true;
      kill();
      killed_at = std::chrono::steady_clock::now();
      last_at = killed_at;
      last_tokens = out.tokens.size();
    }
  }
  out.status = reader->Finish();
  if (out.status.ok()) {
    std::printf("longest wait for tokens after the kill: %.1f ms\n", 1e3 * max_gap);
  }
  EXPECT_TRUE(killed) << "the stream ended before token " << kKillAfterTokens;
  if (killed) {
    out.seconds_after_kill =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - killed_at).count();
  }
  return out;
}

void ExpectIdentical(const Streamed& got, const Streamed& want) {
  ASSERT_TRUE(want.status.ok()) << "fault-free run: " << want.status.error_message();
  ASSERT_TRUE(want.summary.has_value());
  ASSERT_GT(want.tokens.size(), static_cast<size_t>(2 * kKillAfterTokens));
  ASSERT_TRUE(got.status.ok()) << got.status.error_message();
  ASSERT_TRUE(got.summary.has_value()) << "no final message";
  EXPECT_EQ(got.tokens, want.tokens);
  EXPECT_EQ(got.text, want.text);
  EXPECT_EQ(got.summary->usage().prompt_tokens(), want.summary->usage().prompt_tokens());
  EXPECT_EQ(got.summary->usage().completion_tokens(), want.summary->usage().completion_tokens());
  EXPECT_EQ(got.summary->usage().completion_tokens(), static_cast<int64_t>(want.tokens.size()));
  EXPECT_EQ(got.summary->finish_reason(), want.summary->finish_reason());
}

const std::map<std::string, std::string> kOk = {{"outcome", "ok"}};
const std::map<std::string, std::string> kError = {{"outcome", "error"}};

class ResumeE2eTest : public ::testing::TestWithParam<v1::GenerateRequest> {};

// A gRPC stream whose worker is killed after 8 tokens completes on the other
// worker, identical to the fault-free run.
TEST_P(ResumeE2eTest, GrpcStreamSurvivesWorkerKill) {
  Cluster c;
  ASSERT_TRUE(c.Start());
  const v1::GenerateRequest request = GetParam();
  const auto start = std::chrono::steady_clock::now();
  const Streamed want = Stream(Stub(c.workers[0]->address()).get(), request);
  std::printf("fault-free run: %zu tokens in %.3f s\n", want.tokens.size(),
              std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  const Streamed got = StreamAndKill(c, request, [&] {
    const int serving = c.ServingWorker();
    ASSERT_GE(serving, 0) << "no worker is decoding the request any more: it cannot be killed "
                             "mid-stream";
    c.Kill(serving);
  });
  ExpectIdentical(got, want);
  const test_support::Samples m = c.Metrics();
  EXPECT_EQ(test_support::Get(m, "kvr_gateway_resumed_streams_total", kOk), 1);
  EXPECT_EQ(test_support::Get(m, "kvr_gateway_resumed_streams_total", kError), 0);
  EXPECT_EQ(test_support::Get(m, "kvr_gateway_stream_resumes_total"), 1);
  EXPECT_EQ(test_support::Get(m, "kvr_gateway_requests_total", {{"api", "grpc"}, {"code", "OK"}}),
            1);
  EXPECT_EQ(test_support::Get(m, "kvr_gateway_workers", {{"state", "unhealthy"}}), 1);
}

INSTANTIATE_TEST_SUITE_P(Requests, ResumeE2eTest,
                         ::testing::Values(Request(0.0f, 1.0f, 1),        // greedy
                                           Request(1.0f, 0.9f, 424242)),  // seeded sampled
                         [](const auto& param_info) {
                           return param_info.param.sampling().temperature() == 0.0f
                                      ? "Greedy"
                                      : "SeededSampled";
                         });

// The same over HTTP: /v1/completions streamed as server-sent events, here
// sampled without a seed (every worker then uses its default seed, so the
// resumed worker draws what the first would have).
TEST(ResumeHttpTest, SseStreamSurvivesWorkerKill) {
  Cluster c;
  ASSERT_TRUE(c.Start());
  v1::GenerateRequest request = Request(0.8f, 0.95f, 0);
  request.mutable_sampling()->clear_seed();
  const Streamed want = Stream(Stub(c.workers[0]->address()).get(), request);
  ASSERT_TRUE(want.status.ok()) << want.status.error_message();
  const json body = {{"model", "stories260K"},
                     {"prompt", kPrompt},
                     {"max_tokens", kMaxTokens},
                     {"temperature", request.sampling().temperature()},
                     {"top_p", request.sampling().top_p()},
                     {"stream", true},
                     {"stream_options", {{"include_usage", true}}}};
  httplib::Client client("http://" + c.gateway->http());
  client.set_read_timeout(std::chrono::duration_cast<std::chrono::seconds>(kCallTimeout));
  std::string pending, text, finish;
  std::optional<json> usage, error;
  int events = 0;
  bool done = false, killed = false;
  auto on_event = [&](const std::string& data) {
    if (data == "[DONE]") {
      done = true;
      return;
    }
    const json e = json::parse(data, nullptr, /*allow_exceptions=*/false);
    ASSERT_FALSE(e.is_discarded()) << data;
    ++events;
    if (e.contains("error")) {
      error = e;
      return;
    }
    if (e.contains("usage") && !e["usage"].is_null()) usage = e["usage"];
    if (e.contains("choices") && !e["choices"].empty()) {
      const json& choice = e["choices"][0];
      text += choice.value("text", "");
      if (choice.contains("finish_reason") && choice["finish_reason"].is_string()) {
        finish = choice["finish_reason"];
      }
    }
    // Each event before the kill carries at least one token's text: kill
    // once as many events came as the gRPC tests wait tokens for.
    if (!killed && events >= kKillAfterTokens) {
      killed = true;
      const int serving = c.ServingWorker();
      ASSERT_GE(serving, 0) << "no worker is decoding the request any more";
      c.Kill(serving);
    }
  };
  httplib::Request post;
  post.method = "POST";
  post.path = "/v1/completions";
  post.body = body.dump();
  post.set_header("Content-Type", "application/json");
  post.content_receiver = [&](const char* data, size_t n, uint64_t, uint64_t) {
    pending.append(data, n);
    for (size_t end; (end = pending.find("\n\n")) != std::string::npos;) {
      const std::string event = pending.substr(0, end);
      pending.erase(0, end + 2);
      if (event.rfind("data: ", 0) == 0) on_event(event.substr(6));
    }
    return true;
  };
  auto res = client.send(post);
  ASSERT_TRUE(res) << httplib::to_string(res.error());
  EXPECT_EQ(res->status, 200);
  EXPECT_TRUE(killed);
  EXPECT_FALSE(error.has_value()) << error->dump();
  EXPECT_TRUE(done);
  EXPECT_EQ(text, want.text);
  const v1::FinishReason want_finish = want.summary->finish_reason();
  EXPECT_EQ(finish, want_finish == v1::FINISH_REASON_LENGTH ||
                            want_finish == v1::FINISH_REASON_CONTEXT_FULL
                        ? "length"
                        : "stop");
  ASSERT_TRUE(usage.has_value());
  EXPECT_EQ((*usage)["prompt_tokens"], want.summary->usage().prompt_tokens());
  EXPECT_EQ((*usage)["completion_tokens"], want.summary->usage().completion_tokens());
  const test_support::Samples m = c.Metrics();
  EXPECT_EQ(test_support::Get(m, "kvr_gateway_resumed_streams_total", kOk), 1);
  EXPECT_EQ(test_support::Get(m, "kvr_gateway_requests_total", {{"api", "http"}, {"code", "OK"}}),
            1);
}

// A non-streamed /v1/completions: the client sees no token before the end,
// so the kill waits for the serving worker's kvr_worker_generated_tokens_total
// to have moved by 8 (polled with a deadline). The whole response (text,
// kvr.token_ids, usage) equals the fault-free run.
TEST(ResumeHttpTest, NonStreamedCompletionSurvivesWorkerKill) {
  Cluster c;
  ASSERT_TRUE(c.Start());
  const v1::GenerateRequest request = Request(1.1f, 1.0f, 5150);
  const Streamed want = Stream(Stub(c.workers[0]->address()).get(), request);
  ASSERT_TRUE(want.status.ok()) << want.status.error_message();
  // Long enough to be still decoding after the counter moved by 8.
  ASSERT_GE(want.tokens.size(), size_t{100});
  auto generated = [&](int i) {
    const std::optional<std::string> page =
        test_support::HttpGetMetrics(c.workers[i]->metrics_address());
    return page.has_value() ? test_support::Get(test_support::ParseExposition(*page),
                                                "kvr_worker_generated_tokens_total")
                            : -1.0;
  };
  const double before[2] = {generated(0), generated(1)};
  const json body = {{"model", "stories260K"},
                     {"prompt", kPrompt},
                     {"max_tokens", kMaxTokens},
                     {"temperature", request.sampling().temperature()},
                     {"top_p", request.sampling().top_p()},
                     {"seed", request.sampling().seed()}};
  std::optional<httplib::Result> result;
  {
    std::jthread client_thread([&] {
      httplib::Client client("http://" + c.gateway->http());
      client.set_read_timeout(std::chrono::duration_cast<std::chrono::seconds>(kCallTimeout));
      result = client.Post("/v1/completions", body.dump(), "application/json");
    });
    const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    int serving = -1;
    while (serving < 0 && std::chrono::steady_clock::now() < give_up) {
      for (int i = 0; i < 2; ++i) {
        if (generated(i) - before[i] >= kKillAfterTokens) serving = i;
      }
    }
    ASSERT_GE(serving, 0) << "no worker generated " << kKillAfterTokens << " tokens in 60 s";
    ASSERT_EQ(c.ServingWorker(), serving) << "the request is no longer decoding: too late to kill";
    c.Kill(serving);
  }
  ASSERT_TRUE(result.has_value() && *result) << "no HTTP response";
  const httplib::Result& res = *result;
  ASSERT_EQ(res->status, 200) << res->body;
  const json reply = json::parse(res->body, nullptr, /*allow_exceptions=*/false);
  ASSERT_FALSE(reply.is_discarded()) << res->body;
  EXPECT_EQ(reply["choices"][0]["text"], want.text);
  EXPECT_EQ(reply["kvr"]["token_ids"].get<std::vector<int32_t>>(), want.tokens);
  EXPECT_EQ(reply["usage"]["prompt_tokens"], want.summary->usage().prompt_tokens());
  EXPECT_EQ(reply["usage"]["completion_tokens"], want.summary->usage().completion_tokens());
  const test_support::Samples m = c.Metrics();
  EXPECT_EQ(test_support::Get(m, "kvr_gateway_resumed_streams_total", kOk), 1);
}

// Both workers killed mid-stream: the client gets UNAVAILABLE, promptly
// (at most max_resumes = 2 re-issues with 50 + 100 ms backoff, each
// refused at once), and HTTP requests then get 503.
TEST(ResumeAllDeadTest, BothWorkersKilledEndsUnavailable) {
  Cluster c;
  ASSERT_TRUE(c.Start());
  const Streamed got = StreamAndKill(c, Request(0.0f, 1.0f, 1), [&] {
    c.Kill(0);
    c.Kill(1);
  });
  EXPECT_EQ(got.status.error_code(), grpc::StatusCode::UNAVAILABLE) << got.status.error_message();
  EXPECT_FALSE(got.summary.has_value());
  EXPECT_LT(got.seconds_after_kill, 10.0);
  httplib::Client client("http://" + c.gateway->http());
  client.set_read_timeout(std::chrono::seconds(30));
  const json body = {{"model", "stories260K"}, {"prompt", kPrompt}, {"max_tokens", 4}};
  const auto start = std::chrono::steady_clock::now();
  auto res = client.Post("/v1/completions", body.dump(), "application/json");
  ASSERT_TRUE(res) << httplib::to_string(res.error());
  EXPECT_EQ(res->status, 503) << res->body;
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(), 10.0);
  const test_support::Samples m = c.Metrics();
  EXPECT_EQ(test_support::Get(m, "kvr_gateway_resumed_streams_total", kError), 1);
  EXPECT_EQ(test_support::Get(m, "kvr_gateway_resumed_streams_total", kOk), 0);
  EXPECT_EQ(test_support::Get(m, "kvr_gateway_requests_total",
                              {{"api", "grpc"}, {"code", "UNAVAILABLE"}}),
            1);
}

// resume_tokens is client input like any field (a client may set it): a
// worker refuses bad ones with the field and the limit in the message.
TEST(ResumeTokensValidationTest, WorkerRefusesBadResumeTokens) {
  auto worker = ServerProcess::Start(g_worker_binary, "kvr_worker", {});
  ASSERT_NE(worker, nullptr);
  auto stub = Stub(worker->address());
  struct Bad {
    std::vector<int32_t> ids;
    int max_tokens;
    grpc::StatusCode code;
    std::string message;  // a part of it
  };
  const std::vector<Bad> cases = {
      {{300, 512}, 16, grpc::StatusCode::INVALID_ARGUMENT,
       "resume_tokens[1] = 512 outside [0, 512)"},
      {{300, -1}, 16, grpc::StatusCode::INVALID_ARGUMENT, "resume_tokens[1] = -1"},
      {std::vector<int32_t>(17, 300), 16, grpc::StatusCode::INVALID_ARGUMENT,
       "more than max_tokens 16"},
      {std::vector<int32_t>(510, 300), 600, grpc::StatusCode::OUT_OF_RANGE,
       "exceed the model's context of 512"},
      {std::vector<int32_t>(600, 300), 700, grpc::StatusCode::OUT_OF_RANGE,
       "resume_tokens: 600 ids exceed the model's context of 512"},
      {{300, 2}, 16, grpc::StatusCode::INVALID_ARGUMENT, "resume_tokens[1] = 2 is BOS or EOS"},
  };
  for (const Bad& b : cases) {
    v1::GenerateRequest r = Request(0.0f, 1.0f, 1);
    r.set_max_tokens(b.max_tokens);
    r.mutable_resume_tokens()->Add(b.ids.begin(), b.ids.end());
    const Streamed got = Stream(stub.get(), r);
    EXPECT_EQ(got.status.error_code(), b.code) << b.message << ": " << got.status.error_message();
    EXPECT_NE(got.status.error_message().find(b.message), std::string::npos)
        << got.status.error_message();
    EXPECT_TRUE(got.tokens.empty());
  }
  // The worker serves on.
  v1::GenerateRequest ok = Request(0.0f, 1.0f, 1);
  ok.set_max_tokens(4);
  EXPECT_TRUE(Stream(stub.get(), ok).status.ok());
}

}  // namespace
}  // namespace kvr::gateway

int main(int argc, char** argv) {
  GOOGLE_PROTOBUF_VERIFY_VERSION;
  ::testing::InitGoogleTest(&argc, argv);
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--kvr_gateway" && i + 1 < argc) kvr::gateway::g_gateway_binary = argv[++i];
    if (a == "--kvr_worker" && i + 1 < argc) kvr::gateway::g_worker_binary = argv[++i];
  }
  if (kvr::gateway::g_gateway_binary.empty() || kvr::gateway::g_worker_binary.empty()) {
    std::fprintf(stderr, "usage: %s --kvr_gateway PATH --kvr_worker PATH [gtest flags]\n",
                 argv[0]);
    return 2;
  }
  signal(SIGPIPE, SIG_IGN);
  return RUN_ALL_TESTS();
}
