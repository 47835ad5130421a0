// Integration test of the UCX data plane for Attend: a real kvr_node started
// with --ucx_listen on 127.0.0.1, shards uploaded over gRPC, Attend through
// UcxRetrievalClient (UCP active messages; transports from UCX_TLS, tcp on
// loopback by default here) compared with the gRPC client and an in-process
// node given the same shards:
//  * partials and stats are bit-identical over UCX, gRPC and in-process
//    (small replies, eager; large replies, rendezvous; many calls in flight);
//  * bad input over UCX gets the same status code and message as over gRPC;
//  * a node that stops answering (SIGSTOP) fails a UCX call with
//    DEADLINE_EXCEEDED within the deadline, and the client recovers;
//  * a node with UCX off is served over gRPC (fallback).
// When UCX cannot run here at all the tests skip with the UCX error.
//
// Usage: ucx_test --kvr_node PATH [gtest flags]
#include <signal.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <fstream>
#include <iterator>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "common/attention.h"
#include "common/tensor.h"
#include "gtest/gtest.h"
#include "retrieval_node/client/grpc_retrieval_client.h"
#include "retrieval_node/client/in_process_client.h"
#include "retrieval_node/client/ucx_retrieval_client.h"
#include "retrieval_node/server/ucx_endpoint.h"
#include "tests/support/server_process.h"
#include "tests/support/test_data.h"

