// kvr_worker metrics: a real kvr_worker (in-process node, stories260K) on
// loopback; its /metrics page (address read from its "kvr_worker metrics
// on" line, printed before the listening line) scraped over HTTP before and
// after a known set of Generate calls:
//  * kvr_worker_requests_total{code} moves by exactly the calls made (OK and
//    INVALID_ARGUMENT), prompt / generated token counters by the usage the
//    calls report, the TTFT and prefill histograms by one per request, the
//    decode step histogram by the steps those requests needed (requests run
//    one at a time, so each step is one sequence's);
//  * kvr_worker_step_phase_seconds_total{retrieval,attention,other} sums to
//    the decode step seconds within 1%, and attention is > 0 (the engine
//    reports local attention time);
//  * gauges: nothing running or waiting when idle, 1 retrieval node;
//  * `promtool check metrics` accepts the page (skipped without promtool);
//  * --metrics_listen= (empty) disables the endpoint.
// The helpers scraping and parsing the page are tests/support/metrics_page.h.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "grpcpp/client_context.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "gtest/gtest.h"
#include "kvr/v1/generation.grpc.pb.h"
#include "tests/support/metrics_page.h"
#include "tests/support/server_process.h"

namespace kvr::worker {
namespace {

std::string g_worker_binary;  // --kvr_worker

using kvr::test_support::ServerProcess;

using kvr::test_support::ExpectPromtoolAccepts;
using kvr::test_support::FindOnPath;
using kvr::test_support::Get;
using kvr::test_support::Has;
using kvr::test_support::HttpGetMetrics;
using kvr::test_support::ParseExposition;
using kvr::test_support::Samples;

// --- traffic ----------------------------------------------------------------------

struct Outcome {
  grpc::Status status;
  int64_t prompt_tokens = 0;
  int64_t completion_tokens = 0;
  v1::FinishReason finish = v1::FINISH_REASON_UNSPECIFIED;
};

Outcome Generate(v1::Generation::Stub* stub, const v1::GenerateRequest& request) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  auto reader = stub->Generate(&ctx, request);
  v1::GenerateResponse msg;
  Outcome out;
  while (reader->Read(&msg)) {
    if (msg.has_summary()) {
      out.prompt_tokens = msg.summary().usage().prompt_tokens();
      out.completion_tokens = msg.summary().usage().completion_tokens();
      out.finish = msg.summary().finish_reason();
    }
  }
  out.status = reader->Finish();
  return out;
}

// Decode steps a finished request needed: its first token comes from the
// prefill, each further token or the EOS from one step.
int64_t StepsOf(const Outcome& o) {
  if (o.finish == v1::FINISH_REASON_EOS) return o.completion_tokens;
  return o.completion_tokens > 0 ? o.completion_tokens - 1 : 0;
}

constexpr char kLongPrompt[] =
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the sun "
    "with her big red ball and her dog.";

TEST(WorkerMetrics, CountersMoveByExactlyTheTrafficAndPhasesSumToDecode) {
  auto worker = ServerProcess::Start(g_worker_binary, "kvr_worker", {"--max_concurrent=2"});
  ASSERT_TRUE(worker != nullptr && worker->listening());
  ASSERT_FALSE(worker->metrics_address().empty()) << "no \"kvr_worker metrics on\" line";
  auto stub = v1::Generation::NewStub(
      grpc::CreateChannel(worker->address(), grpc::InsecureChannelCredentials()));

  const std::optional<std::string> text0 = HttpGetMetrics(worker->metrics_address());
  ASSERT_TRUE(text0.has_value());
  const Samples s0 = ParseExposition(*text0);
  // Every family is on the page from the start.
  for (const char* name :
       {"kvr_worker_requests_running", "kvr_worker_requests_waiting",
        "kvr_worker_prompt_tokens_total", "kvr_worker_generated_tokens_total",
        "kvr_worker_time_to_first_token_seconds_count", "kvr_worker_prefill_duration_seconds_count",
        "kvr_worker_decode_step_duration_seconds_count", "kvr_worker_retrieval_nodes"}) {
    EXPECT_TRUE(Has(s0, name)) << name;
  }
  EXPECT_TRUE(Has(s0, "kvr_worker_requests_total", {{"code", "OK"}}));
  for (const char* phase : {"retrieval", "attention", "other"}) {
    EXPECT_TRUE(Has(s0, "kvr_worker_step_phase_seconds_total", {{"phase", phase}})) << phase;
  }
  EXPECT_EQ(Get(s0, "kvr_worker_retrieval_nodes"), 1);

  // N requests, one at a time: retrieval and full mode, greedy and sampled,
  // a long prompt (shards offloaded to the node), max_tokens 0.
  struct Req {
    std::string prompt;
    int max_tokens;
    std::string mode;
    float temperature;
  };
  const std::vector<Req> reqs = {{"Once upon a time", 24, "retrieval", 0.0f},
                                 {kLongPrompt, 40, "retrieval", 0.8f},
                                 {"The cat", 16, "full", 0.0f},
                                 {"Lily and Tom", 0, "retrieval", 0.0f},
                                 {kLongPrompt, 32, "full", 0.9f}};
  int64_t prompt_tokens = 0, generated = 0, steps = 0, with_tokens = 0;
  for (size_t i = 0; i < reqs.size(); ++i) {
    v1::GenerateRequest r;
    r.set_text(reqs[i].prompt);
    r.set_max_tokens(reqs[i].max_tokens);
    r.mutable_attention()->set_mode(reqs[i].mode);
    r.mutable_sampling()->set_temperature(reqs[i].temperature);
    r.mutable_sampling()->set_seed(7 + i);
    const Outcome o = Generate(stub.get(), r);
    ASSERT_TRUE(o.status.ok()) << i << ": " << o.status.error_message();
    prompt_tokens += o.prompt_tokens;
    generated += o.completion_tokens;
    steps += StepsOf(o);
    with_tokens += o.completion_tokens > 0 ? 1 : 0;
  }
  ASSERT_GT(steps, 0);
  // Two rejected calls.
  for (int i = 0; i < 2; ++i) {
    v1::GenerateRequest bad;
    bad.set_text("Once");
    bad.set_max_tokens(-1);
    EXPECT_EQ(Generate(stub.get(), bad).status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  }

  const std::optional<std::string> text1 = HttpGetMetrics(worker->metrics_address());
  ASSERT_TRUE(text1.has_value());
  const Samples s1 = ParseExposition(*text1);
  auto delta = [&](const std::string& name, std::map<std::string, std::string> labels = {}) {
    return Get(s1, name, labels) - Get(s0, name, labels);
  };
  const double n = static_cast<double>(reqs.size());
  EXPECT_EQ(delta("kvr_worker_requests_total", {{"code", "OK"}}), n);
  EXPECT_EQ(delta("kvr_worker_requests_total", {{"code", "INVALID_ARGUMENT"}}), 2);
  EXPECT_EQ(delta("kvr_worker_prompt_tokens_total"), static_cast<double>(prompt_tokens));
  EXPECT_EQ(delta("kvr_worker_generated_tokens_total"), static_cast<double>(generated));
  EXPECT_EQ(delta("kvr_worker_prefill_duration_seconds_count"), n);
  EXPECT_EQ(delta("kvr_worker_time_to_first_token_seconds_count"),
            static_cast<double>(with_tokens));
  EXPECT_EQ(delta("kvr_worker_decode_step_duration_seconds_count"), static_cast<double>(steps));
  EXPECT_GT(delta("kvr_worker_prefill_duration_seconds_sum"), 0.0);
  EXPECT_EQ(Get(s1, "kvr_worker_requests_running"), 0);
  EXPECT_EQ(Get(s1, "kvr_worker_requests_waiting"), 0);

  // Phases: the decode time split three ways.
  const double decode = delta("kvr_worker_decode_step_duration_seconds_sum");
  const double retrieval = delta("kvr_worker_step_phase_seconds_total", {{"phase", "retrieval"}});
  const double attention = delta("kvr_worker_step_phase_seconds_total", {{"phase", "attention"}});
  const double other = delta("kvr_worker_step_phase_seconds_total", {{"phase", "other"}});
  ASSERT_GT(decode, 0.0);
  EXPECT_NEAR(retrieval + attention + other, decode, 0.01 * decode)
      << "retrieval " << retrieval << " attention " << attention << " other " << other;
  EXPECT_GE(retrieval, 0.0);
  EXPECT_GT(attention, 0.0);
  EXPECT_GT(other, 0.0);
  std::printf("decode %.6f s over %lld steps: retrieval %.6f, attention %.6f, other %.6f\n",
              decode, static_cast<long long>(steps), retrieval, attention, other);

  const std::optional<int> st = worker->Stop(SIGTERM);
  ASSERT_TRUE(st.has_value());
  EXPECT_TRUE(WIFEXITED(*st) && WEXITSTATUS(*st) == 0);
}

TEST(WorkerMetrics, PromtoolAcceptsThePage) {
  const std::string promtool = FindOnPath("promtool");
  if (promtool.empty()) {
    GTEST_SKIP() << "promtool not found on PATH (Debian package 'prometheus'): page not "
                    "validated";
  }
  auto worker = ServerProcess::Start(g_worker_binary, "kvr_worker", {});
  ASSERT_TRUE(worker != nullptr && worker->listening());
  auto stub = v1::Generation::NewStub(
      grpc::CreateChannel(worker->address(), grpc::InsecureChannelCredentials()));
  v1::GenerateRequest r;
  r.set_text(kLongPrompt);
  r.set_max_tokens(8);
  ASSERT_TRUE(Generate(stub.get(), r).status.ok());  // every family has samples
  const std::optional<std::string> text = HttpGetMetrics(worker->metrics_address());
  ASSERT_TRUE(text.has_value());
  ExpectPromtoolAccepts(*text, "kvr_worker_metrics");
}

TEST(WorkerMetrics, EmptyAddressDisablesMetrics) {
  auto worker = ServerProcess::Start(g_worker_binary, "kvr_worker", {"--metrics_listen="});
  ASSERT_TRUE(worker != nullptr && worker->listening());
  EXPECT_TRUE(worker->metrics_address().empty()) << worker->metrics_address();
}

}  // namespace
}  // namespace kvr::worker

int main(int argc, char** argv) {
  GOOGLE_PROTOBUF_VERIFY_VERSION;
  ::testing::InitGoogleTest(&argc, argv);
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--kvr_worker" && i + 1 < argc) {
      kvr::worker::g_worker_binary = argv[++i];
    } else if (a.rfind("--kvr_worker=", 0) == 0) {
      kvr::worker::g_worker_binary = a.substr(13);
    }
  }
  if (kvr::worker::g_worker_binary.empty()) {
    std::fprintf(stderr, "usage: %s --kvr_worker PATH [gtest flags]\n", argv[0]);
    return 2;
  }
  signal(SIGPIPE, SIG_IGN);
  return RUN_ALL_TESTS();
}
