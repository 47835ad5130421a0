// The retrieval node's request and reply types: plain C++ structs (no
// protobuf, no sockets) shared by the node core (node_core.h), its
// persistence (shard_persistence.h), every RetrievalClient
// (retrieval_node/client/) and the kvr.v1 conversion (retrieval_node/wire/).
//
// Data model. A sequence is registered once (CreateSequence) with its shape.
// Its offloaded K/V live in shards keyed by (sequence id, layer, kv head,
// chunk index); a chunk is a contiguous token range. Every held token carries
// its absolute position in the sequence; per (layer, kv head) positions must
// strictly increase across uploads and appends, so the node never holds a
// token twice (the worker's "every token attended exactly once" invariant:
// sinks ∪ window ∪ node-held, disjoint).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "common/attention.h"
#include "common/status.h"
#include "common/tensor.h"
#include "common/value_matrix.h"
#include "retrieval_node/index/index.h"

namespace kvr::retrieval {

// Which index a shard is built with: the index layer's enum (one for the
// whole tree), named here because the request types below carry it.
using index::IndexType;
using index::IndexTypeName;
using index::ParseIndexType;

struct ShardKey {
  uint64_t sequence_id = 0;
  int32_t layer = 0;
  int32_t kv_head = 0;
  int32_t chunk = 0;

