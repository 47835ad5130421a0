// Background tail seals and the decode query ring of the retrieval node
// (NodeCore, retrieval_node/core/):
//
//  * while a tail seal's build is held open (NodeCoreOptions::
//    before_seal_build), Attends of the same sequence complete, each equal
//    bit for bit to a serial oracle node given the same appends (the seal is
//    not visible until installed), and appends below the install point
//    complete; the append that must install waits for the build without
//    holding the sequence lock (Attends issued meanwhile complete); once
//    installed the node equals the oracle again;
//  * a node that stops between a seal's build and its install (the install
//    is the only write of a seal) recovers every appended row, equals the
//    oracle, seals the same rows at the same append afterwards, and equals
//    it again after a second restart;
//  * the ring of decode queries (--decode_train_queries) is counted in the
//    memory budget, returned by DropSequence, skipped when it does not fit,
//    and its size is bounded.
// No sleeps: the held seal is awaited with a condition variable and a
// deadline.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <future>
#include <memory>
#include <mutex>
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
constexpr size_t kTail = 16;       // tail_capacity; the install comes kTail / 4 rows later
constexpr size_t kLag = kTail / 4;
constexpr size_t kPrefill = 2048;  // keys of the uploaded chunk
constexpr uint64_t kSeq = 7;

using test_support::ExpectSamePartials;
using test_support::RandomMatrix;

