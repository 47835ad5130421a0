#include "services/gateway/balancer.h"

#include <algorithm>
#include <limits>
#include <utility>

#include "absl/strings/str_cat.h"

namespace kvr::gateway {

absl::StatusOr<std::unique_ptr<Balancer>> Balancer::Create(const BalancerOptions& options) {
  if (options.max_outstanding_per_worker < 1 || options.max_outstanding_per_worker > 1 << 16) {
    return absl::InvalidArgumentError(absl::StrCat("max_outstanding_per_worker: ",
                                                   options.max_outstanding_per_worker,
                                                   " outside [1, 65536]"));
  }
  if (options.max_queue < 0 || options.max_queue > 1 << 20) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_queue: ", options.max_queue, " outside [0, 1048576]"));
  }
  return std::unique_ptr<Balancer>(new Balancer(options));
}

Balancer::Balancer(const BalancerOptions& options) : options_(options) {
  deadline_thread_ = std::thread([this] { DeadlineLoop(); });
}

Balancer::~Balancer() {
  std::vector<Outcome> out;
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
    for (Waiter& w : waiters_) {
      out.push_back({std::move(w.grant), absl::UnavailableError("the gateway is shutting down")});
    }
    waiters_.clear();
  }
  deadline_cv_.notify_all();
  deadline_thread_.join();
  Deliver(out);
}

void Balancer::Deliver(std::vector<Outcome>& outcomes) {
  for (Outcome& o : outcomes) o.grant(std::move(o.result));
  outcomes.clear();
}

int Balancer::UsableWorkers(std::string_view exclude) const {
  int n = 0;
  for (const auto& [address, w] : workers_) {
    n += w.healthy && w.member && address != exclude ? 1 : 0;
  }
  return n;
}

std::string Balancer::TakeSlot(std::string_view exclude) {
  if (workers_.empty()) return {};
  // Walk the workers starting at the round-robin position, so that the first
  // of several equally loaded workers differs from one grant to the next.
  const size_t n = workers_.size();
  const size_t start = round_robin_ % n;
  auto it = workers_.begin();
  std::advance(it, start);
  auto best = workers_.end();
  size_t best_index = 0;
  int best_load = std::numeric_limits<int>::max();
  for (size_t i = 0; i < n; ++i, ++it) {
    if (it == workers_.end()) it = workers_.begin();
    const Worker& w = it->second;
    if (!w.healthy || !w.member || w.outstanding >= options_.max_outstanding_per_worker) continue;
    if (it->first == exclude) continue;
    if (w.outstanding < best_load) {
      best = it;
      best_load = w.outstanding;
      best_index = (start + i) % n;
    }
  }
  if (best == workers_.end()) return {};
  ++best->second.outstanding;
  ++running_;
  round_robin_ = best_index + 1;
  return best->first;
}

uint64_t Balancer::Acquire(absl::Time deadline, std::string_view exclude, Grant grant) {
  std::vector<Outcome> out;
  uint64_t ticket;
  {
    std::lock_guard<std::mutex> lock(mu_);
    ticket = next_ticket_++;
    if (stop_) {
      out.push_back({std::move(grant), absl::UnavailableError("the gateway is shutting down")});
    } else if (UsableWorkers(exclude) == 0) {
      out.push_back({std::move(grant),
                     absl::UnavailableError(absl::StrCat(
                         "no healthy worker", exclude.empty() ? "" : " left to retry on", " (",
                         workers_.size(), " known)"))});
    } else if (std::string address = waiters_.empty() ? TakeSlot(exclude) : std::string();
               !address.empty()) {
      out.push_back({std::move(grant), std::move(address)});
    } else if (deadline <= absl::Now()) {
      out.push_back({std::move(grant),
                     absl::DeadlineExceededError("deadline passed before a worker was free")});
    } else if (static_cast<int>(waiters_.size()) >= options_.max_queue) {
      out.push_back(
          {std::move(grant),
           absl::ResourceExhaustedError(absl::StrCat(
               "gateway overloaded: all ", UsableWorkers({}), " healthy workers have ",
               options_.max_outstanding_per_worker, " requests outstanding and ", waiters_.size(),
               " requests are queued (--max_queue ", options_.max_queue,
               "); retry after 1 s with exponential backoff"))});
    } else {
      const bool earliest = std::none_of(waiters_.begin(), waiters_.end(),
                                         [&](const Waiter& w) { return w.deadline <= deadline; });
      waiters_.push_back({ticket, deadline, std::string(exclude), std::move(grant)});
      if (earliest) deadline_cv_.notify_all();
    }
  }
  Deliver(out);
  return ticket;
}

