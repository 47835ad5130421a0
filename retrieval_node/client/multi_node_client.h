// MultiNodeClient: one RetrievalClient over several retrieval nodes (each
// any RetrievalClient: gRPC, in-process), shards placed by rendezvous hashing
// (services/infra/placement) on R replicas (MultiNodeOptions::replicas).
//
// Placement. A sequence is placed on the nodes that are live when
// CreateSequence runs (its "view", kept for life, so shards never move);
// shard (layer, kv head, chunk) is owned by the R_seq = min(R, live nodes)
// heaviest nodes of the view, in replica order (a sequence with R_seq < R is
// under-replicated and counted so). Appends go to the (layer, kv head)'s
// last uploaded chunk (chunk 0 when none was).
//
// Per sequence, each node of the view is in sync or STALE. A stale node
// missed a write (or was down, and so may have lost any); it gets neither
// writes nor Attends of that sequence until a sync made it identical to a
// live in-sync owner (below).
//
//   * CreateSequence goes to every node of the view in parallel. A
//     non-transport error (InvalidArgument, AlreadyExists...) from any node
//     fails it (the others drop it again). Nodes failing with UNAVAILABLE /
//     DEADLINE_EXCEEDED / CANCELLED become stale; it succeeds while fewer
//     than R_seq nodes failed, i.e. every shard keeps an in-sync owner (with
//     R = 1 every node must accept, as before).
//   * UploadShard / Append / AppendAsync go to every live, in-sync owner of
//     the chunk in parallel, complete when every one of them answered (a
//     hung owner answers UNAVAILABLE once the gRPC keepalive drops its
//     connection, ~1 s) and succeed when one acknowledged. An owner that
//     is down, or failed while another succeeded, becomes stale. When every
//     owner failed: the first non-transport error (nobody is marked stale:
//     all refused alike), else Unavailable; no live in-sync owner at all is
//     Unavailable naming the shard.
//   * AttendAsync picks, per (kv head, chunk) of the layer, the first live,
//     in-sync owner in replica order and sends ONE request per chosen node
//     listing exactly its shards (AttendRequest::shards; the list is left
//     empty, "everything you hold", when the node was chosen for every shard
//     it owns: always so with R = 1), so no shard is attended twice. A node
//     answering UNAVAILABLE / DEADLINE_EXCEEDED / CANCELLED is suspected
//     down (MultiNodeOptions::suspect_for) and its shards re-routed to their
//     next live in-sync owner within the same Attend; the Attend fails only
//     when some shard has no owner left (Unavailable naming the shard) or a
//     node answers any other error. Partials are merged by LSE in request
//     order (deterministic for a given routing).
//   * DropSequence goes to the live nodes of the view in parallel (transport
//     errors ignored). A node that is down, or did not answer, is remembered
//     ("dropped while down", at most kMaxOrphansPerNode per node, oldest
//     forgotten first) and sent the drop again when it is next seen live.
//
// Liveness. SetNodeUp (fed by a health watcher: GrpcRetrievalClient::
// WatchHealth via health_sink(), or by tests) marks a node down or up; a
// node that comes back is marked stale for every live sequence that uses it
// (it may have lost anything). A background sync thread (never holding the
// routing mutex across a call) brings stale live nodes back: per source
// (the first other live in-sync owner of each shard) one SyncShards call
// with the shards the node owns. From the moment a sync is planned until it
// ends, every append issued to a chunk the node owns is also copied into a
// catch-up log (kMaxCatchUpBytes per (sequence, node); overflow restarts the
// round). After the copies, the replies must cover every position issued
// before the log began; then the log is replayed to the node (AppendAsync,
// rows the copy already brought skipped) until it is empty, and the node is
// in sync again only when it holds exactly the last positions this client
// has ISSUED for those heads (checked under the mutex, no network call: from
// then on appends go to it directly). Otherwise it syncs again, backing off
// from sync_backoff up to 16x. So a sequence that keeps decoding still
// converges (without the log each copy lagged the appends made meanwhile).
// Up to kParallelSyncs syncs run at once. A stale node that owns no shard
// yet just gets CreateSequence.
//
// Membership changes (SetNodes, or Follow a services/infra/membership set)
// change the set NEW sequences are placed on; a node that left stays
// connected while a live sequence still uses it. Clients are reused by node
// id across views.
//
// Thread-safety: thread-safe. The per-sequence routing state lives here, so
// every write for a sequence must go through the same MultiNodeClient.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/time/time.h"
#include "retrieval_node/client/retrieval_client.h"
#include "services/infra/membership/membership.h"
#include "services/infra/placement/placement.h"

