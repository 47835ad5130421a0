// SyncShards (node-to-node copy of a sequence's shards, issue 15):
//  in process (two NodeCores, NodeCoreSyncSource):
//  (a) an empty destination synced from a source holding uploaded graph and
//      IVF chunks plus appended tails (one sealed) answers Attend bit for bit
//      like the source, for every layer and every shard selection; ListShards
//      agree;
//  (b) a destination that missed the last appends copies only them
//      (keys_copied == the missing rows) and then agrees bit for bit;
//  (c) a destination holding rows the source lacks, other rows at the same
//      positions (CRC32C of the held prefix), or another chunk layout, has
//      the chunk (head) replaced;
//  (e) a memory budget too small for the declared payload is
//      RESOURCE_EXHAUSTED naming the budget; the destination then holds
//      nothing new and its memory accounting is back where it was;
//  (g) while a sync is stalled inside its source read, appends and attends
//      of other sequences (and attends of the synced one) on the destination
//      complete (bounded wait, no sleeps);
//  real kvr_node processes (gRPC SyncShards / ReadShards):
//  (a) over the wire, with the metrics counters for synced keys and bytes;
//  (d) a destination restarted on the same --data_dir still holds the synced
//      data (bit-identical Attend);
//  (f) an unreachable source is UNAVAILABLE within the deadline.
//
// Usage: node_sync_test --kvr_node PATH [gtest flags]
#include <signal.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <future>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "common/attention.h"
#include "common/tensor.h"
#include "gtest/gtest.h"
#include "retrieval_node/client/grpc_retrieval_client.h"
#include "retrieval_node/client/in_process_client.h"
#include "tests/support/metrics_page.h"
#include "tests/support/server_process.h"
#include "tests/support/temp_dir.h"
#include "tests/support/test_data.h"

