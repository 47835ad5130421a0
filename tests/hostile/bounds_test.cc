// Server bounds of kvr_worker and kvr_gateway (issue 14, deliverable 4),
// against real processes on 127.0.0.1 (CPU backend, stories260K):
//
//  * --http_request_timeout_seconds: a client that trickles a request (its
//    body or its head) one byte at a time, each byte well inside
//    --http_read_timeout_seconds, is answered 408 naming the flag once the
//    whole request has taken longer than the limit; before the limit it held
//    a gateway connection thread for as long as it kept trickling;
//  * --max_concurrent_streams on both binaries: with 2, a third call on the
//    same connection waits (its deadline expires unserved) while two calls
//    are held open, and is served once one of them ends;
//  * kvr_worker --max_deadline_seconds: a call whose deadline is later (or
//    that has none) is served but cut at the cap, DEADLINE_EXCEEDED naming
//    the flag (the gateway's cap, --max_request_timeout_seconds, is
//    gateway_hostile_test's);
//  * kvr_worker --device_memory_budget_bytes on the emulated CUDA backend:
//    a request beyond it is RESOURCE_EXHAUSTED naming it; a request beyond
//    --host_memory_budget_bytes is HTTP 429 naming it through the gateway;
//  * the new flags' ranges: out of range exits 2 naming the flag.
//
// Binaries from the environment: KVR_GATEWAY_BIN, KVR_WORKER_BIN (set by
// tests/hostile/bounds.cmake).
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <condition_variable>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/subprocess.h"
#include "grpcpp/client_context.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "gtest/gtest.h"
#include "kvr/v1/generation.grpc.pb.h"
#include "tests/support/gateway_process.h"
#include "tests/support/server_process.h"

