// Sequence sharding: the engine splits each (layer, kv head)'s offloaded
// tokens into placement chunks of AttentionOptions::chunk_tokens and opens a
// new chunk in decode when the last one is full. With the flat (exact) index
// and k >= every chunk's size, attention over many chunks equals attention
// over one chunk (the node merges per-chunk partials by LSE; only the float
// summation order differs): logits to 1e-5 relative, greedy tokens equal.
// With MultiNodeClient (built with services) the chunks of one (layer, kv
// head) land on several nodes and the result is the same again.
#include <algorithm>
#include <cstdint>
#include <functional>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "gpu_worker/engine/retrieval_engine.h"
#include "gtest/gtest.h"
#include "retrieval_node/client/in_process_client.h"
#include "tests/support/stories_model.h"
#ifdef KVR_TEST_MULTI_NODE
#include <google/protobuf/stubs/common.h>

#include "retrieval_node/client/multi_node_client.h"
#endif

#ifdef KVR_TEST_MULTI_NODE
// Links libprotobuf ahead of libsentencepiece (PROTOBUF_FIRST, see
// cmake/KvrTargets.cmake): without this reference --as-needed records
// libsentencepiece first and the ASan build crashes in libprotobuf's static
// initialization (make test-asan).
void ReferenceLibprotobufFirst() { GOOGLE_PROTOBUF_VERIFY_VERSION; }
#endif

namespace kvr::worker {
namespace {

using retrieval::IndexType;
using retrieval::NodeCoreOptions;
using retrieval::InProcessRetrievalClient;
using retrieval::ShardInfo;
using test_support::Argmax;
using test_support::MaxRelDiff;

constexpr char kStory[] =
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the "
    "park with her friends. One day, she saw a big red ball under a tree.";
constexpr int kSinks = 4, kWindow = 16, kChunk = 32, kSteps = 100;

class EngineChunksTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(model_.Load()) << "loading stories260K failed";
    // ~270 tokens: with 4 sinks + 16 window, ~250 offloaded at prefill.
    std::string text;
    for (int i = 0; i < 6; ++i) text += std::string(kStory) + " ";
    prompt_ = model_.Encode(text);
    ASSERT_GT(prompt_.size(), 240u);
    ASSERT_LT(prompt_.size() + kSteps, static_cast<size_t>(model_.weights->config.seq_len));
  }

  static AttentionOptions Options(int chunk_tokens) {
    AttentionOptions o;
    o.sinks = kSinks;
    o.window = kWindow;
    o.index = IndexType::kFlat;
    o.top_k = 4096;  // >= any chunk: exact attention over every held token
    o.chunk_tokens = chunk_tokens;
    return o;
  }

  struct Run {
    std::vector<std::vector<float>> logits;  // prefill, then each step
    std::vector<int32_t> tokens;             // greedy
    int64_t node_chunks = 0;
    int64_t offloaded = 0;
  };

  // Greedy decode of kSteps tokens on `client`; `check` runs after prefill
  // and after every step.
  Run Generate(retrieval::RetrievalClient* client, int chunk_tokens,
               const std::function<void(const RetrievalEngine&)>& check) {
    Run run;
    auto e = RetrievalEngine::Create(model_.backend.get(), model_.weights, client);
    EXPECT_TRUE(e.ok()) << e.status();
    if (!e.ok()) return run;
    RetrievalEngine& engine = **e;
    auto logits = engine.Prefill(prompt_, Options(chunk_tokens));
    EXPECT_TRUE(logits.ok()) << logits.status();
    if (!logits.ok()) return run;
    run.logits.emplace_back(logits->begin(), logits->end());
    for (int step = 0; step < kSteps; ++step) {
      const int32_t token = Argmax(run.logits.back());
      run.tokens.push_back(token);
      logits = engine.DecodeStep(token);
      EXPECT_TRUE(logits.ok()) << logits.status();
      if (!logits.ok()) return run;
      run.logits.emplace_back(logits->begin(), logits->end());
      if (check) check(engine);
    }
    run.node_chunks = engine.stats().node_chunks;
    run.offloaded = engine.stats().offloaded_tokens;
    EXPECT_TRUE(engine.EndSequence().ok());
    return run;
  }

  void ExpectSame(const Run& chunked, const Run& one) {
    ASSERT_EQ(chunked.logits.size(), one.logits.size());
    double worst = 0.0;
    for (size_t i = 0; i < one.logits.size(); ++i) {
      worst = std::max(worst, MaxRelDiff(chunked.logits[i], one.logits[i]));
    }
    std::printf("chunked vs one chunk: max logit rel diff %.3g over %zu steps\n", worst,
                one.logits.size());
    EXPECT_LE(worst, 1e-5);
    EXPECT_EQ(chunked.tokens, one.tokens);
    EXPECT_EQ(chunked.offloaded, one.offloaded);
  }

  // The shards of `id` on `node`, grouped by (layer, kv head).
  static std::vector<ShardInfo> Shards(InProcessRetrievalClient& node, uint64_t id) {
    auto shards = node.core().ListShards(id);
    EXPECT_TRUE(shards.ok()) << shards.status();
    return shards.ok() ? *shards : std::vector<ShardInfo>{};
  }

  test_support::StoriesModel model_;
  std::vector<int32_t> prompt_;
};