// Holds every seal build at its start until released.
class SealGate {
 public:
  std::function<void()> Hook() {
    return [this] {
      std::unique_lock<std::mutex> lock(mu_);
      ++entered_;
      cv_.notify_all();
      cv_.wait_for(lock, kDeadline, [&] { return open_; });
    };
  }
  // True once `n` builds have started (false at the deadline).
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

NodeCoreOptions Options() {
  NodeCoreOptions o;
  o.tail_capacity = kTail;
  o.threads = 2;
  o.decode_train_queries = 64;
  o.background_seals = true;  // what these tests are about (also the default)
  return o;
}

SequenceSpec Spec() {
  SequenceSpec s;
  s.sequence_id = kSeq;
  s.n_layers = 1;
  s.n_heads = kHeads;
  s.n_kv_heads = kKvHeads;
  s.head_dim = kDim;
  s.index_type = IndexType::kGraph;
  return s;
}

// The sequence's data: kPrefill uploaded keys, then appended rows.
struct Data {
  Matrix keys = RandomMatrix(kPrefill + 4 * kTail, kDim, 1);
  Matrix values = RandomMatrix(kPrefill + 4 * kTail, kDim, 2);
  Matrix queries = RandomMatrix(8, kDim, 3);  // 4 Attends of kHeads rows
};

void Load(NodeCore* node, const Data& data) {
  ASSERT_TRUE(node->CreateSequence(Spec()).ok());
  ShardUpload up;
  up.key = {kSeq, 0, 0, 0};
  up.keys = data.keys.view().rows_slice(0, kPrefill);
  up.values = data.values.view().rows_slice(0, kPrefill);
  ASSERT_TRUE(node->UploadShard(up).ok());
}

absl::Status AppendRow(NodeCore* node, const Data& data, size_t i) {
  AppendRequest a;
  a.sequence_id = kSeq;
  a.first_position = static_cast<int64_t>(kPrefill + i);
  a.keys = data.keys.view().rows_slice(kPrefill + i, 1);
  a.values = data.values.view().rows_slice(kPrefill + i, 1);
  return node->Append(a);
}

// Attend with query set `which` (k 8, the default beam).
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

// Every query set attended on both nodes gives identical partials.
void ExpectNodesAgree(NodeCore* node, NodeCore* oracle, const Data& data,
                      const std::string& what) {
  for (size_t w = 0; w < data.queries.rows / kHeads; ++w) {
    auto a = Attend(node, data, w);
    auto b = Attend(oracle, data, w);
    ASSERT_TRUE(a.ok()) << a.status();
    ASSERT_TRUE(b.ok()) << b.status();
    ASSERT_NO_FATAL_FAILURE(ExpectSamePartials(*a, *b, what + " queries " + std::to_string(w)));
  }
}

std::unique_ptr<NodeCore> NewNode(NodeCoreOptions o) {
  auto n = NodeCore::Create(o);
  EXPECT_TRUE(n.ok()) << n.status();
  return n.ok() ? std::move(*n) : nullptr;
}

// A node over the store in `dir`, recovered from it (the store outlives it).
struct RecoveredNode {
  std::unique_ptr<ShardStore> store;
  std::unique_ptr<NodeCore> node;
};
void Reopen(const std::string& dir, RecoveredNode* out) {
  auto store = ShardStore::Open(dir);
  ASSERT_TRUE(store.ok()) << store.status();
  out->store = std::move(*store);
  NodeCoreOptions o = Options();
  o.persistence = out->store.get();
  out->node = NewNode(o);
  ASSERT_TRUE(out->node != nullptr);
  const absl::Status recovered = out->node->Recover();
  ASSERT_TRUE(recovered.ok()) << recovered;
}

TEST(SealTest, AttendsRunWhileATailSealsAndAgreeWithASerialOracle) {
  const Data data;
  SealGate gate;
  NodeCoreOptions o = Options();
  o.before_seal_build = gate.Hook();
  auto node = NewNode(o);
  NodeCoreOptions oo = Options();
  // Same options, no gate: operations applied one at a time.
  auto oracle = NewNode(oo);
  ASSERT_TRUE(node && oracle);
  ASSERT_NO_FATAL_FAILURE(Load(node.get(), data));
  ASSERT_NO_FATAL_FAILURE(Load(oracle.get(), data));
  // Decode queries for the ring first (identical on both).
  ASSERT_NO_FATAL_FAILURE(ExpectNodesAgree(node.get(), oracle.get(), data, "prefill"));

  // The kTail-th row starts a seal, held open by the gate.
  for (size_t i = 0; i < kTail; ++i) {
    ASSERT_TRUE(AppendRow(node.get(), data, i).ok());
    ASSERT_TRUE(AppendRow(oracle.get(), data, i).ok());
  }
  ASSERT_TRUE(gate.AwaitEntered(1)) << "no seal started after " << kTail << " rows";
  // Rows below the install point complete while the build is held.
  for (size_t i = kTail; i < kTail + kLag - 1; ++i) {
    ASSERT_TRUE(AppendRow(node.get(), data, i).ok());
    ASSERT_TRUE(AppendRow(oracle.get(), data, i).ok());
  }
  // Attends from two threads while the build is held: every one completes
  // and equals the oracle (nothing is installed yet).
  std::vector<Partials> want;
  for (size_t w = 0; w < data.queries.rows / kHeads; ++w) {
    auto b = Attend(oracle.get(), data, w);
    ASSERT_TRUE(b.ok());
    want.push_back(*b);
  }
  std::atomic<int> failures{0};
  std::atomic<int64_t> max_ns{0};
  auto attend_loop = [&](int rounds) {
    for (int r = 0; r < rounds; ++r) {
      const size_t w = static_cast<size_t>(r) % want.size();
      const auto t = Clock::now();
      auto got = Attend(node.get(), data, w);
      const int64_t ns = std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - t).count();
      int64_t seen = max_ns.load();
      while (ns > seen && !max_ns.compare_exchange_weak(seen, ns)) {
      }
      if (!got.ok() || got->o.data != want[w].o.data || got->l != want[w].l ||
          got->m != want[w].m) {
        failures.fetch_add(1);
      }
    }
  };
  {
    std::thread a(attend_loop, 200), b(attend_loop, 200);
    a.join();
    b.join();
  }
  EXPECT_EQ(failures.load(), 0);
  // The append that installs must wait for the build, without the lock.
  const size_t installer = kTail + kLag - 1;
  auto install = std::async(std::launch::async,
                            [&] { return AppendRow(node.get(), data, installer); });
  {
    std::thread a(attend_loop, 100);
    a.join();
  }
  EXPECT_EQ(failures.load(), 0) << "Attends blocked or changed while an append awaited the seal";
  EXPECT_EQ(install.wait_for(std::chrono::seconds(0)), std::future_status::timeout)
      << "the installing append completed before the seal's build";
  const auto held = Clock::now();
  auto stats = node->Stats();
  ASSERT_TRUE(stats.ok());
  EXPECT_EQ(stats->seals, 0);
  EXPECT_EQ(stats->tail_keys, static_cast<int64_t>(installer));
  std::printf("held seal: 500 Attends of the sealing sequence completed, max latency %.3f ms\n",
              static_cast<double>(max_ns.load()) / 1e6);
  EXPECT_LT(max_ns.load(), int64_t{5'000'000'000}) << "an Attend waited for the seal";
  gate.Open();
  ASSERT_EQ(install.wait_for(kDeadline), std::future_status::ready);
  ASSERT_TRUE(install.get().ok());
  (void)held;
  ASSERT_TRUE(AppendRow(oracle.get(), data, installer).ok());
  stats = node->Stats();
  ASSERT_TRUE(stats.ok());
  EXPECT_EQ(stats->seals, 1);
  EXPECT_EQ(stats->indexed_keys, static_cast<int64_t>(kPrefill + kTail));
  EXPECT_EQ(stats->tail_keys, static_cast<int64_t>(kLag));
  ASSERT_NO_FATAL_FAILURE(ExpectNodesAgree(node.get(), oracle.get(), data, "installed"));
  // Two more seals, now unheld: still the oracle's state at every append.
  for (size_t i = installer + 1; i < 3 * kTail; ++i) {
    ASSERT_TRUE(AppendRow(node.get(), data, i).ok());
    ASSERT_TRUE(AppendRow(oracle.get(), data, i).ok());
    ASSERT_NO_FATAL_FAILURE(
        ExpectNodesAgree(node.get(), oracle.get(), data, "row " + std::to_string(i)));
  }
  auto s1 = node->Stats();
  auto s2 = oracle->Stats();
  ASSERT_TRUE(s1.ok() && s2.ok());
  EXPECT_EQ(s1->seals, s2->seals);
  EXPECT_EQ(s1->tail_keys, s2->tail_keys);
  EXPECT_EQ(s1->indexed_keys, s2->indexed_keys);
}

TEST(SealTest, StopBetweenBuildAndInstallRecoversEveryRow) {
  const Data data;
  test_support::TempDir dir("kvr_seal");
  auto oracle = NewNode(Options());
  ASSERT_TRUE(oracle != nullptr);
  ASSERT_NO_FATAL_FAILURE(Load(oracle.get(), data));
  const size_t rows = kTail + kLag - 1;  // a seal built, not installed
  {
    auto store = ShardStore::Open(dir.path());
    ASSERT_TRUE(store.ok()) << store.status();
    SealGate gate;
    NodeCoreOptions o = Options();
    o.persistence = store->get();
    o.before_seal_build = gate.Hook();
    auto node = NewNode(o);
    ASSERT_TRUE(node != nullptr);
    ASSERT_NO_FATAL_FAILURE(Load(node.get(), data));
    for (size_t i = 0; i < rows; ++i) ASSERT_TRUE(AppendRow(node.get(), data, i).ok());
    ASSERT_TRUE(gate.AwaitEntered(1));
    gate.Open();  // the build finishes; the node goes before any install
  }
  for (size_t i = 0; i < rows; ++i) ASSERT_TRUE(AppendRow(oracle.get(), data, i).ok());
  {
    RecoveredNode r;
    ASSERT_NO_FATAL_FAILURE(Reopen(dir.path(), &r));
    NodeCore* node = r.node.get();
    auto stats = node->Stats();
    ASSERT_TRUE(stats.ok());
    EXPECT_EQ(stats->indexed_keys, static_cast<int64_t>(kPrefill));
    EXPECT_EQ(stats->tail_keys, static_cast<int64_t>(rows));
    ASSERT_NO_FATAL_FAILURE(ExpectNodesAgree(node, oracle.get(), data, "recovered"));
    // The next append seals the same rows as the oracle's pending seal.
    for (size_t i = rows; i < rows + 2; ++i) {
      ASSERT_TRUE(AppendRow(node, data, i).ok());
      ASSERT_TRUE(AppendRow(oracle.get(), data, i).ok());
    }
    stats = node->Stats();
    ASSERT_TRUE(stats.ok());
    EXPECT_EQ(stats->indexed_keys, static_cast<int64_t>(kPrefill + kTail));
    ASSERT_NO_FATAL_FAILURE(ExpectNodesAgree(node, oracle.get(), data, "resealed"));
  }
  RecoveredNode r;
  ASSERT_NO_FATAL_FAILURE(Reopen(dir.path(), &r));
  NodeCore* node = r.node.get();
  auto stats = node->Stats();
  ASSERT_TRUE(stats.ok());
  EXPECT_EQ(stats->indexed_keys, static_cast<int64_t>(kPrefill + kTail));
  EXPECT_EQ(stats->tail_keys, static_cast<int64_t>(rows + 2 - kTail));
  ASSERT_NO_FATAL_FAILURE(ExpectNodesAgree(node, oracle.get(), data, "restarted"));
}

TEST(SealTest, DecodeQueryRingIsCountedInTheBudget) {
  const Data data;
  NodeCoreOptions o = Options();
  o.decode_train_queries = 1000;
  auto node = NewNode(o);
  ASSERT_TRUE(node != nullptr);
  ASSERT_NO_FATAL_FAILURE(Load(node.get(), data));
  const int64_t before = node->MemoryUsedBytes();
  ASSERT_TRUE(Attend(node.get(), data, 0).ok());
  EXPECT_EQ(node->MemoryUsedBytes() - before, int64_t{1000} * kDim * 4);
  ASSERT_TRUE(Attend(node.get(), data, 1).ok());
  EXPECT_EQ(node->MemoryUsedBytes() - before, int64_t{1000} * kDim * 4);
  ASSERT_TRUE(node->DropSequence(kSeq).ok());
  EXPECT_EQ(node->MemoryUsedBytes(), 0);

  // A budget with room for the shard but not the ring: Attend still works
  // and keeps no queries.
  o.memory_budget_bytes = before + 1000 * kDim * 4 - 1;
  auto tight = NewNode(o);
  ASSERT_TRUE(tight != nullptr);
  ASSERT_NO_FATAL_FAILURE(Load(tight.get(), data));
  const int64_t held = tight->MemoryUsedBytes();
  ASSERT_TRUE(Attend(tight.get(), data, 0).ok());
  EXPECT_EQ(tight->MemoryUsedBytes(), held);

  o.memory_budget_bytes = 0;
  o.decode_train_queries = kMaxDecodeTrainQueries + 1;
  auto bad = NodeCore::Create(o);
  ASSERT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("decode_train_queries 65537 > 65536"), std::string::npos)
      << bad.status();
}

}  // namespace
}  // namespace kvr::retrieval
