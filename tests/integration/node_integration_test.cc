// Integration test of the gRPC retrieval node: real kvr_node processes on
// 127.0.0.1 (ports picked at run time, read from each process's
// "kvr_node listening on HOST:PORT" line), driven through
// GrpcRetrievalClient and raw kvr.v1 stubs.
//
//  * three nodes hold the shards of one sequence; every node's Attend reply
//    equals, bit for bit, an InProcessRetrievalClient given the same shards;
//  * AppendAsync (in-process, gRPC, multi-node), several appends in flight
//    per head: applied in issue order and visible to every later Attend,
//    bit for bit what blocking Appends give; bad input fails exactly as
//    Append does;
//  * bad requests get precise status codes and change nothing;
//  * memory budget and message-size limits; a deadline on every client call;
//  * grpc.health.v1 reports SERVING; reflection lists the service;
//  * SIGTERM drains and exits 0.
// Every process the test starts dies with it (PR_SET_PDEATHSIG) and is
// SIGKILLed by its owner's destructor on failure paths.
//
// Usage: node_integration_test --kvr_node PATH [gtest flags]
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "tests/support/reflection.h"
#include "tests/support/server_process.h"
#include "tests/support/test_data.h"
#include "common/attention.h"
#include "common/tensor.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/client_context.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/generic/generic_stub.h"
#include "grpcpp/security/credentials.h"
#include "grpcpp/support/byte_buffer.h"
#include "gtest/gtest.h"
#include "kvr/v1/retrieval.grpc.pb.h"
#include "retrieval_node/client/grpc_retrieval_client.h"
#include "retrieval_node/client/in_process_client.h"
#include "retrieval_node/client/multi_node_client.h"
#include "retrieval_node/wire/proto_convert.h"

