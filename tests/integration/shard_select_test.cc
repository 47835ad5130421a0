// AttendRequest.shards (per-node shard selection for replicas), end to end:
//  * in-process: with 2 chunks per kv head (plus an appended tail on the
//    last chunk), every selection equals an exact double-precision attention
//    over exactly the selected shards' keys (flat index, k >= shard size);
//    with the graph index, a selection on a node holding every shard equals,
//    bit for bit, Attend on a node holding only the selected shards; listing
//    every shard equals listing none, bit for bit;
//  * the same selections over gRPC and UCX against a real kvr_node give the
//    in-process partials bit for bit;
//  * errors (in-process, gRPC, UCX): a duplicate entry and more entries than
//    the layer holds shards are INVALID_ARGUMENT naming `shards`; a kv_head
//    out of range is INVALID_ARGUMENT; a shard the node lacks is NOT_FOUND
//    naming the shard.
// When UCX cannot run here the UCX cases skip with the UCX error.
//
// Usage: shard_select_test --kvr_node PATH [gtest flags]
#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "common/attention.h"
#include "common/tensor.h"
#include "gtest/gtest.h"
#include "retrieval_node/client/grpc_retrieval_client.h"
#include "retrieval_node/client/in_process_client.h"
#include "retrieval_node/client/ucx_retrieval_client.h"
#include "tests/support/server_process.h"
#include "tests/support/test_data.h"