namespace kvr::retrieval {
namespace {

using kvr::test_support::ExpectSamePartials;
using kvr::test_support::NodeProcess;
using kvr::test_support::RandomMatrix;

constexpr int kLayers = 2, kHeads = 4, kKvHeads = 2, kDim = 16;
constexpr int kChunks = 2, kChunkKeys = 200;
constexpr int kTailCapacity = 64;
constexpr int64_t kTailStart = int64_t{kChunks} * kChunkKeys;

SequenceSpec Spec(uint64_t id, IndexType index) {
  SequenceSpec spec;
  spec.sequence_id = id;
  spec.n_layers = kLayers;
  spec.n_heads = kHeads;
  spec.n_kv_heads = kKvHeads;
  spec.head_dim = kDim;
  spec.value_dtype = index == IndexType::kIvf ? DType::kBf16 : DType::kF32;
  spec.index_type = index;
  return spec;
}

// Creates sequence `id` and uploads its kChunks chunks per head.
void Upload(RetrievalClient* client, uint64_t id, IndexType index) {
  ASSERT_TRUE(client->CreateSequence(Spec(id, index)).ok());
  for (int layer = 0; layer < kLayers; ++layer) {
    for (int g = 0; g < kKvHeads; ++g) {
      for (int c = 0; c < kChunks; ++c) {
        const uint32_t seed = static_cast<uint32_t>(id * 1000 + layer * 100 + g * 10 + c);
        const Matrix keys = RandomMatrix(kChunkKeys, kDim, seed, 0.5f);
        const Matrix values = RandomMatrix(kChunkKeys, kDim, seed + 500);
        ShardUpload up;
        up.key = ShardKey{id, layer, g, c};
        up.first_position = int64_t{c} * kChunkKeys;
        up.keys = keys.view();
        up.values = values.view();
        const absl::Status st = client->UploadShard(up);
        ASSERT_TRUE(st.ok()) << st;
      }
    }
  }
}

// Appends positions [first, first + n) to every head (`salt` varies the rows).
void AppendRows(RetrievalClient* client, uint64_t id, int64_t first, int n, uint32_t salt = 0) {
  for (int layer = 0; layer < kLayers; ++layer) {
    for (int g = 0; g < kKvHeads; ++g) {
      const uint32_t seed =
          static_cast<uint32_t>(id * 7919 + layer * 101 + g * 13 + first + salt * 100003);
      const Matrix keys = RandomMatrix(n, kDim, seed, 1.0f);
      const Matrix values = RandomMatrix(n, kDim, seed + 1);
      AppendRequest a;
      a.sequence_id = id;
      a.layer = layer;
      a.kv_head = g;
      a.first_position = first;
      a.keys = keys.view();
      a.values = values.view();
      const absl::Status st = client->Append(a);
      ASSERT_TRUE(st.ok()) << st;
    }
  }
}

absl::StatusOr<Partials> AttendSel(RetrievalClient* client, uint64_t id, int layer,
                                   const std::vector<HeadChunkRef>& shards) {
  const Matrix q = RandomMatrix(kHeads, kDim, 4242 + layer, 0.5f);
  AttendRequest req;
  req.sequence_id = id;
  req.layer = layer;
  req.queries = q.view();
  req.k = 50;
  req.shards = shards;
  Partials out(kHeads, kDim);
  KVR_RETURN_IF_ERROR(client->Attend(req, out.view()));
  return out;
}

using Lister = std::function<absl::StatusOr<std::vector<ShardInfo>>(uint64_t)>;

// Attend on `a` and `b` agree bit for bit for every layer and selection
// (none, each chunk alone, each head's chunks), and their ListShards agree.
void ExpectSameNode(RetrievalClient* a, const Lister& list_a, RetrievalClient* b,
                    const Lister& list_b, uint64_t id) {
  auto sa = list_a(id);
  auto sb = list_b(id);
  ASSERT_TRUE(sa.ok() && sb.ok()) << sa.status() << sb.status();
  ASSERT_EQ(sa->size(), sb->size());
  for (size_t i = 0; i < sa->size(); ++i) {
    const ShardInfo &x = (*sa)[i], &y = (*sb)[i];
    EXPECT_EQ(x.key, y.key);
    EXPECT_EQ(x.n_keys, y.n_keys) << x.key.DebugString();
    EXPECT_EQ(x.tail_keys, y.tail_keys) << x.key.DebugString();
    EXPECT_EQ(x.first_position, y.first_position) << x.key.DebugString();
    EXPECT_EQ(x.last_position, y.last_position) << x.key.DebugString();
    EXPECT_EQ(x.index_type, y.index_type) << x.key.DebugString();
  }
  for (int layer = 0; layer < kLayers; ++layer) {
    std::vector<std::vector<HeadChunkRef>> selections = {{}};
    for (int g = 0; g < kKvHeads; ++g) {
      std::vector<HeadChunkRef> head;
      for (const ShardInfo& s : *sa) {
        if (s.key.layer != layer || s.key.kv_head != g) continue;
        selections.push_back({{g, s.key.chunk}});
        head.push_back({g, s.key.chunk});
      }
      selections.push_back(head);
    }
    for (const auto& sel : selections) {
      auto pa = AttendSel(a, id, layer, sel);
      auto pb = AttendSel(b, id, layer, sel);
      ASSERT_TRUE(pa.ok() && pb.ok()) << pa.status() << pb.status();
      ExpectSamePartials(*pa, *pb, "layer " + std::to_string(layer) + " selection of " +
                                       std::to_string(sel.size()));
    }
  }
}

std::unique_ptr<InProcessRetrievalClient> InProcess(int64_t budget = 0) {
  NodeCoreOptions o;
  o.threads = 2;
  o.tail_capacity = kTailCapacity;
  o.memory_budget_bytes = budget;
  auto c = InProcessRetrievalClient::Create(o);
  EXPECT_TRUE(c.ok()) << c.status();
  return std::move(c).value();
}

Lister ListOf(InProcessRetrievalClient* c) {
  return [c](uint64_t id) { return c->core().ListShards(id); };
}

absl::StatusOr<SyncResult> SyncInProcess(InProcessRetrievalClient* dst,
                                         InProcessRetrievalClient* src, uint64_t id,
                                         IndexType index, std::vector<ShardRef> shards = {}) {
  NodeCoreSyncSource source(&src->core());
  SyncRequest req;
  req.spec = Spec(id, index);
  req.source_address = "in-process";
  req.shards = std::move(shards);
  return dst->core().SyncShards(req, &source);
}

constexpr uint64_t kGraphSeq = 51, kIvfSeq = 52;

// The same graph sequence's uploads (no appends) on two nodes.
void UploadBoth(InProcessRetrievalClient* a, InProcessRetrievalClient* b) {
  for (RetrievalClient* c : {a, b}) {
    ASSERT_NO_FATAL_FAILURE(Upload(c, kGraphSeq, IndexType::kGraph));
  }
}

// Source: graph + IVF sequences, each with 100 appended rows per head (one
// seal into the last chunk, 36 in the tail).
void LoadSource(RetrievalClient* src) {
  for (auto [id, type] : {std::pair{kGraphSeq, IndexType::kGraph},
                          std::pair{kIvfSeq, IndexType::kIvf}}) {
    ASSERT_NO_FATAL_FAILURE(Upload(src, id, type));
    ASSERT_NO_FATAL_FAILURE(AppendRows(src, id, kTailStart, 100));
  }
}

TEST(NodeSyncTest, EmptyDestinationBecomesIdenticalToTheSource) {
  auto src = InProcess();
  auto dst = InProcess();
  ASSERT_NO_FATAL_FAILURE(LoadSource(src.get()));
  for (auto [id, type] : {std::pair{kGraphSeq, IndexType::kGraph},
                          std::pair{kIvfSeq, IndexType::kIvf}}) {
    auto r = SyncInProcess(dst.get(), src.get(), id, type);
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->keys_copied, int64_t{kLayers} * kKvHeads * (kChunks * kChunkKeys + 100));
    EXPECT_GT(r->bytes_copied, r->keys_copied * kDim * 2);
    ASSERT_EQ(r->last_positions.size(), size_t{kLayers * kKvHeads});
    for (int64_t p : r->last_positions) EXPECT_EQ(p, kTailStart + 99);
    ExpectSameNode(src.get(), ListOf(src.get()), dst.get(), ListOf(dst.get()), id);
    // A second sync finds nothing to copy.
    auto again = SyncInProcess(dst.get(), src.get(), id, type);
    ASSERT_TRUE(again.ok()) << again.status();
    EXPECT_EQ(again->keys_copied, 0);
  }
  // What the destination accounts is what it holds: about the source's
  // (which has more vector slack from its appends), never both the old and
  // the new heads.
  const int64_t used = dst->core().MemoryUsedBytes(), src_used = src->core().MemoryUsedBytes();
  EXPECT_GT(used, src_used / 2);
  EXPECT_LE(used, src_used + src_used / 10);
}

TEST(NodeSyncTest, DestinationThatMissedAppendsCopiesOnlyTheDelta) {
  auto src = InProcess();
  auto dst = InProcess();
  ASSERT_NO_FATAL_FAILURE(UploadBoth(src.get(), dst.get()));
  for (RetrievalClient* c : {src.get(), dst.get()}) {
    ASSERT_NO_FATAL_FAILURE(AppendRows(c, kGraphSeq, kTailStart, 40));
  }
  // The destination misses 50 rows per head (the source seals its tail).
  ASSERT_NO_FATAL_FAILURE(AppendRows(src.get(), kGraphSeq, kTailStart + 40, 50));
  auto r = SyncInProcess(dst.get(), src.get(), kGraphSeq, IndexType::kGraph);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->keys_copied, int64_t{kLayers} * kKvHeads * 50);
  for (int64_t p : r->last_positions) EXPECT_EQ(p, kTailStart + 89);
  ExpectSameNode(src.get(), ListOf(src.get()), dst.get(), ListOf(dst.get()), kGraphSeq);
  // Then 10 more rows that stay in the source's tail: only they travel.
  ASSERT_NO_FATAL_FAILURE(AppendRows(src.get(), kGraphSeq, kTailStart + 90, 10));
  auto r2 = SyncInProcess(dst.get(), src.get(), kGraphSeq, IndexType::kGraph);
  ASSERT_TRUE(r2.ok()) << r2.status();
  EXPECT_EQ(r2->keys_copied, int64_t{kLayers} * kKvHeads * 10);
  // No index blob travelled: per head every row's position, and values +
  // keys of the 10 new rows.
  EXPECT_EQ(r2->bytes_copied, int64_t{kLayers} * kKvHeads *
                                  (10 * int64_t{kDim * 4 + kDim * 4} +
                                   (kChunkKeys + 90 + 10) * 8 + kChunkKeys * 8));
  ExpectSameNode(src.get(), ListOf(src.get()), dst.get(), ListOf(dst.get()), kGraphSeq);
}