namespace kvr::retrieval {
namespace {

using kvr::test_support::NodeProcess;
using kvr::test_support::RandomMatrix;
using kvr::test_support::ExactTopKIds;
using kvr::test_support::ExpectSamePartials;

// Server flags and the matching in-process options, so that remote and
// reference nodes hold identical state.
constexpr int kNodeThreads = 2;
constexpr int kTailCapacity = 64;
constexpr int kTrainK = 32;

std::vector<std::string> NodeArgs(std::vector<std::string> extra = {}) {
  std::vector<std::string> args = {
      "--threads=" + std::to_string(kNodeThreads), "--control_threads=2",
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

std::unique_ptr<GrpcRetrievalClient> Connect(const std::string& address,
                                             GrpcClientOptions options = {}) {
  auto client = GrpcRetrievalClient::Create(address, options);
  EXPECT_TRUE(client.ok()) << client.status();
  return std::move(client).value();
}

// --- the three-node cluster -------------------------------------------------------

constexpr int kNodes = 3;
constexpr int kLayers = 2;
constexpr int kHeads = 8;
constexpr int kKvHeads = 2;
constexpr int kDim = 32;
constexpr int kChunks = 3;
constexpr int kChunkKeys = 600;
constexpr int kAppended = 100;  // per (layer, kv head), after the last chunk

class NodeClusterTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    for (int i = 0; i < kNodes; ++i) {
      nodes_[i] = NodeProcess::Start(NodeArgs());
      ASSERT_NE(nodes_[i], nullptr) << "node " << i;
      clients_[i] = Connect(nodes_[i]->address());
      refs_[i] = ReferenceNode();
    }
  }

  static void TearDownTestSuite() {
    clients_ = {};
    refs_ = {};
    for (int i = 0; i < kNodes; ++i) {
      if (nodes_[i] == nullptr) continue;
      const std::optional<int> status = nodes_[i]->Stop(SIGTERM);
      if (!status.has_value() || !WIFEXITED(*status) || WEXITSTATUS(*status) != 0) {
        ADD_FAILURE() << "node " << i << " did not exit 0 on SIGTERM (wait status "
                      << (status ? *status : -1) << ")";
      }
      nodes_[i].reset();
    }
  }

  // Which node holds chunk c of (layer, kv head).
  static int Owner(int layer, int kv_head, int chunk) { return (layer + kv_head + chunk) % kNodes; }

  // Creates `spec` everywhere and spreads its chunks (with the three kinds of
  // training data) and appended tails over the nodes, mirrored into refs_.
  static void LoadSequence(const SequenceSpec& spec, uint32_t seed) {
    for (int i = 0; i < kNodes; ++i) {
      ASSERT_TRUE(clients_[i]->CreateSequence(spec).ok());
      ASSERT_TRUE(refs_[i]->CreateSequence(spec).ok());
    }
    for (int layer = 0; layer < kLayers; ++layer) {
      for (int g = 0; g < kKvHeads; ++g) {
        const uint32_t s = seed + 100 * layer + 10 * g;
        for (int c = 0; c < kChunks; ++c) {
          const Matrix keys = RandomMatrix(kChunkKeys, kDim, s + c, 2.0f);
          const Matrix values = RandomMatrix(kChunkKeys, kDim, s + c + 50);
          const Matrix train_q = RandomMatrix(64, kDim, s + c + 70, -1.0f);
          std::vector<int64_t> topk;
          ShardUpload up;
          up.key = ShardKey{spec.sequence_id, layer, g, c};
          up.first_position = int64_t{c} * kChunkKeys;
          up.keys = keys.view();
          up.values = values.view();
          if (c == 0) {  // the worker's prefill top-k
            topk = ExactTopKIds(train_q, keys, 16);
            up.train_topk = topk;
            up.train_topk_width = 16;
          } else if (c == 1) {  // raw training queries
            up.train_queries = train_q.view();
            up.train_k = 24;
          }  // c == 2: keys as training queries
          const int owner = Owner(layer, g, c);
          const absl::Status remote = clients_[owner]->UploadShard(up);
          ASSERT_TRUE(remote.ok()) << remote;
          ASSERT_TRUE(refs_[owner]->UploadShard(up).ok());
        }
        // Tokens that left the window: to the owner of the last chunk, in
        // steps of 10 (one seal at 64, then a flat tail of 36).
        const int owner = Owner(layer, g, kChunks - 1);
        const Matrix keys = RandomMatrix(kAppended, kDim, s + 90, 2.0f);
        const Matrix values = RandomMatrix(kAppended, kDim, s + 91);
        for (int b = 0; b < kAppended; b += 10) {
          AppendRequest a;
          a.sequence_id = spec.sequence_id;
          a.layer = layer;
          a.kv_head = g;
          a.first_position = int64_t{kChunks} * kChunkKeys + b;
          a.keys = keys.view().rows_slice(b, 10);
          a.values = values.view().rows_slice(b, 10);
          const absl::Status st = clients_[owner]->Append(a);
          ASSERT_TRUE(st.ok()) << st;
          ASSERT_TRUE(refs_[owner]->Append(a).ok());
        }
      }
    }
  }

  // Attend of `queries` on every node at once (async fan-out) and on the
  // references; expects identical partials.
  static void ExpectAttendMatches(uint64_t sequence_id, int layer, const Matrix& queries, int k,
                                  int beam) {
    AttendRequest req;
    req.sequence_id = sequence_id;
    req.layer = layer;
    req.queries = queries.view();
    req.k = k;
    req.beam = beam;
    std::vector<Partials> remote(kNodes, Partials(kHeads, kDim)), local(kNodes, Partials(kHeads, kDim));
    std::vector<AttendStats> remote_stats(kNodes), local_stats(kNodes);
    std::vector<StatusWaiter> waiters(kNodes);
    for (int i = 0; i < kNodes; ++i) {
      clients_[i]->AttendAsync(req, remote[i].view(), &remote_stats[i], waiters[i].callback());
    }
    for (int i = 0; i < kNodes; ++i) {
      const absl::Status st = waiters[i].Wait();
      ASSERT_TRUE(st.ok()) << "node " << i << ": " << st;
      ASSERT_TRUE(refs_[i]->Attend(req, local[i].view(), &local_stats[i]).ok());
      ExpectSamePartials(remote[i], local[i],
                         "seq " + std::to_string(sequence_id) + " layer " +
                             std::to_string(layer) + " node " + std::to_string(i) + " k " +
                             std::to_string(k));
      EXPECT_EQ(remote_stats[i].shards_searched, local_stats[i].shards_searched);
      EXPECT_EQ(remote_stats[i].keys_held, local_stats[i].keys_held);
      EXPECT_EQ(remote_stats[i].keys_attended, local_stats[i].keys_attended);
      EXPECT_EQ(remote_stats[i].distance_computations, local_stats[i].distance_computations);
      EXPECT_GT(remote_stats[i].shards_searched, 0);
      for (size_t h = 0; h < kHeads; ++h) EXPECT_GT(remote[i].l[h], 0.0f);
    }
  }

  static std::array<std::unique_ptr<NodeProcess>, kNodes> nodes_;
  static std::array<std::unique_ptr<GrpcRetrievalClient>, kNodes> clients_;
  static std::array<std::unique_ptr<InProcessRetrievalClient>, kNodes> refs_;
};

std::array<std::unique_ptr<NodeProcess>, kNodes> NodeClusterTest::nodes_;
std::array<std::unique_ptr<GrpcRetrievalClient>, kNodes> NodeClusterTest::clients_;
std::array<std::unique_ptr<InProcessRetrievalClient>, kNodes> NodeClusterTest::refs_;

SequenceSpec Spec(uint64_t id, DType value_dtype, IndexType index) {
  SequenceSpec s;
  s.sequence_id = id;
  s.n_layers = kLayers;
  s.n_heads = kHeads;
  s.n_kv_heads = kKvHeads;
  s.head_dim = kDim;
  s.value_dtype = value_dtype;
  s.index_type = index;
  return s;
}

TEST_F(NodeClusterTest, HealthCheckServing) {
  for (int i = 0; i < kNodes; ++i) {
    auto channel = grpc::CreateChannel(nodes_[i]->address(), grpc::InsecureChannelCredentials());
    auto stub = grpc::health::v1::Health::NewStub(channel);
    for (const char* service : {"", "kvr.v1.RetrievalNode"}) {
      grpc::ClientContext ctx;
      ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
      grpc::health::v1::HealthCheckRequest req;
      req.set_service(service);
      grpc::health::v1::HealthCheckResponse resp;
      const grpc::Status st = stub->Check(&ctx, req, &resp);
      ASSERT_TRUE(st.ok()) << "node " << i << " service '" << service << "': " << st.error_message();
      EXPECT_EQ(resp.status(), grpc::health::v1::HealthCheckResponse::SERVING);
    }
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    grpc::health::v1::HealthCheckRequest req;
    req.set_service("no.such.Service");
    grpc::health::v1::HealthCheckResponse resp;
    EXPECT_EQ(stub->Check(&ctx, req, &resp).error_code(), grpc::StatusCode::NOT_FOUND);
  }
}

// grpc.reflection.v1alpha over a generic bidi stream (the reflection protos
// are not installed): ListServices must name kvr.v1.RetrievalNode.
TEST_F(NodeClusterTest, ReflectionListsTheService) {
  auto bytes = test_support::ReflectionListServices(nodes_[0]->address());
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  EXPECT_NE(bytes->find("kvr.v1.RetrievalNode"), std::string::npos);
  EXPECT_NE(bytes->find("grpc.health.v1.Health"), std::string::npos);
}

TEST_F(NodeClusterTest, AttendMatchesInProcessNodeExactly) {
  ASSERT_NO_FATAL_FAILURE(LoadSequence(Spec(7, DType::kBf16, IndexType::kGraph), 1000));
  ASSERT_NO_FATAL_FAILURE(LoadSequence(Spec(8, DType::kF32, IndexType::kIvf), 2000));
  for (uint64_t seq : {7u, 8u}) {
    for (int layer = 0; layer < kLayers; ++layer) {
      for (int step = 0; step < 3; ++step) {
        const Matrix q = RandomMatrix(kHeads, kDim, 5000 + 10 * layer + step, -1.0f);
        ASSERT_NO_FATAL_FAILURE(ExpectAttendMatches(seq, layer, q, 16, 0));
        ASSERT_NO_FATAL_FAILURE(ExpectAttendMatches(seq, layer, q, 100, 128));
      }
    }
  }
  // Shard listings agree with the references (memory aside: search scratch
  // pools grow with concurrency).
  for (int i = 0; i < kNodes; ++i) {
    auto remote = clients_[i]->ListShards(7);
    auto local = refs_[i]->core().ListShards(7);
    ASSERT_TRUE(remote.ok()) << remote.status();
    ASSERT_TRUE(local.ok());
    ASSERT_EQ(remote->size(), local->size());
    EXPECT_EQ(remote->size(), static_cast<size_t>(kLayers * kKvHeads));
    for (size_t j = 0; j < local->size(); ++j) {
      const ShardInfo &r = (*remote)[j], &l = (*local)[j];
      EXPECT_TRUE(r.key == l.key) << r.key.DebugString() << " vs " << l.key.DebugString();
      EXPECT_EQ(r.n_keys, l.n_keys);
      EXPECT_EQ(r.tail_keys, l.tail_keys);
      EXPECT_EQ(r.first_position, l.first_position);
      EXPECT_EQ(r.last_position, l.last_position);
      EXPECT_EQ(r.index_type, l.index_type);
      EXPECT_GT(r.memory_bytes, 0);
    }
    auto stats = clients_[i]->Stats();
    ASSERT_TRUE(stats.ok());
    EXPECT_GE(stats->sequences, 2);
    EXPECT_GE(stats->shards, 2 * kLayers * kKvHeads);
    EXPECT_GT(stats->memory_bytes, 0);
  }

  // The nodes' partials merge into the partial over the whole sequence held
  // by one reference node with every shard.
  auto all = ReferenceNode();
  const SequenceSpec spec = Spec(9, DType::kF32, IndexType::kFlat);
  ASSERT_TRUE(all->CreateSequence(spec).ok());
  const Matrix q = RandomMatrix(kHeads, kDim, 77, -1.0f);
  AttendRequest req;
  req.sequence_id = 9;
  req.layer = 0;
  req.queries = q.view();
  req.k = 4096;  // flat, k >= every chunk: exact attention over all keys
  for (int i = 0; i < kNodes; ++i) ASSERT_TRUE(clients_[i]->CreateSequence(spec).ok());
  for (int g = 0; g < kKvHeads; ++g) {
    for (int c = 0; c < kChunks; ++c) {
      const Matrix keys = RandomMatrix(kChunkKeys, kDim, 300 + 10 * g + c);
      const Matrix values = RandomMatrix(kChunkKeys, kDim, 400 + 10 * g + c);
      ShardUpload up;
      up.key = ShardKey{9, 0, g, c};
      up.first_position = int64_t{c} * kChunkKeys;
      up.keys = keys.view();
      up.values = values.view();
      ASSERT_TRUE(clients_[Owner(0, g, c)]->UploadShard(up).ok());
      up.key.chunk = c;
      ASSERT_TRUE(all->UploadShard(up).ok());
    }
  }
  Partials merged(kHeads, kDim), whole(kHeads, kDim);
  for (int i = 0; i < kNodes; ++i) {
    Partials part(kHeads, kDim);
    ASSERT_TRUE(clients_[i]->Attend(req, part.view()).ok());
    MergeInto(merged.view(), part.view());
  }
  ASSERT_TRUE(all->Attend(req, whole.view()).ok());
  for (size_t i = 0; i < merged.o.data.size(); ++i) {
    EXPECT_NEAR(merged.o.data[i], whole.o.data[i], 1e-5f) << i;
  }
  for (int i = 0; i < kNodes; ++i) ASSERT_TRUE(clients_[i]->DropSequence(9).ok());
}

// MultiNodeClient places shards by rendezvous hashing and fans Attend out:
// over the three gRPC nodes it equals (bit for bit) the same client over
// three in-process nodes, and (to float rounding) one node holding everything.
TEST_F(NodeClusterTest, MultiNodeClientPlacesAndMerges) {
  std::vector<placement::NodeInfo> infos;
  std::vector<std::unique_ptr<RetrievalClient>> remote_clients, local_clients;
  for (int i = 0; i < kNodes; ++i) {
    infos.push_back({"node" + std::to_string(i), nodes_[i]->address()});
    remote_clients.push_back(Connect(nodes_[i]->address()));
    local_clients.push_back(ReferenceNode());
  }
  auto remote = MultiNodeClient::Create(infos, std::move(remote_clients));
  auto local = MultiNodeClient::Create(infos, std::move(local_clients));
  ASSERT_TRUE(remote.ok()) << remote.status();
  ASSERT_TRUE(local.ok()) << local.status();
  auto all = ReferenceNode();
  for (IndexType index : {IndexType::kGraph, IndexType::kFlat}) {
    const uint64_t id = index == IndexType::kGraph ? 31 : 32;
    const SequenceSpec spec = Spec(id, DType::kF16, index);
    ASSERT_TRUE((*remote)->CreateSequence(spec).ok());
    ASSERT_TRUE((*local)->CreateSequence(spec).ok());
    ASSERT_TRUE(all->CreateSequence(spec).ok());
    for (int layer = 0; layer < kLayers; ++layer) {
      for (int g = 0; g < kKvHeads; ++g) {
        for (int c = 0; c < kChunks; ++c) {
          const Matrix keys = RandomMatrix(300, kDim, 700 + 100 * layer + 10 * g + c, 1.0f);
          const Matrix values = RandomMatrix(300, kDim, 800 + 100 * layer + 10 * g + c);
          ShardUpload up;
          up.key = ShardKey{id, layer, g, c};
          up.first_position = int64_t{c} * 300;
          up.keys = keys.view();
          up.values = values.view();
          ASSERT_TRUE((*remote)->UploadShard(up).ok());
          ASSERT_TRUE((*local)->UploadShard(up).ok());
          ASSERT_TRUE(all->UploadShard(up).ok());
        }
        const Matrix ak = RandomMatrix(20, kDim, 900 + g), av = RandomMatrix(20, kDim, 950 + g);
        AppendRequest a;
        a.sequence_id = id;
        a.layer = layer;
        a.kv_head = g;
        a.first_position = int64_t{kChunks} * 300 + 5;
        a.keys = ak.view();
        a.values = av.view();
        ASSERT_TRUE((*remote)->Append(a).ok());
        ASSERT_TRUE((*local)->Append(a).ok());
        ASSERT_TRUE(all->Append(a).ok());
      }
    }
    for (int layer = 0; layer < kLayers; ++layer) {
      const Matrix q = RandomMatrix(kHeads, kDim, 990 + layer, -0.5f);
      AttendRequest req;
      req.sequence_id = id;
      req.layer = layer;
      req.queries = q.view();
      req.k = index == IndexType::kFlat ? 4096 : 32;
      Partials r(kHeads, kDim), l(kHeads, kDim), whole(kHeads, kDim);
      AttendStats rs, ls;
      ASSERT_TRUE((*remote)->Attend(req, r.view(), &rs).ok());
      ASSERT_TRUE((*local)->Attend(req, l.view(), &ls).ok());
      ExpectSamePartials(r, l, "multi-node seq " + std::to_string(id));
      EXPECT_EQ(rs.shards_searched, ls.shards_searched);
      // Every chunk and tail searched once across the nodes.
      EXPECT_EQ(rs.keys_held, int64_t{kKvHeads} * (kChunks * 300 + 20) * (kHeads / kKvHeads));
      if (index == IndexType::kFlat) {  // exact everywhere: merged == one node
        ASSERT_TRUE(all->Attend(req, whole.view()).ok());
        for (size_t i = 0; i < r.o.data.size(); ++i) {
          EXPECT_NEAR(r.o.data[i], whole.o.data[i], 1e-5f) << i;
        }
      }
    }
    ASSERT_TRUE((*remote)->DropSequence(id).ok());
    ASSERT_TRUE((*local)->DropSequence(id).ok());
  }
}

// --- AppendAsync ----------------------------------------------------------------------

// Decode-shaped appends: kDecodeSteps single-token steps per (layer, kv head)
// after a 200-key chunk, issued kPipeline steps at a time with AppendAsync
// (several appends in flight per head, every head at once), then waited
// for. `blocking` gets the same appends one at a time through Append. After
// every round, Attend on both must agree bit for bit (two tail seals happen
// on the way: tail_capacity 64).
constexpr int kUploadedKeys = 200;
constexpr int kDecodeSteps = 150;
constexpr int kPipeline = 5;

void ExpectAsyncAppendsMatchBlocking(RetrievalClient* async, RetrievalClient* blocking,
                                     uint64_t id, uint32_t seed, const std::string& what) {
  const SequenceSpec spec = Spec(id, DType::kF16, IndexType::kGraph);
  ASSERT_TRUE(async->CreateSequence(spec).ok()) << what;
  ASSERT_TRUE(blocking->CreateSequence(spec).ok()) << what;
  for (int layer = 0; layer < kLayers; ++layer) {
    for (int g = 0; g < kKvHeads; ++g) {
      const Matrix keys = RandomMatrix(kUploadedKeys, kDim, seed + 10 * layer + g, 2.0f);
      const Matrix values = RandomMatrix(kUploadedKeys, kDim, seed + 50 + 10 * layer + g);
      ShardUpload up;
      up.key = ShardKey{id, layer, g, 0};
      up.keys = keys.view();
      up.values = values.view();
      ASSERT_TRUE(async->UploadShard(up).ok()) << what;
      ASSERT_TRUE(blocking->UploadShard(up).ok()) << what;
    }
  }
  const int heads = kLayers * kKvHeads;
  const Matrix keys = RandomMatrix(size_t{kDecodeSteps} * heads, kDim, seed + 100, 2.0f);
  const Matrix values = RandomMatrix(size_t{kDecodeSteps} * heads, kDim, seed + 101);
  for (int round = 0; round < kDecodeSteps; round += kPipeline) {
    std::vector<StatusWaiter> waiters(size_t{kPipeline} * heads);
    size_t issued = 0;
    for (int step = round; step < std::min(kDecodeSteps, round + kPipeline); ++step) {
      for (int layer = 0; layer < kLayers; ++layer) {
        for (int g = 0; g < kKvHeads; ++g) {
          const size_t row = (size_t(step) * kLayers + layer) * kKvHeads + g;
          // The request lives on this stack frame only: AppendAsync copies it.
          Matrix k(1, kDim), v(1, kDim);
          std::copy_n(keys.row(row), kDim, k.row(0));
          std::copy_n(values.row(row), kDim, v.row(0));
          AppendRequest a;
          a.sequence_id = id;
          a.layer = layer;
          a.kv_head = g;
          a.first_position = kUploadedKeys + step;
          a.keys = k.view();
          a.values = v.view();
          async->AppendAsync(a, waiters[issued++].callback());
          std::fill(k.data.begin(), k.data.end(), std::nanf(""));  // reused buffer
          a.keys = keys.view().rows_slice(row, 1);
          a.values = values.view().rows_slice(row, 1);
          const absl::Status st = blocking->Append(a);
          ASSERT_TRUE(st.ok()) << what << ": " << st;
        }
      }
    }
    for (size_t i = 0; i < issued; ++i) {
      const absl::Status st = waiters[i].Wait();
      ASSERT_TRUE(st.ok()) << what << " round " << round << " append " << i << ": " << st;
    }
    for (int layer = 0; layer < kLayers; ++layer) {
      const Matrix q = RandomMatrix(kHeads, kDim, seed + 1000 + round + layer, -0.5f);
      AttendRequest req;
      req.sequence_id = id;
      req.layer = layer;
      req.queries = q.view();
      req.k = 32;
      Partials got(kHeads, kDim), want(kHeads, kDim);
      AttendStats got_stats, want_stats;
      ASSERT_TRUE(async->Attend(req, got.view(), &got_stats).ok()) << what;
      ASSERT_TRUE(blocking->Attend(req, want.view(), &want_stats).ok()) << what;
      ExpectSamePartials(got, want, what + " round " + std::to_string(round) + " layer " +
                                        std::to_string(layer));
      // Every appended token is held: uploaded + appended keys per query head.
      const int64_t held = int64_t{kKvHeads} * (kUploadedKeys + std::min(kDecodeSteps,
                                                                         round + kPipeline)) *
                           (kHeads / kKvHeads);
      EXPECT_EQ(got_stats.keys_held, held) << what << " round " << round;
      EXPECT_EQ(got_stats.keys_held, want_stats.keys_held) << what;
      EXPECT_EQ(got_stats.distance_computations, want_stats.distance_computations) << what;
    }
  }
  ASSERT_TRUE(async->DropSequence(id).ok()) << what;
  ASSERT_TRUE(blocking->DropSequence(id).ok()) << what;
}

// Every bad append gets from AppendAsync exactly the status Append returns,
// and changes nothing (the next position is still accepted).
void ExpectBadAsyncAppendsFailLikeAppend(RetrievalClient* c, uint64_t id,
                                         const std::string& what) {
  const SequenceSpec spec = Spec(id, DType::kF32, IndexType::kFlat);
  ASSERT_TRUE(c->CreateSequence(spec).ok()) << what;
  const Matrix keys = RandomMatrix(4, kDim, 5), values = RandomMatrix(4, kDim, 6);
  const Matrix wide = RandomMatrix(1, kDim + 1, 7);
  Matrix nan_keys = RandomMatrix(1, kDim, 8);
  nan_keys.data[3] = std::nanf("");
  AppendRequest good;
  good.sequence_id = id;
  good.layer = 1;
  good.kv_head = 1;
  good.first_position = 10;
  good.keys = keys.view().rows_slice(0, 1);
  good.values = values.view().rows_slice(0, 1);
  ASSERT_TRUE(c->Append(good).ok()) << what;
  struct Case {
    std::string name;
    AppendRequest request;
    absl::StatusCode code;
  };
  std::vector<Case> cases;
  const auto add = [&](std::string name, absl::StatusCode code, auto mutate) {
    AppendRequest a = good;
    a.first_position = 11;
    mutate(a);
    cases.push_back({std::move(name), a, code});
  };
  add("unknown sequence", absl::StatusCode::kNotFound,
      [&](AppendRequest& a) { a.sequence_id = id + 1000; });
  add("layer out of range", absl::StatusCode::kInvalidArgument,
      [&](AppendRequest& a) { a.layer = kLayers; });
  add("negative kv head", absl::StatusCode::kInvalidArgument,
      [&](AppendRequest& a) { a.kv_head = -1; });
  add("position not after the last", absl::StatusCode::kInvalidArgument,
      [&](AppendRequest& a) { a.first_position = 10; });
  add("keys too wide", absl::StatusCode::kInvalidArgument, [&](AppendRequest& a) {
    a.keys = wide.view();
    a.values = wide.view();
  });
  add("values rows != keys rows", absl::StatusCode::kInvalidArgument,
      [&](AppendRequest& a) { a.keys = keys.view().rows_slice(1, 2); });
  add("NaN key", absl::StatusCode::kInvalidArgument,
      [&](AppendRequest& a) { a.keys = nan_keys.view(); });
  for (const Case& bad : cases) {
    const absl::Status blocking = c->Append(bad.request);
    StatusWaiter waiter;
    c->AppendAsync(bad.request, waiter.callback());
    const absl::Status async = waiter.Wait();
    EXPECT_EQ(blocking.code(), bad.code) << what << " " << bad.name << ": " << blocking;
    EXPECT_EQ(async.code(), blocking.code()) << what << " " << bad.name << ": " << async;
    EXPECT_EQ(async.message(), blocking.message()) << what << " " << bad.name;
  }
  AppendRequest next = good;
  next.first_position = 11;
  next.keys = keys.view().rows_slice(1, 1);
  next.values = values.view().rows_slice(1, 1);
  StatusWaiter waiter;
  c->AppendAsync(next, waiter.callback());
  const absl::Status st = waiter.Wait();
  EXPECT_TRUE(st.ok()) << what << ": " << st;
  ASSERT_TRUE(c->DropSequence(id).ok()) << what;
}

TEST_F(NodeClusterTest, AppendAsyncMatchesBlockingAppendInProcess) {
  auto async = ReferenceNode(), blocking = ReferenceNode();
  ExpectAsyncAppendsMatchBlocking(async.get(), blocking.get(), 41, 4100, "in-process");
  ExpectBadAsyncAppendsFailLikeAppend(async.get(), 42, "in-process");
}

TEST_F(NodeClusterTest, AppendAsyncMatchesBlockingAppendOverGrpc) {
  auto blocking = ReferenceNode();
  ExpectAsyncAppendsMatchBlocking(clients_[0].get(), blocking.get(), 43, 4300, "gRPC");
  ExpectBadAsyncAppendsFailLikeAppend(clients_[1].get(), 44, "gRPC");
}

TEST_F(NodeClusterTest, AppendAsyncMatchesBlockingAppendMultiNode) {
  std::vector<placement::NodeInfo> infos;
  std::vector<std::unique_ptr<RetrievalClient>> remote_clients, local_clients;
  for (int i = 0; i < kNodes; ++i) {
    infos.push_back({"node" + std::to_string(i), nodes_[i]->address()});
    remote_clients.push_back(Connect(nodes_[i]->address()));
    local_clients.push_back(ReferenceNode());
  }
  auto remote = MultiNodeClient::Create(infos, std::move(remote_clients));
  auto local = MultiNodeClient::Create(infos, std::move(local_clients));
  ASSERT_TRUE(remote.ok()) << remote.status();
  ASSERT_TRUE(local.ok()) << local.status();
  ExpectAsyncAppendsMatchBlocking(remote->get(), local->get(), 45, 4500, "multi-node");
  ExpectBadAsyncAppendsFailLikeAppend(remote->get(), 46, "multi-node");
}

// Raw-stub helpers for malformed requests the typed client cannot produce.
grpc::Status RawAttend(v1::RetrievalNode::Stub* stub, const v1::AttendRequest& req) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  v1::AttendResponse resp;
  return stub->Attend(&ctx, req, &resp);
}

grpc::Status RawUpload(v1::RetrievalNode::Stub* stub,
                       const std::vector<v1::UploadShardRequest>& messages) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  v1::UploadShardResponse resp;
  auto writer = stub->UploadShard(&ctx, &resp);
  for (const auto& m : messages) {
    if (!writer->Write(m)) break;
  }
  writer->WritesDone();
  return writer->Finish();
}

