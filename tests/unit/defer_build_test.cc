// Deferred index builds of the retrieval node (NodeCoreOptions::
// defer_index_build, kvr_node --defer_index_build; session 27, issue 17
// item 5). Each test holds the background build open with the
// before_index_build hook (or runs no build thread at all) so that what it
// checks does not depend on timing, and polls with a deadline (no sleeps):
//
//  (a) right after UploadShard the chunk is pending and an Attend equals,
//      bit for bit, a node whose chunk is a flat (exact) index over the same
//      keys; once the build installs, the node equals (bit for bit, same
//      index kind, same memory accounted) a node that built synchronously;
//  (b) appends that fill the tail several times over while the build is
//      pending lose no row (every position held once), are searched exactly
//      until the install (top-k = the exact top-k over all keys), and seal
//      after it (recall@8 of the appended keys >= 0.95 over the graph);
//  (c) DropSequence during a held build returns the memory counter to its
//      baseline once the build ends, the build is discarded, and the node
//      keeps serving;
//  (d) a restart after an acknowledged deferred upload whose build never ran
//      serves the chunk with the same (exact) partials; a restart after the
//      install serves the persisted built index with the same partials.
#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "common/attention.h"
#include "common/tensor.h"
#include "gtest/gtest.h"
#include "retrieval_node/core/node_core.h"
#include "retrieval_node/store/shard_store.h"
#include "tests/support/temp_dir.h"
#include "tests/support/test_data.h"

