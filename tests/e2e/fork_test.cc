// n choices sharing one prefill over real processes (issue 19): two kvr_node
// servers, a kvr_worker on them (--nodes, 2 replicas, retrieval mode) and a
// kvr_gateway in front, all on 127.0.0.1 with ports read from their lines.
//
//  * gRPC Generate n = 3, greedy: three finals (index 0..2), every choice's
//    tokens equal the n = 1 run's; the prompt was prefilled ONCE (worker
//    kvr_worker_prefill_duration_seconds_count +1, prompt tokens counted
//    once) and the nodes stored its shards once (StatsResponse
//    shard_uploads grows by what an n = 1 run uploads; forks +2 per node);
//    afterwards every node's memory_used_bytes is back to its baseline.
//  * temperature 0.9, seed 7, n = 3: choice j is token-identical to an
//    n = 1 request with seed 7 + j; the choices differ.
//  * a prompts batch of 2 with n = 2: choice p * 2 + j equals the n = 1
//    request of prompt p with seed + j.
//  * hostile: n over --max_n, n = 0, prompts over --max_prompts, 5 stop
//    strings, prompts with text, an empty prompts entry, n > 1 with
//    resume_tokens: INVALID_ARGUMENT naming the field and the limit;
//    ForkSequence straight to a node: unknown source NOT_FOUND naming it,
//    wrong capability PERMISSION_DENIED.
//  * HTTP /v1/completions n = 2 through the gateway is ONE worker request:
//    one prefill on the worker, the two choices equal.
//
// Usage: fork_e2e_test --kvr_node PATH --kvr_worker PATH --kvr_gateway PATH
#include <signal.h>

#include <httplib.h>

#include <chrono>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "grpcpp/client_context.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "gtest/gtest.h"
#include "kvr/v1/generation.grpc.pb.h"
#include "kvr/v1/retrieval.grpc.pb.h"
#include "nlohmann/json.hpp"
#include "tests/support/gateway_process.h"
#include "tests/support/generate_stream.h"
#include "tests/support/metrics_page.h"
#include "tests/support/server_process.h"

namespace kvr {
namespace {

using nlohmann::json;
using test_support::GatewayProcess;
using test_support::NodeProcess;
using test_support::ServerProcess;

std::string g_worker_binary;   // --kvr_worker
std::string g_gateway_binary;  // --kvr_gateway

constexpr auto kCallTimeout = std::chrono::seconds(120);
constexpr char kPrompt[] =
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the "
    "park with her friends. One day, she saw a big red ball under a tree. Tom had a small dog "
    "called Max. Every morning they ran to the river and looked at the fish.";
constexpr char kPrompt2[] =
    "Tom had a small dog called Max. Every morning they ran to the river and looked at the "
    "fish. One day Max found a shiny stone in the water.";
constexpr int kMaxTokens = 24;

// What a stream delivered, per choice index.
struct Choices {
  std::map<int, std::vector<int32_t>> tokens;
  std::map<int, std::string> text;
  std::map<int, v1::GenerateFinal> finals;
  int finals_seen = 0;
  grpc::Status status;
};

Choices Read(v1::Generation::Stub* stub, const v1::GenerateRequest& request) {
  const test_support::GenerateChoices got =
      test_support::ReadGenerateChoices(stub, request, kCallTimeout);
  Choices out;
  out.status = got.status;
  out.finals_seen = got.finals;
  for (const auto& [index, choice] : got.by_index) {
    out.tokens[index] = choice.tokens;
    out.text[index] = choice.text;
    if (choice.summary.has_value()) out.finals[index] = *choice.summary;
  }
  return out;
}

v1::GenerateRequest Request(const char* prompt, int n, float temperature, uint64_t seed) {
  v1::GenerateRequest r;
  r.set_text(prompt);
  r.set_max_tokens(kMaxTokens);
  if (n != 1) r.set_n(n);
  r.mutable_sampling()->set_temperature(temperature);
  r.mutable_sampling()->set_seed(seed);
  v1::AttentionParams* a = r.mutable_attention();
  a->set_mode("retrieval");
  a->set_sinks(4);
  a->set_window(16);
  a->set_top_k(8);
  a->set_chunk_tokens(24);  // several chunks per head, spread over both nodes
  return r;
}

class ForkE2eTest : public ::testing::Test {
 protected:
  void SetUp() override {
    for (auto& n : nodes_) {
      n = NodeProcess::Start({"--tail_capacity=16"});
      ASSERT_NE(n, nullptr);
    }
    worker_ = ServerProcess::Start(
        g_worker_binary, "kvr_worker",
        {"--nodes=" + nodes_[0]->address() + "," + nodes_[1]->address(), "--replicas=2",
         "--max_concurrent=8", "--max_train_queries=0"});
    ASSERT_NE(worker_, nullptr);
    stub_ = v1::Generation::NewStub(
        grpc::CreateChannel(worker_->address(), grpc::InsecureChannelCredentials()));
  }

