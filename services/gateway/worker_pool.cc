#include "services/gateway/worker_pool.h"

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <cstdio>
#include <utility>

#include "absl/strings/str_cat.h"

namespace kvr::gateway {
namespace {

constexpr char kGenerationService[] = "kvr.v1.Generation";

std::shared_ptr<WorkerChannel> Connect(const std::string& address, const WorkerPoolOptions& o) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(o.max_message_bytes);
  args.SetMaxSendMessageSize(o.max_message_bytes);
  if (!o.tls_server_name.empty()) args.SetSslTargetNameOverride(o.tls_server_name);
  // A restarted worker is reconnected to within seconds, not gRPC's default
  // two-minute backoff ceiling.
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 250);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 2000);
  auto w = std::make_shared<WorkerChannel>();
  w->address = address;
  w->channel = grpc::CreateCustomChannel(
      address, o.credentials != nullptr ? o.credentials : grpc::InsecureChannelCredentials(),
      args);
  w->generation = v1::Generation::NewStub(w->channel);
  w->health = grpc::health::v1::Health::NewStub(w->channel);
  return w;
}

}  // namespace

absl::StatusOr<std::unique_ptr<WorkerPool>> WorkerPool::Create(const WorkerPoolOptions& options) {
  if (options.health_interval < absl::Milliseconds(10)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "health_interval: ", absl::FormatDuration(options.health_interval), " below 10ms"));
  }
  if (options.health_timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("health_timeout: must be > 0");
  }
  if (options.max_message_bytes < (1 << 16)) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_message_bytes: ", options.max_message_bytes, " below 65536"));
  }
  if (options.max_resumes < 0 || options.max_resumes > 16) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_resumes: ", options.max_resumes, " outside [0, 16]"));
  }
  if (options.resume_backoff < absl::ZeroDuration() ||
      options.resume_backoff > absl::Seconds(10)) {
    return absl::InvalidArgumentError(absl::StrCat("resume_backoff: ",
                                                   absl::FormatDuration(options.resume_backoff),
                                                   " outside [0, 10s]"));
  }
  absl::StatusOr<std::unique_ptr<Balancer>> balancer = Balancer::Create(options.balancer);
  if (!balancer.ok()) return balancer.status();
  return std::unique_ptr<WorkerPool>(new WorkerPool(options, *std::move(balancer)));
}

WorkerPool::WorkerPool(const WorkerPoolOptions& options, std::unique_ptr<Balancer> balancer)
    : options_(options), balancer_(std::move(balancer)) {
  health_thread_ = std::thread([this] { HealthLoop(); });
}

WorkerPool::~WorkerPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  health_thread_.join();
}

void WorkerPool::SetWorkers(const std::vector<std::string>& addresses) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    std::map<std::string, std::shared_ptr<WorkerChannel>> next;
    for (const std::string& a : addresses) {
      auto it = channels_.find(a);
      next[a] = it != channels_.end() ? it->second : Connect(a, options_);
    }
    channels_ = std::move(next);
    check_now_ = true;
  }
  balancer_->SetWorkers(addresses);
  std::fprintf(stderr, "kvr_gateway: %zu workers\n", addresses.size());
  cv_.notify_all();
}

std::shared_ptr<WorkerChannel> WorkerPool::Get(const std::string& address) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = channels_.find(address);
  return it == channels_.end() ? nullptr : it->second;
}

std::shared_ptr<WorkerChannel> WorkerPool::PickAny(const std::string& exclude) const {
  const std::string address = balancer_->LeastLoaded(exclude);
  return address.empty() ? nullptr : Get(address);
}

void WorkerPool::ReportUnavailable(const std::string& address) {
  if (balancer_->SetHealthy(address, false)) {
    std::fprintf(stderr, "kvr_gateway: worker %s out of rotation (a call got UNAVAILABLE)\n",
                 address.c_str());
  }
}

void WorkerPool::CheckHealthNow() {
  std::vector<std::shared_ptr<WorkerChannel>> targets;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& [address, w] : channels_) targets.push_back(w);
  }
  struct Probe {
    grpc::ClientContext ctx;
    grpc::health::v1::HealthCheckRequest request;
    grpc::health::v1::HealthCheckResponse response;
    grpc::Status status;
  };
  std::vector<std::unique_ptr<Probe>> probes(targets.size());
  std::mutex m;
  std::condition_variable cv;
  size_t pending = targets.size();
  for (size_t i = 0; i < targets.size(); ++i) {
    probes[i] = std::make_unique<Probe>();
    Probe* p = probes[i].get();
    p->ctx.set_deadline(absl::ToChronoTime(absl::Now() + options_.health_timeout));
    p->request.set_service(kGenerationService);
    targets[i]->health->async()->Check(&p->ctx, &p->request, &p->response,
                                       [p, &m, &cv, &pending](grpc::Status s) {
                                         std::lock_guard<std::mutex> lock(m);
                                         p->status = std::move(s);
                                         --pending;
                                         cv.notify_all();
                                       });
  }
  {
    std::unique_lock<std::mutex> lock(m);
    cv.wait(lock, [&] { return pending == 0; });
  }
  for (size_t i = 0; i < targets.size(); ++i) {
    const Probe& p = *probes[i];
    const bool serving = p.status.ok() &&
                         p.response.status() == grpc::health::v1::HealthCheckResponse::SERVING;
    if (balancer_->SetHealthy(targets[i]->address, serving)) {
      std::fprintf(stderr, "kvr_gateway: worker %s %s\n", targets[i]->address.c_str(),
                   serving ? "healthy, back in rotation"
                           : absl::StrCat("unhealthy, out of rotation (",
                                          p.status.ok() ? "NOT_SERVING" : p.status.error_message(),
                                          ")")
                                 .c_str());
    }
  }
}

void WorkerPool::HealthLoop() {
  std::unique_lock<std::mutex> lock(mu_);
  while (!stop_) {
    cv_.wait_for(lock, absl::ToChronoMilliseconds(options_.health_interval),
                 [this] { return stop_ || check_now_; });
    if (stop_) break;
    check_now_ = false;
    lock.unlock();
    CheckHealthNow();
    lock.lock();
  }
}

void WorkerPool::CallStarted() {
  std::lock_guard<std::mutex> lock(mu_);
  ++calls_;
}

void WorkerPool::CallEnded() {
  std::lock_guard<std::mutex> lock(mu_);
  if (--calls_ == 0) cv_.notify_all();
}

bool WorkerPool::WaitForCalls(absl::Duration timeout) {
  std::unique_lock<std::mutex> lock(mu_);
  return cv_.wait_until(lock, absl::ToChronoTime(absl::Now() + timeout),
                        [this] { return calls_ == 0; });
}

}  // namespace kvr::gateway
