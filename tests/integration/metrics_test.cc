// Integration test of kvr_node's Prometheus endpoint: a real kvr_node on
// 127.0.0.1 with --metrics_listen=127.0.0.1:0 (both ports read from its
// stdout), driven through GrpcRetrievalClient with good and bad requests;
// /metrics is scraped over a plain loopback socket (HTTP/1.0 GET).
//
//  * kvr_node_requests_total{method,code} moves by exactly the calls made,
//    per method and code, and by nothing else; each method's
//    kvr_node_request_duration_seconds count moves with it;
//  * appended tokens, keys scanned, index builds and the holdings gauges
//    (sequences, shards, keys, memory used / budget) match what was done;
//  * `promtool check metrics` accepts the exposition (skipped, with a
//    message, when promtool is not installed: Debian package prometheus);
//  * --metrics_listen= (empty) serves no metrics; an address that cannot be
//    bound stops the node before it listens.
//
// Usage: metrics_test --kvr_node PATH [gtest flags]
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "tests/support/metrics_page.h"
#include "tests/support/server_process.h"
#include "tests/support/test_data.h"
#include "common/attention.h"
#include "common/tensor.h"
#include "gtest/gtest.h"
#include "retrieval_node/client/grpc_retrieval_client.h"

namespace kvr::retrieval {
namespace {

constexpr int64_t kBudgetBytes = int64_t{1} << 30;

using kvr::test_support::NodeProcess;
using kvr::test_support::RandomMatrix;

using kvr::test_support::ExpectPromtoolAccepts;
using kvr::test_support::FindOnPath;
using kvr::test_support::Get;
using kvr::test_support::Has;
using kvr::test_support::HttpGetMetrics;
using kvr::test_support::ParseExposition;
using kvr::test_support::Samples;
using kvr::test_support::SeriesKey;

// --- data ----------------------------------------------------------------------------

constexpr int kHeads = 4, kKvHeads = 2, kDim = 16;
constexpr size_t kShardKeys = 64;
SequenceSpec Spec(uint64_t id) {
  SequenceSpec spec;
  spec.sequence_id = id;
  spec.n_layers = 1;
  spec.n_heads = kHeads;
  spec.n_kv_heads = kKvHeads;
  spec.head_dim = kDim;
  spec.index_type = IndexType::kFlat;  // flat: keys scanned are exact (every key held)
  return spec;
}

absl::Status Attend(GrpcRetrievalClient& client, uint64_t sequence, int k) {
  const Matrix q = RandomMatrix(kHeads, kDim, 99);
  Partials out(kHeads, kDim);
  AttendRequest a;
  a.sequence_id = sequence;
  a.layer = 0;
  a.queries = q.view();
  a.k = k;
  return client.Attend(a, out.view());
}

// (method, code) → calls made.
using Expected = std::map<std::pair<std::string, std::string>, int>;

// Makes good and bad calls on a fresh node; `expected` gets what each should
// count. Leaves sequence 1 with two uploaded shards of kShardKeys keys and
// `appended` tokens in kv head 0's tail.
void DriveTraffic(GrpcRetrievalClient& client, Expected* expected, int64_t* appended) {
  Expected& e = *expected;
  const uint64_t seq = 1, unknown = 777;
  // CreateSequence: OK, ALREADY_EXISTS, INVALID_ARGUMENT (n_heads % n_kv_heads != 0).
  EXPECT_TRUE(client.CreateSequence(Spec(seq)).ok());
  EXPECT_EQ(client.CreateSequence(Spec(seq)).code(), absl::StatusCode::kAlreadyExists);
  SequenceSpec bad = Spec(2);
  bad.n_heads = 3;
  EXPECT_EQ(client.CreateSequence(bad).code(), absl::StatusCode::kInvalidArgument);
  e[{"CreateSequence", "OK"}] += 1;
  e[{"CreateSequence", "ALREADY_EXISTS"}] += 1;
  e[{"CreateSequence", "INVALID_ARGUMENT"}] += 1;

  // UploadShard: two OK (kv heads 0 and 1), one NOT_FOUND (unknown sequence).
  for (int32_t h = 0; h < kKvHeads; ++h) {
    const Matrix keys = RandomMatrix(kShardKeys, kDim, 10 + h);
    const Matrix values = RandomMatrix(kShardKeys, kDim, 20 + h);
    ShardUpload u;
    u.key = {seq, 0, h, 0};
    u.first_position = 0;
    u.keys = keys.view();
    u.values = values.view();
    const absl::Status st = client.UploadShard(u);
    EXPECT_TRUE(st.ok()) << st;
  }
  {
    const Matrix keys = RandomMatrix(kShardKeys, kDim, 30);
    ShardUpload u;
    u.key = {unknown, 0, 0, 0};
    u.keys = keys.view();
    u.values = keys.view();
    EXPECT_EQ(client.UploadShard(u).code(), absl::StatusCode::kNotFound);
  }
  e[{"UploadShard", "OK"}] += 2;
  e[{"UploadShard", "NOT_FOUND"}] += 1;

  // Append: OK (3 tokens), NOT_FOUND, INVALID_ARGUMENT (positions already held).
  const Matrix tokens = RandomMatrix(3, kDim, 40);
  AppendRequest a;
  a.sequence_id = seq;
  a.layer = 0;
  a.kv_head = 0;
  a.first_position = static_cast<int64_t>(kShardKeys);
  a.keys = tokens.view();
  a.values = tokens.view();
  EXPECT_TRUE(client.Append(a).ok());
  *appended = 3;
  a.sequence_id = unknown;
  EXPECT_EQ(client.Append(a).code(), absl::StatusCode::kNotFound);
  a.sequence_id = seq;
  a.first_position = 0;
  EXPECT_EQ(client.Append(a).code(), absl::StatusCode::kInvalidArgument);
  e[{"Append", "OK"}] += 1;
  e[{"Append", "NOT_FOUND"}] += 1;
  e[{"Append", "INVALID_ARGUMENT"}] += 1;

  // Attend: 3 OK, 2 NOT_FOUND, 1 INVALID_ARGUMENT (k = 0).
  for (int i = 0; i < 3; ++i) EXPECT_TRUE(Attend(client, seq, 8).ok());
  for (int i = 0; i < 2; ++i) EXPECT_EQ(Attend(client, unknown, 8).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(Attend(client, seq, 0).code(), absl::StatusCode::kInvalidArgument);
  e[{"Attend", "OK"}] += 3;
  e[{"Attend", "NOT_FOUND"}] += 2;
  e[{"Attend", "INVALID_ARGUMENT"}] += 1;

  // Admin.
  EXPECT_TRUE(client.ListShards(seq).ok());
  EXPECT_EQ(client.ListShards(unknown).status().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(client.Stats().ok());
  EXPECT_EQ(client.DropSequence(unknown).code(), absl::StatusCode::kNotFound);
  e[{"ListShards", "OK"}] += 1;
  e[{"ListShards", "NOT_FOUND"}] += 1;
  e[{"Stats", "OK"}] += 1;
  e[{"DropSequence", "NOT_FOUND"}] += 1;
}

const std::vector<std::string> kMethods = {"CreateSequence", "UploadShard", "Append", "Attend",
                                           "DropSequence",   "ListShards",  "Stats"};

// Every kvr_node_requests_total series moved by exactly `expected`, and each
// method's duration histogram count by the method's total.
void ExpectRequestDeltas(const Samples& before, const Samples& after, const Expected& expected) {
  std::set<std::string> checked;
  for (const auto& [mc, calls] : expected) {
    const std::map<std::string, std::string> labels = {{"method", mc.first}, {"code", mc.second}};
    EXPECT_EQ(Get(after, "kvr_node_requests_total", labels) -
                  Get(before, "kvr_node_requests_total", labels),
              calls)
        << mc.first << " " << mc.second;
    checked.insert(SeriesKey("kvr_node_requests_total", labels));
  }
  for (const auto& [key, value] : after) {
    if (key.rfind("kvr_node_requests_total{", 0) != 0 || checked.count(key)) continue;
    const auto it = before.find(key);
    EXPECT_EQ(value - (it == before.end() ? 0.0 : it->second), 0.0)
        << key << " moved, but no such call was made";
  }
  for (const std::string& m : kMethods) {
    int total = 0;
    for (const auto& [mc, calls] : expected) total += mc.first == m ? calls : 0;
    const std::map<std::string, std::string> labels = {{"method", m}};
    EXPECT_EQ(Get(after, "kvr_node_request_duration_seconds_count", labels) -
                  Get(before, "kvr_node_request_duration_seconds_count", labels),
              total)
        << m;
    std::map<std::string, std::string> inf = labels;
    inf["le"] = "+Inf";
    EXPECT_EQ(Get(after, "kvr_node_request_duration_seconds_bucket", inf),
              Get(after, "kvr_node_request_duration_seconds_count", labels))
        << m;
  }
}

std::unique_ptr<GrpcRetrievalClient> Connect(const NodeProcess& node) {
  absl::StatusOr<std::unique_ptr<GrpcRetrievalClient>> client =
      GrpcRetrievalClient::Create(node.address());
  if (!client.ok()) {
    ADD_FAILURE() << client.status();
    return nullptr;
  }
  const absl::Status ready = (*client)->WaitForReady(absl::Seconds(10));
  if (!ready.ok()) {
    ADD_FAILURE() << ready;
    return nullptr;
  }
  return *std::move(client);
}

std::vector<std::string> NodeArgs() {
  return {"--metrics_listen=127.0.0.1:0", "--threads=2",
          "--memory_budget_bytes=" + std::to_string(kBudgetBytes)};
}

TEST(NodeMetrics, CountersMoveByTheCallsMade) {
  std::unique_ptr<NodeProcess> node = NodeProcess::Start(NodeArgs());
  ASSERT_TRUE(node != nullptr && node->listening());
  ASSERT_FALSE(node->metrics_address().empty()) << "no 'kvr_node metrics on' line";
  std::unique_ptr<GrpcRetrievalClient> client = Connect(*node);
  ASSERT_NE(client, nullptr);

  const std::optional<std::string> text0 = HttpGetMetrics(node->metrics_address());
  ASSERT_TRUE(text0.has_value());
  const Samples s0 = ParseExposition(*text0);
  for (const std::string& m : kMethods) {
    EXPECT_TRUE(Has(s0, "kvr_node_requests_total", {{"method", m}, {"code", "OK"}})) << m;
  }
  EXPECT_EQ(Get(s0, "kvr_node_shards"), 0);
  EXPECT_EQ(Get(s0, "kvr_node_memory_used_bytes"), 0);
  EXPECT_EQ(Get(s0, "kvr_node_memory_budget_bytes"), static_cast<double>(kBudgetBytes));

  Expected expected;
  int64_t appended = 0;
  DriveTraffic(*client, &expected, &appended);

  const std::optional<std::string> text1 = HttpGetMetrics(node->metrics_address());
  ASSERT_TRUE(text1.has_value());
  const Samples s1 = ParseExposition(*text1);
  ExpectRequestDeltas(s0, s1, expected);

  EXPECT_EQ(Get(s1, "kvr_node_appended_tokens_total") - Get(s0, "kvr_node_appended_tokens_total"),
            appended);
  // Keys scanned: one observation per successful Attend, of the keys each
  // query head scored. Flat shards and the flat tail score every key held:
  // the query heads of kv head 0 see kShardKeys + appended, those of kv head 1
  // kShardKeys.
  const int attends = expected[{"Attend", "OK"}];
  EXPECT_EQ(Get(s1, "kvr_node_attend_keys_scanned_count") -
                Get(s0, "kvr_node_attend_keys_scanned_count"),
            attends);
  const double per_head = static_cast<double>(kShardKeys) + static_cast<double>(appended) / 2;
  EXPECT_DOUBLE_EQ(Get(s1, "kvr_node_attend_keys_scanned_sum") -
                       Get(s0, "kvr_node_attend_keys_scanned_sum"),
                   attends * per_head);
  // Index builds: one per successful upload, under the index it got.
  const int uploads = expected[{"UploadShard", "OK"}];
  EXPECT_EQ(Get(s1, "kvr_node_index_build_duration_seconds_count", {{"index", "flat"}}) -
                Get(s0, "kvr_node_index_build_duration_seconds_count", {{"index", "flat"}}),
            uploads);
  for (const char* index : {"graph", "ivf"}) {
    EXPECT_EQ(Get(s1, "kvr_node_index_build_duration_seconds_count", {{"index", index}}), 0)
        << index;
  }
  // Holdings, as of the scrape.
  EXPECT_EQ(Get(s1, "kvr_node_sequences"), 1);
  EXPECT_EQ(Get(s1, "kvr_node_shards"), kKvHeads);
  EXPECT_EQ(Get(s1, "kvr_node_indexed_keys"), kKvHeads * kShardKeys);
  EXPECT_EQ(Get(s1, "kvr_node_tail_keys"), appended);
  const double used = Get(s1, "kvr_node_memory_used_bytes");
  // At least the fp32 keys and values held; within the budget.
  EXPECT_GE(used, (kKvHeads * kShardKeys + appended) * kDim * 4 * 2);
  EXPECT_LE(used, kBudgetBytes);
  const absl::StatusOr<NodeStats> stats = client->Stats();  // one more Stats call
  ASSERT_TRUE(stats.ok());
  expected[{"Stats", "OK"}] += 1;
  EXPECT_EQ(Get(s1, "kvr_node_shards"), stats->shards);

  // Dropping the sequence returns its bytes and shards.
  ASSERT_TRUE(client->DropSequence(1).ok());
  expected[{"DropSequence", "OK"}] += 1;
  const std::optional<std::string> text2 = HttpGetMetrics(node->metrics_address());
  ASSERT_TRUE(text2.has_value());
  const Samples s2 = ParseExposition(*text2);
  ExpectRequestDeltas(s0, s2, expected);
  EXPECT_EQ(Get(s2, "kvr_node_sequences"), 0);
  EXPECT_EQ(Get(s2, "kvr_node_shards"), 0);
  EXPECT_EQ(Get(s2, "kvr_node_memory_used_bytes"), 0);
}

TEST(NodeMetrics, PromtoolAcceptsTheExposition) {
  const std::string promtool = FindOnPath("promtool");
  if (promtool.empty()) {
    GTEST_SKIP() << "promtool not found on PATH (Debian package 'prometheus'; "
                    "scripts/install-deps.sh installs it): exposition not validated";
  }
  std::unique_ptr<NodeProcess> node = NodeProcess::Start(NodeArgs());
  ASSERT_TRUE(node != nullptr && node->listening());
  std::unique_ptr<GrpcRetrievalClient> client = Connect(*node);
  ASSERT_NE(client, nullptr);
  Expected expected;
  int64_t appended = 0;
  DriveTraffic(*client, &expected, &appended);  // every family has samples

  const std::optional<std::string> text = HttpGetMetrics(node->metrics_address());
  ASSERT_TRUE(text.has_value());
  ExpectPromtoolAccepts(*text, "kvr_node_metrics");
}

TEST(NodeMetrics, EmptyAddressDisablesMetrics) {
  std::unique_ptr<NodeProcess> node = NodeProcess::Start({"--metrics_listen="});
  ASSERT_TRUE(node != nullptr && node->listening());
  EXPECT_TRUE(node->metrics_address().empty()) << node->metrics_address();
  std::unique_ptr<GrpcRetrievalClient> client = Connect(*node);
  ASSERT_NE(client, nullptr);
  EXPECT_TRUE(client->Stats().ok());  // serves RPCs without metrics
}

TEST(NodeMetrics, UnbindableAddressStopsStartup) {
  // Hold a listening port so the node cannot bind it.
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  ASSERT_GE(fd, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(bind(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)), 0);
  ASSERT_EQ(listen(fd, 1), 0);
  socklen_t len = sizeof(addr);
  ASSERT_EQ(getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len), 0);
  const std::string taken = "127.0.0.1:" + std::to_string(ntohs(addr.sin_port));

  std::unique_ptr<NodeProcess> node =
      NodeProcess::Start({"--metrics_listen=" + taken}, /*expect_failure=*/true);
  close(fd);
  ASSERT_NE(node, nullptr);
  EXPECT_FALSE(node->listening()) << "kvr_node served RPCs without its metrics port";
  ASSERT_TRUE(node->exit_status().has_value());
  EXPECT_TRUE(WIFEXITED(*node->exit_status()) && WEXITSTATUS(*node->exit_status()) == 2)
      << *node->exit_status();
}

}  // namespace
}  // namespace kvr::retrieval