namespace kvr::retrieval {
namespace {

using kvr::test_support::NodeProcess;
using kvr::test_support::RandomMatrix;

constexpr int kNodeThreads = 2;
constexpr int kTailCapacity = 64;
constexpr int kTrainK = 32;

std::vector<std::string> NodeArgs(std::vector<std::string> extra = {}) {
  std::vector<std::string> args = {
      "--threads=" + std::to_string(kNodeThreads), "--control_threads=2", "--metrics_listen=",
      "--tail_capacity=" + std::to_string(kTailCapacity), "--train_k=" + std::to_string(kTrainK),
      "--defer_index_build=false"};  // the in-process reference builds synchronously
  args.insert(args.end(), extra.begin(), extra.end());
  return args;
}

std::unique_ptr<InProcessRetrievalClient> ReferenceNode() {
  NodeCoreOptions o;
  o.threads = kNodeThreads;
  o.tail_capacity = kTailCapacity;
  o.train_k = kTrainK;
  auto node = InProcessRetrievalClient::Create(o);
  EXPECT_TRUE(node.ok()) << node.status();
  return std::move(node).value();
}

// Whether UCX can listen here at all (UCP init + a listener on 127.0.0.1),
// with the exact UCX error when not; checked once, in this process.
const absl::Status& UcxUsable() {
  static const absl::Status status = [] {
    auto endpoint = UcxEndpoint::Start(
        {}, [](const v1::AttendRequest&, v1::AttendResponse*,
               std::function<void(absl::Status)> done) { done(absl::OkStatus()); });
    return endpoint.status();
  }();
  return status;
}

#define KVR_SKIP_WITHOUT_UCX()                                                     \
  if (!UcxUsable().ok()) GTEST_SKIP() << "UCX cannot run here: " << UcxUsable()

std::unique_ptr<UcxRetrievalClient> ConnectUcx(const std::string& address,
                                               UcxClientOptions options = {}) {
  auto grpc = GrpcRetrievalClient::Create(address);
  EXPECT_TRUE(grpc.ok()) << grpc.status();
  EXPECT_TRUE((*grpc)->WaitForReady(absl::Seconds(10)).ok());
  auto client = UcxRetrievalClient::Create(std::move(grpc).value(), options);
  EXPECT_TRUE(client.ok()) << client.status();
  return std::move(client).value();
}
// Bit-identical partials (memcmp: NaN-safe, -0 vs +0 counts as different).
void ExpectBitIdentical(const Partials& a, const Partials& b, const std::string& what) {
  ASSERT_EQ(a.m.size(), b.m.size()) << what;
  ASSERT_EQ(a.o.data.size(), b.o.data.size()) << what;
  EXPECT_EQ(std::memcmp(a.m.data(), b.m.data(), a.m.size() * sizeof(float)), 0) << what << " m";
  EXPECT_EQ(std::memcmp(a.l.data(), b.l.data(), a.l.size() * sizeof(float)), 0) << what << " l";
  EXPECT_EQ(std::memcmp(a.o.data.data(), b.o.data.data(), a.o.data.size() * sizeof(float)), 0)
      << what << " o";
}

void ExpectSameStats(const AttendStats& a, const AttendStats& b, const std::string& what) {
  EXPECT_EQ(a.shards_searched, b.shards_searched) << what;
  EXPECT_EQ(a.keys_held, b.keys_held) << what;
  EXPECT_EQ(a.keys_attended, b.keys_attended) << what;
  EXPECT_EQ(a.distance_computations, b.distance_computations) << what;
}

struct Shape {
  uint64_t id;
  int heads, kv_heads, dim, chunks, chunk_keys, appended;
  DType value_dtype;
  IndexType index;
};
// Small messages (eager) and a large one (64 heads x 512: 128 KiB each way,
// rendezvous on tcp).
constexpr Shape kSmall{11, 8, 2, 32, 2, 500, 100, DType::kBf16, IndexType::kGraph};
constexpr Shape kIvf{12, 8, 2, 32, 2, 500, 0, DType::kF32, IndexType::kIvf};
constexpr Shape kLarge{13, 64, 4, 512, 1, 300, 0, DType::kF32, IndexType::kFlat};

SequenceSpec SpecOf(const Shape& s) {
  SequenceSpec spec;
  spec.sequence_id = s.id;
  spec.n_layers = 2;
  spec.n_heads = s.heads;
  spec.n_kv_heads = s.kv_heads;
  spec.head_dim = s.dim;
  spec.value_dtype = s.value_dtype;
  spec.index_type = s.index;
  return spec;
}

// Loads `s` into both `remote` (over gRPC) and `ref`.
void Load(const Shape& s, RetrievalClient* remote, RetrievalClient* ref) {
  const SequenceSpec spec = SpecOf(s);
  ASSERT_TRUE(remote->CreateSequence(spec).ok());
  ASSERT_TRUE(ref->CreateSequence(spec).ok());
  for (int layer = 0; layer < spec.n_layers; ++layer) {
    for (int g = 0; g < s.kv_heads; ++g) {
      const uint32_t seed = static_cast<uint32_t>(s.id * 1000 + layer * 100 + g * 10);
      for (int c = 0; c < s.chunks; ++c) {
        const Matrix keys = RandomMatrix(s.chunk_keys, s.dim, seed + c, 0.5f);
        const Matrix values = RandomMatrix(s.chunk_keys, s.dim, seed + c + 5);
        ShardUpload up;
        up.key = ShardKey{s.id, layer, g, c};
        up.first_position = int64_t{c} * s.chunk_keys;
        up.keys = keys.view();
        up.values = values.view();
        const absl::Status st = remote->UploadShard(up);
        ASSERT_TRUE(st.ok()) << st;
        ASSERT_TRUE(ref->UploadShard(up).ok());
      }
      if (s.appended > 0) {
        const Matrix keys = RandomMatrix(s.appended, s.dim, seed + 7, 2.0f);
        const Matrix values = RandomMatrix(s.appended, s.dim, seed + 8);
        AppendRequest a;
        a.sequence_id = s.id;
        a.layer = layer;
        a.kv_head = g;
        a.first_position = int64_t{s.chunks} * s.chunk_keys;
        a.keys = keys.view();
        a.values = values.view();
        ASSERT_TRUE(remote->Append(a).ok());
        ASSERT_TRUE(ref->Append(a).ok());
      }
    }
  }
}

class UcxTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (!UcxUsable().ok()) return;  // each test skips with the UCX error
    node_ = NodeProcess::Start(NodeArgs({"--ucx_listen=127.0.0.1:0"}));
    ASSERT_NE(node_, nullptr);
    client_ = ConnectUcx(node_->address());
    ASSERT_NE(client_, nullptr);
    if (!client_->using_ucx()) return;  // each test skips with the reason
    ref_ = ReferenceNode();
    for (const Shape& s : {kSmall, kIvf, kLarge}) {
      ASSERT_NO_FATAL_FAILURE(Load(s, client_.get(), ref_.get()));
    }
  }
  static void TearDownTestSuite() {
    client_.reset();
    ref_.reset();
    node_.reset();
  }
  void SetUp() override {
    KVR_SKIP_WITHOUT_UCX();
    ASSERT_NE(client_, nullptr);
    if (!client_->using_ucx()) {
      GTEST_SKIP() << "UCX unavailable here: " << client_->fallback_reason();
    }
  }

