// End-to-end test of the gateway: two real kvr_worker processes (CPU
// backend, in-process retrieval nodes, stories260K) behind a real
// kvr_gateway, all on 127.0.0.1 with ports read from their printed lines.
// The oracle is the worker itself: the same request sent straight to a
// worker's kvr.v1.Generation (generation_e2e_test checks the worker against
// the embedded engine).
//
//  * gRPC through the gateway streams exactly the worker's tokens and text
//    (greedy and seeded sampling, both attention modes, token-id prompts);
//  * HTTP /v1/completions (whole and streamed) gives the same text and
//    tokens; chat completions stream as SSE ending with [DONE];
//  * 16 concurrent requests (gRPC and HTTP) each equal their solo output,
//    and both workers served some;
//  * a cancelled gRPC stream and a dropped HTTP stream free the worker's
//    sequence and its shards (GetModelInfo.wait_finished_requests);
//  * bad requests get the right HTTP status / gRPC code and a message
//    naming the field; the gateway keeps serving;
//  * overload: a full queue → 429 + Retry-After / RESOURCE_EXHAUSTED, a
//    queued request past its deadline → 504 / DEADLINE_EXCEEDED;
//  * a dead worker: requests are retried on the other one and it leaves
//    rotation; DNS membership (dns:///localhost:PORT) works;
//  * /metrics counters move by exactly the requests made; health,
//    reflection; SIGTERM exits 0.
//
// Usage: gateway_e2e_test --kvr_gateway PATH --kvr_worker PATH [gtest flags]
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <httplib.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/subprocess.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/client_context.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "gtest/gtest.h"
#include "kvr/v1/generation.grpc.pb.h"
#include "nlohmann/json.hpp"
#include "tests/support/reflection.h"
#include "tests/support/gateway_process.h"
#include "tests/support/metrics_page.h"
#include "tests/support/server_process.h"

