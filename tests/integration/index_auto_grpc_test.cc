// Index auto and IVF-SQ8 against a real kvr_node (issue 17, session 26):
// a sequence asking for INDEX_TYPE_IVF_SQ8 gets that kind in ListShards and
// the build metric's "ivf_sq8" series; an auto upload reports the chosen
// kind's measured µs (ShardInfo.measured_search_us) and expected recall, and
// the metrics page records both under that kind; --rerank_factor outside
// [1, 64] stops the node with exit status 2.
#include <signal.h>
#include <sys/wait.h>

#include <cstdint>
#include <string>
#include <vector>

#include "common/exact_topk.h"
#include "gtest/gtest.h"
#include "retrieval_node/client/grpc_retrieval_client.h"
#include "tests/support/metrics_page.h"
#include "tests/support/server_process.h"
#include "tools/attention_data.h"

namespace kvr::retrieval {
namespace {

using kvr::test_support::HttpGetMetrics;
using kvr::test_support::NodeProcess;
using kvr::test_support::ParseExposition;

constexpr int kD = 32, kN = 8192, kW = 50, kHeld = 128;

TEST(IndexAutoGrpcTest, IvfSq8IsItsOwnKindAndAutoReportsItsMeasuredTime) {
  // The synchronous build: ListShards right after the upload sees the index.
  auto node =
      NodeProcess::Start({"--threads=2", "--rerank_factor=8", "--defer_index_build=false"});
  ASSERT_NE(node, nullptr);
  auto client = GrpcRetrievalClient::Create(node->address(), GrpcClientOptions{});
  ASSERT_TRUE(client.ok()) << client.status();

  AttentionDataOptions o;
  o.family = "positional";
  o.n_keys = kN;
  o.n_train = kHeld;
  o.n_test = 8;
  o.dim = kD;
  o.seed = 9;
  auto data = GenerateAttentionData(o);
  ASSERT_TRUE(data.ok()) << data.status();
  const ConstMatrixView held = data->train_queries.view();
  std::vector<int64_t> held_ids(held.rows() * kW);
  std::vector<float> scores(held_ids.size());
  ASSERT_TRUE(ExactTopK(data->keys.view(), held, kW, held_ids, scores, nullptr).ok());

  for (IndexType type : {IndexType::kIvfSq8, IndexType::kAuto}) {
    const uint64_t id = type == IndexType::kAuto ? 31 : 32;
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
    up.holdout_queries = held;
    up.holdout_topk = held_ids;
    up.holdout_topk_width = kW;
    ASSERT_TRUE((*client)->UploadShard(up).ok());
  }
  auto ivf_sq8 = (*client)->ListShards(32, "");
  ASSERT_TRUE(ivf_sq8.ok()) << ivf_sq8.status();
  ASSERT_EQ(ivf_sq8->size(), 1u);
  EXPECT_EQ(ivf_sq8->front().index_type, IndexType::kIvfSq8);
  EXPECT_GE(ivf_sq8->front().search_effort, 1);  // the calibrated nprobe
  EXPECT_EQ(ivf_sq8->front().measured_search_us, 0.0);  // asked for by name: not timed

  auto chosen = (*client)->ListShards(31, "");
  ASSERT_TRUE(chosen.ok()) << chosen.status();
  ASSERT_EQ(chosen->size(), 1u);
  const ShardInfo& s = chosen->front();
  EXPECT_NE(s.index_type, IndexType::kAuto);
  EXPECT_GT(s.measured_search_us, 0.0);
  EXPECT_LT(s.measured_search_us, 1e6);  // a search of 8192 keys, not a second
  EXPECT_GE(s.expected_recall, 0.95);

  ASSERT_FALSE(node->metrics_address().empty());
  const std::optional<std::string> text = HttpGetMetrics(node->metrics_address());
  ASSERT_TRUE(text.has_value());
  const auto samples = ParseExposition(*text);
  const std::string kind(IndexTypeName(s.index_type));
  using kvr::test_support::Get;
  EXPECT_EQ(Get(samples, "kvr_node_index_build_duration_seconds_count", {{"index", "ivf_sq8"}}),
            kind == "ivf_sq8" ? 2 : 1);
  EXPECT_EQ(Get(samples, "kvr_node_index_auto_search_seconds_count", {{"index", kind}}), 1);
  EXPECT_NEAR(Get(samples, "kvr_node_index_auto_search_seconds_sum", {{"index", kind}}),
              s.measured_search_us * 1e-6, 1e-9);
  EXPECT_EQ(Get(samples, "kvr_node_index_expected_recall_count", {{"index", kind}}),
            kind == "ivf_sq8" ? 2 : 1);
}

TEST(IndexAutoGrpcTest, RerankFactorOutsideItsRangeStopsTheNode) {
  for (const char* flag : {"--rerank_factor=0", "--rerank_factor=65"}) {
    EXPECT_TRUE(test_support::NodeRefusesToStart({flag}));
  }
}

}  // namespace
}  // namespace kvr::retrieval
