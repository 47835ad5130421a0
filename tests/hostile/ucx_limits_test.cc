// Hostile-input test of the UCX data plane's resource bounds (issue 14):
// requests in flight per connection, request bytes in flight, and open
// connections (UcxEndpointOptions; kvr_node's --ucx_max_* flags).
//
// As in ucx_routing_test, the node's UcxEndpoint runs in this process with a
// handler that parks every Attend until the test completes it, and a tiny
// gRPC server answers GetEndpoints so that real UcxRetrievalClients connect
// over tcp on 127.0.0.1. When UCX cannot run here the tests skip with the
// UCX error.
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
#include "tests/hostile/ucx_test_node.h"

namespace kvr::retrieval {
namespace {

constexpr size_t kDim = 4;

using test_ucx::ParkedCalls;
using test_ucx::Result;
using test_ucx::WaitUntil;

class UcxLimitsTest : public ::testing::Test {
 protected:
  // Starts the endpoint with `options` and the GetEndpoints server; false
  // (the test skips) when UCX cannot run.
  bool StartNode(const UcxEndpointOptions& options) {
    const absl::Status s = node_.Start(options);
    skip_reason_ = s.ToString();
    return s.ok();
  }

  std::unique_ptr<UcxRetrievalClient> Connect() { return node_.Connect(); }

  // An Attend of one query of out->dim() (zeros); its status goes to `result`.
  static void Attend(UcxRetrievalClient* client, Partials* out, Result* result) {
    auto query = std::make_shared<Matrix>(1, out->view().dim());
    AttendRequest request;
    request.sequence_id = 7;
    request.queries = query->view();
    request.k = 1;
    client->AttendAsync(request, out->view(), nullptr,
                        [result, query](absl::Status s) { result->Set(std::move(s)); });
  }

