// Issue 18 on the retrieval node (NodeCore): remainder estimation per
// Attend request (EstimateMode) and per node (--estimate):
//  * OFF (or DEFAULT on a node without --estimate) is bit-identical to an
//    Attend of a node without estimation;
//  * ON covers every key: keys_estimated + keys_attended = keys held, per
//    query head, and the output is closer to full attention than exact top-k;
//  * after appends and seals the chunk summary is extended (still covers
//    every key), the tail is attended exactly, the summary's bytes are in
//    the memory budget and returned by DropSequence;
//  * an unknown mode and out-of-range clusters are rejected naming the field.
#include <cmath>
#include <memory>
#include <string>

#include "common/attention.h"
#include "common/tensor.h"
#include "gtest/gtest.h"
#include "retrieval_node/core/node_core.h"
#include "tests/support/estimate_node.h"
#include "tests/support/test_data.h"

namespace kvr::retrieval {
namespace {

using test_support::ExpectSamePartials;
using test_support::estimate_node::AppendRows;
using test_support::estimate_node::Attend;
using test_support::estimate_node::Data;
using test_support::estimate_node::ErrorVsFull;
using test_support::estimate_node::kHeads;
using test_support::estimate_node::kK;
using test_support::estimate_node::kKvHeads;
using test_support::estimate_node::kPrefill;
using test_support::estimate_node::kSeq;
using test_support::estimate_node::kTail;
using test_support::estimate_node::Load;
using test_support::estimate_node::NewNode;

TEST(NodeEstimateTest, OffIsBitIdenticalToANodeWithoutEstimation) {
  const Data data;
  auto plain = NewNode(false);
  auto estimating = NewNode(true);
  ASSERT_TRUE(plain && estimating);
  ASSERT_NO_FATAL_FAILURE(Load(plain.get(), data));
  ASSERT_NO_FATAL_FAILURE(Load(estimating.get(), data));
  AttendStats s1, s2, s3;
  auto want = Attend(plain.get(), data, EstimateMode::kDefault, &s1);
  auto off = Attend(estimating.get(), data, EstimateMode::kOff, &s2);
  auto plain_off = Attend(plain.get(), data, EstimateMode::kOff, &s3);
  ASSERT_TRUE(want.ok() && off.ok() && plain_off.ok());
  ExpectSamePartials(*off, *want, "estimating node, request off");
  ExpectSamePartials(*plain_off, *want, "plain node, request off");
  EXPECT_EQ(s2.keys_estimated, 0);
  EXPECT_EQ(s2.clusters_estimated, 0);
  EXPECT_EQ(s2.keys_attended, s1.keys_attended);
}

TEST(NodeEstimateTest, OnCoversEveryKeyAndBeatsExactTopK) {
  const Data data;
  auto node = NewNode(false);
  ASSERT_TRUE(node);
  ASSERT_NO_FATAL_FAILURE(Load(node.get(), data));
  AttendStats off_stats, on_stats;
  auto off = Attend(node.get(), data, EstimateMode::kDefault, &off_stats);
  auto on = Attend(node.get(), data, EstimateMode::kOn, &on_stats);
  ASSERT_TRUE(off.ok() && on.ok());
  EXPECT_EQ(on_stats.keys_attended, int64_t{kK} * kHeads);
  EXPECT_EQ(on_stats.keys_estimated, static_cast<int64_t>(kPrefill - kK) * kHeads);
  EXPECT_EQ(on_stats.keys_held, on_stats.keys_attended + on_stats.keys_estimated);
  EXPECT_GT(on_stats.clusters_estimated, 0);
  EXPECT_LE(on_stats.clusters_estimated, 64 * kHeads);
  const double e_off = ErrorVsFull(*off, data, kPrefill);
  const double e_on = ErrorVsFull(*on, data, kPrefill);
  std::printf("relative error vs full attention: exact top-%d %.4f, + estimate %.4f\n", kK,
              e_off, e_on);
  EXPECT_LT(e_on, e_off);
}

TEST(NodeEstimateTest, AppendsSealsAndMemoryKeepTheSummaryConsistent) {
  const Data data;
  auto node = NewNode(true);  // DEFAULT follows --estimate (on)
  ASSERT_TRUE(node);
  ASSERT_NO_FATAL_FAILURE(Load(node.get(), data));
  const int64_t before = node->MemoryUsedBytes();
  AttendStats st;
  ASSERT_TRUE(Attend(node.get(), data, EstimateMode::kDefault, &st).ok());
  EXPECT_EQ(st.keys_estimated, static_cast<int64_t>(kPrefill - kK) * kHeads);
  const int64_t with_summaries = node->MemoryUsedBytes();
  EXPECT_GT(with_summaries, before) << "summary bytes are not in the memory budget";
  // Two seals (2 * kTail rows into the chunk) and 11 rows left in the tail
  // (more than k: attended in full).
  const size_t appended = 2 * kTail + 11;
  ASSERT_NO_FATAL_FAILURE(AppendRows(node.get(), data, kPrefill, appended));
  const size_t chunk = kPrefill + 2 * kTail, tail = appended - 2 * kTail;
  ASSERT_EQ(node->Stats()->tail_keys, static_cast<int64_t>(tail * kKvHeads));
  auto on = Attend(node.get(), data, EstimateMode::kDefault, &st);
  ASSERT_TRUE(on.ok());
  EXPECT_EQ(st.keys_estimated, static_cast<int64_t>(chunk - kK) * kHeads);
  EXPECT_EQ(st.keys_attended, static_cast<int64_t>(kK + tail) * kHeads);
  EXPECT_EQ(st.keys_held, st.keys_attended + st.keys_estimated);
  AttendStats off_stats;
  auto off = Attend(node.get(), data, EstimateMode::kOff, &off_stats);
  ASSERT_TRUE(off.ok());
  EXPECT_LT(ErrorVsFull(*on, data, kPrefill + appended),
            ErrorVsFull(*off, data, kPrefill + appended));
  EXPECT_GT(node->MemoryUsedBytes(), with_summaries);  // the chunk grew, its summary too
  ASSERT_TRUE(node->DropSequence(kSeq).ok());
  EXPECT_EQ(node->MemoryUsedBytes(), 0) << "summary bytes not returned by DropSequence";
}

// A summary the memory budget cannot hold is not built: the Attend
// succeeds, exact (bit-identical to OFF), and nothing is left reserved.
TEST(NodeEstimateTest, SummaryOverTheBudgetFallsBackToExact) {
  const Data data;
  auto probe = NewNode(true);
  ASSERT_TRUE(probe);
  ASSERT_NO_FATAL_FAILURE(Load(probe.get(), data));
  const int64_t loaded = probe->MemoryUsedBytes();
  auto node = NewNode(true, loaded + 1024);
  ASSERT_TRUE(node);
  ASSERT_NO_FATAL_FAILURE(Load(node.get(), data));
  ASSERT_EQ(node->MemoryUsedBytes(), loaded);
  AttendStats on_stats, off_stats;
  for (int i = 0; i < 2; ++i) {  // the second Attend does not retry the build
    auto on = Attend(node.get(), data, EstimateMode::kOn, &on_stats);
    auto off = Attend(node.get(), data, EstimateMode::kOff, &off_stats);
    ASSERT_TRUE(on.ok() && off.ok());
    EXPECT_EQ(on_stats.keys_estimated, 0);
    ExpectSamePartials(*on, *off, "summary over the budget");
    EXPECT_EQ(node->MemoryUsedBytes(), loaded);
  }
}

TEST(NodeEstimateTest, HostileModeAndClustersRejectedNamingThem) {
  const Data data;
  auto node = NewNode(false);
  ASSERT_TRUE(node);
  ASSERT_NO_FATAL_FAILURE(Load(node.get(), data));
  auto bad = Attend(node.get(), data, static_cast<EstimateMode>(7), nullptr);
  ASSERT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("estimate 7"), std::string::npos) << bad.status();
  for (size_t c : {size_t{0}, index::kMaxEstimateClusters + 1}) {
    NodeCoreOptions o;
    o.estimate_clusters_per_chunk = c;
    auto n = NodeCore::Create(o);
    ASSERT_EQ(n.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(n.status().message().find("estimate_clusters_per_chunk"), std::string::npos)
        << n.status();
  }
}

}  // namespace
}  // namespace kvr::retrieval
