// Membership: the live set of retrieval-node addresses a worker places new
// sequences on, from a static list or from DNS.
//
//   * "host:port,host:port,..." — a static list, validated once (each entry
//     host:port or [v6]:port, port in [1, 65535], no duplicates); it never
//     changes.
//   * "dns:///name:port" — every A/AAAA record of `name` (a Kubernetes
//     headless service resolves to one record per ready pod), each joined
//     with `port`. Resolved once in Create (no address is an error naming
//     the name) and then every `refresh` on a background thread. A failed or
//     empty refresh keeps the last good set and is logged on stderr: a DNS
//     outage must not empty the placement under running sequences.
//
// Current() is sorted and duplicate-free, so two workers resolving the same
// records agree on the set (placement hashes node ids, not positions).
//
// Thread-safety: every method is thread-safe. Subscribers are called one at
// a time, in change order, on the thread that applied the change (the
// refresh thread or a RefreshNow caller), never while internal state is
// locked for reading, so a callback may call Current().
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace kvr::membership {

// Resolves `host` to its addresses as "ip:port" / "[ipv6]:port" strings
// (any order, duplicates allowed). NotFound / Unavailable on failure.
using Resolver =
    std::function<absl::StatusOr<std::vector<std::string>>(const std::string& host, int port)>;

// getaddrinfo(host) over AF_UNSPEC / SOCK_STREAM: every A and AAAA record.
absl::StatusOr<std::vector<std::string>> ResolveWithGetaddrinfo(const std::string& host, int port);

struct MembershipOptions {
  std::string spec;
  // DNS specs: period of the background re-resolution. Zero or negative: no
  // background thread (only RefreshNow), which tests use to stay
  // deterministic.
  absl::Duration refresh = absl::Seconds(10);
  // DNS specs: the resolver; empty means ResolveWithGetaddrinfo. Tests
  // inject one to script successive answers.
  Resolver resolver;
};

class Membership {
 public:
  // InvalidArgument for a malformed spec (naming the entry or the field);
  // for DNS, the first resolution's error, or NotFound when it yields no
  // address (naming the name).
  static absl::StatusOr<std::unique_ptr<Membership>> Create(const MembershipOptions& options);
  // Stops and joins the refresh thread.
  ~Membership();
  Membership(const Membership&) = delete;
  Membership& operator=(const Membership&) = delete;

  // The current addresses, sorted, unique, never empty.
  std::vector<std::string> Current() const;

  // Calls `on_change` now with Current(), then after every change of the set
  // with the new set (not on refreshes that resolve the same set). The
  // callback must outlive this Membership and must not call Subscribe or
  // RefreshNow.
  void Subscribe(std::function<void(const std::vector<std::string>&)> on_change);

  // Re-resolves now (DNS specs; a no-op OK for static ones) and applies the
  // result. On a failed or empty resolution the set is kept, the failure is
  // logged and counted, and its status returned.
  absl::Status RefreshNow();

  bool is_dns() const { return !dns_host_.empty(); }
  // The name a DNS spec resolves ("" for static specs): under TLS, the name
  // the members' certificates carry (their addresses are the records' IPs).
  const std::string& dns_host() const { return dns_host_; }
  // The spec as given.
  const std::string& spec() const { return spec_; }
  // Refreshes that failed (kept the last good set) since Create.
  int64_t refresh_failures() const;

 private:
  explicit Membership(const MembershipOptions& options);
  // Resolves dns_host_:dns_port_ into a sorted unique list; an empty result
  // is NotFound naming the name.
  absl::StatusOr<std::vector<std::string>> ResolveSorted() const;
  void RefreshLoop();

  const std::string spec_;
  const absl::Duration refresh_;
  Resolver resolver_;
  std::string dns_host_;  // empty for static specs
  int dns_port_ = 0;

  mutable absl::Mutex mu_;
  std::vector<std::string> current_ ABSL_GUARDED_BY(mu_);
  int64_t failures_ ABSL_GUARDED_BY(mu_) = 0;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;

  // Serializes applying a new set and notifying, so subscribers see changes
  // in order and exactly once. Taken before mu_.
  absl::Mutex apply_mu_ ABSL_ACQUIRED_BEFORE(mu_);
  std::vector<std::function<void(const std::vector<std::string>&)>> subscribers_
      ABSL_GUARDED_BY(apply_mu_);

  std::thread refresher_;
};

}  // namespace kvr::membership
