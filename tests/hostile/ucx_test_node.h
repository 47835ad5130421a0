// The node side of the UCX hostile tests (ucx_routing_test, ucx_limits_test):
// a UcxEndpoint in the test process whose handler parks every Attend until
// the test completes it, and a tiny gRPC server answering GetEndpoints with
// the endpoint's address, so real UcxRetrievalClients connect to it.
#pragma once

#include <chrono>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "grpcpp/server.h"
#include "grpcpp/server_builder.h"
#include "gtest/gtest.h"
#include "kvr/v1/retrieval.grpc.pb.h"
#include "retrieval_node/client/grpc_retrieval_client.h"
#include "retrieval_node/client/ucx_retrieval_client.h"
#include "retrieval_node/server/ucx_endpoint.h"

namespace kvr::retrieval::test_ucx {

// Attends parked by the endpoint's handler until the test completes them.
class ParkedCalls {
 public:
  void Park(uint64_t sequence_id, v1::AttendResponse* response,
            std::function<void(absl::Status)> done) {
    std::lock_guard<std::mutex> lock(mu_);
    calls_.push_back({sequence_id, response, std::move(done)});
    cv_.notify_all();
  }
  // Waits (at most 10 s) until `n` calls were parked.
  bool WaitFor(size_t n) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, std::chrono::seconds(10), [&] { return calls_.size() >= n; });
  }
  size_t size() {
    std::lock_guard<std::mutex> lock(mu_);
    return calls_.size();
  }
  uint64_t sequence_id(size_t i) {
    std::lock_guard<std::mutex> lock(mu_);
    return calls_.at(i).sequence_id;
  }
  // Completes parked call `i` (in arrival order) with `status`.
  void Complete(size_t i, const absl::Status& status) {
    std::function<void(absl::Status)> done;
    {
      std::lock_guard<std::mutex> lock(mu_);
      done = std::move(calls_.at(i).done);
    }
    done(status);
  }
  // Completes parked call `i` with OK and a valid 1 x `dim` partial (zeros).
  void CompleteOk(size_t i, size_t dim) {
    std::function<void(absl::Status)> done;
    {
      std::lock_guard<std::mutex> lock(mu_);
      v1::Partials* p = calls_.at(i).response->mutable_partials();
      p->set_n(1);
      p->set_dim(static_cast<int32_t>(dim));
      p->set_o(std::string(dim * sizeof(float), '\0'));
      p->set_m(std::string(sizeof(float), '\0'));
      p->set_l(std::string(sizeof(float), '\0'));
      done = std::move(calls_.at(i).done);
    }
    done(absl::OkStatus());
  }

 private:
  struct Parked {
    uint64_t sequence_id;
    v1::AttendResponse* response;
    std::function<void(absl::Status)> done;
  };
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<Parked> calls_;
};

// Answers GetEndpoints with `ucx_address`; every other method is unimplemented.
class EndpointsOnly final : public v1::RetrievalNode::Service {
 public:
  explicit EndpointsOnly(std::string ucx_address) : ucx_address_(std::move(ucx_address)) {}
  grpc::Status GetEndpoints(grpc::ServerContext*, const v1::GetEndpointsRequest*,
                            v1::GetEndpointsResponse* response) override {
    response->set_ucx_address(ucx_address_);
    return grpc::Status::OK;
  }

 private:
  std::string ucx_address_;
};

// One call's status as the client reports it.
struct Result {
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  absl::Status status;

  void Set(absl::Status s) {
    std::lock_guard<std::mutex> lock(mu);
    status = std::move(s);
    done = true;
    cv.notify_all();
  }
  bool Wait() {
    std::unique_lock<std::mutex> lock(mu);
    return cv.wait_for(lock, std::chrono::seconds(10), [&] { return done; });
  }
};

// The endpoint (every Attend parked in `parked`) and its GetEndpoints server.
class UcxTestNode {
 public:
  // Starts both on 127.0.0.1 (ports picked); the UCX error when UCX cannot
  // run here (the caller skips), other failures are test failures.
  absl::Status Start(UcxEndpointOptions options) {
    options.listen = "127.0.0.1:0";
    auto endpoint = UcxEndpoint::Start(
        options, [this](const v1::AttendRequest& request, v1::AttendResponse* response,
                        std::function<void(absl::Status)> done) {
          parked.Park(request.sequence_id(), response, std::move(done));
        });
    if (!endpoint.ok()) return endpoint.status();
    endpoint_ = std::move(endpoint).value();
    service_ = std::make_unique<EndpointsOnly>(endpoint_->address());
    grpc::ServerBuilder builder;
    int port = 0;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    builder.RegisterService(service_.get());
    server_ = builder.BuildAndStart();
    EXPECT_NE(server_, nullptr);
    EXPECT_GT(port, 0);
    grpc_address_ = "127.0.0.1:" + std::to_string(port);
    return absl::OkStatus();
  }
  ~UcxTestNode() {
    if (server_ != nullptr) server_->Shutdown();
  }

  // A UCX client of this node; calls wait up to 30 s (the test completes them).
  std::unique_ptr<UcxRetrievalClient> Connect(UcxClientOptions options = {}) {
    auto grpc = GrpcRetrievalClient::Create(grpc_address_);
    EXPECT_TRUE(grpc.ok()) << grpc.status();
    options.attend_timeout = absl::Seconds(30);
    auto client = UcxRetrievalClient::Create(std::move(grpc).value(), options);
    EXPECT_TRUE(client.ok()) << client.status();
    return std::move(client).value();
  }

  UcxEndpoint* endpoint() { return endpoint_.get(); }
  const std::string& grpc_address() const { return grpc_address_; }

  ParkedCalls parked;

 private:
  std::unique_ptr<UcxEndpoint> endpoint_;
  std::unique_ptr<EndpointsOnly> service_;
  std::unique_ptr<grpc::Server> server_;
  std::string grpc_address_;
};

// Waits (at most 10 s) until `value()` returns `n`.
inline bool WaitUntil(const std::function<size_t()>& value, size_t n) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (value() != n) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::yield();
  }
  return true;
}

}  // namespace kvr::retrieval::test_ucx
