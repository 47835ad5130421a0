// Hostile-input test of the UCX data plane's reply routing (issue 14): a
// reply must reach the client that issued the call, never another one.
//
// The node's UcxEndpoint runs in this process with a handler that parks
// every Attend until the test completes it; a tiny gRPC server answers
// GetEndpoints with the endpoint's address, so real UcxRetrievalClients
// connect to it. Client A sends an Attend and goes away while it is parked;
// client B connects (UCX reuses A's freed endpoint slot on the node, and B
// is given the same call ids as A) and sends its own Attend. A's late reply
// must be dropped and B must get exactly its own reply.
// When UCX cannot run here the tests skip with the UCX error.
#include <chrono>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "common/attention.h"
#include "grpcpp/server.h"
#include "grpcpp/server_builder.h"
#include "gtest/gtest.h"
#include "kvr/v1/retrieval.grpc.pb.h"
#include "retrieval_node/client/grpc_retrieval_client.h"
#include "retrieval_node/client/ucx_retrieval_client.h"
#include "retrieval_node/server/ucx_endpoint.h"

namespace kvr::retrieval {
namespace {

// Attends parked by the endpoint's handler until the test completes them.
class ParkedCalls {
 public:
  void Park(uint64_t sequence_id, std::function<void(absl::Status)> done) {
    std::lock_guard<std::mutex> lock(mu_);
    calls_.push_back({sequence_id, std::move(done)});
    cv_.notify_all();
  }
  // Waits (at most 10 s) until `n` calls were parked.
  bool WaitFor(size_t n) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, std::chrono::seconds(10), [&] { return calls_.size() >= n; });
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
  uint64_t sequence_id(size_t i) {
    std::lock_guard<std::mutex> lock(mu_);
    return calls_.at(i).sequence_id;
  }

 private:
  struct Parked {
    uint64_t sequence_id;
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

// A status as the client reports it: "CODE: message".
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

class UcxRoutingTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto endpoint = UcxEndpoint::Start(
        {}, [this](const v1::AttendRequest& request, v1::AttendResponse*,
                   std::function<void(absl::Status)> done) {
          parked_.Park(request.sequence_id(), std::move(done));
        });
    if (!endpoint.ok()) GTEST_SKIP() << "UCX cannot run here: " << endpoint.status();
    endpoint_ = std::move(endpoint).value();
    service_ = std::make_unique<EndpointsOnly>(endpoint_->address());
    grpc::ServerBuilder builder;
    int port = 0;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    builder.RegisterService(service_.get());
    server_ = builder.BuildAndStart();
    ASSERT_NE(server_, nullptr);
    ASSERT_GT(port, 0);
    grpc_address_ = "127.0.0.1:" + std::to_string(port);
  }
  void TearDown() override {
    if (server_ != nullptr) server_->Shutdown();
  }

  std::unique_ptr<UcxRetrievalClient> Connect() {
    auto grpc = GrpcRetrievalClient::Create(grpc_address_);
    EXPECT_TRUE(grpc.ok()) << grpc.status();
    UcxClientOptions options;
    options.attend_timeout = absl::Seconds(30);  // the test completes calls itself
    options.first_call_id = 1;  // both clients issue the same ids (worst case)
    auto client = UcxRetrievalClient::Create(std::move(grpc).value(), options);
    EXPECT_TRUE(client.ok()) << client.status();
    return std::move(client).value();
  }

  // An Attend of one 4-dim query on `sequence_id`; its status goes to `result`.
  static void Attend(UcxRetrievalClient* client, uint64_t sequence_id, Partials* out,
                     Result* result) {
    static const Matrix kQuery(1, 4);
    AttendRequest request;
    request.sequence_id = sequence_id;
    request.queries = kQuery.view();
    request.k = 1;
    client->AttendAsync(request, out->view(), nullptr,
                        [result](absl::Status s) { result->Set(std::move(s)); });
  }

  // Waits (at most 10 s) until the endpoint holds `n` connections.
  bool WaitForConnections(size_t n) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (endpoint_->connections() != n) {
      if (std::chrono::steady_clock::now() > deadline) return false;
      std::this_thread::yield();
    }
    return true;
  }

  ParkedCalls parked_;
  std::unique_ptr<UcxEndpoint> endpoint_;
  std::unique_ptr<EndpointsOnly> service_;
  std::unique_ptr<grpc::Server> server_;
  std::string grpc_address_;
};

TEST_F(UcxRoutingTest, LateReplyOfAGoneClientNeverReachesTheNextClient) {
  constexpr uint64_t kSequenceA = 101, kSequenceB = 202;
  Partials out_a(1, 4), out_b(1, 4);
  Result result_a, result_b;
  {
    std::unique_ptr<UcxRetrievalClient> a = Connect();
    ASSERT_TRUE(a->using_ucx()) << a->fallback_reason();
    Attend(a.get(), kSequenceA, &out_a, &result_a);
    ASSERT_TRUE(parked_.WaitFor(1));
    ASSERT_EQ(parked_.sequence_id(0), kSequenceA);
  }  // A goes away with its call parked on the node
  ASSERT_TRUE(result_a.Wait());
  EXPECT_EQ(result_a.status.code(), absl::StatusCode::kCancelled) << result_a.status;
  ASSERT_TRUE(WaitForConnections(0)) << "the node never saw client A leave";

  std::unique_ptr<UcxRetrievalClient> b = Connect();
  ASSERT_TRUE(b->using_ucx()) << b->fallback_reason();
  Attend(b.get(), kSequenceB, &out_b, &result_b);
  ASSERT_TRUE(parked_.WaitFor(2));
  ASSERT_EQ(parked_.sequence_id(1), kSequenceB);

  // A's reply comes late: it must go nowhere (A is gone).
  parked_.Complete(0, absl::AbortedError("reply to client A"));
  // Then B's own reply: B must see exactly it.
  parked_.Complete(1, absl::AlreadyExistsError("reply to client B"));
  ASSERT_TRUE(result_b.Wait());
  EXPECT_EQ(result_b.status.code(), absl::StatusCode::kAlreadyExists) << result_b.status;
  EXPECT_EQ(result_b.status.message(), "reply to client B");

  // B still works afterwards (its next call gets its own reply).
  Result again;
  Attend(b.get(), kSequenceB + 1, &out_b, &again);
  ASSERT_TRUE(parked_.WaitFor(3));
  parked_.Complete(2, absl::NotFoundError("second reply to client B"));
  ASSERT_TRUE(again.Wait());
  EXPECT_EQ(again.status.code(), absl::StatusCode::kNotFound) << again.status;
  EXPECT_EQ(again.status.message(), "second reply to client B");
}

// A client ignores a reply it did not issue: its call ids start at a random
// point (unless a test pins them), so two clients' ids do not collide.
TEST_F(UcxRoutingTest, ClientsPickDifferentCallIds) {
  auto grpc_a = GrpcRetrievalClient::Create(grpc_address_);
  auto grpc_b = GrpcRetrievalClient::Create(grpc_address_);
  ASSERT_TRUE(grpc_a.ok() && grpc_b.ok());
  auto a = UcxRetrievalClient::Create(std::move(grpc_a).value());
  auto b = UcxRetrievalClient::Create(std::move(grpc_b).value());
  ASSERT_TRUE(a.ok() && b.ok());
  ASSERT_TRUE((*a)->using_ucx()) << (*a)->fallback_reason();
  EXPECT_NE((*a)->first_call_id(), (*b)->first_call_id());
}

}  // namespace
}  // namespace kvr::retrieval