namespace kvr::retrieval {

struct MultiNodeOptions {
  // Owners per chunk, >= 1; a sequence created with fewer live nodes gets
  // that many (and counts as under-replicated).
  int replicas = 1;
  // How long a node whose call failed with a transport error gets no
  // requests (its health watch can only mark it down sooner, not up).
  absl::Duration suspect_for = absl::Seconds(1);
  // First wait before re-trying a failed or incomplete sync of one
  // (sequence, node); doubles per failure up to 16x.
  absl::Duration sync_backoff = absl::Milliseconds(100);
};

class MultiNodeClient final : public RetrievalClient {
 public:
  // At most this many sequence ids are remembered per node for a drop that
  // could not be delivered ("dropped while down").
  static constexpr size_t kMaxOrphansPerNode = 4096;
  // Bytes of appends kept per (sequence, node) while that node catches up.
  static constexpr int64_t kMaxCatchUpBytes = int64_t{64} << 20;
  // Syncs (or orphan-drop deliveries) run at once by the sync thread.
  static constexpr size_t kParallelSyncs = 4;

  // Opens a client to a node that joined (e.g. GrpcRetrievalClient::Create).
  using Connector =
      std::function<absl::StatusOr<std::unique_ptr<RetrievalClient>>(const placement::NodeInfo&)>;

  // clients[i] talks to nodes[i]. InvalidArgument for an empty or mismatched
  // list or duplicate node ids. With `connect`, SetNodes may add nodes not
  // given here; without it, only subsets of these nodes.
  static absl::StatusOr<std::unique_ptr<MultiNodeClient>> Create(
      std::vector<placement::NodeInfo> nodes,
      std::vector<std::unique_ptr<RetrievalClient>> clients, Connector connect = nullptr,
      MultiNodeOptions options = {});
  ~MultiNodeClient() override;

  // Makes `nodes` the set new sequences are placed on. Clients of nodes seen
  // before are reused; others are opened with the Connector. On any error
  // (empty list, duplicate ids, no Connector for a new node, a failed
  // connect) the current set is kept and the error returned.
  absl::Status SetNodes(std::vector<placement::NodeInfo> nodes);

  // Feeds SetNodes from `membership` (at once with its current set, then on
  // every change; each address is its own node id) and keeps it: destroying
  // this client stops it first. A set SetNodes refuses leaves the previous
  // one in place and goes to `on_error` (on the membership's thread; keep it
  // short). Call at most once, before the client is shared.
  void Follow(std::unique_ptr<membership::Membership> membership,
              std::function<void(const absl::Status&)> on_error);

  // Marks node `id` down (false) or up (true); an unknown id is ignored.
  // Up after down marks it stale for every live sequence using it and wakes
  // the sync thread. Cheap, never blocks on the network: callable from a
  // gRPC thread.
  void SetNodeUp(const std::string& id, bool up);
  // A callback for SetNodeUp that stays safe to call after this client is
  // gone (it then does nothing): what a health watcher owned elsewhere holds.
  std::function<void(const std::string& id, bool up)> health_sink() const;

  // Whether sequence `sequence_id` treats node `id` as in sync (false for
  // unknown ids or a node outside its view). For tests and diagnostics.
  bool InSync(uint64_t sequence_id, const std::string& id) const;
  // Whether node `id` is live now (up and not suspected).
  bool IsLive(const std::string& id) const;
  int replicas() const { return options_.replicas; }