void Balancer::Abandon(uint64_t ticket) {
  std::vector<Outcome> out;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = std::find_if(waiters_.begin(), waiters_.end(),
                           [&](const Waiter& w) { return w.ticket == ticket; });
    if (it == waiters_.end()) return;
    out.push_back({std::move(it->grant), absl::CancelledError("cancelled while queued")});
    waiters_.erase(it);
  }
  Deliver(out);
}

void Balancer::Release(const std::string& address) {
  std::vector<Outcome> out;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = workers_.find(address);
    if (it == workers_.end()) return;
    --it->second.outstanding;
    --running_;
    if (!it->second.member && it->second.outstanding == 0) workers_.erase(it);
    DispatchLocked(&out);
  }
  Deliver(out);
}

void Balancer::SetWorkers(const std::vector<std::string>& addresses) {
  std::vector<Outcome> out;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = workers_.begin(); it != workers_.end();) {
      const bool keep = std::find(addresses.begin(), addresses.end(), it->first) != addresses.end();
      it->second.member = keep;
      if (!keep && it->second.outstanding == 0) {
        it = workers_.erase(it);
      } else {
        ++it;
      }
    }
    for (const std::string& a : addresses) {
      Worker& w = workers_[a];
      w.member = true;
    }
    DispatchLocked(&out);
  }
  Deliver(out);
}

bool Balancer::SetHealthy(const std::string& address, bool healthy) {
  std::vector<Outcome> out;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = workers_.find(address);
    if (it == workers_.end() || it->second.healthy == healthy) return false;
    it->second.healthy = healthy;
    DispatchLocked(&out);
  }
  Deliver(out);
  return true;
}

std::string Balancer::LeastLoaded(std::string_view exclude) const {
  std::lock_guard<std::mutex> lock(mu_);
  const std::string* best = nullptr;
  int best_load = std::numeric_limits<int>::max();
  for (const auto& [address, w] : workers_) {
    if (!w.healthy || !w.member || address == exclude) continue;
    if (w.outstanding < best_load) {
      best = &address;
      best_load = w.outstanding;
    }
  }
  return best == nullptr ? std::string() : *best;
}

void Balancer::DispatchLocked(std::vector<Outcome>* out) {
  if (UsableWorkers({}) == 0) {
    for (Waiter& w : waiters_) {
      out->push_back({std::move(w.grant),
                      absl::UnavailableError("no healthy worker (all failed health checks)")});
    }
    waiters_.clear();
    return;
  }
  for (auto it = waiters_.begin(); it != waiters_.end();) {
    std::string address = TakeSlot(it->exclude);
    if (address.empty()) {
      // Only a waiter with an exclusion can be luckier than the head.
      if (it->exclude.empty()) break;
      ++it;
      continue;
    }
    out->push_back({std::move(it->grant), std::move(address)});
    it = waiters_.erase(it);
  }
}

void Balancer::DeadlineLoop() {
  std::unique_lock<std::mutex> lock(mu_);
  while (!stop_) {
    absl::Time next = absl::InfiniteFuture();
    for (const Waiter& w : waiters_) next = std::min(next, w.deadline);
    if (next == absl::InfiniteFuture()) {
      deadline_cv_.wait(lock);
      continue;
    }
    deadline_cv_.wait_until(lock, absl::ToChronoTime(next));
    const absl::Time now = absl::Now();
    std::vector<Outcome> out;
    for (auto it = waiters_.begin(); it != waiters_.end();) {
      if (it->deadline <= now) {
        out.push_back({std::move(it->grant),
                       absl::DeadlineExceededError(
                           "deadline passed while queued for a worker (all workers busy)")});
        it = waiters_.erase(it);
      } else {
        ++it;
      }
    }
    if (!out.empty()) {
      lock.unlock();
      Deliver(out);
      lock.lock();
    }
  }
}

std::vector<WorkerLoad> Balancer::Workers() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<WorkerLoad> out;
  for (const auto& [address, w] : workers_) {
    out.push_back({address, w.outstanding, w.healthy, w.member});
  }
  return out;
}

int Balancer::waiting() const {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<int>(waiters_.size());
}

int Balancer::running() const {
  std::lock_guard<std::mutex> lock(mu_);
  return running_;
}

}  // namespace kvr::gateway
