// Balancer: which worker serves the next request, and admission control in
// front of the workers. Pure bookkeeping (no gRPC types): workers are named
// by their "host:port" address.
//
//   * A request holds one slot on one worker from Acquire's grant until
//     Release. A worker serves at most `max_outstanding_per_worker` requests.
//   * The grant goes to the healthy worker with the fewest outstanding
//     requests; ties are broken round robin.
//   * When every healthy worker is full, a request waits (FIFO, at most
//     `max_queue` of them) until a slot frees or its deadline passes. Beyond
//     that it is refused at once with RESOURCE_EXHAUSTED and retry advice.
//   * With no healthy worker at all it fails at once with UNAVAILABLE (and
//     queued requests fail with UNAVAILABLE when the last one goes away).
//
// Thread-safety: every method is thread-safe. Grant callbacks run without any
// internal lock held: inline in Acquire (granted or refused at once), on the
// thread that released a slot / changed membership or health, on the deadline
// thread (DEADLINE_EXCEEDED), or in Abandon (CANCELLED). A callback may call
// back into the Balancer.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace kvr::gateway {

struct BalancerOptions {
  int max_outstanding_per_worker = 8;  // >= 1
  int max_queue = 64;                  // >= 0
};

// One worker's state, as reported by Balancer::Workers().
struct WorkerLoad {
  std::string address;
  int outstanding = 0;
  bool healthy = true;
  bool member = true;  // false: removed from membership, draining its requests
};

class Balancer {
 public:
  // The address of the granted worker (the caller must Release it exactly
  // once), or why there is none.
  using Grant = std::function<void(absl::StatusOr<std::string> address)>;

  // InvalidArgument for options outside their ranges (naming the option).
  static absl::StatusOr<std::unique_ptr<Balancer>> Create(const BalancerOptions& options);
  // Fails every waiting request with UNAVAILABLE and stops the deadline
  // thread. Slots still held are simply forgotten.
  ~Balancer();
  Balancer(const Balancer&) = delete;
  Balancer& operator=(const Balancer&) = delete;

  // Calls `grant` exactly once: with a worker address now or once a slot is
  // free, or with ResourceExhausted (queue full), Unavailable (no healthy
  // worker), DeadlineExceeded (still waiting at `deadline`) or Cancelled
  // (Abandon). `exclude` (may be empty) names a worker not to use: the one a
  // retried request just failed on. Returns a ticket for Abandon.
  uint64_t Acquire(absl::Time deadline, std::string_view exclude, Grant grant);

  // A waiting request gives up: its grant is called with Cancelled. A no-op
  // when the ticket was already granted or refused.
  void Abandon(uint64_t ticket);

  // Ends a granted slot; the next waiter may get it.
  void Release(const std::string& address);

  // The member workers from now on. New ones start healthy and empty;
  // removed ones get no new requests and are forgotten once their last slot
  // is released.
  void SetWorkers(const std::vector<std::string>& addresses);

  // A health-check result (or a failed call: false). Unknown addresses are
  // ignored. True when the state changed.
  bool SetHealthy(const std::string& address, bool healthy);

  // For calls that take no slot: the healthy member with the fewest
  // outstanding requests other than `exclude` (full ones included); empty
  // when none.
  std::string LeastLoaded(std::string_view exclude) const;

  std::vector<WorkerLoad> Workers() const;
  int waiting() const;
  int running() const;  // slots held, over all workers
  const BalancerOptions& options() const { return options_; }

 private:
  struct Worker {
    int outstanding = 0;
    bool healthy = true;
    bool member = true;
  };
  struct Waiter {
    uint64_t ticket;
    absl::Time deadline;
    std::string exclude;
    Grant grant;
  };
  // A grant to deliver once the lock is released.
  struct Outcome {
    Grant grant;
    absl::StatusOr<std::string> result;
  };

  explicit Balancer(const BalancerOptions& options);
  // The least-loaded healthy member with a free slot other than `exclude`,
  // round robin among ties; takes its slot. Empty when none. Holds mu_.
  std::string TakeSlot(std::string_view exclude);
  // Healthy members other than `exclude`. Holds mu_.
  int UsableWorkers(std::string_view exclude) const;
  // Grants queued requests while slots are free, FIFO (a waiter that can
  // only use its excluded worker keeps its place); with no healthy worker
  // left, fails them all. Holds mu_.
  void DispatchLocked(std::vector<Outcome>* out);
  void DeadlineLoop();
  static void Deliver(std::vector<Outcome>& outcomes);

  const BalancerOptions options_;
  mutable std::mutex mu_;
  std::condition_variable deadline_cv_;
  std::map<std::string, Worker> workers_;  // ordered: round robin walks it
  std::deque<Waiter> waiters_;
  size_t round_robin_ = 0;  // index into workers_ where the next tie-break starts
  uint64_t next_ticket_ = 1;
  int running_ = 0;
  bool stop_ = false;
  std::thread deadline_thread_;
};

}  // namespace kvr::gateway
