// Deferred index builds against a real kvr_node (session 27, issue 17 item
// 5): with the default --defer_index_build=true an uploaded graph chunk is
// reported pending (ShardInfo.index_pending over the wire) or already built,
// becomes a graph with index_pending false within the deadline (polled),
// kvr_node_index_builds_pending returns to 0 and the build histogram records
// it under "graph" once; with --defer_index_build=false the chunk is a graph,
// not pending, when UploadShard returns; --index_build_threads outside
// [1, 256] stops the node with exit status 2.
#include <signal.h>
#include <sys/wait.h>

#include <chrono>
#include <cstdint>
#include <string>
#include <thread>
#include <vector>

#include "common/tensor.h"
#include "gtest/gtest.h"
#include "retrieval_node/client/grpc_retrieval_client.h"
#include "tests/support/metrics_page.h"
#include "tests/support/server_process.h"
#include "tests/support/test_data.h"

namespace kvr::retrieval {
namespace {

using kvr::test_support::Get;
using kvr::test_support::HttpGetMetrics;
using kvr::test_support::NodeProcess;
using kvr::test_support::ParseExposition;

constexpr int kD = 32, kN = 4096;
constexpr uint64_t kSeq = 5;

absl::Status Upload(RetrievalClient& client, const Matrix& keys, const Matrix& values) {
  SequenceSpec spec;
  spec.sequence_id = kSeq;
  spec.n_layers = 1;
  spec.n_heads = 2;
  spec.n_kv_heads = 1;
  spec.head_dim = kD;
  spec.index_type = IndexType::kGraph;
  KVR_RETURN_IF_ERROR(client.CreateSequence(spec));
  ShardUpload up;
  up.key = {kSeq, 0, 0, 0};
  up.keys = keys.view();
  up.values = values.view();
  return client.UploadShard(up);
}

TEST(DeferBuildGrpcTest, AnUploadedChunkIsPendingThenBuiltAndCounted) {
  auto node = NodeProcess::Start({"--threads=2"});  // --defer_index_build defaults to true
  ASSERT_NE(node, nullptr);
  auto client = GrpcRetrievalClient::Create(node->address(), GrpcClientOptions{});
  ASSERT_TRUE(client.ok()) << client.status();
  const Matrix keys = test_support::RandomMatrix(kN, kD, 1);
  const Matrix values = test_support::RandomMatrix(kN, kD, 2);
  ASSERT_TRUE(Upload(**client, keys, values).ok());

  auto shards = (*client)->ListShards(kSeq, "");
  ASSERT_TRUE(shards.ok()) << shards.status();
  ASSERT_EQ(shards->size(), 1u);
  // Right after the reply: pending (served exactly through a flat index) or,
  // if the build already won the race, the graph.
  if (shards->front().index_pending) {
    EXPECT_EQ(shards->front().index_type, IndexType::kFlat);
  } else {
    EXPECT_EQ(shards->front().index_type, IndexType::kGraph);
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (shards.ok() && !shards->empty() && shards->front().index_pending &&
         std::chrono::steady_clock::now() < deadline) {
    std::this_thread::yield();
    shards = (*client)->ListShards(kSeq, "");
  }
  ASSERT_TRUE(shards.ok() && shards->size() == 1u);
  EXPECT_FALSE(shards->front().index_pending) << "the build did not install within 60 s";
  EXPECT_EQ(shards->front().index_type, IndexType::kGraph);
  EXPECT_EQ(shards->front().n_keys, kN);

  // The metrics: nothing pending, one graph build recorded (at the install,
  // before ListShards could see it).
  ASSERT_FALSE(node->metrics_address().empty());
  const std::optional<std::string> text = HttpGetMetrics(node->metrics_address());
  ASSERT_TRUE(text.has_value());
  const auto samples = ParseExposition(*text);
  EXPECT_EQ(Get(samples, "kvr_node_index_builds_pending"), 0);
  EXPECT_EQ(Get(samples, "kvr_node_index_build_duration_seconds_count", {{"index", "graph"}}), 1);
  EXPECT_EQ(Get(samples, "kvr_node_index_build_duration_seconds_count", {{"index", "flat"}}), 0);
}

TEST(DeferBuildGrpcTest, WithoutDeferralTheIndexIsBuiltWhenUploadShardReturns) {
  auto node = NodeProcess::Start({"--threads=2", "--defer_index_build=false"});
  ASSERT_NE(node, nullptr);
  auto client = GrpcRetrievalClient::Create(node->address(), GrpcClientOptions{});
  ASSERT_TRUE(client.ok()) << client.status();
  const Matrix keys = test_support::RandomMatrix(kN, kD, 1);
  const Matrix values = test_support::RandomMatrix(kN, kD, 2);
  ASSERT_TRUE(Upload(**client, keys, values).ok());
  auto shards = (*client)->ListShards(kSeq, "");
  ASSERT_TRUE(shards.ok()) << shards.status();
  ASSERT_EQ(shards->size(), 1u);
  EXPECT_FALSE(shards->front().index_pending);
  EXPECT_EQ(shards->front().index_type, IndexType::kGraph);
}

TEST(DeferBuildGrpcTest, IndexBuildThreadsOutsideItsRangeStopsTheNode) {
  for (const char* flag : {"--index_build_threads=0", "--index_build_threads=257"}) {
    EXPECT_TRUE(test_support::NodeRefusesToStart({flag}));
  }
}

}  // namespace
}  // namespace kvr::retrieval