  std::string DebugString() const;
  friend bool operator==(const ShardKey&, const ShardKey&) = default;
};

// The shape of one sequence's attention, fixed at CreateSequence.
struct SequenceSpec {
  uint64_t sequence_id = 0;
  int32_t n_layers = 0;
  int32_t n_heads = 0;     // query heads per layer; GQA group = n_heads / n_kv_heads
  int32_t n_kv_heads = 0;  // divides n_heads
  int32_t head_dim = 0;    // key, query and value width
  DType value_dtype = DType::kF32;  // how the node stores values
  IndexType index_type = IndexType::kGraph;
};

// What a sequence's creator gives the node besides the spec (tenant
// isolation, docs/security.md): the capability every later request for the
// sequence must present (sequence_access.h: 16..64 bytes; empty: an open
// sequence that only requests with no capability reach), the lease owner
// that keeps it alive (empty: no lease, never expires) and the creator's
// principal (set by the node's server from the peer's certificate, "" when
// insecure or in process; never taken from a client's message).
struct SequenceAccess {
  std::string capability;
  std::string lease_owner;
  std::string principal;
};

// What the node keeps of a SequenceAccess, persisted with the spec: the
// capability's SHA-256 (empty for an open sequence), the principal and the
// lease owner.
struct SequenceOwner {
  std::string capability_sha256;
  std::string principal;
  std::string lease_owner;
};

// One shard's keys and values plus the training data its index is built
// from. Views must stay valid for the duration of the call only.
struct ShardUpload {
  ShardKey key;
  int64_t first_position = 0;  // absolute position of row 0 (rows are consecutive)
  ConstMatrixView keys;        // n x head_dim, rotated (post-RoPE), finite
  ConstMatrixView values;      // n x head_dim (fp32; stored as the sequence's value_dtype)
  // Training data for the graph index (ignored by flat/IVF), either:
  //  * train_topk: rows of train_topk_width key ids (0 .. n-1, best first,
  //    -1 pads), e.g. each prefill query's exact top-k over `keys`; or
  //  * train_queries (m x head_dim): the node computes their exact top-train_k.
  // With neither, the keys themselves serve as training queries.
  std::span<const int64_t> train_topk;
  size_t train_topk_width = 0;
  ConstMatrixView train_queries;
  int train_k = 32;
  // Held-back training queries for self-calibration (index/calibrate.h):
  // holdout_queries (rows x head_dim, at most index::kMaxHoldoutQueries,
  // not among the training rows above) and their exact top ids over `keys`
  // (holdout_topk: rows x holdout_topk_width, best first, -1 pads). With
  // them the node picks the graph beam / IVF nprobe (and, for
  // IndexType::kAuto, the kind) meeting NodeCoreOptions::calibration's
  // target recall; without them the index keeps its default effort and its
  // expected recall is unknown.
  ConstMatrixView holdout_queries;
  std::span<const int64_t> holdout_topk;
  size_t holdout_topk_width = 0;
  std::string capability;  // the sequence's (SequenceAccess::capability)
};

// Tokens that left the worker's window, for one (sequence, layer, kv head).
// They go to the tail of the last chunk (a flat-scanned buffer that is folded
// into the chunk's index when it fills).
struct AppendRequest {
  uint64_t sequence_id = 0;
  int32_t layer = 0;
  int32_t kv_head = 0;
  int64_t first_position = 0;  // absolute position of row 0 (rows are consecutive)
  ConstMatrixView keys;        // n x head_dim (may be a strided column slice)
  ConstMatrixView values;      // n x head_dim
  std::string capability;      // the sequence's (SequenceAccess::capability)
};

// One decode step's queries for one layer: every query head (query head h
// reads kv head h / (n_heads / n_kv_heads)), searched in every shard of that
// layer the node holds.
// One shard of a (sequence, layer): chunk `chunk` of kv head `kv_head`.
// The tokens appended to a head join its last chunk, so selecting a head's
// last chunk selects its appended tail too.
struct HeadChunkRef {
  int32_t kv_head = 0;
  int32_t chunk = 0;
  friend bool operator==(const HeadChunkRef&, const HeadChunkRef&) = default;
};

// Remainder estimation of one Attend (kvr.v1 EstimateMode; issue 18):
// kDefault follows the node's --estimate, kOff / kOn override it.
enum class EstimateMode : int32_t { kDefault = 0, kOff = 1, kOn = 2 };

struct AttendRequest {
  uint64_t sequence_id = 0;
  int32_t layer = 0;
  ConstMatrixView queries;  // n_heads x head_dim, rotated
  int k = 100;              // top-k per query head per shard (clamped to the shard's size)
  int beam = 0;             // graph beam width (0: index default)
  int nprobe = 0;           // IVF lists probed (0: index default)
  float scale = 0.0f;       // score scale; 0 = 1 / sqrt(head_dim)
  // Which shards of (sequence, layer) to search: empty = every shard the
  // node holds; otherwise only these (each at most once; a listed shard the
  // node does not hold is NotFound naming it). With R > 1 replicas a worker
  // asks each node for the shards it chose that node for, so no shard is
  // attended twice. Must stay valid until the call completes.
  std::span<const HeadChunkRef> shards;
  std::string capability;  // the sequence's (SequenceAccess::capability)
  // On: each query head's partial also covers every key of the searched
  // chunks that top-k did not retrieve, estimated from the chunk's cluster
  // summary (retrieval_node/index/cluster_summary.h), and the searched
  // tails are attended exactly in full. Off: exact top-k only (bit-identical
  // to an Attend before estimation existed).
  EstimateMode estimate = EstimateMode::kDefault;
};

// One shard of a sequence, any layer.
struct ShardRef {
  int32_t layer = 0;
  int32_t kv_head = 0;
  int32_t chunk = 0;
  friend bool operator==(const ShardRef&, const ShardRef&) = default;
};

// Node-to-node catch-up / re-replication (RetrievalClient::SyncShards): the
// node the call goes to (the destination) copies shards of one sequence
// from another node (the source) directly, not through the caller.
struct SyncRequest {
  SequenceSpec spec;           // the sequence (created on the destination if missing)
  std::string source_address;  // the source kvr_node, "host:port" (its gRPC address)
  // The shards to make identical to the source's; empty = every shard the
  // source holds of the sequence.
  std::vector<ShardRef> shards;
  // The sequence's capability (checked against the destination's sequence,
  // stored with it when the sync creates it, presented to the source) and
  // the lease owner a created sequence gets.
  std::string capability;
  std::string lease_owner;
  // The caller's principal, set by the node's server (never from the
  // client's message): a sequence the sync creates is owned by it.
  std::string principal;
};

struct SyncResult {
  int64_t keys_copied = 0;   // rows the destination received
  int64_t bytes_copied = 0;  // payload bytes received from the source
  // After the sync, the last position the destination holds per (layer, kv
  // head) among the synced shards' heads: [layer * n_kv_heads + kv_head],
  // -1 when it holds none of that head.
  std::vector<int64_t> last_positions;
};

// Work done by one Attend (summed over query heads and shards).
struct AttendStats {
  int64_t shards_searched = 0;
  int64_t keys_held = 0;      // keys the searched shards hold, per query head, summed
  int64_t keys_attended = 0;  // keys whose values entered a partial
  int64_t distance_computations = 0;
  int64_t keys_estimated = 0;      // keys covered by the estimate, per query head, summed
  int64_t clusters_estimated = 0;  // cluster pseudo-keys that entered a partial, summed
  // Keys the estimate's exact zone attended exactly (NodeCoreOptions::
  // exact_zone_keys_fraction), per query head, summed.
  int64_t keys_exact_zone = 0;
  // Cluster summaries this Attend clustered (k-means) on its own thread: 0
  // unless NodeCoreOptions::background_summaries is false.
  int64_t summaries_clustered = 0;
};

struct NodeStats {
  int64_t sequences = 0;
  int64_t shards = 0;
  int64_t indexed_keys = 0;  // keys inside built indexes
  int64_t tail_keys = 0;     // appended keys not yet sealed into an index
  int64_t seals = 0;         // tail buffers folded into an index, since start
  int64_t memory_bytes = 0;  // keys, values, indexes, tails
  int64_t quarantined_sequences = 0;  // set aside by recovery (NodeCore::Recover)
  int64_t leases_expired = 0;  // sequences dropped because their lease expired, since start
  // Chunk indexes recalibrated on decode queries and swapped in, since start
  // (NodeCoreOptions::recalibrate_every).
  int64_t recalibrations = 0;
  // Shards stored by UploadShard (each built its chunk's index), and
  // sequences created by ForkSequence, since start.
  int64_t shard_uploads = 0;
  int64_t forks = 0;
  // Deferred index builds queued or running (NodeCoreOptions::
  // defer_index_build; metric kvr_node_index_builds_pending).
  int64_t index_builds_pending = 0;
};

// Completion of an asynchronous call; runs exactly once, on any thread.
using StatusCallback = std::function<void(absl::Status)>;

// One item of a batched Attend (RetrievalClient::AttendBatchAsync,
// NodeCore::AttendBatchAsync): the request, where its partials and stats go
// (as AttendAsync's `out` / `stats`, valid until the batch completes) and,
// once the batch completed, the item's own outcome. A failing item fails
// only this slot.
struct AttendBatchItem {
  AttendRequest request;
  PartialsView out;
  AttendStats* stats = nullptr;  // may be null
  absl::Status status;           // set by the batch call
};

// One item of a batched Append (AppendBatchAsync): the request (its
// matrices read only before the batch call returns) and its outcome.
struct AppendBatchItem {
  AppendRequest request;
  absl::Status status;  // set by the batch call
};

// One chunk of one (sequence, layer, kv head), as ListShards reports it.
struct ShardInfo {
  ShardKey key;
  int64_t n_keys = 0;           // keys in the chunk's index
  int64_t tail_keys = 0;        // appended keys not yet sealed (last chunk only)
  int64_t first_position = -1;  // lowest position in the chunk and its tail (-1: none)
  int64_t last_position = -1;   // highest (-1: none)
  IndexType index_type = IndexType::kFlat;  // the index the chunk has now
  int64_t memory_bytes = 0;     // chunk (and, for the last chunk, tail) bytes
  // Self-calibration (index/calibrate.h): the default search effort the
  // chunk's index chose (graph beam, IVF nprobe or pca_sq8 rerank factor
  // (index::CalibratedEffort); 0: the index's built-in
  // default) and its recall@k on the held-back queries (-1: unknown, no
  // held-back queries; 1 for a flat index).
  int32_t search_effort = 0;
  double expected_recall = -1;
  // Index auto: the chosen kind's measured search time at that effort, µs
  // per query (CalibrationResult::measured_us); 0: not measured.
  double measured_search_us = 0;
  // The chunk's index is being built in the background
  // (NodeCoreOptions::defer_index_build): until then it is searched exactly
  // through a flat index (index_type kFlat).
  bool index_pending = false;
};

// A one-shot wait for an asynchronous call: pass callback() as `done`, then
// Wait() for its status. Not reusable.
class StatusWaiter {
 public:
  StatusWaiter();
  ~StatusWaiter();
  StatusCallback callback();
  absl::Status Wait();

 private:
  struct State;
  std::shared_ptr<State> state_;
};

}  // namespace kvr::retrieval
