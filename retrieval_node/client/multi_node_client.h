// MultiNodeClient: one RetrievalClient over several retrieval nodes (each
// any RetrievalClient: gRPC, in-process), placed by rendezvous hashing
// (services/infra/placement, R = 1).
//
//   * CreateSequence / DropSequence go to every node of the sequence's view;
//   * UploadShard goes to the primary node of its ShardKey;
//   * Append goes to the node holding the (layer, kv head)'s last uploaded
//     chunk (the primary of chunk 0 when none was uploaded), where the node
//     appends to that chunk's tail;
//   * AttendAsync sends ONE request per node holding any shard of (sequence,
//     layer), all concurrently, and merges their partials by LSE in node
//     order (deterministic), so the result is the partial over every shard.
//
// Membership changes (SetNodes, or Follow a services/infra/membership set): a sequence is
// placed on the node set current when CreateSequence ran (its "view") and
// keeps it for life, so its shards never move; only NEW sequences see the new
// set. A node that left stays connected while a live sequence still uses it.
// Clients are reused by node id across views.
//
// Per-call buffers for the fan-out are allocated per Attend (one Partials per
// node): fine for the CLI and tests; the worker's hot path should reuse them.
//
// Thread-safety: thread-safe. The per-sequence routing state lives here, so
// every write for a sequence must go through the same MultiNodeClient.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "retrieval_node/client/retrieval_client.h"
#include "services/infra/membership/membership.h"
#include "services/infra/placement/placement.h"

namespace kvr::retrieval {

class MultiNodeClient final : public RetrievalClient {
 public:
  // Opens a client to a node that joined (e.g. GrpcRetrievalClient::Create).
  using Connector =
      std::function<absl::StatusOr<std::unique_ptr<RetrievalClient>>(const placement::NodeInfo&)>;

  // clients[i] talks to nodes[i]. InvalidArgument for an empty or mismatched
  // list or duplicate node ids. With `connect`, SetNodes may add nodes not
  // given here; without it, only subsets of these nodes.
  static absl::StatusOr<std::unique_ptr<MultiNodeClient>> Create(
      std::vector<placement::NodeInfo> nodes,
      std::vector<std::unique_ptr<RetrievalClient>> clients, Connector connect = nullptr);
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

  absl::Status CreateSequence(const SequenceSpec& spec) override;
  absl::Status UploadShard(const ShardUpload& upload) override;
  absl::Status Append(const AppendRequest& request) override;
  // Routed like Append, to that node client's AppendAsync (which keeps the
  // per-head order); `done` runs after the routing state records that the
  // node holds keys of the layer, so a later Attend asks it.
  void AppendAsync(const AppendRequest& request, StatusCallback done) override;
  void AttendAsync(const AttendRequest& request, PartialsView out, AttendStats* stats,
                   StatusCallback done) override;
  absl::Status DropSequence(uint64_t sequence_id) override;
  // Sums of the stats of every node in use: the current set plus nodes that
  // left but still hold a live sequence.
  absl::StatusOr<NodeStats> Stats() override;

  // The current set (what a new sequence is placed on).
  size_t num_nodes() const override;
  std::vector<placement::NodeInfo> nodes() const;
  RetrievalClient* node(size_t i) const;

 private:
  // A node set and its clients, immutable once built; shared by the
  // sequences created while it was current.
  struct View {
    placement::Placement placement;
    std::vector<std::shared_ptr<RetrievalClient>> clients;  // [node index]
    size_t NodeFor(const ShardKey& key) const;
  };
  struct Routing {
    SequenceSpec spec;
    std::shared_ptr<const View> view;
    std::vector<int32_t> last_chunk;  // [layer * n_kv_heads + kv_head], -1: none
    std::vector<uint8_t> holds;       // [layer * num_nodes + node]: node holds a shard
  };

  MultiNodeClient(std::shared_ptr<const View> view, Connector connect)
      : view_(std::move(view)), connect_(std::move(connect)) {}
  std::shared_ptr<const View> CurrentView() const;
  // The view and node index an append goes to; NotFound / InvalidArgument
  // as for Append.
  absl::Status RouteAppend(const AppendRequest& request, std::shared_ptr<const View>* view,
                           size_t* node) const;
  // Records that `node` of `view` holds keys of (sequence, layer).
  void MarkHolds(uint64_t sequence_id, int32_t layer, const View& view, size_t node);

  mutable std::mutex mu_;  // guards view_ and routing_
  std::shared_ptr<const View> view_;
  std::map<uint64_t, Routing> routing_;
  const Connector connect_;
  std::mutex set_nodes_mu_;  // serializes SetNodes (connects happen outside mu_)
  // Follow's; its refreshes call SetNodes, so it is stopped before the rest.
  std::unique_ptr<membership::Membership> membership_;
};

}  // namespace kvr::retrieval
