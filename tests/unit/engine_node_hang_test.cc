// RetrievalEngine holds no engine-wide lock across a node's control call: a
// node that accepts CreateSequence / DropSequence but never answers (here a
// client whose calls block until the test releases them) must not stall the
// decode steps of other sequences. Bound: 5 decode steps of another sequence
// finish within 5 s while the call hangs (they take milliseconds; before the
// fix they waited for the hung call).
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <future>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "gpu_worker/engine/retrieval_engine.h"
#include "gtest/gtest.h"
#include "retrieval_node/client/in_process_client.h"
#include "tests/support/forwarding_client.h"
#include "tests/support/stories_model.h"

namespace kvr::worker {
namespace {

using retrieval::InProcessRetrievalClient;

// An in-process node whose CreateSequence / DropSequence can be made to
// block ("hang") until Release().
class HangingClient final : public test_support::ForwardingRetrievalClient {
 public:
  explicit HangingClient(std::unique_ptr<InProcessRetrievalClient> node)
      : ForwardingRetrievalClient(node.get()), owned_node_(std::move(node)) {}

  std::atomic<bool> hang_creates{false};
  std::atomic<bool> hang_drops{false};
  std::atomic<int> hanging{0};  // calls blocked now

  void Release() {
    std::lock_guard<std::mutex> lock(mu_);
    released_ = true;
    cv_.notify_all();
  }

  absl::Status CreateSequence(const retrieval::SequenceSpec& spec) override {
    return CreateSequence(spec, "");
  }
  absl::Status CreateSequence(const retrieval::SequenceSpec& spec,
                              std::string_view capability) override {
    if (hang_creates) Hang();
    return node()->CreateSequence(spec, capability);
  }
  // The in-process node's own asynchronous append (the base keeps the
  // client default, which would run it synchronously).
  void AppendAsync(const retrieval::AppendRequest& request,
                   retrieval::StatusCallback done) override {
    node()->AppendAsync(request, std::move(done));
  }
  absl::Status DropSequence(uint64_t sequence_id) override { return DropSequence(sequence_id, ""); }
  absl::Status DropSequence(uint64_t sequence_id, std::string_view capability) override {
    if (hang_drops) Hang();
    return node()->DropSequence(sequence_id, capability);
  }

 private:
  void Hang() {
    ++hanging;
    std::unique_lock<std::mutex> lock(mu_);
    // Bounded even if the test fails before releasing.
    cv_.wait_for(lock, std::chrono::seconds(30), [&] { return released_; });
    --hanging;
  }

  std::unique_ptr<InProcessRetrievalClient> owned_node_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool released_ = false;
};

class EngineNodeHangTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(model_.Load());
    auto node = InProcessRetrievalClient::Create();
    ASSERT_TRUE(node.ok()) << node.status();
    client_ = std::make_unique<HangingClient>(*std::move(node));
    auto e = RetrievalEngine::Create(model_.backend.get(), model_.weights, client_.get());
    ASSERT_TRUE(e.ok()) << e.status();
    engine_ = *std::move(e);
  }
  void TearDown() override {
    client_->Release();
    engine_.reset();
  }

  static AttentionOptions Retrieval() {
    AttentionOptions a;
    a.sinks = 4;
    a.window = 16;
    a.top_k = 16;
    return a;
  }

  std::unique_ptr<EngineSequence> Start(const std::string& text) {
    auto s = engine_->StartSequence(model_.Encode(text), Retrieval());
    EXPECT_TRUE(s.ok()) << s.status();
    return s.ok() ? *std::move(s) : nullptr;
  }

  // Runs 5 decode steps of `seq` on another thread; whether they all
  // finished (OK) within 5 s. Waits for them either way before returning.
  bool StepsFinishWhileHung(EngineSequence& seq) {
    auto steps = std::async(std::launch::async, [&] {
      int32_t token = test_support::Argmax(seq.logits());
      for (int i = 0; i < 5; ++i) {
        auto l = engine_->Step(seq, token);
        if (!l.ok()) return false;
        token = test_support::Argmax(*l);
      }
      return true;
    });
    const bool in_time = steps.wait_for(std::chrono::seconds(5)) == std::future_status::ready;
    EXPECT_EQ(client_->hanging.load(), 1) << "the control call should still hang";
    client_->Release();
    const bool ok = steps.get();
    return in_time && ok;
  }

  test_support::StoriesModel model_;
  std::unique_ptr<HangingClient> client_;
  std::unique_ptr<RetrievalEngine> engine_;
};

// Regression: EndSequence called DropSequence under the engine-wide lock.
TEST_F(EngineNodeHangTest, HungDropDoesNotStallOtherSequences) {
  auto a = Start("Once upon a time, there was a little girl named Lily who loved the park.");
  auto b = Start("Tom had a small dog called Max. Every morning they ran to the river.");
  ASSERT_TRUE(a && b);
  client_->hang_drops = true;
  auto end = std::async(std::launch::async, [&] { return engine_->EndSequence(*b); });
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (client_->hanging.load() == 0 && std::chrono::steady_clock::now() < give_up) {
    std::this_thread::yield();  // polling for the drop to be in flight
  }
  ASSERT_EQ(client_->hanging.load(), 1) << "EndSequence never reached DropSequence";
  EXPECT_TRUE(StepsFinishWhileHung(*a)) << "decode steps waited for a hung DropSequence";
  EXPECT_TRUE(end.get().ok());
}

// Regression: the prefill called CreateSequence under the engine-wide lock.
TEST_F(EngineNodeHangTest, HungCreateDoesNotStallOtherSequences) {
  auto a = Start("Once upon a time, there was a little girl named Lily who loved the park.");
  ASSERT_TRUE(a);
  client_->hang_creates = true;
  auto start = std::async(std::launch::async, [&] {
    return engine_->StartSequence(
        model_.Encode("Tom had a small dog called Max. Every morning they ran to the river."),
        Retrieval());
  });
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (client_->hanging.load() == 0 && std::chrono::steady_clock::now() < give_up) {
    std::this_thread::yield();  // polling for the create to be in flight
  }
  ASSERT_EQ(client_->hanging.load(), 1) << "StartSequence never reached CreateSequence";
  EXPECT_TRUE(StepsFinishWhileHung(*a)) << "decode steps waited for a hung CreateSequence";
  auto b = start.get();
  EXPECT_TRUE(b.ok()) << b.status();
}

}  // namespace
}  // namespace kvr::worker
