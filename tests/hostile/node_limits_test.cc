// Hostile input to the retrieval node's core and index loaders (issue 14),
// in process:
//  * every index deserializer (IVF, flat, graph) given a checksummed blob
//    whose header claims 2^31 keys of dim 4096 fails with DataLoss naming
//    the size, quickly, without ever asking the allocator for more than a
//    few MiB (a global operator new records the largest request);
//  * positions: an Append / UploadShard whose last position would pass
//    INT64_MAX, or whose first_position is negative, is InvalidArgument
//    naming first_position and the limit, and changes nothing;
//  * a sequence shape whose n_layers x n_kv_heads exceeds the heads cap is
//    InvalidArgument naming both fields and the cap.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <vector>

#include "common/serialize.h"
#include "retrieval_node/core/node_core.h"
#include "retrieval_node/index/attention_graph_index.h"
#include "retrieval_node/index/flat_index.h"
#include "retrieval_node/index/index.h"
#include "retrieval_node/index/ivf_index.h"
#include "tests/support/test_data.h"

namespace {
// Largest single allocation requested while `g_tracking` is set.
std::atomic<bool> g_tracking{false};
std::atomic<size_t> g_largest{0};

void* Allocate(size_t size) {
  if (g_tracking.load(std::memory_order_relaxed)) {
    size_t seen = g_largest.load(std::memory_order_relaxed);
    while (size > seen && !g_largest.compare_exchange_weak(seen, size)) {
    }
  }
  void* p = std::malloc(size == 0 ? 1 : size);
  if (p == nullptr) throw std::bad_alloc();
  return p;
}
}  // namespace

void* operator new(size_t size) { return Allocate(size); }
void* operator new[](size_t size) { return Allocate(size); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, size_t) noexcept { std::free(p); }
void operator delete[](void* p, size_t) noexcept { std::free(p); }

