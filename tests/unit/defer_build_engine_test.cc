// The engine over a node that defers its index builds
// (NodeCoreOptions::defer_index_build; session 27, issue 17 item 5), on
// stories260K in retrieval mode (chunks of 24 tokens, graph index):
//
//  * while every build is pending (a node with no build thread), the first
//    decode steps' logits equal, bit for bit, those of a node whose chunks
//    are flat (exact) indexes: a pending chunk is searched exactly;
//  * once the builds installed, 40 greedy steps (past the window: appends
//    and seals run) give logits equal bit for bit to a node that built
//    synchronously, for the sequence and for a fork made while its chunks
//    were still pending (the fork shares the builds).
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "gpu_worker/engine/retrieval_engine.h"
#include "gtest/gtest.h"
#include "retrieval_node/client/in_process_client.h"
#include "tests/support/stories_model.h"

namespace kvr::worker {
namespace {

using retrieval::InProcessRetrievalClient;
using retrieval::NodeCoreOptions;
using test_support::Argmax;

constexpr auto kDeadline = std::chrono::seconds(60);

constexpr char kStory[] =
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the "
    "park with her friends. One day, she saw a big red ball under a tree. Tom had a small dog "
    "called Max. Every morning they ran to the river and looked at the fish.";

// Holds every deferred build at its start until opened.
class BuildGate {
 public:
  std::function<void()> Hook() {
    return [this] {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait_for(lock, kDeadline, [&] { return open_; });
    };
  }
  void Open() {
    std::lock_guard<std::mutex> lock(mu_);
    open_ = true;
    cv_.notify_all();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool open_ = false;
};

class DeferBuildEngineTest : public ::testing::Test {
 protected:
  void SetUp() override { ASSERT_TRUE(model_.Load()); }

  static std::unique_ptr<InProcessRetrievalClient> MakeNode(bool defer, size_t build_threads,
                                                            std::function<void()> hook = {}) {
    NodeCoreOptions no;
    no.tail_capacity = 16;
    no.min_index_keys = 8;     // 24-token chunks get a graph
    no.recalibrate_every = 0;  // no timing-dependent effort swaps
    no.threads = 0;            // single-threaded graph builds: identical on both nodes
    no.defer_index_build = defer;
    no.index_build_threads = build_threads;
    no.before_index_build = std::move(hook);
    auto n = InProcessRetrievalClient::Create(no);
    EXPECT_TRUE(n.ok()) << n.status();
    return n.ok() ? std::move(*n) : nullptr;
  }

  std::unique_ptr<RetrievalEngine> MakeEngine(retrieval::RetrievalClient* client) {
    EngineOptions options;
    options.max_train_queries = 0;
    options.handoff_threads = 0;  // every upload has replied when StartSequence returns
    auto e = RetrievalEngine::Create(model_.backend.get(), model_.weights, client, options);
    EXPECT_TRUE(e.ok()) << e.status();
    return e.ok() ? std::move(*e) : nullptr;
  }

  static AttentionOptions Retrieval(retrieval::IndexType index) {
    AttentionOptions a;
    a.sinks = 4;
    a.window = 16;
    a.top_k = 8;
    a.chunk_tokens = 24;
    a.index = index;
    return a;
  }

  static std::vector<std::vector<float>> Greedy(RetrievalEngine& engine, EngineSequence& seq,
                                                int steps) {
    std::vector<std::vector<float>> logits;
    std::vector<float> last(seq.logits().begin(), seq.logits().end());
    for (int i = 0; i < steps; ++i) {
      auto l = engine.Step(seq, Argmax(last));
      EXPECT_TRUE(l.ok()) << l.status();
      if (!l.ok()) break;
      last.assign(l->begin(), l->end());
      logits.push_back(last);
    }
    return logits;
  }

  // The logits of `steps` greedy steps after a prefill of the story.
  std::vector<std::vector<float>> Run(InProcessRetrievalClient* node, retrieval::IndexType index,
                                      int steps) {
    auto engine = MakeEngine(node);
    if (engine == nullptr) return {};
    auto seq = engine->StartSequence(model_.Encode(kStory), Retrieval(index));
    EXPECT_TRUE(seq.ok()) << seq.status();
    if (!seq.ok()) return {};
    return Greedy(*engine, **seq, steps);
  }