TEST(NodeSyncTest, DivergingDestinationRowsAreReplaced) {
  auto src = InProcess();
  auto dst = InProcess();
  ASSERT_NO_FATAL_FAILURE(UploadBoth(src.get(), dst.get()));
  // The destination holds 20 rows (other data) where the source has 10.
  ASSERT_NO_FATAL_FAILURE(AppendRows(dst.get(), kGraphSeq, kTailStart, 20, /*salt=*/9));
  ASSERT_NO_FATAL_FAILURE(AppendRows(src.get(), kGraphSeq, kTailStart, 10));
  auto r = SyncInProcess(dst.get(), src.get(), kGraphSeq, IndexType::kGraph);
  ASSERT_TRUE(r.ok()) << r.status();
  for (int64_t p : r->last_positions) EXPECT_EQ(p, kTailStart + 9);
  // The last chunk of every head came again whole.
  EXPECT_EQ(r->keys_copied, int64_t{kLayers} * kKvHeads * (kChunkKeys + 10));
  ExpectSameNode(src.get(), ListOf(src.get()), dst.get(), ListOf(dst.get()), kGraphSeq);
  auto held = dst->core().HeldPositions(kGraphSeq, 1, 1);
  ASSERT_TRUE(held.ok());
  EXPECT_EQ(held->size(), size_t{kChunks * kChunkKeys + 10});
  EXPECT_EQ(held->back(), kTailStart + 9);
}