namespace kvr::retrieval {
namespace {

using kvr::test_support::RandomMatrix;

constexpr size_t kDim = 16;
constexpr uint64_t kClaimedKeys = uint64_t{1} << 31;  // index::kMaxKeys
constexpr uint64_t kClaimedDim = 4096;                // index::kMaxDim

// `blob` re-sealed with its payload's u64 at `offset` set to `value`.
std::vector<uint8_t> Patched(const std::vector<uint8_t>& blob, size_t offset, uint64_t value) {
  absl::StatusOr<OpenedBlob> opened = OpenBlob(blob);
  EXPECT_TRUE(opened.ok()) << opened.status();
  std::vector<uint8_t> payload(opened->payload.begin(), opened->payload.end());
  EXPECT_LE(offset + sizeof(value), payload.size());
  std::memcpy(payload.data() + offset, &value, sizeof(value));
  return SealBlob(opened->kind, opened->version, payload);
}

// Loads `blob` with allocation tracking; expects DataLoss mentioning `want`,
// under 100 ms, no allocation above 16 MiB.
void ExpectRejectedCheaply(const std::vector<uint8_t>& blob, const std::string& want) {
  g_largest.store(0);
  g_tracking.store(true);
  const auto start = std::chrono::steady_clock::now();
  absl::StatusOr<std::unique_ptr<index::KeyIndex>> loaded = index::LoadIndex(blob);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  g_tracking.store(false);
  ASSERT_FALSE(loaded.ok());
  EXPECT_EQ(loaded.status().code(), absl::StatusCode::kDataLoss) << loaded.status();
  EXPECT_NE(loaded.status().message().find(want), std::string::npos) << loaded.status();
  EXPECT_LT(g_largest.load(), size_t{16} << 20) << loaded.status();
  EXPECT_LT(seconds, 0.1) << loaded.status();
}

TEST(IndexLoaderLimits, IvfClaimingHugeSizeFailsBeforeAllocating) {
  const Matrix keys = RandomMatrix(256, kDim, 1);
  index::IvfOptions o;
  o.nlist = 4;
  auto ivf = index::IvfIndex::Build(keys.view(), o, nullptr);
  ASSERT_TRUE(ivf.ok()) << ivf.status();
  std::vector<uint8_t> blob;
  ASSERT_TRUE((*ivf)->Serialize(&blob).ok());
  ASSERT_TRUE(index::LoadIndex(blob).ok());  // the unpatched blob loads
  // Payload: dim u64 | n u64 | nlist u64 | ...
  ExpectRejectedCheaply(Patched(blob, 8, kClaimedKeys), "ivf index: size 2147483648");
  ExpectRejectedCheaply(Patched(Patched(blob, 8, kClaimedKeys - 1), 0, kClaimedDim),
                        "ivf index: size 2147483647 x dim 4096");
  // nlist as large as the claimed size.
  ExpectRejectedCheaply(Patched(Patched(blob, 8, kClaimedKeys), 16, kClaimedKeys),
                        "payload bytes");
}

TEST(IndexLoaderLimits, FlatClaimingHugeSizeFailsBeforeAllocating) {
  const Matrix keys = RandomMatrix(64, kDim, 2);
  auto flat = index::FlatIndex::Create(kDim);
  ASSERT_TRUE(flat.ok());
  ASSERT_TRUE((*flat)->Add(keys.view()).ok());
  std::vector<uint8_t> blob;
  ASSERT_TRUE((*flat)->Serialize(&blob).ok());
  ASSERT_TRUE(index::LoadIndex(blob).ok());
  // Payload: dim u64 | n u64 | keys (count u64 + floats).
  ExpectRejectedCheaply(Patched(Patched(blob, 8, kClaimedKeys), 0, kClaimedDim),
                        "expected 2147483648 x 4096");
  // The array count itself claims 2^31 x 4096 floats.
  ExpectRejectedCheaply(Patched(Patched(Patched(blob, 8, kClaimedKeys - 1), 0, kClaimedDim), 16,
                                (kClaimedKeys - 1) * kClaimedDim),
                        "keys");
}

TEST(IndexLoaderLimits, GraphClaimingHugeSizeFailsBeforeAllocating) {
  const Matrix keys = RandomMatrix(128, kDim, 3);
  auto graph = index::AttentionGraphIndex::BuildFromQueries(keys.view(), keys.view(), 8, {},
                                                             nullptr);
  ASSERT_TRUE(graph.ok()) << graph.status();
  std::vector<uint8_t> blob;
  ASSERT_TRUE((*graph)->Serialize(&blob).ok());
  ASSERT_TRUE(index::LoadIndex(blob).ok());
  // Payload: dim u64 | n u64 | ...
  ExpectRejectedCheaply(Patched(blob, 8, kClaimedKeys - 1), "attention graph index");
  ExpectRejectedCheaply(Patched(Patched(blob, 8, kClaimedKeys - 1), 0, kClaimedDim),
                        "attention graph index");
}

SequenceSpec Spec(uint64_t id, int32_t layers, int32_t kv_heads, IndexType type) {
  SequenceSpec s;
  s.sequence_id = id;
  s.n_layers = layers;
  s.n_heads = kv_heads;
  s.n_kv_heads = kv_heads;
  s.head_dim = static_cast<int32_t>(kDim);
  s.index_type = type;
  return s;
}

std::unique_ptr<NodeCore> NewCore() {
  NodeCoreOptions o;
  o.threads = 0;
  auto core = NodeCore::Create(o);
  EXPECT_TRUE(core.ok()) << core.status();
  return std::move(core).value();
}

constexpr int64_t kMax = std::numeric_limits<int64_t>::max();

TEST(NodePositionLimits, AppendPastInt64MaxIsRejectedNamingTheField) {
  auto core = NewCore();
  ASSERT_TRUE(core->CreateSequence(Spec(1, 1, 1, IndexType::kFlat)).ok());
  const Matrix rows = RandomMatrix(2, kDim, 4);
  AppendRequest a;
  a.sequence_id = 1;
  a.keys = rows.view();
  a.values = rows.view();
  a.first_position = kMax;  // last would be 2^63, wrapping to -2^63
  absl::Status st = core->Append(a);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  EXPECT_NE(st.message().find("first_position 9223372036854775807 + 2 rows overflows"),
            std::string::npos)
      << st;
  EXPECT_NE(st.message().find("<= 9223372036854775807"), std::string::npos) << st;
  a.first_position = -3;
  st = core->Append(a);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  EXPECT_NE(st.message().find("first_position -3 < 0"), std::string::npos) << st;
  auto held = core->HeldPositions(1, 0, 0);
  ASSERT_TRUE(held.ok());
  EXPECT_TRUE(held->empty());  // nothing applied
  // The last representable positions are fine, and the head then takes no more.
  a.first_position = kMax - 1;
  ASSERT_TRUE(core->Append(a).ok());
  held = core->HeldPositions(1, 0, 0);
  ASSERT_TRUE(held.ok());
  EXPECT_EQ(*held, (std::vector<int64_t>{kMax - 1, kMax}));
  a.keys = a.values = rows.view().rows_slice(0, 1);
  a.first_position = kMax;
  EXPECT_EQ(core->Append(a).code(), absl::StatusCode::kInvalidArgument);
  auto stats = core->Stats();
  ASSERT_TRUE(stats.ok());
  EXPECT_EQ(stats->tail_keys, 2);
}

TEST(NodePositionLimits, UploadPastInt64MaxIsRejectedNamingTheField) {
  auto core = NewCore();
  ASSERT_TRUE(core->CreateSequence(Spec(2, 1, 1, IndexType::kGraph)).ok());
  const Matrix keys = RandomMatrix(40, kDim, 5);
  ShardUpload up;
  up.key = ShardKey{2, 0, 0, 0};
  up.keys = keys.view();
  up.values = keys.view();
  up.first_position = kMax - 38;  // last would be kMax + 1
  absl::Status st = core->UploadShard(up);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  EXPECT_NE(st.message().find("first_position 9223372036854775769 + 40 rows overflows"),
            std::string::npos)
      << st;
  up.first_position = std::numeric_limits<int64_t>::min();
  st = core->UploadShard(up);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  EXPECT_EQ(core->MemoryUsedBytes(), 0);
  auto shards = core->ListShards(2);
  ASSERT_TRUE(shards.ok());
  EXPECT_TRUE(shards->empty());
  up.first_position = kMax - 39;  // exactly fits
  ASSERT_TRUE(core->UploadShard(up).ok());
  shards = core->ListShards(2);
  ASSERT_TRUE(shards.ok());
  ASSERT_EQ(shards->size(), 1u);
  EXPECT_EQ((*shards)[0].last_position, kMax);
}

TEST(NodeShapeLimits, HeadsPerSequenceAreCapped) {
  auto core = NewCore();
  const auto start = std::chrono::steady_clock::now();
  absl::Status st = core->CreateSequence(Spec(3, 4096, 4096, IndexType::kFlat));
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  EXPECT_NE(st.message().find("n_layers 4096 x n_kv_heads 4096 = 16777216 heads > 65536"),
            std::string::npos)
      << st;
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(), 0.1);
  // The cap itself is accepted.
  EXPECT_TRUE(core->CreateSequence(Spec(4, 256, 256, IndexType::kFlat)).ok());
}

}  // namespace
}  // namespace kvr::retrieval
