// The worker's host and device memory budgets (issue 14, deliverable 4):
// GenerationScheduler admission over a real stories260K engine on the CPU
// backend. With SchedulerOptions::backend_on_device (what kvr_worker sets
// for a backend with device memory, e.g. --backend=cuda) a request's K/V
// caches (RetrievalEngine::SequenceBackendBytes) count against
// device_memory_budget_bytes and only the rest of SequenceBytes against the
// host budget; without it, everything is host memory and the device budget
// is ignored. Refusals are RESOURCE_EXHAUSTED naming the budget's flag, the
// bytes needed and the budget. The same through a real kvr_worker on the
// emulated CUDA backend is bounds_test's WorkerDeviceBudget... test.
#include <chrono>
#include <future>
#include <memory>
#include <string>
#include <vector>

#include "google/protobuf/stubs/common.h"
#include "gpu_worker/engine/attention_options.h"
#include "gpu_worker/engine/retrieval_engine.h"
#include "gpu_worker/server/generation_scheduler.h"
#include "gtest/gtest.h"
#include "retrieval_node/client/in_process_client.h"
#include "tests/support/stories_model.h"

namespace kvr::worker {
namespace {

void ExpectMessageHas(const absl::Status& s, const std::vector<std::string>& parts) {
  for (const std::string& p : parts) {
    EXPECT_NE(s.message().find(p), std::string::npos) << s << " lacks \"" << p << "\"";
  }
}

class BudgetSplitTest : public ::testing::Test {
 protected:
  void SetUp() override {
    GOOGLE_PROTOBUF_VERIFY_VERSION;  // libprotobuf ahead of libsentencepiece
    ASSERT_TRUE(model_.Load()) << "could not load stories260K";
    auto n = retrieval::InProcessRetrievalClient::Create({});
    ASSERT_TRUE(n.ok()) << n.status();
    node_ = *std::move(n);
    auto e = RetrievalEngine::Create(model_.backend.get(), model_.weights, node_.get());
    ASSERT_TRUE(e.ok()) << e.status();
    engine_ = *std::move(e);
    prompt_ = model_.Encode("Once upon a time");
    full_.mode = AttentionMode::kFull;
  }

  // A request in `attention`'s mode reporting into `done`.
  GenerationWork Work(const AttentionOptions& attention, int max_tokens,
                      std::promise<absl::StatusOr<GenerationSummary>>* done) {
    GenerationWork w;
    w.prompt = prompt_;
    w.max_tokens = max_tokens;
    w.attention = attention;
    w.on_done = [done](absl::StatusOr<GenerationSummary> s) { done->set_value(std::move(s)); };
    return w;
  }

