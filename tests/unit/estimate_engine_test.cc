// Issue 18 on the decode worker: AttentionOptions::estimate reaches every
// Attend the engine sends (stories260K, CPU backend, in-process node):
//  * "on": every AttendRequest carries EstimateMode::kOn and the node
//    reports estimated keys; "off": kOff, nothing estimated, and the logits
//    are bit-identical to "default" on a node whose --estimate is off;
//  * ParseEstimateMode accepts exactly default / on / off, and
//    ValidateAttentionOptions rejects an unknown mode naming `estimate`.
#include <algorithm>
#include <memory>
#include <mutex>
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

// Records each Attend's mode and the stats it came back with.
class RecordingClient final : public test_support::ForwardingRetrievalClient {
 public:
  explicit RecordingClient(retrieval::RetrievalClient* node) : ForwardingRetrievalClient(node) {}

  void AttendAsync(const retrieval::AttendRequest& request, PartialsView out,
                   retrieval::AttendStats* stats, retrieval::StatusCallback done) override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      modes_.push_back(request.estimate);
    }
    ForwardingRetrievalClient::AttendAsync(
        request, out, stats, [this, stats, done = std::move(done)](absl::Status s) {
          if (stats != nullptr) {
            std::lock_guard<std::mutex> lock(mu_);
            keys_estimated_ += stats->keys_estimated;
          }
          done(std::move(s));
        });
  }
  std::vector<EstimateMode> modes() {
    std::lock_guard<std::mutex> lock(mu_);
    return modes_;
  }
  int64_t keys_estimated() {
    std::lock_guard<std::mutex> lock(mu_);
    return keys_estimated_;
  }

 private:
  std::mutex mu_;
  std::vector<EstimateMode> modes_;
  int64_t keys_estimated_ = 0;
};

class EstimateEngineTest : public ::testing::Test {
 protected:
  void SetUp() override {
    test_support::StoriesModel m;
    ASSERT_TRUE(m.Load());
    weights_ = m.weights;
    backend_ = std::move(m.backend);
  }

  struct Result {
    std::vector<std::vector<float>> logits;  // prefill + each step
    std::vector<EstimateMode> modes;
    int64_t keys_estimated = 0;
  };
  // Prefills 200 tokens (180 offloaded, top_k 8) and decodes 4 greedily.
  Result Run(EstimateMode mode) {
    Result r;
    auto node = InProcessRetrievalClient::Create({});  // node --estimate off
    EXPECT_TRUE(node.ok()) << node.status();
    if (!node.ok()) return r;
    RecordingClient client(node->get());
    EngineOptions eo;
    eo.handoff_threads = 0;
    auto engine = RetrievalEngine::Create(backend_.get(), weights_, &client, eo);
    EXPECT_TRUE(engine.ok()) << engine.status();
    if (!engine.ok()) return r;
    AttentionOptions a;
    a.top_k = 8;
    a.estimate = mode;
    std::vector<int32_t> prompt(200);
    for (size_t i = 0; i < prompt.size(); ++i) prompt[i] = static_cast<int32_t>(1 + (i * 37) % 500);
    auto logits = (*engine)->Prefill(prompt, a);
    for (int i = 0; i < 4 && logits.ok(); ++i) {
      r.logits.emplace_back(logits->begin(), logits->end());
      const auto best = std::max_element(logits->begin(), logits->end()) - logits->begin();
      logits = (*engine)->DecodeStep(static_cast<int32_t>(best));
    }
    EXPECT_TRUE(logits.ok()) << logits.status();
    r.modes = client.modes();
    r.keys_estimated = client.keys_estimated();
    return r;
  }

  std::shared_ptr<const LlamaWeights> weights_;
  std::unique_ptr<Backend> backend_;
};

TEST_F(EstimateEngineTest, ModeReachesEveryAttendAndOffMatchesDefault) {
  const Result on = Run(EstimateMode::kOn);
  const Result off = Run(EstimateMode::kOff);
  const Result def = Run(EstimateMode::kDefault);
  ASSERT_FALSE(on.modes.empty());
  for (EstimateMode m : on.modes) EXPECT_EQ(m, EstimateMode::kOn);
  for (EstimateMode m : off.modes) EXPECT_EQ(m, EstimateMode::kOff);
  for (EstimateMode m : def.modes) EXPECT_EQ(m, EstimateMode::kDefault);
  EXPECT_GT(on.keys_estimated, 0);
  EXPECT_EQ(off.keys_estimated, 0);
  EXPECT_EQ(def.keys_estimated, 0);  // the in-process node's --estimate is off
  ASSERT_EQ(off.logits.size(), def.logits.size());
  for (size_t i = 0; i < off.logits.size(); ++i) {
    EXPECT_EQ(off.logits[i], def.logits[i]) << "step " << i;
  }
  // The estimate changes what the model sees.
  ASSERT_EQ(on.logits.size(), off.logits.size());
  EXPECT_NE(on.logits.back(), off.logits.back());
}

TEST(EstimateOptionsTest, ParseAndValidate) {
  EXPECT_EQ(*ParseEstimateMode("default"), EstimateMode::kDefault);
  EXPECT_EQ(*ParseEstimateMode("on"), EstimateMode::kOn);
  EXPECT_EQ(*ParseEstimateMode("off"), EstimateMode::kOff);
  for (EstimateMode m : {EstimateMode::kDefault, EstimateMode::kOn, EstimateMode::kOff}) {
    EXPECT_EQ(*ParseEstimateMode(EstimateModeName(m)), m);
  }
  for (const char* bad : {"", "ON", "true", "1"}) {
    auto m = ParseEstimateMode(bad);
    ASSERT_EQ(m.status().code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_NE(m.status().message().find("default, on, off"), std::string::npos) << m.status();
  }
  AttentionOptions a;
  a.estimate = static_cast<EstimateMode>(9);
  const absl::Status s = ValidateAttentionOptions(a);
  ASSERT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("estimate 9"), std::string::npos) << s;
}

}  // namespace
}  // namespace kvr::worker