  // Attend of `q` over UCX, gRPC and in-process: identical partials and stats.
  static void ExpectSameEverywhere(const Shape& s, int layer, const Matrix& q, int k, int beam) {
    AttendRequest req;
    req.sequence_id = s.id;
    req.layer = layer;
    req.queries = q.view();
    req.k = k;
    req.beam = beam;
    Partials ucx(s.heads, s.dim), grpc(s.heads, s.dim), local(s.heads, s.dim);
    AttendStats ucx_stats, grpc_stats, local_stats;
    const absl::Status su = client_->Attend(req, ucx.view(), &ucx_stats);
    ASSERT_TRUE(su.ok()) << su;
    const absl::Status sg = client_->grpc()->Attend(req, grpc.view(), &grpc_stats);
    ASSERT_TRUE(sg.ok()) << sg;
    ASSERT_TRUE(ref_->Attend(req, local.view(), &local_stats).ok());
    const std::string what = "seq " + std::to_string(s.id) + " layer " + std::to_string(layer) +
                             " k " + std::to_string(k);
    ExpectBitIdentical(ucx, local, what + " ucx vs in-process");
    ExpectBitIdentical(grpc, local, what + " grpc vs in-process");
    ExpectSameStats(ucx_stats, local_stats, what);
    ExpectSameStats(grpc_stats, local_stats, what);
    EXPECT_GT(ucx_stats.shards_searched, 0) << what;
    for (int h = 0; h < s.heads; ++h) EXPECT_GT(ucx.l[h], 0.0f) << what << " head " << h;
  }

  static std::unique_ptr<NodeProcess> node_;
  static std::unique_ptr<UcxRetrievalClient> client_;
  static std::unique_ptr<InProcessRetrievalClient> ref_;
};

std::unique_ptr<NodeProcess> UcxTest::node_;
std::unique_ptr<UcxRetrievalClient> UcxTest::client_;
std::unique_ptr<InProcessRetrievalClient> UcxTest::ref_;

TEST_F(UcxTest, AdvertisesAddressThroughGrpc) {
  const std::string& a = client_->ucx_address();
  EXPECT_EQ(a.rfind("127.0.0.1:", 0), 0u) << a;
  EXPECT_NE(a, "127.0.0.1:0");
  EXPECT_NE(a, node_->address()) << "UCX and gRPC share a port";
}

TEST_F(UcxTest, AttendIdenticalOverUcxGrpcAndInProcess) {
  for (const Shape& s : {kSmall, kIvf}) {
    for (int layer = 0; layer < 2; ++layer) {
      for (int step = 0; step < 3; ++step) {
        const Matrix q = RandomMatrix(s.heads, s.dim, 900 + 10 * layer + step, -1.0f);
        ASSERT_NO_FATAL_FAILURE(ExpectSameEverywhere(s, layer, q, 16, 0));
        ASSERT_NO_FATAL_FAILURE(ExpectSameEverywhere(s, layer, q, 100, 64));
      }
    }
  }
}

TEST_F(UcxTest, LargeMessagesIdentical) {
  for (int layer = 0; layer < 2; ++layer) {
    const Matrix q = RandomMatrix(kLarge.heads, kLarge.dim, 77 + layer, -1.0f);
    ASSERT_NO_FATAL_FAILURE(ExpectSameEverywhere(kLarge, layer, q, 100, 0));
  }
}

TEST_F(UcxTest, ManyCallsInFlight) {
  constexpr int kCalls = 32;
  std::vector<Matrix> queries;
  std::vector<Partials> out(kCalls, Partials(kSmall.heads, kSmall.dim));
  std::vector<AttendStats> stats(kCalls);
  std::vector<StatusWaiter> waiters(kCalls);
  std::vector<AttendRequest> reqs(kCalls);
  for (int i = 0; i < kCalls; ++i) queries.push_back(RandomMatrix(kSmall.heads, kSmall.dim, 4000 + i));
  for (int i = 0; i < kCalls; ++i) {
    reqs[i].sequence_id = kSmall.id;
    reqs[i].layer = i % 2;
    reqs[i].queries = queries[i].view();
    reqs[i].k = 32;
    client_->AttendAsync(reqs[i], out[i].view(), &stats[i], waiters[i].callback());
  }
  for (int i = 0; i < kCalls; ++i) {
    const absl::Status st = waiters[i].Wait();
    ASSERT_TRUE(st.ok()) << "call " << i << ": " << st;
    Partials local(kSmall.heads, kSmall.dim);
    AttendStats local_stats;
    ASSERT_TRUE(ref_->Attend(reqs[i], local.view(), &local_stats).ok());
    ExpectBitIdentical(out[i], local, "call " + std::to_string(i));
    ExpectSameStats(stats[i], local_stats, "call " + std::to_string(i));
  }
}

