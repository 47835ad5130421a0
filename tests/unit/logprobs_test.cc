// Issue 19 (OpenAI API compatibility), the engine's part: log-probabilities
// (LogprobsOf, Sampler::LastLogprobs after the penalties, RequestLoop's per
// token logprobs), OpenAI's presence / frequency penalties over generated
// tokens only, their bounds, and PromptLogprobs (echo) against a
// full-attention PREFILL of stories260K (LlamaModel::Prefill of each prefix)
// to 1e-4.
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "gpu_worker/engine/generation.h"
#include "gpu_worker/engine/retrieval_engine.h"
#include "gpu_worker/engine/sampler.h"
#include "gpu_worker/model/llama_model.h"
#include "gtest/gtest.h"
#include "retrieval_node/client/in_process_client.h"
#include "tests/support/stories_model.h"

namespace kvr::worker {
namespace {

// log_softmax(v)[i] in long double: the oracle.
std::vector<double> LogSoftmax(const std::vector<float>& v) {
  long double mx = -std::numeric_limits<long double>::infinity();
  for (float x : v) mx = std::max<long double>(mx, x);
  long double total = 0.0L;
  for (float x : v) total += std::exp(static_cast<long double>(x) - mx);
  std::vector<double> out;
  for (float x : v) out.push_back(static_cast<double>(x - mx - std::log(total)));
  return out;
}

TEST(LogprobsOfTest, MatchesLogSoftmaxAndRanksTopWithTiesByLowerId) {
  std::vector<float> logits = {0.5f, 3.0f, -1.0f, 3.0f, 2.0f, -40.0f};
  const std::vector<double> ref = LogSoftmax(logits);
  const TokenLogprobs lp = LogprobsOf(logits, 2, 4);
  EXPECT_EQ(lp.token, 2);
  EXPECT_TRUE(lp.has_logprob);
  EXPECT_NEAR(lp.logprob, ref[2], 1e-6);
  ASSERT_EQ(lp.top.size(), 4u);
  const int32_t order[] = {1, 3, 4, 0};  // 1 and 3 tie: lower id first
  for (size_t i = 0; i < 4; ++i) {
    EXPECT_EQ(lp.top[i].first, order[i]) << i;
    EXPECT_NEAR(lp.top[i].second, ref[static_cast<size_t>(order[i])], 1e-6) << i;
  }
  EXPECT_TRUE(LogprobsOf(logits, 0, 0).top.empty());
  EXPECT_EQ(LogprobsOf(logits, 0, 100).top.size(), logits.size());  // clamped
}

// presence / frequency penalties count generated tokens only (context from
// set_generated_from on), and LastLogprobs reports the penalised
// distribution the draw came from.
TEST(PenaltyTest, AdditivePenaltiesOverGeneratedTokensOnly) {
  constexpr int kVocab = 8;
  std::vector<float> logits(kVocab, 0.0f);
  logits[5] = 2.0f;
  logits[6] = 1.5f;
  SamplingParams p;  // greedy
  p.presence_penalty = 0.25f;
  p.frequency_penalty = 0.5f;
  auto s = Sampler::Create(p, kVocab);
  ASSERT_TRUE(s.ok()) << s.status();
  // Prompt [1, 5, 5, 5]: 5 is in the prompt only -> not penalised.
  std::vector<int32_t> context = {1, 5, 5, 5};
  s->set_generated_from(context.size());
  EXPECT_EQ(s->Sample(logits, context), 5);
  EXPECT_NEAR(s->LastLogprobs(5, 0).logprob, LogSoftmax(logits)[5], 1e-6);
  // 5 generated once: 2.0 - 0.25 - 0.5 = 1.25 < 1.5 -> 6.
  context.push_back(5);
  EXPECT_EQ(s->Sample(logits, context), 6);
  std::vector<float> penalised = logits;
  penalised[5] = 1.25f;
  const TokenLogprobs lp = s->LastLogprobs(6, 2);
  EXPECT_NEAR(lp.logprob, LogSoftmax(penalised)[6], 1e-6);
  ASSERT_EQ(lp.top.size(), 2u);
  EXPECT_EQ(lp.top[0].first, 6);
  EXPECT_EQ(lp.top[1].first, 5);
  EXPECT_NEAR(lp.top[1].second, LogSoftmax(penalised)[5], 1e-6);
  // Negative penalties encourage repeats: 5 generated twice, -2 each.
  SamplingParams neg;
  neg.frequency_penalty = -2.0f;
  auto n = Sampler::Create(neg, kVocab);
  ASSERT_TRUE(n.ok());
  std::vector<float> flat(kVocab, 0.0f);
  flat[0] = 3.0f;
  std::vector<int32_t> c2 = {1, 5, 5};
  n->set_generated_from(1);
  EXPECT_EQ(n->Sample(flat, c2), 5);  // 0 + 4 > 3
}

TEST(PenaltyTest, BoundsNameTheField) {
  for (float bad : {2.01f, -2.5f, std::numeric_limits<float>::quiet_NaN(),
                    std::numeric_limits<float>::infinity()}) {
    SamplingParams p;
    p.presence_penalty = bad;
    absl::Status st = ValidateSampling(p);
    EXPECT_TRUE(absl::IsInvalidArgument(st)) << bad;
    EXPECT_NE(st.message().find("presence_penalty"), std::string::npos) << st;
    EXPECT_NE(st.message().find("[-2, 2]"), std::string::npos) << st;
    SamplingParams f;
    f.frequency_penalty = bad;
    st = ValidateSampling(f);
    EXPECT_NE(st.message().find("frequency_penalty"), std::string::npos) << st;
  }
  SamplingParams edge;
  edge.presence_penalty = -2.0f;
  edge.frequency_penalty = 2.0f;
  EXPECT_TRUE(ValidateSampling(edge).ok());
}

class LogprobsModelTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(model_.Load());
    retrieval::NodeCoreOptions no;
    no.tail_capacity = 16;
    no.min_index_keys = 8;
    auto node = retrieval::InProcessRetrievalClient::Create(no);
    ASSERT_TRUE(node.ok()) << node.status();
    node_ = *std::move(node);
    auto engine = RetrievalEngine::Create(model_.backend.get(), model_.weights, node_.get(), {});
    ASSERT_TRUE(engine.ok()) << engine.status();
    engine_ = *std::move(engine);
  }

