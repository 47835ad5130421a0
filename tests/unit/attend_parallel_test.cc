// Per-head parallel search within one Attend / AttendBatch item
// (NodeCoreOptions::search_threads, kvr_node --search_threads; issue 20
// item 2):
//  * random Attends and AttendBatches (every index kind, several chunks per
//    head, appended tails, random shard lists, k, and estimation on/off)
//    give bit-identical partials and identical stats at search_threads 1
//    (sequential), 4 (a dedicated pool) and 0 (the attend pool lends its
//    workers);
//  * AttendBatches of 64 items on small pools (items x heads far more than
//    the pool's threads), sent from several threads at once, all complete
//    before a deadline (no nested-pool deadlock) and equal the sequential
//    node's answers;
//  * search_threads above 256 is refused naming it.
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <future>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "retrieval_node/client/in_process_client.h"
#include "tests/support/chunked_sequence.h"
#include "tests/support/test_data.h"

namespace kvr::retrieval {
namespace {

using test_support::ExpectSamePartials;
using test_support::RandomMatrix;

constexpr int kLayers = 2, kHeads = 8, kKvHeads = 4, kDim = 32;
constexpr int kChunks = 3, kChunkKeys = 300, kAppended = 40;
// One sequence per index kind a chunk may be built as.
constexpr IndexType kKinds[] = {IndexType::kGraph, IndexType::kFlat, IndexType::kIvf,
                                IndexType::kFlatSq8};
constexpr int kSequences = static_cast<int>(std::size(kKinds));

uint64_t SeqId(int s) { return 5200 + static_cast<uint64_t>(s); }
std::string Capability(int s) { return std::string(20, static_cast<char>('k' + s)); }

std::unique_ptr<InProcessRetrievalClient> Node(size_t search_threads, size_t threads = 2,
                                               size_t attend_threads = 3) {
  NodeCoreOptions o;
  o.threads = threads;
  o.attend_threads = attend_threads;
  o.search_threads = search_threads;
  auto c = InProcessRetrievalClient::Create(o);
  EXPECT_TRUE(c.ok()) << c.status();
  return c.ok() ? std::move(c).value() : nullptr;
}

// kSequences sequences (one per index kind), kChunks chunks per (layer, kv
// head) and an appended tail, the same on every node.
void Load(const std::vector<InProcessRetrievalClient*>& nodes) {
  const std::vector<RetrievalClient*> clients(nodes.begin(), nodes.end());
  for (int s = 0; s < kSequences; ++s) {
    SequenceSpec spec;
    spec.sequence_id = SeqId(s);
    spec.n_layers = kLayers;
    spec.n_heads = kHeads;
    spec.n_kv_heads = kKvHeads;
    spec.head_dim = kDim;
    spec.index_type = kKinds[s];
    ASSERT_NO_FATAL_FAILURE(test_support::LoadChunkedSequence(
        clients, spec, Capability(s), static_cast<uint32_t>(s * 1000), kChunks, kChunkKeys,
        kAppended));
  }
}

// Random requests with their buffers: per item a random sequence and
// layer, a random k, estimation on or off, and (half the time) a random
// non-empty shard list.
struct Requests {
  std::vector<Matrix> queries;
  std::vector<std::vector<HeadChunkRef>> shards;
  std::vector<Partials> out;
  std::vector<AttendStats> stats;
  std::vector<AttendBatchItem> items;