TEST_F(UcxTest, BadInputSameStatusAsGrpc) {
  const Matrix q = RandomMatrix(kSmall.heads, kSmall.dim, 5);
  Matrix nan_q = q;
  nan_q.row(3)[7] = std::numeric_limits<float>::quiet_NaN();
  const Matrix wide_q = RandomMatrix(kSmall.heads, kSmall.dim * 2, 6);
  struct Case {
    std::string name;
    AttendRequest req;
    absl::StatusCode want;
  };
  auto base = [&] {
    AttendRequest r;
    r.sequence_id = kSmall.id;
    r.layer = 0;
    r.queries = q.view();
    r.k = 16;
    return r;
  };
  std::vector<Case> cases;
  cases.push_back({"unknown sequence", base(), absl::StatusCode::kNotFound});
  cases.back().req.sequence_id = 999;
  cases.push_back({"k 0", base(), absl::StatusCode::kInvalidArgument});
  cases.back().req.k = 0;
  cases.push_back({"k 5000", base(), absl::StatusCode::kInvalidArgument});
  cases.back().req.k = 5000;
  cases.push_back({"NaN query", base(), absl::StatusCode::kInvalidArgument});
  cases.back().req.queries = nan_q.view();
  cases.push_back({"head_dim mismatch", base(), absl::StatusCode::kInvalidArgument});
  cases.back().req.queries = wide_q.view();
  cases.push_back({"layer out of range", base(), absl::StatusCode::kInvalidArgument});
  cases.back().req.layer = 7;
  cases.push_back({"negative beam", base(), absl::StatusCode::kInvalidArgument});
  cases.back().req.beam = -1;
  for (const Case& c : cases) {
    const size_t d = c.req.queries.cols();
    Partials a(kSmall.heads, d), b(kSmall.heads, d);
    const absl::Status over_ucx = client_->Attend(c.req, a.view());
    const absl::Status over_grpc = client_->grpc()->Attend(c.req, b.view());
    EXPECT_EQ(over_grpc.code(), c.want) << c.name << ": " << over_grpc;
    EXPECT_EQ(over_ucx.code(), over_grpc.code()) << c.name << ": " << over_ucx;
    EXPECT_EQ(over_ucx.message(), over_grpc.message()) << c.name;
  }
  // The node still serves good calls identically afterwards.
  ASSERT_NO_FATAL_FAILURE(ExpectSameEverywhere(kSmall, 0, q, 16, 0));
}