  test_support::StoriesModel model_;
  std::unique_ptr<retrieval::InProcessRetrievalClient> node_;
  std::unique_ptr<RetrievalEngine> engine_;
};

// echo's prompt logprobs equal a full-attention prefill's log-softmax at
// every position to 1e-4 (the oracle prefills each prefix anew with
// LlamaModel, the full-attention baseline), with the top alternatives.
TEST_F(LogprobsModelTest, PromptLogprobsEqualFullAttentionPrefill) {
  const std::vector<int32_t> prompt =
      model_.Encode("Once upon a time, there was a little girl named Lily. She liked to play");
  ASSERT_GT(prompt.size(), 10u);
  auto lp = PromptLogprobs(*engine_, prompt, 5);
  ASSERT_TRUE(lp.ok()) << lp.status();
  ASSERT_EQ(lp->size(), prompt.size());
  EXPECT_FALSE((*lp)[0].has_logprob);
  EXPECT_EQ((*lp)[0].token, prompt[0]);
  auto ref = LlamaModel::Create(model_.backend.get(), model_.weights);
  ASSERT_TRUE(ref.ok()) << ref.status();
  double worst = 0.0;
  for (size_t i = 1; i < prompt.size(); ++i) {
    auto logits = (*ref)->Prefill(std::span<const int32_t>(prompt.data(), i));
    ASSERT_TRUE(logits.ok()) << logits.status();
    const std::vector<double> want = LogSoftmax(std::vector<float>(logits->begin(), logits->end()));
    const TokenLogprobs& got = (*lp)[i];
    EXPECT_EQ(got.token, prompt[i]);
    ASSERT_TRUE(got.has_logprob);
    worst = std::max(worst, std::abs(got.logprob - want[static_cast<size_t>(prompt[i])]));
    ASSERT_EQ(got.top.size(), 5u);
    for (const auto& [id, value] : got.top) {
      worst = std::max(worst, std::abs(value - want[static_cast<size_t>(id)]));
    }
    EXPECT_EQ(got.top[0].first, test_support::Argmax(*logits)) << "position " << i;
  }
  EXPECT_LT(worst, 1e-4);
  // The scratch sequence was ended: a bad top_n or an empty prompt is refused.
  EXPECT_TRUE(absl::IsInvalidArgument(PromptLogprobs(*engine_, prompt, 21).status()));
  EXPECT_TRUE(absl::IsInvalidArgument(PromptLogprobs(*engine_, {}, 1).status()));
}

// Greedy generation with logprobs: each token is its distribution's top-1,
// its logprob the top entry's, the same tokens as without logprobs, in both
// attention modes; the first token's logprob equals the prompt's last
// full-attention distribution (prefill is full attention in both modes).
TEST_F(LogprobsModelTest, GreedyTokensAreTheirTopLogprob) {
  const std::string text = "Once upon a time, there was a little girl named Lily. She";
  for (AttentionMode mode : {AttentionMode::kFull, AttentionMode::kRetrieval}) {
    GenerateRequest req;
    req.prompt = text;
    req.max_tokens = 24;
    req.attention.mode = mode;
    auto plain = Generate(*engine_, *model_.tokenizer, req);
    ASSERT_TRUE(plain.ok()) << plain.status();
    EXPECT_TRUE(plain->logprobs.empty());
    req.logprobs = 3;
    auto with = Generate(*engine_, *model_.tokenizer, req);
    ASSERT_TRUE(with.ok()) << with.status();
    EXPECT_EQ(with->tokens, plain->tokens);
    ASSERT_EQ(with->logprobs.size(), with->tokens.size());
    for (size_t i = 0; i < with->tokens.size(); ++i) {
      const TokenLogprobs& lp = with->logprobs[i];
      EXPECT_EQ(lp.token, with->tokens[i]);
      ASSERT_EQ(lp.top.size(), 3u);
      EXPECT_EQ(lp.top[0].first, lp.token) << i;
      EXPECT_EQ(lp.top[0].second, lp.logprob) << i;
      EXPECT_LE(lp.logprob, 0.0f);
      EXPECT_GE(lp.top[0].second, lp.top[1].second);
    }
    // First generated token: same as the prompt's next-token distribution.
    std::vector<int32_t> ids = model_.Encode(text);
    ids.push_back(with->tokens[0]);
    auto prompt_lp = PromptLogprobs(*engine_, ids, 0);
    ASSERT_TRUE(prompt_lp.ok()) << prompt_lp.status();
    EXPECT_NEAR(prompt_lp->back().logprob, with->logprobs[0].logprob, 1e-4);
  }
  GenerateRequest bad;
  bad.prompt = text;
  bad.logprobs = 21;
  auto r = Generate(*engine_, *model_.tokenizer, bad);
  EXPECT_TRUE(absl::IsInvalidArgument(r.status()));
  EXPECT_NE(r.status().message().find("logprobs"), std::string::npos);
}

}  // namespace
}  // namespace kvr::worker
