#include "retrieval_node/core/node_types.h"

#include <condition_variable>
#include <memory>
#include <mutex>
#include <optional>

namespace kvr::retrieval {

std::string ShardKey::DebugString() const {
  return absl::StrCat("(seq ", sequence_id, ", layer ", layer, ", kv head ", kv_head, ", chunk ",
                      chunk, ")");
}

struct StatusWaiter::State {
  std::mutex mu;
  std::condition_variable cv;
  std::optional<absl::Status> status;
};

StatusWaiter::StatusWaiter() : state_(std::make_shared<State>()) {}
StatusWaiter::~StatusWaiter() = default;

StatusCallback StatusWaiter::callback() {
  return [state = state_](absl::Status s) {
    {
      std::lock_guard<std::mutex> lock(state->mu);
      state->status = std::move(s);
    }
    state->cv.notify_all();
  };
}

absl::Status StatusWaiter::Wait() {
  std::unique_lock<std::mutex> lock(state_->mu);
  state_->cv.wait(lock, [&] { return state_->status.has_value(); });
  return *state_->status;
}

}  // namespace kvr::retrieval
