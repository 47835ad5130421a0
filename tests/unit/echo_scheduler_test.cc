// Issue 19 in the worker's GenerationScheduler: a request with echo +
// logprobs streams one TokenLogprobs per token (on_logprobs before
// on_tokens) and ends with the prompt's full-attention logprobs
// (PromptLogprobs) in its summary; and the scratch full-attention sequence
// that scoring needs is reserved in the memory budget at Submit, so a
// budget with room for the request's own sequence only refuses it
// (RESOURCE_EXHAUSTED naming the budget) instead of over-committing.
#include <chrono>
#include <future>
#include <memory>
#include <string>
#include <vector>

#include "gpu_worker/engine/generation.h"
#include "gpu_worker/engine/retrieval_engine.h"
#include "gpu_worker/server/generation_scheduler.h"
#include "google/protobuf/stubs/common.h"
#include "gtest/gtest.h"
#include "retrieval_node/client/in_process_client.h"
#include "tests/support/stories_model.h"

namespace kvr::worker {
namespace {

class EchoSchedulerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    GOOGLE_PROTOBUF_VERIFY_VERSION;  // libprotobuf before libsentencepiece
    ASSERT_TRUE(model_.Load());
    auto n = retrieval::InProcessRetrievalClient::Create({});
    ASSERT_TRUE(n.ok()) << n.status();
    node_ = *std::move(n);
    auto e = RetrievalEngine::Create(model_.backend.get(), model_.weights, node_.get());
    ASSERT_TRUE(e.ok()) << e.status();
    engine_ = *std::move(e);
    AttentionOptions full;
    full.mode = AttentionMode::kFull;
    own_bytes_ = engine_->SequenceBytes(AttentionOptions{});
    scratch_bytes_ = engine_->SequenceBytes(full);
  }

  std::unique_ptr<GenerationScheduler> Scheduler(int64_t budget) {
    SchedulerOptions o;
    o.max_concurrent = 2;
    o.memory_budget_bytes = budget;
    auto s = GenerationScheduler::Create(engine_.get(), model_.tokenizer.get(), o);
    EXPECT_TRUE(s.ok()) << s.status();
    return s.ok() ? *std::move(s) : nullptr;
  }

  GenerationWork Work(bool echo) {
    GenerationWork w;
    w.prompt = model_.Encode("Once upon a time, there was a little girl named Lily. She");
    w.max_tokens = 12;
    w.logprobs = 2;
    w.echo = echo;
    return w;
  }

  test_support::StoriesModel model_;
  std::unique_ptr<retrieval::InProcessRetrievalClient> node_;
  std::unique_ptr<RetrievalEngine> engine_;
  int64_t own_bytes_ = 0;
  int64_t scratch_bytes_ = 0;
};

TEST_F(EchoSchedulerTest, EchoStreamsLogprobsAndScoresThePromptWithinItsBudget) {
  ASSERT_GT(own_bytes_, 0);
  ASSERT_GT(scratch_bytes_, 0);
  // Room for the request's sequence and the scratch one: served.
  std::unique_ptr<GenerationScheduler> s = Scheduler(own_bytes_ + scratch_bytes_);
  ASSERT_NE(s, nullptr);
  GenerationWork w = Work(/*echo=*/true);
  const size_t prompt_size = w.prompt.size();
  std::vector<int32_t> ids;
  std::vector<TokenLogprobs> lps;
  size_t ids_when_logprobs = 0;
  bool logprobs_first = true;
  w.on_logprobs = [&](std::span<const TokenLogprobs> l) {
    ids_when_logprobs = ids.size();
    lps.insert(lps.end(), l.begin(), l.end());
  };
  w.on_tokens = [&](std::span<const int32_t> t, std::string_view) {
    logprobs_first = logprobs_first && lps.size() == ids.size() + t.size() &&
                     ids_when_logprobs == ids.size();
    ids.insert(ids.end(), t.begin(), t.end());
  };
  std::promise<absl::StatusOr<GenerationSummary>> done;
  w.on_done = [&](absl::StatusOr<GenerationSummary> r) { done.set_value(std::move(r)); };
  const std::vector<int32_t> prompt = w.prompt;
  ASSERT_TRUE(s->Submit(std::move(w)).ok());
  auto f = done.get_future();
  ASSERT_EQ(f.wait_for(std::chrono::seconds(60)), std::future_status::ready);
  absl::StatusOr<GenerationSummary> r = f.get();
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(ids.size(), 12u);
  EXPECT_TRUE(logprobs_first);
  ASSERT_EQ(lps.size(), ids.size());
  for (size_t i = 0; i < ids.size(); ++i) {
    EXPECT_EQ(lps[i].token, ids[i]);
    ASSERT_EQ(lps[i].top.size(), 2u);
    EXPECT_EQ(lps[i].top[0].first, ids[i]) << "greedy: the token is its top-1";
  }
  // The summary's prompt logprobs are PromptLogprobs' (full attention).
  ASSERT_EQ(r->prompt_logprobs.size(), prompt_size);
  auto want = PromptLogprobs(*engine_, prompt, 2);
  ASSERT_TRUE(want.ok()) << want.status();
  EXPECT_FALSE(r->prompt_logprobs[0].has_logprob);
  for (size_t i = 1; i < prompt_size; ++i) {
    EXPECT_EQ(r->prompt_logprobs[i].token, prompt[i]);
    EXPECT_NEAR(r->prompt_logprobs[i].logprob, (*want)[i].logprob, 1e-6);
  }
}

TEST_F(EchoSchedulerTest, EchoReservesTheScratchSequenceInTheMemoryBudget) {
  // Room for the request's own sequence only.
  std::unique_ptr<GenerationScheduler> s = Scheduler(own_bytes_ + scratch_bytes_ - 1);
  ASSERT_NE(s, nullptr);
  GenerationWork echo = Work(/*echo=*/true);
  echo.on_done = [](absl::StatusOr<GenerationSummary>) {};
  const absl::Status refused = s->Submit(std::move(echo));
  EXPECT_TRUE(absl::IsResourceExhausted(refused)) << refused;
  EXPECT_NE(refused.message().find("memory budget"), std::string::npos) << refused;
  // Without echo the same request fits, runs and gives its budget back.
  for (int i = 0; i < 2; ++i) {
    GenerationWork plain = Work(/*echo=*/false);
    std::promise<absl::StatusOr<GenerationSummary>> done;
    plain.on_done = [&](absl::StatusOr<GenerationSummary> r) { done.set_value(std::move(r)); };
    ASSERT_TRUE(s->Submit(std::move(plain)).ok());
    auto f = done.get_future();
    ASSERT_EQ(f.wait_for(std::chrono::seconds(60)), std::future_status::ready);
    absl::StatusOr<GenerationSummary> r = f.get();
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_TRUE(r->prompt_logprobs.empty());
  }
}

}  // namespace
}  // namespace kvr::worker
