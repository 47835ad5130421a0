#include "retrieval_node/server/multi_node_client.h"

#include <atomic>

#include "common/attention.h"

namespace kvr::retrieval {

MultiNodeClient::MultiNodeClient(placement::Placement placement,
                                 std::vector<std::unique_ptr<RetrievalClient>> clients)
    : placement_(std::move(placement)), clients_(std::move(clients)) {}

MultiNodeClient::~MultiNodeClient() = default;

absl::StatusOr<std::unique_ptr<MultiNodeClient>> MultiNodeClient::Create(
    std::vector<placement::NodeInfo> nodes,
    std::vector<std::unique_ptr<RetrievalClient>> clients) {
  if (nodes.size() != clients.size()) {
    return absl::InvalidArgumentError(absl::StrCat(nodes.size(), " nodes but ", clients.size(),
                                                   " clients"));
  }
  for (size_t i = 0; i < clients.size(); ++i) {
    if (clients[i] == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat("client ", i, " is null"));
    }
  }
  KVR_ASSIGN_OR_RETURN(placement::Placement placement,
                       placement::Placement::Create(std::move(nodes), /*replicas=*/1));
  return std::unique_ptr<MultiNodeClient>(
      new MultiNodeClient(std::move(placement), std::move(clients)));
}

size_t MultiNodeClient::NodeFor(const ShardKey& key) const {
  return placement_.Primary(placement::ShardKey{key.sequence_id, static_cast<uint32_t>(key.layer),
                                                static_cast<uint32_t>(key.kv_head),
                                                static_cast<uint32_t>(key.chunk)});
}

absl::Status MultiNodeClient::CreateSequence(const SequenceSpec& spec) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (routing_.count(spec.sequence_id) != 0) {
      return absl::AlreadyExistsError(absl::StrCat("sequence ", spec.sequence_id, " exists"));
    }
  }
  for (size_t i = 0; i < clients_.size(); ++i) {
    const absl::Status s = clients_[i]->CreateSequence(spec);
    if (!s.ok()) {
      for (size_t j = 0; j < i; ++j) clients_[j]->DropSequence(spec.sequence_id).IgnoreError();
      return s;
    }
  }
  // The nodes validated the spec, so these sizes are in range.
  Routing r;
  r.spec = spec;
  r.last_chunk.assign(static_cast<size_t>(spec.n_layers) * spec.n_kv_heads, -1);
  r.holds.assign(static_cast<size_t>(spec.n_layers) * clients_.size(), 0);
  std::lock_guard<std::mutex> lock(mu_);
  routing_[spec.sequence_id] = std::move(r);
  return absl::OkStatus();
}

absl::Status MultiNodeClient::UploadShard(const ShardUpload& upload) {
  const ShardKey& key = upload.key;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = routing_.find(key.sequence_id);
    if (it == routing_.end()) {
      return absl::NotFoundError(absl::StrCat("UploadShard: unknown sequence ", key.sequence_id));
    }
    const SequenceSpec& spec = it->second.spec;
    if (key.layer < 0 || key.layer >= spec.n_layers || key.kv_head < 0 ||
        key.kv_head >= spec.n_kv_heads || key.chunk < 0) {
      return absl::InvalidArgumentError(absl::StrCat("shard ", key.DebugString(),
                                                     " outside the sequence's ", spec.n_layers,
                                                     " layers x ", spec.n_kv_heads, " kv heads"));
    }
  }
  const size_t node = NodeFor(key);
  KVR_RETURN_IF_ERROR(clients_[node]->UploadShard(upload));
  std::lock_guard<std::mutex> lock(mu_);
  auto it = routing_.find(key.sequence_id);
  if (it != routing_.end()) {
    Routing& r = it->second;
    int32_t& last = r.last_chunk[static_cast<size_t>(key.layer) * r.spec.n_kv_heads + key.kv_head];
    last = std::max(last, key.chunk);
    r.holds[static_cast<size_t>(key.layer) * clients_.size() + node] = 1;
  }
  return absl::OkStatus();
}