namespace kvr {
namespace {

using Clock = std::chrono::steady_clock;
using test_support::GatewayProcess;
using test_support::ServerProcess;

constexpr int kRequestTimeoutSeconds = 2;  // the gateway's --http_request_timeout_seconds
constexpr int kReadTimeoutSeconds = 5;     // its --http_read_timeout_seconds
constexpr int kCutSeconds = 2;             // a worker's --max_deadline_seconds

std::string Env(const char* name) {
  const char* v = std::getenv(name);
  return v == nullptr ? std::string() : std::string(v);
}

// Closes a socket descriptor when it goes out of scope.
struct Socket {
  explicit Socket(int f) : fd(f) {}
  ~Socket() {
    if (fd >= 0) close(fd);
  }
  Socket(const Socket&) = delete;
  Socket& operator=(const Socket&) = delete;
  int fd;
};

// A TCP connection to "127.0.0.1:PORT" (fd -1 when it fails).
std::unique_ptr<Socket> Connect(const std::string& address) {
  const size_t colon = address.rfind(':');
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_port = htons(static_cast<uint16_t>(std::stoi(address.substr(colon + 1))));
  inet_pton(AF_INET, address.substr(0, colon).c_str(), &sa.sin_addr);
  auto s = std::make_unique<Socket>(socket(AF_INET, SOCK_STREAM, 0));
  if (s->fd >= 0 && connect(s->fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) != 0) {
    close(s->fd);
    s->fd = -1;
  }
  return s;
}

// What a trickling client saw.
struct Trickled {
  std::string reply;        // everything the server sent before closing
  double seconds = 0.0;     // connect -> the server's first reply byte (or give-up)
  size_t bytes_sent = 0;    // of `request`
  bool answered = false;    // the server sent something or closed
};

// Sends `fast` at once, then `slow` one byte every `gap` (each gap spent
// waiting for the server to answer) until the server answers or closes, or
// `give_up` has passed; then reads the reply to its end (bounded).
Trickled Trickle(const std::string& address, const std::string& fast, const std::string& slow,
                 std::chrono::milliseconds gap, std::chrono::seconds give_up) {
  Trickled t;
  std::unique_ptr<Socket> s = Connect(address);
  if (s->fd < 0) {
    ADD_FAILURE() << "cannot connect to " << address;
    return t;
  }
  const auto start = Clock::now();
  const auto end = start + give_up;
  if (send(s->fd, fast.data(), fast.size(), MSG_NOSIGNAL) != static_cast<ssize_t>(fast.size())) {
    ADD_FAILURE() << "cannot send the request's start";
    return t;
  }
  t.bytes_sent = fast.size();
  size_t next = 0;
  while (Clock::now() < end) {
    pollfd p{s->fd, POLLIN, 0};
    if (poll(&p, 1, static_cast<int>(gap.count())) > 0) {
      t.answered = true;
      break;
    }
    if (next < slow.size()) {
      if (send(s->fd, slow.data() + next, 1, MSG_NOSIGNAL) != 1) {
        t.answered = true;  // the server closed
        break;
      }
      ++next;
      ++t.bytes_sent;
    }
  }
  t.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  if (!t.answered) return t;
  char buf[4096];
  while (Clock::now() < end + std::chrono::seconds(5)) {
    pollfd p{s->fd, POLLIN, 0};
    if (poll(&p, 1, 1000) <= 0) break;
    const ssize_t n = recv(s->fd, buf, sizeof(buf), 0);
    if (n <= 0) break;
    t.reply.append(buf, static_cast<size_t>(n));
  }
  return t;
}

// kvr.v1.Generation stub on its own channel (one connection).
std::unique_ptr<v1::Generation::Stub> Stub(const std::string& address) {
  return v1::Generation::NewStub(
      grpc::CreateChannel(address, grpc::InsecureChannelCredentials()));
}

// A GetModelInfo call that waits for more finished requests than there will
// ever be: it holds one stream open until destroyed (cancelled, and its
// completion awaited), with a deadline `deadline_seconds` away (none: none).
class HeldCall {
 public:
  explicit HeldCall(v1::Generation::Stub* stub, std::optional<int> deadline_seconds = 25) {
    if (deadline_seconds.has_value()) {
      ctx_.set_deadline(std::chrono::system_clock::now() +
                        std::chrono::seconds(*deadline_seconds));
    }
    req_.set_wait_finished_requests(int64_t{1} << 40);
    stub->async()->GetModelInfo(&ctx_, &req_, &resp_, [this](grpc::Status s) {
      std::lock_guard<std::mutex> lock(mu_);
      status_ = std::move(s);
      done_ = true;
      cv_.notify_all();
    });
  }
  ~HeldCall() {
    ctx_.TryCancel();
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [this] { return done_; });
  }
  // Waits up to `limit` for the call to end; whether it did.
  bool WaitDone(std::chrono::seconds limit) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, limit, [this] { return done_; });
  }
  // Whether the call has ended (it should not while held).
  bool done() {
    std::lock_guard<std::mutex> lock(mu_);
    return done_;
  }
  grpc::Status status() {
    std::lock_guard<std::mutex> lock(mu_);
    return status_;
  }

 private:
  grpc::ClientContext ctx_;
  v1::GetModelInfoRequest req_;
  v1::GetModelInfoResponse resp_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false;
  grpc::Status status_;
};

// A plain GetModelInfo (no waiting) with a deadline `seconds` away.
grpc::Status Info(v1::Generation::Stub* stub, double seconds) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() +
                   std::chrono::duration_cast<std::chrono::milliseconds>(
                       std::chrono::duration<double>(seconds)));
  v1::GetModelInfoRequest req;
  v1::GetModelInfoResponse resp;
  return stub->GetModelInfo(&ctx, req, &resp);
}