  static Requests Random(size_t n, uint32_t seed) {
    std::mt19937 rng(seed);
    Requests r;
    for (size_t i = 0; i < n; ++i) {
      const int s = static_cast<int>(rng() % kSequences);
      AttendRequest a;
      a.sequence_id = SeqId(s);
      a.layer = static_cast<int32_t>(rng() % kLayers);
      a.k = 1 + static_cast<int>(rng() % 64);
      a.estimate = rng() % 2 == 0 ? EstimateMode::kOff : EstimateMode::kOn;
      a.capability = Capability(s);
      std::vector<HeadChunkRef> list;
      if (rng() % 2 == 0) {
        for (int g = 0; g < kKvHeads; ++g) {
          for (int c = 0; c < kChunks; ++c) {
            if (rng() % 3 == 0) list.push_back({g, c});
          }
        }
        if (list.empty()) list.push_back({kKvHeads - 1, kChunks - 1});
      }
      r.queries.push_back(RandomMatrix(kHeads, kDim, seed * 131 + static_cast<uint32_t>(i), 0.5f));
      r.shards.push_back(std::move(list));
      r.out.emplace_back(kHeads, kDim);
      r.stats.emplace_back();
      r.items.push_back({a, {}, nullptr, absl::OkStatus()});
    }
    r.Bind();
    return r;
  }
  // Points every item at its buffers.
  void Bind() {
    for (size_t i = 0; i < items.size(); ++i) {
      items[i].request.queries = queries[i].view();
      items[i].request.shards = shards[i];
      items[i].out = out[i].view();
      items[i].stats = &stats[i];
    }
  }
};

void ExpectSameStats(const AttendStats& a, const AttendStats& b, const std::string& what) {
  EXPECT_EQ(a.shards_searched, b.shards_searched) << what;
  EXPECT_EQ(a.keys_held, b.keys_held) << what;
  EXPECT_EQ(a.keys_attended, b.keys_attended) << what;
  EXPECT_EQ(a.distance_computations, b.distance_computations) << what;
  EXPECT_EQ(a.keys_estimated, b.keys_estimated) << what;
  EXPECT_EQ(a.clusters_estimated, b.clusters_estimated) << what;
}

// Fails the whole program (a deadlocked pool would hang the destructor
// otherwise) unless `f` is ready within `seconds`.
template <typename T>
void AwaitOrDie(std::future<T>& f, int seconds, const std::string& what) {
  if (f.wait_for(std::chrono::seconds(seconds)) != std::future_status::ready) {
    std::fprintf(stderr, "FAIL: %s did not complete within %d s (deadlock?)\n", what.c_str(),
                 seconds);
    std::_Exit(1);
  }
}

TEST(AttendParallelTest, SingleAttendsBitIdenticalAcrossSearchThreads) {
  auto seq = Node(1), four = Node(4), shared = Node(0);
  ASSERT_TRUE(seq && four && shared);
  ASSERT_NO_FATAL_FAILURE(Load({seq.get(), four.get(), shared.get()}));
  Requests want = Requests::Random(80, 1);
  Requests got4 = Requests::Random(80, 1), got0 = Requests::Random(80, 1);
  int estimated = 0, listed = 0;
  for (size_t i = 0; i < want.items.size(); ++i) {
    const std::string what = "request " + std::to_string(i);
    const AttendRequest& r = want.items[i].request;
    ASSERT_TRUE(seq->Attend(r, want.out[i].view(), &want.stats[i]).ok()) << what;
    ASSERT_TRUE(four->Attend(got4.items[i].request, got4.out[i].view(), &got4.stats[i]).ok());
    ASSERT_TRUE(shared->Attend(got0.items[i].request, got0.out[i].view(), &got0.stats[i]).ok());
    ExpectSamePartials(got4.out[i], want.out[i], "search_threads 4 " + what);
    ExpectSamePartials(got0.out[i], want.out[i], "search_threads 0 " + what);
    ExpectSameStats(got4.stats[i], want.stats[i], "search_threads 4 " + what);
    ExpectSameStats(got0.stats[i], want.stats[i], "search_threads 0 " + what);
    EXPECT_GT(want.stats[i].shards_searched, 0) << what;
    estimated += want.stats[i].keys_estimated > 0 ? 1 : 0;
    listed += r.shards.empty() ? 0 : 1;
  }
  // The random mix exercised estimation and shard lists.
  EXPECT_GT(estimated, 10);
  EXPECT_GT(listed, 10);
}

TEST(AttendParallelTest, BatchesBitIdenticalAcrossSearchThreads) {
  auto seq = Node(1), four = Node(4), shared = Node(0);
  ASSERT_TRUE(seq && four && shared);
  ASSERT_NO_FATAL_FAILURE(Load({seq.get(), four.get(), shared.get()}));
  for (uint32_t round = 0; round < 3; ++round) {
    Requests want = Requests::Random(24, 100 + round);
    Requests got4 = Requests::Random(24, 100 + round);
    Requests got0 = Requests::Random(24, 100 + round);
    ASSERT_TRUE(seq->AttendBatch(want.items).ok());
    ASSERT_TRUE(four->AttendBatch(got4.items).ok());
    ASSERT_TRUE(shared->AttendBatch(got0.items).ok());
    for (size_t i = 0; i < want.items.size(); ++i) {
      const std::string what = "round " + std::to_string(round) + " item " + std::to_string(i);
      ASSERT_TRUE(want.items[i].status.ok()) << what << want.items[i].status;
      EXPECT_EQ(got4.items[i].status, want.items[i].status) << what;
      EXPECT_EQ(got0.items[i].status, want.items[i].status) << what;
      ExpectSamePartials(got4.out[i], want.out[i], "search_threads 4 " + what);
      ExpectSamePartials(got0.out[i], want.out[i], "search_threads 0 " + what);
      ExpectSameStats(got4.stats[i], want.stats[i], "search_threads 4 " + what);
      ExpectSameStats(got0.stats[i], want.stats[i], "search_threads 0 " + what);
    }
  }
}

// Batches of 64 items (each 4 heads x up to 4 shards) from 4 threads at
// once on one-thread pools: every helper the items ask for is queued behind
// other items, so an item that waited for its helpers would deadlock.
TEST(AttendParallelTest, ConcurrentBatchesOfSixtyFourCompleteOnSmallPools) {
  constexpr int kCallers = 4;
  constexpr size_t kItems = 64;
  auto want_node = Node(1);
  ASSERT_TRUE(want_node);
  ASSERT_NO_FATAL_FAILURE(Load({want_node.get()}));
  struct Config {
    size_t search_threads, threads, attend_threads;
  };
  for (const Config& cfg : {Config{4, 1, 1}, Config{0, 1, 1}, Config{0, 2, 2}, Config{8, 2, 2}}) {
    const std::string name = "search_threads " + std::to_string(cfg.search_threads) +
                             " threads " + std::to_string(cfg.threads) + " attend_threads " +
                             std::to_string(cfg.attend_threads);
    auto node = Node(cfg.search_threads, cfg.threads, cfg.attend_threads);
    ASSERT_TRUE(node) << name;
    ASSERT_NO_FATAL_FAILURE(Load({node.get()}));
    std::vector<Requests> batches;
    for (int c = 0; c < kCallers; ++c) batches.push_back(Requests::Random(kItems, 700 + c));
    std::vector<std::future<absl::Status>> calls;
    for (int c = 0; c < kCallers; ++c) {
      calls.push_back(std::async(std::launch::async, [&node, &batches, c] {
        return node->AttendBatch(batches[static_cast<size_t>(c)].items);
      }));
    }
    for (int c = 0; c < kCallers; ++c) {
      AwaitOrDie(calls[static_cast<size_t>(c)], 120, name + " caller " + std::to_string(c));
      ASSERT_TRUE(calls[static_cast<size_t>(c)].get().ok()) << name;
    }
    // The answers equal the sequential node's.
    for (int c = 0; c < kCallers; ++c) {
      Requests want = Requests::Random(kItems, 700 + c);
      ASSERT_TRUE(want_node->AttendBatch(want.items).ok());
      const Requests& got = batches[static_cast<size_t>(c)];
      for (size_t i = 0; i < kItems; ++i) {
        const std::string what =
            name + " caller " + std::to_string(c) + " item " + std::to_string(i);
        ASSERT_TRUE(got.items[i].status.ok()) << what << got.items[i].status;
        ExpectSamePartials(got.out[i], want.out[i], what);
        ExpectSameStats(got.stats[i], want.stats[i], what);
      }
    }
  }
}

TEST(AttendParallelTest, SearchThreadsAboveLimitRefusedNamingIt) {
  NodeCoreOptions o;
  o.search_threads = 257;
  const auto core = NodeCore::Create(o);
  ASSERT_FALSE(core.ok());
  EXPECT_EQ(core.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(core.status().message().find("search_threads 257 > 256"), std::string::npos)
      << core.status();
  o.search_threads = 256;
  o.threads = 0;
  EXPECT_TRUE(NodeCore::Create(o).ok());
}

}  // namespace
}  // namespace kvr::retrieval
