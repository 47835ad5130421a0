// End-to-end test of the local cluster: `kvr cluster` (3 kvr_node + kvr_worker
// + kvr_gateway on 127.0.0.1, run dir in a temp directory) started as a child
// process, driven through the gateway, and stopped by SIGTERM. The expected
// outputs come from the embedded engine in this process (worker::Generate,
// in-process node, same model and settings); generation through the cluster
// must give the same tokens and text.
//
//  * cluster.json names every address and pid; the ready line matches it;
//  * greedy (prompt long enough to offload shards to the nodes) and sampled
//    requests through a direct kvr.v1.Generation stub on the gateway, and
//    through `kvr client` as a subprocess, equal the embedded output; a bad
//    request makes `kvr client` exit 1 with the gRPC status;
//  * the same through the OpenAI HTTP API: POST /v1/completions, plain and
//    with `stream: true` (server-sent events);
//  * each child has a non-empty log; SIGTERM stops the cluster with exit 0
//    and leaves none of its children running;
//  * a worker killed with SIGKILL is restarted by `kvr cluster` on the same
//    address (cluster.json: new pid, restarts 1; the restart logged) and
//    generation through the cluster gives the same tokens again; SIGTERM then
//    still exits 0 with no child (old or new) left. The give-up path
//    (--max_restarts) is in cluster_ops_test.cc.
//
// Without --with_gateway (kvr_gateway not built) the cluster runs with
// --gateway=false and the gRPC checks go to the worker; the HTTP ones skip.
//
// Usage: cluster_e2e_test --kvr PATH [--with_gateway] [gtest flags]
#include <httplib.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "common/subprocess.h"
#include "gpu_worker/backend/backend.h"
#include "gpu_worker/engine/generation.h"
#include "gpu_worker/model/llama2c_loader.h"
#include "gpu_worker/model/llama2c_tokenizer.h"
#include "grpcpp/client_context.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "gtest/gtest.h"
#include "kvr/v1/generation.grpc.pb.h"
#include "nlohmann/json.hpp"
#include "retrieval_node/client/in_process_client.h"
#include "tests/support/cluster_process.h"
#include "tools/cluster.h"

namespace kvr {
namespace {

namespace fs = std::filesystem;

std::string g_kvr;           // --kvr
bool g_with_gateway = false;  // --with_gateway

constexpr auto kCallTimeout = std::chrono::seconds(60);

// A prompt longer than sinks + window (20 tokens), so prefill offloads shards.
constexpr char kLongPrompt[] =
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the sun "
    "with her big red ball and her dog.";

// The embedded engine (same model, node and engine options as kvr_worker).
struct Embedded {
  std::shared_ptr<const worker::LlamaWeights> weights;
  std::unique_ptr<worker::Llama2cTokenizer> tokenizer;
  std::unique_ptr<worker::Backend> backend;
  std::unique_ptr<retrieval::InProcessRetrievalClient> node;
  std::unique_ptr<worker::RetrievalEngine> engine;

  static std::unique_ptr<Embedded> Create() {
    const char* dir = std::getenv("KVR_MODELS");
    if (dir == nullptr) return ADD_FAILURE() << "KVR_MODELS is not set", nullptr;
    auto e = std::make_unique<Embedded>();
    auto w = worker::LoadLlama2c(std::string(dir) + "/stories260K.bin");
    if (!w.ok()) return ADD_FAILURE() << w.status(), nullptr;
    e->weights = *w;
    auto t = worker::Llama2cTokenizer::Load(std::string(dir) + "/tok512.bin",
                                            e->weights->config.vocab_size);
    if (!t.ok()) return ADD_FAILURE() << t.status(), nullptr;
    e->tokenizer = *std::move(t);
    worker::BackendOptions bo;
    bo.num_threads = 1;
    auto b = worker::BackendRegistry::Create("cpu", bo);
    if (!b.ok()) return ADD_FAILURE() << b.status(), nullptr;
    e->backend = *std::move(b);
    auto n = retrieval::InProcessRetrievalClient::Create({});
    if (!n.ok()) return ADD_FAILURE() << n.status(), nullptr;
    e->node = *std::move(n);
    auto en = worker::RetrievalEngine::Create(e->backend.get(), e->weights, e->node.get());
    if (!en.ok()) return ADD_FAILURE() << en.status(), nullptr;
    e->engine = *std::move(en);
    return e;
  }

