// Replication and failover with real kvr_node processes on loopback: three
// nodes (each with its --data_dir), the worker's client from
// MakeRetrievalClient with --replicas 2 (MultiNodeClient + health watches).
//
//   FailoverLivenessTest  — a node killed with SIGKILL is reported down
//     within 1 s, a SIGSTOPped (hung) one within 1.5 s (keepalive), and a
//     node restarted on its port is live again within 1.5 s of serving;
//     new sequences avoid a down node; a kvr_worker's /metrics shows the
//     nodes up and the replication families.
//   FailoverReplicasTest  — needs the node side of the replica contract
//     (AttendRequest::shards honoured, SyncShards): Attend with R = 2 equals
//     the single-node reference; after kill -9 of a node, Appends and
//     Attends succeed with unchanged results; the node restarted with its
//     data dir is synced, in sync again, and serves identical results.
#include <signal.h>

#include <chrono>
#include <cstdio>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "gtest/gtest.h"
#include "retrieval_node/client/client_factory.h"
#include "retrieval_node/client/in_process_client.h"
#include "retrieval_node/client/multi_node_client.h"
#include "tests/support/metrics_page.h"
#include "tests/support/replica_workload.h"
#include "tests/support/server_process.h"
#include "tests/support/temp_dir.h"

namespace kvr::retrieval {
namespace {

using namespace test_support::replica_workload;  // NOLINT(build/namespaces): test workload
using test_support::NodeProcess;
using test_support::TempDir;
using Clock = std::chrono::steady_clock;

std::string g_worker_binary;  // --kvr_worker

double SecondsSince(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

// Polls `cond` every 2 ms until it holds or `limit` passed; whether it held.
template <typename F>
bool PollFor(F cond, std::chrono::milliseconds limit) {
  const auto give_up = Clock::now() + limit;
  while (Clock::now() < give_up) {
    if (cond()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(2));  // polling, not synchronisation
  }
  return cond();
}

class FailoverTest : public ::testing::Test {
 protected:
  static constexpr int kNodes = 3;

  void SetUp() override {
    for (int i = 0; i < kNodes; ++i) {
      dirs_.push_back(std::make_unique<TempDir>("kvr_failover"));
      ASSERT_FALSE(dirs_.back()->path().empty());
      // Synchronous builds, as the in-process reference's.
      nodes_.push_back(
          NodeProcess::Start({"--data_dir=" + dirs_.back()->path(), "--defer_index_build=false"}));
      ASSERT_TRUE(nodes_.back() != nullptr && nodes_.back()->listening());
      addresses_.push_back(nodes_.back()->address());
    }
    RetrievalClientOptions o;
    o.replicas = 2;
    auto c = MakeRetrievalClient(absl::StrJoin(addresses_, ","), o);
    ASSERT_TRUE(c.ok()) << c.status();
    client_ = *std::move(c);
    multi_ = dynamic_cast<MultiNodeClient*>(client_.get());
    ASSERT_NE(multi_, nullptr);
    ASSERT_EQ(multi_->replicas(), 2);
  }

  void TearDown() override {
    client_.reset();  // before the nodes: its watches and sync thread stop first
    nodes_.clear();   // each destructor SIGKILLs a node still running
  }

  void Kill(int i) {
    const std::optional<int> st = nodes_[static_cast<size_t>(i)]->Stop(SIGKILL);
    ASSERT_TRUE(st.has_value() && WIFSIGNALED(*st) && WTERMSIG(*st) == SIGKILL);
  }

  // Restarts node i on its old port with its data dir.
  void Restart(int i) {
    const size_t n = static_cast<size_t>(i);
    nodes_[n] = NodeProcess::Start(
        {"--data_dir=" + dirs_[n]->path(), "--listen=" + addresses_[n],
         "--defer_index_build=false"});
    ASSERT_TRUE(nodes_[n] != nullptr && nodes_[n]->listening());
    ASSERT_EQ(nodes_[n]->address(), addresses_[n]);
  }

  std::vector<std::unique_ptr<TempDir>> dirs_;
  std::vector<std::unique_ptr<NodeProcess>> nodes_;
  std::vector<std::string> addresses_;
  std::unique_ptr<RetrievalClient> client_;
  MultiNodeClient* multi_ = nullptr;
};

class FailoverLivenessTest : public FailoverTest {};
class FailoverReplicasTest : public FailoverTest {};

TEST_F(FailoverLivenessTest, KilledNodeDownWithinOneSecondAndBackAfterRestart) {
  for (const std::string& a : addresses_) ASSERT_TRUE(multi_->IsLive(a)) << a;
  const auto killed = Clock::now();
  Kill(1);
  ASSERT_TRUE(PollFor([&] { return !multi_->IsLive(addresses_[1]); }, std::chrono::seconds(3)));
  const double down_after = SecondsSince(killed);
  EXPECT_LE(down_after, 1.0) << "kill -9 noticed after " << down_after << " s";
  EXPECT_TRUE(multi_->IsLive(addresses_[0]));
  ReplicationStats st;
  ASSERT_TRUE(multi_->GetReplicationStats(&st));
  EXPECT_EQ(st.nodes_up, kNodes - 1);

  Restart(1);
  const auto serving = Clock::now();
  ASSERT_TRUE(PollFor([&] { return multi_->IsLive(addresses_[1]); }, std::chrono::seconds(5)));
  const double up_after = SecondsSince(serving);
  EXPECT_LE(up_after, 1.5) << "restart noticed after " << up_after << " s";
  std::fprintf(stderr, "failover: down after %.3f s, up %.3f s after serving\n", down_after,
               up_after);
}

TEST_F(FailoverLivenessTest, HungNodeDownWithinKeepalive) {
  const pid_t pid = nodes_[2]->pid();
  const auto stopped = Clock::now();
  ASSERT_TRUE(test_support::StopProcess(pid));
  ASSERT_TRUE(PollFor([&] { return !multi_->IsLive(addresses_[2]); }, std::chrono::seconds(5)));
  const double down_after = SecondsSince(stopped);
  // Keepalive: a ping every 0.5 s, dead after 0.5 s without its ack.
  EXPECT_LE(down_after, 1.5) << "SIGSTOP noticed after " << down_after << " s";
  ASSERT_EQ(kill(pid, SIGCONT), 0);
  ASSERT_TRUE(PollFor([&] { return multi_->IsLive(addresses_[2]); }, std::chrono::seconds(5)));
  std::fprintf(stderr, "failover: hung node down after %.3f s\n", down_after);
}

// A sequence placed while a node is down goes to the live two only, and
// is under-replicated only if fewer than R nodes were live.
TEST_F(FailoverLivenessTest, NewSequencesAvoidDownNodes) {
  Kill(0);
  ASSERT_TRUE(PollFor([&] { return !multi_->IsLive(addresses_[0]); }, std::chrono::seconds(3)));
  ASSERT_TRUE(client_->CreateSequence(Spec(11)).ok());
  ASSERT_TRUE(Fill(*client_, 11).ok());
  ASSERT_TRUE(AppendAll(*client_, 11, kAppendStart, 3).ok());
  EXPECT_FALSE(multi_->InSync(11, addresses_[0]));  // not in its view at all
  EXPECT_TRUE(multi_->InSync(11, addresses_[1]));
  EXPECT_TRUE(multi_->InSync(11, addresses_[2]));
  ReplicationStats st;
  ASSERT_TRUE(multi_->GetReplicationStats(&st));
  EXPECT_EQ(st.under_replicated_shards, 0);  // two live nodes: R = 2 holds
  EXPECT_TRUE(client_->DropSequence(11).ok());
}

// A kvr_worker on the three nodes reports them on /metrics: all up, no
// under-replicated shard, the failover and sync families present; after
// kill -9 of one node, nodes_up drops to 2 within 2 s.
TEST_F(FailoverLivenessTest, WorkerMetricsShowNodesUp) {
  auto worker = test_support::ServerProcess::Start(
      g_worker_binary, "kvr_worker",
      {"--nodes=" + absl::StrJoin(addresses_, ","), "--replicas=2"});
  ASSERT_TRUE(worker != nullptr && worker->listening());
  ASSERT_FALSE(worker->metrics_address().empty());
  auto scrape = [&] {
    std::optional<std::string> page = test_support::HttpGetMetrics(worker->metrics_address());
    EXPECT_TRUE(page.has_value());
    return test_support::ParseExposition(page.value_or(""));
  };
  test_support::Samples m = scrape();
  EXPECT_EQ(test_support::Get(m, "kvr_worker_retrieval_nodes_up"), 3.0);
  EXPECT_TRUE(test_support::Has(m, "kvr_worker_under_replicated_shards"));
  EXPECT_EQ(test_support::Get(m, "kvr_worker_under_replicated_shards"), 0.0);
  for (const char* reason : {"unavailable", "deadline", "down"}) {
    EXPECT_TRUE(test_support::Has(m, "kvr_worker_attend_failovers_total", {{"reason", reason}}))
        << reason;
  }
  for (const char* result : {"started", "succeeded", "failed"}) {
    EXPECT_TRUE(test_support::Has(m, "kvr_worker_replica_syncs_total", {{"result", result}}))
        << result;
  }
  EXPECT_TRUE(test_support::Has(m, "kvr_worker_replica_keys_synced_total"));

  const auto killed = Clock::now();
  Kill(2);
  ASSERT_TRUE(PollFor(
      [&] { return test_support::Get(scrape(), "kvr_worker_retrieval_nodes_up") == 2.0; },
      std::chrono::seconds(5)));
  EXPECT_LE(SecondsSince(killed), 2.0);
  worker->Stop();
}

// The single-node reference: the same writes into one in-process node.
Partials Reference(int layer, int appended_rows) {
  auto one = InProcessRetrievalClient::Create();
  KVR_CHECK(one.ok());
  KVR_CHECK((*one)->CreateSequence(Spec(1)).ok());
  KVR_CHECK(Fill(**one, 1).ok());
  for (int r = 0; r < appended_rows; ++r) {
    KVR_CHECK(AppendAll(**one, 1, kAppendStart + r, 1).ok());
  }
  auto p = AttendLayer(**one, 1, layer);
  KVR_CHECK(p.ok());
  return *std::move(p);
}

void ExpectMatchesReference(RetrievalClient& client, int appended_rows, const char* what) {
  for (int layer = 0; layer < kLayers; ++layer) {
    auto got = AttendLayer(client, 1, layer);
    ASSERT_TRUE(got.ok()) << what << ": " << got.status();
    ExpectSamePartials(*got, Reference(layer, appended_rows), what);
  }
}

// [needs node side: shards] Every shard attended exactly once over R = 2.
TEST_F(FailoverReplicasTest, ReplicatedAttendEqualsSingleNode) {
  ASSERT_TRUE(client_->CreateSequence(Spec(1)).ok());
  ASSERT_TRUE(Fill(*client_, 1).ok());
  for (int r = 0; r < 5; ++r) ASSERT_TRUE(AppendAll(*client_, 1, kAppendStart + r, 1).ok());
  ExpectMatchesReference(*client_, 5, "R = 2, all up");
}

// [needs node side: shards, SyncShards] kill -9, keep going, restart,
// rejoin, serve again.
TEST_F(FailoverReplicasTest, KillRestartRejoinKeepsResults) {
  ASSERT_TRUE(client_->CreateSequence(Spec(1)).ok());
  ASSERT_TRUE(Fill(*client_, 1).ok());
  int appended = 0;
  for (; appended < 3; ++appended) {
    ASSERT_TRUE(AppendAll(*client_, 1, kAppendStart + appended, 1).ok());
  }
  Kill(0);
  // At once (before the watch noticed) and after: no error, same results.
  for (int i = 0; i < 3; ++i, ++appended) {
    ASSERT_TRUE(AppendAll(*client_, 1, kAppendStart + appended, 1).ok()) << "append " << i;
    ExpectMatchesReference(*client_, appended + 1, "node 0 killed");
  }
  EXPECT_FALSE(multi_->InSync(1, addresses_[0]));
  ReplicationStats st;
  ASSERT_TRUE(multi_->GetReplicationStats(&st));
  EXPECT_GT(st.under_replicated_shards, 0);

  Restart(0);
  ASSERT_TRUE(PollFor([&] { return multi_->InSync(1, addresses_[0]); }, std::chrono::seconds(10)))
      << "node 0 never back in sync";
  ASSERT_TRUE(multi_->GetReplicationStats(&st));
  EXPECT_GE(st.syncs_succeeded, 1);
  EXPECT_EQ(st.under_replicated_shards, 0);
  ASSERT_TRUE(AppendAll(*client_, 1, kAppendStart + appended, 1).ok());
  ++appended;
  // Node 0 must now answer for its shards: take another owner away.
  Kill(1);
  ASSERT_TRUE(PollFor([&] { return !multi_->IsLive(addresses_[1]); }, std::chrono::seconds(3)));
  ExpectMatchesReference(*client_, appended, "node 0 rejoined, node 1 killed");
}

}  // namespace
}  // namespace kvr::retrieval

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  if (!kvr::test_support::ParseNodeBinaryFlag(argc, argv)) return 2;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--kvr_worker" && i + 1 < argc) {
      kvr::retrieval::g_worker_binary = argv[++i];
    } else if (a.rfind("--kvr_worker=", 0) == 0) {
      kvr::retrieval::g_worker_binary = a.substr(13);
    }
  }
  if (kvr::retrieval::g_worker_binary.empty()) {
    std::fprintf(stderr, "usage: %s --kvr_node PATH --kvr_worker PATH [gtest flags]\n", argv[0]);
    return 2;
  }
  signal(SIGPIPE, SIG_IGN);
  return RUN_ALL_TESTS();
}