// With --max_concurrent_streams 2 at `address`: while two calls are held on
// one connection, a third one there waits unserved until its deadline; once
// one held call ends, the next call is served.
void ExpectThirdStreamWaits(const std::string& address) {
  std::unique_ptr<v1::Generation::Stub> stub = Stub(address);
  // First call: the connection is up and its SETTINGS (the cap) are known.
  ASSERT_TRUE(Info(stub.get(), 20).ok());
  auto first = std::make_unique<HeldCall>(stub.get());
  auto second = std::make_unique<HeldCall>(stub.get());
  const auto start = Clock::now();
  const grpc::Status third = Info(stub.get(), 1.5);
  const double waited = std::chrono::duration<double>(Clock::now() - start).count();
  EXPECT_EQ(third.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED)
      << "a third stream on the connection must wait for a slot: " << third.error_message();
  EXPECT_GE(waited, 1.4);
  EXPECT_FALSE(first->done()) << first->status().error_message();
  EXPECT_FALSE(second->done()) << second->status().error_message();
  first.reset();  // cancelled: its stream slot frees
  const grpc::Status next = Info(stub.get(), 20);
  EXPECT_TRUE(next.ok()) << "served once a slot is free: " << next.error_message();
  // Another connection has its own two slots.
  std::unique_ptr<v1::Generation::Stub> other = Stub(address);
  EXPECT_TRUE(Info(other.get(), 20).ok());
}

class BoundsTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    const std::string worker_bin = Env("KVR_WORKER_BIN");
    const std::string gateway_bin = Env("KVR_GATEWAY_BIN");
    ASSERT_FALSE(worker_bin.empty() || gateway_bin.empty())
        << "KVR_WORKER_BIN and KVR_GATEWAY_BIN must be set";
    // The worker under test for its own bounds.
    capped_worker_ = ServerProcess::Start(
                         worker_bin, "kvr_worker",
                         {"--metrics_listen=", "--max_concurrent_streams=2"})
                         .release();
    ASSERT_TRUE(capped_worker_ != nullptr && capped_worker_->listening());
    // The gateway's worker, with default bounds.
    worker_ = ServerProcess::Start(worker_bin, "kvr_worker", {"--metrics_listen="}).release();
    ASSERT_TRUE(worker_ != nullptr && worker_->listening());
    gateway_ = GatewayProcess::Start(
                   gateway_bin,
                   {"--workers=" + worker_->address(), "--max_concurrent_streams=2",
                    absl::StrCat("--http_request_timeout_seconds=", kRequestTimeoutSeconds),
                    absl::StrCat("--http_read_timeout_seconds=", kReadTimeoutSeconds)})
                   .release();
    ASSERT_NE(gateway_, nullptr);
  }
  static void TearDownTestSuite() {
    if (gateway_ != nullptr) {
      EXPECT_TRUE(gateway_->Stop());
    }
    delete gateway_;
    gateway_ = nullptr;
    for (ServerProcess** p : {&worker_, &capped_worker_}) {
      if (*p != nullptr) (*p)->Stop();
      delete *p;
      *p = nullptr;
    }
  }
  void SetUp() override {
    if (gateway_ == nullptr || worker_ == nullptr || capped_worker_ == nullptr) {
      GTEST_SKIP() << "servers did not start (see SetUpTestSuite)";
    }
  }

  // The gateway still answers /healthz at once.
  static void ExpectHealthy(const char* when) {
    const Trickled t = Trickle(gateway_->http(), "GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n", "",
                               std::chrono::milliseconds(100), std::chrono::seconds(10));
    EXPECT_TRUE(absl::StartsWith(t.reply, "HTTP/1.1 200")) << when << ": " << t.reply;
  }

  static ServerProcess* capped_worker_;
  static ServerProcess* worker_;
  static GatewayProcess* gateway_;
};

ServerProcess* BoundsTest::capped_worker_ = nullptr;
ServerProcess* BoundsTest::worker_ = nullptr;
GatewayProcess* BoundsTest::gateway_ = nullptr;