  worker::GenerateResult Run(const worker::GenerateRequest& r) {
    absl::StatusOr<worker::GenerateResult> res = worker::Generate(*engine, *tokenizer, r);
    EXPECT_TRUE(res.ok()) << res.status();
    EXPECT_TRUE(engine->EndSequence().ok());
    return res.ok() ? *std::move(res) : worker::GenerateResult{};
  }
};

// One request, as the embedded engine, the gRPC API, `kvr client` and the
// HTTP API spell it.
struct Case {
  std::string prompt;
  int max_tokens = 64;
  float temperature = 0.0f;
  float top_p = 1.0f;
  uint64_t seed = 1;

  worker::GenerateRequest Embedded() const {
    worker::GenerateRequest r;
    r.prompt = prompt;
    r.max_tokens = max_tokens;
    r.sampling.temperature = temperature;
    r.sampling.top_p = top_p;
    r.sampling.seed = seed;
    return r;
  }
  v1::GenerateRequest Proto() const {
    v1::GenerateRequest r;
    r.set_text(prompt);
    r.set_max_tokens(max_tokens);
    r.mutable_sampling()->set_temperature(temperature);
    r.mutable_sampling()->set_top_p(top_p);
    r.mutable_sampling()->set_seed(seed);
    return r;
  }
  std::vector<std::string> ClientArgs(const std::string& target) const {
    return {g_kvr,
            "client",
            "--target",
            target,
            "--prompt",
            prompt,
            "--max_tokens",
            std::to_string(max_tokens),
            "--temperature",
            std::to_string(temperature),
            "--top_p",
            std::to_string(top_p),
            "--seed",
            std::to_string(seed),
            "--echo=false"};
  }
  nlohmann::json Http(const std::string& model, bool stream) const {
    return {{"model", model},       {"prompt", prompt}, {"max_tokens", max_tokens},
            {"temperature", temperature}, {"top_p", top_p},   {"seed", seed},
            {"stream", stream}};
  }
};

struct Streamed {
  std::string text;
  std::vector<int32_t> tokens;
  std::optional<v1::GenerateFinal> summary;
  grpc::Status status;
};

Streamed Stream(v1::Generation::Stub* stub, const v1::GenerateRequest& request) {
  Streamed out;
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + kCallTimeout);
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

// Runs a command to its end: its stdout (and stderr with `merge_stderr`) and
// its wait status; nullopt (a test failure) when it outlives `timeout`.
struct Ran {
  int status = -1;
  std::string out;
};
std::optional<Ran> RunToEnd(const std::vector<std::string>& argv, bool merge_stderr,
                            absl::Duration timeout = absl::Seconds(60)) {
  auto proc = Subprocess::Start(argv, merge_stderr);
  if (!proc.ok()) return ADD_FAILURE() << proc.status(), std::nullopt;
  // No line starts with "\x01": this reads until the child closes stdout.
  const absl::StatusOr<std::string> none = (*proc)->WaitForLine("\x01", timeout);
  if (!absl::IsFailedPrecondition(none.status())) {
    ADD_FAILURE() << argv[0] << " " << argv[1] << ": " << none.status();
    return std::nullopt;
  }
  absl::StatusOr<int> st = (*proc)->Stop(0, absl::Seconds(30));
  if (!st.ok()) return ADD_FAILURE() << st.status(), std::nullopt;
  return Ran{*st, (*proc)->Output()};
}

using test_support::ProcessGone;

// `kvr cluster` (with --gateway=false when kvr_gateway is not built).
std::unique_ptr<test_support::ClusterProcess> StartCluster(bool merge_stderr) {
  std::vector<std::string> flags;
  if (!g_with_gateway) flags.push_back("--gateway=false");
  return test_support::ClusterProcess::Start(g_kvr, flags, merge_stderr);
}

TEST(ClusterInfoTest, JsonRoundTripAndErrors) {
  cluster::ClusterInfo info;
  info.gateway_grpc = "127.0.0.1:1";
  info.gateway_http = "127.0.0.1:2";
  info.gateway_metrics = "127.0.0.1:3";
  info.gateway_pid = 11;
  info.worker_grpc = "127.0.0.1:4";
  info.worker_metrics = "127.0.0.1:5";
  info.worker_pid = 12;
  info.nodes = {{"127.0.0.1:6", "127.0.0.1:7", 13}, {"127.0.0.1:8", "", 14}};
  info.run_dir = "/tmp/run \"x\"";
  info.pid = 10;
  const auto back = cluster::ParseClusterInfo(cluster::ClusterInfoToJson(info));
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(cluster::ClusterInfoToJson(*back), cluster::ClusterInfoToJson(info));
  EXPECT_EQ(back->nodes.size(), 2u);
  EXPECT_EQ(back->nodes[1].pid, 14);
  EXPECT_EQ(back->run_dir, info.run_dir);

  auto bad = cluster::ParseClusterInfo("{\"worker_grpc\": 5}");
  EXPECT_TRUE(absl::IsInvalidArgument(bad.status()));
  EXPECT_NE(bad.status().message().find("worker_grpc"), std::string::npos) << bad.status();
  bad = cluster::ParseClusterInfo("{\"worker_grpc\": \"a:1\", \"nodes\": [{\"pid\": -3}]}");
  EXPECT_NE(bad.status().message().find("pid"), std::string::npos) << bad.status();
  EXPECT_FALSE(cluster::ParseClusterInfo("{not json").ok());
  EXPECT_FALSE(cluster::ParseClusterInfo("{}").ok());  // no worker address
}

TEST(ClusterE2eTest, GenerateThroughClusterThenStop) {
  std::unique_ptr<Embedded> embedded = Embedded::Create();
  ASSERT_NE(embedded, nullptr);
  std::unique_ptr<test_support::ClusterProcess> c = StartCluster(/*merge_stderr=*/false);
  ASSERT_NE(c, nullptr);
  const cluster::ClusterInfo& info = c->info;
  const std::string target = c->target();

  // cluster.json: every address and pid, and the ready line agrees with it.
  ASSERT_EQ(info.nodes.size(), 3u);
  for (const cluster::ClusterInfo::Node& n : info.nodes) {
    EXPECT_FALSE(n.grpc.empty());
    EXPECT_FALSE(n.metrics.empty());
    EXPECT_GT(n.pid, 0);
  }
  EXPECT_FALSE(info.worker_grpc.empty());
  EXPECT_FALSE(info.worker_metrics.empty());
  EXPECT_GT(info.worker_pid, 0);
  EXPECT_EQ(info.pid, c->proc->pid());
  EXPECT_EQ(fs::path(info.run_dir), fs::weakly_canonical(c->run_dir));
  if (g_with_gateway) {
    EXPECT_FALSE(info.gateway_grpc.empty());
    EXPECT_FALSE(info.gateway_http.empty());
    EXPECT_FALSE(info.gateway_metrics.empty());
    EXPECT_GT(info.gateway_pid, 0);
    EXPECT_EQ(c->ready_line, "gateway grpc " + info.gateway_grpc + " http " + info.gateway_http +
                                 " (run dir " + info.run_dir + ")");
  }

  const std::vector<Case> cases = {
      {kLongPrompt, 64, 0.0f, 1.0f, 1},          // greedy; prefill offloads to the nodes
      {"Once upon a time", 48, 0.8f, 0.9f, 7},  // sampled
  };
  std::vector<worker::GenerateResult> want;
  for (const Case& k : cases) want.push_back(embedded->Run(k.Embedded()));
  ASSERT_EQ(want[0].tokens.size(), 64u);
  ASSERT_GT(want[0].prompt_tokens, 20) << "the long prompt must exceed sinks + window";

  // gRPC, direct stub (gone before the stop: its channel must not hold it up).
  {
    auto stub = v1::Generation::NewStub(
        grpc::CreateChannel(target, grpc::InsecureChannelCredentials()));
    for (size_t i = 0; i < cases.size(); ++i) {
      const Streamed got = Stream(stub.get(), cases[i].Proto());
      ASSERT_TRUE(got.status.ok()) << "case " << i << ": " << got.status.error_message();
      EXPECT_EQ(got.tokens, want[i].tokens) << "case " << i;
      EXPECT_EQ(got.text, want[i].text) << "case " << i;
      ASSERT_TRUE(got.summary.has_value()) << "case " << i;
      EXPECT_EQ(got.summary->usage().prompt_tokens(), want[i].prompt_tokens) << "case " << i;
    }
  }

  // `kvr client`: stdout is the continuation and a newline.
  for (size_t i = 0; i < cases.size(); ++i) {
    const std::optional<Ran> ran = RunToEnd(cases[i].ClientArgs(target), false);
    ASSERT_TRUE(ran.has_value());
    EXPECT_TRUE(WIFEXITED(ran->status) && WEXITSTATUS(ran->status) == 0) << ran->status;
    EXPECT_EQ(ran->out, want[i].text + "\n") << "case " << i;
  }
  {
    std::vector<std::string> bad = cases[1].ClientArgs(target);
    bad.insert(bad.end(), {"--temperature", "nan"});
    const std::optional<Ran> ran = RunToEnd(bad, /*merge_stderr=*/true);
    ASSERT_TRUE(ran.has_value());
    EXPECT_TRUE(WIFEXITED(ran->status) && WEXITSTATUS(ran->status) == 1) << ran->status;
    EXPECT_NE(ran->out.find("INVALID_ARGUMENT"), std::string::npos) << ran->out;
    EXPECT_NE(ran->out.find("temperature"), std::string::npos) << ran->out;
  }

  // The OpenAI HTTP API of the gateway.
  if (g_with_gateway) {
    const std::vector<std::string> hp = absl::StrSplit(info.gateway_http, ':');
    int port = 0;
    ASSERT_EQ(hp.size(), 2u);
    ASSERT_TRUE(absl::SimpleAtoi(hp[1], &port));
    httplib::Client http(hp[0], port);
    http.set_read_timeout(60, 0);
    auto models = http.Get("/v1/models");
    ASSERT_TRUE(models) << httplib::to_string(models.error());
    ASSERT_EQ(models->status, 200) << models->body;
    const nlohmann::json model_list = nlohmann::json::parse(models->body, nullptr, false);
    ASSERT_TRUE(model_list.contains("data") && !model_list["data"].empty()) << models->body;
    const std::string model = model_list["data"][0].value("id", "");
    for (size_t i = 0; i < cases.size(); ++i) {
      auto res = http.Post("/v1/completions", cases[i].Http(model, false).dump(),
                           "application/json");
      ASSERT_TRUE(res) << httplib::to_string(res.error());
      ASSERT_EQ(res->status, 200) << res->body;
      const nlohmann::json body = nlohmann::json::parse(res->body, nullptr, false);
      ASSERT_FALSE(body.is_discarded()) << res->body;
      EXPECT_EQ(body["choices"][0].value("text", ""), want[i].text) << "case " << i;
      EXPECT_EQ(body["usage"].value("completion_tokens", -1),
                static_cast<int>(want[i].tokens.size()))
          << "case " << i;
      // The gateway's extension object carries the token ids.
      ASSERT_TRUE(body.contains("kvr") && body["kvr"].contains("token_ids")) << res->body;
      EXPECT_EQ(body["kvr"]["token_ids"].get<std::vector<int32_t>>(), want[i].tokens)
          << "case " << i;

      // stream: true -> "data: {json}" events, then "data: [DONE]".
      auto sse = http.Post("/v1/completions", cases[i].Http(model, true).dump(),
                           "application/json");
      ASSERT_TRUE(sse) << httplib::to_string(sse.error());
      ASSERT_EQ(sse->status, 200) << sse->body;
      std::string text;
      bool done = false;
      int events = 0;
      for (absl::string_view line : absl::StrSplit(sse->body, '\n')) {
        if (line.substr(0, 6) != "data: ") continue;
        line.remove_prefix(6);
        if (line == "[DONE]") {
          done = true;
          continue;
        }
        const nlohmann::json ev = nlohmann::json::parse(line, nullptr, false);
        ASSERT_FALSE(ev.is_discarded()) << std::string(line);
        ++events;
        if (ev.contains("choices") && !ev["choices"].empty()) {
          text += ev["choices"][0].value("text", "");
        }
      }
      EXPECT_TRUE(done) << sse->body;
      EXPECT_GT(events, 1) << "the text must stream";
      EXPECT_EQ(text, want[i].text) << "case " << i << " (stream)";
    }
  } else {
    std::fprintf(stderr, "cluster_e2e_test: no kvr_gateway (--with_gateway not given): the HTTP "
                         "checks are skipped\n");
  }

  // One non-empty log per child.
  std::vector<std::string> logs = {"worker.log"};
  if (g_with_gateway) logs.push_back("gateway.log");
  for (size_t i = 0; i < info.nodes.size(); ++i) logs.push_back("node-" + std::to_string(i) + ".log");
  for (const std::string& log : logs) {
    std::error_code ec;
    EXPECT_GT(fs::file_size(fs::path(c->run_dir) / log, ec), 0u) << log << " " << ec.message();
  }

  // SIGTERM: ordered stop, exit 0, no child left behind.
  const absl::StatusOr<int> st = c->proc->Stop(SIGTERM, absl::Seconds(60));
  ASSERT_TRUE(st.ok()) << st.status();
  EXPECT_TRUE(WIFEXITED(*st) && WEXITSTATUS(*st) == 0) << "wait status " << *st;
  for (pid_t pid : c->ChildPids()) EXPECT_TRUE(ProcessGone(pid)) << "pid " << pid << " survived";
  std::ifstream worker_log(fs::path(c->run_dir) / "worker.log");
  std::stringstream ss;
  ss << worker_log.rdbuf();
  EXPECT_NE(ss.str().find("kvr_worker: stopped"), std::string::npos)
      << "the worker should have stopped on SIGTERM:\n" << ss.str();
}

TEST(ClusterE2eTest, KilledWorkerIsRestarted) {
  std::unique_ptr<test_support::ClusterProcess> c = StartCluster(/*merge_stderr=*/true);
  ASSERT_NE(c, nullptr);
  const Case greedy = {kLongPrompt, 32, 0.0f, 1.0f, 1};
  auto stub = [&] {
    return v1::Generation::NewStub(
        grpc::CreateChannel(c->target(), grpc::InsecureChannelCredentials()));
  };
  const Streamed before = Stream(stub().get(), greedy.Proto());
  ASSERT_TRUE(before.status.ok()) << before.status.error_message();
  ASSERT_EQ(before.tokens.size(), 32u);

  const pid_t old_pid = c->info.worker_pid;
  const std::string old_address = c->info.worker_grpc;
  ASSERT_EQ(kill(old_pid, SIGKILL), 0);
  const absl::Time killed = absl::Now();
  ASSERT_TRUE(c->WaitForInfo(
      [&](const cluster::ClusterInfo& i) {
        return i.worker_pid != old_pid && i.workers.size() == 1 && i.workers[0].restarts == 1;
      },
      absl::Seconds(20)))
      << "cluster.json shows no restarted worker: " << cluster::ClusterInfoToJson(c->info);
  EXPECT_TRUE(c->proc->running()) << "kvr cluster must keep going";
  EXPECT_EQ(c->info.worker_grpc, old_address) << "restarted on its old address";
  EXPECT_EQ(c->info.workers[0].pid, c->info.worker_pid);
  EXPECT_TRUE(ProcessGone(old_pid));

  // The restarted worker serves (the gateway reconnects to the same
  // address): poll with a deadline; the tokens equal the run before the kill.
  Streamed after;
  const absl::Time deadline = absl::Now() + absl::Seconds(30);
  do {
    after = Stream(stub().get(), greedy.Proto());
    if (after.status.ok()) break;
    absl::SleepFor(absl::Milliseconds(200));
  } while (absl::Now() < deadline);
  ASSERT_TRUE(after.status.ok()) << after.status.error_message();
  EXPECT_EQ(after.tokens, before.tokens);
  std::fprintf(stderr, "cluster_e2e_test: a Generate through %s succeeded again %.2f s after "
               "the worker's SIGKILL\n", g_with_gateway ? "the gateway" : "the worker",
               absl::ToDoubleSeconds(absl::Now() - killed));

  // SIGTERM: exit 0, neither the old nor the new children left.
  const absl::StatusOr<int> st = c->proc->Stop(SIGTERM, absl::Seconds(60));
  ASSERT_TRUE(st.ok()) << st.status();
  EXPECT_TRUE(WIFEXITED(*st) && WEXITSTATUS(*st) == 0) << "wait status " << *st << "\n"
                                                       << c->proc->Output();
  (void)c->proc->WaitForLine("\x01", absl::Seconds(5));  // read the rest of its output
  const std::string out = c->proc->Output();
  EXPECT_NE(out.find("worker (pid " + std::to_string(old_pid) + ") was killed by signal 9"),
            std::string::npos)
      << out;
  EXPECT_NE(out.find("restarted worker (pid " + std::to_string(old_pid) + " -> " +
                     std::to_string(c->info.worker_pid) + ", restart 1)"),
            std::string::npos)
      << out;
  for (pid_t pid : c->ChildPids()) EXPECT_TRUE(ProcessGone(pid)) << "pid " << pid << " survived";
}

}  // namespace
}  // namespace kvr

int main(int argc, char** argv) {
  // Also makes libprotobuf precede libsentencepiece in DT_NEEDED (see cluster.cmake).
  GOOGLE_PROTOBUF_VERIFY_VERSION;
  ::testing::InitGoogleTest(&argc, argv);
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--kvr" && i + 1 < argc) {
      kvr::g_kvr = argv[++i];
    } else if (a.rfind("--kvr=", 0) == 0) {
      kvr::g_kvr = a.substr(6);
    } else if (a == "--with_gateway") {
      kvr::g_with_gateway = true;
    }
  }
  if (kvr::g_kvr.empty()) {
    std::fprintf(stderr, "usage: %s --kvr PATH [--with_gateway] [gtest flags]\n", argv[0]);
    return 2;
  }
  signal(SIGPIPE, SIG_IGN);
  return RUN_ALL_TESTS();
}
