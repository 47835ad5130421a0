// Self-calibration through the node and the worker: the worker's hand-off
// holds back training queries and uploads them with their exact top-k; the
// node calibrates each chunk's index on them (ShardInfo reports the effort
// and expected recall); `index auto` serves the same tokens as the exact
// scan where the index cannot beat it; hostile held-back data is refused
// naming the field and limit.
#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/exact_topk.h"
#include "gpu_worker/engine/retrieval_engine.h"
#include "gtest/gtest.h"
#include "retrieval_node/client/in_process_client.h"
#include "retrieval_node/core/node_core.h"
#include "tests/support/stories_model.h"
#include "tools/attention_data.h"

namespace kvr::worker {
namespace {

using retrieval::IndexType;
using retrieval::InProcessRetrievalClient;
using retrieval::ShardInfo;
using test_support::Argmax;

constexpr char kStory[] =
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the "
    "park with her friends. One day, she saw a big red ball under a tree.";
constexpr int kSteps = 24;

class CalibrateEngineTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(model_.Load()) << "loading stories260K failed";
    std::string text;
    for (int i = 0; i < 6; ++i) text += std::string(kStory) + " ";
    prompt_ = model_.Encode(text);
    ASSERT_GT(prompt_.size(), 240u);  // ~540 training queries: ~67 held back per chunk
  }

  struct Run {
    std::vector<int32_t> tokens;
    std::vector<ShardInfo> shards;  // after prefill
  };

  Run Generate(IndexType index) {
    Run run;
    auto node = InProcessRetrievalClient::Create();
    EXPECT_TRUE(node.ok()) << node.status();
    if (!node.ok()) return run;
    auto e = RetrievalEngine::Create(model_.backend.get(), model_.weights, node->get());
    EXPECT_TRUE(e.ok()) << e.status();
    if (!e.ok()) return run;
    AttentionOptions o;
    o.index = index;
    o.top_k = 16;
    o.train_k = 32;
    auto logits = (*e)->Prefill(prompt_, o);
    EXPECT_TRUE(logits.ok()) << logits.status();
    if (!logits.ok()) return run;
    // The first step waits for every layer's upload.
    std::vector<float> last(logits->begin(), logits->end());
    for (int step = 0; step < kSteps; ++step) {
      run.tokens.push_back(Argmax(last));
      auto next = (*e)->DecodeStep(run.tokens.back());
      EXPECT_TRUE(next.ok()) << next.status();
      if (!next.ok()) return run;
      last.assign(next->begin(), next->end());
      if (step == 0) {
        auto shards = (*node)->core().ListShards((*e)->sequence_id());
        EXPECT_TRUE(shards.ok()) << shards.status();
        if (shards.ok()) run.shards = *shards;
      }
    }
    EXPECT_TRUE((*e)->EndSequence().ok());
    return run;
  }

  test_support::StoriesModel model_;
  std::vector<int32_t> prompt_;
};

// A graph sequence: every prefill chunk's beam was calibrated on the
// held-back queries the worker uploaded (effort in [k, n], recall known).
TEST_F(CalibrateEngineTest, WorkerHoldoutCalibratesEveryGraphChunk) {
  const Run run = Generate(IndexType::kGraph);
  ASSERT_FALSE(run.shards.empty());
  const auto& c = model_.weights->config;
  EXPECT_EQ(run.shards.size(), static_cast<size_t>(c.n_layers * c.n_kv_heads));
  for (const ShardInfo& s : run.shards) {
    EXPECT_EQ(s.index_type, IndexType::kGraph) << s.key.DebugString();
    EXPECT_GE(s.search_effort, 32) << s.key.DebugString();  // >= the recall k (train_k)
    EXPECT_LE(s.search_effort, s.n_keys) << s.key.DebugString();
    EXPECT_GE(s.expected_recall, 0.95) << s.key.DebugString();
    EXPECT_LE(s.expected_recall, 1.0) << s.key.DebugString();
  }
}

// Index auto on ~250-key chunks (< kAutoMinKeys): every chunk is flat
// (recall 1) and the tokens equal the flat run's.
TEST_F(CalibrateEngineTest, AutoServesLikeTheExactScanOnSmallChunks) {
  const Run flat = Generate(IndexType::kFlat);
  const Run autos = Generate(IndexType::kAuto);
  ASSERT_FALSE(autos.shards.empty());
  for (const ShardInfo& s : autos.shards) {
    EXPECT_EQ(s.index_type, IndexType::kFlat) << s.key.DebugString();
    EXPECT_EQ(s.expected_recall, 1.0) << s.key.DebugString();
  }
  ASSERT_EQ(flat.tokens.size(), static_cast<size_t>(kSteps));
  EXPECT_EQ(autos.tokens, flat.tokens);
}

