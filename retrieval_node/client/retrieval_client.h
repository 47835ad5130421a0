// RetrievalClient: how the decode worker talks to retrieval nodes.
//
// The request and reply types are the node core's plain C++ structs
// (retrieval_node/core/node_types.h: no protobuf, no sockets). The
// implementations live beside this file: InProcessRetrievalClient (a
// NodeCore in this process: embedded mode, tests), GrpcRetrievalClient and
// UcxRetrievalClient (one kvr_node), MultiNodeClient (shards placed over
// many); MakeRetrievalClient (client_factory.h) builds the right one from a
// --nodes spec.
//
// Ordering: calls issued from one thread for one sequence take effect in
// issue order. UploadShard / Append / DropSequence / CreateSequence return when
// the change is visible to every later Attend; AppendAsync's callback runs
// when it is (and appends to one head apply in issue order). AttendAsync
// completes later.
//
// Tenant isolation: a sequence may be created with a capability (random
// bytes, retrieval_node/core/sequence_access.h) that every later request
// for it carries (the `capability` field of ShardUpload, AppendRequest,
// AttendRequest, SyncRequest; DropSequence's argument); nodes refuse other
// callers with PermissionDenied. Networked clients also give each sequence
// they create this process's lease owner (ProcessLeaseOwner) and renew its
// leases while they live.
//
// Thread-safety: implementations are thread-safe.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>

#include "common/attention.h"
#include "common/status.h"
#include "retrieval_node/core/node_types.h"

namespace kvr::retrieval {

// Replication health of a client over several nodes (MultiNodeClient), for
// the worker's metrics; counters are totals since the client was created.
struct ReplicationStats {
  int64_t nodes = 0;                     // nodes known (current set + nodes live sequences use)
  int64_t nodes_up = 0;                  // of those, live now
  int64_t under_replicated_shards = 0;   // shards with fewer than R live, in-sync owners
  int64_t attend_failovers_unavailable = 0;  // node requests re-routed after UNAVAILABLE/CANCELLED
  int64_t attend_failovers_deadline = 0;     // ... after DEADLINE_EXCEEDED
  int64_t attend_failovers_down = 0;         // shards routed past a down / stale first owner
  int64_t syncs_started = 0;
  int64_t syncs_succeeded = 0;
  int64_t syncs_failed = 0;
  int64_t keys_synced = 0;
};

class RetrievalClient {
 public:
  virtual ~RetrievalClient() = default;

  // Registers a sequence. InvalidArgument for a bad shape (naming the field
  // and its limit); AlreadyExists if the id is taken.
  virtual absl::Status CreateSequence(const SequenceSpec& spec) = 0;
  // CreateSequence with the sequence's capability (empty: an open
  // sequence). The default, for clients that reach no node (test doubles),
  // ignores the capability; every client of a node overrides it.
  virtual absl::Status CreateSequence(const SequenceSpec& spec, std::string_view capability) {
    return CreateSequence(spec);
  }

  // Stores a shard and builds its index before returning. NotFound for an
  // unknown sequence; InvalidArgument for dims/ranges that disagree with the
  // sequence spec, non-finite keys, bad training ids, or positions not after
  // those already held for (layer, kv head); AlreadyExists for a known chunk.
  virtual absl::Status UploadShard(const ShardUpload& upload) = 0;

  // Appends tokens to the last chunk of (layer, kv head) (chunk 0 is created
  // when none exists). Same errors as UploadShard.
  virtual absl::Status Append(const AppendRequest& request) = 0;

  // Append without waiting. `request` (its matrices included) is read only
  // before this returns: the caller may reuse its buffers at once. `done`
  // runs exactly once, on any thread (possibly before this returns), with
  // the status Append would have returned. Guarantees: appends to one
  // (sequence, layer, kv head) issued in order (from one thread, or each
  // issued after the previous one returned) are applied in that order,
  // whatever their completions' order; every Attend issued after `done` ran
  // with OK sees the tokens. Appends to different heads and sequences run
  // concurrently (a networked node groups their durable writes), so the
  // decode step can issue all of a layer's appends, then wait for all.
  // The default runs Append inline (transports override it).
  virtual void AppendAsync(const AppendRequest& request, StatusCallback done);