namespace kvr::retrieval {
namespace {

using Clock = std::chrono::steady_clock;
constexpr auto kDeadline = std::chrono::seconds(60);

constexpr int kHeads = 2, kKvHeads = 1, kDim = 32;
constexpr size_t kTail = 16;
constexpr size_t kPrefill = 2048;
constexpr size_t kAppended = 5 * kTail;  // appended while the build is pending
constexpr uint64_t kSeq = 7;

using test_support::ExpectSamePartials;
using test_support::RandomMatrix;

// Holds every deferred build at its start until opened.
class BuildGate {
 public:
  std::function<void()> Hook() {
    return [this] {
      std::unique_lock<std::mutex> lock(mu_);
      ++entered_;
      cv_.notify_all();
      cv_.wait_for(lock, kDeadline, [&] { return open_; });
    };
  }
  bool AwaitEntered(int n) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, kDeadline, [&] { return entered_ >= n; });
  }
  void Open() {
    std::lock_guard<std::mutex> lock(mu_);
    open_ = true;
    cv_.notify_all();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int entered_ = 0;
  bool open_ = false;
};

NodeCoreOptions Options(bool defer) {
  NodeCoreOptions o;
  o.tail_capacity = kTail;
  o.threads = 1;
  o.recalibrate_every = 0;  // no timing-dependent effort swaps
  o.defer_index_build = defer;
  return o;
}

std::unique_ptr<NodeCore> NewNode(const NodeCoreOptions& o) {
  auto n = NodeCore::Create(o);
  EXPECT_TRUE(n.ok()) << n.status();
  return n.ok() ? std::move(*n) : nullptr;
}

SequenceSpec Spec(IndexType type) {
  SequenceSpec s;
  s.sequence_id = kSeq;
  s.n_layers = 1;
  s.n_heads = kHeads;
  s.n_kv_heads = kKvHeads;
  s.head_dim = kDim;
  s.index_type = type;
  return s;
}

struct Data {
  Matrix keys = RandomMatrix(kPrefill + 2 * kAppended, kDim, 11);
  Matrix values = RandomMatrix(kPrefill + 2 * kAppended, kDim, 12);
  Matrix queries = RandomMatrix(8 * kHeads, kDim, 13);  // 8 Attends of kHeads rows
  Matrix train = RandomMatrix(256, kDim, 14);           // training queries of the upload
};

void Load(NodeCore* node, const Data& data, IndexType type) {
  ASSERT_TRUE(node->CreateSequence(Spec(type)).ok());
  ShardUpload up;
  up.key = {kSeq, 0, 0, 0};
  up.keys = data.keys.view().rows_slice(0, kPrefill);
  up.values = data.values.view().rows_slice(0, kPrefill);
  up.train_queries = data.train.view();
  up.train_k = 16;
  const absl::Status st = node->UploadShard(up);
  ASSERT_TRUE(st.ok()) << st;
}

absl::Status AppendRows(NodeCore* node, const Data& data, size_t first, size_t rows) {
  for (size_t i = first; i < first + rows; ++i) {
    AppendRequest a;
    a.sequence_id = kSeq;
    a.first_position = static_cast<int64_t>(kPrefill + i);
    a.keys = data.keys.view().rows_slice(kPrefill + i, 1);
    a.values = data.values.view().rows_slice(kPrefill + i, 1);
    KVR_RETURN_IF_ERROR(node->Append(a));
  }
  return absl::OkStatus();
}

absl::StatusOr<Partials> Attend(NodeCore* node, const Data& data, size_t which) {
  AttendRequest r;
  r.sequence_id = kSeq;
  r.queries = data.queries.view().rows_slice(which * kHeads, kHeads);
  r.k = 8;
  Partials out(kHeads, kDim);
  StatusWaiter waiter;
  node->AttendAsync(r, out.view(), nullptr, waiter.callback());
  KVR_RETURN_IF_ERROR(waiter.Wait());
  return out;
}

// Every query set's partials of `a` and `b`, bit for bit.
void ExpectNodesAgree(NodeCore* a, NodeCore* b, const Data& data, const std::string& what) {
  for (size_t w = 0; w < 8; ++w) {
    auto pa = Attend(a, data, w);
    auto pb = Attend(b, data, w);
    ASSERT_TRUE(pa.ok() && pb.ok()) << what << ": " << pa.status() << " / " << pb.status();
    ASSERT_NO_FATAL_FAILURE(ExpectSamePartials(*pa, *pb, what + " queries " + std::to_string(w)));
  }
}

ShardInfo OnlyShard(NodeCore* node) {
  auto shards = node->ListShards(kSeq);
  EXPECT_TRUE(shards.ok()) << shards.status();
  EXPECT_EQ(shards.ok() ? shards->size() : 0u, 1u);
  return shards.ok() && !shards->empty() ? shards->front() : ShardInfo{};
}

// Polls ListShards until the chunk's build installed (false at the deadline).
bool AwaitInstalled(NodeCore* node) {
  const auto deadline = Clock::now() + kDeadline;
  while (Clock::now() < deadline) {
    auto shards = node->ListShards(kSeq);
    if (shards.ok() && !shards->empty() && !shards->front().index_pending) {
      auto st = node->Stats();
      if (st.ok() && st->index_builds_pending == 0) return true;
    }
    std::this_thread::yield();
  }
  return false;
}

// Polls until the node accounts exactly `bytes` and runs no build.
bool AwaitMemory(NodeCore* node, int64_t bytes) {
  const auto deadline = Clock::now() + kDeadline;
  while (Clock::now() < deadline) {
    auto st = node->Stats();
    if (node->MemoryUsedBytes() == bytes && st.ok() && st->index_builds_pending == 0) return true;
    std::this_thread::yield();
  }
  return false;
}

TEST(DeferBuildTest, PendingChunkIsExactThenEqualsTheSynchronousBuild) {
  const Data data;
  BuildGate gate;
  // threads 0: builds and Attends on one thread each, so the two nodes' graph
  // builds are identical (a parallel build may differ in its vectors'
  // capacity and edges).
  NodeCoreOptions o = Options(true);
  o.threads = 0;
  o.before_index_build = gate.Hook();
  NodeCoreOptions so = Options(false);
  so.threads = 0;
  auto node = NewNode(o);
  auto sync = NewNode(so);
  auto flat = NewNode(so);
  ASSERT_TRUE(node && sync && flat);
  ASSERT_NO_FATAL_FAILURE(Load(node.get(), data, IndexType::kGraph));
  ASSERT_NO_FATAL_FAILURE(Load(sync.get(), data, IndexType::kGraph));
  ASSERT_NO_FATAL_FAILURE(Load(flat.get(), data, IndexType::kFlat));
  ASSERT_TRUE(gate.AwaitEntered(1));

  ShardInfo info = OnlyShard(node.get());
  EXPECT_TRUE(info.index_pending);
  EXPECT_EQ(info.index_type, IndexType::kFlat);
  EXPECT_EQ(info.n_keys, static_cast<int64_t>(kPrefill));
  EXPECT_EQ(node->Stats()->index_builds_pending, 1);
  // The memory the synchronous build accounts is charged at upload already.
  EXPECT_GE(node->MemoryUsedBytes(), flat->MemoryUsedBytes());
  // Exact while pending: bit for bit the flat index over the same keys.
  ASSERT_NO_FATAL_FAILURE(ExpectNodesAgree(node.get(), flat.get(), data, "pending vs flat"));

  gate.Open();
  ASSERT_TRUE(AwaitInstalled(node.get())) << "the deferred build did not install";
  info = OnlyShard(node.get());
  const ShardInfo want = OnlyShard(sync.get());
  EXPECT_FALSE(info.index_pending);
  EXPECT_EQ(info.index_type, IndexType::kGraph);
  EXPECT_EQ(info.index_type, want.index_type);
  EXPECT_EQ(info.n_keys, want.n_keys);
  EXPECT_EQ(info.memory_bytes, want.memory_bytes);
  ASSERT_NO_FATAL_FAILURE(ExpectNodesAgree(node.get(), sync.get(), data, "installed vs sync"));
  // Both hold the same shard and (after those Attends) the same query ring.
  EXPECT_EQ(node->MemoryUsedBytes(), sync->MemoryUsedBytes());
}

TEST(DeferBuildTest, AppendsThatFillTheTailWhileABuildIsPendingLoseNoRow) {
  const Data data;
  BuildGate gate;
  NodeCoreOptions o = Options(true);
  o.before_index_build = gate.Hook();
  auto node = NewNode(o);
  ASSERT_TRUE(node);
  ASSERT_NO_FATAL_FAILURE(Load(node.get(), data, IndexType::kGraph));
  ASSERT_TRUE(gate.AwaitEntered(1));
  ASSERT_TRUE(AppendRows(node.get(), data, 0, kAppended).ok());
  ShardInfo info = OnlyShard(node.get());
  EXPECT_TRUE(info.index_pending);
  EXPECT_EQ(info.tail_keys, static_cast<int64_t>(kAppended)) << "a seal ran into a pending chunk";
  EXPECT_EQ(node->Stats()->seals, 0);

  // Exact over every key while pending: the top-k is the exact top-k.
  const size_t held = kPrefill + kAppended;
  const Matrix all = [&] {
    Matrix m(held, kDim);
    std::copy_n(data.keys.data.begin(), held * kDim, m.data.begin());
    return m;
  }();
  const Matrix& q = data.queries;
  auto got = node->SearchPositions(kSeq, 0, 0, q.view(), 8);
  ASSERT_TRUE(got.ok()) << got.status();
  const std::vector<int64_t> exact = test_support::ExactTopKIds(q, all, 8);
  for (size_t r = 0; r < q.rows; ++r) {
    std::set<int64_t> a(got->begin() + static_cast<std::ptrdiff_t>(r * 8),
                        got->begin() + static_cast<std::ptrdiff_t>(r * 8 + 8));
    std::set<int64_t> b(exact.begin() + static_cast<std::ptrdiff_t>(r * 8),
                        exact.begin() + static_cast<std::ptrdiff_t>(r * 8 + 8));
    EXPECT_EQ(a, b) << "query " << r;
  }

  gate.Open();
  ASSERT_TRUE(AwaitInstalled(node.get()));
  // More appends: the long tail seals into the built index now.
  ASSERT_TRUE(AppendRows(node.get(), data, kAppended, kAppended).ok());
  EXPECT_GT(node->Stats()->seals, 0);
  info = OnlyShard(node.get());
  EXPECT_EQ(info.index_type, IndexType::kGraph);
  EXPECT_EQ(info.n_keys + info.tail_keys, static_cast<int64_t>(kPrefill + 2 * kAppended));
  EXPECT_LT(info.tail_keys, static_cast<int64_t>(2 * kTail));
  auto positions = node->HeldPositions(kSeq, 0, 0);
  ASSERT_TRUE(positions.ok());
  ASSERT_EQ(positions->size(), kPrefill + 2 * kAppended);
  for (size_t i = 0; i < positions->size(); ++i) ASSERT_EQ((*positions)[i], int64_t(i));

  // Every appended key, used as a query, finds its exact top-1 (over all
  // keys) among the node's 8: recall >= 0.95 (graph search after the seals).
  const size_t total = kPrefill + 2 * kAppended;
  Matrix everything(total, kDim);
  std::copy_n(data.keys.data.begin(), total * kDim, everything.data.begin());
  Matrix probes(2 * kAppended, kDim);
  std::copy_n(data.keys.row(kPrefill), 2 * kAppended * kDim, probes.data.begin());
  const std::vector<int64_t> top1 = test_support::ExactTopKIds(probes, everything, 1);
  auto found = node->SearchPositions(kSeq, 0, 0, probes.view(), 8);
  ASSERT_TRUE(found.ok()) << found.status();
  size_t hits = 0;
  for (size_t r = 0; r < probes.rows; ++r) {
    const auto begin = found->begin() + static_cast<std::ptrdiff_t>(r * 8);
    hits += std::find(begin, begin + 8, top1[r]) != begin + 8 ? 1 : 0;
  }
  EXPECT_GE(static_cast<double>(hits), 0.95 * static_cast<double>(probes.rows))
      << hits << " of " << probes.rows;
}

TEST(DeferBuildTest, DropDuringABuildReturnsTheMemoryAndTheNodeKeepsServing) {
  const Data data;
  BuildGate gate;
  NodeCoreOptions o = Options(true);
  o.before_index_build = gate.Hook();
  auto node = NewNode(o);
  ASSERT_TRUE(node);
  const int64_t baseline = node->MemoryUsedBytes();
  ASSERT_NO_FATAL_FAILURE(Load(node.get(), data, IndexType::kGraph));
  ASSERT_TRUE(gate.AwaitEntered(1));
  EXPECT_GT(node->MemoryUsedBytes(), baseline);
  ASSERT_TRUE(node->DropSequence(kSeq).ok());
  gate.Open();
  EXPECT_TRUE(AwaitMemory(node.get(), baseline))
      << "memory " << node->MemoryUsedBytes() << " != baseline " << baseline;
  EXPECT_EQ(node->Stats()->shards, 0);

  // Serving goes on: the same sequence again builds and answers.
  ASSERT_NO_FATAL_FAILURE(Load(node.get(), data, IndexType::kGraph));
  ASSERT_TRUE(Attend(node.get(), data, 0).ok());
  ASSERT_TRUE(AwaitInstalled(node.get()));
  EXPECT_EQ(OnlyShard(node.get()).index_type, IndexType::kGraph);
  ASSERT_TRUE(node->DropSequence(kSeq).ok());
  EXPECT_TRUE(AwaitMemory(node.get(), baseline));
}

// A node over the store in `dir`, recovered from it (the store outlives it).
struct RecoveredNode {
  std::unique_ptr<ShardStore> store;
  std::unique_ptr<NodeCore> node;
};
void Reopen(const std::string& dir, NodeCoreOptions o, RecoveredNode* out) {
  auto store = ShardStore::Open(dir);
  ASSERT_TRUE(store.ok()) << store.status();
  out->store = std::move(*store);
  o.persistence = out->store.get();
  out->node = NewNode(o);
  ASSERT_TRUE(out->node != nullptr);
  const absl::Status recovered = out->node->Recover();
  ASSERT_TRUE(recovered.ok()) << recovered;
}

std::vector<Partials> AttendAll(NodeCore* node, const Data& data) {
  std::vector<Partials> out;
  for (size_t w = 0; w < 8; ++w) {
    auto p = Attend(node, data, w);
    EXPECT_TRUE(p.ok()) << p.status();
    if (p.ok()) out.push_back(*std::move(p));
  }
  return out;
}

TEST(DeferBuildTest, RestartAfterAnAcknowledgedDeferredUploadServesTheSameResults) {
  const Data data;
  test_support::TempDir dir("kvr_defer");
  std::vector<Partials> before;
  {
    // No build thread: the build never runs before the stop.
    NodeCoreOptions o = Options(true);
    o.index_build_threads = 0;
    RecoveredNode n;
    ASSERT_NO_FATAL_FAILURE(Reopen(dir.path(), o, &n));
    ASSERT_NO_FATAL_FAILURE(Load(n.node.get(), data, IndexType::kGraph));
    EXPECT_TRUE(OnlyShard(n.node.get()).index_pending);
    before = AttendAll(n.node.get(), data);
  }
  std::vector<Partials> built;
  {
    RecoveredNode n;
    ASSERT_NO_FATAL_FAILURE(Reopen(dir.path(), Options(true), &n));
    const ShardInfo info = OnlyShard(n.node.get());
    EXPECT_FALSE(info.index_pending);
    EXPECT_EQ(info.index_type, IndexType::kFlat);  // recovered as stored: exact
    EXPECT_EQ(info.n_keys, static_cast<int64_t>(kPrefill));
    const std::vector<Partials> after = AttendAll(n.node.get(), data);
    ASSERT_EQ(after.size(), before.size());
    for (size_t i = 0; i < after.size(); ++i) {
      ASSERT_NO_FATAL_FAILURE(ExpectSamePartials(before[i], after[i], "after restart"));
    }
    // A second sequence whose build installs before the stop: the built
    // index is persisted and recovered.
    ASSERT_TRUE(n.node->DropSequence(kSeq).ok());
    ASSERT_NO_FATAL_FAILURE(Load(n.node.get(), data, IndexType::kGraph));
    ASSERT_TRUE(AwaitInstalled(n.node.get()));
    built = AttendAll(n.node.get(), data);
  }
  RecoveredNode n;
  ASSERT_NO_FATAL_FAILURE(Reopen(dir.path(), Options(true), &n));
  EXPECT_EQ(OnlyShard(n.node.get()).index_type, IndexType::kGraph);
  const std::vector<Partials> again = AttendAll(n.node.get(), data);
  ASSERT_EQ(again.size(), built.size());
  for (size_t i = 0; i < again.size(); ++i) {
    ASSERT_NO_FATAL_FAILURE(ExpectSamePartials(built[i], again[i], "built, after restart"));
  }
}

}  // namespace
}  // namespace kvr::retrieval