// A body sent one byte every 0.5 s (10x inside the read timeout) is cut at
// the whole-request deadline: 408 naming the flag, after ~2 s, long before
// the body is complete. Without the deadline the connection stayed open for
// as long as the client trickled (here: the 12 s give-up).
TEST_F(BoundsTest, TrickledBodyGets408AtTheRequestDeadline) {
  const std::string body(64, 'x');
  const Trickled t = Trickle(gateway_->http(),
                             "POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: "
                             "application/json\r\nContent-Length: 64\r\n\r\n",
                             body, std::chrono::milliseconds(500), std::chrono::seconds(12));
  ASSERT_TRUE(t.answered) << "still reading the trickled body after " << t.seconds << " s";
  EXPECT_TRUE(absl::StartsWith(t.reply, "HTTP/1.1 408")) << t.reply;
  EXPECT_TRUE(absl::StrContains(t.reply, "http_request_timeout_seconds")) << t.reply;
  EXPECT_TRUE(absl::StrContains(t.reply, absl::StrCat("limit ", kRequestTimeoutSeconds, " s")))
      << t.reply;
  EXPECT_GE(t.seconds, kRequestTimeoutSeconds - 0.1);
  EXPECT_LT(t.seconds, kRequestTimeoutSeconds + 3.0);
  EXPECT_LT(t.bytes_sent, 100u + body.size()) << "cut before the body was complete";
  ExpectHealthy("after a trickled body");
}

// The same for a request head trickled one byte every 0.5 s.
TEST_F(BoundsTest, TrickledHeadGets408AtTheRequestDeadline) {
  const Trickled t =
      Trickle(gateway_->http(), "GET /v1/models HTTP/1.1\r\n",
              "X-Slow: " + std::string(60, 'y') + "\r\n\r\n", std::chrono::milliseconds(500),
              std::chrono::seconds(12));
  ASSERT_TRUE(t.answered) << "still reading the trickled head after " << t.seconds << " s";
  EXPECT_TRUE(absl::StartsWith(t.reply, "HTTP/1.1 408")) << t.reply;
  EXPECT_TRUE(absl::StrContains(t.reply, "http_request_timeout_seconds")) << t.reply;
  EXPECT_GE(t.seconds, kRequestTimeoutSeconds - 0.1);
  EXPECT_LT(t.seconds, kRequestTimeoutSeconds + 3.0);
  ExpectHealthy("after a trickled head");
}

// A request sent at once is not affected, on a kept-alive connection either:
// the deadline counts per request, from its first byte.
TEST_F(BoundsTest, PromptRequestsOnAKeptAliveConnectionAreServed) {
  const std::string get = "GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n";
  std::unique_ptr<Socket> s = Connect(gateway_->http());
  ASSERT_GE(s->fd, 0);
  for (int i = 0; i < 3; ++i) {
    ASSERT_EQ(send(s->fd, get.data(), get.size(), MSG_NOSIGNAL), static_cast<ssize_t>(get.size()));
    // One whole response: its head, then Content-Length bytes of body.
    std::string reply;
    size_t want = std::string::npos;
    const auto give_up = Clock::now() + std::chrono::seconds(10);
    while (reply.size() != want && Clock::now() < give_up) {
      pollfd p{s->fd, POLLIN, 0};
      if (poll(&p, 1, 1000) <= 0) continue;
      char buf[1024];
      const ssize_t n = recv(s->fd, buf, sizeof(buf), 0);
      if (n <= 0) break;
      reply.append(buf, static_cast<size_t>(n));
      const size_t head_end = reply.find("\r\n\r\n");
      const size_t cl = reply.find("Content-Length: ");
      if (want == std::string::npos && head_end != std::string::npos && cl < head_end) {
        want = head_end + 4 + std::stoul(reply.substr(cl + 16));
      }
    }
    EXPECT_EQ(reply.size(), want) << "request " << i << ": " << reply;
    EXPECT_TRUE(absl::StartsWith(reply, "HTTP/1.1 200")) << "request " << i << ": " << reply;
  }
}

TEST_F(BoundsTest, GatewayMaxConcurrentStreamsMakesAThirdCallWait) {
  ExpectThirdStreamWaits(gateway_->grpc());
}

TEST_F(BoundsTest, WorkerMaxConcurrentStreamsMakesAThirdCallWait) {
  ExpectThirdStreamWaits(capped_worker_->address());
}

