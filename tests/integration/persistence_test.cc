// Persistence of the retrieval node (kvr_node --data_dir, RocksDB):
//
//  * in process: a node over a ShardStore, reopened and recovered, equals the
//    original bit for bit; a failed commit makes the node refuse writes;
//    concurrent AppendAsync streams are group-committed and recover exactly,
//    and a drop queued behind appends stays dropped;
//  * SIGKILL while four clients stream appends: after restart every
//    acknowledged append is held, at most the one in-flight append per head
//    more, never part of one; shards and Attend (flat, k = all) equal an
//    in-process node given exactly the held appends; three kill rounds on one
//    data dir;
//  * SIGTERM then restart: identical Attend partials (graph, IVF, flat),
//    shards and positions; a dropped sequence stays dropped;
//  * a flipped byte in an index blob, a value segment or a tail segment
//    (written through RocksDB directly) makes startup with
//    --recovery_quarantine=false fail with a message naming the shard.
// No sleeps: processes are awaited with poll() on pipes and pidfds, clients
// with a condition variable.
//
// Usage: persistence_test --kvr_node PATH [gtest flags]
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <filesystem>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "tests/support/temp_dir.h"
#include "tests/support/server_process.h"
#include "tests/support/test_data.h"
#include "common/attention.h"
#include "common/tensor.h"
#include "gtest/gtest.h"
#include "retrieval_node/client/grpc_retrieval_client.h"
#include "retrieval_node/client/in_process_client.h"
#include "retrieval_node/store/shard_store.h"
#include "rocksdb/db.h"
#include "rocksdb/options.h"

