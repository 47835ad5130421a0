// NodeCore: the retrieval node itself, with no RPC or transport types. The
// kvr_node server (retrieval_node/server/) wraps one behind the kvr.v1
// service; InProcessRetrievalClient (retrieval_node/client/) puts one in the
// worker's own process (embedded mode, tests). AttendAsync runs on the
// core's own thread pool so a caller can overlap it with other work.
//
// Per (sequence, layer, kv head) the node holds a list of chunks (shards),
// each an index (attention graph, IVF, or flat when small or asked) over its
// keys with the values alongside, plus one flat-scanned tail buffer for
// appended tokens. When the tail reaches `tail_capacity` keys its first
// tail_capacity rows are sealed into the last chunk in the background: the
// chunk's new index is built from a snapshot on the seal thread (a copy of
// the chunk's index with the rows added: AttentionGraphIndex::Add links new
// keys incrementally; or, when the chunk has no index yet or only a flat one
// because it was small, an index (re)built over all its keys with the most
// recent decode queries of that kv head as training queries) while Attends
// keep searching the old index and the whole tail, and appends keep filling
// the tail. The append that brings max(1, tail_capacity / 4) rows after the
// sealed ones (SealLag) installs the new index (a pointer swap and a tail
// copy of those few rows, under the exclusive lock) and drops the sealed
// rows from the tail; when the build is not done by then, that append waits
// for it with the lock released. So what an Attend sees depends only on the
// appends made, never on timing (except the search effort a recalibration
// on decode queries swaps in: NodeCoreOptions::recalibrate_every, and
// whether a deferred index build has installed: defer_index_build), and the
// tail holds fewer than
// tail_capacity + SealLag rows between appends. The build copies the chunk's
// index (O(chunk keys) per seal, as persisting the seal already is), so
// long generations on large chunks want a larger tail_capacity.
// Attend searches every chunk and the tail (or, when the request lists
// `shards`, only those chunks; the tail goes with its head's last chunk) and
// merges the partials by LSE.
//
// Persistence (optional, `NodeCoreOptions::persistence`): every
// acknowledged CreateSequence / UploadShard / Append / DropSequence is
// committed to the ShardPersistence before the call returns (AppendAsync:
// before `done` runs), one atomic HeadWrite per mutated (sequence, layer, kv
// head); Recover() (node_recovery.cc) rebuilds the node from it at startup.
// See shard_persistence.h.
//
// Appends and durability: an append is applied in memory and its commit
// queued under the sequence lock, then the lock is released and the commit
// synced (grouped with concurrent commits by the store); the append is
// acknowledged once durable. An Attend running meanwhile may already see
// tokens of a not yet acknowledged append; an Attend issued after the
// acknowledgement always does.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <string_view>
#include <thread>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "common/attention.h"
#include "common/status.h"
#include "common/thread_pool.h"
#include "retrieval_node/core/node_sync.h"
#include "retrieval_node/core/node_types.h"
#include "retrieval_node/core/shard_persistence.h"
#include "retrieval_node/index/attend.h"
#include "retrieval_node/index/attention_graph_index.h"
#include "retrieval_node/index/calibrate.h"
#include "retrieval_node/index/cluster_summary.h"
#include "retrieval_node/index/ivf_index.h"