  absl::Status CreateSequence(const SequenceSpec& spec) override;
  // Every node of the view gets `capability`; the client keeps it for the
  // sequence's syncs (SyncRequest.capability) and orphan drops.
  absl::Status CreateSequence(const SequenceSpec& spec, std::string_view capability) override;
  absl::Status UploadShard(const ShardUpload& upload) override;
  absl::Status Append(const AppendRequest& request) override;
  // Routed like Append, to that node client's AppendAsync (which keeps the
  // per-head order); `done` runs after the routing state records that the
  // node holds keys of the layer, so a later Attend asks it.
  void AppendAsync(const AppendRequest& request, StatusCallback done) override;
  void AttendAsync(const AttendRequest& request, PartialsView out, AttendStats* stats,
                   StatusCallback done) override;
  // Each item routed, replica-chosen and failed over exactly as its own
  // AttendAsync / AppendAsync would be, but the first round's node requests
  // of all items go out as ONE AttendBatch / AppendBatch per node (a node's
  // batch holds every item's shards chosen on it). A node that fails
  // (transport) fails its items' requests, each of which then re-routes to
  // the next live in-sync owner on its own, as a single Attend would.
  void AttendBatchAsync(std::span<AttendBatchItem> items, StatusCallback done) override;
  void AppendBatchAsync(std::span<AppendBatchItem> items, StatusCallback done) override;
  absl::Status DropSequence(uint64_t sequence_id) override;
  absl::Status DropSequence(uint64_t sequence_id, std::string_view capability) override;
  absl::Status ForkSequence(uint64_t source_id, std::string_view source_capability,
                            uint64_t fork_id, std::string_view fork_capability) override;
  // Sums of the stats of every node in use: the current set plus nodes that
  // left but still hold a live sequence.
  absl::StatusOr<NodeStats> Stats() override;

  // The current set (what a new sequence is placed on).
  size_t num_nodes() const override;
  std::vector<placement::NodeInfo> nodes() const;
  RetrievalClient* node(size_t i) const;
  bool GetReplicationStats(ReplicationStats* out) const override;

 private:
  // One node's liveness, shared by every view holding it (by node id).
  struct NodeHealth {
    std::string id;
    std::atomic<bool> watch_up{true};           // the health watch's word
    std::atomic<int64_t> suspect_until_ns{0};   // steady clock; a failed call's
    bool Live(int64_t now_ns) const {
      return watch_up.load(std::memory_order_acquire) &&
             now_ns >= suspect_until_ns.load(std::memory_order_acquire);
    }
  };
  // A node set and its clients, immutable once built; shared by the
  // sequences created while it was current.
  struct View {
    placement::Placement placement;
    std::vector<std::shared_ptr<RetrievalClient>> clients;  // [node index]
    std::vector<std::shared_ptr<NodeHealth>> health;         // [node index]
  };
  // One (layer, kv head) of a sequence.
  struct HeadState {
    int32_t last_chunk = -1;  // appends go here (chunk 0 when -1)
    // Chunks written (issued), ascending, with the last position issued to
    // each (-1: none yet) and whether an owner acknowledged one (`acked`:
    // the chunk exists on its in-sync owners; Attends ask only for those).
    std::vector<int32_t> chunks;
    std::vector<int64_t> last_issued;
    std::vector<uint8_t> acked;
    size_t Index(int32_t chunk);  // adds the chunk when missing
  };
  // Appends issued while a node catches up (see Routing::catchup), in issue
  // order; at most kMaxCatchUpBytes of keys and values.
  struct CatchUpLog {
    struct Entry {
      int32_t layer = 0, kv_head = 0;
      int64_t first_position = 0;
      size_t rows = 0, cols = 0;
      std::vector<float> keys, values;  // rows x cols each, dense
    };
    std::vector<Entry> entries;
    int64_t bytes = 0;
    bool overflow = false;  // an append did not fit: the round starts over
  };
  struct Routing {
    SequenceSpec spec;
    std::string capability;  // the sequence's (CreateSequence)
    // The id chunks are placed by: the sequence's own, or for a fork
    // (ForkSequence) its source's, so a fork's chunks live where the
    // source's shared ones are.
    uint64_t placement_id = 0;
    std::shared_ptr<const View> view;
    int replicas = 1;                 // R_seq
    std::vector<HeadState> heads;     // [layer * n_kv_heads + kv_head]
    std::vector<uint8_t> stale;       // [node index]
    std::vector<uint8_t> syncing;     // [node index]: a sync runs now
    std::vector<int> sync_failures;   // [node index], for the backoff
    std::vector<int64_t> next_sync_ns;  // [node index], steady clock
    // [node index]: set while a sync of that node runs; every append issued
    // meanwhile to a chunk the node owns is copied here and replayed to it
    // after the copy, so a sequence that keeps decoding still converges.
    std::vector<std::shared_ptr<CatchUpLog>> catchup;
  };
  struct SyncJob;
  struct AttendCall;
  struct SinkState;