// --max_deadline_seconds 2: a GetModelInfo waiting for a count never
// reached, with a deadline 60 s away or none at all, ends DEADLINE_EXCEEDED
// naming the flag ~2 s after it arrived, and frees its waiter slot
// (--max_finish_waiters 1: the second wait is cut too, not refused); a
// Generate with a deadline a year away is served (it ends well within 2 s).
TEST_F(BoundsTest, WorkerCutsCallsAtItsDeadlineCap) {
  std::unique_ptr<ServerProcess> worker = ServerProcess::Start(
      Env("KVR_WORKER_BIN"), "kvr_worker",
      {"--metrics_listen=", "--max_finish_waiters=1",
       absl::StrCat("--max_deadline_seconds=", kCutSeconds)});
  ASSERT_TRUE(worker != nullptr && worker->listening());
  std::unique_ptr<v1::Generation::Stub> stub = Stub(worker->address());
  for (const bool with_deadline : {true, false}) {
    SCOPED_TRACE(with_deadline ? "deadline 60 s away" : "no deadline");
    const auto start = Clock::now();
    HeldCall wait(stub.get(), with_deadline ? std::optional<int>(60) : std::nullopt);
    ASSERT_TRUE(wait.WaitDone(std::chrono::seconds(kCutSeconds + 15)))
        << "not cut at --max_deadline_seconds";
    const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
    const grpc::Status s = wait.status();
    EXPECT_EQ(s.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << s.error_message();
    EXPECT_TRUE(absl::StrContains(s.error_message(),
                                  absl::StrCat(kCutSeconds, " s (--max_deadline_seconds)")))
        << s.error_message();
    EXPECT_GE(seconds, kCutSeconds - 0.1);
    EXPECT_LT(seconds, kCutSeconds + 5.0);
  }
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::hours(24 * 365));
  v1::GenerateRequest req;
  req.set_text("Once upon a time");
  req.set_max_tokens(4);
  auto reader = stub->Generate(&ctx, req);
  v1::GenerateResponse msg;
  int64_t tokens = 0;
  while (reader->Read(&msg)) {
    if (msg.has_chunk()) tokens += msg.chunk().token_ids_size();
  }
  const grpc::Status s = reader->Finish();
  EXPECT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(tokens, 4);
  EXPECT_TRUE(worker->Stop().has_value());
}

// kvr_worker on the emulated CUDA backend (the CUDA backend's sources on
// the CPU emulator) with --device_memory_budget_bytes 1000000 and no host
// budget: while one full-attention request runs (655360 bytes of K/V on the
// device), a second is refused RESOURCE_EXHAUSTED naming the device budget;
// a retrieval-mode request fits. Skips without the emulated plugin.
TEST_F(BoundsTest, WorkerDeviceBudgetOnTheEmulatedCudaBackend) {
  const std::string plugin = Env("KVR_CUDA_EMULATED_PLUGIN");
  if (plugin.empty()) GTEST_SKIP() << "KVR_CUDA_EMULATED_PLUGIN not set (no emulated plugin)";
  std::unique_ptr<ServerProcess> worker = ServerProcess::Start(
      Env("KVR_WORKER_BIN"), "kvr_worker",
      {"--metrics_listen=", "--backend=cuda", "--cuda_plugin=" + plugin,
       "--device_memory_budget_bytes=1000000", "--host_memory_budget_bytes=0"});
  ASSERT_TRUE(worker != nullptr && worker->listening());
  std::unique_ptr<v1::Generation::Stub> stub = Stub(worker->address());
  v1::GenerateRequest full;
  full.set_text("Once upon a time, there was a little girl");
  full.set_max_tokens(400);
  full.mutable_attention()->set_mode("full");
  grpc::ClientContext holder_ctx;
  holder_ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
  auto holder = stub->Generate(&holder_ctx, full);
  v1::GenerateResponse msg;
  bool streaming = false;
  while (!streaming && holder->Read(&msg)) streaming = msg.has_chunk() || msg.has_prefill_progress();
  ASSERT_TRUE(streaming) << "the first full-attention request runs";

  auto run = [&](const v1::GenerateRequest& req, int64_t* tokens) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    auto reader = stub->Generate(&ctx, req);
    v1::GenerateResponse m;
    while (reader->Read(&m)) {
      if (m.has_chunk()) *tokens += m.chunk().token_ids_size();
    }
    return reader->Finish();
  };
  int64_t refused_tokens = 0;
  const grpc::Status refused = run(full, &refused_tokens);
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << refused.error_message();
  for (const char* part : {"--device_memory_budget_bytes", "655360", "1000000", "retry"}) {
    EXPECT_TRUE(absl::StrContains(refused.error_message(), part))
        << refused.error_message() << " lacks " << part;
  }
  EXPECT_EQ(refused_tokens, 0);
  v1::GenerateRequest small;
  small.set_text("Once upon a time");
  small.set_max_tokens(4);
  int64_t small_tokens = 0;
  const grpc::Status fits = run(small, &small_tokens);
  EXPECT_TRUE(fits.ok()) << fits.error_message();
  EXPECT_EQ(small_tokens, 4);
  holder_ctx.TryCancel();
  while (holder->Read(&msg)) {
  }
  holder->Finish();
  EXPECT_TRUE(worker->Stop().has_value());
}

