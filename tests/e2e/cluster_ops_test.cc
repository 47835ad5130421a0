// End-to-end tests of operating a local cluster: `kvr cluster` as a
// supervisor that restarts what dies, with more than one worker, and
// kvr_loadgen against a target that is down.
//
//  * a node killed with SIGKILL is restarted on its old address with its
//    data dir: cluster.json shows the new pid and restarts 1, grpc health is
//    SERVING there again, Stats still counts a sequence created before the
//    kill (CreateSequence of it answers ALREADY_EXISTS), its log holds both
//    runs and the restart lines; generation through the gateway gives the
//    same tokens as before the kill; SIGTERM exits 0 leaving no child;
//  * a child dying again after --max_restarts restarts in a row stops the
//    cluster: exit 1, the child and the bound named, the others stopped;
//    --max_restarts 0 is the old stop-everything behaviour;
//  * a node that cannot start again (its data dir replaced by a file)
//    crash-loops with delays of 100, 200, 400 ms (logged on stderr and in
//    its log), and SIGTERM in the middle of that still exits 0 leaving no
//    child;
//  * --workers 2: two workers (cluster.json, logs), both healthy in the
//    gateway's metrics, both serving identical greedy output; --replicas
//    passed to them exactly when kvr_worker lists the flag;
//  * kvr_loadgen against a port where nothing listens for 2 s backs off:
//    fewer than 100 attempts (no hot loop), every one counted as UNAVAILABLE
//    in --json and in the table, none as a latency sample.
//
// Usage: cluster_ops_e2e_test --kvr PATH --kvr_loadgen PATH --kvr_worker PATH
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/time/clock.h"
#include "common/subprocess.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/client_context.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "gtest/gtest.h"
#include "kvr/v1/generation.grpc.pb.h"
#include "kvr/v1/retrieval.grpc.pb.h"
#include "nlohmann/json.hpp"
#include "tests/support/cluster_process.h"
#include "tests/support/metrics_page.h"
#include "tools/cluster.h"