  // Starts the top-k partial attention of `request.queries` over every shard
  // of (sequence, layer). On success out[h] (n_heads partials of head_dim)
  // holds query head h's partial merged over the node's shards (the empty
  // partial, l = 0, when the node holds no key for that head) and `stats`
  // (may be null) is filled. `request.queries`, `out` and `stats` must stay
  // valid until `done` runs. Errors (to `done`): NotFound for an unknown
  // sequence, InvalidArgument for shape mismatches or k outside [1, 4096].
  virtual void AttendAsync(const AttendRequest& request, PartialsView out, AttendStats* stats,
                           StatusCallback done) = 0;

  // Many Attends as one call: a decode step sends one per node and layer for
  // every sequence of its batch. `items` (requests, outputs, stats) must
  // stay valid until `done` runs. Before `done` runs every item's `status`
  // is set to what AttendAsync would have given that item (a failing item
  // fails only its own slot; the others' partials are exact). `done` gets OK
  // when each item got its own answer, or the error that refused the whole
  // call (transport, the batch's own limits: --max_batch_items, the message
  // cap), which is then every item's status too. The default issues the
  // per-item AttendAsync calls at once (so test doubles and forwarding
  // clients keep working); transports override it with one round trip.
  virtual void AttendBatchAsync(std::span<AttendBatchItem> items, StatusCallback done);

  // Many Appends as one call. The requests (their matrices included) are
  // read only before this returns. Items apply in item order per head, and
  // after every earlier append of the same head whose `done` already ran;
  // when `done` runs (contract as for AttendBatchAsync) every item with OK
  // status is visible to later Attends. The default issues per-item
  // AppendAsync calls in item order.
  virtual void AppendBatchAsync(std::span<AppendBatchItem> items, StatusCallback done);

  // Forgets a sequence and frees its shards. NotFound for an unknown id.
  virtual absl::Status DropSequence(uint64_t sequence_id) = 0;
  // DropSequence presenting the sequence's capability (default as for
  // CreateSequence).
  virtual absl::Status DropSequence(uint64_t sequence_id, std::string_view capability) {
    return DropSequence(sequence_id);
  }

  // Creates sequence `fork_id` (capability `fork_capability`, this
  // process's lease owner) as a copy of `source_id`, presenting the
  // source's capability: the node(s) share the source's sealed indexes and
  // copy the rest (NodeCore::ForkSequence; errors as there). Later writes
  // to either sequence touch only that one. The default (clients of no
  // node that can fork: test doubles) returns Unimplemented, and callers
  // fall back to creating and uploading the fork themselves.
  virtual absl::Status ForkSequence(uint64_t source_id, std::string_view source_capability,
                                    uint64_t fork_id, std::string_view fork_capability);

  virtual absl::StatusOr<NodeStats> Stats() = 0;

  // Makes the node this client talks to hold exactly what
  // `request.source_address` holds of the selected shards, copied node to
  // node (the caller moves no K/V): chunks it lacks are copied whole, held
  // chunks get the rows after its last position, and a head whose rows
  // disagree with the source's is replaced. Returns what was copied and the
  // resulting last positions. Unavailable / DeadlineExceeded when either
  // node cannot be reached. The default (clients of no single networked
  // node) returns Unimplemented.
  virtual absl::StatusOr<SyncResult> SyncShards(const SyncRequest& request);

  // Nodes a new sequence is placed on now (1 for a client of one node).
  // Thread-safe.
  virtual size_t num_nodes() const { return 1; }

  // Replication health, for a client that replicates shards over several
  // nodes; false (and `out` untouched) for every other client. Thread-safe.
  virtual bool GetReplicationStats(ReplicationStats* /*out*/) const { return false; }

  // Blocking form of AttendAsync.
  absl::Status Attend(const AttendRequest& request, PartialsView out, AttendStats* stats = nullptr);
  // Blocking forms of AttendBatchAsync / AppendBatchAsync: the batch-level
  // status (per-item outcomes in the items).
  absl::Status AttendBatch(std::span<AttendBatchItem> items);
  absl::Status AppendBatch(std::span<AppendBatchItem> items);
};

// A new sequence's handle, as a worker picks it: a random non-zero 64-bit
// id and a random kCapabilityBytes capability (both from the CSPRNG, so
// workers sharing nodes do not collide and cannot guess each other's).
// Internal when the CSPRNG fails.
struct SequenceHandle {
  uint64_t id = 0;
  std::string capability;
};
absl::StatusOr<SequenceHandle> NewSequenceHandle();

// This process's lease owner: 16 random bytes (CSPRNG) drawn once, sent as
// CreateSequenceRequest.lease_owner / SyncShardsRequest.lease_owner and in
// RenewLeases by every networked client of the process. Thread-safe.
const std::string& ProcessLeaseOwner();

}  // namespace kvr::retrieval