namespace kvr::retrieval {

// The most decode queries a head's ring may keep (NodeCoreOptions::
// decode_train_queries): 2^16 rows x head_dim 1024 fp32 is 256 MiB per head.
inline constexpr size_t kMaxDecodeTrainQueries = size_t{1} << 16;
// The largest NodeCoreOptions::recalibrate_every (decode queries per head).
inline constexpr size_t kMaxRecalibrateEvery = size_t{1} << 30;

// The largest NodeCoreOptions::max_batch_items accepted.
inline constexpr size_t kMaxBatchItemsLimit = size_t{1} << 16;

struct NodeCoreOptions {
  // Appended keys per (sequence, layer, kv head) kept flat before sealing.
  size_t tail_capacity = 64;
  // Chunks with fewer keys use a flat index whatever the sequence asks for.
  size_t min_index_keys = 32;
  // Recent decode (Attend) queries per (sequence, layer, kv head) kept in a
  // ring as training queries for tail seals that (re)build an index
  // (kvr_node --decode_train_queries). The ring (this many rows x head_dim
  // fp32) is allocated at the head's first Attend and counted in
  // memory_budget_bytes; when it does not fit, that head records no queries.
  // 0: none kept. At most kMaxDecodeTrainQueries.
  size_t decode_train_queries = 256;
  // true (default): a full tail seals on a seal thread into a copy of the
  // chunk index while Attends keep reading the old one; the append
  // tail_capacity / 4 rows later installs it (waiting, without the lock, if
  // the build is not done). false: the append that fills the tail seals it
  // in place under the sequence's exclusive lock, stalling every Attend of
  // the sequence (kvr_node --background_seals; docs/benchmarks.md §7c). The
  // copy is O(chunk keys) per seal, as persisting an in-place seal is.
  bool background_seals = true;
  // Test hook: when set, runs on the seal thread at the start of every
  // background seal build (before any work), e.g. to hold a seal open.
  std::function<void()> before_seal_build;
  // Deferred index builds (kvr_node --defer_index_build; session 27, issue
  // 17 item 5): UploadShard of a chunk whose kind needs a real build (not
  // flat, at least min_index_keys keys) validates, reserves the memory the
  // synchronous build would (the index's estimate stays reserved until the
  // build installs), stores the chunk with an exact flat index over its keys
  // (persisted as such with `persistence`), and returns; the chunk's real
  // index is built by the synchronous path's code on the same inputs
  // (BuildIndexOn) on a build thread (index_build_threads, niced to the
  // lowest priority; each build on that thread alone, not on the `threads`
  // pool) and swapped in under the exclusive sequence lock, then
  // persisted. Until then ShardInfo::index_pending is true, Attends search
  // the chunk exactly, and tail seals of that chunk wait (the tail keeps
  // every appended row, searched exactly, and seals once the build is in).
  // A dropped, replaced (SyncShards) or shut-down chunk's build is
  // discarded and its reservation returned. A restart before the install
  // recovers the chunk with its flat index (served exactly; not rebuilt).
  // false: UploadShard builds the index before it returns (as before).
  bool defer_index_build = false;
  // Threads running deferred builds (kvr_node --index_build_threads), each
  // at nice 19. 0: builds are queued and never run (tests: a chunk stays
  // pending until the node is destroyed). At most 256.
  size_t index_build_threads = 1;
  // Test hook: runs on the build thread before each deferred build starts.
  std::function<void()> before_index_build;
  // Told of every deferred build that installed (the index kind, the build's
  // seconds, the ShardInfo calibration figures), on the build thread after
  // the install (metrics: kvr_node_index_build_duration_seconds).
  std::function<void(IndexType, double seconds, double measured_search_us,
                     double expected_recall)>
      on_index_built;
  // Remainder estimation (kvr_node --estimate; issue 18): what an Attend
  // whose request says EstimateMode::kDefault does. Chunk summaries are
  // built when needed (see background_summaries; extended as seals append
  // keys) and counted in memory_budget_bytes; a chunk whose summary does
  // not fit is attended exactly.
  bool estimate = false;
  // Where chunk summaries are clustered (k-means). true: on a summary
  // thread of the node, never inside an Attend: a chunk is attended exactly
  // until its summary exists (an Attend that finds none, or one that should
  // be re-clustered, queues the build; with `estimate` on, UploadShard queues
  // it at once). Exception: a chunk whose keys x clusters is at most 16384
  // (a k-means of ~1 ms; a small model's chunks) is clustered by the Attend
  // itself, so small models estimate deterministically from the first token. Keys a seal appends to a chunk join its existing clusters
  // inside the next estimating Attend (nearest centroid, no k-means). false
  // (tests; also when `threads` is 0): the first estimating Attend clusters
  // inline, as before session 26.
  bool background_summaries = true;
  // Clusters per chunk summary (kvr_node --estimate_clusters_per_chunk),
  // [index::kMinEstimateClusters, index::kMaxEstimateClusters]; a chunk of
  // n keys gets min(this, max(1, n / 16)) (index::kMinKeysPerEstimateCluster),
  // re-clustered when it has doubled since its summary was built.
  size_t estimate_clusters_per_chunk = 256;
  // The summaries' second-order term (kvr_node --estimate_second_order;
  // index::ClusterSummaryOptions::second_order).
  bool estimate_second_order = false;
  // The estimate's exact zone (kvr_node --exact_zone_keys_fraction /
  // --exact_zone_mass_fraction; index::ExactZoneOptions): per query, the
  // summary clusters of most estimated mass, up to this fraction of the
  // chunk's keys, are attended exactly instead of estimated. [0, 1]; 0: off.
  double exact_zone_keys_fraction = 0.0;
  // (0, 1]: the zone also stops once it holds this fraction of the
  // remainder's estimated mass; 1: only the key budget stops it.
  double exact_zone_mass_fraction = 1.0;
  // Recalibration on decode queries (kvr_node --recalibrate_every): every
  // this many decode queries a (sequence, layer, kv head) records in its
  // ring, the node re-calibrates the search effort of that head's non-flat
  // chunks on the ring (the most recent min(decode_train_queries,
  // calibration.max_queries) queries; their exact top-k over each chunk is
  // computed on the recalibration thread) and swaps the recalibrated index
  // in (a CalibratedIndex sharing the built one: no copy) under the
  // sequence's exclusive lock, for as long as a pointer swap takes; with
  // index auto a chunk whose kind cannot meet the target, or models no
  // faster than the scan, becomes flat. One thread for the whole node, at
  // most one queued recalibration per head, single-threaded scans: Attends
  // never wait for the work. A chunk replaced meanwhile (a seal) keeps its
  // new index. Background seals also calibrate the chunk's new index on the
  // ring (every 4th ring query held back when the ring trains a rebuild),
  // persisted with it: a seal whose chunk has no known calibration, and
  // otherwise at most one seal per recalibrate_every ring queries (the
  // others keep the chunk's last calibration). Heads with fewer than index::kMinRecalibrationQueries
  // ring rows are left alone. Recalibrations are not persisted (Recover
  // restores the upload's or the last seal's calibration). 0: off (and seals
  // keep their index's calibration). [0, kMaxRecalibrateEvery].
  size_t recalibrate_every = 1024;
  // Test hook: when set, runs on the recalibration thread at the start of
  // every recalibration (before any work), e.g. to hold one open.
  std::function<void()> before_recalibration;
  // Exact top-k per training query when the node computes training data.
  int train_k = 32;
  // Self-calibration (kvr_node --target_recall): the recall a chunk built
  // with held-back queries (ShardUpload::holdout_*) is calibrated for.
  index::CalibrationOptions calibration;
  index::AttentionGraphOptions graph;
  index::IvfOptions ivf;
  // Threads running AttendAsync and index builds (0: Attend runs inline on
  // the caller's thread before AttendAsync returns).
  size_t threads = 1;
  // Threads searching the items of one AttendBatchAsync in parallel (kvr_node
  // --attend_threads; 0 = the `threads` pool runs them). Ignored when
  // `threads` is 0 (everything inline). At most 256.
  size_t attend_threads = 0;
  // Per-head parallel search within one Attend / AttendBatch item (kvr_node
  // --search_threads): the item's (kv head, chunk) searches and tails run
  // on up to this many threads, the item's own thread included, and their
  // partials are merged in the sequential order, so outputs and stats are
  // bit-identical to 1. 0 = the pool that runs the item (the attend_threads
  // pool for batch items, the `threads` pool for single Attends) lends its
  // idle workers; 1 = sequential on the item's thread; N > 1 = a dedicated
  // pool of N - 1 helpers. Never deadlocks on a full pool: the item's thread
  // claims searches itself and only waits for searches another thread
  // already started. Ignored when `threads` is 0. At most 256.
  size_t search_threads = 0;
  // Items one AttendBatchAsync / AppendBatchAsync may carry (kvr_node
  // --max_batch_items); more is ResourceExhausted naming max_batch_items.
  // In [1, kMaxBatchItemsLimit].
  size_t max_batch_items = 1024;
  // Shard memory (keys, values, indexes, positions, tails) the node admits, in
  // bytes; 0 = unlimited. UploadShard / Append reserve an estimate of what
  // they add before doing any work and fail with ResourceExhausted naming the
  // budget when it does not fit; the reservation is then reconciled with the
  // bytes actually held (vector growth and tail seals can overshoot the
  // estimate slightly). DropSequence returns a sequence's bytes.
  int64_t memory_budget_bytes = 0;
  // Working memory of in-flight uploads (ReserveUpload: the buffers a
  // streamed upload holds besides the shard it becomes), in bytes; 0 =
  // unlimited. Separate from memory_budget_bytes so that what the node may
  // hold at once is bounded by memory_budget_bytes + upload_memory_bytes.
  int64_t upload_memory_bytes = 0;
  // Where acknowledged changes are made durable (not owned; must outlive the
  // node). Null: the node is memory-only. When a commit fails the node
  // refuses every later write with Unavailable (its memory may then be ahead
  // of the store); restarting it recovers the acknowledged state.
  ShardPersistence* persistence = nullptr;
  // Recover: true = a sequence whose stored records are corrupt or
  // inconsistent, or that does not fit memory_budget_bytes, is quarantined
  // (left in the store, not served, logged; see Recover); false = the first
  // such sequence fails Recover (the node must not start).
  bool recovery_quarantine = true;
  // Leases (kvr_node --lease_seconds): a sequence created with a lease owner
  // is dropped (memory and persistence, counted in Stats().leases_expired)
  // once that owner has neither created a sequence nor called RenewLeases
  // for this many seconds; checked about 4 times per lease period by the
  // core's own thread. Recover restarts every recovered lease. 0: leases
  // never expire (no thread).
  double lease_seconds = 0;
};

// Bytes held against a NodeCore's memory budget until released (or
// destroyed). Movable, not copyable; must not outlive the NodeCore that
// made it. Not thread-safe (one owner).
class MemoryReservation {
 public:
  MemoryReservation() = default;
  MemoryReservation(MemoryReservation&& other) noexcept { *this = std::move(other); }
  MemoryReservation& operator=(MemoryReservation&& other) noexcept {
    if (this != &other) {
      Release();
      used_ = other.used_;
      bytes_ = other.bytes_;
      other.used_ = nullptr;
      other.bytes_ = 0;
    }
    return *this;
  }
  MemoryReservation(const MemoryReservation&) = delete;
  MemoryReservation& operator=(const MemoryReservation&) = delete;
  ~MemoryReservation() { Release(); }