  static void ExpectSameLogits(const std::vector<std::vector<float>>& a,
                               const std::vector<std::vector<float>>& b, const std::string& what) {
    ASSERT_EQ(a.size(), b.size()) << what;
    for (size_t i = 0; i < a.size(); ++i) {
      ASSERT_EQ(a[i], b[i]) << what << ": step " << i << " differs";
    }
  }

  // Polls the node until no deferred build is queued or running and no
  // shard is pending (false at the deadline).
  static bool AwaitBuilds(InProcessRetrievalClient* node) {
    const auto deadline = std::chrono::steady_clock::now() + kDeadline;
    while (std::chrono::steady_clock::now() < deadline) {
      auto st = node->core().Stats();
      auto shards = node->core().ListShards(std::nullopt);
      bool pending = !st.ok() || !shards.ok() || st->index_builds_pending > 0;
      if (shards.ok()) {
        for (const retrieval::ShardInfo& s : *shards) pending = pending || s.index_pending;
      }
      if (!pending) return true;
      std::this_thread::yield();
    }
    return false;
  }

  test_support::StoriesModel model_;
};

TEST_F(DeferBuildEngineTest, WhileBuildsArePendingTheStepsAreExact) {
  constexpr int kSteps = 8;  // fewer appends than tail_capacity: no seal on either node
  auto flat = MakeNode(/*defer=*/false, 1);
  auto pending = MakeNode(/*defer=*/true, /*build_threads=*/0);  // builds never run
  ASSERT_TRUE(flat && pending);
  const auto want = Run(flat.get(), retrieval::IndexType::kFlat, kSteps);
  const auto got = Run(pending.get(), retrieval::IndexType::kGraph, kSteps);
  auto st = pending->core().Stats();
  ASSERT_TRUE(st.ok());
  EXPECT_GT(st->shard_uploads, 0);
  // Every chunk of at least min_index_keys keys (most of them) was deferred
  // and, with no build thread, is still queued.
  EXPECT_GT(st->index_builds_pending, st->shard_uploads / 2);
  EXPECT_LE(st->index_builds_pending, st->shard_uploads);
  ASSERT_NO_FATAL_FAILURE(ExpectSameLogits(got, want, "pending vs flat"));
}

TEST_F(DeferBuildEngineTest, InstalledBuildsStepLikeTheSynchronousNodeAlsoInAFork) {
  constexpr int kSteps = 40;  // past the window: appends and seals run
  auto sync = MakeNode(/*defer=*/false, 1);
  ASSERT_TRUE(sync);
  const auto want = Run(sync.get(), retrieval::IndexType::kGraph, kSteps);
  ASSERT_EQ(want.size(), size_t{kSteps});

  BuildGate gate;
  auto node = MakeNode(/*defer=*/true, 1, gate.Hook());
  ASSERT_TRUE(node);
  auto engine = MakeEngine(node.get());
  ASSERT_TRUE(engine);
  auto src = engine->StartSequence(model_.Encode(kStory), Retrieval(retrieval::IndexType::kGraph));
  ASSERT_TRUE(src.ok()) << src.status();
  auto fork = engine->ForkSequence(**src);  // its chunks are pending too
  ASSERT_TRUE(fork.ok()) << fork.status();
  auto shards = node->core().ListShards(std::nullopt);
  ASSERT_TRUE(shards.ok());
  size_t pending = 0;
  for (const retrieval::ShardInfo& s : *shards) {
    // Chunks of at least min_index_keys keys wait for their graph (shared
    // by the fork); smaller ones are flat at once.
    EXPECT_EQ(s.index_pending, s.n_keys >= 8) << s.key.DebugString();
    pending += s.index_pending ? 1 : 0;
  }
  EXPECT_GT(pending, 0u);
  gate.Open();
  ASSERT_TRUE(AwaitBuilds(node.get())) << "deferred builds did not install";
  shards = node->core().ListShards(std::nullopt);
  ASSERT_TRUE(shards.ok());
  for (const retrieval::ShardInfo& s : *shards) {
    EXPECT_EQ(s.index_type,
              s.n_keys >= 8 ? retrieval::IndexType::kGraph : retrieval::IndexType::kFlat)
        << s.key.DebugString();
  }
  ASSERT_NO_FATAL_FAILURE(
      ExpectSameLogits(Greedy(*engine, **src, kSteps), want, "deferred vs synchronous"));
  ASSERT_NO_FATAL_FAILURE(
      ExpectSameLogits(Greedy(*engine, **fork, kSteps), want, "fork of pending vs synchronous"));
}

}  // namespace
}  // namespace kvr::worker