namespace kvr::retrieval {
namespace {

// A fresh directory for one test, removed with its contents.
class TempDir : public test_support::TempDir {
 public:
  TempDir() : test_support::TempDir("kvr_persistence") {}
};

using kvr::test_support::NodeProcess;
using kvr::test_support::RandomMatrix;
using kvr::test_support::ExactTopKIds;
using kvr::test_support::ExpectSamePartials;

struct FailedStart {
  int wait_status = 0;
  std::string output;  // stdout and stderr
};

// Runs a node that must fail at startup; nullopt (with a test failure) when
// it starts serving or does not exit in time.
std::optional<FailedStart> RunExpectingStartupFailure(const std::vector<std::string>& args) {
  std::vector<std::string> argv = {kvr::test_support::NodeBinary(), "--listen=127.0.0.1:0"};
  argv.insert(argv.end(), args.begin(), args.end());
  auto proc = Subprocess::Start(std::move(argv), /*merge_stderr=*/true);
  if (!proc.ok()) {
    ADD_FAILURE() << proc.status();
    return std::nullopt;
  }
  const auto listening = (*proc)->WaitForLine("kvr_node listening on ", absl::Seconds(60));
  if (listening.ok() || !absl::IsFailedPrecondition(listening.status())) {
    ADD_FAILURE() << "kvr_node did not fail at startup (" << listening.status()
                  << "); output:\n"
                  << (*proc)->Output();
    return std::nullopt;
  }
  auto status = (*proc)->Stop(0, absl::Seconds(30));
  if (!status.ok()) {
    ADD_FAILURE() << status.status();
    return std::nullopt;
  }
  FailedStart result;
  result.output = (*proc)->Output();
  result.wait_status = *status;
  return result;
}void ExpectSameShards(const std::vector<ShardInfo>& a, const std::vector<ShardInfo>& b,
                      const std::string& what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_TRUE(a[i].key == b[i].key) << what << ": " << a[i].key.DebugString() << " vs "
                                      << b[i].key.DebugString();
    EXPECT_EQ(a[i].n_keys, b[i].n_keys) << what << " " << a[i].key.DebugString();
    EXPECT_EQ(a[i].tail_keys, b[i].tail_keys) << what << " " << a[i].key.DebugString();
    EXPECT_EQ(a[i].first_position, b[i].first_position) << what << " " << a[i].key.DebugString();
    EXPECT_EQ(a[i].last_position, b[i].last_position) << what << " " << a[i].key.DebugString();
    EXPECT_EQ(a[i].index_type, b[i].index_type) << what << " " << a[i].key.DebugString();
  }
}

// Node flags and the matching in-process options (identical state).
constexpr int kNodeThreads = 2;
constexpr int kTailCapacity = 16;
constexpr int kTrainK = 32;

std::vector<std::string> NodeArgs(const std::string& data_dir) {
  // Synchronous builds, as the in-process reference (CoreOptions) builds.
  return {"--threads=" + std::to_string(kNodeThreads), "--control_threads=4",
          "--tail_capacity=" + std::to_string(kTailCapacity),
          "--train_k=" + std::to_string(kTrainK), "--data_dir=" + data_dir,
          "--defer_index_build=false"};
}

NodeCoreOptions CoreOptions(ShardPersistence* persistence = nullptr) {
  NodeCoreOptions o;
  o.threads = kNodeThreads;
  o.tail_capacity = kTailCapacity;
  o.train_k = kTrainK;
  o.persistence = persistence;
  return o;
}

std::unique_ptr<InProcessRetrievalClient> NewNode(ShardPersistence* persistence = nullptr) {
  auto node = InProcessRetrievalClient::Create(CoreOptions(persistence));
  EXPECT_TRUE(node.ok()) << node.status();
  return node.ok() ? std::move(node).value() : nullptr;
}

std::unique_ptr<GrpcRetrievalClient> Connect(const std::string& address) {
  auto client = GrpcRetrievalClient::Create(address, {});
  EXPECT_TRUE(client.ok()) << client.status();
  return client.ok() ? std::move(client).value() : nullptr;
}

SequenceSpec Spec(uint64_t id, int layers, int heads, int kv_heads, int dim, DType dtype,
                  IndexType index) {
  SequenceSpec s;
  s.sequence_id = id;
  s.n_layers = layers;
  s.n_heads = heads;
  s.n_kv_heads = kv_heads;
  s.head_dim = dim;
  s.value_dtype = dtype;
  s.index_type = index;
  return s;
}

// Attend of `queries` on `node` (k, beam) into a fresh Partials.
absl::StatusOr<Partials> AttendOn(RetrievalClient* node, const SequenceSpec& spec, int layer,
                                  const Matrix& queries, int k, int beam) {
  AttendRequest req;
  req.sequence_id = spec.sequence_id;
  req.layer = layer;
  req.queries = queries.view();
  req.k = k;
  req.beam = beam;
  Partials out(static_cast<size_t>(spec.n_heads), static_cast<size_t>(spec.head_dim));
  KVR_RETURN_IF_ERROR(node->Attend(req, out.view()));
  return out;
}

// --- a mixed workload (graph, IVF, flat; uploads and appends with seals) --------------

constexpr int kLayers = 2, kHeads = 4, kKvHeads = 2, kDim = 16;

std::vector<SequenceSpec> MixedSpecs() {
  return {Spec(11, kLayers, kHeads, kKvHeads, kDim, DType::kBf16, IndexType::kGraph),
          Spec(12, kLayers, kHeads, kKvHeads, kDim, DType::kF32, IndexType::kIvf),
          Spec(13, kLayers, kHeads, kKvHeads, kDim, DType::kF16, IndexType::kFlat)};
}

// Loads `spec` into `node`: (layer 1, kv head 1) only by appends (chunk 0 is
// created by the first append, indexed flat at the first seal and rebuilt as
// the sequence's index at min_index_keys), every other head by two uploaded
// chunks (prefill top-k, then training queries) and 41 appended rows (two
// seals and a tail of 9). Attends in between feed the recent-query ring.
void LoadMixed(RetrievalClient* node, const SequenceSpec& spec) {
  ASSERT_TRUE(node->CreateSequence(spec).ok());
  const uint32_t seed = static_cast<uint32_t>(spec.sequence_id) * 1000;
  for (int layer = 0; layer < kLayers; ++layer) {
    for (int g = 0; g < kKvHeads; ++g) {
      const uint32_t s = seed + 100 * layer + 10 * g;
      int64_t next = 0;
      const bool appends_only = layer == 1 && g == 1;
      if (!appends_only) {
        for (int c = 0; c < 2; ++c) {
          const Matrix keys = RandomMatrix(120, kDim, s + c, 1.5f);
          const Matrix values = RandomMatrix(120, kDim, s + c + 5);
          const Matrix train_q = RandomMatrix(24, kDim, s + c + 7, -1.0f);
          std::vector<int64_t> topk;
          ShardUpload up;
          up.key = ShardKey{spec.sequence_id, layer, g, c};
          up.first_position = next;
          up.keys = keys.view();
          up.values = values.view();
          if (c == 0) {
            topk = ExactTopKIds(train_q, keys, 8);
            up.train_topk = topk;
            up.train_topk_width = 8;
          } else {
            up.train_queries = train_q.view();
            up.train_k = 12;
          }
          const absl::Status st = node->UploadShard(up);
          ASSERT_TRUE(st.ok()) << st;
          next += 120 + 3;  // a gap: positions need only increase
        }
      }
      const int rows = appends_only ? 70 : 41;
      const Matrix keys = RandomMatrix(rows, kDim, s + 50, 1.5f);
      const Matrix values = RandomMatrix(rows, kDim, s + 51);
      for (int b = 0; b < rows; b += 5) {
        const int n = std::min(5, rows - b);
        AppendRequest a;
        a.sequence_id = spec.sequence_id;
        a.layer = layer;
        a.kv_head = g;
        a.first_position = next + b;
        a.keys = keys.view().rows_slice(b, n);
        a.values = values.view().rows_slice(b, n);
        const absl::Status st = node->Append(a);
        ASSERT_TRUE(st.ok()) << st;
        if (b % 20 == 0) {
          const Matrix q = RandomMatrix(kHeads, kDim, s + 60 + b, -0.5f);
          ASSERT_TRUE(AttendOn(node, spec, layer, q, 8, 0).ok());
        }
      }
    }
  }
}

// Attend partials of every layer of `spec` for a fixed set of queries and
// search settings, in a fixed order.
std::vector<Partials> Snapshot(RetrievalClient* node, const SequenceSpec& spec) {
  std::vector<Partials> out;
  for (int layer = 0; layer < spec.n_layers; ++layer) {
    for (int step = 0; step < 2; ++step) {
      const Matrix q = RandomMatrix(kHeads, kDim, 77 + 10 * layer + step, -0.5f);
      for (const auto& [k, beam] : {std::pair{8, 0}, std::pair{64, 96}, std::pair{4096, 0}}) {
        absl::StatusOr<Partials> p = AttendOn(node, spec, layer, q, k, beam);
        EXPECT_TRUE(p.ok()) << p.status();
        if (p.ok()) out.push_back(std::move(p).value());
      }
    }
  }
  return out;
}

void ExpectSameSnapshots(const std::vector<Partials>& a, const std::vector<Partials>& b,
                         const std::string& what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  for (size_t i = 0; i < a.size(); ++i) ExpectSamePartials(a[i], b[i], what + " #" + std::to_string(i));
}

// --- in process ------------------------------------------------------------------------

TEST(ShardStoreTest, RecoveredNodeEqualsTheOriginal) {
  TempDir dir;
  ASSERT_FALSE(dir.path().empty());
  std::vector<std::vector<Partials>> before;
  std::vector<std::vector<ShardInfo>> shards_before;
  std::vector<std::vector<int64_t>> positions_before;
  {
    auto store = ShardStore::Open(dir.path());
    ASSERT_TRUE(store.ok()) << store.status();
    auto node = NewNode(store->get());
    for (const SequenceSpec& spec : MixedSpecs()) {
      ASSERT_NO_FATAL_FAILURE(LoadMixed(node.get(), spec));
      before.push_back(Snapshot(node.get(), spec));
      auto shards = node->core().ListShards(spec.sequence_id);
      ASSERT_TRUE(shards.ok());
      shards_before.push_back(*shards);
      for (int layer = 0; layer < kLayers; ++layer) {
        for (int g = 0; g < kKvHeads; ++g) {
          positions_before.push_back(*node->core().HeldPositions(spec.sequence_id, layer, g));
        }
      }
    }
    auto stats = node->Stats();
    ASSERT_TRUE(stats.ok());
    EXPECT_GT(stats->seals, 0);
  }
  auto store = ShardStore::Open(dir.path());
  ASSERT_TRUE(store.ok()) << store.status();
  auto node = NewNode(store->get());
  const absl::Status recovered = node->core().Recover();
  ASSERT_TRUE(recovered.ok()) << recovered;
  EXPECT_EQ(node->core().Recover().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_GT(node->core().MemoryUsedBytes(), 0);
  size_t p = 0;
  for (size_t i = 0; i < MixedSpecs().size(); ++i) {
    const SequenceSpec spec = MixedSpecs()[i];
    const std::string what = "sequence " + std::to_string(spec.sequence_id);
    ExpectSameSnapshots(Snapshot(node.get(), spec), before[i], what);
    auto shards = node->core().ListShards(spec.sequence_id);
    ASSERT_TRUE(shards.ok());
    ExpectSameShards(*shards, shards_before[i], what);
    for (int layer = 0; layer < kLayers; ++layer) {
      for (int g = 0; g < kKvHeads; ++g) {
        EXPECT_EQ(*node->core().HeldPositions(spec.sequence_id, layer, g), positions_before[p++])
            << what;
      }
    }
  }
  // Without persistence there is nothing to recover from.
  EXPECT_EQ(NewNode()->core().Recover().code(), absl::StatusCode::kFailedPrecondition);
}

// Group commit: four threads drive one sequence each with AppendAsync,
// three decode steps (every head) in flight at a time, seals included; a
// fifth sequence is dropped right behind appends still queued for it. The
// store groups the commits (fewer RocksDB writes than commits) and recovers
// exactly the acknowledged state: same shards, positions and Attend, bit
// for bit; the dropped sequence stays dropped (its queued appends were
// written before the drop, so no orphan records).
TEST(ShardStoreTest, GroupCommitKeepsOrderAndRecovers) {
  TempDir dir;
  ASSERT_FALSE(dir.path().empty());
  constexpr int kSequences = 5, kSteps = 150, kInFlight = 3, kUploaded = 40;
  const auto spec_of = [](int i) {
    return Spec(100 + i, kLayers, kHeads, kKvHeads, kDim, DType::kBf16, IndexType::kGraph);
  };
  std::vector<std::vector<Partials>> before;
  std::vector<std::vector<ShardInfo>> shards_before;
  {
    auto store = ShardStore::Open(dir.path());
    ASSERT_TRUE(store.ok()) << store.status();
    auto node = NewNode(store->get());
    for (int i = 0; i < kSequences; ++i) {
      const SequenceSpec spec = spec_of(i);
      ASSERT_TRUE(node->CreateSequence(spec).ok());
      for (int layer = 0; layer < kLayers; ++layer) {
        for (int g = 0; g < kKvHeads; ++g) {
          const Matrix keys = RandomMatrix(kUploaded, kDim, 300 + 10 * i + 4 * layer + g, 1.0f);
          ShardUpload up;
          up.key = ShardKey{spec.sequence_id, layer, g, 0};
          up.keys = keys.view();
          up.values = keys.view();
          ASSERT_TRUE(node->UploadShard(up).ok());
        }
      }
    }
    const auto drive = [&](int i, bool drop_behind) {
      const SequenceSpec spec = spec_of(i);
      const int heads = kLayers * kKvHeads;
      const Matrix keys = RandomMatrix(size_t{kSteps} * heads, kDim, 5000 + i, 1.0f);
      std::deque<std::vector<StatusWaiter>> window;  // one entry per step in flight
      for (int step = 0; step < kSteps; ++step) {
        std::vector<StatusWaiter>& w = window.emplace_back(heads);
        for (int h = 0; h < heads; ++h) {
          AppendRequest a;
          a.sequence_id = spec.sequence_id;
          a.layer = h / kKvHeads;
          a.kv_head = h % kKvHeads;
          a.first_position = kUploaded + step;
          a.keys = keys.view().rows_slice(size_t(step) * heads + h, 1);
          a.values = a.keys;
          node->AppendAsync(a, w[h].callback());
        }
        if (drop_behind && step == kSteps - 1) {
          EXPECT_TRUE(node->DropSequence(spec.sequence_id).ok());
        }
        while (window.size() > (step == kSteps - 1 ? 0u : size_t{kInFlight - 1})) {
          for (StatusWaiter& waiter : window.front()) {
            const absl::Status st = waiter.Wait();
            EXPECT_TRUE(st.ok()) << "sequence " << spec.sequence_id << ": " << st;
          }
          window.pop_front();
        }
      }
    };
    std::vector<std::thread> threads;
    for (int i = 0; i < kSequences; ++i) threads.emplace_back(drive, i, i == kSequences - 1);
    for (std::thread& t : threads) t.join();
    const ShardStoreStats stats = (*store)->stats();
    std::printf("group commit: %lld commits in %lld RocksDB writes\n",
                static_cast<long long>(stats.commits), static_cast<long long>(stats.writes));
    EXPECT_GE(stats.commits,
              int64_t{kSequences} * (1 + kLayers * kKvHeads * (1 + kSteps)) + 1);
    EXPECT_LE(stats.writes, stats.commits);
    auto node_stats = node->Stats();
    ASSERT_TRUE(node_stats.ok());
    EXPECT_GT(node_stats->seals, 0);
    for (int i = 0; i + 1 < kSequences; ++i) {
      before.push_back(Snapshot(node.get(), spec_of(i)));
      auto shards = node->core().ListShards(spec_of(i).sequence_id);
      ASSERT_TRUE(shards.ok());
      shards_before.push_back(*shards);
    }
  }
  auto store = ShardStore::Open(dir.path());
  ASSERT_TRUE(store.ok()) << store.status();
  auto node = NewNode(store->get());
  const absl::Status recovered = node->core().Recover();
  ASSERT_TRUE(recovered.ok()) << recovered;
  for (int i = 0; i + 1 < kSequences; ++i) {
    const SequenceSpec spec = spec_of(i);
    const std::string what = "sequence " + std::to_string(spec.sequence_id);
    ExpectSameSnapshots(Snapshot(node.get(), spec), before[i], what);
    auto shards = node->core().ListShards(spec.sequence_id);
    ASSERT_TRUE(shards.ok());
    ExpectSameShards(*shards, shards_before[i], what);
    for (int layer = 0; layer < kLayers; ++layer) {
      for (int g = 0; g < kKvHeads; ++g) {
        auto held = node->core().HeldPositions(spec.sequence_id, layer, g);
        ASSERT_TRUE(held.ok());
        ASSERT_EQ(held->size(), size_t{kUploaded + kSteps}) << what;
        for (size_t p = 0; p < held->size(); ++p) ASSERT_EQ((*held)[p], int64_t(p)) << what;
      }
    }
  }
  EXPECT_EQ(node->core().ListShards(spec_of(kSequences - 1).sequence_id).status().code(),
            absl::StatusCode::kNotFound);
}

// A ShardPersistence whose commits fail from the `fail_at`-th on.
class FailingPersistence final : public ShardPersistence {
 public:
  explicit FailingPersistence(int fail_at) : fail_at_(fail_at) {}
  absl::Status PutSequence(const SequenceSpec&, const SequenceOwner&) override { return Next(); }
  absl::Status DropSequence(uint64_t) override { return Next(); }
  absl::Status CommitHead(const HeadWrite&) override { return Next(); }
  absl::Status Recover(const std::function<absl::Status(const SequenceSpec&, const SequenceOwner&)>&,
                       const std::function<absl::Status(uint64_t, RecoveredHead)>&) override {
    return absl::OkStatus();
  }

 private:
  absl::Status Next() {
    return ++calls_ >= fail_at_ ? absl::UnavailableError("disk on fire") : absl::OkStatus();
  }
  int fail_at_;
  int calls_ = 0;
};

TEST(ShardStoreTest, FailedCommitStopsEveryLaterWrite) {
  FailingPersistence persistence(/*fail_at=*/3);  // create, append, then the failing append
  auto node = NewNode(&persistence);
  const SequenceSpec spec = Spec(1, 1, 2, 1, 8, DType::kF32, IndexType::kFlat);
  ASSERT_TRUE(node->CreateSequence(spec).ok());
  const Matrix keys = RandomMatrix(4, 8, 1), values = RandomMatrix(4, 8, 2);
  AppendRequest a;
  a.sequence_id = 1;
  a.keys = keys.view().rows_slice(0, 2);
  a.values = values.view().rows_slice(0, 2);
  ASSERT_TRUE(node->Append(a).ok());
  a.first_position = 2;
  a.keys = keys.view().rows_slice(2, 2);
  a.values = values.view().rows_slice(2, 2);
  const absl::Status failed = node->Append(a);
  EXPECT_EQ(failed.code(), absl::StatusCode::kUnavailable) << failed;
  EXPECT_NE(failed.message().find("disk on fire"), absl::string_view::npos) << failed;
  a.first_position = 10;
  EXPECT_EQ(node->Append(a).code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(node->CreateSequence(Spec(2, 1, 2, 1, 8, DType::kF32, IndexType::kFlat)).code(),
            absl::StatusCode::kUnavailable);
  ShardUpload up;
  up.key = ShardKey{1, 0, 0, 5};
  up.first_position = 100;
  up.keys = keys.view();
  up.values = values.view();
  EXPECT_EQ(node->UploadShard(up).code(), absl::StatusCode::kUnavailable);
  // Reads still work.
  const Matrix q = RandomMatrix(2, 8, 3);
  EXPECT_TRUE(AttendOn(node.get(), spec, 0, q, 4, 0).ok());
  // A drop still reports the failure, but frees the sequence (tenant_test:
  // DropAfterAPersistenceFailureFreesTheSequence).
  EXPECT_EQ(node->DropSequence(1).code(), absl::StatusCode::kUnavailable);
}

// --- real processes ----------------------------------------------------------------------

// SIGKILL during a stream of appends, three rounds on one data dir.
TEST(NodePersistenceTest, SigkillDuringAppendsKeepsEveryAcknowledgedAppend) {
  TempDir dir;
  ASSERT_FALSE(dir.path().empty());
  const SequenceSpec spec = Spec(1, kLayers, kHeads, kKvHeads, kDim, DType::kBf16, IndexType::kFlat);
  constexpr int kStreams = kLayers * kKvHeads;  // one client thread per (layer, kv head)
  constexpr int kUploaded = 40;
  constexpr int kRows = 3;  // per append; a partial append would leave a count not divisible by 3
  constexpr int kMaxAppends = 100000;
  const auto append_of = [&](int stream, int i) {
    const int layer = stream / kKvHeads, g = stream % kKvHeads;
    AppendRequest a;
    a.sequence_id = spec.sequence_id;
    a.layer = layer;
    a.kv_head = g;
    a.first_position = kUploaded + int64_t{kRows} * i;
    return a;
  };
  const auto append_keys = [](int stream, int i) {
    return RandomMatrix(kRows, kDim, 7000000 + 100000 * stream + i, 1.0f);
  };
  const auto append_values = [](int stream, int i) {
    return RandomMatrix(kRows, kDim, 9000000 + 100000 * stream + i);
  };
  const auto upload_of = [&](RetrievalClient* node) {
    ASSERT_TRUE(node->CreateSequence(spec).ok());
    for (int stream = 0; stream < kStreams; ++stream) {
      const Matrix keys = RandomMatrix(kUploaded, kDim, 100 + stream, 1.0f);
      const Matrix values = RandomMatrix(kUploaded, kDim, 200 + stream);
      ShardUpload up;
      up.key = ShardKey{spec.sequence_id, stream / kKvHeads, stream % kKvHeads, 0};
      up.keys = keys.view();
      up.values = values.view();
      ASSERT_TRUE(node->UploadShard(up).ok());
    }
  };

  std::random_device rd;
  const uint32_t seed = rd();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937 rng(seed);
  std::vector<int> acked(kStreams, 0);  // appends known to be acknowledged (and durable)

  // Checks the restarted node against `acked`; returns the appends it holds.
  const auto verify = [&](GrpcRetrievalClient* client, std::vector<int>* held) {
    auto shards = client->ListShards(spec.sequence_id);
    ASSERT_TRUE(shards.ok()) << shards.status();
    held->assign(kStreams, 0);
    std::vector<int64_t> rows(kStreams, 0), last(kStreams, -1);
    for (const ShardInfo& s : *shards) {
      const int stream = s.key.layer * kKvHeads + s.key.kv_head;
      rows[stream] += s.n_keys + s.tail_keys;
      last[stream] = std::max(last[stream], s.last_position);
    }
    for (int stream = 0; stream < kStreams; ++stream) {
      const int64_t appended = rows[stream] - kUploaded;
      ASSERT_EQ(appended % kRows, 0) << "stream " << stream << " holds " << appended
                                     << " appended rows: part of an append";
      (*held)[stream] = static_cast<int>(appended / kRows);
      EXPECT_GE((*held)[stream], acked[stream]) << "stream " << stream << " lost an acked append";
      EXPECT_LE((*held)[stream], acked[stream] + 1)
          << "stream " << stream << ": more than the one in-flight append";
      EXPECT_EQ(last[stream], kUploaded + int64_t{kRows} * (*held)[stream] - 1) << stream;
    }
    // The in-process reference with exactly the held appends.
    auto ref = NewNode();
    ASSERT_NO_FATAL_FAILURE(upload_of(ref.get()));
    for (int stream = 0; stream < kStreams; ++stream) {
      for (int i = 0; i < (*held)[stream]; ++i) {
        const Matrix k = append_keys(stream, i), v = append_values(stream, i);
        AppendRequest a = append_of(stream, i);
        a.keys = k.view();
        a.values = v.view();
        ASSERT_TRUE(ref->Append(a).ok());
      }
    }
    auto ref_shards = ref->core().ListShards(spec.sequence_id);
    ASSERT_TRUE(ref_shards.ok());
    ExpectSameShards(*shards, *ref_shards, "after SIGKILL");
    auto st = client->Stats();
    auto ref_st = ref->Stats();
    ASSERT_TRUE(st.ok() && ref_st.ok());
    EXPECT_EQ(st->indexed_keys, ref_st->indexed_keys);
    EXPECT_EQ(st->tail_keys, ref_st->tail_keys);
    for (int layer = 0; layer < kLayers; ++layer) {
      for (int step = 0; step < 2; ++step) {
        const Matrix q = RandomMatrix(kHeads, kDim, 31 + 7 * layer + step, -0.5f);
        auto remote = AttendOn(client, spec, layer, q, 4096, 0);  // flat, k = all: exact
        auto local = AttendOn(ref.get(), spec, layer, q, 4096, 0);
        ASSERT_TRUE(remote.ok()) << remote.status();
        ASSERT_TRUE(local.ok());
        ExpectSamePartials(*remote, *local, "layer " + std::to_string(layer));
      }
    }
  };

  constexpr int kRounds = 3;
  for (int round = 0; round <= kRounds; ++round) {
    SCOPED_TRACE("round " + std::to_string(round));
    auto node = NodeProcess::Start(NodeArgs(dir.path()));
    ASSERT_NE(node, nullptr);
    auto client = Connect(node->address());
    ASSERT_NE(client, nullptr);
    std::vector<int> start(kStreams, 0);
    if (round == 0) {
      ASSERT_NO_FATAL_FAILURE(upload_of(client.get()));
    } else {
      ASSERT_NO_FATAL_FAILURE(verify(client.get(), &start));
      acked = start;  // observed after restart: durable
    }
    if (round == kRounds) {
      const std::optional<int> status = node->Stop(SIGTERM);
      ASSERT_TRUE(status.has_value() && WIFEXITED(*status) && WEXITSTATUS(*status) == 0);
      break;
    }
    // Stream appends from one thread per head; SIGKILL after `target` acks.
    const int target = std::uniform_int_distribution<int>(5, 60)(rng);
    std::mutex mu;
    std::condition_variable cv;
    int acks = 0;
    std::atomic<bool> stop{false};
    std::atomic<int> in_flight{0};
    std::vector<int> acked_now = acked;
    std::vector<std::thread> threads;
    for (int stream = 0; stream < kStreams; ++stream) {
      threads.emplace_back([&, stream] {
        for (int i = start[stream]; i < kMaxAppends && !stop.load(); ++i) {
          const Matrix k = append_keys(stream, i), v = append_values(stream, i);
          AppendRequest a = append_of(stream, i);
          a.keys = k.view();
          a.values = v.view();
          in_flight.fetch_add(1);
          const absl::Status st = client->Append(a);
          in_flight.fetch_sub(1);
          std::lock_guard<std::mutex> lock(mu);
          if (!st.ok()) break;  // the node is gone
          acked_now[stream] = i + 1;
          ++acks;
          cv.notify_all();
        }
        std::lock_guard<std::mutex> lock(mu);
        cv.notify_all();
      });
    }
    {
      std::unique_lock<std::mutex> lock(mu);
      ASSERT_TRUE(cv.wait_for(lock, std::chrono::seconds(120), [&] { return acks >= target; }))
          << "only " << acks << " of " << target << " appends acknowledged";
    }
    const int flying = in_flight.load();
    const std::optional<int> status = node->Stop(SIGKILL);
    stop.store(true);
    for (std::thread& t : threads) t.join();
    ASSERT_TRUE(status.has_value() && WIFSIGNALED(*status) && WTERMSIG(*status) == SIGKILL);
    {
      std::lock_guard<std::mutex> lock(mu);
      acked = acked_now;
      int total = 0;
      for (int a : acked) total += a;
      std::printf("round %d: SIGKILL after %d acknowledged appends this round (%d in total), "
                  "%d in flight\n",
                  round, acks, total, flying);
    }
  }
}

// SIGTERM, restart: identical results; a dropped sequence stays dropped.
TEST(NodePersistenceTest, SigtermRestartServesIdenticalAttend) {
  TempDir dir;
  ASSERT_FALSE(dir.path().empty());
  std::vector<std::vector<Partials>> before;
  std::vector<std::vector<ShardInfo>> shards_before;
  {
    auto node = NodeProcess::Start(NodeArgs(dir.path()));
    ASSERT_NE(node, nullptr);
    auto client = Connect(node->address());
    for (const SequenceSpec& spec : MixedSpecs()) {
      ASSERT_NO_FATAL_FAILURE(LoadMixed(client.get(), spec));
      before.push_back(Snapshot(client.get(), spec));
      auto shards = client->ListShards(spec.sequence_id);
      ASSERT_TRUE(shards.ok());
      shards_before.push_back(*shards);
    }
    // The same workload in process gives the same results (the node's
    // state is the reference's, so restart equality is not vacuous).
    auto ref = NewNode();
    ASSERT_NO_FATAL_FAILURE(LoadMixed(ref.get(), MixedSpecs()[0]));
    ExpectSameSnapshots(Snapshot(ref.get(), MixedSpecs()[0]), before[0], "remote vs in-process");
    client.reset();
    const std::optional<int> status = node->Stop(SIGTERM);
    ASSERT_TRUE(status.has_value() && WIFEXITED(*status) && WEXITSTATUS(*status) == 0);
  }
  const SequenceSpec dropped = MixedSpecs()[1];
  {
    auto node = NodeProcess::Start(NodeArgs(dir.path()));
    ASSERT_NE(node, nullptr);
    auto client = Connect(node->address());
    for (size_t i = 0; i < MixedSpecs().size(); ++i) {
      const SequenceSpec spec = MixedSpecs()[i];
      const std::string what = "after SIGTERM, sequence " + std::to_string(spec.sequence_id);
      ExpectSameSnapshots(Snapshot(client.get(), spec), before[i], what);
      auto shards = client->ListShards(spec.sequence_id);
      ASSERT_TRUE(shards.ok());
      ExpectSameShards(*shards, shards_before[i], what);
    }
    auto stats = client->Stats();
    ASSERT_TRUE(stats.ok());
    EXPECT_EQ(stats->sequences, 3);
    ASSERT_TRUE(client->DropSequence(dropped.sequence_id).ok());
    const std::optional<int> status = node->Stop(SIGKILL);  // the drop was acknowledged
    ASSERT_TRUE(status.has_value());
  }
  auto node = NodeProcess::Start(NodeArgs(dir.path()));
  ASSERT_NE(node, nullptr);
  auto client = Connect(node->address());
  EXPECT_EQ(client->ListShards(dropped.sequence_id).status().code(), absl::StatusCode::kNotFound);
  const SequenceSpec kept = MixedSpecs()[0];
  ExpectSameSnapshots(Snapshot(client.get(), kept), before[0], "after drop and restart");
  // The id is free again, and the node takes new writes.
  ASSERT_TRUE(client->CreateSequence(dropped).ok());
  auto shards = client->ListShards(dropped.sequence_id);
  ASSERT_TRUE(shards.ok());
  EXPECT_TRUE(shards->empty());
  const std::optional<int> status = node->Stop(SIGTERM);
  ASSERT_TRUE(status.has_value() && WIFEXITED(*status) && WEXITSTATUS(*status) == 0);
}

// Flips one byte of the value at `key` in the store at `dir` (node stopped).
void FlipByte(const std::string& dir, const std::string& key, std::string* original) {
  rocksdb::Options o;
  rocksdb::DB* raw = nullptr;
  ASSERT_TRUE(rocksdb::DB::Open(o, dir, &raw).ok());
  std::unique_ptr<rocksdb::DB> db(raw);
  std::string value;
  ASSERT_TRUE(db->Get(rocksdb::ReadOptions(), key, &value).ok());
  *original = value;
  value[value.size() / 2 + 12] ^= 0x20;  // inside the payload
  rocksdb::WriteOptions wo;
  wo.sync = true;
  ASSERT_TRUE(db->Put(wo, key, value).ok());
}

void Restore(const std::string& dir, const std::string& key, const std::string& value) {
  rocksdb::Options o;
  rocksdb::DB* raw = nullptr;
  ASSERT_TRUE(rocksdb::DB::Open(o, dir, &raw).ok());
  std::unique_ptr<rocksdb::DB> db(raw);
  rocksdb::WriteOptions wo;
  wo.sync = true;
  ASSERT_TRUE(db->Put(wo, key, value).ok());
}

TEST(NodePersistenceTest, CorruptBlobFailsStartupNamingTheShard) {
  TempDir dir;
  ASSERT_FALSE(dir.path().empty());
  const SequenceSpec spec = Spec(5, kLayers, kHeads, kKvHeads, kDim, DType::kF32, IndexType::kGraph);
  {
    auto node = NodeProcess::Start(NodeArgs(dir.path()));
    ASSERT_NE(node, nullptr);
    auto client = Connect(node->address());
    ASSERT_TRUE(client->CreateSequence(spec).ok());
    const Matrix keys = RandomMatrix(100, kDim, 1), values = RandomMatrix(100, kDim, 2);
    ShardUpload up;
    up.key = ShardKey{5, 0, 1, 3};
    up.keys = keys.view();
    up.values = values.view();
    ASSERT_TRUE(client->UploadShard(up).ok());
    AppendRequest a;
    a.sequence_id = 5;
    a.layer = 1;
    a.kv_head = 0;
    a.first_position = 7;
    a.keys = keys.view().rows_slice(0, 5);
    a.values = values.view().rows_slice(0, 5);
    ASSERT_TRUE(client->Append(a).ok());
    const std::optional<int> status = node->Stop(SIGTERM);
    ASSERT_TRUE(status.has_value() && WIFEXITED(*status) && WEXITSTATUS(*status) == 0);
  }
  struct Case {
    std::string key;
    std::string expect_name;
    std::string expect_record;
  };
  const ShardKey shard{5, 0, 1, 3};
  const std::vector<Case> cases = {
      {ShardStore::ChunkIndexKey(shard), "shard (seq 5, layer 0, kv head 1, chunk 3)", "index blob"},
      {ShardStore::ValueSegmentKey(shard, 0), "shard (seq 5, layer 0, kv head 1, chunk 3)",
       "value segment at row 0"},
      {ShardStore::TailSegmentKey(5, 1, 0, 7), "tail of (seq 5, layer 1, kv head 0)",
       "tail segment at position 7"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.expect_record);
    std::string original;
    ASSERT_NO_FATAL_FAILURE(FlipByte(dir.path(), c.key, &original));
    // Strict recovery (the default quarantines the sequence and starts:
    // tests/hostile/node_hostile_test.cc).
    std::vector<std::string> strict = NodeArgs(dir.path());
    strict.push_back("--recovery_quarantine=false");
    const std::optional<FailedStart> failed = RunExpectingStartupFailure(strict);
    ASSERT_TRUE(failed.has_value());
    EXPECT_TRUE(WIFEXITED(failed->wait_status) && WEXITSTATUS(failed->wait_status) != 0)
        << failed->wait_status;
    EXPECT_NE(failed->output.find("DATA_LOSS"), std::string::npos) << failed->output;
    EXPECT_NE(failed->output.find(c.expect_name), std::string::npos) << failed->output;
    EXPECT_NE(failed->output.find(c.expect_record), std::string::npos) << failed->output;
    std::printf("corrupt %s -> %s", c.expect_record.c_str(), failed->output.c_str());
    // Repaired, the node starts and serves the shard again.
    ASSERT_NO_FATAL_FAILURE(Restore(dir.path(), c.key, original));
    auto node = NodeProcess::Start(NodeArgs(dir.path()));
    ASSERT_NE(node, nullptr);
    auto client = Connect(node->address());
    auto shards = client->ListShards(5);
    ASSERT_TRUE(shards.ok()) << shards.status();
    EXPECT_EQ(shards->size(), 2u);
    client.reset();
    ASSERT_TRUE(node->Stop(SIGTERM).has_value());
  }
}

}  // namespace
}  // namespace kvr::retrieval
