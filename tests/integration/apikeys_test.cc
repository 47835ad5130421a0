// Gateway API keys end to end (issue 16 [secure]): a real kvr_gateway with
// --api_keys_file in front of a real kvr_worker (CPU, stories260K), all on
// 127.0.0.1 with ports read from their printed lines.
//
//  * a valid key is served token-identically to a gateway without keys
//    (HTTP and gRPC); /healthz and /metrics need no key, /v1/models does;
//  * no key / a wrong key / a malformed one → 401 with OpenAI's exact error
//    object (code null / "invalid_api_key"), UNAUTHENTICATED over gRPC
//    (Generate and Tokenize), counted by reason;
//  * a reload revokes a key and adds another within the poll interval; a
//    bad file keeps the keys and is counted;
//  * max_concurrent 1: a second request (HTTP or gRPC) while the first is
//    in flight → 429 type "requests" / RESOURCE_EXHAUSTED; served after;
//  * tokens_per_minute: 429 type "tokens" with Retry-After once the budget
//    is spent, served again after Retry-After; tokens counted exactly;
//  * a malformed keys file at start → exit 2 naming the file and problem;
//  * no key (valid, wrong, reloaded) ever appears in the gateway's output;
//  * `kvr apikey`'s printed entry authenticates its printed key.
//
// Environment: KVR_GATEWAY_BIN, KVR_WORKER_BIN, KVR_BIN.
#include <signal.h>
#include <sys/wait.h>

#include <httplib.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/subprocess.h"
#include "grpcpp/client_context.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "gtest/gtest.h"
#include "kvr/v1/generation.grpc.pb.h"
#include "nlohmann/json.hpp"
#include "services/gateway/api_keys.h"
#include "tests/support/gateway_process.h"
#include "tests/support/generate_stream.h"
#include "tests/support/metrics_page.h"
#include "tests/support/server_process.h"
#include "tests/support/temp_dir.h"

namespace kvr::gateway {
namespace {

using nlohmann::json;
using test_support::GatewayProcess;
using test_support::ServerProcess;
using test_support::TempDir;
using Clock = std::chrono::steady_clock;

constexpr char kModel[] = "stories260K";
constexpr char kMissingMessage[] =
    "You didn't provide an API key. You need to provide your API key in an Authorization header "
    "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)";

// OpenAI's 401 body for a wrong, revoked or malformed key.
json WrongKeyError() {
  return {{"error",
           {{"message", "Incorrect API key provided"},
            {"type", "invalid_request_error"},
            {"param", nullptr},
            {"code", "invalid_api_key"}}}};
}

std::string Env(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr ? v : "";
}

std::unique_ptr<ServerProcess> StartWorker() {
  return ServerProcess::Start(Env("KVR_WORKER_BIN"), "kvr_worker",
                              {"--max_concurrent=4", "--max_queue=16"});
}

// A new key made by the library (as `kvr apikey` does).
MadeApiKey Key(const std::string& id, ApiKeyLimits limits = {}) {
  absl::StatusOr<MadeApiKey> k = MakeApiKey(id, limits);
  EXPECT_TRUE(k.ok()) << k.status();
  return k.ok() ? *k : MadeApiKey{};
}

// Writes a keys file of `keys` to `path` atomically (a new inode, as a
// Kubernetes Secret update does).
void WriteKeys(const std::string& path, const std::vector<MadeApiKey>& keys) {
  std::vector<std::string> entries;
  for (const MadeApiKey& k : keys) entries.push_back(k.entry);
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << "{\"keys\": [" << absl::StrJoin(entries, ",\n") << "]}\n";
  }
  std::filesystem::rename(tmp, path);
}

void WriteText(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << text;
  }
  std::filesystem::rename(tmp, path);
}

// ---------------------------------------------------------------------------
// HTTP and gRPC clients.

struct HttpReply {
  int status = 0;  // 0: no response
  std::string body;
  httplib::Headers headers;
  json Json() const { return json::parse(body, nullptr, /*allow_exceptions=*/false); }
};