TEST(NodeSyncTest, SamePositionsWithOtherContentsAreReplaced) {
  auto src = InProcess();
  auto dst = InProcess();
  ASSERT_NO_FATAL_FAILURE(UploadBoth(src.get(), dst.get()));
  // Positions 400..409 here hold other rows than the source's 400..429.
  ASSERT_NO_FATAL_FAILURE(AppendRows(dst.get(), kGraphSeq, kTailStart, 10, /*salt=*/5));
  ASSERT_NO_FATAL_FAILURE(AppendRows(src.get(), kGraphSeq, kTailStart, 30));
  auto r = SyncInProcess(dst.get(), src.get(), kGraphSeq, IndexType::kGraph);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->keys_copied, int64_t{kLayers} * kKvHeads * (kChunkKeys + 30));
  ExpectSameNode(src.get(), ListOf(src.get()), dst.get(), ListOf(dst.get()), kGraphSeq);
}

TEST(NodeSyncTest, AnotherChunkLayoutIsReplaced) {
  auto src = InProcess();
  auto dst = InProcess();
  ASSERT_NO_FATAL_FAILURE(Upload(dst.get(), kGraphSeq, IndexType::kGraph));  // chunks 0, 1
  // The source holds the same positions as ONE chunk (and a tail).
  ASSERT_TRUE(src->CreateSequence(Spec(kGraphSeq, IndexType::kGraph)).ok());
  for (int layer = 0; layer < kLayers; ++layer) {
    for (int g = 0; g < kKvHeads; ++g) {
      const Matrix keys = RandomMatrix(kTailStart, kDim, 99 + layer * 10 + g, 0.5f);
      const Matrix values = RandomMatrix(kTailStart, kDim, 199 + layer * 10 + g);
      ShardUpload up;
      up.key = ShardKey{kGraphSeq, layer, g, 0};
      up.keys = keys.view();
      up.values = values.view();
      ASSERT_TRUE(src->UploadShard(up).ok());
    }
  }
  ASSERT_NO_FATAL_FAILURE(AppendRows(src.get(), kGraphSeq, kTailStart, 10));
  auto r = SyncInProcess(dst.get(), src.get(), kGraphSeq, IndexType::kGraph);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->keys_copied, int64_t{kLayers} * kKvHeads * (kTailStart + 10));
  ExpectSameNode(src.get(), ListOf(src.get()), dst.get(), ListOf(dst.get()), kGraphSeq);
  auto listed = dst->core().ListShards(kGraphSeq);
  ASSERT_TRUE(listed.ok());
  EXPECT_EQ(listed->size(), size_t{kLayers * kKvHeads});  // chunk 1 is gone
}

