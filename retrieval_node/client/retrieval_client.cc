#include "retrieval_node/client/retrieval_client.h"

#include <condition_variable>
#include <memory>
#include <mutex>
#include <optional>

namespace kvr::retrieval {

std::string_view IndexTypeName(IndexType type) {
  switch (type) {
    case IndexType::kGraph:
      return "graph";
    case IndexType::kFlat:
      return "flat";
    case IndexType::kIvf:
      return "ivf";
  }
  return "unknown";
}

absl::StatusOr<IndexType> ParseIndexType(std::string_view name) {
  if (name == "graph") return IndexType::kGraph;
  if (name == "flat") return IndexType::kFlat;
  if (name == "ivf") return IndexType::kIvf;
  return absl::InvalidArgumentError(
      absl::StrCat("index type \"", std::string(name), "\" is not one of graph, flat, ivf"));
}

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

void RetrievalClient::AppendAsync(const AppendRequest& request, StatusCallback done) {
  done(Append(request));
}

absl::Status RetrievalClient::Attend(const AttendRequest& request, PartialsView out,
                                     AttendStats* stats) {
  StatusWaiter waiter;
  AttendAsync(request, out, stats, waiter.callback());
  return waiter.Wait();
}

}  // namespace kvr::retrieval