namespace kvr {
namespace {

using test_support::ClusterProcess;
using test_support::ProcessGone;

std::string g_kvr, g_loadgen, g_worker;  // --kvr, --kvr_loadgen, --kvr_worker

// Longer than sinks + window (20 tokens): prefill offloads shards to nodes.
constexpr char kLongPrompt[] =
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the sun "
    "with her big red ball and her dog.";

struct Generated {
  grpc::Status status;
  std::vector<int32_t> tokens;
};

// One greedy Generate of kLongPrompt (32 tokens) on `target`, on a fresh
// channel (no reconnect backoff carried over from a dead server).
Generated Generate(const std::string& target) {
  auto stub = v1::Generation::NewStub(
      grpc::CreateChannel(target, grpc::InsecureChannelCredentials()));
  v1::GenerateRequest req;
  req.set_text(kLongPrompt);
  req.set_max_tokens(32);
  req.mutable_sampling()->set_temperature(0.0f);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  auto reader = stub->Generate(&ctx, req);
  Generated out;
  v1::GenerateResponse msg;
  while (reader->Read(&msg)) {
    if (msg.has_chunk()) {
      out.tokens.insert(out.tokens.end(), msg.chunk().token_ids().begin(),
                        msg.chunk().token_ids().end());
    }
  }
  out.status = reader->Finish();
  return out;
}

// Generate until it succeeds or `timeout` passes (a restarted server, or a
// gateway reconnecting to one); the last attempt.
Generated GenerateWithin(const std::string& target, absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  Generated g;
  do {
    g = Generate(target);
    if (g.status.ok()) return g;
    absl::SleepFor(absl::Milliseconds(200));
  } while (absl::Now() < deadline);
  return g;
}

// grpc.health.v1 Check("") on `address` answers SERVING within `timeout`.
bool ServingWithin(const std::string& address, absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  do {
    auto stub = grpc::health::v1::Health::NewStub(
        grpc::CreateChannel(address, grpc::InsecureChannelCredentials()));
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(1));
    grpc::health::v1::HealthCheckRequest req;
    grpc::health::v1::HealthCheckResponse resp;
    if (stub->Check(&ctx, req, &resp).ok() &&
        resp.status() == grpc::health::v1::HealthCheckResponse::SERVING) {
      return true;
    }
    absl::SleepFor(absl::Milliseconds(100));
  } while (absl::Now() < deadline);
  return false;
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

size_t Count(const std::string& text, const std::string& what) {
  size_t n = 0;
  for (size_t at = text.find(what); at != std::string::npos; at = text.find(what, at + 1)) ++n;
  return n;
}

// Runs `argv` to its end (at most 30 s): its wait status (-1: it could not
// be started) and its stdout (with stderr when `merge_stderr`).
std::pair<int, std::string> RunToEnd(const std::vector<std::string>& argv, bool merge_stderr) {
  auto proc = Subprocess::Start(argv, merge_stderr);
  EXPECT_TRUE(proc.ok()) << proc.status();
  if (!proc.ok()) return {-1, std::string()};
  (void)(*proc)->WaitForLine("\x01", absl::Seconds(30));  // no such line: reads to EOF
  const absl::StatusOr<int> st = (*proc)->Stop(SIGKILL, absl::Seconds(10));
  return {st.ok() ? *st : -1, (*proc)->Output()};
}

// Stops `c` with SIGTERM: exit 0 and none of `pids` left.
void ExpectCleanStop(ClusterProcess* c, const std::vector<pid_t>& pids) {
  const absl::StatusOr<int> st = c->proc->Stop(SIGTERM, absl::Seconds(60));
  ASSERT_TRUE(st.ok()) << st.status();
  EXPECT_TRUE(WIFEXITED(*st) && WEXITSTATUS(*st) == 0)
      << "wait status " << *st << "\n" << c->proc->Output();
  (void)c->proc->WaitForLine("\x01", absl::Seconds(5));  // read the rest of its output
  for (pid_t pid : pids) EXPECT_TRUE(ProcessGone(pid)) << "pid " << pid << " survived";
}

TEST(ClusterOpsTest, KilledNodeComesBackOnItsAddressWithItsData) {
  std::unique_ptr<ClusterProcess> c = ClusterProcess::Start(g_kvr, {"--nodes", "2"}, true);
  ASSERT_NE(c, nullptr);
  ASSERT_EQ(c->info.nodes.size(), 2u);
  const cluster::ClusterInfo::Process node = c->info.nodes[0];
  const Generated before = Generate(c->target());
  ASSERT_TRUE(before.status.ok()) << before.status.error_message();
  ASSERT_EQ(before.tokens.size(), 32u);

  // A sequence of our own on node-0, durable in its data dir.
  auto channel = [](const std::string& a) {
    return grpc::CreateChannel(a, grpc::InsecureChannelCredentials());
  };
  v1::CreateSequenceRequest create;
  v1::SequenceSpec* spec = create.mutable_spec();
  spec->set_sequence_id(0x5eed0001);
  spec->set_n_layers(1);
  spec->set_n_heads(2);
  spec->set_n_kv_heads(1);
  spec->set_head_dim(8);
  spec->set_value_dtype(v1::DTYPE_F32);
  spec->set_index_type(v1::INDEX_TYPE_FLAT);
  auto call = [](auto&& rpc) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    return rpc(&ctx);
  };
  {
    auto stub = v1::RetrievalNode::NewStub(channel(node.grpc));
    v1::CreateSequenceResponse r;
    const grpc::Status st = call([&](grpc::ClientContext* ctx) {
      return stub->CreateSequence(ctx, create, &r);
    });
    ASSERT_TRUE(st.ok()) << st.error_message();
  }

  ASSERT_EQ(kill(node.pid, SIGKILL), 0);
  const absl::Time killed = absl::Now();
  ASSERT_TRUE(c->WaitForInfo(
      [&](const cluster::ClusterInfo& i) {
        return i.nodes.size() == 2 && i.nodes[0].pid != node.pid && i.nodes[0].restarts == 1;
      },
      absl::Seconds(20)))
      << cluster::ClusterInfoToJson(c->info);
  EXPECT_TRUE(c->proc->running()) << "kvr cluster must keep going";
  EXPECT_TRUE(ProcessGone(node.pid));
  EXPECT_EQ(c->info.nodes[0].grpc, node.grpc);
  EXPECT_EQ(c->info.nodes[0].metrics, node.metrics);
  EXPECT_EQ(c->info.nodes[1].restarts, 0);
  // Back on its old address within a few seconds (first restart: 100 ms).
  ASSERT_TRUE(ServingWithin(node.grpc, absl::Seconds(15)));
  const absl::Duration back = absl::Now() - killed;
  EXPECT_LT(back, absl::Seconds(10));
  std::fprintf(stderr, "cluster_ops_e2e_test: node-0 SERVING again %.2f s after SIGKILL\n",
               absl::ToDoubleSeconds(back));

