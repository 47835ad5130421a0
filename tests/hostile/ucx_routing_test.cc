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
#include "tests/hostile/ucx_test_node.h"

namespace kvr::retrieval {
namespace {

using test_ucx::ParkedCalls;
using test_ucx::Result;

class UcxRoutingTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (absl::Status s = node_.Start({}); !s.ok()) GTEST_SKIP() << "UCX cannot run here: " << s;
  }

  std::unique_ptr<UcxRetrievalClient> Connect() {
    UcxClientOptions options;
    options.first_call_id = 1;  // both clients issue the same ids (worst case)
    return node_.Connect(options);
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
    return test_ucx::WaitUntil([this] { return node_.endpoint()->connections(); }, n);
  }

  test_ucx::UcxTestNode node_;
  ParkedCalls& parked_ = node_.parked;
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
  auto grpc_a = GrpcRetrievalClient::Create(node_.grpc_address());
  auto grpc_b = GrpcRetrievalClient::Create(node_.grpc_address());
  ASSERT_TRUE(grpc_a.ok() && grpc_b.ok());
  auto a = UcxRetrievalClient::Create(std::move(grpc_a).value());
  auto b = UcxRetrievalClient::Create(std::move(grpc_b).value());
  ASSERT_TRUE(a.ok() && b.ok());
  ASSERT_TRUE((*a)->using_ucx()) << (*a)->fallback_reason();
  EXPECT_NE((*a)->first_call_id(), (*b)->first_call_id());
}

}  // namespace
}  // namespace kvr::retrieval
