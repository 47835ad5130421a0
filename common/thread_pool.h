// A fixed-size worker pool and a blocking ParallelFor over index ranges.
//
// ThreadPool is thread-safe. ParallelFor blocks the caller until every
// iteration has run; the caller's thread takes part in the work, so a pool of
// size 0 runs everything inline (deterministic single-thread mode).
#pragma once

#include <condition_variable>
#include <cstddef>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace kvr {

class ThreadPool {
 public:
  // `threads` background workers; 0 means none (all work runs on the caller).
  explicit ThreadPool(size_t threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  size_t size() const { return workers_.size(); }

  // Queues `task`; it runs on some worker.
  void Schedule(std::function<void()> task);

  // Runs fn(begin, end) over [0, n) split into chunks of at most `grain`
  // indices, on the workers and the calling thread; returns when all ran.
  // fn must be safe to call concurrently on disjoint ranges.
  void ParallelFor(size_t n, size_t grain, const std::function<void(size_t, size_t)>& fn);

  // A process-wide pool with hardware_concurrency() - 1 workers.
  static ThreadPool& Default();

 private:
  void WorkerLoop();

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> queue_;
  bool stop_ = false;
  std::vector<std::thread> workers_;
};

}  // namespace kvr
