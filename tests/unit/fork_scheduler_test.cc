// GenerationWork::forks in the worker's GenerationScheduler (issue 19, n > 1
// sharing one prefill), on stories260K with an in-process node:
//
//  * a group of 3 choices (retrieval mode, sampled, seeds s, s+1, s+2) is
//    prefilled once (RetrievalEngine::prefills() +1, forks +2) and choice j
//    streams exactly the tokens and text of a lone request with seed s+j;
//  * through a client that cannot fork (the RetrievalClient default), each
//    fork is prefilled on its own instead (prefills +3) with the same
//    tokens: the fallback changes cost, never output;
//  * Submit reserves every choice's memory: a budget that holds 2 of 3
//    sequences refuses the group (RESOURCE_EXHAUSTED naming the flag), and
//    the reservation returns to 0 after a served group (echo + logprobs
//    included);
//  * validation: a fork with another prompt, a fork with resume_tokens and
//    forks with resume_tokens are refused naming n.
#include <chrono>
#include <future>
#include <memory>
#include <string>
#include <vector>

#include "gpu_worker/engine/retrieval_engine.h"
#include "gpu_worker/server/generation_scheduler.h"
#include "google/protobuf/stubs/common.h"
#include "gtest/gtest.h"
#include "retrieval_node/client/in_process_client.h"
#include "tests/support/forwarding_client.h"
#include "tests/support/stories_model.h"

namespace kvr::worker {
namespace {

constexpr char kPrompt[] =
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the "
    "park with her friends. One day, she saw a big red ball under a tree.";

struct Outcome {
  std::vector<int32_t> tokens;
  std::string text;
  std::promise<absl::StatusOr<GenerationSummary>> done;
};

class ForkSchedulerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    GOOGLE_PROTOBUF_VERIFY_VERSION;  // libprotobuf before libsentencepiece
    ASSERT_TRUE(model_.Load());
    auto n = retrieval::InProcessRetrievalClient::Create({});
    ASSERT_TRUE(n.ok()) << n.status();
    node_ = *std::move(n);
  }

  std::unique_ptr<RetrievalEngine> Engine(retrieval::RetrievalClient* client) {
    auto e = RetrievalEngine::Create(model_.backend.get(), model_.weights, client);
    EXPECT_TRUE(e.ok()) << e.status();
    return e.ok() ? *std::move(e) : nullptr;
  }

  std::unique_ptr<GenerationScheduler> Scheduler(RetrievalEngine* engine, int64_t budget = 0) {
    SchedulerOptions o;
    o.max_concurrent = 4;
    o.memory_budget_bytes = budget;
    auto s = GenerationScheduler::Create(engine, model_.tokenizer.get(), o);
    EXPECT_TRUE(s.ok()) << s.status();
    return s.ok() ? *std::move(s) : nullptr;
  }

  static AttentionOptions Retrieval() {
    AttentionOptions a;
    a.sinks = 4;
    a.window = 16;
    a.top_k = 8;
    a.chunk_tokens = 24;
    return a;
  }

  // One choice wired to `out`.
  GenerationWork Work(uint64_t seed, Outcome* out) {
    GenerationWork w;
    w.prompt = model_.Encode(kPrompt);
    w.max_tokens = 20;
    w.attention = Retrieval();
    w.sampling.temperature = 0.9f;
    w.sampling.seed = seed;
    w.on_tokens = [out](std::span<const int32_t> t, std::string_view text) {
      out->tokens.insert(out->tokens.end(), t.begin(), t.end());
      out->text += text;
    };
    w.on_done = [out](absl::StatusOr<GenerationSummary> r) { out->done.set_value(std::move(r)); };
    return w;
  }

  // A group of choices with seeds seed, seed+1, ...
  GenerationWork Group(uint64_t seed, std::vector<Outcome>& outs) {
    GenerationWork w = Work(seed, &outs[0]);
    for (size_t j = 1; j < outs.size(); ++j) w.forks.push_back(Work(seed + j, &outs[j]));
    return w;
  }

  static void Wait(Outcome& o) {
    auto f = o.done.get_future();
    ASSERT_EQ(f.wait_for(std::chrono::seconds(120)), std::future_status::ready);
    absl::StatusOr<GenerationSummary> r = f.get();
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->completion_tokens, static_cast<int64_t>(o.tokens.size()));
  }

  // The lone requests' outcomes, seeds seed .. seed + n - 1.
  std::vector<Outcome> Alone(uint64_t seed, int n) {
    auto engine = Engine(node_.get());
    auto s = Scheduler(engine.get());
    std::vector<Outcome> outs(static_cast<size_t>(n));
    for (int j = 0; j < n; ++j) {
      EXPECT_TRUE(s->Submit(Work(seed + static_cast<uint64_t>(j), &outs[j])).ok());
      Wait(outs[j]);
    }
    return outs;
  }

  test_support::StoriesModel model_;
  std::unique_ptr<retrieval::InProcessRetrievalClient> node_;
};

