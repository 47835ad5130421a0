// CancelToken: a shared cancellation flag. Copies share one flag; any thread
// may Cancel(); the engine and the generation loops check it between decode
// steps (and between prefill layers) and then stop the sequence and drop its
// shards from the retrieval nodes.
#pragma once

#include <atomic>
#include <memory>

namespace kvr::worker {

class CancelToken {
 public:
  CancelToken() : flag_(std::make_shared<std::atomic<bool>>(false)) {}

  // Thread-safe; idempotent.
  void Cancel() const { flag_->store(true, std::memory_order_release); }
  bool cancelled() const { return flag_->load(std::memory_order_acquire); }

 private:
  std::shared_ptr<std::atomic<bool>> flag_;
};

}  // namespace kvr::worker
