// MakeRetrievalClient: what each --nodes spec builds, and how a bad spec
// fails (before any request is made).
#include "retrieval_node/client/client_factory.h"

#include <gtest/gtest.h>

#include <memory>
#include <string>

#include "absl/time/time.h"

namespace kvr::retrieval {
namespace {

SequenceSpec SmallSpec() {
  SequenceSpec spec;
  spec.sequence_id = 7;
  spec.n_layers = 1;
  spec.n_heads = 2;
  spec.n_kv_heads = 1;
  spec.head_dim = 4;
  spec.index_type = IndexType::kFlat;
  return spec;
}

TEST(ClientFactory, EmptySpecIsAnInProcessNodeWithItsOptions) {
  RetrievalClientOptions options;
  options.in_process.tail_capacity = 8;
  auto client = MakeRetrievalClient("", options);
  ASSERT_TRUE(client.ok()) << client.status();
  EXPECT_EQ((*client)->num_nodes(), 1u);
  ASSERT_TRUE((*client)->CreateSequence(SmallSpec()).ok());
  EXPECT_EQ((*client)->CreateSequence(SmallSpec()).code(), absl::StatusCode::kAlreadyExists);
  auto stats = (*client)->Stats();
  ASSERT_TRUE(stats.ok()) << stats.status();
  EXPECT_EQ(stats->sequences, 1);
}

TEST(ClientFactory, BadInProcessOptionsAreInvalidArgument) {
  RetrievalClientOptions options;
  options.in_process.tail_capacity = 0;
  auto client = MakeRetrievalClient("", options);
  EXPECT_EQ(client.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(client.status().message()).find("tail_capacity"), std::string::npos)
      << client.status();
}

#ifdef KVR_TEST_REMOTE_CLIENTS

TEST(ClientFactory, MalformedNodeListNamesTheFlag) {
  for (const char* spec : {"a=", "n0=127.0.0.1:port", "127.0.0.1"}) {
    auto client = MakeRetrievalClient(spec);
    EXPECT_EQ(client.status().code(), absl::StatusCode::kInvalidArgument) << spec;
    EXPECT_NE(std::string(client.status().message()).find("--nodes"), std::string::npos)
        << client.status();
  }
}

TEST(ClientFactory, NodeThatDoesNotAnswerFailsAtStart) {
  RetrievalClientOptions options;
  options.connect_timeout = absl::Milliseconds(200);
  for (const char* spec : {"127.0.0.1:1", "n0=127.0.0.1:1"}) {
    auto client = MakeRetrievalClient(spec, options);
    EXPECT_EQ(client.status().code(), absl::StatusCode::kDeadlineExceeded)
        << spec << ": " << client.status();
  }
}

#else

TEST(ClientFactory, RemoteSpecsNeedTheServices) {
  auto client = MakeRetrievalClient("127.0.0.1:7000");
  EXPECT_EQ(client.status().code(), absl::StatusCode::kUnimplemented) << client.status();
}

#endif  // KVR_TEST_REMOTE_CLIENTS

}  // namespace
}  // namespace kvr::retrieval