std::string Floats(const std::vector<float>& v) {
  return std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(float));
}

#define EXPECT_STATUS(expr, want_code, want_substr)                                  \
  do {                                                                              \
    const absl::Status s_ = (expr);                                                 \
    EXPECT_EQ(s_.code(), (want_code)) << s_;                                        \
    EXPECT_NE(std::string(s_.message()).find(want_substr), std::string::npos) << s_; \
  } while (0)

TEST_F(NodeClusterTest, BadRequestsGetPreciseStatusAndChangeNothing) {
  GrpcRetrievalClient& c = *clients_[0];
  InProcessRetrievalClient& ref = *refs_[0];
  const SequenceSpec spec = Spec(21, DType::kF32, IndexType::kGraph);
  ASSERT_TRUE(c.CreateSequence(spec).ok());
  ASSERT_TRUE(ref.CreateSequence(spec).ok());
  const Matrix keys = RandomMatrix(200, kDim, 1), values = RandomMatrix(200, kDim, 2);
  ShardUpload up;
  up.key = ShardKey{21, 1, 1, 0};
  up.keys = keys.view();
  up.values = values.view();
  ASSERT_TRUE(c.UploadShard(up).ok());
  ASSERT_TRUE(ref.UploadShard(up).ok());
  const Matrix q = RandomMatrix(kHeads, kDim, 3);
  AttendRequest good;
  good.sequence_id = 21;
  good.layer = 1;
  good.queries = q.view();
  good.k = 10;
  Partials before(kHeads, kDim), expect(kHeads, kDim);
  ASSERT_TRUE(c.Attend(good, before.view()).ok());
  ASSERT_TRUE(ref.Attend(good, expect.view()).ok());
  ExpectSamePartials(before, expect, "before");

  // CreateSequence.
  EXPECT_STATUS(c.CreateSequence(spec), absl::StatusCode::kAlreadyExists, "21");
  SequenceSpec bad = Spec(22, DType::kF32, IndexType::kGraph);
  bad.n_heads = 7;
  EXPECT_STATUS(c.CreateSequence(bad), absl::StatusCode::kInvalidArgument, "n_heads 7");
  bad = Spec(22, DType::kF32, IndexType::kGraph);
  bad.head_dim = 5000;
  EXPECT_STATUS(c.CreateSequence(bad), absl::StatusCode::kInvalidArgument, "head_dim 5000");
  auto stub = v1::RetrievalNode::NewStub(
      grpc::CreateChannel(nodes_[0]->address(), grpc::InsecureChannelCredentials()));
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    v1::CreateSequenceRequest req;
    SequenceSpecToProto(Spec(23, DType::kF32, IndexType::kGraph), req.mutable_spec());
    req.mutable_spec()->set_value_dtype(v1::DTYPE_UNSPECIFIED);
    v1::CreateSequenceResponse resp;
    EXPECT_STATUS(FromGrpcStatus(stub->CreateSequence(&ctx, req, &resp)),
                  absl::StatusCode::kInvalidArgument, "spec.value_dtype 0");
  }

  // Attend.
  AttendRequest a = good;
  a.sequence_id = 999;
  Partials out(kHeads, kDim);
  EXPECT_STATUS(c.Attend(a, out.view()), absl::StatusCode::kNotFound, "999");
  a = good;
  a.k = 0;
  EXPECT_STATUS(c.Attend(a, out.view()), absl::StatusCode::kInvalidArgument, "k 0 outside [1, 4096]");
  a.k = 5000;
  EXPECT_STATUS(c.Attend(a, out.view()), absl::StatusCode::kInvalidArgument, "k 5000");
  a = good;
  a.beam = -1;
  EXPECT_STATUS(c.Attend(a, out.view()), absl::StatusCode::kInvalidArgument, "beam -1");
  a = good;
  a.layer = 2;
  EXPECT_STATUS(c.Attend(a, out.view()), absl::StatusCode::kInvalidArgument, "layer 2");
  Matrix nan_q = q;
  nan_q.row(3)[5] = std::numeric_limits<float>::quiet_NaN();
  a = good;
  a.queries = nan_q.view();
  EXPECT_STATUS(c.Attend(a, out.view()), absl::StatusCode::kInvalidArgument, "queries element 101");
  nan_q.row(3)[5] = std::numeric_limits<float>::infinity();
  EXPECT_STATUS(c.Attend(a, out.view()), absl::StatusCode::kInvalidArgument, "must be finite");
  const Matrix narrow = RandomMatrix(kHeads, kDim / 2, 4);
  a = good;
  a.queries = narrow.view();
  Partials narrow_out(kHeads, kDim / 2);
  EXPECT_STATUS(c.Attend(a, narrow_out.view()), absl::StatusCode::kInvalidArgument,
                "queries dim 16 != head_dim 32");
  {
    v1::AttendRequest raw;
    raw.set_sequence_id(21);
    raw.set_layer(1);
    raw.set_k(10);
    PackMatrix(q.view(), raw.mutable_queries());
    raw.mutable_queries()->mutable_data()->resize(100);
    EXPECT_STATUS(FromGrpcStatus(RawAttend(stub.get(), raw)), absl::StatusCode::kInvalidArgument,
                  "queries.data has 100 bytes, expected rows 8 x cols 32 x 4 (f32) = 1024");
    PackMatrix(q.view(), raw.mutable_queries());
    raw.mutable_queries()->set_dtype(v1::DTYPE_F16);
    EXPECT_STATUS(FromGrpcStatus(RawAttend(stub.get(), raw)), absl::StatusCode::kInvalidArgument,
                  "queries.dtype 3 must be DTYPE_F32");
    raw.mutable_queries()->set_dtype(v1::DTYPE_F32);
    raw.set_scale(std::numeric_limits<float>::quiet_NaN());
    EXPECT_STATUS(FromGrpcStatus(RawAttend(stub.get(), raw)), absl::StatusCode::kInvalidArgument,
                  "scale");
  }

  // UploadShard.
  EXPECT_STATUS(c.UploadShard(up), absl::StatusCode::kAlreadyExists, "chunk 0");
  ShardUpload u2 = up;
  u2.key.sequence_id = 998;
  EXPECT_STATUS(c.UploadShard(u2), absl::StatusCode::kNotFound, "998");
  u2 = up;
  u2.key.chunk = 1;
  u2.key.kv_head = 5;
  u2.first_position = 1000;
  EXPECT_STATUS(c.UploadShard(u2), absl::StatusCode::kInvalidArgument, "kv_head 5 outside [0, 2)");
  u2 = up;
  u2.key.chunk = 1;
  u2.first_position = 100;  // overlaps chunk 0's positions [0, 200)
  EXPECT_STATUS(c.UploadShard(u2), absl::StatusCode::kInvalidArgument, "first_position 100 must be > 199");
  Matrix nan_keys = keys;
  nan_keys.row(10)[0] = std::numeric_limits<float>::quiet_NaN();
  u2 = up;
  u2.key.chunk = 1;
  u2.first_position = 1000;
  u2.keys = nan_keys.view();
  EXPECT_STATUS(c.UploadShard(u2), absl::StatusCode::kInvalidArgument, "keys element 320");
  std::vector<int64_t> bad_topk(16, 7);
  bad_topk[5] = 200;
  u2 = up;
  u2.key.chunk = 1;
  u2.first_position = 1000;
  u2.train_topk = bad_topk;
  u2.train_topk_width = 8;
  EXPECT_STATUS(c.UploadShard(u2), absl::StatusCode::kInvalidArgument, "train_topk id 200 outside [-1, 200)");
  {
    v1::UploadShardRequest header;
    v1::ShardHeader* h = header.mutable_header();
    ShardKeyToProto(ShardKey{21, 0, 0, 0}, h->mutable_key());
    h->set_n_keys(4);
    h->set_head_dim(kDim);
    h->set_key_dtype(v1::DTYPE_F32);
    h->set_value_dtype(v1::DTYPE_F32);
    v1::UploadShardRequest data;
    data.mutable_data()->set_keys(Floats(std::vector<float>(4 * kDim, 1.0f)));
    data.mutable_data()->set_values(Floats(std::vector<float>(4 * kDim, 1.0f)));
    EXPECT_STATUS(FromGrpcStatus(RawUpload(stub.get(), {data, header})),
                  absl::StatusCode::kFailedPrecondition, "data before the header");
    EXPECT_STATUS(FromGrpcStatus(RawUpload(stub.get(), {header, data, data})),
                  absl::StatusCode::kInvalidArgument, "data.keys: more than the 512 bytes");
    v1::UploadShardRequest half = data;
    half.mutable_data()->mutable_values()->resize(100);
    EXPECT_STATUS(FromGrpcStatus(RawUpload(stub.get(), {header, half})),
                  absl::StatusCode::kInvalidArgument, "data.values: received 100 bytes, the header declares 512");
    EXPECT_STATUS(FromGrpcStatus(RawUpload(stub.get(), {})), absl::StatusCode::kInvalidArgument,
                  "without a header");
    v1::UploadShardRequest h2 = header;
    h2.mutable_header()->set_value_dtype(static_cast<v1::DType>(9));
    EXPECT_STATUS(FromGrpcStatus(RawUpload(stub.get(), {h2, data})),
                  absl::StatusCode::kInvalidArgument, "header.value_dtype 9");
    h2 = header;
    h2.mutable_header()->set_n_keys(0);
    EXPECT_STATUS(FromGrpcStatus(RawUpload(stub.get(), {h2})), absl::StatusCode::kInvalidArgument,
                  "header.n_keys 0 outside [1, ");
    h2 = header;
    h2.mutable_header()->set_head_dim(8);  // payload matches, sequence does not
    v1::UploadShardRequest d8;
    d8.mutable_data()->set_keys(Floats(std::vector<float>(4 * 8, 1.0f)));
    d8.mutable_data()->set_values(Floats(std::vector<float>(4 * 8, 1.0f)));
    EXPECT_STATUS(FromGrpcStatus(RawUpload(stub.get(), {h2, d8})),
                  absl::StatusCode::kInvalidArgument, "keys dim 8 != head_dim 32");
  }

  // Append.
  const Matrix ak = RandomMatrix(3, kDim, 5), av = RandomMatrix(3, kDim, 6);
  AppendRequest ap;
  ap.sequence_id = 21;
  ap.layer = 1;
  ap.kv_head = 1;
  ap.first_position = 150;  // not after 199
  ap.keys = ak.view();
  ap.values = av.view();
  EXPECT_STATUS(c.Append(ap), absl::StatusCode::kInvalidArgument, "first_position 150 must be > 199");
  ap.first_position = 500;
  ap.sequence_id = 997;
  EXPECT_STATUS(c.Append(ap), absl::StatusCode::kNotFound, "997");
  ap.sequence_id = 21;
  const Matrix av2 = RandomMatrix(2, kDim, 7);
  ap.values = av2.view();
  EXPECT_STATUS(c.Append(ap), absl::StatusCode::kInvalidArgument, "values.rows 2 != keys.rows 3");

  // Drop.
  EXPECT_STATUS(c.DropSequence(996), absl::StatusCode::kNotFound, "996");

  // Nothing changed: the same partials, the same shards.
  Partials after(kHeads, kDim);
  ASSERT_TRUE(c.Attend(good, after.view()).ok());
  ExpectSamePartials(after, before, "after bad requests");
  auto shards = c.ListShards(21);
  ASSERT_TRUE(shards.ok());
  ASSERT_EQ(shards->size(), 1u);
  EXPECT_EQ((*shards)[0].n_keys, 200);
  EXPECT_EQ((*shards)[0].last_position, 199);
  EXPECT_STATUS(c.ListShards(995).status(), absl::StatusCode::kNotFound, "995");
  ASSERT_TRUE(c.DropSequence(21).ok());
  ASSERT_TRUE(ref.DropSequence(21).ok());
}