  // Its data dir was reused: the sequence is still there.
  {
    auto stub = v1::RetrievalNode::NewStub(channel(node.grpc));
    v1::StatsResponse stats;
    const grpc::Status st = call([&](grpc::ClientContext* ctx) {
      return stub->Stats(ctx, v1::StatsRequest(), &stats);
    });
    ASSERT_TRUE(st.ok()) << st.error_message();
    EXPECT_EQ(stats.sequences(), 1);
    v1::CreateSequenceResponse r;
    const grpc::Status again = call([&](grpc::ClientContext* ctx) {
      return stub->CreateSequence(ctx, create, &r);
    });
    EXPECT_EQ(again.error_code(), grpc::StatusCode::ALREADY_EXISTS) << again.error_message();
  }

  // The log holds both runs, with the supervisor's lines between them.
  const std::string log = ReadFile(c->run_dir + "/node-0.log");
  EXPECT_EQ(Count(log, "kvr_node listening on " + node.grpc), 2u) << log;
  EXPECT_NE(log.find("kvr cluster: node-0 (pid " + std::to_string(node.pid) +
                     ") was killed by signal 9"),
            std::string::npos)
      << log;
  EXPECT_NE(log.find("kvr cluster: restarting node-0 (restart 1): "), std::string::npos) << log;

  // The worker reaches the node again: the same tokens as before the kill.
  const Generated after = GenerateWithin(c->target(), absl::Seconds(30));
  ASSERT_TRUE(after.status.ok()) << after.status.error_message();
  EXPECT_EQ(after.tokens, before.tokens);
  std::fprintf(stderr, "cluster_ops_e2e_test: a Generate through the gateway succeeded again "
               "%.2f s after node-0's SIGKILL\n", absl::ToDoubleSeconds(absl::Now() - killed));

