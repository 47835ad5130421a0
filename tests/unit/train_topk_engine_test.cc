// The worker's training data under --max_train_queries (EngineOptions::
// max_train_queries), on stories260K with the CPU backend and an in-process
// node, through a client that records every UploadShard's training lists:
//  * with a bound below prompt_len x group, every (layer, kv head, chunk)
//    upload carries exactly max_train_queries lists (before: one per prefill
//    query), and list i is, id for id, the exact list of sampled query
//    TrainingQuerySample(...)[i] in an unbounded (0 = every query) run;
//  * a retrieval sequence trained that way decodes;
//  * out-of-range bounds are rejected naming max_train_queries and its limit.
#include <algorithm>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "common/train_topk.h"
#include "gpu_worker/engine/retrieval_engine.h"
#include "gpu_worker/model/llama2c_loader.h"
#include "gtest/gtest.h"
#include "retrieval_node/client/in_process_client.h"
#include "tests/support/models.h"

namespace kvr::worker {
namespace {

using retrieval::InProcessRetrievalClient;

// One upload's training lists.
struct Recorded {
  size_t width = 0;
  std::vector<int64_t> ids;
};
using ShardId = std::tuple<int32_t, int32_t, int32_t>;  // layer, kv head, chunk

class RecordingClient final : public retrieval::RetrievalClient {
 public:
  explicit RecordingClient(retrieval::RetrievalClient* node) : node_(node) {}

  std::map<ShardId, Recorded> uploads() {
    std::lock_guard<std::mutex> lock(mu_);
    return uploads_;
  }

  absl::Status CreateSequence(const retrieval::SequenceSpec& spec) override {
    return node_->CreateSequence(spec);
  }
  absl::Status CreateSequence(const retrieval::SequenceSpec& spec,
                              std::string_view capability) override {
    return node_->CreateSequence(spec, capability);
  }
  absl::Status UploadShard(const retrieval::ShardUpload& upload) override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      Recorded& r = uploads_[{upload.key.layer, upload.key.kv_head, upload.key.chunk}];
      r.width = upload.train_topk_width;
      r.ids.assign(upload.train_topk.begin(), upload.train_topk.end());
    }
    return node_->UploadShard(upload);
  }
  absl::Status Append(const retrieval::AppendRequest& request) override {
    return node_->Append(request);
  }
  void AttendAsync(const retrieval::AttendRequest& request, PartialsView out,
                   retrieval::AttendStats* stats, retrieval::StatusCallback done) override {
    node_->AttendAsync(request, out, stats, std::move(done));
  }
  absl::Status DropSequence(uint64_t sequence_id) override {
    return node_->DropSequence(sequence_id);
  }
  absl::Status DropSequence(uint64_t sequence_id, std::string_view capability) override {
    return node_->DropSequence(sequence_id, capability);
  }
  absl::StatusOr<retrieval::NodeStats> Stats() override { return node_->Stats(); }

 private:
  retrieval::RetrievalClient* node_;
  std::mutex mu_;
  std::map<ShardId, Recorded> uploads_;
};

constexpr int64_t kPrompt = 300;
constexpr int kChunk = 128;  // 280 offloaded tokens: chunks of 128, 128, 24

class TrainTopKEngineTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::string model = test_support::BundledModelPath("stories260K.bin");
    if (model.empty()) GTEST_FAIL() << "the bundled stories260K model is missing";
    auto w = LoadLlama2c(model);
    ASSERT_TRUE(w.ok()) << w.status();
    weights_ = *w;
    BackendOptions bo;
    bo.num_threads = 1;
    auto b = BackendRegistry::Create("cpu", bo);
    ASSERT_TRUE(b.ok()) << b.status();
    backend_ = std::move(*b);
  }

  static AttentionOptions Retrieval() {
    AttentionOptions a;
    a.sinks = 4;
    a.window = 16;
    a.top_k = 8;
    a.train_k = 16;
    a.chunk_tokens = kChunk;
    return a;
  }

  // Prefills a fixed prompt (and decodes `steps` tokens) with the given
  // bound; returns every upload's training lists.
  std::map<ShardId, Recorded> Run(int64_t max_train_queries, int steps) {
    auto node = InProcessRetrievalClient::Create({});
    EXPECT_TRUE(node.ok()) << node.status();
    if (!node.ok()) return {};
    RecordingClient client(node->get());
    EngineOptions eo;
    eo.max_train_queries = max_train_queries;
    eo.handoff_threads = 0;  // every upload done when Prefill returns
    auto engine = RetrievalEngine::Create(backend_.get(), weights_, &client, eo);
    EXPECT_TRUE(engine.ok()) << engine.status();
    if (!engine.ok()) return {};
    std::vector<int32_t> prompt(kPrompt);
    for (int64_t i = 0; i < kPrompt; ++i) prompt[i] = static_cast<int32_t>(1 + (i * 37) % 500);
    auto logits = (*engine)->Prefill(prompt, Retrieval());
    EXPECT_TRUE(logits.ok()) << logits.status();
    for (int i = 0; i < steps && logits.ok(); ++i) {
      const auto best = std::max_element(logits->begin(), logits->end()) - logits->begin();
      logits = (*engine)->DecodeStep(static_cast<int32_t>(best));
      EXPECT_TRUE(logits.ok()) << logits.status();
    }
    return client.uploads();
  }

  std::shared_ptr<const LlamaWeights> weights_;
  std::unique_ptr<Backend> backend_;
};

TEST_F(TrainTopKEngineTest, UploadsCarryTheSampledQueriesExactLists) {
  const LlamaConfig& c = weights_->config;
  const size_t group = static_cast<size_t>(c.n_heads / c.n_kv_heads);
  const size_t rows = static_cast<size_t>(kPrompt) * group;
  constexpr int64_t kBound = 100;
  ASSERT_LT(static_cast<size_t>(kBound), rows);

  const auto all = Run(/*max_train_queries=*/0, /*steps=*/0);
  const auto sampled = Run(kBound, /*steps=*/4);
  const size_t shards = static_cast<size_t>(c.n_layers * c.n_kv_heads) * 3;
  ASSERT_EQ(all.size(), shards);
  ASSERT_EQ(sampled.size(), shards);

  TrainingTopKOptions o;
  o.max_queries = kBound;
  const std::vector<size_t> sample = TrainingQuerySample(rows, o);
  for (const auto& [shard, full] : all) {
    const Recorded& s = sampled.at(shard);
    ASSERT_GT(full.width, 0u);
    ASSERT_EQ(s.width, full.width);
    ASSERT_EQ(full.ids.size(), rows * full.width) << "every query without a bound";
    ASSERT_EQ(s.ids.size(), static_cast<size_t>(kBound) * s.width)
        << "layer " << std::get<0>(shard) << " kv head " << std::get<1>(shard) << " chunk "
        << std::get<2>(shard);
    for (size_t i = 0; i < sample.size(); ++i) {
      ASSERT_TRUE(std::equal(s.ids.begin() + i * s.width, s.ids.begin() + (i + 1) * s.width,
                             full.ids.begin() + sample[i] * full.width))
          << "list " << i << " (query row " << sample[i] << ")";
    }
  }
}

TEST_F(TrainTopKEngineTest, OutOfRangeBoundIsRejected) {
  auto node = InProcessRetrievalClient::Create({});
  ASSERT_TRUE(node.ok()) << node.status();
  for (int64_t bad : {int64_t{-1}, static_cast<int64_t>(kMaxTrainingQueries) + 1}) {
    EngineOptions eo;
    eo.max_train_queries = bad;
    auto engine = RetrievalEngine::Create(backend_.get(), weights_, node->get(), eo);
    ASSERT_FALSE(engine.ok());
    EXPECT_EQ(engine.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(engine.status().message().find("max_train_queries"), std::string::npos);
    EXPECT_NE(engine.status().message().find(std::to_string(kMaxTrainingQueries)),
              std::string::npos)
        << engine.status();
  }
}

}  // namespace
}  // namespace kvr::worker