  MultiNodeClient(std::shared_ptr<const View> view, Connector connect, MultiNodeOptions options);
  std::shared_ptr<const View> CurrentView() const;
  std::shared_ptr<NodeHealth> HealthFor(const std::string& id);  // mu_ held
  // The R_seq owners of (layer, kv head, chunk) in `r`'s view, replica order.
  static void Owners(const Routing& r, uint64_t sequence_id, int32_t layer, int32_t kv_head,
                     int32_t chunk, std::vector<size_t>* out);
  // Where one write goes and what it changed at issue (undone when no
  // owner took it).
  struct WriteRoute {
    std::shared_ptr<const View> view;
    std::vector<size_t> targets;  // live in-sync owners, replica order
    int32_t chunk = 0;
    int32_t prev_last_chunk = -1;
    int64_t prev_last_issued = -1;
    int64_t set_last_issued = -1;
  };
  // The write fan-out shared by UploadShard and Append(Async): validates,
  // records the issue, picks the live in-sync owners (marking down ones
  // stale). mu_ not held. `chunk`: the upload's, or none for an append.
  absl::Status RouteWrite(uint64_t sequence_id, int32_t layer, int32_t kv_head,
                          std::optional<int32_t> chunk, int64_t first_position, size_t rows,
                          const char* what, WriteRoute* route,
                          const AppendRequest* append = nullptr);
  // Records the write's per-owner outcomes (results[t]: targets[t]'s);
  // returns the call's status.
  absl::Status FinishWrite(uint64_t sequence_id, int32_t layer, int32_t kv_head,
                           const WriteRoute& route, const std::vector<absl::Status>& results);
  void Suspect(NodeHealth& node);
  // Per head of `r` ([layer * n_kv_heads + kv_head]): the last position
  // issued to the chunks `node` owns (-1: none); *owns (may be null): it
  // owns any chunk. mu_ held.
  static std::vector<int64_t> IssuedTo(const Routing& r, uint64_t sequence_id, size_t node,
                                       bool* owns);
  // Copies `append` into `log` (or marks it overflowed past kMaxCatchUpBytes).
  static void LogForCatchUp(const AppendRequest& append, CatchUpLog* log);
  // Routes `shards` of call->layer to nodes (skipping call->excluded), issues
  // the requests and returns; false (and `done` ran) when routing failed.
  void StartAttendRound(const std::shared_ptr<AttendCall>& call,
                        std::vector<HeadChunkRef> shards);
  void OnAttendRoundDone(const std::shared_ptr<AttendCall>& call);
  void SyncLoop();
  void RunSync(SyncJob& job);
  void RememberOrphan(const std::string& id, uint64_t sequence_id,
                      const std::string& capability);  // mu_ held

  const MultiNodeOptions options_;
  mutable std::mutex mu_;  // guards everything below up to set_nodes_mu_
  std::shared_ptr<const View> view_;
  std::map<uint64_t, Routing> routing_;
  absl::flat_hash_map<std::string, std::shared_ptr<NodeHealth>> health_;
  // Drops a node missed (sequence, capability), per node id, oldest first.
  absl::flat_hash_map<std::string, std::deque<std::pair<uint64_t, std::string>>> orphans_;
  bool stopping_ = false;
  bool reduced_warned_ = false;
  std::condition_variable sync_cv_;
  const Connector connect_;
  std::mutex set_nodes_mu_;  // serializes SetNodes (connects happen outside mu_)
  std::shared_ptr<SinkState> sink_;

  std::atomic<int64_t> failovers_unavailable_{0};
  std::atomic<int64_t> failovers_deadline_{0};
  std::atomic<int64_t> failovers_down_{0};
  std::atomic<int64_t> syncs_started_{0};
  std::atomic<int64_t> syncs_succeeded_{0};
  std::atomic<int64_t> syncs_failed_{0};
  std::atomic<int64_t> keys_synced_{0};

  std::thread sync_thread_;
  // Follow's; its refreshes call SetNodes, so it is stopped before the rest.
  std::unique_ptr<membership::Membership> membership_;
};

}  // namespace kvr::retrieval