  std::vector<pid_t> pids = c->ChildPids();
  pids.push_back(node.pid);
  ExpectCleanStop(c.get(), pids);
  const std::string out = c->proc->Output();
  EXPECT_NE(out.find("restarted node-0 (pid " + std::to_string(node.pid) + " -> " +
                     std::to_string(c->info.nodes[0].pid) + ", restart 1)"),
            std::string::npos)
      << out;
}

// Kills the current worker and waits for kvr cluster to notice (its
// "was killed" line on the merged output).
void KillWorker(ClusterProcess* c) {
  const pid_t pid = c->info.worker_pid;
  ASSERT_EQ(kill(pid, SIGKILL), 0);
  const auto line = c->proc->WaitForLine(
      "kvr cluster: worker (pid " + std::to_string(pid) + ") was killed by signal 9",
      absl::Seconds(20));
  ASSERT_TRUE(line.ok()) << line.status() << "\n" << c->proc->Output();
}

TEST(ClusterOpsTest, GivesUpAfterMaxRestartsInARow) {
  std::unique_ptr<ClusterProcess> c = ClusterProcess::Start(
      g_kvr, {"--nodes", "1", "--gateway=false", "--max_restarts", "1"}, true);
  ASSERT_NE(c, nullptr);
  const pid_t first = c->info.worker_pid;
  const pid_t node = c->info.nodes.at(0).pid;
  ASSERT_NO_FATAL_FAILURE(KillWorker(c.get()));
  ASSERT_TRUE(c->WaitForInfo(
      [&](const cluster::ClusterInfo& i) {
        return i.worker_pid != first && i.workers.at(0).restarts == 1;
      },
      absl::Seconds(20)));
  const pid_t second = c->info.worker_pid;
  ASSERT_NO_FATAL_FAILURE(KillWorker(c.get()));  // the 2nd death in a row: given up
  const absl::StatusOr<int> st = c->proc->Stop(0, absl::Seconds(60));
  ASSERT_TRUE(st.ok()) << st.status();
  EXPECT_TRUE(WIFEXITED(*st) && WEXITSTATUS(*st) == 1) << "wait status " << *st;
  (void)c->proc->WaitForLine("\x01", absl::Seconds(5));  // read the rest of its output
  const std::string out = c->proc->Output();
  EXPECT_NE(out.find("worker (pid " + std::to_string(second) +
                     ") was killed by signal 9 (Killed) unexpectedly; restarted 1 times in a row "
                     "(--max_restarts 1)"),
            std::string::npos)
      << out;
  EXPECT_NE(out.find("kvr_worker listening on"), std::string::npos)
      << "the tail of the dead child's log should be printed:\n" << out;
  for (pid_t pid : {first, second, node}) EXPECT_TRUE(ProcessGone(pid)) << pid;
}

TEST(ClusterOpsTest, MaxRestartsZeroStopsEverything) {
  std::unique_ptr<ClusterProcess> c = ClusterProcess::Start(
      g_kvr, {"--nodes", "1", "--gateway=false", "--max_restarts", "0"}, true);
  ASSERT_NE(c, nullptr);
  const std::vector<pid_t> pids = c->ChildPids();
  const pid_t worker = c->info.worker_pid;
  ASSERT_EQ(kill(worker, SIGKILL), 0);
  const absl::StatusOr<int> st = c->proc->Stop(0, absl::Seconds(60));
  ASSERT_TRUE(st.ok()) << st.status();
  EXPECT_TRUE(WIFEXITED(*st) && WEXITSTATUS(*st) == 1) << "wait status " << *st;
  (void)c->proc->WaitForLine("\x01", absl::Seconds(5));
  const std::string out = c->proc->Output();
  EXPECT_NE(out.find("worker (pid " + std::to_string(worker) +
                     ") was killed by signal 9 (Killed) unexpectedly; --max_restarts 0"),
            std::string::npos)
      << out;
  EXPECT_EQ(out.find("restarted worker"), std::string::npos) << out;
  for (pid_t pid : pids) EXPECT_TRUE(ProcessGone(pid)) << "pid " << pid << " survived";
}

TEST(ClusterOpsTest, CrashLoopBacksOffAndSigtermStillStopsCleanly) {
  std::unique_ptr<ClusterProcess> c =
      ClusterProcess::Start(g_kvr, {"--nodes", "1", "--gateway=false"}, true);
  ASSERT_NE(c, nullptr);
  const pid_t first = c->info.nodes.at(0).pid;
  // A file where node-0's data dir was: every restart of it fails at once.
  const std::string data_dir = c->run_dir + "/node-0";
  std::error_code ec;
  std::filesystem::remove_all(data_dir, ec);
  ASSERT_FALSE(ec) << ec.message();
  std::ofstream(data_dir) << "not a directory\n";
  ASSERT_EQ(kill(first, SIGKILL), 0);
  // Restarts in a row wait 100 ms, 200 ms, 400 ms, ...
  for (const char* delay : {"restart 1 in 100ms", "restart 2 in 200ms", "restart 3 in 400ms"}) {
    const absl::Time deadline = absl::Now() + absl::Seconds(30);
    while (c->proc->Output().find(delay) == std::string::npos && absl::Now() < deadline) {
      // No line starts with "\x01": reads what arrives for 100 ms.
      (void)c->proc->WaitForLine("\x01", absl::Milliseconds(100));
    }
    ASSERT_NE(c->proc->Output().find(delay), std::string::npos) << c->proc->Output();
  }
  EXPECT_TRUE(c->proc->running()) << "3 of --max_restarts 10: still going";
  // SIGTERM in the middle of the crash loop: exit 0, nothing left.
  ASSERT_TRUE(c->Reload());
  std::vector<pid_t> pids = c->ChildPids();
  pids.push_back(first);
  ExpectCleanStop(c.get(), pids);
  // Its log has each death with its delay and each restart's command line.
  const std::string log = ReadFile(c->run_dir + "/node-0.log");
  EXPECT_NE(log.find("restart 3 in 400ms"), std::string::npos) << log;
  EXPECT_GE(Count(log, "kvr cluster: restarting node-0"), 2u) << log;
}

TEST(ClusterOpsTest, TwoWorkersBehindTheGateway) {
  std::unique_ptr<ClusterProcess> c =
      ClusterProcess::Start(g_kvr, {"--nodes", "2", "--workers", "2"}, true);
  ASSERT_NE(c, nullptr);
  const cluster::ClusterInfo& info = c->info;
  ASSERT_EQ(info.workers.size(), 2u);
  EXPECT_NE(info.workers[0].grpc, info.workers[1].grpc);
  EXPECT_NE(info.workers[0].pid, info.workers[1].pid);
  EXPECT_EQ(info.worker_grpc, info.workers[0].grpc);
  EXPECT_EQ(info.worker_pid, info.workers[0].pid);
  for (const char* log : {"/worker-0.log", "/worker-1.log"}) {
    EXPECT_NE(ReadFile(c->run_dir + log).find("kvr_worker listening on"), std::string::npos)
        << log;
  }
  // --replicas: 2 (2 nodes) when kvr_worker takes the flag, else left out.
  const absl::StatusOr<bool> takes = cluster::ProgramAcceptsFlag(g_worker, "replicas");
  ASSERT_TRUE(takes.ok()) << takes.status();
  EXPECT_EQ(info.replicas, *takes ? 2 : 0);
  for (const cluster::ClusterInfo::Process& w : info.workers) {
    const std::string cmdline = ReadFile("/proc/" + std::to_string(w.pid) + "/cmdline");
    EXPECT_EQ(cmdline.find("--replicas=2") != std::string::npos, *takes) << w.grpc;
  }

  // Both healthy in the gateway (its health checks run every 2 s).
  double healthy = 0;
  const absl::Time deadline = absl::Now() + absl::Seconds(20);
  do {
    if (auto page = test_support::HttpGetMetrics(info.gateway_metrics)) {
      healthy = test_support::Get(test_support::ParseExposition(*page), "kvr_gateway_workers",
                                  {{"state", "healthy"}});
      if (healthy == 2) break;
    }
    absl::SleepFor(absl::Milliseconds(100));
  } while (absl::Now() < deadline);
  EXPECT_EQ(healthy, 2);

  // Each worker serves, and 4 concurrent requests through the gateway give
  // the same greedy tokens.
  const Generated w0 = Generate(info.workers[0].grpc);
  const Generated w1 = Generate(info.workers[1].grpc);
  ASSERT_TRUE(w0.status.ok()) << w0.status.error_message();
  ASSERT_TRUE(w1.status.ok()) << w1.status.error_message();
  EXPECT_EQ(w0.tokens, w1.tokens);
  std::vector<Generated> got(4);
  std::vector<std::thread> threads;
  for (Generated& g : got) threads.emplace_back([&] { g = Generate(info.gateway_grpc); });
  for (std::thread& t : threads) t.join();
  for (const Generated& g : got) {
    ASSERT_TRUE(g.status.ok()) << g.status.error_message();
    EXPECT_EQ(g.tokens, w0.tokens);
  }
  ExpectCleanStop(c.get(), c->ChildPids());
}

TEST(ClusterOpsTest, ReplicasFlagIsChecked) {
  auto run = [](const std::vector<std::string>& flags) {
    test_support::TempDir dir("kvr_cluster_flags");
    std::vector<std::string> argv = {g_kvr, "cluster", "--run_dir", dir.path()};
    argv.insert(argv.end(), flags.begin(), flags.end());
    return RunToEnd(argv, /*merge_stderr=*/true);
  };
  const auto [st, out] = run({"--nodes", "2", "--replicas", "3"});
  EXPECT_TRUE(WIFEXITED(st) && WEXITSTATUS(st) == 1) << st;
  EXPECT_NE(out.find("--replicas: 3 outside [1, --nodes 2]"), std::string::npos) << out;
  const absl::StatusOr<bool> takes = cluster::ProgramAcceptsFlag(g_worker, "replicas");
  ASSERT_TRUE(takes.ok()) << takes.status();
  if (*takes) GTEST_SKIP() << "kvr_worker takes --replicas: an explicit value is passed";
  const auto [st2, out2] = run({"--nodes", "2", "--replicas", "2"});
  EXPECT_TRUE(WIFEXITED(st2) && WEXITSTATUS(st2) == 1) << st2;
  EXPECT_NE(out2.find("has no --replicas flag"), std::string::npos) << out2;
}

// A 127.0.0.1 port bound but not listening while the object lives:
// connections to it are refused.
class RefusedPort {
 public:
  RefusedPort() {
    fd_ = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof(addr);
    if (fd_ < 0 || bind(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
        getsockname(fd_, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
      ADD_FAILURE() << "could not bind a port";
      return;
    }
    address_ = "127.0.0.1:" + std::to_string(ntohs(addr.sin_port));
  }
  ~RefusedPort() {
    if (fd_ >= 0) close(fd_);
  }
  const std::string& address() const { return address_; }

 private:
  int fd_ = -1;
  std::string address_;
};

TEST(LoadgenTest, BacksOffAndCountsErrorsByCodeWhenNothingListens) {
  RefusedPort port;
  ASSERT_FALSE(port.address().empty());
  auto loadgen = [&](const std::vector<std::string>& extra) {
    std::vector<std::string> argv = {g_loadgen,           "--target",  port.address(),
                                     "--warmup_requests", "0",         "--duration_seconds",
                                     "2",                 "--max_tokens", "8"};
    argv.insert(argv.end(), extra.begin(), extra.end());
    return RunToEnd(argv, /*merge_stderr=*/false);
  };

  const absl::Time start = absl::Now();
  const auto [st, out] = loadgen({"--concurrency", "4", "--json"});
  const absl::Duration took = absl::Now() - start;
  EXPECT_TRUE(WIFEXITED(st) && WEXITSTATUS(st) == 1) << "failed requests make it exit 1: " << st;
  EXPECT_LT(took, absl::Seconds(10));
  const nlohmann::json j = nlohmann::json::parse(out, nullptr, false);
  ASSERT_FALSE(j.is_discarded()) << out;
  ASSERT_EQ(j["levels"].size(), 1u) << out;
  const nlohmann::json& level = j["levels"][0];
  const int64_t requests = level.value("requests", int64_t{-1});
  std::fprintf(stderr, "cluster_ops_e2e_test: kvr_loadgen, 4 streams, 2 s, refused port: %lld "
                       "attempts\n", static_cast<long long>(requests));
  // 4 streams x 2 s: 50 ms doubling to 2 s, jittered to [d/2, d], is at
  // most ~8 attempts per stream (a hot loop made tens of thousands).
  EXPECT_GE(requests, 4);
  EXPECT_LT(requests, 100);
  EXPECT_EQ(level.value("errors", int64_t{-1}), requests);
  EXPECT_EQ(level.value("succeeded", int64_t{-1}), 0);
  ASSERT_TRUE(level.contains("errors_by_code")) << out;
  EXPECT_EQ(level["errors_by_code"].size(), 1u) << out;
  EXPECT_EQ(level["errors_by_code"].value("UNAVAILABLE", int64_t{-1}), requests) << out;
  // Failed calls are not latency samples.
  EXPECT_EQ(level["end_to_end_seconds"].value("p99", -1.0), 0.0) << out;
  EXPECT_EQ(level["ttft_seconds"].value("p99", -1.0), 0.0) << out;
  EXPECT_EQ(level.value("output_tokens", int64_t{-1}), 0);

  // The table names the code too.
  const auto [st2, table] = loadgen({"--concurrency", "1", "--duration_seconds", "1"});
  EXPECT_TRUE(WIFEXITED(st2) && WEXITSTATUS(st2) == 1) << st2;
  EXPECT_NE(table.find("concurrency 1 errors by code: UNAVAILABLE "), std::string::npos) << table;
}

}  // namespace
}  // namespace kvr

int main(int argc, char** argv) {
  GOOGLE_PROTOBUF_VERIFY_VERSION;  // libprotobuf before libsentencepiece (PROTOBUF_FIRST)
  ::testing::InitGoogleTest(&argc, argv);
  for (int i = 1; i + 1 < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--kvr") kvr::g_kvr = argv[++i];
    else if (a == "--kvr_loadgen") kvr::g_loadgen = argv[++i];
    else if (a == "--kvr_worker") kvr::g_worker = argv[++i];
  }
  if (kvr::g_kvr.empty() || kvr::g_loadgen.empty() || kvr::g_worker.empty()) {
    std::fprintf(stderr, "usage: %s --kvr PATH --kvr_loadgen PATH --kvr_worker PATH\n", argv[0]);
    return 2;
  }
  signal(SIGPIPE, SIG_IGN);
  return RUN_ALL_TESTS();
}
