// n choices sharing one prefill (issue 19): RetrievalEngine::ForkSequence
// over an in-process node (stories260K, CPU backend) and
// NodeCore::ForkSequence.
//
//  * A fork steps exactly as its source would (bit-identical logits for the
//    same tokens) in full and retrieval mode, and as a fresh prefill of the
//    same prompt (greedy tokens identical); the node stored the prefill's
//    shards once (NodeStats.shard_uploads unchanged by the forks, forks
//    counted).
//  * Appends after the fork go to the stepping sequence only; dropping the
//    source leaves the fork decoding on (same tokens as alone).
//  * Memory: after the forks and every drop, memory_used_bytes is back to
//    the baseline; the fork is charged its heads' bytes.
//  * Hostile: fork of an unknown sequence (NotFound naming it), with a
//    wrong capability (PermissionDenied naming the sequence), onto a taken
//    id (AlreadyExists), id 0 (InvalidArgument); over the memory budget
//    (ResourceExhausted naming memory_budget_bytes); a client that cannot
//    fork makes the engine report Unimplemented (the scheduler's fallback).
#include <algorithm>
#include <chrono>
#include <memory>
#include <thread>
#include <span>
#include <string>
#include <vector>

#include "gpu_worker/engine/retrieval_engine.h"
#include "gtest/gtest.h"
#include "retrieval_node/client/in_process_client.h"
#include "tests/support/forwarding_client.h"
#include "tests/support/stories_model.h"