// `authorization`: the header's value; nullopt sends none.
HttpReply Http(const std::string& address, const std::string& method, const std::string& path,
               const std::string& body, std::optional<std::string> authorization) {
  httplib::Client c("http://" + address);
  c.set_connection_timeout(5);
  c.set_read_timeout(60);
  httplib::Headers headers;
  if (authorization.has_value()) headers.emplace("Authorization", *authorization);
  httplib::Result r = method == "GET" ? c.Get(path, headers)
                                      : c.Post(path, headers, body, "application/json");
  HttpReply out;
  if (!r) return out;
  out.status = r->status;
  out.body = r->body;
  out.headers = r->headers;
  return out;
}

std::optional<std::string> Bearer(const MadeApiKey& k) { return "Bearer " + k.key; }

json Completion(int max_tokens = 32, bool stream = false) {
  return {{"model", kModel},     {"prompt", "Once upon a time"}, {"max_tokens", max_tokens},
          {"temperature", 0},    {"stream", stream}};
}

HttpReply Complete(const std::string& address, std::optional<std::string> authorization,
                   const json& body = Completion()) {
  return Http(address, "POST", "/v1/completions", body.dump(), std::move(authorization));
}

using Streamed = test_support::GenerateStream;

std::unique_ptr<v1::Generation::Stub> Stub(const std::string& address) {
  return v1::Generation::NewStub(grpc::CreateChannel(address, grpc::InsecureChannelCredentials()));
}

v1::GenerateRequest Request(int max_tokens = 32) {
  v1::GenerateRequest r;
  r.set_text("Once upon a time");
  r.set_max_tokens(max_tokens);
  r.mutable_sampling()->set_temperature(0);
  return r;
}

Streamed Generate(v1::Generation::Stub* stub, const v1::GenerateRequest& request,
                  std::optional<std::string> authorization,
                  std::chrono::seconds timeout = std::chrono::seconds(60)) {
  Streamed out;
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + timeout);
  if (authorization.has_value()) ctx.AddMetadata("authorization", *authorization);
  auto reader = stub->Generate(&ctx, request);
  v1::GenerateResponse msg;
  while (reader->Read(&msg)) out.Append(msg);
  out.status = reader->Finish();
  return out;
}

test_support::Samples Scrape(const GatewayProcess& g) {
  std::optional<std::string> page = test_support::HttpGetMetrics(g.metrics());
  return page.has_value() ? test_support::ParseExposition(*page) : test_support::Samples{};
}

double Metric(const GatewayProcess& g, const std::string& name,
              const std::map<std::string, std::string>& labels = {}) {
  return test_support::Get(Scrape(g), name, labels);
}

// Checks a 429 of a key's limit: OpenAI's rate-limit error of `type`
// ("requests" / "tokens") whose message holds `limit_text`, and one
// Retry-After header; returns its seconds (0 when malformed).
int ExpectKeyRateLimited(const HttpReply& r, const std::string& type,
                         const std::string& limit_text) {
  EXPECT_EQ(r.status, 429) << r.body;
  const json e = r.Json()["error"];
  EXPECT_EQ(e["type"], type) << r.body;
  EXPECT_EQ(e["code"], "rate_limit_exceeded") << r.body;
  EXPECT_TRUE(e["param"].is_null()) << r.body;
  EXPECT_TRUE(e["message"].is_string() &&
              e["message"].get<std::string>().find(limit_text) != std::string::npos)
      << r.body << " (wanted: " << limit_text << ")";
  EXPECT_EQ(r.headers.count("Retry-After"), 1u);
  int seconds = 0;
  if (auto it = r.headers.find("Retry-After"); it != r.headers.end()) {
    EXPECT_TRUE(absl::SimpleAtoi(it->second, &seconds)) << it->second;
  }
  return seconds;
}

// Polls `done` until it holds or `timeout` passes; whether it held.
bool PollUntil(const std::function<bool()>& done, std::chrono::milliseconds timeout) {
  const auto give_up = Clock::now() + timeout;
  while (Clock::now() < give_up) {
    if (done()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return done();
}

// One worker for the tests that do not stop theirs.
class ApiKeysE2eTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    worker_ = StartWorker().release();
    ASSERT_NE(worker_, nullptr);
  }
  static void TearDownTestSuite() {
    if (worker_ != nullptr) worker_->Stop();
    delete worker_;
    worker_ = nullptr;
  }
  void SetUp() override {
    ASSERT_NE(worker_, nullptr);
    ASSERT_FALSE(dir_.path().empty());
  }
  std::string KeysPath() const { return dir_.path() + "/keys.json"; }
  std::unique_ptr<GatewayProcess> StartGateway(std::vector<std::string> args,
                                               bool merge_stderr = false) {
    args.push_back("--workers=" + worker_->address());
    return GatewayProcess::Start(Env("KVR_GATEWAY_BIN"), args, merge_stderr);
  }

  static ServerProcess* worker_;
  TempDir dir_{"apikeys_test"};
};
ServerProcess* ApiKeysE2eTest::worker_ = nullptr;