// True once /proc says `pid` is stopped (kill() returns before that).
bool WaitUntilStopped(pid_t pid) {
  const std::string path = "/proc/" + std::to_string(pid) + "/stat";
  for (int i = 0; i < 2000; ++i) {
    std::ifstream f(path);
    std::string stat((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    const size_t paren = stat.rfind(')');
    if (paren != std::string::npos && paren + 2 < stat.size() && stat[paren + 2] == 'T') {
      return true;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return false;
}

// A node that stops answering (SIGSTOP: its sockets stay open) fails the UCX
// call with DEADLINE_EXCEEDED within the deadline; after SIGCONT the late
// reply is dropped and the next call succeeds.
TEST(UcxDeadlineTest, NodeThatStopsAnsweringHitsTheDeadline) {
  KVR_SKIP_WITHOUT_UCX();
  auto node = NodeProcess::Start(NodeArgs({"--ucx_listen=127.0.0.1:0"}));
  ASSERT_NE(node, nullptr);
  UcxClientOptions options;
  options.attend_timeout = absl::Milliseconds(400);
  auto client = ConnectUcx(node->address(), options);
  ASSERT_NE(client, nullptr);
  if (!client->using_ucx()) GTEST_SKIP() << "UCX unavailable here: " << client->fallback_reason();
  auto ref = ReferenceNode();
  ASSERT_NO_FATAL_FAILURE(Load(kIvf, client.get(), ref.get()));
  const Matrix q = RandomMatrix(kIvf.heads, kIvf.dim, 31);
  AttendRequest req;
  req.sequence_id = kIvf.id;
  req.layer = 1;
  req.queries = q.view();
  req.k = 50;
  Partials out(kIvf.heads, kIvf.dim);
  ASSERT_TRUE(client->Attend(req, out.view()).ok());

  ASSERT_TRUE(test_support::StopProcess(node->pid()));
  ASSERT_TRUE(WaitUntilStopped(node->pid()));
  const auto start = std::chrono::steady_clock::now();
  const absl::Status st = client->Attend(req, out.view());
  const auto elapsed = std::chrono::steady_clock::now() - start;
  kill(node->pid(), SIGCONT);
  ASSERT_EQ(st.code(), absl::StatusCode::kDeadlineExceeded) << st;
  EXPECT_GE(elapsed, std::chrono::milliseconds(400));
  EXPECT_LT(elapsed, std::chrono::milliseconds(400 + 250)) << "deadline overshot";

  Partials again(kIvf.heads, kIvf.dim), local(kIvf.heads, kIvf.dim);
  const absl::Status st2 = client->Attend(req, again.view());
  ASSERT_TRUE(st2.ok()) << st2;
  ASSERT_TRUE(ref->Attend(req, local.view()).ok());
  ExpectBitIdentical(again, local, "after SIGCONT");
}

// A node killed mid-session: calls in flight or later fail fast with
// UNAVAILABLE (or the deadline), never hang.
TEST(UcxDeadlineTest, DeadNodeFailsCalls) {
  KVR_SKIP_WITHOUT_UCX();
  auto node = NodeProcess::Start(NodeArgs({"--ucx_listen=127.0.0.1:0"}));
  ASSERT_NE(node, nullptr);
  UcxClientOptions options;
  options.attend_timeout = absl::Milliseconds(1000);
  auto client = ConnectUcx(node->address(), options);
  ASSERT_NE(client, nullptr);
  if (!client->using_ucx()) GTEST_SKIP() << "UCX unavailable here: " << client->fallback_reason();
  node->Stop(SIGKILL);
  const Matrix q = RandomMatrix(kIvf.heads, kIvf.dim, 31);
  AttendRequest req;
  req.sequence_id = kIvf.id;
  req.layer = 0;
  req.queries = q.view();
  req.k = 50;
  Partials out(kIvf.heads, kIvf.dim);
  for (int i = 0; i < 2; ++i) {
    const auto start = std::chrono::steady_clock::now();
    const absl::Status st = client->Attend(req, out.view());
    EXPECT_TRUE(absl::IsUnavailable(st) || absl::IsDeadlineExceeded(st)) << st;
    EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::milliseconds(1300));
  }
}

// A node without --ucx_listen advertises no address: Attend goes over gRPC
// with the same results.
TEST(UcxFallbackTest, NodeWithUcxOffIsServedOverGrpc) {
  auto node = NodeProcess::Start(NodeArgs());
  ASSERT_NE(node, nullptr);
  auto client = ConnectUcx(node->address());
  ASSERT_NE(client, nullptr);
  EXPECT_FALSE(client->using_ucx());
  EXPECT_EQ(client->fallback_reason().code(), absl::StatusCode::kFailedPrecondition)
      << client->fallback_reason();
  EXPECT_NE(client->fallback_reason().message().find("advertises no UCX address"),
            std::string::npos)
      << client->fallback_reason();
  auto ref = ReferenceNode();
  ASSERT_NO_FATAL_FAILURE(Load(kSmall, client.get(), ref.get()));
  const Matrix q = RandomMatrix(kSmall.heads, kSmall.dim, 8);
  AttendRequest req;
  req.sequence_id = kSmall.id;
  req.layer = 1;
  req.queries = q.view();
  req.k = 64;
  Partials remote(kSmall.heads, kSmall.dim), local(kSmall.heads, kSmall.dim);
  const absl::Status st = client->Attend(req, remote.view());
  ASSERT_TRUE(st.ok()) << st;
  ASSERT_TRUE(ref->Attend(req, local.view()).ok());
  ExpectBitIdentical(remote, local, "fallback");

  UcxClientOptions off;
  off.enable_ucx = false;
  auto disabled = ConnectUcx(node->address(), off);
  EXPECT_FALSE(disabled->using_ucx());
}

}  // namespace
}  // namespace kvr::retrieval

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  if (!kvr::test_support::ParseNodeBinaryFlag(argc, argv)) return 2;
  signal(SIGPIPE, SIG_IGN);
  // Loopback only: tcp on lo unless the environment says otherwise (the
  // node processes inherit these).
  setenv("UCX_TLS", "tcp", /*overwrite=*/0);
  setenv("UCX_NET_DEVICES", "lo", 0);
  setenv("UCX_WARN_UNUSED_ENV_VARS", "n", 0);
  return RUN_ALL_TESTS();
}