// The node on synthetic attention data (16384 keys): a kAuto chunk chooses a
// kind and a graph chunk a beam, both meeting --target_recall on the
// held-back queries; without held-back queries the recall is unknown (-1).
class CalibrateNodeTest : public ::testing::Test {
 protected:
  static constexpr int kD = 64, kN = 16384, kW = 100;
  void SetUp() override {
    AttentionDataOptions o;
    o.n_keys = kN;
    o.n_train = 2048;
    o.n_test = 16;
    o.dim = kD;
    o.seed = 21;
    auto gen = GenerateAttentionData(o);
    ASSERT_TRUE(gen.ok());
    data_ = std::move(*gen);
    // Rows 0..255 are held back; the rest train.
    held_ = ConstMatrixView(data_.train_queries.data.data(), 256, kD);
    train_ = data_.train_queries.view().rows_slice(256, data_.train_queries.rows - 256);
    train_topk_.resize(train_.rows() * kW);
    holdout_topk_.resize(held_.rows() * kW);
    std::vector<float> scores(train_topk_.size());
    ASSERT_TRUE(ExactTopK(data_.keys.view(), train_, kW, train_topk_, scores, nullptr).ok());
    ASSERT_TRUE(
        ExactTopK(data_.keys.view(), held_, kW, holdout_topk_, {scores.data(), holdout_topk_.size()},
                  nullptr)
            .ok());
    retrieval::NodeCoreOptions no;
    no.threads = 1;
    auto core = retrieval::NodeCore::Create(no);
    ASSERT_TRUE(core.ok()) << core.status();
    core_ = std::move(*core);
  }

  retrieval::ShardUpload Upload(uint64_t seq, bool with_holdout) const {
    retrieval::ShardUpload up;
    up.key = {seq, 0, 0, 0};
    up.keys = data_.keys.view();
    up.values = data_.values.view();
    up.train_topk = train_topk_;
    up.train_topk_width = kW;
    if (with_holdout) {
      up.holdout_queries = held_;
      up.holdout_topk = holdout_topk_;
      up.holdout_topk_width = kW;
    }
    return up;
  }

  ShardInfo Create(uint64_t seq, IndexType type, bool with_holdout) {
    retrieval::SequenceSpec spec;
    spec.sequence_id = seq;
    spec.n_layers = 1;
    spec.n_heads = 1;
    spec.n_kv_heads = 1;
    spec.head_dim = kD;
    spec.index_type = type;
    EXPECT_TRUE(core_->CreateSequence(spec).ok());
    const absl::Status up = core_->UploadShard(Upload(seq, with_holdout));
    EXPECT_TRUE(up.ok()) << up;
    auto shards = core_->ListShards(seq);
    EXPECT_TRUE(shards.ok() && shards->size() == 1);
    return shards.ok() && !shards->empty() ? shards->front() : ShardInfo{};
  }

  AttentionData data_;
  ConstMatrixView held_, train_;
  std::vector<int64_t> train_topk_, holdout_topk_;
  std::unique_ptr<retrieval::NodeCore> core_;
};

TEST_F(CalibrateNodeTest, ChunksReportTheirCalibration) {
  const ShardInfo graph = Create(1, IndexType::kGraph, true);
  EXPECT_EQ(graph.index_type, IndexType::kGraph);
  EXPECT_GE(graph.search_effort, kW);
  EXPECT_GE(graph.expected_recall, 0.95);
  const ShardInfo autos = Create(2, IndexType::kAuto, true);
  EXPECT_NE(autos.index_type, IndexType::kAuto);
  EXPECT_GE(autos.expected_recall, 0.95);
  const ShardInfo unknown = Create(3, IndexType::kGraph, false);
  EXPECT_EQ(unknown.search_effort, 0);
  EXPECT_EQ(unknown.expected_recall, -1);
  const ShardInfo auto_unknown = Create(4, IndexType::kAuto, false);  // falls back to the graph
  EXPECT_EQ(auto_unknown.index_type, IndexType::kGraph);
  EXPECT_EQ(auto_unknown.expected_recall, -1);
}

TEST_F(CalibrateNodeTest, HostileHoldoutIsRefusedNamingFieldAndLimit) {
  retrieval::SequenceSpec spec;
  spec.sequence_id = 9;
  spec.n_layers = 1;
  spec.n_heads = 1;
  spec.n_kv_heads = 1;
  spec.head_dim = kD;
  spec.index_type = IndexType::kAuto;
  ASSERT_TRUE(core_->CreateSequence(spec).ok());
  std::vector<int64_t> bad = holdout_topk_;
  bad[7] = kN;  // one past the last key
  retrieval::ShardUpload up = Upload(9, true);
  up.holdout_topk = bad;
  absl::Status s = core_->UploadShard(up);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("holdout_topk id 16384 outside [-1, 16384) for shard"),
            std::string::npos)
      << s;
  up = Upload(9, true);
  up.holdout_topk_width = kW - 1;
  s = core_->UploadShard(up);
  EXPECT_NE(s.message().find("holdout rows 256 x holdout_topk_width 99"), std::string::npos) << s;
  std::vector<float> many(4097 * kD, 0.5f);
  std::vector<int64_t> many_ids(4097, 0);
  up = Upload(9, true);
  up.holdout_queries = ConstMatrixView(many.data(), 4097, kD);
  up.holdout_topk = many_ids;
  up.holdout_topk_width = 1;
  s = core_->UploadShard(up);
  EXPECT_NE(s.message().find("holdout_queries rows 4097 > 4096"), std::string::npos) << s;
  std::vector<float> nan_q(held_.rows() * kD, 0.f);
  nan_q[3] = std::nanf("");
  up = Upload(9, true);
  up.holdout_queries = ConstMatrixView(nan_q.data(), held_.rows(), kD);
  s = core_->UploadShard(up);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_NE(s.message().find("holdout_queries"), std::string::npos) << s;
  // None of them left a chunk behind.
  auto shards = core_->ListShards(9);
  ASSERT_TRUE(shards.ok());
  EXPECT_TRUE(shards->empty());
}

}  // namespace
}  // namespace kvr::worker