TEST(NodeSyncTest, BudgetTooSmallIsResourceExhaustedAndChangesNothing) {
  auto src = InProcess();
  ASSERT_NO_FATAL_FAILURE(LoadSource(src.get()));
  // Room for the IVF sequence, not for the graph one as well.
  auto probe = InProcess();
  ASSERT_TRUE(SyncInProcess(probe.get(), src.get(), kIvfSeq, IndexType::kIvf).ok());
  const int64_t one = probe->core().MemoryUsedBytes();
  auto dst = InProcess(one + one / 2);
  ASSERT_TRUE(SyncInProcess(dst.get(), src.get(), kIvfSeq, IndexType::kIvf).ok());
  const int64_t before = dst->core().MemoryUsedBytes();
  auto r = SyncInProcess(dst.get(), src.get(), kGraphSeq, IndexType::kGraph);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted) << r.status();
  EXPECT_NE(r.status().message().find("memory_budget_bytes"), std::string::npos) << r.status();
  EXPECT_NE(r.status().message().find("SyncShards of sequence 51"), std::string::npos);
  EXPECT_EQ(dst->core().MemoryUsedBytes(), before);
  EXPECT_EQ(dst->core().ListShards(kGraphSeq).status().code(), absl::StatusCode::kNotFound);
  auto st = dst->Stats();
  ASSERT_TRUE(st.ok());
  EXPECT_EQ(st->sequences, 1);
}

// A SyncSource that parks inside Read until released.
class GatedSource final : public SyncSource {
 public:
  explicit GatedSource(NodeCore* core) : inner_(core) {}
  absl::Status Read(const ReadShardsQuery& query,
                    const std::function<absl::Status(const SyncHeader&)>& on_header,
                    const std::function<absl::Status(SyncChunkData)>& on_chunk) override {
    {
      std::unique_lock<std::mutex> lock(mu_);
      entered_ = true;
      cv_.notify_all();
      cv_.wait(lock, [&] { return open_; });
    }
    return inner_.Read(query, on_header, on_chunk);
  }
  bool WaitEntered(std::chrono::seconds timeout) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, timeout, [&] { return entered_; });
  }
  void Open() {
    std::lock_guard<std::mutex> lock(mu_);
    open_ = true;
    cv_.notify_all();
  }

 private:
  NodeCoreSyncSource inner_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool entered_ = false, open_ = false;
};

