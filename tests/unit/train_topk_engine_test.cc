// The worker's training data under --max_train_queries (EngineOptions::
// max_train_queries), on stories260K with the CPU backend and an in-process
// node, through a client that records every UploadShard's training lists:
//  * with a bound below prompt_len x group, every (layer, kv head, chunk)
//    upload carries exactly max_train_queries lists (before: one per prefill
//    query), and list i is, id for id, the exact list of sampled query
//    TrainingQuerySample(...)[i] in an unbounded (0 = every query) run;
//  * the held-back rows (calibration, ShardUpload::holdout_*) are some of
//    those lists, and each held-back query vector is the one its list
//    belongs to: its ids are its exact top-k over the shard's keys (a
//    double-precision oracle), which would fail if the vector came from the
//    unsampled row numbering;
//  * a retrieval sequence trained that way decodes;
//  * out-of-range bounds are rejected naming max_train_queries and its limit.
#include <algorithm>
#include <cmath>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "common/train_topk.h"
#include "gpu_worker/engine/retrieval_engine.h"
#include "gtest/gtest.h"
#include "retrieval_node/client/in_process_client.h"
#include "tests/support/forwarding_client.h"
#include "tests/support/stories_model.h"

namespace kvr::worker {
namespace {

using retrieval::InProcessRetrievalClient;

// One upload's training lists.
struct Recorded {
  size_t width = 0;
  std::vector<int64_t> ids;
  size_t dim = 0;
  std::vector<float> keys;             // the shard's keys, rows x dim
  std::vector<float> holdout_queries;  // held-back rows x dim
  std::vector<int64_t> holdout_ids;    // held-back rows x width
};
using ShardId = std::tuple<int32_t, int32_t, int32_t>;  // layer, kv head, chunk

class RecordingClient final : public test_support::ForwardingRetrievalClient {
 public:
  explicit RecordingClient(retrieval::RetrievalClient* node) : ForwardingRetrievalClient(node) {}

  std::map<ShardId, Recorded> uploads() {
    std::lock_guard<std::mutex> lock(mu_);
    return uploads_;
  }

  absl::Status UploadShard(const retrieval::ShardUpload& upload) override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      Recorded& r = uploads_[{upload.key.layer, upload.key.kv_head, upload.key.chunk}];
      r.width = upload.train_topk_width;
      r.ids.assign(upload.train_topk.begin(), upload.train_topk.end());
      r.dim = upload.keys.cols();
      r.keys.clear();
      for (size_t i = 0; i < upload.keys.rows(); ++i) {
        r.keys.insert(r.keys.end(), upload.keys.row(i), upload.keys.row(i) + r.dim);
      }
      r.holdout_queries.clear();
      for (size_t i = 0; i < upload.holdout_queries.rows(); ++i) {
        const float* q = upload.holdout_queries.row(i);
        r.holdout_queries.insert(r.holdout_queries.end(), q, q + r.dim);
      }
      r.holdout_ids.assign(upload.holdout_topk.begin(), upload.holdout_topk.end());
      if (!r.holdout_ids.empty()) {
        EXPECT_EQ(upload.holdout_topk_width, r.width);
      }
    }
    return ForwardingRetrievalClient::UploadShard(upload);
  }

 private:
  std::mutex mu_;
  std::map<ShardId, Recorded> uploads_;
};

constexpr int64_t kPrompt = 300;
constexpr int kChunk = 128;  // 280 offloaded tokens: chunks of 128, 128, 24

