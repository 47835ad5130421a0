// Self-calibration over gRPC against a real kvr_node: an upload's held-back
// queries cross the wire (ShardHeader.holdout_*), the chunk is calibrated
// for the node's --target_recall and ListShards reports the effort and the
// expected recall; a bad --target_recall stops the node at start-up.
#include <signal.h>
#include <sys/wait.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/exact_topk.h"
#include "gtest/gtest.h"
#include "retrieval_node/client/grpc_retrieval_client.h"
#include "tests/support/server_process.h"
#include "tools/attention_data.h"

namespace kvr::retrieval {
namespace {

using kvr::test_support::NodeProcess;

constexpr int kD = 32, kN = 4096, kW = 50;

TEST(CalibrateGrpcTest, HoldoutCrossesTheWireAndShardsReportTheirCalibration) {
  // The synchronous build: ListShards right after the upload sees the index.
  auto node =
      NodeProcess::Start({"--threads=2", "--target_recall=0.9", "--defer_index_build=false"});
  ASSERT_NE(node, nullptr);
  auto client = GrpcRetrievalClient::Create(node->address(), GrpcClientOptions{});
  ASSERT_TRUE(client.ok()) << client.status();

  AttentionDataOptions o;
  o.n_keys = kN;
  o.n_train = 1024;
  o.n_test = 8;
  o.dim = kD;
  o.seed = 5;
  auto data = GenerateAttentionData(o);
  ASSERT_TRUE(data.ok());
  const ConstMatrixView held = data->train_queries.view().rows_slice(0, 128);
  const ConstMatrixView train = data->train_queries.view().rows_slice(128, 1024 - 128);
  std::vector<int64_t> train_ids(train.rows() * kW), held_ids(held.rows() * kW);
  std::vector<float> scores(train_ids.size());
  ASSERT_TRUE(ExactTopK(data->keys.view(), train, kW, train_ids, scores, nullptr).ok());
  ASSERT_TRUE(ExactTopK(data->keys.view(), held, kW, held_ids, {scores.data(), held_ids.size()},
                        nullptr)
                  .ok());

  for (IndexType type : {IndexType::kGraph, IndexType::kAuto}) {
    const uint64_t id = type == IndexType::kGraph ? 11 : 12;
    SequenceSpec spec;
    spec.sequence_id = id;
    spec.n_layers = 1;
    spec.n_heads = 2;
    spec.n_kv_heads = 1;
    spec.head_dim = kD;
    spec.index_type = type;
    ASSERT_TRUE((*client)->CreateSequence(spec).ok());
    ShardUpload up;
    up.key = {id, 0, 0, 0};
    up.keys = data->keys.view();
    up.values = data->values.view();
    up.train_topk = train_ids;
    up.train_topk_width = kW;
    up.holdout_queries = held;
    up.holdout_topk = held_ids;
    up.holdout_topk_width = kW;
    ASSERT_TRUE((*client)->UploadShard(up).ok());
    auto shards = (*client)->ListShards(id, "");
    ASSERT_TRUE(shards.ok()) << shards.status();
    ASSERT_EQ(shards->size(), 1u);
    const ShardInfo& s = shards->front();
    EXPECT_NE(s.index_type, IndexType::kAuto);
    EXPECT_GE(s.expected_recall, 0.9) << IndexTypeName(type);
    EXPECT_LE(s.expected_recall, 1.0) << IndexTypeName(type);
    if (s.index_type == IndexType::kGraph) {
      EXPECT_GE(s.search_effort, kW);
    } else if (s.index_type == IndexType::kIvf) {
      EXPECT_GE(s.search_effort, 1);
    }
  }
  // A held-back id outside the keys is refused by the node, naming it.
  SequenceSpec spec;
  spec.sequence_id = 13;
  spec.n_layers = 1;
  spec.n_heads = 2;
  spec.n_kv_heads = 1;
  spec.head_dim = kD;
  spec.index_type = IndexType::kGraph;
  ASSERT_TRUE((*client)->CreateSequence(spec).ok());
  std::vector<int64_t> bad = held_ids;
  bad[5] = kN + 3;
  ShardUpload up;
  up.key = {13, 0, 0, 0};
  up.keys = data->keys.view();
  up.values = data->values.view();
  up.holdout_queries = held;
  up.holdout_topk = bad;
  up.holdout_topk_width = kW;
  const absl::Status s = (*client)->UploadShard(up);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_NE(s.message().find("holdout_topk id 4099 outside [-1, 4096)"), std::string::npos) << s;
}

TEST(CalibrateGrpcTest, BadTargetRecallStopsTheNode) {
  EXPECT_TRUE(test_support::NodeRefusesToStart({"--target_recall=1.5"}));
}

}  // namespace
}  // namespace kvr::retrieval