namespace kvr::retrieval {
namespace {

using kvr::test_support::ExpectSamePartials;
using kvr::test_support::NodeProcess;
using kvr::test_support::RandomMatrix;

constexpr int kLayers = 2, kHeads = 4, kKvHeads = 2, kDim = 16;
constexpr int kChunks = 2, kChunkKeys = 300, kAppended = 20;
constexpr int kTailCapacity = 64;  // the appended rows stay in the tail

SequenceSpec Spec(uint64_t id, IndexType index) {
  SequenceSpec spec;
  spec.sequence_id = id;
  spec.n_layers = kLayers;
  spec.n_heads = kHeads;
  spec.n_kv_heads = kKvHeads;
  spec.head_dim = kDim;
  spec.value_dtype = DType::kF32;
  spec.index_type = index;
  return spec;
}

// The rows of shard (layer, g, c) (c == kChunks: the appended tail).
struct Rows {
  Matrix keys, values;
  int64_t first_position = 0;
};
Rows ShardRows(uint64_t id, int layer, int g, int c) {
  const uint32_t seed = static_cast<uint32_t>(id * 1000 + layer * 100 + g * 10 + c);
  Rows r;
  const int n = c == kChunks ? kAppended : kChunkKeys;
  r.keys = RandomMatrix(n, kDim, seed, 0.5f);
  r.values = RandomMatrix(n, kDim, seed + 500);
  r.first_position = int64_t{c} * kChunkKeys;
  return r;
}

// Loads the shards `keep(layer, g, c)` of sequence `id` (tails go with the
// last chunk) into each client.
template <typename Keep>
void Load(uint64_t id, IndexType index, const std::vector<RetrievalClient*>& clients, Keep keep) {
  for (RetrievalClient* c : clients) ASSERT_TRUE(c->CreateSequence(Spec(id, index)).ok());
  for (int layer = 0; layer < kLayers; ++layer) {
    for (int g = 0; g < kKvHeads; ++g) {
      for (int c = 0; c < kChunks; ++c) {
        if (!keep(layer, g, c)) continue;
        const Rows r = ShardRows(id, layer, g, c);
        ShardUpload up;
        up.key = ShardKey{id, layer, g, c};
        up.first_position = r.first_position;
        up.keys = r.keys.view();
        up.values = r.values.view();
        for (RetrievalClient* client : clients) {
          const absl::Status st = client->UploadShard(up);
          ASSERT_TRUE(st.ok()) << st;
        }
      }
      if (!keep(layer, g, kChunks - 1)) continue;
      const Rows t = ShardRows(id, layer, g, kChunks);
      AppendRequest a;
      a.sequence_id = id;
      a.layer = layer;
      a.kv_head = g;
      a.first_position = t.first_position;
      a.keys = t.keys.view();
      a.values = t.values.view();
      for (RetrievalClient* client : clients) ASSERT_TRUE(client->Append(a).ok());
    }
  }
}

Matrix Queries(int layer) { return RandomMatrix(kHeads, kDim, 7000 + layer, 0.5f); }

absl::StatusOr<Partials> AttendSel(RetrievalClient* client, uint64_t id, int layer,
                                   const std::vector<HeadChunkRef>& shards,
                                   AttendStats* stats = nullptr) {
  const Matrix q = Queries(layer);
  AttendRequest req;
  req.sequence_id = id;
  req.layer = layer;
  req.queries = q.view();
  req.k = 4096;
  req.shards = shards;
  Partials out(kHeads, kDim);
  KVR_RETURN_IF_ERROR(client->Attend(req, out.view(), stats));
  return out;
}

// Exact attention in double precision of every query head over the
// selected shards' rows: o, m, l as a Partial defines them.
void ExpectExact(const Partials& got, uint64_t id, int layer,
                 const std::vector<HeadChunkRef>& shards, const std::string& what) {
  const Matrix q = Queries(layer);
  const double scale = 1.0 / std::sqrt(double{kDim});
  const int group = kHeads / kKvHeads;
  for (int h = 0; h < kHeads; ++h) {
    const int g = h / group;
    std::vector<double> scores;
    std::vector<std::vector<float>> vals;
    for (const HeadChunkRef& s : shards) {
      if (s.kv_head != g) continue;
      std::vector<int> parts = {s.chunk};
      if (s.chunk == kChunks - 1) parts.push_back(kChunks);  // the tail joins the last chunk
      for (int c : parts) {
        const Rows r = ShardRows(id, layer, g, c);
        for (size_t i = 0; i < r.keys.rows; ++i) {
          double dot = 0;
          for (int j = 0; j < kDim; ++j) dot += double{q.row(h)[j]} * r.keys.row(i)[j];
          scores.push_back(dot * scale);
          vals.emplace_back(r.values.row(i), r.values.row(i) + kDim);
        }
      }
    }
    if (scores.empty()) {
      EXPECT_EQ(got.l[h], 0.0f) << what << " head " << h;
      continue;
    }
    double m = -INFINITY;
    for (double s : scores) m = std::max(m, s);
    double l = 0;
    std::vector<double> o(kDim, 0.0);
    for (size_t i = 0; i < scores.size(); ++i) {
      const double w = std::exp(scores[i] - m);
      l += w;
      for (int j = 0; j < kDim; ++j) o[j] += w * vals[i][j];
    }
    EXPECT_NEAR(got.m[h], m, 1e-5) << what << " head " << h;
    EXPECT_NEAR(got.l[h], l, 1e-4 * l) << what << " head " << h;
    for (int j = 0; j < kDim; ++j) {
      EXPECT_NEAR(got.o.row(h)[j], o[j] / l, 1e-5) << what << " head " << h << " col " << j;
    }
  }
}

std::unique_ptr<InProcessRetrievalClient> InProcess() {
  NodeCoreOptions o;
  o.threads = 2;
  o.tail_capacity = kTailCapacity;
  auto c = InProcessRetrievalClient::Create(o);
  EXPECT_TRUE(c.ok()) << c.status();
  return std::move(c).value();
}

const std::vector<std::vector<HeadChunkRef>>& Selections() {
  static const auto* s = new std::vector<std::vector<HeadChunkRef>>{
      {{0, 0}}, {{0, 1}}, {{1, 1}, {0, 0}}, {{1, 0}, {0, 1}}, {{0, 0}, {0, 1}}, {{1, 1}}};
  return *s;
}
const std::vector<HeadChunkRef> kAll = {{0, 0}, {0, 1}, {1, 0}, {1, 1}};

constexpr uint64_t kFlatSeq = 41, kGraphSeq = 42;

// Status and message of each bad selection, for any client.
void ExpectErrors(RetrievalClient* client, const std::string& where) {
  auto dup = AttendSel(client, kFlatSeq, 0, {{0, 1}, {1, 0}, {0, 1}});
  EXPECT_EQ(dup.status().code(), absl::StatusCode::kInvalidArgument) << where << dup.status();
  EXPECT_NE(dup.status().message().find("shards"), std::string::npos) << where << dup.status();
  EXPECT_NE(dup.status().message().find("more than once"), std::string::npos) << dup.status();
  std::vector<HeadChunkRef> too_many = kAll;
  too_many.push_back({0, 0});
  auto many = AttendSel(client, kFlatSeq, 0, too_many);
  EXPECT_EQ(many.status().code(), absl::StatusCode::kInvalidArgument) << where << many.status();
  EXPECT_NE(many.status().message().find("shards lists 5 entries"), std::string::npos)
      << where << many.status();
  EXPECT_NE(many.status().message().find("has 4 shards"), std::string::npos) << many.status();
  auto head = AttendSel(client, kFlatSeq, 0, {{kKvHeads, 0}});
  EXPECT_EQ(head.status().code(), absl::StatusCode::kInvalidArgument) << where << head.status();
  EXPECT_NE(head.status().message().find("kv_head 2"), std::string::npos) << head.status();
  auto missing = AttendSel(client, kFlatSeq, 1, {{1, 5}});
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound) << where << missing.status();
  EXPECT_NE(missing.status().message().find("(seq 41, layer 1, kv head 1, chunk 5)"),
            std::string::npos)
      << where << missing.status();
}

TEST(ShardSelectTest, InProcessSelectionEqualsExactAttentionOverTheSelectedShards) {
  auto node = InProcess();
  ASSERT_NO_FATAL_FAILURE(Load(kFlatSeq, IndexType::kFlat, {node.get()},
                               [](int, int, int) { return true; }));
  for (int layer = 0; layer < kLayers; ++layer) {
    for (const auto& sel : Selections()) {
      AttendStats stats;
      auto got = AttendSel(node.get(), kFlatSeq, layer, sel, &stats);
      ASSERT_TRUE(got.ok()) << got.status();
      int searched = 0;
      for (const HeadChunkRef& s : sel) searched += s.chunk == kChunks - 1 ? 2 : 1;
      EXPECT_EQ(stats.shards_searched, searched);
      ExpectExact(*got, kFlatSeq, layer, sel, "layer " + std::to_string(layer));
    }
    auto all = AttendSel(node.get(), kFlatSeq, layer, {});
    auto listed = AttendSel(node.get(), kFlatSeq, layer, kAll);
    ASSERT_TRUE(all.ok() && listed.ok());
    ExpectSamePartials(*all, *listed, "every shard listed vs none");
    ExpectExact(*all, kFlatSeq, layer, kAll, "no selection");
  }
}

TEST(ShardSelectTest, InProcessGraphSelectionEqualsANodeHoldingOnlyThoseShards) {
  auto full = InProcess();
  ASSERT_NO_FATAL_FAILURE(Load(kGraphSeq, IndexType::kGraph, {full.get()},
                               [](int, int, int) { return true; }));
  for (const auto& sel : Selections()) {
    auto part = InProcess();
    ASSERT_NO_FATAL_FAILURE(Load(kGraphSeq, IndexType::kGraph, {part.get()},
                                 [&](int, int g, int c) {
                                   for (const HeadChunkRef& s : sel) {
                                     if (s.kv_head == g && s.chunk == c) return true;
                                   }
                                   return false;
                                 }));
    for (int layer = 0; layer < kLayers; ++layer) {
      auto a = AttendSel(full.get(), kGraphSeq, layer, sel);
      auto b = AttendSel(part.get(), kGraphSeq, layer, {});
      ASSERT_TRUE(a.ok() && b.ok()) << a.status() << b.status();
      ExpectSamePartials(*a, *b, "selection vs node holding only it");
    }
  }
}

TEST(ShardSelectTest, InProcessErrors) {
  auto node = InProcess();
  ASSERT_NO_FATAL_FAILURE(Load(kFlatSeq, IndexType::kFlat, {node.get()},
                               [](int, int, int) { return true; }));
  ExpectErrors(node.get(), "in-process");
}

class RemoteShardSelectTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    // Synchronous builds, as the in-process reference's.
    node_ = NodeProcess::Start({"--defer_index_build=false", "--threads=2",
                                "--control_threads=2", "--metrics_listen=",
                                "--tail_capacity=" + std::to_string(kTailCapacity),
                                "--ucx_listen=127.0.0.1:0"});
    ASSERT_NE(node_, nullptr);
    auto grpc = GrpcRetrievalClient::Create(node_->address());
    ASSERT_TRUE(grpc.ok()) << grpc.status();
    ASSERT_TRUE((*grpc)->WaitForReady(absl::Seconds(10)).ok());
    grpc_ = std::move(grpc).value();
    auto grpc2 = GrpcRetrievalClient::Create(node_->address());
    ASSERT_TRUE(grpc2.ok());
    auto ucx = UcxRetrievalClient::Create(std::move(grpc2).value());
    ASSERT_TRUE(ucx.ok()) << ucx.status();
    ucx_ = std::move(ucx).value();
    ref_ = InProcess();
    for (auto [id, type] : {std::pair{kFlatSeq, IndexType::kFlat},
                            std::pair{kGraphSeq, IndexType::kGraph}}) {
      ASSERT_NO_FATAL_FAILURE(Load(id, type, {grpc_.get(), ref_.get()},
                                   [](int, int, int) { return true; }));
    }
  }
  static void TearDownTestSuite() {
    ucx_.reset();
    grpc_.reset();
    ref_.reset();
    node_.reset();
  }
  void SetUp() override { ASSERT_NE(ref_, nullptr); }

  void ExpectSameAsInProcess(RetrievalClient* client, const std::string& what) {
    for (uint64_t id : {kFlatSeq, kGraphSeq}) {
      for (int layer = 0; layer < kLayers; ++layer) {
        for (const auto& sel : Selections()) {
          AttendStats s1, s2;
          auto a = AttendSel(client, id, layer, sel, &s1);
          auto b = AttendSel(ref_.get(), id, layer, sel, &s2);
          ASSERT_TRUE(a.ok()) << what << a.status();
          ASSERT_TRUE(b.ok()) << b.status();
          ExpectSamePartials(*a, *b, what);
          EXPECT_EQ(s1.shards_searched, s2.shards_searched) << what;
          EXPECT_EQ(s1.keys_held, s2.keys_held) << what;
        }
      }
    }
  }

  static std::unique_ptr<NodeProcess> node_;
  static std::unique_ptr<GrpcRetrievalClient> grpc_;
  static std::unique_ptr<UcxRetrievalClient> ucx_;
  static std::unique_ptr<InProcessRetrievalClient> ref_;
};
std::unique_ptr<NodeProcess> RemoteShardSelectTest::node_;
std::unique_ptr<GrpcRetrievalClient> RemoteShardSelectTest::grpc_;
std::unique_ptr<UcxRetrievalClient> RemoteShardSelectTest::ucx_;
std::unique_ptr<InProcessRetrievalClient> RemoteShardSelectTest::ref_;

TEST_F(RemoteShardSelectTest, GrpcSelectionIsBitIdenticalToInProcess) {
  ExpectSameAsInProcess(grpc_.get(), "gRPC");
  ExpectErrors(grpc_.get(), "gRPC");
}

TEST_F(RemoteShardSelectTest, UcxSelectionIsBitIdenticalToInProcess) {
  if (!ucx_->using_ucx()) GTEST_SKIP() << "UCX unavailable here: " << ucx_->fallback_reason();
  ExpectSameAsInProcess(ucx_.get(), "UCX");
  ExpectErrors(ucx_.get(), "UCX");
}

}  // namespace
}  // namespace kvr::retrieval

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  if (!kvr::test_support::ParseNodeBinaryFlag(argc, argv)) return 2;
  return RUN_ALL_TESTS();
}
