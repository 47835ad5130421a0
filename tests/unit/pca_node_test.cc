// pca_sq8 on the retrieval node (issue 17, session 27): the sequence's
// query heads per kv head reach auto's timing (CalibrationForSpec, used by
// UploadShard), pca_sq8 sequences are validated (head_dim bound), built,
// reported in ListShards, searched by Attend and grown by appends and
// seals, and the kvr.v1 enum maps both ways.
#include <memory>
#include <string>

#include "common/attention.h"
#include "common/tensor.h"
#include "gtest/gtest.h"
#include "retrieval_node/core/node_core.h"
#include "retrieval_node/core/node_state.h"
#include "retrieval_node/wire/proto_convert.h"
#include "tests/support/test_data.h"

namespace kvr::retrieval {
namespace {

SequenceSpec Spec(int32_t heads, int32_t kv_heads, int32_t dim, IndexType type) {
  SequenceSpec s;
  s.sequence_id = 9;
  s.n_layers = 1;
  s.n_heads = heads;
  s.n_kv_heads = kv_heads;
  s.head_dim = dim;
  s.index_type = type;
  return s;
}

TEST(PcaNodeTest, CalibrationTimesTheQueryHeadsOfOneKvHead) {
  index::CalibrationOptions base;
  base.timing_queries = 40;
  const index::CalibrationOptions gqa =
      internal::CalibrationForSpec(Spec(32, 8, 128, IndexType::kAuto), base);
  EXPECT_EQ(gqa.queries_per_search, 4u);
  EXPECT_EQ(gqa.timing_queries, 40u);  // the rest is the node's
  EXPECT_TRUE(index::ValidateCalibrationOptions(gqa).ok());
  EXPECT_EQ(internal::CalibrationForSpec(Spec(8, 8, 128, IndexType::kAuto), base)
                .queries_per_search,
            1u);  // multi-head attention: one query per kv head
  EXPECT_EQ(internal::CalibrationForSpec(Spec(64, 1, 128, IndexType::kAuto), base)
                .queries_per_search,
            64u);  // multi-query attention
}

TEST(PcaNodeTest, SpecBoundsHeadDim) {
  EXPECT_TRUE(internal::ValidateSpec(Spec(4, 2, 512, IndexType::kPcaSq8)).ok());
  const absl::Status s = internal::ValidateSpec(Spec(4, 2, 640, IndexType::kPcaSq8));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("pca_sq8 needs head_dim <= 512, got 640"), std::string::npos) << s;
  EXPECT_TRUE(internal::ValidateSpec(Spec(4, 2, 640, IndexType::kFlatSq8)).ok());
}

TEST(PcaNodeTest, ProtoEnumMapsBothWays) {
  EXPECT_EQ(IndexTypeToProto(IndexType::kPcaSq8), v1::INDEX_TYPE_PCA_SQ8);
  EXPECT_EQ(static_cast<int>(v1::INDEX_TYPE_PCA_SQ8), 7);
  auto back = IndexTypeFromProto(7, "spec.index_type");
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(*back, IndexType::kPcaSq8);
  auto bad = IndexTypeFromProto(8, "spec.index_type");
  EXPECT_NE(bad.status().message().find("INDEX_TYPE_PCA_SQ8 (7)"), std::string::npos)
      << bad.status();
  auto parsed = index::ParseIndexType("pca_sq8");
  ASSERT_TRUE(parsed.ok());
  EXPECT_EQ(*parsed, IndexType::kPcaSq8);
  EXPECT_EQ(index::IndexTypeName(IndexType::kPcaSq8), "pca_sq8");
}

// A pca_sq8 sequence: the chunk is a pca_sq8 index (ListShards), Attend
// attends k keys per query head with exactly the flat node's top-k on
// random keys (d 32: the kept directions hold 90% of the variance, the
// rerank of 16 x k recovers the rest), and appends through a seal keep
// the kind.
TEST(PcaNodeTest, PcaSequenceBuildsSearchesAndSeals) {
  constexpr int kHeads = 4, kKv = 2, kDim = 32, kK = 8;
  constexpr size_t kPrefill = 4096, kTail = 16;
  const Matrix keys = test_support::RandomMatrix(kPrefill + 2 * kTail, kDim, 11);
  const Matrix values = test_support::RandomMatrix(kPrefill + 2 * kTail, kDim, 12);
  const Matrix queries = test_support::RandomMatrix(kHeads, kDim, 13);
  auto make = [&](IndexType type) -> std::unique_ptr<NodeCore> {
    NodeCoreOptions o;
    o.tail_capacity = kTail;
    o.background_seals = false;
    auto n = NodeCore::Create(o);
    EXPECT_TRUE(n.ok()) << n.status();
    if (!n.ok()) return nullptr;
    EXPECT_TRUE((*n)->CreateSequence(Spec(kHeads, kKv, kDim, type)).ok());
    for (int32_t g = 0; g < kKv; ++g) {
      ShardUpload up;
      up.key = {9, 0, g, 0};
      up.keys = keys.view().rows_slice(0, kPrefill);
      up.values = values.view().rows_slice(0, kPrefill);
      const absl::Status s = (*n)->UploadShard(up);
      EXPECT_TRUE(s.ok()) << s;
    }
    return std::move(*n);
  };
  auto attend = [&](NodeCore* node, AttendStats* stats) -> absl::StatusOr<Partials> {
    AttendRequest r;
    r.sequence_id = 9;
    r.queries = queries.view();
    r.k = kK;
    Partials out(kHeads, kDim);
    StatusWaiter waiter;
    node->AttendAsync(r, out.view(), stats, waiter.callback());
    KVR_RETURN_IF_ERROR(waiter.Wait());
    return out;
  };
  auto pca = make(IndexType::kPcaSq8);
  auto flat = make(IndexType::kFlat);
  ASSERT_TRUE(pca && flat);
  auto shards = pca->ListShards(std::nullopt);
  ASSERT_TRUE(shards.ok()) << shards.status();
  ASSERT_EQ(shards->size(), 2u);
  for (const ShardInfo& info : *shards) {
    EXPECT_EQ(info.index_type, IndexType::kPcaSq8);
    EXPECT_EQ(info.n_keys, static_cast<int64_t>(kPrefill));
  }
  AttendStats ps, fs;
  auto got = attend(pca.get(), &ps);
  auto want = attend(flat.get(), &fs);
  ASSERT_TRUE(got.ok() && want.ok()) << got.status() << want.status();
  EXPECT_EQ(ps.keys_attended, int64_t{kK} * kHeads);
  // Same top-k: the same partials up to the fp32 rounding of the scores.
  for (size_t h = 0; h < kHeads; ++h) {
    EXPECT_NEAR(got->m[h], want->m[h], 1e-4) << "head " << h;
    EXPECT_NEAR(got->l[h], want->l[h], 1e-4 * want->l[h]) << "head " << h;
    for (size_t c = 0; c < kDim; ++c) {
      EXPECT_NEAR(got->o.row(h)[c], want->o.row(h)[c], 1e-4) << "head " << h << " col " << c;
    }
  }
  // Two tails' worth of appends: one seal grows the pca_sq8 chunk.
  for (size_t i = kPrefill; i < kPrefill + 2 * kTail; ++i) {
    for (int32_t g = 0; g < kKv; ++g) {
      AppendRequest a;
      a.sequence_id = 9;
      a.layer = 0;
      a.kv_head = g;
      a.first_position = static_cast<int64_t>(i);
      a.keys = keys.view().rows_slice(i, 1);
      a.values = values.view().rows_slice(i, 1);
      const absl::Status s = pca->Append(a);
      ASSERT_TRUE(s.ok()) << s;
    }
  }
  shards = pca->ListShards(std::nullopt);
  ASSERT_TRUE(shards.ok());
  int64_t chunk_keys = 0;
  for (const ShardInfo& info : *shards) {
    EXPECT_EQ(info.index_type, IndexType::kPcaSq8);
    chunk_keys += info.n_keys;
  }
  EXPECT_GT(chunk_keys, static_cast<int64_t>(2 * kPrefill));
  ASSERT_TRUE(attend(pca.get(), &ps).ok());
}

}  // namespace
}  // namespace kvr::retrieval