  // Returns min(bytes, held) of the reservation to the budget.
  void Shrink(int64_t bytes) {
    bytes = std::min(std::max<int64_t>(bytes, 0), bytes_);
    if (used_ != nullptr) used_->fetch_sub(bytes, std::memory_order_relaxed);
    bytes_ -= bytes;
  }
  void Release() { Shrink(bytes_); }
  int64_t bytes() const { return bytes_; }

 private:
  friend class NodeCore;
  MemoryReservation(std::atomic<int64_t>* used, int64_t bytes) : used_(used), bytes_(bytes) {}
  std::atomic<int64_t>* used_ = nullptr;
  int64_t bytes_ = 0;
};

// The operations RetrievalClient offers (same contracts: see
// retrieval_node/client/retrieval_client.h) plus the node-side ones below.
//
// Tenant isolation: every per-sequence operation takes the sequence's
// capability (a field of the request, or an argument) and checks it
// against the SHA-256 kept at creation, in constant time: NotFound for an
// unknown sequence, InvalidArgument naming `capability` for a length
// outside [kMinCapabilityBytes, kMaxCapabilityBytes] (0 allowed),
// PermissionDenied "capability does not match sequence N" otherwise (before
// anything is read or changed). A sequence created with no capability (or
// recovered from a record that predates capabilities) only admits requests
// with none. ListShards of every sequence and Stats(principal) cover the
// sequences created by that principal only.
//
// Thread-safe.
class NodeCore final {
 public:
  // InvalidArgument for bad options (naming the field).
  static absl::StatusOr<std::unique_ptr<NodeCore>> Create(const NodeCoreOptions& options = {});
  ~NodeCore();

  NodeCore(const NodeCore&) = delete;
  NodeCore& operator=(const NodeCore&) = delete;

