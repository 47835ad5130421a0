// WorkerPool: the gateway's view of its decode workers: one gRPC channel and
// kvr.v1.Generation / grpc.health.v1 stubs per worker address, the Balancer
// that routes requests and admits them, and a health checker that takes a
// worker out of rotation while grpc.health.v1 Check("kvr.v1.Generation")
// does not answer SERVING (and puts it back once it does).
//
// Addresses come from SetWorkers (the membership subscription: a static list
// or DNS, refreshed); a removed worker keeps its channel until the requests
// it still serves end (they hold a shared_ptr to it).
//
// Thread-safety: every method is thread-safe. Lifetime: destroy the pool only
// after every GenerateCall that uses it has ended (WaitForCalls).
#pragma once

#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "kvr/v1/generation.grpc.pb.h"
#include "services/gateway/balancer.h"

namespace grpc {
class ChannelCredentials;
}  // namespace grpc

namespace kvr::gateway {

struct WorkerPoolOptions {
  BalancerOptions balancer;
  absl::Duration health_interval = absl::Seconds(2);  // between health-check rounds
  absl::Duration health_timeout = absl::Seconds(1);   // deadline of one Check
  int max_message_bytes = 4 << 20;                    // per message, both directions
  // Stream resumption (GenerateCall): a Generate whose worker fails with
  // UNAVAILABLE before the stream finished is re-issued on another worker
  // at most this many times ([0, 16]; 0 = never), the n-th time after a
  // backoff of resume_backoff * 2^(n-1) ([0, 10 s]).
  int max_resumes = 2;
  absl::Duration resume_backoff = absl::Milliseconds(50);
  // Credentials of the channels to the workers (services/infra/security:
  // mTLS presenting the gateway's certificate); null = plaintext.
  std::shared_ptr<grpc::ChannelCredentials> credentials;
  // With TLS credentials: the name the workers' certificates must carry when
  // it is not the address's host (--workers dns:///name:port dials the
  // records' IPs; the certificates name the service). Empty: the host.
  std::string tls_server_name;
};

// One worker's connection.
struct WorkerChannel {
  std::string address;
  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<v1::Generation::Stub> generation;
  std::unique_ptr<grpc::health::v1::Health::Stub> health;
};

class WorkerPool {
 public:
  // InvalidArgument for options outside their ranges. The health checker
  // starts with the first SetWorkers.
  static absl::StatusOr<std::unique_ptr<WorkerPool>> Create(const WorkerPoolOptions& options);
  ~WorkerPool();  // stops the health checker
  WorkerPool(const WorkerPool&) = delete;
  WorkerPool& operator=(const WorkerPool&) = delete;

  // The member workers from now on ("host:port" each). New workers start in
  // rotation; a health-check round runs at once, so dead ones leave it
  // within health_timeout.
  void SetWorkers(const std::vector<std::string>& addresses);

  // The connection of `address` (a member, or a removed worker still
  // serving); null when unknown.
  std::shared_ptr<WorkerChannel> Get(const std::string& address) const;

  // For calls that take no slot (Tokenize, GetModelInfo, ...): the
  // least-loaded healthy worker other than `exclude`; null when none.
  std::shared_ptr<WorkerChannel> PickAny(const std::string& exclude = {}) const;

  // A call to `address` failed with UNAVAILABLE: out of rotation until a
  // health check answers SERVING again.
  void ReportUnavailable(const std::string& address);

  // Runs one health-check round over every member now and returns once it
  // is done (at most health_timeout).
  void CheckHealthNow();

  Balancer& balancer() { return *balancer_; }
  const WorkerPoolOptions& options() const { return options_; }

  // GenerateCall bookkeeping: calls alive (queued, running or finishing).
  void CallStarted();
  void CallEnded();
  // Waits until no call is alive; false at the timeout.
  bool WaitForCalls(absl::Duration timeout);

 private:
  WorkerPool(const WorkerPoolOptions& options, std::unique_ptr<Balancer> balancer);
  void HealthLoop();

  const WorkerPoolOptions options_;
  const std::unique_ptr<Balancer> balancer_;

  mutable std::mutex mu_;
  std::condition_variable cv_;  // health loop wake-ups and call counts
  std::map<std::string, std::shared_ptr<WorkerChannel>> channels_;  // members and draining
  bool check_now_ = false;
  bool stop_ = false;
  int64_t calls_ = 0;
  std::thread health_thread_;
};

}  // namespace kvr::gateway