  test_ucx::UcxTestNode node_;
  ParkedCalls& parked_ = node_.parked;
  std::string skip_reason_;
};

// With 2 requests held on the node, a 3rd on the same connection is answered
// RESOURCE_EXHAUSTED naming ucx_max_inflight_per_connection and never reaches
// the handler; once the held ones are answered a new request succeeds.
TEST_F(UcxLimitsTest, RequestBeyondInflightPerConnectionIsResourceExhausted) {
  UcxEndpointOptions options;
  options.max_inflight_per_connection = 2;
  if (!StartNode(options)) GTEST_SKIP() << "UCX cannot run here: " << skip_reason_;
  std::unique_ptr<UcxRetrievalClient> client = Connect();
  ASSERT_TRUE(client->using_ucx()) << client->fallback_reason();

  Partials out1(1, kDim), out2(1, kDim), out3(1, kDim);
  Result r1, r2, r3;
  Attend(client.get(), &out1, &r1);
  Attend(client.get(), &out2, &r2);
  ASSERT_TRUE(parked_.WaitFor(2));
  EXPECT_EQ(node_.endpoint()->inflight_requests(), 2u);

  Attend(client.get(), &out3, &r3);
  ASSERT_TRUE(r3.Wait());
  EXPECT_EQ(r3.status.code(), absl::StatusCode::kResourceExhausted) << r3.status;
  EXPECT_NE(r3.status.message().find("ucx_max_inflight_per_connection is 2"), std::string::npos)
      << r3.status;
  EXPECT_EQ(parked_.size(), 2u) << "the refused request reached the handler";

  parked_.CompleteOk(0, kDim);
  parked_.CompleteOk(1, kDim);
  ASSERT_TRUE(r1.Wait() && r2.Wait());
  EXPECT_TRUE(r1.status.ok()) << r1.status;
  EXPECT_TRUE(r2.status.ok()) << r2.status;
  ASSERT_TRUE(WaitUntil([this] { return node_.endpoint()->inflight_requests(); }, 0));
  EXPECT_EQ(node_.endpoint()->inflight_bytes(), 0u);

  // The connection is usable again, up to the limit.
  Partials out4(1, kDim);
  Result r4;
  Attend(client.get(), &out4, &r4);
  ASSERT_TRUE(parked_.WaitFor(3));
  parked_.CompleteOk(2, kDim);
  ASSERT_TRUE(r4.Wait());
  EXPECT_TRUE(r4.status.ok()) << r4.status;
}

// The same with requests large enough for UCP rendezvous (1 MiB queries):
// the refused request's data is never fetched, the connection is not wedged
// and the held bytes are counted and released.
TEST_F(UcxLimitsTest, LargeRequestBeyondInflightPerConnectionIsResourceExhausted) {
  constexpr size_t kBigDim = size_t{1} << 18;  // 1 MiB of floats per query
  UcxEndpointOptions options;
  options.max_inflight_per_connection = 2;
  if (!StartNode(options)) GTEST_SKIP() << "UCX cannot run here: " << skip_reason_;
  std::unique_ptr<UcxRetrievalClient> client = Connect();
  ASSERT_TRUE(client->using_ucx()) << client->fallback_reason();

  Partials out1(1, kBigDim), out2(1, kBigDim), out3(1, kBigDim);
  Result r1, r2, r3;
  Attend(client.get(), &out1, &r1);
  Attend(client.get(), &out2, &r2);
  ASSERT_TRUE(parked_.WaitFor(2));
  EXPECT_GE(node_.endpoint()->inflight_bytes(), 2 * kBigDim * sizeof(float));

  Attend(client.get(), &out3, &r3);
  ASSERT_TRUE(r3.Wait());
  EXPECT_EQ(r3.status.code(), absl::StatusCode::kResourceExhausted) << r3.status;
  EXPECT_NE(r3.status.message().find("ucx_max_inflight_per_connection is 2"), std::string::npos)
      << r3.status;
  EXPECT_EQ(parked_.size(), 2u);

  parked_.CompleteOk(0, kBigDim);
  parked_.CompleteOk(1, kBigDim);
  ASSERT_TRUE(r1.Wait() && r2.Wait());
  EXPECT_TRUE(r1.status.ok()) << r1.status;
  EXPECT_TRUE(r2.status.ok()) << r2.status;
  ASSERT_TRUE(WaitUntil([this] { return node_.endpoint()->inflight_bytes(); }, 0));

  Partials out4(1, kBigDim);
  Result r4;
  Attend(client.get(), &out4, &r4);
  ASSERT_TRUE(parked_.WaitFor(3));
  parked_.CompleteOk(2, kBigDim);
  ASSERT_TRUE(r4.Wait());
  EXPECT_TRUE(r4.status.ok()) << r4.status;
}

// A request that would pass the bytes in flight over all connections is
// answered RESOURCE_EXHAUSTED naming ucx_max_inflight_bytes, handler untouched.
TEST_F(UcxLimitsTest, RequestBeyondInflightBytesIsResourceExhausted) {
  UcxEndpointOptions options;
  options.max_inflight_bytes = 1;  // smaller than any Attend request
  if (!StartNode(options)) GTEST_SKIP() << "UCX cannot run here: " << skip_reason_;
  std::unique_ptr<UcxRetrievalClient> client = Connect();
  ASSERT_TRUE(client->using_ucx()) << client->fallback_reason();

  Partials out(1, kDim);
  Result r;
  Attend(client.get(), &out, &r);
  ASSERT_TRUE(r.Wait());
  EXPECT_EQ(r.status.code(), absl::StatusCode::kResourceExhausted) << r.status;
  EXPECT_NE(r.status.message().find("ucx_max_inflight_bytes is 1"), std::string::npos) << r.status;
  EXPECT_EQ(parked_.size(), 0u);
  EXPECT_EQ(node_.endpoint()->inflight_requests(), 0u);
  EXPECT_EQ(node_.endpoint()->inflight_bytes(), 0u);
}

// With max_connections 1 a second client's connection is refused (it falls
// back to gRPC) while the first still works; after the first leaves, a new
// client connects over UCX.
TEST_F(UcxLimitsTest, ConnectionBeyondMaxConnectionsIsRefused) {
  UcxEndpointOptions options;
  options.max_connections = 1;
  if (!StartNode(options)) GTEST_SKIP() << "UCX cannot run here: " << skip_reason_;
  std::unique_ptr<UcxRetrievalClient> first = Connect();
  ASSERT_TRUE(first->using_ucx()) << first->fallback_reason();
  ASSERT_EQ(node_.endpoint()->connections(), 1u);

  {
    std::unique_ptr<UcxRetrievalClient> second = Connect();
    EXPECT_FALSE(second->using_ucx()) << "the second connection was accepted";
    EXPECT_FALSE(second->fallback_reason().ok());
    EXPECT_EQ(node_.endpoint()->refused_connections(), 1u);
    EXPECT_EQ(node_.endpoint()->connections(), 1u);
  }

  Partials out(1, kDim);
  Result r;
  Attend(first.get(), &out, &r);
  ASSERT_TRUE(parked_.WaitFor(1));
  parked_.CompleteOk(0, kDim);
  ASSERT_TRUE(r.Wait());
  EXPECT_TRUE(r.status.ok()) << r.status;

  first.reset();
  ASSERT_TRUE(WaitUntil([this] { return node_.endpoint()->connections(); }, 0))
      << "the node never saw the first client leave";
  std::unique_ptr<UcxRetrievalClient> third = Connect();
  EXPECT_TRUE(third->using_ucx()) << third->fallback_reason();
}

}  // namespace
}  // namespace kvr::retrieval