namespace kvr::gateway {
namespace {

using nlohmann::json;
using test_support::ServerProcess;

std::string g_gateway_binary;  // --kvr_gateway
std::string g_worker_binary;   // --kvr_worker

constexpr auto kCallTimeout = std::chrono::seconds(60);
constexpr char kModel[] = "stories260K";
// Longer than sinks + window (20 tokens): prefill offloads shards to the node.
constexpr char kLongPrompt[] =
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the sun "
    "with her big red ball and her dog.";

// ---------------------------------------------------------------------------
// Processes.

using test_support::GatewayProcess;

std::unique_ptr<ServerProcess> StartWorker(const std::vector<std::string>& extra = {}) {
  std::vector<std::string> args = {"--max_concurrent=4", "--max_queue=16"};
  args.insert(args.end(), extra.begin(), extra.end());
  return ServerProcess::Start(g_worker_binary, "kvr_worker", args);
}

bool StopOk(ServerProcess* p) {
  const std::optional<int> st = p->Stop(SIGTERM);
  return st.has_value() && WIFEXITED(*st) && WEXITSTATUS(*st) == 0;
}

// ---------------------------------------------------------------------------
// gRPC.

std::unique_ptr<v1::Generation::Stub> Stub(const std::string& address) {
  return v1::Generation::NewStub(grpc::CreateChannel(address, grpc::InsecureChannelCredentials()));
}

void SetDeadline(grpc::ClientContext* ctx, std::chrono::milliseconds timeout = kCallTimeout) {
  ctx->set_deadline(std::chrono::system_clock::now() + timeout);
}

// What one Generate stream delivered.
struct Streamed {
  std::string text;
  std::vector<int32_t> tokens;
  std::optional<v1::GenerateFinal> summary;
  grpc::Status status;
};

Streamed Stream(v1::Generation::Stub* stub, const v1::GenerateRequest& request,
                std::chrono::milliseconds timeout = kCallTimeout) {
  Streamed out;
  grpc::ClientContext ctx;
  SetDeadline(&ctx, timeout);
  auto reader = stub->Generate(&ctx, request);
  v1::GenerateResponse msg;
  while (reader->Read(&msg)) {
    if (msg.has_chunk()) {
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

std::vector<int32_t> Tokenize(v1::Generation::Stub* stub, const std::string& text) {
  grpc::ClientContext ctx;
  SetDeadline(&ctx);
  v1::TokenizeRequest req;
  req.set_text(text);
  req.set_add_bos(true);
  v1::TokenizeResponse resp;
  const grpc::Status s = stub->Tokenize(&ctx, req, &resp);
  EXPECT_TRUE(s.ok()) << s.error_message();
  return {resp.ids().begin(), resp.ids().end()};
}

// One request, as gRPC and as the HTTP body of /v1/completions.
struct Case {
  std::string prompt = "Once upon a time";
  std::vector<int32_t> prompt_ids;  // used instead of `prompt` when set
  int max_tokens = 48;
  float temperature = 0.0f;
  int top_k = 0;
  float top_p = 1.0f;
  uint64_t seed = 1;
  std::vector<std::string> stop;
  std::string mode = "retrieval";

  v1::GenerateRequest Proto() const {
    v1::GenerateRequest r;
    if (prompt_ids.empty()) {
      r.set_text(prompt);
    } else {
      r.mutable_tokens()->mutable_ids()->Add(prompt_ids.begin(), prompt_ids.end());
    }
    r.set_max_tokens(max_tokens);
    for (const std::string& s : stop) r.add_stop(s);
    r.mutable_sampling()->set_temperature(temperature);
    r.mutable_sampling()->set_top_k(top_k);
    r.mutable_sampling()->set_top_p(top_p);
    r.mutable_sampling()->set_seed(seed);
    r.mutable_attention()->set_mode(mode);
    return r;
  }
  json Http(bool stream) const {
    json b = {{"model", kModel},       {"max_tokens", max_tokens}, {"temperature", temperature},
              {"top_k", top_k},        {"top_p", top_p},           {"seed", seed},
              {"stream", stream},      {"kvr", {{"mode", mode}}}};
    if (prompt_ids.empty()) {
      b["prompt"] = prompt;
    } else {
      b["prompt"] = prompt_ids;
    }
    if (!stop.empty()) b["stop"] = stop;
    return b;
  }
};

void ExpectSame(const Streamed& got, const Streamed& want, const std::string& what) {
  ASSERT_TRUE(want.status.ok()) << what << " (oracle): " << want.status.error_message();
  ASSERT_TRUE(got.status.ok()) << what << ": " << got.status.error_message();
  ASSERT_TRUE(got.summary.has_value()) << what << ": no final message";
  EXPECT_EQ(got.tokens, want.tokens) << what;
  EXPECT_EQ(got.text, want.text) << what;
  EXPECT_EQ(got.summary->usage().prompt_tokens(), want.summary->usage().prompt_tokens()) << what;
  EXPECT_EQ(got.summary->usage().completion_tokens(), static_cast<int64_t>(want.tokens.size()))
      << what;
  EXPECT_EQ(got.summary->finish_reason(), want.summary->finish_reason()) << what;
}

// ---------------------------------------------------------------------------
// HTTP.

struct HttpReply {
  int status = 0;  // 0: no response
  std::string body;
  httplib::Headers headers;
  json Json() const { return json::parse(body, nullptr, /*allow_exceptions=*/false); }
};

std::unique_ptr<httplib::Client> Client(const std::string& address) {
  auto c = std::make_unique<httplib::Client>("http://" + address);
  c->set_connection_timeout(5);
  c->set_read_timeout(60);
  c->set_write_timeout(60);
  return c;
}

HttpReply Post(const std::string& address, const std::string& path, const std::string& body,
               const std::string& content_type = "application/json") {
  auto c = Client(address);
  httplib::Result r = c->Post(path, body, content_type);
  HttpReply out;
  if (!r) return out;
  out.status = r->status;
  out.body = r->body;
  out.headers = r->headers;
  return out;
}

HttpReply Get(const std::string& address, const std::string& path) {
  auto c = Client(address);
  httplib::Result r = c->Get(path);
  HttpReply out;
  if (!r) return out;
  out.status = r->status;
  out.body = r->body;
  return out;
}

// The events of a server-sent-event body: each "data: X" payload, in order.
// False when the body is not well-formed SSE (lines other than "data: ..."
// followed by a blank line).
bool ParseSse(const std::string& body, std::vector<std::string>* events) {
  size_t pos = 0;
  while (pos < body.size()) {
    const size_t end = body.find("\n\n", pos);
    if (end == std::string::npos) return false;
    const std::string event = body.substr(pos, end - pos);
    if (event.rfind("data: ", 0) != 0 || event.find('\n') != std::string::npos) return false;
    events->push_back(event.substr(6));
    pos = end + 2;
  }
  return true;
}

// The text, finish reason and usage a completions / chat stream delivered.
struct SseResult {
  bool well_formed = false;
  bool done = false;  // ended with [DONE]
  std::string text;
  std::string finish_reason;
  std::string first_role;
  std::optional<json> usage;
  std::optional<json> error;
};

SseResult ReadSse(const std::string& body, bool chat) {
  SseResult out;
  std::vector<std::string> events;
  out.well_formed = ParseSse(body, &events);
  for (size_t i = 0; i < events.size(); ++i) {
    if (events[i] == "[DONE]") {
      out.done = i + 1 == events.size();
      continue;
    }
    const json e = json::parse(events[i], nullptr, false);
    if (e.is_discarded()) {
      out.well_formed = false;
      continue;
    }
    if (e.contains("error")) out.error = e["error"];
    if (e.contains("usage")) out.usage = e["usage"];
    if (!e.contains("choices") || e["choices"].empty()) continue;
    const json& c = e["choices"][0];
    if (chat) {
      if (c["delta"].contains("role")) out.first_role = c["delta"]["role"];
      if (c["delta"].contains("content")) out.text += c["delta"]["content"].get<std::string>();
    } else {
      out.text += c["text"].get<std::string>();
    }
    if (!c["finish_reason"].is_null()) out.finish_reason = c["finish_reason"];
  }
  return out;
}

// The gateway's /metrics samples: "name{labels}" → value (tests/support/metrics_page.h).
std::map<std::string, double> Scrape(const std::string& address) {
  const HttpReply r = Get(address, "/metrics");
  EXPECT_EQ(r.status, 200);
  return test_support::ParseExposition(r.body);
}

double Delta(const std::map<std::string, double>& before, const std::map<std::string, double>& after,
             const std::string& key) {
  auto b = before.find(key);
  auto a = after.find(key);
  return (a == after.end() ? 0.0 : a->second) - (b == before.end() ? 0.0 : b->second);
}

// A raw TCP connection to `address` ("127.0.0.1:PORT"): the test's own
// client side, so it can drop a stream mid-way.
int Connect(const std::string& address) {
  const size_t colon = address.rfind(':');
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_port = htons(static_cast<uint16_t>(std::stoi(address.substr(colon + 1))));
  inet_pton(AF_INET, address.substr(0, colon).c_str(), &sa.sin_addr);
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0 || connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) != 0) {
    if (fd >= 0) close(fd);
    return -1;
  }
  timeval tv{30, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  return fd;
}

// ---------------------------------------------------------------------------
// The shared cluster: two workers and a gateway in front of them.

class GatewayE2eTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    worker_a_ = StartWorker().release();
    worker_b_ = StartWorker().release();
    if (worker_a_ == nullptr || worker_b_ == nullptr) return;
    gateway_ = GatewayProcess::Start(
                   g_gateway_binary,
                   {"--workers=" + worker_a_->address() + "," + worker_b_->address(),
                    "--max_outstanding_per_worker=4", "--max_queue=32"})
                   .release();
  }
  static void TearDownTestSuite() {
    if (gateway_ != nullptr) {
      EXPECT_TRUE(gateway_->Stop()) << "kvr_gateway did not exit 0";
    }
    for (ServerProcess* w : {worker_a_, worker_b_}) {
      if (w != nullptr) {
        EXPECT_TRUE(StopOk(w)) << "kvr_worker did not exit 0";
      }
      delete w;
    }
    delete gateway_;
    gateway_ = nullptr;
    worker_a_ = worker_b_ = nullptr;
  }
  void SetUp() override {
    ASSERT_NE(gateway_, nullptr);
    gw_ = Stub(gateway_->grpc());
    direct_ = Stub(worker_a_->address());
    stub_a_ = Stub(worker_a_->address());
    stub_b_ = Stub(worker_b_->address());
  }

  // The worker now decoding exactly one sequence (the test's), or null.
  v1::Generation::Stub* BusyWorker() {
    const int a = Info(stub_a_.get()).active_sequences();
    const int b = Info(stub_b_.get()).active_sequences();
    if (a + b != 1) return nullptr;
    return a == 1 ? stub_a_.get() : stub_b_.get();
  }

  static ServerProcess* worker_a_;
  static ServerProcess* worker_b_;
  static GatewayProcess* gateway_;
  std::unique_ptr<v1::Generation::Stub> gw_, direct_, stub_a_, stub_b_;
};
ServerProcess* GatewayE2eTest::worker_a_ = nullptr;
ServerProcess* GatewayE2eTest::worker_b_ = nullptr;
GatewayProcess* GatewayE2eTest::gateway_ = nullptr;

TEST_F(GatewayE2eTest, GrpcEqualsWorker) {
  std::vector<std::pair<std::string, Case>> cases;
  for (const std::string mode : {"retrieval", "full"}) {
    Case greedy;
    greedy.max_tokens = 100;
    greedy.mode = mode;
    cases.push_back({"greedy " + mode, greedy});
    Case sampled = greedy;
    sampled.temperature = 0.9f;
    sampled.top_k = 40;
    sampled.top_p = 0.9f;
    sampled.seed = 7;
    sampled.prompt = kLongPrompt;
    cases.push_back({"seeded " + mode, sampled});
  }
  Case stop;
  stop.max_tokens = 200;
  stop.stop = {"."};
  cases.push_back({"stop string", stop});
  Case ids;
  ids.prompt_ids = Tokenize(direct_.get(), "Once upon a time");  // BOS included
  cases.push_back({"token ids", ids});
  for (const auto& [name, c] : cases) {
    const Streamed want = Stream(direct_.get(), c.Proto());
    ExpectSame(Stream(gw_.get(), c.Proto()), want, name);
  }
}

TEST_F(GatewayE2eTest, HttpEqualsGrpc) {
  Case c;
  c.max_tokens = 80;
  c.temperature = 0.8f;
  c.seed = 11;
  const Streamed want = Stream(direct_.get(), c.Proto());
  ASSERT_TRUE(want.status.ok()) << want.status.error_message();

  const HttpReply whole = Post(gateway_->http(), "/v1/completions", c.Http(false).dump());
  ASSERT_EQ(whole.status, 200) << whole.body;
  const json r = whole.Json();
  EXPECT_EQ(r["object"], "text_completion");
  EXPECT_EQ(r["model"], kModel);
  EXPECT_TRUE(r["id"].get<std::string>().rfind("cmpl-", 0) == 0) << r["id"];
  ASSERT_EQ(r["choices"].size(), 1u);
  EXPECT_EQ(r["choices"][0]["index"], 0);
  EXPECT_EQ(r["choices"][0]["text"], want.text);
  EXPECT_EQ(r["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(r["kvr"]["token_ids"].get<std::vector<int32_t>>(), want.tokens);
  EXPECT_EQ(r["usage"]["prompt_tokens"], want.summary->usage().prompt_tokens());
  EXPECT_EQ(r["usage"]["completion_tokens"], 80);
  EXPECT_EQ(r["usage"]["total_tokens"], want.summary->usage().prompt_tokens() + 80);

  json sb = c.Http(true);
  sb["stream_options"] = {{"include_usage", true}};
  const HttpReply streamed = Post(gateway_->http(), "/v1/completions", sb.dump());
  ASSERT_EQ(streamed.status, 200) << streamed.body;
  ASSERT_EQ(streamed.headers.count("Content-Type"), 1u);
  EXPECT_NE(streamed.headers.find("Content-Type")->second.find("text/event-stream"),
            std::string::npos);
  const SseResult s = ReadSse(streamed.body, /*chat=*/false);
  EXPECT_TRUE(s.well_formed) << streamed.body;
  EXPECT_TRUE(s.done) << "no final data: [DONE]";
  EXPECT_EQ(s.text, want.text);
  EXPECT_EQ(s.finish_reason, "length");
  ASSERT_TRUE(s.usage.has_value());
  EXPECT_EQ((*s.usage)["completion_tokens"], 80);

  // Token-id prompts and a stop string give the worker's output too.
  Case ids;
  ids.prompt_ids = Tokenize(direct_.get(), "Once upon a time");
  ids.max_tokens = 200;
  ids.stop = {"."};
  const Streamed want_ids = Stream(direct_.get(), ids.Proto());
  ASSERT_EQ(want_ids.summary->finish_reason(), v1::FINISH_REASON_STOP);
  const HttpReply r_ids = Post(gateway_->http(), "/v1/completions", ids.Http(false).dump());
  ASSERT_EQ(r_ids.status, 200) << r_ids.body;
  EXPECT_EQ(r_ids.Json()["choices"][0]["text"], want_ids.text);
  EXPECT_EQ(r_ids.Json()["choices"][0]["finish_reason"], "stop");
}

TEST_F(GatewayE2eTest, ChatCompletionsStreamAsSse) {
  const json body = {{"model", kModel},
                     {"messages",
                      {{{"role", "system"}, {"content", "You tell stories."}},
                       {{"role", "user"}, {"content", "Tell me about a cat."}}}},
                     {"max_tokens", 40},
                     {"temperature", 0.7},
                     {"seed", 3}};
  const HttpReply whole = Post(gateway_->http(), "/v1/chat/completions", body.dump());
  ASSERT_EQ(whole.status, 200) << whole.body;
  const json r = whole.Json();
  EXPECT_EQ(r["object"], "chat.completion");
  EXPECT_EQ(r["choices"][0]["message"]["role"], "assistant");
  const std::string content = r["choices"][0]["message"]["content"];

  // The README's template, sent as a completion, gives the same text.
  v1::GenerateRequest p;
  p.set_text("System: You tell stories.\nUser: Tell me about a cat.\nAssistant:");
  p.set_max_tokens(40);
  p.add_stop("\nUser:");
  p.mutable_sampling()->set_temperature(0.7f);
  p.mutable_sampling()->set_seed(3);
  const Streamed want = Stream(direct_.get(), p);
  ASSERT_TRUE(want.status.ok());
  EXPECT_EQ(content, want.text);

  json sb = body;
  sb["stream"] = true;
  const HttpReply streamed = Post(gateway_->http(), "/v1/chat/completions", sb.dump());
  ASSERT_EQ(streamed.status, 200) << streamed.body;
  const SseResult s = ReadSse(streamed.body, /*chat=*/true);
  EXPECT_TRUE(s.well_formed) << streamed.body;
  EXPECT_TRUE(s.done) << "no final data: [DONE]";
  EXPECT_EQ(s.first_role, "assistant");
  EXPECT_EQ(s.text, content);
  EXPECT_FALSE(s.finish_reason.empty());
  EXPECT_FALSE(s.error.has_value());
  std::vector<std::string> events;
  ASSERT_TRUE(ParseSse(streamed.body, &events));
  EXPECT_GT(events.size(), 3u) << "the reply must stream in pieces";
}

TEST_F(GatewayE2eTest, SixteenConcurrentRequestsEqualSolo) {
  const std::vector<std::string> prompts = {
      "Once upon a time", "The cat", "Lily and Tom went to the park", kLongPrompt,
      "One day, a little bird", "The sun was shining", "Ben had a red car", "Sara liked to"};
  std::vector<Case> cases(16);
  std::vector<Streamed> solo(cases.size());
  for (size_t i = 0; i < cases.size(); ++i) {
    Case& c = cases[i];
    c.prompt = prompts[i % prompts.size()];
    c.max_tokens = 40 + 10 * static_cast<int>(i % 5);
    c.seed = 100 + i;
    c.temperature = i % 4 == 0 ? 0.0f : 0.9f;
    c.top_k = i % 2 == 0 ? 40 : 0;
    c.mode = i % 3 == 0 ? "full" : "retrieval";
    solo[i] = Stream(direct_.get(), c.Proto());
    ASSERT_TRUE(solo[i].status.ok()) << solo[i].status.error_message();
  }
  const int64_t finished_a = Info(stub_a_.get()).finished_requests();
  const int64_t finished_b = Info(stub_b_.get()).finished_requests();
  // Every fourth request goes through HTTP, the rest through gRPC.
  std::vector<Streamed> got(cases.size());
  std::vector<HttpReply> http(cases.size());
  std::vector<std::thread> threads;
  for (size_t i = 0; i < cases.size(); ++i) {
    threads.emplace_back([&, i] {
      if (i % 4 == 3) {
        http[i] = Post(gateway_->http(), "/v1/completions", cases[i].Http(false).dump());
      } else {
        got[i] = Stream(gw_.get(), cases[i].Proto());
      }
    });
  }
  for (std::thread& t : threads) t.join();
  for (size_t i = 0; i < cases.size(); ++i) {
    const std::string what = "request " + std::to_string(i);
    if (i % 4 == 3) {
      ASSERT_EQ(http[i].status, 200) << what << ": " << http[i].body;
      const json r = http[i].Json();
      EXPECT_EQ(r["choices"][0]["text"], solo[i].text) << what;
      EXPECT_EQ(r["kvr"]["token_ids"].get<std::vector<int32_t>>(), solo[i].tokens) << what;
    } else {
      ExpectSame(got[i], solo[i], what);
    }
  }
  // Least-outstanding routing used both workers.
  const int64_t served_a = Info(stub_a_.get()).finished_requests() - finished_a;
  const int64_t served_b = Info(stub_b_.get()).finished_requests() - finished_b;
  EXPECT_EQ(served_a + served_b, 16);
  EXPECT_GT(served_a, 0);
  EXPECT_GT(served_b, 0);
}

TEST_F(GatewayE2eTest, GrpcCancelFreesWorkerSequence) {
  Case c;
  c.prompt = kLongPrompt;
  c.max_tokens = 470;  // to the context's end: long enough to cancel mid-way
  grpc::ClientContext ctx;
  SetDeadline(&ctx);
  auto reader = gw_->Generate(&ctx, c.Proto());
  v1::GenerateResponse msg;
  for (int tokens = 0; tokens < 8;) {
    ASSERT_TRUE(reader->Read(&msg));
    if (msg.has_prefill_progress()) continue;  // passed through before the first chunk
    ASSERT_TRUE(msg.has_chunk()) << "the stream ended before it could be cancelled";
    tokens += msg.chunk().token_ids_size();
  }
  v1::Generation::Stub* worker = BusyWorker();
  ASSERT_NE(worker, nullptr) << "exactly one worker should be decoding the stream";
  const v1::GetModelInfoResponse during = Info(worker);
  EXPECT_GT(during.node_shards(), 0);
  ctx.TryCancel();
  while (reader->Read(&msg)) {
  }
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  // The worker ends the request (sequence stopped, shards dropped): waited
  // for server side, no polling.
  const v1::GetModelInfoResponse after = Info(worker, during.finished_requests() + 1);
  EXPECT_EQ(after.finished_requests(), during.finished_requests() + 1);
  EXPECT_EQ(after.active_sequences(), 0);
  EXPECT_EQ(after.node_sequences(), 0);
  EXPECT_EQ(after.node_shards(), 0);
}

TEST_F(GatewayE2eTest, HttpDisconnectFreesWorkerSequence) {
  Case c;
  c.prompt = kLongPrompt;
  c.max_tokens = 470;
  const std::string body = c.Http(/*stream=*/true).dump();
  const int fd = Connect(gateway_->http());
  ASSERT_GE(fd, 0);
  const std::string request = absl::StrCat(
      "POST /v1/completions HTTP/1.1\r\nHost: ", gateway_->http(),
      "\r\nContent-Type: application/json\r\nContent-Length: ", body.size(), "\r\n\r\n", body);
  ASSERT_EQ(write(fd, request.data(), request.size()), static_cast<ssize_t>(request.size()));
  // Read until a few events have arrived: the stream is under way.
  std::string got;
  char buf[4096];
  size_t events = 0;
  while (events < 4) {
    const ssize_t n = read(fd, buf, sizeof(buf));
    ASSERT_GT(n, 0) << "the stream ended early: " << got;
    got.append(buf, static_cast<size_t>(n));
    events = 0;
    for (size_t p = got.find("data: "); p != std::string::npos; p = got.find("data: ", p + 1)) {
      ++events;
    }
  }
  EXPECT_EQ(got.rfind("HTTP/1.1 200", 0), 0u) << got;
  v1::Generation::Stub* worker = BusyWorker();
  ASSERT_NE(worker, nullptr) << "exactly one worker should be decoding the stream";
  const v1::GetModelInfoResponse during = Info(worker);
  close(fd);  // the client goes away mid-stream
  const v1::GetModelInfoResponse after = Info(worker, during.finished_requests() + 1);
  EXPECT_EQ(after.active_sequences(), 0);
  EXPECT_EQ(after.node_sequences(), 0);
  EXPECT_EQ(after.node_shards(), 0);
}

TEST_F(GatewayE2eTest, BadRequestsGetPreciseErrorsAndServingGoesOn) {
  struct Bad {
    std::string name;
    std::string body;
    int status;
    std::string message_has;
    std::string content_type = "application/json";
    std::string path = "/v1/completions";
  };
  std::string long_prompt;
  for (int i = 0; i < 300; ++i) long_prompt += "Once upon a time ";
  const json ok = {{"model", kModel}, {"prompt", "Once upon a time"}, {"max_tokens", 4}};
  auto with = [&](const std::string& key, const json& v) {
    json b = ok;
    b[key] = v;
    return b.dump();
  };
  const std::vector<Bad> bad = {
      {"unknown model", with("model", "gpt-4"), 404, "model"},
      {"negative max_tokens", with("max_tokens", -1), 400, "max_tokens"},
      {"temperature as a string", with("temperature", "NaN"), 400, "temperature"},
      {"temperature beyond float", json::parse(R"({"model":"stories260K","prompt":"a",
          "temperature":1e300})").dump(), 400, "temperature"},
      {"top_p 1.5 (worker-checked)", with("top_p", 1.5), 400, "top_p"},
      {"unknown attention mode", with("kvr", {{"mode", "sparse"}}), 400, "kvr.mode"},
      {"prompt over the context", with("prompt", long_prompt), 400, "512"},
      {"malformed JSON", "{\"model\": \"stories260K\", \"prompt\": ", 400, "invalid JSON"},
      {"n over --max_n", with("n", 17), 400, "n:"},
      {"wrong content type", ok.dump(), 415, "Content-Type", "text/plain"},
      {"no prompt", json{{"model", kModel}}.dump(), 400, "prompt"},
      {"more prompts than --max_prompts", with("prompt", std::vector<std::string>(17, "a")), 400,
       "prompt"},
      {"chat without messages", ok.dump(), 400, "messages", "application/json",
       "/v1/chat/completions"},
      {"unknown route", ok.dump(), 404, "/v1/nothing", "application/json", "/v1/nothing"},
      {"body over --max_request_bytes", with("prompt", std::string(5 << 20, 'a')), 413,
       "bytes"},
  };
  for (const Bad& b : bad) {
    const HttpReply r = Post(gateway_->http(), b.path, b.body, b.content_type);
    EXPECT_EQ(r.status, b.status) << b.name << ": " << r.body;
    const json e = r.Json();
    ASSERT_TRUE(e.contains("error")) << b.name << ": " << r.body;
    for (const char* key : {"message", "type", "param", "code"}) {
      EXPECT_TRUE(e["error"].contains(key)) << b.name << " lacks error." << key;
    }
    EXPECT_NE(e["error"]["message"].get<std::string>().find(b.message_has), std::string::npos)
        << b.name << ": \"" << e["error"]["message"] << "\" lacks \"" << b.message_has << "\"";
  }
  // The field is also in "param" where there is one.
  const json neg = Post(gateway_->http(), "/v1/completions", with("max_tokens", -1)).Json();
  EXPECT_EQ(neg["error"]["param"], "max_tokens");
  const json ctx = Post(gateway_->http(), "/v1/completions", with("prompt", long_prompt)).Json();
  EXPECT_EQ(ctx["error"]["code"], "context_length_exceeded");

  // gRPC: the worker's codes pass through the gateway.
  Case c;
  v1::GenerateRequest r = c.Proto();
  r.set_max_tokens(-1);
  Streamed s = Stream(gw_.get(), r);
  EXPECT_EQ(s.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(s.status.error_message().find("max_tokens"), std::string::npos);
  r = c.Proto();
  r.mutable_sampling()->set_temperature(std::numeric_limits<float>::quiet_NaN());
  s = Stream(gw_.get(), r);
  EXPECT_EQ(s.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(s.status.error_message().find("temperature"), std::string::npos);
  r = c.Proto();
  r.set_text(long_prompt);
  s = Stream(gw_.get(), r);
  EXPECT_EQ(s.status.error_code(), grpc::StatusCode::OUT_OF_RANGE);
  EXPECT_NE(s.status.error_message().find("512"), std::string::npos);

  // Still serving, both APIs.
  const Streamed want = Stream(direct_.get(), c.Proto());
  ExpectSame(Stream(gw_.get(), c.Proto()), want, "after bad requests");
  const HttpReply good = Post(gateway_->http(), "/v1/completions", c.Http(false).dump());
  ASSERT_EQ(good.status, 200) << good.body;
  EXPECT_EQ(good.Json()["choices"][0]["text"], want.text);
}

TEST_F(GatewayE2eTest, ModelsHealthTokenizeAndReflection) {
  const HttpReply models = Get(gateway_->http(), "/v1/models");
  ASSERT_EQ(models.status, 200);
  const json m = models.Json();
  EXPECT_EQ(m["object"], "list");
  ASSERT_EQ(m["data"].size(), 1u);
  EXPECT_EQ(m["data"][0]["id"], kModel);
  EXPECT_EQ(m["data"][0]["object"], "model");
  EXPECT_EQ(m["data"][0]["max_model_len"], 512);
  const HttpReply health = Get(gateway_->http(), "/healthz");
  EXPECT_EQ(health.status, 200);
  EXPECT_EQ(health.Json()["healthy_workers"], 2);

  // Unary calls are forwarded.
  grpc::ClientContext c1;
  SetDeadline(&c1);
  v1::TokenizeRequest tr;
  tr.set_text("Once upon a time");
  tr.set_add_bos(true);
  v1::TokenizeResponse tresp;
  ASSERT_TRUE(gw_->Tokenize(&c1, tr, &tresp).ok());
  EXPECT_EQ(std::vector<int32_t>(tresp.ids().begin(), tresp.ids().end()),
            Tokenize(direct_.get(), "Once upon a time"));
  grpc::ClientContext c2;
  SetDeadline(&c2);
  v1::DetokenizeRequest dr;
  dr.mutable_ids()->Add(tresp.ids().begin() + 1, tresp.ids().end());
  v1::DetokenizeResponse dresp;
  ASSERT_TRUE(gw_->Detokenize(&c2, dr, &dresp).ok());
  EXPECT_EQ(dresp.text(), "Once upon a time");
  EXPECT_EQ(Info(gw_.get()).vocab_size(), 512);

  auto hstub = grpc::health::v1::Health::NewStub(
      grpc::CreateChannel(gateway_->grpc(), grpc::InsecureChannelCredentials()));
  for (const std::string service : {"", "kvr.v1.Generation"}) {
    grpc::ClientContext ctx;
    SetDeadline(&ctx);
    grpc::health::v1::HealthCheckRequest req;
    req.set_service(service);
    grpc::health::v1::HealthCheckResponse resp;
    ASSERT_TRUE(hstub->Check(&ctx, req, &resp).ok()) << service;
    EXPECT_EQ(resp.status(), grpc::health::v1::HealthCheckResponse::SERVING) << service;
  }
  auto bytes = test_support::ReflectionListServices(gateway_->grpc());
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  EXPECT_NE(bytes->find("kvr.v1.Generation"), std::string::npos);
}

TEST_F(GatewayE2eTest, MetricsCountExactlyTheRequestsMade) {
  const auto before = Scrape(gateway_->metrics());
  Case c;
  c.max_tokens = 20;
  const Streamed g1 = Stream(gw_.get(), c.Proto());
  c.prompt = "The cat";
  c.max_tokens = 30;
  const Streamed g2 = Stream(gw_.get(), c.Proto());
  ASSERT_TRUE(g1.status.ok() && g2.status.ok());
  const HttpReply h = Post(gateway_->http(), "/v1/completions", c.Http(false).dump());
  ASSERT_EQ(h.status, 200);
  const HttpReply bad = Post(gateway_->http(), "/v1/completions", "{");
  ASSERT_EQ(bad.status, 400);
  v1::GenerateRequest neg = c.Proto();
  neg.set_max_tokens(-5);
  ASSERT_EQ(Stream(gw_.get(), neg).status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  const auto after = Scrape(gateway_->metrics());

  EXPECT_EQ(Delta(before, after, "kvr_gateway_requests_total{api=\"grpc\",code=\"OK\"}"), 2);
  EXPECT_EQ(Delta(before, after, "kvr_gateway_requests_total{api=\"http\",code=\"OK\"}"), 1);
  EXPECT_EQ(
      Delta(before, after, "kvr_gateway_requests_total{api=\"http\",code=\"INVALID_ARGUMENT\"}"), 1);
  EXPECT_EQ(
      Delta(before, after, "kvr_gateway_requests_total{api=\"grpc\",code=\"INVALID_ARGUMENT\"}"), 1);
  const double generated = static_cast<double>(
      g1.tokens.size() + g2.tokens.size() + h.Json()["kvr"]["token_ids"].size());
  EXPECT_EQ(Delta(before, after, "kvr_gateway_generated_tokens_total"), generated);
  EXPECT_EQ(Delta(before, after, "kvr_gateway_prompt_tokens_total"),
            g1.summary->usage().prompt_tokens() + 2 * g2.summary->usage().prompt_tokens());
  EXPECT_EQ(Delta(before, after, "kvr_gateway_time_to_first_token_seconds_count"), 3);
  // One latency per token after each request's first chunk.
  const double itl = Delta(before, after, "kvr_gateway_inter_token_latency_seconds_count");
  EXPECT_GT(itl, 0);
  EXPECT_LE(itl, generated - 3);
  EXPECT_EQ(Delta(before, after, "kvr_gateway_request_duration_seconds_count"), 4);  // reached a worker
  EXPECT_EQ(after.at("kvr_gateway_requests_running"), 0);
  EXPECT_EQ(after.at("kvr_gateway_requests_waiting"), 0);
  EXPECT_EQ(after.at("kvr_gateway_workers{state=\"healthy\"}"), 2);
  EXPECT_EQ(after.at("kvr_gateway_workers{state=\"unhealthy\"}"), 0);
}

// ---------------------------------------------------------------------------
// Clusters of their own.

// A worker that stops answering (SIGSTOP) holds the only slot: the next
// request queues and times out (504 / DEADLINE_EXCEEDED), the one after is
// refused (429 with Retry-After / RESOURCE_EXHAUSTED with retry advice).
TEST(GatewayOverloadTest, FullQueueAndQueueDeadline) {
  auto worker = StartWorker();
  ASSERT_NE(worker, nullptr);
  auto gateway = GatewayProcess::Start(
      g_gateway_binary,
      {"--workers=" + worker->address(), "--max_outstanding_per_worker=1", "--max_queue=1",
       "--request_timeout_seconds=2", "--health_check_seconds=1000"});
  ASSERT_NE(gateway, nullptr);
  {
    auto gw = Stub(gateway->grpc());
    Case c;
    c.max_tokens = 8;
    // Connected and healthy, and the model's id known for HTTP.
    ASSERT_TRUE(Stream(gw.get(), c.Proto()).status.ok());
    ASSERT_EQ(Post(gateway->http(), "/v1/completions", c.Http(false).dump()).status, 200);
    ASSERT_TRUE(test_support::StopProcess(worker->pid()));
    // The holder: a gRPC stream stuck on the stopped worker until its deadline.
    std::thread holder([&] {
      const Streamed s = Stream(gw.get(), c.Proto(), std::chrono::milliseconds(4000));
      EXPECT_EQ(s.status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED)
          << s.status.error_message();
    });
    // The queued one: HTTP, whose deadline is --request_timeout_seconds.
    HttpReply queued;
    std::thread waiter([&] {
      queued = Post(gateway->http(), "/v1/completions", c.Http(false).dump());
    });
    // Both admitted (one running, one waiting): read from the gateway's own
    // gauges, with a deadline.
    const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    std::map<std::string, double> m;
    do {
      m = Scrape(gateway->metrics());
    } while ((m["kvr_gateway_requests_running"] != 1 || m["kvr_gateway_requests_waiting"] != 1) &&
             std::chrono::steady_clock::now() < give_up);
    EXPECT_EQ(m["kvr_gateway_requests_running"], 1);
    EXPECT_EQ(m["kvr_gateway_requests_waiting"], 1);

    const HttpReply refused = Post(gateway->http(), "/v1/completions", c.Http(false).dump());
    EXPECT_EQ(refused.status, 429) << refused.body;
    EXPECT_EQ(refused.headers.count("Retry-After"), 1u);
    EXPECT_EQ(refused.Json()["error"]["type"], "rate_limit_error");
    EXPECT_NE(refused.body.find("retry"), std::string::npos) << refused.body;
    const Streamed rejected = Stream(gw.get(), c.Proto());
    EXPECT_EQ(rejected.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
    EXPECT_NE(rejected.status.error_message().find("retry"), std::string::npos)
        << rejected.status.error_message();

    waiter.join();
    EXPECT_EQ(queued.status, 504) << queued.body;
    EXPECT_EQ(queued.Json()["error"]["code"], "deadline_exceeded");
    holder.join();
    ASSERT_EQ(kill(worker->pid(), SIGCONT), 0);
    // The slot is free again: served.
    const Streamed after = Stream(gw.get(), c.Proto());
    EXPECT_TRUE(after.status.ok()) << after.status.error_message();
    const auto m2 = Scrape(gateway->metrics());
    EXPECT_EQ(m2.at("kvr_gateway_requests_total{api=\"http\",code=\"RESOURCE_EXHAUSTED\"}"), 1);
    EXPECT_EQ(m2.at("kvr_gateway_requests_total{api=\"grpc\",code=\"RESOURCE_EXHAUSTED\"}"), 1);
    EXPECT_EQ(m2.at("kvr_gateway_requests_total{api=\"http\",code=\"DEADLINE_EXCEEDED\"}"), 1);
  }
  EXPECT_TRUE(gateway->Stop());
  EXPECT_TRUE(StopOk(worker.get()));
}

// A worker killed under the gateway: requests routed to it are retried on
// the other one, and it leaves rotation.
TEST(GatewayFailoverTest, DeadWorkerIsRetriedAndTakenOutOfRotation) {
  auto a = StartWorker();
  auto b = StartWorker();
  ASSERT_NE(a, nullptr);
  ASSERT_NE(b, nullptr);
  auto gateway = GatewayProcess::Start(
      g_gateway_binary,
      {"--workers=" + a->address() + "," + b->address(), "--health_check_seconds=1000"});
  ASSERT_NE(gateway, nullptr);
  {
    auto gw = Stub(gateway->grpc());
    Case c;
    c.max_tokens = 16;
    const Streamed want = Stream(Stub(a->address()).get(), c.Proto());
    // Both workers connected.
    for (int i = 0; i < 4; ++i) ExpectSame(Stream(gw.get(), c.Proto()), want, "before");
    ASSERT_TRUE(b->Stop(SIGKILL).has_value());
    for (int i = 0; i < 4; ++i) {
      ExpectSame(Stream(gw.get(), c.Proto()), want, "after kill " + std::to_string(i));
      const HttpReply h = Post(gateway->http(), "/v1/completions", c.Http(false).dump());
      ASSERT_EQ(h.status, 200) << h.body;
      EXPECT_EQ(h.Json()["choices"][0]["text"], want.text);
    }
    const auto m = Scrape(gateway->metrics());
    EXPECT_EQ(m.at("kvr_gateway_workers{state=\"healthy\"}"), 1);
    EXPECT_EQ(m.at("kvr_gateway_workers{state=\"unhealthy\"}"), 1);
    EXPECT_EQ(Get(gateway->http(), "/healthz").Json()["healthy_workers"], 1);
  }
  EXPECT_TRUE(gateway->Stop());
  EXPECT_TRUE(StopOk(a.get()));
}

// --workers dns:///localhost:PORT: every address of localhost, one worker
// behind it (an address where nothing listens, e.g. ::1, is out of rotation).
TEST(GatewayMembershipTest, DnsWorkerList) {
  auto worker = StartWorker();
  ASSERT_NE(worker, nullptr);
  const std::string port = worker->address().substr(worker->address().rfind(':') + 1);
  auto gateway = GatewayProcess::Start(g_gateway_binary, {"--workers=dns:///localhost:" + port});
  ASSERT_NE(gateway, nullptr);
  {
    Case c;
    c.max_tokens = 16;
    const Streamed want = Stream(Stub(worker->address()).get(), c.Proto());
    ExpectSame(Stream(Stub(gateway->grpc()).get(), c.Proto()), want, "dns membership");
    const auto m = Scrape(gateway->metrics());
    EXPECT_EQ(m.at("kvr_gateway_workers{state=\"healthy\"}"), 1);
  }
  EXPECT_TRUE(gateway->Stop());
  EXPECT_TRUE(StopOk(worker.get()));
}

}  // namespace
}  // namespace kvr::gateway

int main(int argc, char** argv) {
  GOOGLE_PROTOBUF_VERIFY_VERSION;
  ::testing::InitGoogleTest(&argc, argv);
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&](const std::string& flag, std::string* out) {
      if (a == flag && i + 1 < argc) {
        *out = argv[++i];
      } else if (a.rfind(flag + "=", 0) == 0) {
        *out = a.substr(flag.size() + 1);
      }
    };
    value("--kvr_gateway", &kvr::gateway::g_gateway_binary);
    value("--kvr_worker", &kvr::gateway::g_worker_binary);
  }
  if (kvr::gateway::g_gateway_binary.empty() || kvr::gateway::g_worker_binary.empty()) {
    std::fprintf(stderr, "usage: %s --kvr_gateway PATH --kvr_worker PATH [gtest flags]\n",
                 argv[0]);
    return 2;
  }
  signal(SIGPIPE, SIG_IGN);
  return RUN_ALL_TESTS();
}