// Every client call carries a deadline: against a TCP listener that never
// speaks HTTP/2 (the kernel completes the handshake; nobody accepts), each
// call ends with DEADLINE_EXCEEDED after its configured timeout.
TEST(NodeDeadlineTest, EveryCallHasADeadline) {
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  ASSERT_GE(fd, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  ASSERT_EQ(listen(fd, 16), 0);
  socklen_t len = sizeof(addr);
  ASSERT_EQ(getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len), 0);
  const std::string target = "127.0.0.1:" + std::to_string(ntohs(addr.sin_port));
  GrpcClientOptions o;
  o.attend_timeout = absl::Milliseconds(100);
  o.upload_timeout = absl::Milliseconds(150);
  o.control_timeout = absl::Milliseconds(120);
  auto c = Connect(target, o);
  const auto kDeadline = absl::StatusCode::kDeadlineExceeded;
  const auto start = std::chrono::steady_clock::now();
  EXPECT_EQ(c->CreateSequence(Spec(1, DType::kF32, IndexType::kFlat)).code(), kDeadline);
  const Matrix keys = RandomMatrix(10, kDim, 1);
  ShardUpload up;
  up.keys = keys.view();
  up.values = keys.view();
  EXPECT_EQ(c->UploadShard(up).code(), kDeadline);
  AppendRequest ap;
  ap.keys = keys.view();
  ap.values = keys.view();
  EXPECT_EQ(c->Append(ap).code(), kDeadline);
  const Matrix q = RandomMatrix(kHeads, kDim, 2);
  AttendRequest req;
  req.queries = q.view();
  Partials out(kHeads, kDim);
  EXPECT_EQ(c->Attend(req, out.view()).code(), kDeadline);
  EXPECT_EQ(c->DropSequence(1).code(), kDeadline);
  EXPECT_EQ(c->Stats().status().code(), kDeadline);
  EXPECT_EQ(c->ListShards(std::nullopt).status().code(), kDeadline);
  EXPECT_EQ(c->WaitForReady(absl::Milliseconds(50)).code(), kDeadline);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_GE(seconds, 0.1 + 0.15 + 0.12 * 5);
  EXPECT_LT(seconds, 10.0);
  c.reset();
  close(fd);
}