TEST(NodeSyncTest, StalledSyncBlocksNoOtherWork) {
  auto src = InProcess();
  auto dst = InProcess();
  ASSERT_NO_FATAL_FAILURE(Upload(src.get(), kGraphSeq, IndexType::kGraph));
  ASSERT_NO_FATAL_FAILURE(AppendRows(src.get(), kGraphSeq, kTailStart, 30));
  // The destination holds a prefix of the synced sequence and another one.
  ASSERT_NO_FATAL_FAILURE(Upload(dst.get(), kGraphSeq, IndexType::kGraph));
  ASSERT_NO_FATAL_FAILURE(Upload(dst.get(), kIvfSeq, IndexType::kIvf));
  GatedSource gate(&src->core());
  auto sync = std::async(std::launch::async, [&] {
    SyncRequest req;
    req.spec = Spec(kGraphSeq, IndexType::kGraph);
    return dst->core().SyncShards(req, &gate);
  });
  ASSERT_TRUE(gate.WaitEntered(std::chrono::seconds(30)));
  // Bounded: each of these must finish while the sync is parked.
  auto work = std::async(std::launch::async, [&] {
    AppendRows(dst.get(), kIvfSeq, kTailStart, 100);
    for (int layer = 0; layer < kLayers; ++layer) {
      EXPECT_TRUE(AttendSel(dst.get(), kIvfSeq, layer, {}).ok());
      EXPECT_TRUE(AttendSel(dst.get(), kGraphSeq, layer, {}).ok());
    }
  });
  const bool finished = work.wait_for(std::chrono::seconds(30)) == std::future_status::ready;
  gate.Open();
  EXPECT_TRUE(finished) << "work on the destination waited for a stalled sync";
  auto r = sync.get();
  work.wait();
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->keys_copied, int64_t{kLayers} * kKvHeads * 30);
  ExpectSameNode(src.get(), ListOf(src.get()), dst.get(), ListOf(dst.get()), kGraphSeq);
}

// --- real kvr_node processes -------------------------------------------------------

std::vector<std::string> NodeArgs(std::vector<std::string> extra = {}) {
  // Synchronous builds: a sync copies the source's built indexes.
  std::vector<std::string> args = {"--threads=2", "--control_threads=2",
                                   "--tail_capacity=" + std::to_string(kTailCapacity),
                                   "--defer_index_build=false"};
  args.insert(args.end(), extra.begin(), extra.end());
  return args;
}

std::unique_ptr<GrpcRetrievalClient> Connect(const std::string& address,
                                             GrpcClientOptions options = {}) {
  auto c = GrpcRetrievalClient::Create(address, options);
  EXPECT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE((*c)->WaitForReady(absl::Seconds(10)).ok());
  return std::move(c).value();
}

Lister ListOf(GrpcRetrievalClient* c) {
  return [c](uint64_t id) { return c->ListShards(id); };
}

kvr::test_support::Samples Scrape(const NodeProcess& node) {
  auto page = kvr::test_support::HttpGetMetrics(node.metrics_address());
  EXPECT_TRUE(page.has_value());
  return kvr::test_support::ParseExposition(page.value_or(""));
}