TEST_F(ApiKeysE2eTest, ValidKeyIsServedTokenIdenticallyToNoAuth) {
  const MadeApiKey a = Key("team-a");
  WriteKeys(KeysPath(), {a});
  auto keyed = StartGateway({"--api_keys_file=" + KeysPath()});
  auto open = StartGateway({});
  ASSERT_NE(keyed, nullptr);
  ASSERT_NE(open, nullptr);

  const HttpReply want = Complete(open->http(), std::nullopt);
  const HttpReply got = Complete(keyed->http(), Bearer(a));
  ASSERT_EQ(want.status, 200) << want.body;
  ASSERT_EQ(got.status, 200) << got.body;
  EXPECT_EQ(got.Json()["choices"][0]["text"], want.Json()["choices"][0]["text"]);
  EXPECT_EQ(got.Json()["kvr"]["token_ids"], want.Json()["kvr"]["token_ids"]);
  EXPECT_FALSE(got.Json()["kvr"]["token_ids"].empty());

  auto keyed_stub = Stub(keyed->grpc());
  auto open_stub = Stub(open->grpc());
  const Streamed g_want = Generate(open_stub.get(), Request(), std::nullopt);
  const Streamed g_got = Generate(keyed_stub.get(), Request(), Bearer(a));
  ASSERT_TRUE(g_want.status.ok()) << g_want.status.error_message();
  ASSERT_TRUE(g_got.status.ok()) << g_got.status.error_message();
  EXPECT_EQ(g_got.tokens, g_want.tokens);
  ASSERT_TRUE(g_got.summary.has_value());

  // Open without a key: health and metrics. Behind it: the model list.
  EXPECT_EQ(Http(keyed->http(), "GET", "/healthz", "", std::nullopt).status, 200);
  EXPECT_EQ(Http(keyed->http(), "GET", "/v1/models", "", std::nullopt).status, 401);
  EXPECT_EQ(Http(keyed->http(), "GET", "/v1/models", "", Bearer(a)).status, 200);
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    v1::GetModelInfoResponse info;
    EXPECT_EQ(keyed_stub->GetModelInfo(&ctx, {}, &info).error_code(),
              grpc::StatusCode::UNAUTHENTICATED);
    grpc::ClientContext ctx2;
    ctx2.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    ctx2.AddMetadata("authorization", *Bearer(a));
    EXPECT_TRUE(keyed_stub->GetModelInfo(&ctx2, {}, &info).ok());
  }

  // Per-key metrics: both requests, and exactly their tokens.
  const test_support::Samples m = Scrape(*keyed);
  EXPECT_EQ(test_support::Get(m, "kvr_gateway_key_requests_total",
                              {{"key", "team-a"}, {"code", "OK"}}),
            2);
  const json usage = got.Json()["usage"];
  EXPECT_EQ(test_support::Get(m, "kvr_gateway_key_tokens_total", {{"key", "team-a"}}),
            usage["prompt_tokens"].get<double>() + usage["completion_tokens"].get<double>() +
                static_cast<double>(g_got.summary->usage().prompt_tokens() +
                                    g_got.summary->usage().completion_tokens()));
  EXPECT_EQ(test_support::Get(m, "kvr_gateway_api_keys"), 1);
  EXPECT_TRUE(keyed->Stop());
  EXPECT_TRUE(open->Stop());
}