// One node: chunks of kChunk tokens at prefill and in decode, each holding
// at most kChunk consecutive positions, together exactly [sinks, node_end).
TEST_F(EngineChunksTest, ManyChunksEqualOneChunk) {
  auto one_node = InProcessRetrievalClient::Create();
  ASSERT_TRUE(one_node.ok()) << one_node.status();
  const Run one = Generate(one_node->get(), /*chunk_tokens=*/16384, nullptr);
  EXPECT_EQ(one.node_chunks, 1);

  auto node = InProcessRetrievalClient::Create();
  ASSERT_TRUE(node.ok()) << node.status();
  InProcessRetrievalClient& n = **node;
  const LlamaConfig& c = model_.weights->config;
  int64_t max_chunks = 0;
  const Run chunked = Generate(&n, kChunk, [&](const RetrievalEngine& engine) {
    const StepCoverage& cov = engine.last_coverage();
    ASSERT_EQ(cov.attended(), cov.pos + 1);
    const std::vector<ShardInfo> shards = Shards(n, engine.sequence_id());
    const int64_t held = cov.node_end - cov.node_begin;
    const int64_t want_chunks = (held + kChunk - 1) / kChunk;
    ASSERT_EQ(engine.stats().node_chunks, want_chunks);
    ASSERT_EQ(static_cast<int64_t>(shards.size()), want_chunks * c.n_layers * c.n_kv_heads);
    for (size_t i = 0; i < shards.size(); ++i) {
      const ShardInfo& s = shards[i];
      const int64_t chunk = static_cast<int64_t>(i) % want_chunks;
      ASSERT_EQ(s.key.chunk, chunk);
      // Chunk c holds [sinks + c·C, min(sinks + (c+1)·C, node_end)).
      const int64_t first = kSinks + chunk * kChunk;
      const int64_t last = std::min<int64_t>(first + kChunk, cov.node_end) - 1;
      ASSERT_EQ(s.first_position, first) << s.key.DebugString();
      ASSERT_EQ(s.last_position, last) << s.key.DebugString();
      ASSERT_EQ(s.n_keys + s.tail_keys, last - first + 1) << s.key.DebugString();
    }
    max_chunks = std::max(max_chunks, want_chunks);
  });
  EXPECT_GE(max_chunks, 10);  // ~250 offloaded at prefill + 100 appended
  ExpectSame(chunked, one);
}

// Bad chunk sizes are refused naming the field.
TEST_F(EngineChunksTest, BadChunkTokens) {
  AttentionOptions o = Options(0);
  absl::Status st = ValidateAttentionOptions(o);
  EXPECT_TRUE(absl::IsInvalidArgument(st)) << st;
  EXPECT_NE(st.message().find("chunk_tokens"), std::string::npos) << st;
  o.chunk_tokens = LlamaConfig::kMaxSeqLen + 1;
  EXPECT_TRUE(absl::IsInvalidArgument(ValidateAttentionOptions(o)));
}

#ifdef KVR_TEST_MULTI_NODE
// Three nodes behind MultiNodeClient (rendezvous placement per chunk): one
// (layer, kv head)'s chunks span several nodes; results equal one chunk on
// one node.
TEST_F(EngineChunksTest, ChunksSpanNodesWithIdenticalResults) {
  auto one_node = InProcessRetrievalClient::Create();
  ASSERT_TRUE(one_node.ok()) << one_node.status();
  const Run one = Generate(one_node->get(), /*chunk_tokens=*/16384, nullptr);

  std::vector<placement::NodeInfo> infos;
  std::vector<std::unique_ptr<retrieval::RetrievalClient>> clients;
  std::vector<InProcessRetrievalClient*> nodes;
  for (int i = 0; i < 3; ++i) {
    auto node = InProcessRetrievalClient::Create();
    ASSERT_TRUE(node.ok()) << node.status();
    nodes.push_back(node->get());
    clients.push_back(std::move(*node));
    infos.push_back({"node-" + std::to_string(i), "in-process"});
  }
  auto multi = retrieval::MultiNodeClient::Create(infos, std::move(clients));
  ASSERT_TRUE(multi.ok()) << multi.status();
  const LlamaConfig& c = model_.weights->config;
  size_t min_nodes_per_head = 99;
  const Run chunked = Generate(multi->get(), kChunk, [&](const RetrievalEngine& engine) {
    if (engine.position() != static_cast<int64_t>(prompt_.size()) + kSteps) return;
    // At the end: every (layer, kv head) has all its chunks, exactly once,
    // spread over the nodes.
    const int64_t chunks = engine.stats().node_chunks;
    for (int l = 0; l < c.n_layers; ++l) {
      for (int g = 0; g < c.n_kv_heads; ++g) {
        std::set<int32_t> seen;
        std::set<size_t> holders;
        for (size_t i = 0; i < nodes.size(); ++i) {
          for (const ShardInfo& s : Shards(*nodes[i], engine.sequence_id())) {
            if (s.key.layer != l || s.key.kv_head != g) continue;
            EXPECT_TRUE(seen.insert(s.key.chunk).second) << s.key.DebugString();
            holders.insert(i);
          }
        }
        EXPECT_EQ(static_cast<int64_t>(seen.size()), chunks) << "layer " << l << " head " << g;
        min_nodes_per_head = std::min(min_nodes_per_head, holders.size());
      }
    }
  });
  EXPECT_GE(chunked.node_chunks, 10);
  EXPECT_GE(min_nodes_per_head, 2u);  // 11 chunks on 3 nodes: P(one node) ~ 3^-10
  ExpectSame(chunked, one);
}
#endif

}  // namespace
}  // namespace kvr::worker