  // Registers `spec` owned by `access` (capability and lease owner checked:
  // InvalidArgument naming the field; the capability is kept as its SHA-256).
  absl::Status CreateSequence(const SequenceSpec& spec, const SequenceAccess& access = {});
  absl::Status UploadShard(const ShardUpload& upload);
  absl::Status Append(const AppendRequest& request);
  // Applies the append on the caller's thread before returning (so appends
  // issued in order from one thread apply in order, and every error Append
  // reports for bad input reaches `done` before this returns); with
  // persistence `done` runs once the commit is durable, on the store's
  // thread (keep it short; never wait on this node from it). Destroy the
  // node only after every `done` ran.
  void AppendAsync(const AppendRequest& request, StatusCallback done);
  // Runs on the core's pool (inline when `threads` is 0).
  void AttendAsync(const AttendRequest& request, PartialsView out, AttendStats* stats,
                   StatusCallback done);
  // Batched Attend: each item served exactly as AttendAsync serves it (the
  // same checks, the same partials bit for bit), the items searched in
  // parallel on the attend_threads pool (inline when `threads` is 0). Every
  // item's status is set before `done` runs with OK; a failing item fails
  // only its slot. More than max_batch_items items: `done` gets
  // ResourceExhausted naming max_batch_items and so does every item
  // (nothing searched). `items` must stay valid until `done` runs.
  void AttendBatchAsync(std::span<AttendBatchItem> items, StatusCallback done);
  // One item of a batch that a server unpacked itself: AttendAsync on the
  // attend_threads pool (pool_ when there is none; inline when `threads`
  // is 0).
  void AttendBatchItemAsync(const AttendRequest& request, PartialsView out, AttendStats* stats,
                            StatusCallback done);
  // Batched Append: each item applied as AppendAsync applies it, in item
  // order on the caller's thread (bad items fail before this returns);
  // `done` (OK; items' outcomes in their slots) runs once every item's
  // commit is durable. Batch limit as for AttendBatchAsync.
  void AppendBatchAsync(std::span<AppendBatchItem> items, StatusCallback done);
  // Forgets the sequence: it leaves the served set and its memory is
  // returned at once, whatever happens in the store. With persistence the
  // store's records are deleted too; when that fails (or failed before)
  // the status is Unavailable saying so (the records may come back at a
  // restart), but the sequence is gone from this node either way.
  absl::Status DropSequence(uint64_t sequence_id, std::string_view capability = "");
  // Creates sequence `fork_id` (owned by `access`, checked as in
  // CreateSequence) as a copy of `source_id`, whose capability the caller
  // presents (PermissionDenied otherwise; NotFound for an unknown source;
  // AlreadyExists when fork_id is taken; InvalidArgument for fork_id 0).
  // The fork shares each chunk's index with the source (indexes are never
  // changed in place while shared: Seal copies a shared index) and gets its
  // own copy of values, positions and the unsealed tail; an in-flight seal
  // of the source is not shared (its rows are in the fork's tail). Memory:
  // the fork is charged HeadBytes of every head, shared index bytes
  // included (over-counts, never under-counts; DropSequence returns exactly
  // that), ResourceExhausted naming memory_budget_bytes when it does not
  // fit. FailedPrecondition with persistence (a fork would have to write
  // every shard again; callers upload instead). Thread-safe.
  absl::Status ForkSequence(uint64_t source_id, std::string_view source_capability,
                            uint64_t fork_id, const SequenceAccess& access = {});
  // Node counters; with `principal` the per-sequence counts (sequences,
  // shards, keys, memory_bytes) cover only the sequences that principal
  // created.
  absl::StatusOr<NodeStats> Stats(std::optional<std::string_view> principal = std::nullopt);

  // Renews the lease of every sequence created with `lease_owner` (1..
  // kMaxLeaseOwnerBytes bytes, InvalidArgument naming lease_owner) and
  // returns how many there are (0: nothing renewed, no state kept).
  absl::StatusOr<int64_t> RenewLeases(std::string_view lease_owner);
  // Drops every sequence whose lease expired (lease_seconds > 0) and returns
  // how many; the core's lease thread calls it, tests may too.
  int64_t ExpireLeases();

  // Debugging / tests: the absolute positions held for (sequence, layer, kv
  // head), ascending (indexed chunks and tail). NotFound / InvalidArgument
  // as for Append.
  absl::StatusOr<std::vector<int64_t>> HeldPositions(uint64_t sequence_id, int32_t layer,
                                                     int32_t kv_head);

  // Debugging / tests: for each row of `queries` (rows x head_dim), the
  // positions of the k keys of (sequence, layer, kv head) an Attend would
  // attend to (every chunk searched at its default effort, as an Attend
  // leaving beam / nprobe 0 does, and the tail), best score first; rows of
  // k, padded with -1. NotFound / InvalidArgument as for Append and Attend
  // (k outside [1, kMaxSearchK], a query shape other than rows x head_dim).
  absl::StatusOr<std::vector<int64_t>> SearchPositions(uint64_t sequence_id, int32_t layer,
                                                       int32_t kv_head, ConstMatrixView queries,
                                                       int k);

  // Node-side (debugging, tests, in process): shards of one sequence
  // (NotFound when unknown) or of every sequence, ordered by (sequence,
  // layer, kv head, chunk); no capability or principal is checked.
  absl::StatusOr<std::vector<ShardInfo>> ListShards(std::optional<uint64_t> sequence_id);
  // A caller's ListShards (the RPC): one sequence, `capability` checked, or
  // every sequence `principal` created.
  absl::StatusOr<std::vector<ShardInfo>> ListShards(std::optional<uint64_t> sequence_id,
                                                    std::string_view capability,
                                                    std::string_view principal = "");

  // Shard bytes currently accounted against memory_budget_bytes (reservations
  // of in-flight uploads and appends included). Thread-safe.
  int64_t MemoryUsedBytes() const { return memory_used_.load(std::memory_order_relaxed); }

  // Cheap early admission check for an upload of `n_keys` keys to
  // `sequence_id` (e.g. before a client streams its payload): NotFound for an
  // unknown sequence, ResourceExhausted when the estimate does not fit the
  // budget now. Reserves nothing; UploadShard checks again.
  absl::Status CheckUploadAdmission(uint64_t sequence_id, size_t n_keys,
                                    std::string_view capability = "");