  v1::StatsResponse NodeStats(int i) {
    auto stub = v1::RetrievalNode::NewStub(
        grpc::CreateChannel(nodes_[i]->address(), grpc::InsecureChannelCredentials()));
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    v1::StatsResponse st;
    const grpc::Status s = stub->Stats(&ctx, v1::StatsRequest(), &st);
    EXPECT_TRUE(s.ok()) << s.error_message();
    return st;
  }

  test_support::Samples WorkerMetrics() {
    const std::optional<std::string> page =
        test_support::HttpGetMetrics(worker_->metrics_address());
    EXPECT_TRUE(page.has_value());
    return page.has_value() ? test_support::ParseExposition(*page) : test_support::Samples{};
  }

  double Prefills() {
    return test_support::Get(WorkerMetrics(), "kvr_worker_prefill_duration_seconds_count");
  }
  double PromptTokens() {
    return test_support::Get(WorkerMetrics(), "kvr_worker_prompt_tokens_total");
  }

  std::unique_ptr<NodeProcess> nodes_[2];
  std::unique_ptr<ServerProcess> worker_;
  std::unique_ptr<v1::Generation::Stub> stub_;
};

TEST_F(ForkE2eTest, GreedyChoicesShareOnePrefillOnTheNodes) {
  int64_t mem0[2];
  for (int i = 0; i < 2; ++i) mem0[i] = NodeStats(i).memory_used_bytes();
  // Shards and forks on both nodes since `before`.
  auto node_delta = [&](const v1::StatsResponse (&before)[2], int64_t* uploads, int64_t* forks) {
    *uploads = *forks = 0;
    for (int i = 0; i < 2; ++i) {
      const v1::StatsResponse st = NodeStats(i);
      *uploads += st.shard_uploads() - before[i].shard_uploads();
      *forks += st.forks() - before[i].forks();
    }
  };
  // What the prefill alone uploads (max_tokens 1: the token comes from the
  // prefill's logits; decode steps would open chunks of their own).
  v1::StatsResponse before[2] = {NodeStats(0), NodeStats(1)};
  v1::GenerateRequest short_one = Request(kPrompt, 1, 0.0f, 1);
  short_one.set_max_tokens(1);
  ASSERT_TRUE(Read(stub_.get(), short_one).status.ok());
  int64_t uploads_one = 0, forks_one = 0;
  node_delta(before, &uploads_one, &forks_one);
  ASSERT_GT(uploads_one, 0);
  EXPECT_EQ(forks_one, 0);
  before[0] = NodeStats(0);
  before[1] = NodeStats(1);
  v1::GenerateRequest short_three = Request(kPrompt, 3, 0.0f, 1);
  short_three.set_max_tokens(1);
  const Choices s3 = Read(stub_.get(), short_three);
  ASSERT_TRUE(s3.status.ok()) << s3.status.error_message();
  EXPECT_EQ(s3.finals_seen, 3);
  int64_t uploads_three = 0, forks_three = 0;
  node_delta(before, &uploads_three, &forks_three);
  EXPECT_EQ(uploads_three, uploads_one);  // the prefill's shards, uploaded once
  EXPECT_EQ(forks_three, 2 * 2);          // two forks on each node of the view

  // n = 1 of 24 tokens: the oracle.
  const double prefills0 = Prefills(), prompt0 = PromptTokens();
  const Choices one = Read(stub_.get(), Request(kPrompt, 1, 0.0f, 1));
  ASSERT_TRUE(one.status.ok()) << one.status.error_message();
  ASSERT_EQ(one.finals_seen, 1);
  ASSERT_EQ(one.tokens.at(0).size(), static_cast<size_t>(kMaxTokens));
  const int64_t prompt_tokens = one.finals.at(0).usage().prompt_tokens();
  ASSERT_GT(prompt_tokens, 60);
  EXPECT_EQ(Prefills(), prefills0 + 1);
  EXPECT_EQ(PromptTokens(), prompt0 + static_cast<double>(prompt_tokens));

  const Choices three = Read(stub_.get(), Request(kPrompt, 3, 0.0f, 1));
  ASSERT_TRUE(three.status.ok()) << three.status.error_message();
  ASSERT_EQ(three.finals_seen, 3);
  for (int j = 0; j < 3; ++j) {
    ASSERT_EQ(three.finals.count(j), 1u) << j;
    EXPECT_EQ(three.finals.at(j).index(), j);
    EXPECT_EQ(three.finals.at(j).usage().prompt_tokens(), prompt_tokens);
    EXPECT_EQ(three.finals.at(j).usage().completion_tokens(), kMaxTokens);
    EXPECT_EQ(three.tokens.at(j), one.tokens.at(0)) << "choice " << j;
    EXPECT_EQ(three.text.at(j), one.text.at(0)) << "choice " << j;
  }
  // One prefill for the three choices, its prompt counted once.
  EXPECT_EQ(Prefills(), prefills0 + 2);
  EXPECT_EQ(PromptTokens(), prompt0 + 2.0 * static_cast<double>(prompt_tokens));
  for (int i = 0; i < 2; ++i) {
    // Every sequence is dropped before its stream ends; a background seal
    // of a dropped sequence returns its reservation when it finishes.
    const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    v1::StatsResponse st = NodeStats(i);
    while (st.memory_used_bytes() != mem0[i] && std::chrono::steady_clock::now() < give_up) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
      st = NodeStats(i);
    }
    EXPECT_EQ(st.memory_used_bytes(), mem0[i]) << "node " << i;
    EXPECT_EQ(st.sequences(), 0) << "node " << i;
  }
}

TEST_F(ForkE2eTest, SeededChoiceJEqualsSeedPlusJ) {
  const Choices three = Read(stub_.get(), Request(kPrompt, 3, 0.9f, 7));
  ASSERT_TRUE(three.status.ok()) << three.status.error_message();
  ASSERT_EQ(three.finals_seen, 3);
  for (int j = 0; j < 3; ++j) {
    const Choices one = Read(stub_.get(), Request(kPrompt, 1, 0.9f, 7 + j));
    ASSERT_TRUE(one.status.ok()) << one.status.error_message();
    EXPECT_EQ(three.tokens.at(j), one.tokens.at(0)) << "choice " << j;
  }
  EXPECT_TRUE(three.tokens.at(0) != three.tokens.at(1) || three.tokens.at(1) != three.tokens.at(2))
      << "sampled choices with seeds 7, 8, 9 all equal";
}

TEST_F(ForkE2eTest, PromptBatchIndexesArePromptTimesNPlusJ) {
  v1::GenerateRequest batch = Request(kPrompt, 2, 0.8f, 11);
  batch.clear_text();
  batch.add_prompts()->set_text(kPrompt);
  batch.add_prompts()->set_text(kPrompt2);
  const double prefills0 = Prefills();
  const Choices got = Read(stub_.get(), batch);
  ASSERT_TRUE(got.status.ok()) << got.status.error_message();
  ASSERT_EQ(got.finals_seen, 4);
  EXPECT_EQ(Prefills(), prefills0 + 2);  // one per prompt
  const char* prompts[] = {kPrompt, kPrompt2};
  for (int p = 0; p < 2; ++p) {
    for (int j = 0; j < 2; ++j) {
      const Choices one = Read(stub_.get(), Request(prompts[p], 1, 0.8f, 11 + j));
      ASSERT_TRUE(one.status.ok()) << one.status.error_message();
      EXPECT_EQ(got.tokens.at(p * 2 + j), one.tokens.at(0)) << "prompt " << p << " choice " << j;
      EXPECT_EQ(got.finals.at(p * 2 + j).usage().prompt_tokens(),
                one.finals.at(0).usage().prompt_tokens());
    }
  }
}

TEST_F(ForkE2eTest, HostileRequestsNameTheFieldAndLimit) {
  struct Bad {
    const char* what;
    v1::GenerateRequest request;
    const char* message;
  };
  std::vector<Bad> bad;
  bad.push_back({"n over --max_n", Request(kPrompt, 17, 0.0f, 1), "n: 17 outside [1, 16] (--max_n)"});
  bad.push_back({"n = 0", Request(kPrompt, 0, 0.0f, 1), "n: 0 outside [1, 16]"});
  {
    v1::GenerateRequest r = Request(kPrompt, 1, 0.0f, 1);
    r.clear_text();
    for (int i = 0; i < 17; ++i) r.add_prompts()->set_text("a");
    bad.push_back({"prompts over --max_prompts", r, "prompts: 17 prompts, limit 16 (--max_prompts)"});
  }
  {
    v1::GenerateRequest r = Request(kPrompt, 1, 0.0f, 1);
    for (int i = 0; i < 5; ++i) r.add_stop("x");
    bad.push_back({"5 stop strings", r, "stop: 5 strings, limit 4"});
  }
  {
    v1::GenerateRequest r = Request(kPrompt, 1, 0.0f, 1);
    r.add_prompts()->set_text("a");
    bad.push_back({"prompts and text", r, "prompts: set either prompts or text / tokens"});
  }
  {
    v1::GenerateRequest r = Request(kPrompt, 1, 0.0f, 1);
    r.clear_text();
    r.add_prompts()->set_text("a");
    r.add_prompts();
    bad.push_back({"empty prompts entry", r, "prompts[1]: set text or tokens"});
  }
  {
    v1::GenerateRequest r = Request(kPrompt, 2, 0.0f, 1);
    r.add_resume_tokens(5);
    bad.push_back({"n with resume_tokens", r, "n: 2 choices with resume_tokens"});
  }
  for (const Bad& b : bad) {
    SCOPED_TRACE(b.what);
    const Choices got = Read(stub_.get(), b.request);
    EXPECT_EQ(got.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT)
        << got.status.error_message();
    EXPECT_NE(got.status.error_message().find(b.message), std::string::npos)
        << got.status.error_message();
    EXPECT_TRUE(got.tokens.empty());
  }

  // ForkSequence straight to a node.
  auto node = v1::RetrievalNode::NewStub(
      grpc::CreateChannel(nodes_[0]->address(), grpc::InsecureChannelCredentials()));
  auto call = [&](const v1::ForkSequenceRequest& r) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    v1::ForkSequenceResponse resp;
    return node->ForkSequence(&ctx, r, &resp);
  };
  v1::ForkSequenceRequest fork;
  fork.set_source_sequence_id(987654321);
  fork.set_source_capability(std::string(16, 'a'));
  fork.set_sequence_id(123);
  fork.set_capability(std::string(16, 'b'));
  grpc::Status s = call(fork);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::NOT_FOUND) << s.error_message();
  EXPECT_NE(s.error_message().find("unknown sequence 987654321"), std::string::npos)
      << s.error_message();
  {
    v1::CreateSequenceRequest create;
    v1::SequenceSpec* spec = create.mutable_spec();
    spec->set_sequence_id(555);
    spec->set_n_layers(1);
    spec->set_n_heads(1);
    spec->set_n_kv_heads(1);
    spec->set_head_dim(8);
    spec->set_value_dtype(v1::DTYPE_F32);
    spec->set_index_type(v1::INDEX_TYPE_FLAT);
    create.set_capability(std::string(16, 'a'));
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    v1::CreateSequenceResponse resp;
    const grpc::Status created = node->CreateSequence(&ctx, create, &resp);
    ASSERT_TRUE(created.ok()) << created.error_message();
  }
  fork.set_source_sequence_id(555);
  fork.set_source_capability(std::string(16, 'z'));
  s = call(fork);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::PERMISSION_DENIED) << s.error_message();
  EXPECT_NE(s.error_message().find("capability does not match sequence 555"), std::string::npos)
      << s.error_message();
  fork.set_source_capability(std::string(16, 'a'));
  s = call(fork);
  EXPECT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(NodeStats(0).forks(), 1);
}

