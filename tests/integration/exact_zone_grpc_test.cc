// The exact zone over gRPC against a real kvr_node (session 27): with
// --estimate and --exact_zone_keys_fraction=1 every key top-k did not
// retrieve is attended exactly, so the output equals full attention and
// AttendStats.keys_exact_zone (proto field 7) crosses the wire; with the
// zone off the count is 0; out-of-range --exact_zone_* flags stop the node
// at start-up.
#include <signal.h>
#include <sys/wait.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/attention.h"
#include "gtest/gtest.h"
#include "retrieval_node/client/grpc_retrieval_client.h"
#include "tests/support/server_process.h"
#include "tests/support/test_data.h"

namespace kvr::retrieval {
namespace {

using kvr::test_support::NodeProcess;
using kvr::test_support::RandomMatrix;

// 512 keys x 32 clusters = 16384: the node clusters the summary inside the
// first Attend, so the first answer already has its estimate and zone.
constexpr int kD = 32, kN = 512, kHeads = 2, kK = 8;

// Max over query heads of the relative L2 error of `got` against `want`.
double MaxRelErr(const Partials& got, const Partials& want) {
  double worst = 0;
  for (size_t i = 0; i < got.m.size(); ++i) {
    double num = 0, den = 0;
    for (size_t t = 0; t < got.o.cols; ++t) {
      const double e = double(got.o.row(i)[t]) - want.o.row(i)[t];
      num += e * e;
      den += double(want.o.row(i)[t]) * want.o.row(i)[t];
    }
    worst = std::max(worst, std::sqrt(num / den));
  }
  return worst;
}

// Uploads one flat chunk of `keys` / `values` as sequence `id` and attends
// `queries` (k = kK, estimate ON) once.
void UploadAndAttend(RetrievalClient* client, uint64_t id, const Matrix& keys,
                     const Matrix& values, const Matrix& queries, Partials* out,
                     AttendStats* stats) {
  SequenceSpec spec;
  spec.sequence_id = id;
  spec.n_layers = 1;
  spec.n_heads = kHeads;
  spec.n_kv_heads = 1;
  spec.head_dim = kD;
  spec.index_type = IndexType::kFlat;
  ASSERT_TRUE(client->CreateSequence(spec).ok());
  ShardUpload up;
  up.key = {id, 0, 0, 0};
  up.keys = keys.view();
  up.values = values.view();
  ASSERT_TRUE(client->UploadShard(up).ok());
  AttendRequest r;
  r.sequence_id = id;
  r.queries = queries.view();
  r.k = kK;
  r.estimate = EstimateMode::kOn;
  const absl::Status st = client->Attend(r, out->view(), stats);
  ASSERT_TRUE(st.ok()) << st;
}

TEST(ExactZoneGrpcTest, FullZoneIsFullAttentionAndItsKeysCrossTheWire) {
  const Matrix keys = RandomMatrix(kN, kD, 21, 0.3f);
  const Matrix values = RandomMatrix(kN, kD, 22);
  const Matrix queries = RandomMatrix(kHeads, kD, 23, 0.3f);
  Partials full(kHeads, kD);
  ASSERT_TRUE(ExactAttention(queries.view(), keys.view(),
                             ValueMatrix::FromFloat(DType::kF32, values.view()),
                             1.0f / std::sqrt(static_cast<float>(kD)), full.view())
                  .ok());

  auto zone_node = NodeProcess::Start({"--threads=2", "--exact_zone_keys_fraction=1"});
  auto plain_node = NodeProcess::Start({"--threads=2"});
  ASSERT_TRUE(zone_node != nullptr && plain_node != nullptr);
  auto zone_client = GrpcRetrievalClient::Create(zone_node->address(), GrpcClientOptions{});
  auto plain_client = GrpcRetrievalClient::Create(plain_node->address(), GrpcClientOptions{});
  ASSERT_TRUE(zone_client.ok() && plain_client.ok());

  Partials zone(kHeads, kD), est(kHeads, kD);
  AttendStats zs, es;
  ASSERT_NO_FATAL_FAILURE(
      UploadAndAttend(zone_client->get(), 31, keys, values, queries, &zone, &zs));
  ASSERT_NO_FATAL_FAILURE(
      UploadAndAttend(plain_client->get(), 31, keys, values, queries, &est, &es));
  EXPECT_EQ(zs.keys_exact_zone, int64_t{kN - kK} * kHeads);
  EXPECT_EQ(zs.keys_estimated, 0);
  EXPECT_EQ(es.keys_exact_zone, 0);
  EXPECT_EQ(es.keys_estimated, int64_t{kN - kK} * kHeads);
  const double e_zone = MaxRelErr(zone, full);
  const double e_est = MaxRelErr(est, full);
  std::printf("over gRPC: error vs full attention, estimate %.4f, estimate + full zone %.3g\n",
              e_est, e_zone);
  EXPECT_LE(e_zone, 1e-5);
  EXPECT_GT(e_est, 1e-2);
}

TEST(ExactZoneGrpcTest, OutOfRangeZoneFlagsStopTheNode) {
  for (const char* flag :
       {"--exact_zone_keys_fraction=1.5", "--exact_zone_keys_fraction=-0.1",
        "--exact_zone_keys_fraction=nan", "--exact_zone_mass_fraction=0",
        "--exact_zone_mass_fraction=2"}) {
    EXPECT_TRUE(test_support::NodeRefusesToStart({flag}));
  }
}

}  // namespace
}  // namespace kvr::retrieval