TEST_F(ApiKeysE2eTest, MissingOrWrongKeyIs401InOpenAIShape) {
  const MadeApiKey a = Key("team-a");
  const MadeApiKey stranger = Key("stranger");  // well-formed, not in the file
  WriteKeys(KeysPath(), {a});
  auto g = StartGateway({"--api_keys_file=" + KeysPath()});
  ASSERT_NE(g, nullptr);
  const json missing = {{"error",
                         {{"message", kMissingMessage},
                          {"type", "invalid_request_error"},
                          {"param", nullptr},
                          {"code", nullptr}}}};
  const json wrong = WrongKeyError();
  HttpReply r = Complete(g->http(), std::nullopt);
  EXPECT_EQ(r.status, 401);
  EXPECT_EQ(r.Json(), missing) << r.body;
  r = Complete(g->http(), Bearer(stranger));
  EXPECT_EQ(r.status, 401);
  EXPECT_EQ(r.Json(), wrong) << r.body;
  r = Complete(g->http(), "Bearer not-a-key");
  EXPECT_EQ(r.status, 401);
  EXPECT_EQ(r.Json(), wrong) << r.body;
  r = Http(g->http(), "POST", "/v1/chat/completions",
           json{{"model", kModel}, {"messages", {{{"role", "user"}, {"content", "hi"}}}}}.dump(),
           Bearer(stranger));
  EXPECT_EQ(r.status, 401);
  EXPECT_EQ(r.Json(), wrong) << r.body;

  auto stub = Stub(g->grpc());
  Streamed s = Generate(stub.get(), Request(), std::nullopt);
  EXPECT_EQ(s.status.error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_NE(s.status.error_message().find("authorization: Bearer"), std::string::npos)
      << s.status.error_message();
  s = Generate(stub.get(), Request(), Bearer(stranger));
  EXPECT_EQ(s.status.error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(s.status.error_message(), "Incorrect API key provided");
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    ctx.AddMetadata("authorization", *Bearer(stranger));
    v1::TokenizeRequest req;
    req.set_text("hi");
    v1::TokenizeResponse resp;
    EXPECT_EQ(stub->Tokenize(&ctx, req, &resp).error_code(), grpc::StatusCode::UNAUTHENTICATED);
  }
  // The right key still works.
  EXPECT_EQ(Complete(g->http(), Bearer(a)).status, 200);

  const test_support::Samples m = Scrape(*g);
  EXPECT_EQ(test_support::Get(m, "kvr_gateway_unauthenticated_requests_total",
                              {{"reason", "missing"}}),
            2);
  EXPECT_EQ(test_support::Get(m, "kvr_gateway_unauthenticated_requests_total",
                              {{"reason", "invalid"}}),
            5);
  EXPECT_EQ(test_support::Get(m, "kvr_gateway_requests_total",
                              {{"api", "http"}, {"code", "UNAUTHENTICATED"}}),
            4);
  EXPECT_EQ(test_support::Get(m, "kvr_gateway_requests_total",
                              {{"api", "grpc"}, {"code", "UNAUTHENTICATED"}}),
            2);
  EXPECT_TRUE(g->Stop());
}

TEST_F(ApiKeysE2eTest, ReloadRevokesAndAddsWithinThePollInterval) {
  const MadeApiKey a = Key("team-a");
  const MadeApiKey b = Key("team-b");
  WriteKeys(KeysPath(), {a});
  constexpr double kReloadSeconds = 0.2;
  auto g = StartGateway({"--api_keys_file=" + KeysPath(),
                         absl::StrCat("--api_keys_reload_seconds=", kReloadSeconds)});
  ASSERT_NE(g, nullptr);
  ASSERT_EQ(Complete(g->http(), Bearer(a)).status, 200);
  ASSERT_EQ(Complete(g->http(), Bearer(b)).status, 401);

  WriteKeys(KeysPath(), {b});
  const auto written = Clock::now();
  ASSERT_TRUE(PollUntil(
      [&] {
        return Http(g->http(), "GET", "/v1/models", "", Bearer(b)).status == 200 &&
               Http(g->http(), "GET", "/v1/models", "", Bearer(a)).status == 401;
      },
      std::chrono::seconds(20)));
  const double seconds = std::chrono::duration<double>(Clock::now() - written).count();
  // One poll period, plus the scheduling slack of a loaded test machine.
  EXPECT_LT(seconds, kReloadSeconds + 2.0);
  const HttpReply revoked = Complete(g->http(), Bearer(a));
  EXPECT_EQ(revoked.status, 401);
  EXPECT_EQ(revoked.Json(), WrongKeyError()) << revoked.body;
  EXPECT_EQ(Complete(g->http(), Bearer(b)).status, 200);
  auto stub = Stub(g->grpc());
  EXPECT_EQ(Generate(stub.get(), Request(), Bearer(a)).status.error_code(),
            grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_TRUE(Generate(stub.get(), Request(), Bearer(b)).status.ok());

  // A bad file: counted, and b keeps working.
  WriteText(KeysPath(), "{\"keys\": [{\"id\": \"x\"}");
  EXPECT_TRUE(PollUntil(
      [&] {
        return Metric(*g, "kvr_gateway_api_keys_reloads_total", {{"outcome", "error"}}) == 1;
      },
      std::chrono::seconds(20)));
  EXPECT_EQ(Complete(g->http(), Bearer(b)).status, 200);
  const test_support::Samples m = Scrape(*g);
  EXPECT_EQ(test_support::Get(m, "kvr_gateway_api_keys_reloads_total", {{"outcome", "ok"}}), 1);
  EXPECT_EQ(test_support::Get(m, "kvr_gateway_api_keys_reloads_total", {{"outcome", "error"}}),
            1);
  EXPECT_EQ(test_support::Get(m, "kvr_gateway_api_keys"), 1);
  EXPECT_TRUE(g->Stop());
}

// The first request of a max_concurrent 1 key is held in flight on a
// stopped worker; a second of the same key, over either front end, is
// refused at once, and served once the first has ended.
TEST(ApiKeysConcurrencyTest, SecondRequestIs429WhileTheFirstIsInFlight) {
  TempDir dir("apikeys_test");
  const std::string path = dir.path() + "/keys.json";
  const MadeApiKey one = Key("one-at-a-time", {1, 0});
  WriteKeys(path, {one});
  auto worker = StartWorker();
  ASSERT_NE(worker, nullptr);
  auto g = GatewayProcess::Start(Env("KVR_GATEWAY_BIN"),
                                 {"--workers=" + worker->address(), "--api_keys_file=" + path,
                                  "--health_check_seconds=1000"});
  ASSERT_NE(g, nullptr);
  ASSERT_EQ(Complete(g->http(), Bearer(one)).status, 200);  // warm: model id known

  ASSERT_TRUE(test_support::StopProcess(worker->pid()));
  HttpReply first;
  std::thread holder([&] { first = Complete(g->http(), Bearer(one), Completion(64, true)); });
  EXPECT_TRUE(PollUntil([&] { return Metric(*g, "kvr_gateway_requests_running") == 1; },
                        std::chrono::seconds(20)));

  const HttpReply refused = Complete(g->http(), Bearer(one));
  EXPECT_EQ(ExpectKeyRateLimited(refused, "requests", "max_concurrent): limit 1, in flight 1"),
            1);
  auto stub = Stub(g->grpc());
  const Streamed grpc_refused = Generate(stub.get(), Request(), Bearer(one));
  EXPECT_EQ(grpc_refused.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_NE(grpc_refused.status.error_message().find("max_concurrent"), std::string::npos)
      << grpc_refused.status.error_message();

  ASSERT_EQ(kill(worker->pid(), SIGCONT), 0);
  holder.join();
  EXPECT_EQ(first.status, 200) << first.body;
  EXPECT_NE(first.body.find("data: [DONE]"), std::string::npos);
  EXPECT_EQ(Complete(g->http(), Bearer(one)).status, 200);
  EXPECT_TRUE(Generate(stub.get(), Request(), Bearer(one)).status.ok());
  EXPECT_EQ(Metric(*g, "kvr_gateway_key_requests_total",
                   {{"key", "one-at-a-time"}, {"code", "RESOURCE_EXHAUSTED"}}),
            2);
  EXPECT_TRUE(g->Stop());
  EXPECT_TRUE(worker->Stop().has_value());
}

TEST_F(ApiKeysE2eTest, TokensPerMinuteIs429AfterTheBudgetWithRetryAfter) {
  constexpr int64_t kBudget = 120;  // 2 tokens / s
  const MadeApiKey c = Key("metered", {0, kBudget});
  WriteKeys(KeysPath(), {c});
  auto g = StartGateway({"--api_keys_file=" + KeysPath()});
  ASSERT_NE(g, nullptr);
  int64_t used = 0;
  HttpReply refused;
  for (int i = 0; i < 10 && refused.status == 0; ++i) {
    const HttpReply r = Complete(g->http(), Bearer(c), Completion(64));
    if (r.status == 200) {
      used += r.Json()["usage"]["total_tokens"].get<int64_t>();
    } else {
      refused = r;
    }
  }
  ASSERT_EQ(refused.status, 429) << refused.body;
  EXPECT_GE(used, kBudget);  // admitted while the bucket was above zero
  const int retry_after =
      ExpectKeyRateLimited(refused, "tokens", "tokens_per_minute): limit 120");
  // The overdraft (at most used - budget, less the refill meanwhile) paid
  // back at budget / 60 per second, and never more than a minute.
  EXPECT_GE(retry_after, 1);
  EXPECT_LE(retry_after, std::min<int64_t>(60, (used - kBudget) * 60 / kBudget + 1));
  EXPECT_NE(refused.body.find(absl::StrCat("try again in ", retry_after, "s")), std::string::npos)
      << refused.body;
  auto stub = Stub(g->grpc());
  const Streamed s = Generate(stub.get(), Request(), Bearer(c));
  EXPECT_EQ(s.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_NE(s.status.error_message().find("tokens_per_minute"), std::string::npos);
  // Every token of the served requests was charged, no more.
  EXPECT_EQ(Metric(*g, "kvr_gateway_key_tokens_total", {{"key", "metered"}}),
            static_cast<double>(used));

  // Served again once the bucket refilled (polled; Retry-After said when).
  const auto refused_at = Clock::now();
  EXPECT_TRUE(PollUntil([&] { return Complete(g->http(), Bearer(c), Completion(1)).status == 200; },
                        std::chrono::seconds(retry_after + 10)));
  EXPECT_LE(std::chrono::duration<double>(Clock::now() - refused_at).count(), retry_after + 3.0);
  EXPECT_TRUE(g->Stop());
}

TEST_F(ApiKeysE2eTest, MalformedKeysFileAtStartExits2NamingTheProblem) {
  const MadeApiKey a = Key("team-a");
  const std::string bad_hash = dir_.path() + "/bad_hash.json";
  std::string entry = a.entry;
  entry.replace(entry.find("\"sha256\":\"") + 10, 2, "");  // 62 hex digits
  WriteText(bad_hash, "{\"keys\": [" + entry + "]}");
  const std::string bad_json = dir_.path() + "/bad_json.json";
  WriteText(bad_json, "{\"keys\": [");
  struct Case {
    std::vector<std::string> flags;
    std::string message;
  };
  const std::vector<Case> cases = {
      {{"--api_keys_file=" + bad_hash},
       "--api_keys_file: " + bad_hash + ": keys file: keys[0]: sha256: expected 64 hex digits"},
      {{"--api_keys_file=" + bad_json}, "--api_keys_file: " + bad_json + ": keys file: invalid JSON"},
      {{"--api_keys_file=" + dir_.path() + "/none.json"}, "none.json: cannot stat"},
      {{"--api_keys_file=" + bad_json, "--api_keys_reload_seconds=0"},
       "--api_keys_reload_seconds outside [0.05, 3600]"},
  };
  for (const Case& c : cases) {
    std::vector<std::string> argv = {Env("KVR_GATEWAY_BIN"), "--workers=" + worker_->address(),
                                      "--listen=127.0.0.1:0", "--http_listen=127.0.0.1:0",
                                      "--metrics_listen=127.0.0.1:0"};
    argv.insert(argv.end(), c.flags.begin(), c.flags.end());
    auto proc = Subprocess::Start(argv, /*merge_stderr=*/true);
    ASSERT_TRUE(proc.ok()) << proc.status();
    absl::StatusOr<int> st = (*proc)->Stop(0, absl::Seconds(30));
    ASSERT_TRUE(st.ok()) << st.status();
    EXPECT_TRUE(WIFEXITED(*st) && WEXITSTATUS(*st) == 2) << "wait status " << *st;
    (void)(*proc)->WaitForLine("\x01 (read to the end)", absl::Seconds(10));
    const std::string out = (*proc)->Output();
    EXPECT_NE(out.find(c.message), std::string::npos) << out << "\nwanted: " << c.message;
    EXPECT_EQ(out.find("listening on"), std::string::npos) << out;
  }
}

TEST_F(ApiKeysE2eTest, NoKeyEverAppearsInTheGatewayOutput) {
  const MadeApiKey a = Key("team-a");
  const MadeApiKey b = Key("team-b");
  const MadeApiKey stranger = Key("stranger");
  WriteKeys(KeysPath(), {a});
  auto g = StartGateway(
      {"--api_keys_file=" + KeysPath(), "--api_keys_reload_seconds=0.1"}, /*merge_stderr=*/true);
  ASSERT_NE(g, nullptr);
  EXPECT_EQ(Complete(g->http(), Bearer(a)).status, 200);
  EXPECT_EQ(Complete(g->http(), Bearer(stranger)).status, 401);
  EXPECT_EQ(Complete(g->http(), "Bearer " + a.key + "x").status, 401);
  auto stub = Stub(g->grpc());
  EXPECT_TRUE(Generate(stub.get(), Request(), Bearer(a)).status.ok());
  EXPECT_FALSE(Generate(stub.get(), Request(), Bearer(stranger)).status.ok());
  WriteKeys(KeysPath(), {a, b});
  EXPECT_TRUE(PollUntil([&] { return Complete(g->http(), Bearer(b)).status == 200; },
                        std::chrono::seconds(20)));
  WriteText(KeysPath(), "{\"keys\": [" + a.entry + "," + a.entry + "]}");  // bad: logged
  EXPECT_TRUE(PollUntil(
      [&] {
        return Metric(*g, "kvr_gateway_api_keys_reloads_total", {{"outcome", "error"}}) == 1;
      },
      std::chrono::seconds(20)));
  ASSERT_TRUE(g->Stop());
  const std::string out = g->OutputAfterExit();
  // Ids are logged; keys (or any 16 characters of one) never.
  EXPECT_NE(out.find("api keys: 1 loaded (ids: team-a)"), std::string::npos) << out;
  EXPECT_NE(out.find("api keys: 2 loaded (ids: team-a, team-b)"), std::string::npos) << out;
  EXPECT_NE(out.find("id \"team-a\" repeated; keeping the 2 keys loaded before"),
            std::string::npos)
      << out;
  for (const MadeApiKey* k : {&a, &b, &stranger}) {
    for (size_t i = 4; i + 16 <= k->key.size(); i += 8) {
      EXPECT_EQ(out.find(k->key.substr(i, 16)), std::string::npos) << "key bytes in: " << out;
    }
  }
}

TEST_F(ApiKeysE2eTest, KvrApikeyOutputRoundTrips) {
  auto proc = Subprocess::Start({Env("KVR_BIN"), "apikey", "--id", "round-trip",
                                 "--max_concurrent", "3", "--tokens_per_minute", "100000"});
  ASSERT_TRUE(proc.ok()) << proc.status();
  absl::StatusOr<int> st = (*proc)->Stop(0, absl::Seconds(30));
  ASSERT_TRUE(st.ok() && WIFEXITED(*st) && WEXITSTATUS(*st) == 0);
  (void)(*proc)->WaitForLine("\x01 (read to the end)", absl::Seconds(10));
  const std::vector<std::string>& lines = (*proc)->lines();
  ASSERT_EQ(lines.size(), 2u) << (*proc)->Output();
  const std::string key = lines[0];
  EXPECT_TRUE(IsApiKeyFormat(key)) << key;
  const json entry = json::parse(lines[1], nullptr, false);
  ASSERT_TRUE(entry.is_object()) << lines[1];
  EXPECT_EQ(entry["id"], "round-trip");
  EXPECT_EQ(entry["max_concurrent"], 3);
  EXPECT_EQ(entry["tokens_per_minute"], 100000);
  EXPECT_EQ(lines[1].find(key.substr(4, 16)), std::string::npos);
  WriteText(KeysPath(), "{\"keys\": [" + lines[1] + "]}");
  auto g = StartGateway({"--api_keys_file=" + KeysPath()});
  ASSERT_NE(g, nullptr);
  EXPECT_EQ(Complete(g->http(), "Bearer " + key).status, 200);
  EXPECT_EQ(Complete(g->http(), std::nullopt).status, 401);
  EXPECT_EQ(Metric(*g, "kvr_gateway_key_requests_total", {{"key", "round-trip"}, {"code", "OK"}}),
            1);
  EXPECT_TRUE(g->Stop());
}

}  // namespace
}  // namespace kvr::gateway