// A node of its own with a small memory budget and message cap.
TEST(NodeLimitsTest, MemoryBudgetAndMessageSize) {
  constexpr int64_t kBudget = 400000;
  auto node = NodeProcess::Start(
      NodeArgs({"--memory_budget_bytes=" + std::to_string(kBudget), "--max_message_bytes=262144"}));
  ASSERT_NE(node, nullptr);
  GrpcClientOptions opts;
  opts.upload_chunk_bytes = 65536;
  auto c = Connect(node->address(), opts);
  SequenceSpec spec = Spec(1, DType::kF32, IndexType::kFlat);
  ASSERT_TRUE(c->CreateSequence(spec).ok());
  // 1000 keys x 32 dims: 128 KB keys + 128 KB values + 8 KB positions.
  const Matrix keys = RandomMatrix(1000, kDim, 1), values = RandomMatrix(1000, kDim, 2);
  ShardUpload up;
  up.key = ShardKey{1, 0, 0, 0};
  up.keys = keys.view();
  up.values = values.view();
  ASSERT_TRUE(c->UploadShard(up).ok());  // streamed in 64 KiB parts under the 256 KiB cap
  up.key = ShardKey{1, 0, 1, 0};
  EXPECT_STATUS(c->UploadShard(up), absl::StatusCode::kResourceExhausted,
                "memory_budget_bytes 400000");
  auto stats = c->Stats();
  ASSERT_TRUE(stats.ok());
  EXPECT_EQ(stats->shards, 1);
  EXPECT_LE(stats->memory_bytes, kBudget);
  // Appends are admitted against the same budget.
  const Matrix big_k = RandomMatrix(600, kDim, 3), big_v = RandomMatrix(600, kDim, 4);
  AppendRequest ap;
  ap.sequence_id = 1;
  ap.layer = 0;
  ap.kv_head = 0;
  ap.first_position = 1000;
  ap.keys = big_k.view();
  ap.values = big_v.view();
  EXPECT_STATUS(c->Append(ap), absl::StatusCode::kResourceExhausted, "memory_budget_bytes 400000");
  // A message over --max_message_bytes is refused by gRPC itself.
  const Matrix huge_k = RandomMatrix(1200, kDim, 5), huge_v = RandomMatrix(1200, kDim, 6);
  ap.keys = huge_k.view();
  ap.values = huge_v.view();
  EXPECT_EQ(c->Append(ap).code(), absl::StatusCode::kResourceExhausted);
  // Dropping frees the budget.
  ASSERT_TRUE(c->DropSequence(1).ok());
  ASSERT_TRUE(c->CreateSequence(spec).ok());
  const absl::Status again = c->UploadShard(up);
  EXPECT_TRUE(again.ok()) << again;
  // Close our connection first: an idle client channel answers the server's
  // graceful-GOAWAY ping only from gRPC's 5 s backup poller, which would
  // delay the node's exit by that much.
  c.reset();
  const std::optional<int> status = node->Stop(SIGTERM);
  ASSERT_TRUE(status.has_value());
  EXPECT_TRUE(WIFEXITED(*status) && WEXITSTATUS(*status) == 0) << *status;
}