absl::Status MultiNodeClient::Append(const AppendRequest& request) {
  ShardKey key{request.sequence_id, request.layer, request.kv_head, 0};
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = routing_.find(request.sequence_id);
    if (it == routing_.end()) {
      return absl::NotFoundError(absl::StrCat("Append: unknown sequence ", request.sequence_id));
    }
    const Routing& r = it->second;
    if (request.layer < 0 || request.layer >= r.spec.n_layers || request.kv_head < 0 ||
        request.kv_head >= r.spec.n_kv_heads) {
      return absl::InvalidArgumentError(absl::StrCat(
          "append to layer ", request.layer, ", kv head ", request.kv_head, " outside the sequence's ",
          r.spec.n_layers, " layers x ", r.spec.n_kv_heads, " kv heads"));
    }
    key.chunk = std::max(0, r.last_chunk[static_cast<size_t>(request.layer) * r.spec.n_kv_heads +
                                         request.kv_head]);
  }
  const size_t node = NodeFor(key);
  KVR_RETURN_IF_ERROR(clients_[node]->Append(request));
  std::lock_guard<std::mutex> lock(mu_);
  auto it = routing_.find(request.sequence_id);
  if (it != routing_.end() && request.keys.rows() > 0) {
    it->second.holds[static_cast<size_t>(request.layer) * clients_.size() + node] = 1;
  }
  return absl::OkStatus();
}

void MultiNodeClient::AttendAsync(const AttendRequest& request, PartialsView out,
                                  AttendStats* stats, StatusCallback done) {
  std::vector<size_t> targets;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = routing_.find(request.sequence_id);
    if (it == routing_.end()) {
      done(absl::NotFoundError(absl::StrCat("Attend: unknown sequence ", request.sequence_id)));
      return;
    }
    const Routing& r = it->second;
    if (request.layer < 0 || request.layer >= r.spec.n_layers) {
      done(absl::InvalidArgumentError(
          absl::StrCat("layer ", request.layer, " outside [0, ", r.spec.n_layers, ")")));
      return;
    }
    for (size_t i = 0; i < clients_.size(); ++i) {
      if (r.holds[static_cast<size_t>(request.layer) * clients_.size() + i]) targets.push_back(i);
    }
  }
  if (targets.empty()) {
    SetEmpty(out);
    if (stats != nullptr) *stats = AttendStats{};
    done(absl::OkStatus());
    return;
  }
  struct FanOut {
    std::vector<Partials> parts;
    std::vector<AttendStats> stats;
    std::vector<absl::Status> status;
    std::atomic<size_t> pending{0};
    PartialsView out;
    AttendStats* stats_out = nullptr;
    StatusCallback done;
  };
  auto fan = std::make_shared<FanOut>();
  const size_t n = targets.size();
  fan->parts.assign(n, Partials(out.size(), out.dim()));
  fan->stats.resize(n);
  fan->status.resize(n);
  fan->pending.store(n);
  fan->out = out;
  fan->stats_out = stats;
  fan->done = std::move(done);
  for (size_t t = 0; t < n; ++t) {
    clients_[targets[t]]->AttendAsync(
        request, fan->parts[t].view(), &fan->stats[t], [fan, t](absl::Status s) {
          fan->status[t] = std::move(s);
          if (fan->pending.fetch_sub(1, std::memory_order_acq_rel) != 1) return;
          // The last completion merges, in node order.
          for (const absl::Status& st : fan->status) {
            if (!st.ok()) {
              fan->done(st);
              return;
            }
          }
          SetEmpty(fan->out);
          AttendStats total;
          for (size_t i = 0; i < fan->parts.size(); ++i) {
            MergeInto(fan->out, fan->parts[i].view());
            total.shards_searched += fan->stats[i].shards_searched;
            total.keys_held += fan->stats[i].keys_held;
            total.keys_attended += fan->stats[i].keys_attended;
            total.distance_computations += fan->stats[i].distance_computations;
          }
          if (fan->stats_out != nullptr) *fan->stats_out = total;
          fan->done(absl::OkStatus());
        });
  }
}

absl::Status MultiNodeClient::DropSequence(uint64_t sequence_id) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (routing_.erase(sequence_id) == 0) {
      return absl::NotFoundError(absl::StrCat("DropSequence: unknown sequence ", sequence_id));
    }
  }
  absl::Status first;
  for (auto& c : clients_) {
    absl::Status s = c->DropSequence(sequence_id);
    if (first.ok() && !s.ok()) first = s;
  }
  return first;
}

absl::StatusOr<NodeStats> MultiNodeClient::Stats() {
  NodeStats total;
  for (auto& c : clients_) {
    KVR_ASSIGN_OR_RETURN(NodeStats s, c->Stats());
    total.sequences = std::max(total.sequences, s.sequences);  // every node has every sequence
    total.shards += s.shards;
    total.indexed_keys += s.indexed_keys;
    total.tail_keys += s.tail_keys;
    total.seals += s.seals;
    total.memory_bytes += s.memory_bytes;
  }
  return total;
}

}  // namespace kvr::retrieval