// --device_memory_budget_bytes' default: 90% of the device memory free once
// the weights are on the device. On the emulated device of 64 MiB (stories260K's
// weights are ~1 MiB) the worker prints a device budget within
// [0.9 x (64 - 8) MiB, 0.9 x 64 MiB]. Skips without the emulated plugin.
TEST_F(BoundsTest, WorkerDeviceBudgetDefaultsTo90PercentOfFreeDeviceMemory) {
  const std::string plugin = Env("KVR_CUDA_EMULATED_PLUGIN");
  if (plugin.empty()) GTEST_SKIP() << "KVR_CUDA_EMULATED_PLUGIN not set (no emulated plugin)";
  constexpr int64_t kDevice = int64_t{64} << 20;
  // Read by the emulator in the child (inherited environment).
  ASSERT_EQ(setenv("KVR_CUDA_EMU_MEMORY_BYTES", std::to_string(kDevice).c_str(), 1), 0);
  auto proc = Subprocess::Start({Env("KVR_WORKER_BIN"), "--listen=127.0.0.1:0",
                                 "--metrics_listen=", "--backend=cuda", "--cuda_plugin=" + plugin},
                                /*merge_stderr=*/true);
  unsetenv("KVR_CUDA_EMU_MEMORY_BYTES");
  ASSERT_TRUE(proc.ok()) << proc.status();
  auto line = (*proc)->WaitForLine("kvr_worker: memory budgets: host ", absl::Seconds(60));
  ASSERT_TRUE(line.ok()) << line.status() << "\n" << (*proc)->Output();
  // "<host> bytes, device <device> bytes (0: none)"
  const size_t at = line->find("device ");
  ASSERT_NE(at, std::string::npos) << *line;
  const int64_t device = std::stoll(line->substr(at + 7));
  EXPECT_LE(device, kDevice / 10 * 9) << *line;
  EXPECT_GE(device, (kDevice - (int64_t{8} << 20)) / 10 * 9) << *line;
  auto st = (*proc)->Stop(SIGTERM, absl::Seconds(30));
  EXPECT_TRUE(st.ok() && WIFEXITED(*st) && WEXITSTATUS(*st) == 0);
}