class TrainTopKEngineTest : public ::testing::Test {
 protected:
  void SetUp() override {
    test_support::StoriesModel m;
    ASSERT_TRUE(m.Load());
    weights_ = m.weights;
    backend_ = std::move(m.backend);
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
    const size_t w = full.width;
    ASSERT_EQ(full.ids.size() + full.holdout_ids.size(), rows * w)
        << "every query without a bound";
    ASSERT_FALSE(s.holdout_ids.empty()) << "100 sampled queries hold some back";
    ASSERT_EQ(s.ids.size() + s.holdout_ids.size(), static_cast<size_t>(kBound) * w)
        << "layer " << std::get<0>(shard) << " kv head " << std::get<1>(shard) << " chunk "
        << std::get<2>(shard);
    // The unbounded run's lists of every query, in query-row order: its
    // training and held-back rows merged back (held back: every 8th row).
    std::vector<int64_t> every;
    {
      size_t t = 0, h = 0;
      // prefill_handoff.cc holds back row i when i % 8 == 7 (8: every 8th,
      // while rows / 8 <= 512 as here).
      const size_t holdout_rows = full.holdout_ids.size() / w;
      constexpr size_t step = 8;
      ASSERT_EQ(holdout_rows, rows / step);
      for (size_t i = 0; i < rows; ++i) {
        const bool held = h < holdout_rows && i % step == step - 1;
        const int64_t* from = held ? full.holdout_ids.data() + (h++) * w : full.ids.data() + (t++) * w;
        every.insert(every.end(), from, from + w);
      }
    }
    // The bounded run's lists are the sampled rows' lists, in sample order,
    // split between training and held-back rows.
    size_t t = 0, h = 0;
    for (size_t i = 0; i < sample.size(); ++i) {
      const int64_t* want = every.data() + sample[i] * w;
      if (t * w < s.ids.size() && std::equal(want, want + w, s.ids.begin() + t * w)) {
        ++t;
      } else {
        ASSERT_LT(h * w, s.holdout_ids.size()) << "list " << i << " (query row " << sample[i] << ")";
        ASSERT_TRUE(std::equal(want, want + w, s.holdout_ids.begin() + h * w))
            << "list " << i << " (query row " << sample[i] << ")";
        ++h;
      }
    }
    // Each held-back query's list is its own exact top-w over the shard's
    // keys (double oracle; ties within 1e-4 of the w-th score accepted).
    const size_t n = s.keys.size() / s.dim;
    for (size_t r = 0; r < s.holdout_ids.size() / w; ++r) {
      const float* q = s.holdout_queries.data() + r * s.dim;
      std::vector<double> score(n);
      for (size_t k = 0; k < n; ++k) {
        double dot = 0;
        for (size_t j = 0; j < s.dim; ++j) dot += double(q[j]) * double(s.keys[k * s.dim + j]);
        score[k] = dot;
      }
      std::vector<double> sorted = score;
      std::nth_element(sorted.begin(), sorted.begin() + (w - 1), sorted.end(), std::greater<>());
      const double kth = sorted[w - 1];
      for (size_t j = 0; j < w; ++j) {
        const int64_t id = s.holdout_ids[r * w + j];
        ASSERT_GE(id, 0);
        ASSERT_LT(static_cast<size_t>(id), n);
        EXPECT_GE(score[id], kth - 1e-4 * (1 + std::abs(kth)))
            << "held-back row " << r << " id " << id << ": not in its query's exact top-" << w;
      }
    }
  }
}

// --train_topk (EngineOptions::train_topk): a value that is neither exact
// nor approx is rejected naming the option.
TEST_F(TrainTopKEngineTest, UnknownTrainTopKModeIsRejected) {
  auto node = InProcessRetrievalClient::Create({});
  ASSERT_TRUE(node.ok()) << node.status();
  EngineOptions eo;
  eo.train_topk = static_cast<TrainingTopKMode>(9);
  auto engine = RetrievalEngine::Create(backend_.get(), weights_, node->get(), eo);
  ASSERT_FALSE(engine.ok());
  EXPECT_EQ(engine.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(engine.status().message().find("train_topk"), std::string::npos) << engine.status();
  EXPECT_NE(engine.status().message().find("exact or approx"), std::string::npos);
  EXPECT_EQ(EngineOptions{}.train_topk, TrainingTopKMode::kApprox);  // the worker's default
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