// SIGTERM while Attends are in flight: every one of them completes, none
// hangs, the process exits 0. Calls the node had started finish OK; calls
// gRPC had received but not yet dispatched to a handler when Shutdown began
// are cancelled by gRPC (CANCELLED), later ones are refused (UNAVAILABLE).
TEST(NodeLifecycleTest, SigtermDrainsAndExitsZero) {
  auto node = NodeProcess::Start(NodeArgs());
  ASSERT_NE(node, nullptr);
  auto c = Connect(node->address());
  const SequenceSpec spec = Spec(3, DType::kF32, IndexType::kGraph);
  ASSERT_TRUE(c->CreateSequence(spec).ok());
  const Matrix keys = RandomMatrix(2000, kDim, 1), values = RandomMatrix(2000, kDim, 2);
  ShardUpload up;
  up.key = ShardKey{3, 0, 0, 0};
  up.keys = keys.view();
  up.values = values.view();
  ASSERT_TRUE(c->UploadShard(up).ok());
  const Matrix q = RandomMatrix(kHeads, kDim, 3);
  AttendRequest req;
  req.sequence_id = 3;
  req.layer = 0;
  req.queries = q.view();
  req.k = 100;
  constexpr int kCalls = 64;
  std::vector<Partials> outs(kCalls, Partials(kHeads, kDim));
  std::vector<StatusWaiter> waiters(kCalls);
  for (int i = 0; i < kCalls; ++i) c->AttendAsync(req, outs[i].view(), nullptr, waiters[i].callback());
  ASSERT_TRUE(waiters[0].Wait().ok());  // the node is serving them
  kill(node->pid(), SIGTERM);
  int ok = 0;
  for (int i = 0; i < kCalls; ++i) {
    const absl::Status st = waiters[i].Wait();
    EXPECT_TRUE(st.ok() || st.code() == absl::StatusCode::kUnavailable ||
                st.code() == absl::StatusCode::kCancelled)
        << st;
    ok += st.ok() ? 1 : 0;
  }
  EXPECT_GE(ok, 1);
  const std::optional<int> status = node->Stop(SIGTERM);
  ASSERT_TRUE(status.has_value()) << "kvr_node did not exit after SIGTERM";
  EXPECT_TRUE(WIFEXITED(*status) && WEXITSTATUS(*status) == 0) << *status;
}

}  // namespace
}  // namespace kvr::retrieval