TEST_F(ForkSchedulerTest, GroupPrefillsOnceAndChoiceJIsSeedPlusJ) {
  const std::vector<Outcome> alone = Alone(5, 3);
  auto engine = Engine(node_.get());
  auto s = Scheduler(engine.get());
  std::vector<Outcome> outs(3);
  GenerationWork group = Group(5, outs);
  ASSERT_TRUE(s->ValidateWork(group).ok());
  ASSERT_TRUE(s->Submit(std::move(group)).ok());
  for (Outcome& o : outs) Wait(o);
  EXPECT_EQ(engine->prefills(), 1);
  EXPECT_EQ(engine->forks(), 2);
  for (size_t j = 0; j < 3; ++j) {
    EXPECT_EQ(outs[j].tokens, alone[j].tokens) << "choice " << j;
    EXPECT_EQ(outs[j].text, alone[j].text) << "choice " << j;
  }
  EXPECT_NE(outs[0].tokens, outs[1].tokens);
  EXPECT_EQ(s->load().active, 0);
  EXPECT_EQ(s->load().finished, 3);
}

TEST_F(ForkSchedulerTest, NodesThatCannotForkPrefillEachChoice) {
  const std::vector<Outcome> alone = Alone(9, 3);
  test_support::ForwardingRetrievalClient no_fork(node_.get());
  auto engine = Engine(&no_fork);
  auto s = Scheduler(engine.get());
  std::vector<Outcome> outs(3);
  ASSERT_TRUE(s->Submit(Group(9, outs)).ok());
  for (Outcome& o : outs) Wait(o);
  EXPECT_EQ(engine->prefills(), 3);
  EXPECT_EQ(engine->forks(), 0);
  for (size_t j = 0; j < 3; ++j) EXPECT_EQ(outs[j].tokens, alone[j].tokens) << "choice " << j;
  EXPECT_EQ(s->load().active, 0);
}

TEST_F(ForkSchedulerTest, SubmitReservesEveryChoicesMemory) {
  auto engine = Engine(node_.get());
  const int64_t one = engine->SequenceBytes(Retrieval());
  {
    auto s = Scheduler(engine.get(), 3 * one - 1);
    std::vector<Outcome> outs(3);
    const absl::Status st = s->Submit(Group(1, outs));
    EXPECT_TRUE(absl::IsResourceExhausted(st)) << st;
    EXPECT_NE(st.message().find("--host_memory_budget_bytes"), std::string::npos) << st;
    EXPECT_EQ(s->load().reserved_bytes, 0);
  }
  auto s = Scheduler(engine.get(), 3 * one);
  std::vector<Outcome> outs(3);
  ASSERT_TRUE(s->Submit(Group(1, outs)).ok());
  for (Outcome& o : outs) Wait(o);
  EXPECT_EQ(s->load().reserved_bytes, 0);
  // With echo + logprobs: what Submit reserved for the group is exactly
  // what the choices' ends return (the prompt scored once, by choice 0).
  auto big = Scheduler(engine.get(), int64_t{1} << 40);
  std::vector<Outcome> echoed(2);
  GenerationWork group = Group(1, echoed);
  for (GenerationWork* w : {&group, &group.forks[0]}) {
    w->echo = true;
    w->logprobs = 1;
  }
  ASSERT_TRUE(big->Submit(std::move(group)).ok());
  EXPECT_GT(big->load().reserved_bytes, 2 * one);
  for (Outcome& o : echoed) Wait(o);
  EXPECT_EQ(big->load().reserved_bytes, 0);
}

TEST_F(ForkSchedulerTest, ValidationRefusesMismatchedForks) {
  auto engine = Engine(node_.get());
  auto s = Scheduler(engine.get());
  std::vector<Outcome> outs(2);
  GenerationWork other_prompt = Group(1, outs);
  other_prompt.forks[0].prompt.push_back(5);
  absl::Status st = s->ValidateWork(other_prompt);
  EXPECT_TRUE(absl::IsInvalidArgument(st)) << st;
  EXPECT_NE(st.message().find("n: every choice"), std::string::npos) << st;
  GenerationWork resumed = Group(1, outs);
  resumed.resume_tokens = {5};
  st = s->ValidateWork(resumed);
  EXPECT_TRUE(absl::IsInvalidArgument(st)) << st;
  EXPECT_NE(st.message().find("n: more than one choice with resume_tokens"), std::string::npos)
      << st;
  GenerationWork fork_resumed = Group(1, outs);
  fork_resumed.forks[0].resume_tokens = {5};
  EXPECT_TRUE(absl::IsInvalidArgument(s->ValidateWork(fork_resumed)));
}

}  // namespace
}  // namespace kvr::worker