// The host budget's refusal through the gateway's HTTP API: a worker with
// --host_memory_budget_bytes 600000 (less than one full-attention sequence,
// 659456 bytes; more than a retrieval one) behind a gateway: a full-mode
// completion is HTTP 429 naming the flag and both numbers (with
// Retry-After), a retrieval-mode one is served.
TEST_F(BoundsTest, HostBudgetRefusalIsHttp429NamingIt) {
  std::unique_ptr<ServerProcess> worker =
      ServerProcess::Start(Env("KVR_WORKER_BIN"), "kvr_worker",
                           {"--metrics_listen=", "--host_memory_budget_bytes=600000"});
  ASSERT_TRUE(worker != nullptr && worker->listening());
  std::unique_ptr<GatewayProcess> gateway =
      GatewayProcess::Start(Env("KVR_GATEWAY_BIN"), {"--workers=" + worker->address()});
  ASSERT_NE(gateway, nullptr);
  auto post = [&](const std::string& body) {
    return Trickle(gateway->http(),
                   absl::StrCat("POST /v1/completions HTTP/1.1\r\nHost: t\r\nConnection: "
                                "close\r\nContent-Type: application/json\r\nContent-Length: ",
                                body.size(), "\r\n\r\n", body),
                   "", std::chrono::milliseconds(100), std::chrono::seconds(60));
  };
  const Trickled full = post(
      R"({"model":"stories260K","prompt":"Once upon a time","max_tokens":4,"kvr":{"mode":"full"}})");
  EXPECT_TRUE(absl::StartsWith(full.reply, "HTTP/1.1 429")) << full.reply;
  for (const char* part :
       {"Retry-After: 1", "--host_memory_budget_bytes", "659456", "600000", "whole memory budget"}) {
    EXPECT_TRUE(absl::StrContains(full.reply, part)) << full.reply << " lacks " << part;
  }
  const Trickled small =
      post(R"({"model":"stories260K","prompt":"Once upon a time","max_tokens":4})");
  EXPECT_TRUE(absl::StartsWith(small.reply, "HTTP/1.1 200")) << small.reply;
  EXPECT_TRUE(gateway->Stop());
  EXPECT_TRUE(worker->Stop().has_value());
}

// Exit status and output (stdout and stderr) of `argv`, which must exit by
// itself within 30 s.
std::pair<int, std::string> RunToExit(std::vector<std::string> argv) {
  auto proc = Subprocess::Start(std::move(argv), /*merge_stderr=*/true);
  if (!proc.ok()) {
    ADD_FAILURE() << proc.status();
    return {-1, ""};
  }
  // Reads the output until the pipe closes (the process exited).
  (void)(*proc)->WaitForLine("\x01never printed", absl::Seconds(30));
  auto st = (*proc)->Stop(0, absl::Seconds(30));
  if (!st.ok() || !WIFEXITED(*st)) return {-1, (*proc)->Output()};
  return {WEXITSTATUS(*st), (*proc)->Output()};
}

TEST(BoundsFlags, OutOfRangeValuesExit2NamingTheFlag) {
  const std::string worker_bin = Env("KVR_WORKER_BIN");
  const std::string gateway_bin = Env("KVR_GATEWAY_BIN");
  struct Case {
    std::vector<std::string> argv;
    std::string flag;
  };
  const std::vector<Case> cases = {
      {{worker_bin, "--max_concurrent_streams=-1"}, "max_concurrent_streams"},
      {{worker_bin, "--grpc_memory_quota_bytes=-1"}, "grpc_memory_quota_bytes"},
      {{worker_bin, "--grpc_max_threads=-1"}, "grpc_max_threads"},
      {{worker_bin, "--max_deadline_seconds=-1"}, "max_deadline_seconds"},
      {{worker_bin, "--max_deadline_seconds=1e300"}, "max_deadline_seconds"},
      {{worker_bin, "--host_memory_budget_bytes=-2"}, "host_memory_budget_bytes"},
      {{worker_bin, "--device_memory_budget_bytes=-2"}, "device_memory_budget_bytes"},
      {{worker_bin, "--host_memory_budget_bytes=1", "--memory_budget_bytes=1"},
       "host_memory_budget_bytes"},
      {{gateway_bin, "--workers=127.0.0.1:1", "--max_concurrent_streams=-1"},
       "max_concurrent_streams"},
      {{gateway_bin, "--workers=127.0.0.1:1", "--grpc_memory_quota_bytes=-1"},
       "grpc_memory_quota_bytes"},
      {{gateway_bin, "--workers=127.0.0.1:1", "--grpc_max_threads=-1"}, "grpc_max_threads"},
      {{gateway_bin, "--workers=127.0.0.1:1", "--http_request_timeout_seconds=0"},
       "http_request_timeout_seconds"},
  };
  for (const Case& c : cases) {
    const auto [code, err] = RunToExit(c.argv);
    EXPECT_EQ(code, 2) << c.argv[1] << " " << c.argv.back() << ": " << err;
    EXPECT_TRUE(absl::StrContains(err, c.flag)) << err;
  }
}

}  // namespace
}  // namespace kvr
