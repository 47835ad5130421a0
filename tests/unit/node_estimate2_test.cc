// Issue 18, session 26: the node clusters chunk summaries on its own summary
// thread, never inside an Attend.
//  * an Attend issued right after the upload clusters nothing on its thread
//    (AttendStats::summaries_clustered, counted by ClusterSummary's per-thread
//    Plan counter); until the summary exists the chunk is attended exactly
//    (bit-identical to estimate OFF), and once it exists the output is
//    bit-identical to the inline build (the behaviour before session 26,
//    whose first Attend clusters 1 summary per kv head: the counter works);
//  * keys sealed into a chunk later join its summary inside the next Attend
//    without clustering, and match the inline node again.
#include <chrono>
#include <memory>

#include "gtest/gtest.h"
#include "retrieval_node/core/node_core.h"
#include "tests/support/estimate_node.h"
#include "tests/support/test_data.h"

namespace kvr::retrieval {
namespace {

using test_support::ExpectSamePartials;
namespace en = test_support::estimate_node;

// Attends with `mode` until every chunk key is estimated (the summaries
// exist), at most 60 s; every Attend on the way must cluster nothing and be
// either exact for a kv head or estimate all of its chunk.
absl::StatusOr<Partials> AttendUntilEstimated(NodeCore* node, const en::Data& data,
                                              EstimateMode mode, size_t chunk_keys,
                                              AttendStats* stats) {
  const int64_t per_kv_head =
      static_cast<int64_t>(chunk_keys - en::kK) * (en::kHeads / en::kKvHeads);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (true) {
    KVR_ASSIGN_OR_RETURN(Partials p, en::Attend(node, data, mode, stats));
    EXPECT_EQ(stats->summaries_clustered, 0) << "an Attend ran k-means";
    EXPECT_EQ(stats->keys_estimated % per_kv_head, 0) << stats->keys_estimated;
    if (stats->keys_estimated == per_kv_head * en::kKvHeads) return p;
    if (std::chrono::steady_clock::now() > deadline) {
      return absl::DeadlineExceededError("summaries not built within 60 s");
    }
    std::this_thread::yield();
  }
}

TEST(NodeEstimate2Test, AttendRightAfterUploadNeverClusters) {
  const en::Data data;
  // Node default off: nothing is queued at upload, the first ON Attend
  // queues the builds and is exact meanwhile.
  auto node = en::NewNode(false, 0, /*background=*/true);
  auto inline_node = en::NewNode(false, 0, /*background=*/false);
  ASSERT_TRUE(node && inline_node);
  ASSERT_NO_FATAL_FAILURE(en::Load(node.get(), data));
  ASSERT_NO_FATAL_FAILURE(en::Load(inline_node.get(), data));
  AttendStats first, off_stats, inline_stats, built_stats;
  auto on = en::Attend(node.get(), data, EstimateMode::kOn, &first);
  auto off = en::Attend(node.get(), data, EstimateMode::kOff, &off_stats);
  ASSERT_TRUE(on.ok() && off.ok());
  EXPECT_EQ(first.summaries_clustered, 0);
  if (first.keys_estimated == 0) ExpectSamePartials(*on, *off, "before the summary exists");
  auto want = en::Attend(inline_node.get(), data, EstimateMode::kOn, &inline_stats);
  ASSERT_TRUE(want.ok());
  EXPECT_EQ(inline_stats.summaries_clustered, en::kKvHeads) << "the counter does not count";
  auto built =
      AttendUntilEstimated(node.get(), data, EstimateMode::kOn, en::kPrefill, &built_stats);
  ASSERT_TRUE(built.ok()) << built.status();
  ExpectSamePartials(*built, *want, "background summary vs inline summary");
  EXPECT_EQ(built_stats.keys_estimated, inline_stats.keys_estimated);
  EXPECT_EQ(built_stats.clusters_estimated, inline_stats.clusters_estimated);
}

TEST(NodeEstimate2Test, SealedKeysJoinTheSummaryWithoutClustering) {
  const en::Data data;
  // Node default on: UploadShard queues the builds.
  auto node = en::NewNode(true, 0, /*background=*/true);
  auto inline_node = en::NewNode(true, 0, /*background=*/false);
  ASSERT_TRUE(node && inline_node);
  ASSERT_NO_FATAL_FAILURE(en::Load(node.get(), data));
  ASSERT_NO_FATAL_FAILURE(en::Load(inline_node.get(), data));
  AttendStats st, inline_stats;
  ASSERT_TRUE(
      AttendUntilEstimated(node.get(), data, EstimateMode::kDefault, en::kPrefill, &st).ok());
  ASSERT_TRUE(en::Attend(inline_node.get(), data, EstimateMode::kDefault, &inline_stats).ok());
  // One seal (kTail rows into each chunk), 5 rows left in the tail.
  for (NodeCore* n : {node.get(), inline_node.get()}) {
    ASSERT_NO_FATAL_FAILURE(en::AppendRows(n, data, en::kPrefill, en::kTail + 5));
  }
  auto got = en::Attend(node.get(), data, EstimateMode::kDefault, &st);
  auto want = en::Attend(inline_node.get(), data, EstimateMode::kDefault, &inline_stats);
  ASSERT_TRUE(got.ok() && want.ok());
  EXPECT_EQ(st.summaries_clustered, 0);
  EXPECT_EQ(inline_stats.summaries_clustered, 0);  // extended, not re-clustered
  EXPECT_EQ(st.keys_estimated,
            static_cast<int64_t>(en::kPrefill + en::kTail - en::kK) * en::kHeads);
  ExpectSamePartials(*got, *want, "extended background summary vs inline");
}

}  // namespace
}  // namespace kvr::retrieval