TEST(NodeSyncRpcTest, SyncOverGrpcMakesTheDestinationIdenticalAndCountsIt) {
  auto src_node = NodeProcess::Start(NodeArgs());
  auto dst_node = NodeProcess::Start(NodeArgs());
  ASSERT_TRUE(src_node != nullptr && dst_node != nullptr);
  auto src = Connect(src_node->address());
  auto dst = Connect(dst_node->address());
  ASSERT_NO_FATAL_FAILURE(LoadSource(src.get()));
  int64_t keys = 0, bytes = 0;
  for (auto [id, type] : {std::pair{kGraphSeq, IndexType::kGraph},
                          std::pair{kIvfSeq, IndexType::kIvf}}) {
    SyncRequest req;
    req.spec = Spec(id, type);
    req.source_address = src_node->address();
    auto r = dst->SyncShards(req);
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->keys_copied, int64_t{kLayers} * kKvHeads * (kChunks * kChunkKeys + 100));
    for (int64_t p : r->last_positions) EXPECT_EQ(p, kTailStart + 99);
    keys += r->keys_copied;
    bytes += r->bytes_copied;
    ExpectSameNode(src.get(), ListOf(src.get()), dst.get(), ListOf(dst.get()), id);
  }
  // A selection: only chunk 1 of (layer 1, kv head 0) of a third sequence.
  constexpr uint64_t kPartSeq = 53;
  ASSERT_NO_FATAL_FAILURE(Upload(src.get(), kPartSeq, IndexType::kFlat));
  SyncRequest part;
  part.spec = Spec(kPartSeq, IndexType::kFlat);
  part.source_address = src_node->address();
  part.shards = {{1, 0, 1}};
  auto r = dst->SyncShards(part);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->keys_copied, kChunkKeys);
  auto listed = dst->ListShards(kPartSeq);
  ASSERT_TRUE(listed.ok());
  ASSERT_EQ(listed->size(), 1u);
  EXPECT_EQ((*listed)[0].key, (ShardKey{kPartSeq, 1, 0, 1}));
  auto a = AttendSel(src.get(), kPartSeq, 1, {{0, 1}});
  auto b = AttendSel(dst.get(), kPartSeq, 1, {});
  ASSERT_TRUE(a.ok() && b.ok());
  ExpectSamePartials(*a, *b, "one synced shard");
  keys += r->keys_copied;
  bytes += r->bytes_copied;
  // Listing a shard the source lacks: NOT_FOUND naming it, nothing created.
  part.spec.sequence_id = kPartSeq;
  part.shards = {{1, 0, 7}};
  auto missing = dst->SyncShards(part);
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound) << missing.status();
  EXPECT_NE(missing.status().message().find("chunk 7"), std::string::npos) << missing.status();

  const auto dst_m = Scrape(*dst_node);
  const auto src_m = Scrape(*src_node);
  using kvr::test_support::Get;
  EXPECT_EQ(Get(dst_m, "kvr_node_sync_keys_received_total"), static_cast<double>(keys));
  EXPECT_EQ(Get(dst_m, "kvr_node_sync_received_bytes_total"), static_cast<double>(bytes));
  EXPECT_EQ(Get(src_m, "kvr_node_sync_keys_sent_total"), static_cast<double>(keys));
  EXPECT_EQ(Get(src_m, "kvr_node_sync_sent_bytes_total"), static_cast<double>(bytes));
  EXPECT_EQ(Get(dst_m, "kvr_node_requests_total", {{"method", "SyncShards"}, {"code", "OK"}}), 3);
  EXPECT_EQ(Get(dst_m, "kvr_node_requests_total", {{"method", "SyncShards"}, {"code", "NOT_FOUND"}}), 1);
}

TEST(NodeSyncRpcTest, RestartedDestinationStillHoldsTheSyncedData) {
  kvr::test_support::TempDir dir("kvr_node_sync");
  ASSERT_FALSE(dir.path().empty());
  auto src_node = NodeProcess::Start(NodeArgs({"--metrics_listen="}));
  auto dst_node = NodeProcess::Start(NodeArgs({"--metrics_listen=", "--data_dir=" + dir.path()}));
  ASSERT_TRUE(src_node != nullptr && dst_node != nullptr);
  auto src = Connect(src_node->address());
  {
    auto dst = Connect(dst_node->address());
    // The destination held a prefix (persisted), then catches up and a
    // diverging head is replaced: both kinds of install must persist.
    ASSERT_NO_FATAL_FAILURE(Upload(src.get(), kGraphSeq, IndexType::kGraph));
    ASSERT_NO_FATAL_FAILURE(Upload(dst.get(), kGraphSeq, IndexType::kGraph));
    ASSERT_NO_FATAL_FAILURE(AppendRows(dst.get(), kGraphSeq, kTailStart, 20, /*salt=*/3));
    ASSERT_NO_FATAL_FAILURE(AppendRows(src.get(), kGraphSeq, kTailStart, 100));
    ASSERT_NO_FATAL_FAILURE(Upload(src.get(), kIvfSeq, IndexType::kIvf));
    ASSERT_NO_FATAL_FAILURE(AppendRows(src.get(), kIvfSeq, kTailStart, 30));
    for (auto [id, type] : {std::pair{kGraphSeq, IndexType::kGraph},
                            std::pair{kIvfSeq, IndexType::kIvf}}) {
      SyncRequest req;
      req.spec = Spec(id, type);
      req.source_address = src_node->address();
      auto r = dst->SyncShards(req);
      ASSERT_TRUE(r.ok()) << r.status();
      ExpectSameNode(src.get(), ListOf(src.get()), dst.get(), ListOf(dst.get()), id);
    }
    // A catch-up of rows that stay in the tail (appended in place, only
    // they persisted).
    ASSERT_NO_FATAL_FAILURE(AppendRows(src.get(), kGraphSeq, kTailStart + 100, 5));
    SyncRequest req;
    req.spec = Spec(kGraphSeq, IndexType::kGraph);
    req.source_address = src_node->address();
    auto r = dst->SyncShards(req);
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->keys_copied, int64_t{kLayers} * kKvHeads * 5);
    for (int64_t p : r->last_positions) EXPECT_EQ(p, kTailStart + 104);
  }
  ASSERT_TRUE(dst_node->Stop(SIGTERM).has_value());
  dst_node = NodeProcess::Start(NodeArgs({"--metrics_listen=", "--data_dir=" + dir.path()}));
  ASSERT_NE(dst_node, nullptr);
  auto dst = Connect(dst_node->address());
  for (uint64_t id : {kGraphSeq, kIvfSeq}) {
    ExpectSameNode(src.get(), ListOf(src.get()), dst.get(), ListOf(dst.get()), id);
  }
  // And it goes on from there: appends after the restart apply in order.
  ASSERT_NO_FATAL_FAILURE(AppendRows(src.get(), kIvfSeq, kTailStart + 30, 5));
  ASSERT_NO_FATAL_FAILURE(AppendRows(dst.get(), kIvfSeq, kTailStart + 30, 5));
  ExpectSameNode(src.get(), ListOf(src.get()), dst.get(), ListOf(dst.get()), kIvfSeq);
}

