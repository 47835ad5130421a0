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
// The helpers scraping and parsing the page are those of metrics_test.cc.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
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
#include "tests/support/server_process.h"

namespace kvr::worker {
namespace {

std::string g_worker_binary;  // --kvr_worker

using kvr::test_support::ServerProcess;

// --- scraping (as metrics_test.cc) ----------------------------------------------------

// GET http://HOST:PORT/metrics over a plain socket; the body, or a failure.
std::optional<std::string> HttpGetMetrics(const std::string& host_port) {
  const size_t colon = host_port.rfind(':');
  if (colon == std::string::npos) {
    ADD_FAILURE() << "bad metrics address " << host_port;
    return std::nullopt;
  }
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(std::stoi(host_port.substr(colon + 1))));
  if (inet_pton(AF_INET, host_port.substr(0, colon).c_str(), &addr.sin_addr) != 1) {
    ADD_FAILURE() << "bad metrics host " << host_port;
    return std::nullopt;
  }
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    ADD_FAILURE() << "socket: " << std::strerror(errno);
    return std::nullopt;
  }
  std::string response;
  bool ok = connect(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) == 0;
  if (!ok) ADD_FAILURE() << "connect " << host_port << ": " << std::strerror(errno);
  const std::string request =
      "GET /metrics HTTP/1.0\r\nHost: " + host_port + "\r\nConnection: close\r\n\r\n";
  if (ok && send(fd, request.data(), request.size(), MSG_NOSIGNAL) !=
                static_cast<ssize_t>(request.size())) {
    ADD_FAILURE() << "send: " << std::strerror(errno);
    ok = false;
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (ok) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    pollfd pfd{fd, POLLIN, 0};
    if (left.count() <= 0 || poll(&pfd, 1, static_cast<int>(left.count())) <= 0) {
      ADD_FAILURE() << "no complete /metrics response within 10 s";
      ok = false;
      break;
    }
    char chunk[16384];
    const ssize_t n = recv(fd, chunk, sizeof(chunk), 0);
    if (n < 0) {
      ADD_FAILURE() << "recv: " << std::strerror(errno);
      ok = false;
    }
    if (n <= 0) break;
    response.append(chunk, static_cast<size_t>(n));
  }
  close(fd);
  if (!ok) return std::nullopt;
  const size_t body = response.find("\r\n\r\n");
  if (response.rfind("HTTP/1.", 0) != 0 || response.find(" 200 ") == std::string::npos ||
      body == std::string::npos || response.find(" 200 ") > body) {
    ADD_FAILURE() << "bad /metrics response: " << response.substr(0, 200);
    return std::nullopt;
  }
  const std::string headers = response.substr(0, body);
  if (headers.find("chunked") != std::string::npos) {
    ADD_FAILURE() << "unexpected chunked response to HTTP/1.0";
    return std::nullopt;
  }
  return response.substr(body + 4);
}

// Samples of one exposition, keyed by `name{l1="v1",l2="v2"}` with labels
// sorted by name (how the helpers below spell them).
using Samples = std::map<std::string, double>;

std::string SeriesKey(const std::string& name, std::map<std::string, std::string> labels) {
  std::string key = name;
  if (labels.empty()) return key;
  key += '{';
  bool first = true;
  for (const auto& [k, v] : labels) {
    if (!first) key += ',';
    first = false;
    key += k + "=\"" + v + "\"";
  }
  return key + '}';
}

// Parses the text format (no escapes in kvr's label values).
Samples ParseExposition(const std::string& text) {
  Samples out;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#') continue;
    const size_t space = line.rfind(' ');
    if (space == std::string::npos) {
      ADD_FAILURE() << "bad sample line: " << line;
      continue;
    }
    const std::string series = line.substr(0, space);
    const std::string value = line.substr(space + 1);
    std::map<std::string, std::string> labels;
    std::string name = series;
    if (const size_t open = series.find('{'); open != std::string::npos) {
      name = series.substr(0, open);
      std::string rest = series.substr(open + 1, series.size() - open - 2);
      while (!rest.empty()) {
        const size_t eq = rest.find("=\"");
        const size_t end = rest.find('"', eq + 2);
        if (eq == std::string::npos || end == std::string::npos) {
          ADD_FAILURE() << "bad labels: " << line;
          break;
        }
        labels[rest.substr(0, eq)] = rest.substr(eq + 2, end - eq - 2);
        rest.erase(0, end + 1);
        if (!rest.empty() && rest[0] == ',') rest.erase(0, 1);
      }
    }
    out[SeriesKey(name, labels)] = std::strtod(value.c_str(), nullptr);
  }
  return out;
}

double Get(const Samples& s, const std::string& name,
           std::map<std::string, std::string> labels = {}) {
  auto it = s.find(SeriesKey(name, std::move(labels)));
  return it == s.end() ? 0.0 : it->second;
}
bool Has(const Samples& s, const std::string& name, std::map<std::string, std::string> labels = {}) {
  return s.count(SeriesKey(name, std::move(labels))) != 0;
}

// Path of `name` on $PATH, or empty.
std::string FindOnPath(const std::string& name) {
  const char* path = std::getenv("PATH");
  std::istringstream dirs(path != nullptr ? path : "/usr/bin:/bin");
  std::string dir;
  while (std::getline(dirs, dir, ':')) {
    const std::string candidate = (dir.empty() ? "." : dir) + "/" + name;
    if (access(candidate.c_str(), X_OK) == 0) return candidate;
  }
  return "";
}

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
  const std::string file =
      testing::TempDir() + "kvr_worker_metrics_" + std::to_string(getpid()) + ".txt";
  {
    std::ofstream out(file);
    out << *text;
  }
  const std::string command = promtool + " check metrics < " + file + " 2>&1";
  FILE* pipe = popen(command.c_str(), "r");
  ASSERT_NE(pipe, nullptr) << command;
  std::string output;
  char buffer[512];
  while (size_t k = fread(buffer, 1, sizeof(buffer), pipe)) output.append(buffer, k);
  const int status = pclose(pipe);
  std::remove(file.c_str());
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0)
      << "promtool check metrics failed:\n" << output << "\n--- page ---\n" << *text;
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
