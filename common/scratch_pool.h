// ScratchPool<T>: a mutex-guarded free list of per-call scratch objects, so
// concurrent const searches each get private buffers without allocating in
// the steady state (hnswlib's visited-list pool).
#pragma once

#include <memory>
#include <mutex>
#include <vector>

namespace kvr {

template <typename T>
class ScratchPool {
 public:
  // Returns a pooled object (or a new one when none is free).
  std::unique_ptr<T> Acquire() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!free_.empty()) {
        auto s = std::move(free_.back());
        free_.pop_back();
        return s;
      }
    }
    return std::make_unique<T>();
  }
  void Release(std::unique_ptr<T> s) {
    std::lock_guard<std::mutex> lock(mu_);
    free_.push_back(std::move(s));
  }
  // Sum of T::MemoryBytes() over the pooled (idle) objects.
  size_t MemoryBytes() const {
    std::lock_guard<std::mutex> lock(mu_);
    size_t b = 0;
    for (const auto& s : free_) b += s->MemoryBytes();
    return b;
  }

 private:
  mutable std::mutex mu_;
  std::vector<std::unique_ptr<T>> free_;
};

}  // namespace kvr