  // Admission for an upload of `n_keys` keys to `sequence_id` whose caller
  // will hold `working_bytes` of buffers while it streams and builds (wire
  // copies, fp32 copies, training data, the persistence copy). Reserves,
  // before any of it is allocated, the shard's estimated bytes in
  // memory_budget_bytes and `working_bytes` in upload_memory_bytes, and
  // returns both reservations: NotFound for an unknown sequence;
  // ResourceExhausted naming the budget that has no room now (nothing is
  // then reserved); InvalidArgument for a negative working_bytes. The caller
  // releases `shard` just before calling UploadShard (which reserves the
  // shard's bytes itself) and `working` when the call ends (both also
  // release on destruction). `capability` is checked first (PermissionDenied
  // before anything is reserved).
  struct UploadAdmission {
    MemoryReservation shard;    // in memory_budget_bytes
    MemoryReservation working;  // in upload_memory_bytes
  };
  absl::StatusOr<UploadAdmission> ReserveUpload(uint64_t sequence_id, size_t n_keys,
                                                int64_t working_bytes,
                                                std::string_view capability = "");

  // Working bytes of in-flight uploads reserved against upload_memory_bytes.
  int64_t UploadMemoryUsedBytes() const {
    return upload_memory_used_.load(std::memory_order_relaxed);
  }

  // Rebuilds the node from `options().persistence` (call once, before the
  // node is used; FailedPrecondition without persistence or on a node that
  // already holds sequences). Recent decode queries and the seal counter are
  // not persisted. Defined in node_recovery.cc.
  //
  // With recovery_quarantine (the default), one bad sequence never stops
  // the node: a sequence whose records are corrupt or inconsistent (DataLoss
  // naming the shard), or whose data would take memory_budget_bytes past
  // its limit (sequences are recovered in id order; each must fit in what
  // the ones before it left), is quarantined: logged to stderr with the
  // reason, counted in Stats().quarantined_sequences, not served (NotFound),
  // and its records stay in the store untouched, so a restart with a larger
  // budget or a repaired store recovers it. CreateSequence of a quarantined
  // id is FailedPrecondition; DropSequence deletes its records. Only an
  // unreadable store fails Recover. Without recovery_quarantine the first
  // bad sequence fails Recover with its DataLoss (and the budget is not
  // checked): the node must not serve.
  absl::Status Recover();

  // --- Node-to-node copy (node_sync.h; defined in node_sync.cc) ----------
  //
  // Source side of SyncShards: reads `query`'s chunks of one sequence. The
  // rows are copied under the sequence's shared lock (one consistent
  // snapshot; appends to that sequence wait for the copy only), after their
  // size is reserved in upload_memory_bytes (ResourceExhausted naming it
  // otherwise; released when this returns); then `on_header` and each
  // `on_chunk` run with no lock held (a slow reader stalls nobody).
  // NotFound for an unknown sequence or (query.all false) a chunk not held;
  // InvalidArgument naming `cursors` for more than kMaxSyncCursors cursors,
  // a duplicate, or a layer / kv head out of range.
  absl::Status ReadShards(const ReadShardsQuery& query,
                          const std::function<absl::Status(const SyncHeader&)>& on_header,
                          const std::function<absl::Status(SyncChunkData)>& on_chunk);

  // Destination side: makes this node hold exactly what `source` holds of
  // request.shards of request.spec's sequence (when empty: every head the
  // source holds anything of ends exactly like the source's, chunks only we
  // hold dropped; heads the source holds nothing of are left alone),
  // creating the sequence when missing. Per chunk: copied whole when
  // missing; when held, only the rows after the last held one travel and
  // the index comes as the source's blob unless ours has the same rows; a
  // chunk whose held rows are not a prefix of the source's (positions the
  // source lacks, other contents by CRC32C, another layout) is read again
  // whole and replaced. Each changed head is installed and persisted
  // (ShardPersistence: one replacing HeadWrite, or for rows that only join
  // the last chunk's tail, one tail write) atomically under the sequence's
  // exclusive lock; nothing is
  // locked while data travels, so other sequences and this one's Attends
  // keep being served. The source's declared payload is reserved in
  // memory_budget_bytes before any of it is received: ResourceExhausted
  // naming the budget then, with nothing changed (a sequence the sync
  // created is dropped again on any failure). Errors: InvalidArgument for a
  // bad spec or selection (naming `shards`, bounded by kMaxSyncCursors);
  // FailedPrecondition when the sequence exists with another spec, the
  // source's spec differs, or the result would put a tail before a later
  // chunk; DataLoss for source data that contradicts itself or its
  // declaration; Aborted when the destination kept changing under the copy
  // (retry); the source's errors as they are.
  absl::StatusOr<SyncResult> SyncShards(const SyncRequest& request, SyncSource* source);

  // Cursors one ReadShards / SyncShards call may carry: the most chunks one
  // sequence can have on a node at kMaxHeadsPerSequence heads x 16 chunks.
  static constexpr size_t kMaxSyncCursors = size_t{1} << 20;

  // Sequence ids quarantined by Recover (ascending), with the reason.
  std::vector<std::pair<uint64_t, std::string>> QuarantinedSequences();

  const NodeCoreOptions& options() const { return options_; }

 private:
  struct EstimateSlot;
  struct Chunk;
  struct HeadState;
  struct Sequence;
  struct SealJob;
  struct BuildJob;