  test_support::StoriesModel model_;
  std::unique_ptr<retrieval::InProcessRetrievalClient> node_;
  std::unique_ptr<RetrievalEngine> engine_;
  std::vector<int32_t> prompt_;
  AttentionOptions full_;
  AttentionOptions retrieval_;  // defaults: sinks 4 + window 16
};

TEST_F(BudgetSplitTest, BackendBytesAreTheKVCaches) {
  const LlamaConfig& c = model_.weights->config;
  const int64_t kv_row = 2 * c.kv_dim() * 4;  // K and V of one row, f32
  EXPECT_EQ(engine_->SequenceBackendBytes(full_), c.n_layers * 512 * kv_row);
  EXPECT_EQ(engine_->SequenceBackendBytes(full_), 655360);  // stories260K
  EXPECT_EQ(engine_->SequenceBackendBytes(retrieval_), c.n_layers * 20 * kv_row);
  // The rest is host memory: logits + token history (+ host copies and row
  // flags in retrieval mode).
  EXPECT_EQ(engine_->SequenceBytes(full_) - engine_->SequenceBackendBytes(full_),
            int64_t{c.vocab_size} * 4 + 512 * 4);
  EXPECT_GT(engine_->SequenceBytes(retrieval_) - engine_->SequenceBackendBytes(retrieval_),
            engine_->SequenceBackendBytes(retrieval_));
}

// Device budget = one full-mode sequence's K/V + one retrieval one's: while a
// full request is admitted (held in its prefill), a second full one is
// refused naming --device_memory_budget_bytes, a retrieval one fits; the
// host budget counts only the host part.
TEST_F(BudgetSplitTest, DeviceBudgetAdmitsWhatFitsAndNamesItself) {
  const int64_t dev_full = engine_->SequenceBackendBytes(full_);
  const int64_t dev_small = engine_->SequenceBackendBytes(retrieval_);
  const int64_t host_full = engine_->SequenceBytes(full_) - dev_full;
  const int64_t host_small = engine_->SequenceBytes(retrieval_) - dev_small;
  SchedulerOptions so;
  so.max_concurrent = 4;
  so.backend_on_device = true;
  so.device_memory_budget_bytes = dev_full + dev_small;
  so.memory_budget_bytes = host_full + host_small;  // exactly both host parts
  auto sched = GenerationScheduler::Create(engine_.get(), model_.tokenizer.get(), so);
  ASSERT_TRUE(sched.ok()) << sched.status();

  // A full request whose prefill waits at its start until `release`: it stays
  // admitted (its memory reserved) for as long as the test needs.
  std::promise<void> release;
  std::shared_future<void> released = release.get_future().share();
  std::promise<absl::StatusOr<GenerationSummary>> a_done, c_done;
  GenerationWork a = Work(full_, 2, &a_done);
  a.on_prefill_progress = [released](const PrefillProgress&) {
    released.wait_for(std::chrono::seconds(60));  // bounded even if the test fails
  };
  ASSERT_TRUE((*sched)->Submit(std::move(a)).ok());
  EXPECT_EQ((*sched)->load().reserved_device_bytes, dev_full);
  EXPECT_EQ((*sched)->load().reserved_bytes, host_full);

  std::promise<absl::StatusOr<GenerationSummary>> unused;
  absl::Status s = (*sched)->Submit(Work(full_, 2, &unused));
  EXPECT_TRUE(absl::IsResourceExhausted(s)) << s;
  ExpectMessageHas(s, {"--device_memory_budget_bytes", "device memory",
                       std::to_string(dev_full), std::to_string(dev_full + dev_small), "retry"});
  // Nothing of the refused request is reserved.
  EXPECT_EQ((*sched)->load().reserved_device_bytes, dev_full);

  // A retrieval-mode request fits both budgets exactly.
  ASSERT_TRUE((*sched)->Submit(Work(retrieval_, 2, &c_done)).ok());
  EXPECT_EQ((*sched)->load().reserved_device_bytes, dev_full + dev_small);
  EXPECT_EQ((*sched)->load().reserved_bytes, host_full + host_small);

  release.set_value();
  for (auto* done : {&a_done, &c_done}) {
    absl::StatusOr<GenerationSummary> r = done->get_future().get();
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->completion_tokens, 2);
  }
  EXPECT_EQ((*sched)->load().reserved_device_bytes, 0);
  EXPECT_EQ((*sched)->load().reserved_bytes, 0);
}

// A request larger than a whole budget is refused as such, naming that
// budget: device for the K/V caches, host for the rest.
TEST_F(BudgetSplitTest, ARequestOverAWholeBudgetNamesIt) {
  const int64_t dev_full = engine_->SequenceBackendBytes(full_);
  const int64_t host_full = engine_->SequenceBytes(full_) - dev_full;
  std::promise<absl::StatusOr<GenerationSummary>> unused;
  {
    SchedulerOptions so;
    so.backend_on_device = true;
    so.device_memory_budget_bytes = dev_full - 1;
    auto sched = GenerationScheduler::Create(engine_.get(), model_.tokenizer.get(), so);
    ASSERT_TRUE(sched.ok());
    const absl::Status s = (*sched)->Submit(Work(full_, 2, &unused));
    EXPECT_TRUE(absl::IsResourceExhausted(s)) << s;
    ExpectMessageHas(s, {"whole memory budget", "--device_memory_budget_bytes",
                         std::to_string(dev_full), std::to_string(dev_full - 1)});
  }
  {
    SchedulerOptions so;
    so.backend_on_device = true;
    so.memory_budget_bytes = host_full - 1;  // the device budget: none
    auto sched = GenerationScheduler::Create(engine_.get(), model_.tokenizer.get(), so);
    ASSERT_TRUE(sched.ok());
    const absl::Status s = (*sched)->Submit(Work(full_, 2, &unused));
    EXPECT_TRUE(absl::IsResourceExhausted(s)) << s;
    ExpectMessageHas(s, {"whole memory budget", "--host_memory_budget_bytes",
                         std::to_string(host_full), std::to_string(host_full - 1)});
  }
}

// Without a device backend every byte is host memory (the CPU backend's K/V
// caches included) and a device budget is ignored.
TEST_F(BudgetSplitTest, OnTheCpuBackendEverythingIsHostMemory) {
  const int64_t total = engine_->SequenceBytes(full_);
  std::promise<absl::StatusOr<GenerationSummary>> unused, done;
  SchedulerOptions so;
  so.backend_on_device = false;
  so.device_memory_budget_bytes = 1;  // ignored
  so.memory_budget_bytes = total - 1;
  auto sched = GenerationScheduler::Create(engine_.get(), model_.tokenizer.get(), so);
  ASSERT_TRUE(sched.ok());
  absl::Status s = (*sched)->Submit(Work(full_, 2, &unused));
  EXPECT_TRUE(absl::IsResourceExhausted(s)) << s;
  ExpectMessageHas(s, {"--host_memory_budget_bytes", std::to_string(total),
                       std::to_string(total - 1)});

  SchedulerOptions fits = so;
  fits.memory_budget_bytes = total;
  auto sched2 = GenerationScheduler::Create(engine_.get(), model_.tokenizer.get(), fits);
  ASSERT_TRUE(sched2.ok());
  ASSERT_TRUE((*sched2)->Submit(Work(full_, 2, &done)).ok());
  EXPECT_EQ((*sched2)->load().reserved_device_bytes, 0);
  absl::StatusOr<GenerationSummary> r = done.get_future().get();
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->completion_tokens, 2);
}

}  // namespace
}  // namespace kvr::worker