TEST(NodeSyncRpcTest, UnreachableSourceIsUnavailableWithinTheDeadline) {
  auto dst_node = NodeProcess::Start(NodeArgs({"--metrics_listen="}));
  ASSERT_NE(dst_node, nullptr);
  GrpcClientOptions options;
  options.sync_timeout = absl::Seconds(5);
  auto dst = Connect(dst_node->address(), options);
  // A port nothing listens on: a node that just stopped.
  std::string gone;
  {
    auto tmp = NodeProcess::Start(NodeArgs({"--metrics_listen="}));
    ASSERT_NE(tmp, nullptr);
    gone = tmp->address();
    ASSERT_TRUE(tmp->Stop(SIGTERM).has_value());
  }
  SyncRequest req;
  req.spec = Spec(kGraphSeq, IndexType::kGraph);
  req.source_address = gone;
  const auto start = std::chrono::steady_clock::now();
  auto r = dst->SyncShards(req);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable) << r.status();
  EXPECT_NE(r.status().message().find("ReadShards from " + gone), std::string::npos)
      << r.status();
  EXPECT_LT(seconds, 5.0);
  // Nothing was created on the destination.
  EXPECT_EQ(dst->ListShards(kGraphSeq).status().code(), absl::StatusCode::kNotFound);
  // A source that hangs (SIGSTOP) ends at the deadline, not later.
  auto hung = NodeProcess::Start(NodeArgs({"--metrics_listen="}));
  ASSERT_NE(hung, nullptr);
  {
    auto h = Connect(hung->address());
    ASSERT_NO_FATAL_FAILURE(Upload(h.get(), kGraphSeq, IndexType::kGraph));
  }
  ASSERT_TRUE(kvr::test_support::StopProcess(hung->pid()));
  options.sync_timeout = absl::Seconds(2);
  auto dst2 = Connect(dst_node->address(), options);
  req.source_address = hung->address();
  const auto start2 = std::chrono::steady_clock::now();
  auto r2 = dst2->SyncShards(req);
  const double seconds2 =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start2).count();
  EXPECT_EQ(r2.status().code(), absl::StatusCode::kDeadlineExceeded) << r2.status();
  EXPECT_LT(seconds2, 4.0);
  kill(hung->pid(), SIGCONT);
  EXPECT_EQ(dst->ListShards(kGraphSeq).status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace kvr::retrieval

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  if (!kvr::test_support::ParseNodeBinaryFlag(argc, argv)) return 2;
  return RUN_ALL_TESTS();
}