TEST_F(ForkE2eTest, GatewayNChoicesAreOneWorkerRequest) {
  auto gateway = GatewayProcess::Start(
      g_gateway_binary, {"--workers=" + worker_->address(), "--health_check_seconds=1000"});
  ASSERT_NE(gateway, nullptr);
  httplib::Client client("http://" + gateway->http());
  client.set_read_timeout(std::chrono::seconds(120));
  // The model's id as the gateway names it.
  auto models = client.Get("/v1/models");
  ASSERT_TRUE(models && models->status == 200);
  const std::string model = json::parse(models->body)["data"][0]["id"];
  const json body = {{"model", model},
                     {"prompt", kPrompt},
                     {"max_tokens", kMaxTokens},
                     {"temperature", 0},
                     {"n", 2}};
  const double prefills0 = Prefills();
  auto res = client.Post("/v1/completions", body.dump(), "application/json");
  ASSERT_TRUE(res);
  ASSERT_EQ(res->status, 200) << res->body;
  const json out = json::parse(res->body);
  ASSERT_EQ(out["choices"].size(), 2u);
  EXPECT_EQ(out["choices"][0]["index"], 0);
  EXPECT_EQ(out["choices"][1]["index"], 1);
  EXPECT_EQ(out["choices"][0]["text"], out["choices"][1]["text"]);
  EXPECT_EQ(Prefills(), prefills0 + 1);  // one worker request, one prefill
  const Choices one = Read(stub_.get(), Request(kPrompt, 1, 0.0f, 1));
  ASSERT_TRUE(one.status.ok());
  EXPECT_EQ(out["usage"]["prompt_tokens"], one.finals.at(0).usage().prompt_tokens());
  EXPECT_EQ(out["usage"]["completion_tokens"], 2 * kMaxTokens);
  // Streamed: both choices' events, each with its index.
  json sbody = body;
  sbody["stream"] = true;
  auto sres = client.Post("/v1/completions", sbody.dump(), "application/json");
  ASSERT_TRUE(sres);
  ASSERT_EQ(sres->status, 200) << sres->body;
  EXPECT_NE(sres->body.find("\"index\":1"), std::string::npos) << sres->body;
  EXPECT_NE(sres->body.find("[DONE]"), std::string::npos);
}

}  // namespace
}  // namespace kvr

int main(int argc, char** argv) {
  GOOGLE_PROTOBUF_VERIFY_VERSION;
  ::testing::InitGoogleTest(&argc, argv);
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--kvr_worker" && i + 1 < argc) kvr::g_worker_binary = argv[++i];
    if (a == "--kvr_gateway" && i + 1 < argc) kvr::g_gateway_binary = argv[++i];
  }
  if (!kvr::test_support::ParseNodeBinaryFlag(argc, argv)) return 2;
  if (kvr::g_worker_binary.empty() || kvr::g_gateway_binary.empty()) {
    std::fprintf(stderr,
                 "usage: %s --kvr_node PATH --kvr_worker PATH --kvr_gateway PATH [gtest flags]\n",
                 argv[0]);
    return 2;
  }
  signal(SIGPIPE, SIG_IGN);
  return RUN_ALL_TESTS();
}