  explicit NodeCore(const NodeCoreOptions& options);
  // A sequence with empty heads for a validated spec.
  static std::shared_ptr<Sequence> NewSequence(const SequenceSpec& spec);
  std::shared_ptr<Sequence> Find(uint64_t sequence_id);
  // OK when `capability` opens `seq` (see the class comment); `op` prefixes
  // the PermissionDenied / InvalidArgument message.
  static absl::Status CheckAccess(const Sequence& seq, std::string_view capability,
                                  absl::string_view op);
  // Find + CheckAccess: NotFound "op: unknown sequence N" when unknown.
  absl::StatusOr<std::shared_ptr<Sequence>> FindFor(uint64_t sequence_id,
                                                    std::string_view capability,
                                                    absl::string_view op);
  // The ListShards of `seqs` (each under its shared lock).
  static std::vector<ShardInfo> Describe(const std::vector<std::shared_ptr<Sequence>>& seqs);
  // DropSequence's work; `capability` null: no check (lease expiry).
  absl::Status Drop(uint64_t sequence_id, const std::string_view* capability);
  // The lease thread: ExpireLeases every lease_seconds / 4 (at most 1 s)
  // until the destructor stops it.
  void LeaseLoop();
  // One Attend, on the caller's thread. `helpers`: the pool that lends
  // idle workers to its per-(head, chunk) searches when search_threads is 0
  // (null: none); see NodeCoreOptions::search_threads.
  absl::Status AttendNow(const AttendRequest& request, PartialsView out, AttendStats* stats,
                         ThreadPool* helpers);
  // One (kv head, shard) search of an Attend: chunk `chunk` of head `g` of
  // the request's layer, or that head's tail when `chunk` is null.
  struct SearchTask {
    int32_t g = 0;
    const Chunk* chunk = nullptr;
  };
  // What one SearchTask produced: the partials of the head's `group` query
  // rows over that shard (merged only when `produced`), and its counts.
  struct SearchResult {
    Partials partials;
    bool produced = false;
    absl::Status status;
    AttendStats stats;
  };
  // Runs `task` for `q` (the head's query rows) into `result`. Thread-safe:
  // reads the shard under the caller's shared sequence lock and uses this
  // thread's own scratch. `k` is the request's k, `estimate` whether to
  // attend the rest by cluster summaries.
  void SearchShard(const std::shared_ptr<Sequence>& seq, int32_t layer, int32_t k,
                   bool estimate, const index::AttendParams& params, ConstMatrixView q,
                   const SearchTask& task, SearchResult* result);
  // Resolves request.shards (non-empty) against `seq`'s layer request.layer
  // (checked by the caller): (*selected)[g] = the slots in head g's chunk
  // list to search, ascending. InvalidArgument naming `shards` for more
  // entries than the layer holds shards, a kv_head out of range or a
  // duplicate; NotFound naming the shard for one not held. Caller holds the
  // sequence lock (shared suffices).
  static absl::Status SelectShards(const Sequence& seq, const AttendRequest& request,
                                   std::vector<std::vector<size_t>>* selected);
  // The cluster summary of chunk `c` (built index) covering all its keys:
  // built on first use, extended when a seal appended keys, its bytes
  // reserved in memory_budget_bytes. Null when it cannot be had (the budget
  // refuses it, the sequence was dropped, or the build fails): the caller
  // attends that chunk exactly. Caller holds the sequence lock (shared
  // suffices); thread-safe (the slot's own mutex).
  // With background summaries (NodeCoreOptions::background_summaries) it
  // never clusters: a missing or outgrown summary is queued on
  // summary_pool_ (RefreshSummary) and the chunk attended exactly meanwhile.
  std::shared_ptr<const index::ClusterSummary> ChunkSummary(
      const std::shared_ptr<Sequence>& seq, int32_t layer, int32_t kv_head, const Chunk& c);
  // Queues RefreshSummary for chunk `c` of (layer, kv_head) unless one is
  // queued already. Caller holds the sequence lock and c.estimate->mu.
  void QueueSummaryLocked(const std::shared_ptr<Sequence>& seq, int32_t layer, int32_t kv_head,
                          const Chunk& c);
  // summary_pool_'s job: clusters the chunk whose slot is `slot` (k-means
  // over its keys with no lock held, then the sums under the shared
  // sequence lock) and installs the summary (InstallSummary). Gives up
  // quietly when the chunk or the sequence is gone.
  void RefreshSummary(const std::shared_ptr<Sequence>& seq, int32_t layer, int32_t kv_head,
                      const std::shared_ptr<EstimateSlot>& slot);
  // Makes `next` the summary of `slot` if the memory budget takes its bytes;
  // otherwise returns the old summary's bytes and marks the slot refused.
  // Returns the slot's summary afterwards. Caller holds slot.mu.
  std::shared_ptr<const index::ClusterSummary> InstallSummary(
      EstimateSlot& slot, std::shared_ptr<index::ClusterSummary> next);
  // Clusters per summary of a chunk of `n` keys.
  size_t SummaryClusters(size_t n) const;
  // AppendAsync's work: applies `request` and, when it changed something
  // that must be persisted, queues the commit and moves `done` into it
  // (*handed_off = true: the commit calls it). Otherwise the caller calls
  // done(returned status).
  absl::Status ApplyAppend(const AppendRequest& request, StatusCallback& done, bool* handed_off);
  // Folds `head`'s whole tail into its last chunk now (a background seal in
  // progress is abandoned) and, when `write` is not null, records the change
  // there. Caller holds the sequence lock exclusively.
  absl::Status Seal(const Sequence& seq, HeadState* head, HeadWrite* write);
  // The background seal protocol (see the file comment), after rows were
  // added to `head`'s tail: installs a finished seal once the tail holds
  // tail_capacity rows beyond it (waiting for its build when not done) and
  // starts the next one once the tail holds tail_capacity rows with none in
  // progress, until neither applies. Records installs in `write` (not
  // null: persistence). Caller holds the sequence lock exclusively.
  absl::Status AdvanceSeals(const Sequence& seq, HeadState* head, HeadWrite* write);
  // Records in `write` that rows [first_row, first_row + rows) of `chunk`
  // joined its index: the chunk's index blob (`blob`, or serialized now when
  // empty), those rows' values and positions, and the tail cleared.
  static absl::Status RecordSeal(const Chunk& chunk, size_t first_row, size_t rows,
                                 std::vector<uint8_t> blob, HeadWrite* write);
  // Rows appended after a seal starts before it is installed:
  // max(1, tail_capacity / 4), the build's time budget in appends.
  size_t SealLag() const { return std::max<size_t>(1, options_.tail_capacity / 4); }
  // The seal `head` would have to install before taking `incoming` more tail
  // rows, when its build is not done yet (null otherwise): ApplyAppend waits
  // for it with the lock released. Caller holds the sequence lock.
  std::shared_ptr<SealJob> SealToAwait(const HeadState& head, size_t incoming) const;
  // Snapshots `head`'s first tail_capacity tail rows into a SealJob and
  // queues it on the seal thread (inline without one). ResourceExhausted
  // when the new index's estimate does not fit memory_budget_bytes (no job
  // then). Caller holds the sequence lock exclusively.
  absl::Status StartSeal(const Sequence& seq, HeadState* head);
  // Builds `job`'s index unless another caller already claimed it.
  void RunSeal(const std::shared_ptr<SealJob>& job);
  // Deferred builds (NodeCoreOptions::defer_index_build). QueueBuild makes
  // `chunk` (just stored with a flat index over `upload`'s keys) pending:
  // copies the training inputs, reserves them plus `index_bytes` (the
  // index's estimated bytes beyond the flat one) and queues RunBuild. false
  // when they do not fit the budget (the caller then builds synchronously).
  // Caller holds the sequence lock exclusively.
  bool QueueBuild(const std::shared_ptr<Sequence>& seq, const ShardUpload& upload,
                  int64_t index_bytes, Chunk* chunk);
  // Builds `job`'s index unless already claimed (or abandoned: every target
  // gone, or the node stopping), then installs it into every target chunk
  // still pending on it (InstallBuild) and returns its reservation. Takes
  // no lock while building.
  void RunBuild(const std::shared_ptr<BuildJob>& job);
  // Swaps `job`'s result into chunk `chunk` of (layer, kv_head) of `seq`
  // when that chunk still waits for it; persists it. Takes the sequence
  // lock exclusively.
  void InstallBuild(const std::shared_ptr<BuildJob>& job, const std::shared_ptr<Sequence>& seq,
                    int32_t layer, int32_t kv_head, int32_t chunk);
  // Runs `job` if nobody has, and returns once it has been installed or
  // discarded. Call with no sequence lock held.
  void WaitBuild(const std::shared_ptr<BuildJob>& job);
  // The newest min(recent_count, max_rows) rows of `head`'s decode query
  // ring, oldest first (takes head->query_mu).
  static Matrix RecentQueries(HeadState* head, size_t dim, size_t max_rows);
  // Recalibration of (layer, kv_head) of `seq` on its ring of decode
  // queries (NodeCoreOptions::recalibrate_every); runs on recal_pool_.
  void Recalibrate(const std::shared_ptr<Sequence>& seq, int32_t layer, int32_t kv_head);
  // The index `index` (a chunk's, not flat) should have after calibration on
  // `queries`: itself recalibrated, or, when `flat_bytes` is not null and
  // the sequence asks for index auto, a flat index when its kind misses the
  // target or models no faster than the scan; *flat_bytes then holds the
  // flat keys' bytes, reserved in memory_budget_bytes (the caller settles or
  // returns them), else 0. Null when calibration failed or the flat keys did
  // not fit the budget.
  std::shared_ptr<index::KeyIndex> CalibrateOnRing(const std::shared_ptr<index::KeyIndex>& index,
                                                   IndexType want, ConstMatrixView queries,
                                                   int64_t* flat_bytes);
  // Returns once `job` is done, running it here when nobody started it.
  void WaitSeal(const std::shared_ptr<SealJob>& job);
  // Swaps a done `head->sealing` into the last chunk and drops its rows from
  // the tail; records it in `write` when not null (clear the tail, write the
  // chunk, rewrite the remaining tail rows). Caller holds the lock exclusively.
  absl::Status InstallSeal(const Sequence& seq, HeadState* head, HeadWrite* write);
  // Recover: removes `sequence_id` from the served sequences (returning its
  // memory), records it as quarantined and logs `why`.
  void Quarantine(uint64_t sequence_id, const absl::Status& why);
  // SyncShards' work (node_sync.cc): what the destination holds, as the
  // cursors of a ReadShardsQuery; reading from `source` into `chunks`
  // with the declared payload reserved in `reservation`; building (and, with
  // `install`, installing and persisting) every head the chunks touch.
  absl::Status PlanSync(const SyncRequest& request, ReadShardsQuery* query);
  absl::Status ReceiveSync(const SyncRequest& request, const ReadShardsQuery& query,
                           SyncSource* source, std::vector<SyncChunkData>* chunks,
                           MemoryReservation* reservation, int64_t* bytes);
  // CRC32C of rows [0, rows) of chunk slot `slot` of `head` (index rows,
  // then tail rows for the last chunk): per row key, raw value, position.
  // Caller holds the sequence lock.
  static uint32_t PrefixCrc(const HeadState& head, size_t slot, size_t rows, size_t row_bytes);
  // AssembleSync's fast path for the common catch-up: the only change to
  // `head` in `incoming` is rows appended to its last chunk's tail (no new
  // chunk, no index change, nothing dropped). Appends them in place as an
  // Append would and persists only them; Unimplemented (nothing changed)
  // when the delta is not of that kind. Caller holds the sequence lock
  // exclusively and has checked that what we hold is a prefix.
  absl::Status AppendSyncedTail(const Sequence& seq, HeadState* head,
                                const std::map<int32_t, SyncChunkData*>& incoming, bool all,
                                SyncResult* result);
  absl::Status AssembleSync(Sequence* seq, std::vector<SyncChunkData>& chunks, bool all,
                            bool install, std::vector<SyncCursor>* divergent,
                            SyncResult* result);
  // Installs one recovered head into `seq` (Recover, node_recovery.cc).
  // DataLoss naming the shard when it disagrees with the spec.
  absl::Status InstallHead(Sequence* seq, RecoveredHead recovered);
  // The sticky persistence failure (OK while none).
  absl::Status PersistenceError();
  // Makes every later write fail; returns the status the failing call gets.
  absl::Status FailPersistence(const absl::Status& cause, absl::string_view where);
  // Commits `write` to the persistence (OK without one); a failure is sticky.
  absl::Status Persist(const HeadWrite& write, absl::string_view where);
  // Builds the index a chunk of `n` keys should have.
  absl::StatusOr<std::unique_ptr<index::KeyIndex>> BuildIndex(
      IndexType type, ConstMatrixView keys, std::span<const int64_t> train_topk,
      size_t topk_width, ConstMatrixView train_queries, int train_k,
      const index::Holdout& holdout = {}, size_t queries_per_search = 1);
  // BuildIndex with its parallel parts on `pool` (null: the calling thread
  // only; BuildIndex uses pool_).
  absl::StatusOr<std::unique_ptr<index::KeyIndex>> BuildIndexOn(
      ThreadPool* pool, IndexType type, ConstMatrixView keys, std::span<const int64_t> train_topk,
      size_t topk_width, ConstMatrixView train_queries, int train_k,
      const index::Holdout& holdout = {}, size_t queries_per_search = 1);
  // Estimated bytes `n` more keys of `spec` take (keys, values, positions,
  // graph edges).
  int64_t EstimateBytes(const SequenceSpec& spec, size_t n) const;
  // Adds `bytes` to memory_used_ if it fits the budget; ResourceExhausted
  // naming the budget and `where` otherwise.
  absl::Status ReserveMemory(int64_t bytes, absl::string_view where);
  // Replaces `reserved` bytes with the change in `head`'s actual bytes.
  // Caller holds the sequence lock exclusively.
  void SettleMemory(HeadState* head, int64_t reserved);
  // Bytes `head` holds now (chunks, indexes, values, positions, tail).
  static int64_t HeadBytes(const HeadState& head);

