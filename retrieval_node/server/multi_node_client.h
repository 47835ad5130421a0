// MultiNodeClient: one RetrievalClient over several retrieval nodes (each
// any RetrievalClient: gRPC, in-process), placed by rendezvous hashing
// (services/placement, R = 1).
//
//   * CreateSequence / DropSequence go to every node;
//   * UploadShard goes to the primary node of its ShardKey;
//   * Append goes to the node holding the (layer, kv head)'s last uploaded
//     chunk (the primary of chunk 0 when none was uploaded), where the node
//     appends to that chunk's tail;
//   * AttendAsync sends ONE request per node holding any shard of (sequence,
//     layer), all concurrently, and merges their partials by LSE in node
//     order (deterministic), so the result is the partial over every shard.
// Per-call buffers for the fan-out are allocated per Attend (one Partials per
// node): fine for the CLI and tests; the worker's hot path should reuse them.
//
// Thread-safety: thread-safe. The per-sequence routing state lives here, so
// every write for a sequence must go through the same MultiNodeClient.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

#include "retrieval_node/client/retrieval_client.h"
#include "services/placement/placement.h"

namespace kvr::retrieval {

class MultiNodeClient final : public RetrievalClient {
 public:
  // clients[i] talks to nodes[i]. InvalidArgument for an empty or mismatched
  // list or duplicate node ids.
  static absl::StatusOr<std::unique_ptr<MultiNodeClient>> Create(
      std::vector<placement::NodeInfo> nodes,
      std::vector<std::unique_ptr<RetrievalClient>> clients);
  ~MultiNodeClient() override;

  absl::Status CreateSequence(const SequenceSpec& spec) override;
  absl::Status UploadShard(const ShardUpload& upload) override;
  absl::Status Append(const AppendRequest& request) override;
  void AttendAsync(const AttendRequest& request, PartialsView out, AttendStats* stats,
                   StatusCallback done) override;
  absl::Status DropSequence(uint64_t sequence_id) override;
  // Sums of the nodes' stats.
  absl::StatusOr<NodeStats> Stats() override;

  size_t num_nodes() const { return clients_.size(); }
  RetrievalClient* node(size_t i) const { return clients_[i].get(); }

 private:
  struct Routing {
    SequenceSpec spec;
    std::vector<int32_t> last_chunk;  // [layer * n_kv_heads + kv_head], -1: none
    std::vector<uint8_t> holds;       // [layer * num_nodes + node]: node holds a shard
  };

  MultiNodeClient(placement::Placement placement,
                  std::vector<std::unique_ptr<RetrievalClient>> clients);
  size_t NodeFor(const ShardKey& key) const;

  placement::Placement placement_;
  std::vector<std::unique_ptr<RetrievalClient>> clients_;
  std::mutex mu_;  // guards routing_
  std::map<uint64_t, Routing> routing_;
};

}  // namespace kvr::retrieval