namespace kvr::worker {
namespace {

using retrieval::InProcessRetrievalClient;
using retrieval::NodeCore;
using retrieval::NodeCoreOptions;
using test_support::Argmax;

constexpr char kStory[] =
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the "
    "park with her friends. One day, she saw a big red ball under a tree. Tom had a small dog "
    "called Max. Every morning they ran to the river and looked at the fish.";

// Polls until `core` accounts exactly `want` bytes (a background seal of a
// dropped sequence returns its reservation when it finishes); false after
// 20 s.
bool MemoryBecomes(const NodeCore& core, int64_t want) {
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (core.MemoryUsedBytes() != want) {
    if (std::chrono::steady_clock::now() > give_up) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return true;
}

class ForkEngineTest : public ::testing::Test {
 protected:
  void SetUp() override { ASSERT_TRUE(model_.Load()); }

  std::unique_ptr<InProcessRetrievalClient> MakeNode(int64_t budget = 0) {
    NodeCoreOptions no;
    no.tail_capacity = 16;  // decode appends seal during the runs below
    no.min_index_keys = 8;
    no.memory_budget_bytes = budget;
    auto n = InProcessRetrievalClient::Create(no);
    EXPECT_TRUE(n.ok()) << n.status();
    return n.ok() ? std::move(*n) : nullptr;
  }

  std::unique_ptr<RetrievalEngine> MakeEngine(retrieval::RetrievalClient* client) {
    EngineOptions options;
    options.max_train_queries = 0;
    auto e = RetrievalEngine::Create(model_.backend.get(), model_.weights, client, options);
    EXPECT_TRUE(e.ok()) << e.status();
    return e.ok() ? std::move(*e) : nullptr;
  }

  static AttentionOptions Retrieval() {
    AttentionOptions a;
    a.sinks = 4;
    a.window = 16;
    a.top_k = 8;
    a.chunk_tokens = 24;  // several chunks per head
    a.index = retrieval::IndexType::kGraph;
    return a;
  }
  static AttentionOptions Full() {
    AttentionOptions a;
    a.mode = AttentionMode::kFull;
    return a;
  }

  // Greedy: `steps` tokens of `seq`, with the logits after each step.
  static std::vector<int32_t> Greedy(RetrievalEngine& engine, EngineSequence& seq, int steps,
                                     std::vector<std::vector<float>>* logits = nullptr) {
    std::vector<int32_t> out;
    std::vector<float> last(seq.logits().begin(), seq.logits().end());
    for (int i = 0; i < steps; ++i) {
      const int32_t t = Argmax(last);
      out.push_back(t);
      auto l = engine.Step(seq, t);
      EXPECT_TRUE(l.ok()) << l.status();
      if (!l.ok()) break;
      last.assign(l->begin(), l->end());
      if (logits != nullptr) logits->push_back(last);
    }
    return out;
  }

  std::vector<int32_t> Prompt() const { return model_.Encode(kStory); }

  test_support::StoriesModel model_;
};

// Greedy choices of one prefill equal each other and a fresh prefill's run,
// logits bit for bit, in both modes; the node stored the shards once.
TEST_F(ForkEngineTest, ForksStepLikeTheSourceAndAFreshPrefill) {
  constexpr int kSteps = 40;  // well past the window: appends and seals run
  for (const AttentionOptions& a : {Retrieval(), Full()}) {
    SCOPED_TRACE(a.mode == AttentionMode::kFull ? "full" : "retrieval");
    const std::vector<int32_t> prompt = Prompt();
    ASSERT_GT(prompt.size(), 60u);  // sinks + window + two chunks
    // Oracle: one sequence alone.
    std::vector<int32_t> alone_tokens;
    std::vector<std::vector<float>> alone_logits;
    {
      auto node = MakeNode();
      auto engine = MakeEngine(node.get());
      auto seq = engine->StartSequence(prompt, a);
      ASSERT_TRUE(seq.ok()) << seq.status();
      alone_tokens = Greedy(*engine, **seq, kSteps, &alone_logits);
    }
    auto node = MakeNode();
    auto engine = MakeEngine(node.get());
    auto src = engine->StartSequence(prompt, a);
    ASSERT_TRUE(src.ok()) << src.status();
    auto f1 = engine->ForkSequence(**src);
    ASSERT_TRUE(f1.ok()) << f1.status();
    auto f2 = engine->ForkSequence(**src);
    ASSERT_TRUE(f2.ok()) << f2.status();
    EXPECT_EQ(engine->prefills(), 1);
    EXPECT_EQ(engine->forks(), 2);
    EXPECT_NE((*f1)->id(), (*src)->id());
    EXPECT_NE((*f1)->id(), (*f2)->id());
    EXPECT_EQ((*f1)->position(), (*src)->position());
    const auto stats = node->core().Stats();
    ASSERT_TRUE(stats.ok());
    if (a.mode == AttentionMode::kRetrieval) {
      // 2 layers x 4 kv heads x ceil(middle / 24) chunks, uploaded once.
      const int64_t middle = static_cast<int64_t>(prompt.size()) - 4 - 16;
      const int64_t chunks = (middle + 23) / 24;
      const int64_t heads = int64_t{model_.weights->config.n_layers} *
                            model_.weights->config.n_kv_heads;
      EXPECT_EQ(stats->shard_uploads, heads * chunks);
      EXPECT_EQ(stats->forks, 2);
      EXPECT_EQ(stats->sequences, 3);
      EXPECT_EQ(stats->shards, 3 * heads * chunks);
    } else {
      EXPECT_EQ(stats->shard_uploads, 0);
      EXPECT_EQ(stats->forks, 0);  // full mode keeps nothing on the node
    }
    // Interleaved: each sequence steps in turn, so a fork that shared
    // mutable state with another would diverge.
    std::vector<EngineSequence*> seqs = {src->get(), f1->get(), f2->get()};
    std::vector<std::vector<int32_t>> tokens(3);
    std::vector<std::vector<float>> last(3);
    for (size_t s = 0; s < 3; ++s) last[s].assign(seqs[s]->logits().begin(), seqs[s]->logits().end());
    for (int i = 0; i < kSteps; ++i) {
      for (size_t s = 0; s < 3; ++s) {
        const int32_t t = Argmax(last[s]);
        tokens[s].push_back(t);
        auto l = engine->Step(*seqs[s], t);
        ASSERT_TRUE(l.ok()) << l.status();
        last[s].assign(l->begin(), l->end());
        ASSERT_EQ(last[s], alone_logits[static_cast<size_t>(i)]) << "sequence " << s << " step " << i;
      }
    }
    for (size_t s = 0; s < 3; ++s) EXPECT_EQ(tokens[s], alone_tokens) << "sequence " << s;
  }
}

// Appends after the fork reach only the sequence that steps; dropping the
// source leaves the fork intact; memory returns to the baseline.
TEST_F(ForkEngineTest, ForkIsIndependentOfItsSourceAndMemoryReturns) {
  auto node = MakeNode();
  NodeCore& core = node->core();
  const int64_t baseline = core.MemoryUsedBytes();
  auto engine = MakeEngine(node.get());
  const std::vector<int32_t> prompt = Prompt();
  std::vector<int32_t> alone;
  {
    auto seq = engine->StartSequence(prompt, Retrieval());
    ASSERT_TRUE(seq.ok()) << seq.status();
    alone = Greedy(*engine, **seq, 30);
  }
  EXPECT_TRUE(MemoryBecomes(core, baseline)) << core.MemoryUsedBytes();  // the lone run dropped

  auto src = engine->StartSequence(prompt, Retrieval());
  ASSERT_TRUE(src.ok()) << src.status();
  auto fork = engine->ForkSequence(**src);
  ASSERT_TRUE(fork.ok()) << fork.status();
  auto held = [&](uint64_t id) {
    auto p = core.HeldPositions(id, 0, 0);
    EXPECT_TRUE(p.ok()) << p.status();
    return p.ok() ? *p : std::vector<int64_t>{};
  };
  const std::vector<int64_t> before = held((*src)->id());
  EXPECT_EQ(held((*fork)->id()), before);
  // 10 fork steps: 10 tokens leave its window for the node, none of the source's.
  std::vector<int32_t> fork_tokens = Greedy(*engine, **fork, 10);
  EXPECT_EQ(held((*src)->id()), before);
  EXPECT_EQ(held((*fork)->id()).size(), before.size() + 10);
  // The source goes (its shards dropped); the fork decodes on as alone.
  const uint64_t src_id = (*src)->id();
  src->reset();
  EXPECT_FALSE(core.HeldPositions(src_id, 0, 0).ok());
  EXPECT_EQ(core.Stats()->sequences, 1);
  const std::vector<int32_t> rest = Greedy(*engine, **fork, 20);
  fork_tokens.insert(fork_tokens.end(), rest.begin(), rest.end());
  EXPECT_EQ(fork_tokens, alone);
  fork->reset();
  EXPECT_TRUE(MemoryBecomes(core, baseline)) << core.MemoryUsedBytes();
  const auto stats = core.Stats();
  ASSERT_TRUE(stats.ok());
  EXPECT_EQ(stats->sequences, 0);
}

// NodeCore::ForkSequence refuses what it must, naming the sequence / limit.
TEST_F(ForkEngineTest, NodeForkRefusesUnknownWrongCapabilityTakenIdAndBudget) {
  auto node = MakeNode();
  auto engine = MakeEngine(node.get());
  auto src = engine->StartSequence(Prompt(), Retrieval());
  ASSERT_TRUE(src.ok()) << src.status();
  // The engine's capability is private: fork another sequence of our own.
  NodeCore& core = node->core();
  retrieval::SequenceSpec spec;
  spec.sequence_id = 4242;
  spec.n_layers = 1;
  spec.n_heads = 1;
  spec.n_kv_heads = 1;
  spec.head_dim = 8;
  const std::string cap(16, 'c');
  ASSERT_TRUE(core.CreateSequence(spec, {cap, "", ""}).ok());
  retrieval::SequenceAccess fork_access{std::string(16, 'f'), "", ""};

  absl::Status st = core.ForkSequence(777, cap, 5000, fork_access);
  EXPECT_TRUE(absl::IsNotFound(st)) << st;
  EXPECT_NE(st.message().find("unknown sequence 777"), std::string::npos) << st;
  st = core.ForkSequence(4242, std::string(16, 'x'), 5000, fork_access);
  EXPECT_TRUE(absl::IsPermissionDenied(st)) << st;
  EXPECT_NE(st.message().find("capability does not match sequence 4242"), std::string::npos)
      << st;
  st = core.ForkSequence((*src)->id(), cap, 5000, fork_access);  // not the engine's capability
  EXPECT_TRUE(absl::IsPermissionDenied(st)) << st;
  st = core.ForkSequence(4242, cap, 0, fork_access);
  EXPECT_TRUE(absl::IsInvalidArgument(st)) << st;
  st = core.ForkSequence(4242, cap, (*src)->id(), fork_access);
  EXPECT_TRUE(absl::IsAlreadyExists(st)) << st;
  st = core.ForkSequence(4242, cap, 5000, {std::string(3, 'f'), "", ""});
  EXPECT_TRUE(absl::IsInvalidArgument(st)) << st;  // capability of 3 bytes
  ASSERT_TRUE(core.ForkSequence(4242, cap, 5000, fork_access).ok());
  // The fork has its own capability: the source's does not open it.
  EXPECT_TRUE(absl::IsPermissionDenied(core.DropSequence(5000, cap)));
  EXPECT_TRUE(core.DropSequence(5000, fork_access.capability).ok());
  EXPECT_EQ(core.Stats()->forks, 1);

  // A budget that holds the source but not a copy of it: a source and its
  // fork take `both` (measured on another node), each about half; the
  // budget is three quarters of that, so the source fits and the fork does
  // not. Not `both - 1`: graph builds on two threads may differ by a few
  // bytes between nodes under load, which made a one-byte margin flaky.
  auto small = MakeNode();
  auto e2 = MakeEngine(small.get());
  auto s2 = e2->StartSequence(Prompt(), Retrieval());
  ASSERT_TRUE(s2.ok()) << s2.status();
  auto f2 = e2->ForkSequence(**s2);  // waits for the source's uploads
  ASSERT_TRUE(f2.ok()) << f2.status();
  const int64_t both = small->core().MemoryUsedBytes();
  ASSERT_GT(both, 0);
  auto tight = MakeNode(both - both / 4);
  auto e3 = MakeEngine(tight.get());
  auto s3 = e3->StartSequence(Prompt(), Retrieval());
  ASSERT_TRUE(s3.ok()) << s3.status();
  auto f3 = e3->ForkSequence(**s3);
  ASSERT_FALSE(f3.ok());
  EXPECT_TRUE(absl::IsResourceExhausted(f3.status())) << f3.status();
  EXPECT_NE(f3.status().message().find("memory_budget_bytes"), std::string::npos)
      << f3.status();
  EXPECT_EQ(tight->core().Stats()->sequences, 1);  // nothing of the refused fork stays
  EXPECT_EQ(tight->core().Stats()->forks, 0);
  s3->reset();
  EXPECT_TRUE(MemoryBecomes(tight->core(), 0)) << tight->core().MemoryUsedBytes();
}

// A client that cannot fork (the RetrievalClient default): Unimplemented,
// and nothing is left behind; the source decodes on.
TEST_F(ForkEngineTest, ClientWithoutForkReportsUnimplemented) {
  auto node = MakeNode();
  test_support::ForwardingRetrievalClient forwarding(node.get());
  auto engine = MakeEngine(&forwarding);
  auto src = engine->StartSequence(Prompt(), Retrieval());
  ASSERT_TRUE(src.ok()) << src.status();
  auto fork = engine->ForkSequence(**src);
  ASSERT_FALSE(fork.ok());
  EXPECT_TRUE(absl::IsUnimplemented(fork.status())) << fork.status();
  EXPECT_EQ(node->core().Stats()->sequences, 1);
  EXPECT_EQ(Greedy(*engine, **src, 3).size(), 3u);
  // A sequence that is not active cannot be forked.
  ASSERT_TRUE(engine->EndSequence(**src).ok());
  EXPECT_TRUE(absl::IsFailedPrecondition(engine->ForkSequence(**src).status()));
}

}  // namespace
}  // namespace kvr::worker