  NodeCoreOptions options_;
  std::unique_ptr<ThreadPool> pool_;
  // Runs background seal builds (one thread; null when `threads` is 0: seals
  // build inline). Declared after pool_ so it is joined first.
  std::unique_ptr<ThreadPool> seal_pool_;
  // Runs AttendBatchAsync items (attend_threads threads; null: pool_ does).
  // Reset first in the destructor.
  std::unique_ptr<ThreadPool> batch_pool_;
  // Helpers for per-head searches when search_threads > 1 (search_threads -
  // 1 threads; null otherwise). Reset after pool_ and batch_pool_, whose
  // Attends schedule onto it.
  std::unique_ptr<ThreadPool> search_pool_;
  // Runs recalibrations (one thread; null when recalibrate_every is 0).
  // Destroyed after pool_: Attends schedule onto it.
  std::unique_ptr<ThreadPool> recal_pool_;
  // Builds chunk summaries (one thread; null unless background_summaries
  // and threads > 0). Destroyed after pool_: Attends queue onto it.
  std::unique_ptr<ThreadPool> summary_pool_;
  // Runs deferred index builds (index_build_threads; null when
  // defer_index_build is off or it is 0). Reset first in the destructor,
  // after stopping_ is set: queued builds are then discarded; a running one
  // finishes (it uses pool_).
  std::unique_ptr<ThreadPool> build_pool_;
  std::atomic<bool> stopping_{false};
  std::atomic<int64_t> builds_pending_{0};  // deferred builds queued or running
  std::atomic<int64_t> recalibrations_{0};
  std::mutex mu_;  // guards sequences_
  std::map<uint64_t, std::shared_ptr<Sequence>> sequences_;
  // Sequences Recover set aside (id -> reason); guarded by mu_.
  std::map<uint64_t, std::string> quarantined_;
  // With persistence: serialises CreateSequence / DropSequence so their
  // store writes land in the order their effects became visible.
  std::mutex lifecycle_mu_;
  std::atomic<bool> persistence_failed_{false};
  std::mutex persistence_error_mu_;  // guards persistence_error_
  absl::Status persistence_error_;
  std::atomic<int64_t> seals_{0};
  std::atomic<int64_t> shard_uploads_{0};  // UploadShard calls that stored a shard
  std::atomic<int64_t> forks_{0};          // ForkSequence calls that created a sequence
  std::atomic<int64_t> memory_used_{0};
  std::atomic<int64_t> upload_memory_used_{0};
  // Leases: when each lease owner last created a sequence or renewed
  // (guarded by mu_; only owners that hold sequences have an entry).
  std::map<std::string, std::chrono::steady_clock::time_point> lease_renewed_;
  // Capability hashes of quarantined sequences whose spec record was read
  // (guarded by mu_): DropSequence of those checks it.
  std::map<uint64_t, std::string> quarantined_capability_;
  std::atomic<int64_t> leases_expired_{0};
  std::mutex lease_mu_;  // guards lease_stop_
  std::condition_variable lease_cv_;
  bool lease_stop_ = false;
  std::thread lease_thread_;
};

// A SyncSource reading from a NodeCore in this process (tests, embedded):
// Read is NodeCore::ReadShards. `core` is not owned and must outlive this.
class NodeCoreSyncSource final : public SyncSource {
 public:
  explicit NodeCoreSyncSource(NodeCore* core) : core_(core) {}
  absl::Status Read(const ReadShardsQuery& query,
                    const std::function<absl::Status(const SyncHeader&)>& on_header,
                    const std::function<absl::Status(SyncChunkData)>& on_chunk) override {
    return core_->ReadShards(query, on_header, on_chunk);
  }

 private:
  NodeCore* core_;
};

}  // namespace kvr::retrieval
