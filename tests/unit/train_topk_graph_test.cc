// The node's own training-set preparation (AttentionGraphIndex::
// BuildFromQueries, used when an upload carries training queries or none):
// with more than TrainingTopKOptions::max_queries queries it trains on
// TrainingTopK's sample, i.e. its index is byte-identical to one built from
// the sampled queries' exact lists (and routers from those queries); with
// fewer it is byte-identical to one built from every query's ExactTopK.
#include <algorithm>
#include <vector>

#include <gtest/gtest.h>

#include "common/exact_topk.h"
#include "common/tensor.h"
#include "common/train_topk.h"
#include "retrieval_node/index/attention_graph_index.h"
#include "tests/support/test_data.h"

namespace kvr::index {
namespace {

using test_support::RandomMatrix;

std::vector<uint8_t> Blob(const AttentionGraphIndex& index) {
  std::vector<uint8_t> blob;
  EXPECT_TRUE(index.Serialize(&blob).ok());
  return blob;
}

// Build + SetRouters from the given queries' exact top-k.
std::vector<uint8_t> BuiltFrom(ConstMatrixView keys, ConstMatrixView queries, int k,
                               const AttentionGraphOptions& o) {
  std::vector<int64_t> ids(queries.rows() * size_t(k));
  std::vector<float> scores(ids.size());
  EXPECT_TRUE(ExactTopK(keys, queries, k, ids, scores, nullptr).ok());
  auto index = AttentionGraphIndex::Build(keys, ids, size_t(k), o, nullptr);
  EXPECT_TRUE(index.ok()) << index.status();
  if (!index.ok()) return {};
  EXPECT_TRUE((*index)->SetRouters(queries, ids, size_t(k)).ok());
  return Blob(**index);
}

TEST(BuildFromQueries, TrainsOnTheStratifiedSampleOfManyQueries) {
  const TrainingTopKOptions sampling;  // what BuildFromQueries uses
  const Matrix keys = RandomMatrix(2000, 16, 1);
  const Matrix queries = RandomMatrix(sampling.max_queries + 3000, 16, 2);
  AttentionGraphOptions o;
  o.routers = 64;
  const int k = 8;
  auto built = AttentionGraphIndex::BuildFromQueries(keys.view(), queries.view(), k, o, nullptr);
  ASSERT_TRUE(built.ok()) << built.status();

  const std::vector<size_t> sample = TrainingQuerySample(queries.rows, sampling);
  ASSERT_EQ(sample.size(), sampling.max_queries);
  Matrix sampled(sample.size(), 16);
  for (size_t i = 0; i < sample.size(); ++i) {
    std::copy_n(queries.row(sample[i]), 16, sampled.row(i));
  }
  EXPECT_EQ(Blob(**built), BuiltFrom(keys.view(), sampled.view(), k, o));
}

TEST(BuildFromQueries, FewQueriesAllTrain) {
  const Matrix keys = RandomMatrix(1500, 16, 3);
  const Matrix queries = RandomMatrix(4000, 16, 4);
  AttentionGraphOptions o;
  o.routers = 32;
  auto built = AttentionGraphIndex::BuildFromQueries(keys.view(), queries.view(), 8, o, nullptr);
  ASSERT_TRUE(built.ok()) << built.status();
  EXPECT_EQ(Blob(**built), BuiltFrom(keys.view(), queries.view(), 8, o));
}

}  // namespace
}  // namespace kvr::index
