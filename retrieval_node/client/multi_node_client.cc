#include "retrieval_node/client/multi_node_client.h"

#include <atomic>
#include <set>

#include "absl/container/flat_hash_map.h"
#include "common/attention.h"

namespace kvr::retrieval {

MultiNodeClient::~MultiNodeClient() {
  membership_.reset();  // no SetNodes from its refresh thread from here on
}

void MultiNodeClient::Follow(std::unique_ptr<membership::Membership> membership,
                             std::function<void(const absl::Status&)> on_error) {
  KVR_CHECK(membership != nullptr && membership_ == nullptr);
  membership_ = std::move(membership);
  // Called at once with the current set (usually the one this client was
  // created with: a no-op change), then per change.
  membership_->Subscribe(
      [this, on_error = std::move(on_error)](const std::vector<std::string>& now) {
        std::vector<placement::NodeInfo> nodes;
        nodes.reserve(now.size());
        for (const std::string& address : now) nodes.push_back({address, address});
        if (absl::Status s = SetNodes(std::move(nodes)); !s.ok() && on_error) on_error(s);
      });
}

absl::StatusOr<std::unique_ptr<MultiNodeClient>> MultiNodeClient::Create(
    std::vector<placement::NodeInfo> nodes,
    std::vector<std::unique_ptr<RetrievalClient>> clients, Connector connect) {
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
  auto view = std::make_shared<View>(View{std::move(placement), {}});
  for (auto& c : clients) view->clients.push_back(std::move(c));
  return std::unique_ptr<MultiNodeClient>(new MultiNodeClient(std::move(view), std::move(connect)));
}

absl::Status MultiNodeClient::SetNodes(std::vector<placement::NodeInfo> nodes) {
  std::lock_guard<std::mutex> serial(set_nodes_mu_);
  // Every client alive now, by node id: the current set and the nodes that
  // left but still serve a live sequence (a node that comes back reuses it).
  absl::flat_hash_map<std::string, std::shared_ptr<RetrievalClient>> known;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto add = [&](const View& v) {
      for (size_t i = 0; i < v.clients.size(); ++i) known.emplace(v.placement.node(i).id, v.clients[i]);
    };
    add(*view_);
    for (const auto& [id, r] : routing_) add(*r.view);
  }
  std::vector<std::shared_ptr<RetrievalClient>> clients;
  clients.reserve(nodes.size());
  for (const placement::NodeInfo& n : nodes) {
    if (auto it = known.find(n.id); it != known.end()) {
      clients.push_back(it->second);
      continue;
    }
    if (!connect_) {
      return absl::FailedPreconditionError(absl::StrCat(
          "node ", n.id, " (", n.address, ") is new and this client has no connector"));
    }
    absl::StatusOr<std::unique_ptr<RetrievalClient>> c = connect_(n);
    if (!c.ok()) {
      return absl::Status(c.status().code(), absl::StrCat("connecting to node ", n.id, " (",
                                                          n.address, "): ", c.status().message()));
    }
    clients.push_back(*std::move(c));
  }
  KVR_ASSIGN_OR_RETURN(placement::Placement placement,
                       placement::Placement::Create(std::move(nodes), /*replicas=*/1));
  auto view = std::make_shared<const View>(View{std::move(placement), std::move(clients)});
  std::lock_guard<std::mutex> lock(mu_);
  view_ = std::move(view);
  return absl::OkStatus();
}

std::shared_ptr<const MultiNodeClient::View> MultiNodeClient::CurrentView() const {
  std::lock_guard<std::mutex> lock(mu_);
  return view_;
}

size_t MultiNodeClient::num_nodes() const { return CurrentView()->clients.size(); }

std::vector<placement::NodeInfo> MultiNodeClient::nodes() const {
  return CurrentView()->placement.nodes();
}

RetrievalClient* MultiNodeClient::node(size_t i) const { return CurrentView()->clients[i].get(); }

size_t MultiNodeClient::View::NodeFor(const ShardKey& key) const {
  return placement.Primary(placement::ShardKey{key.sequence_id, static_cast<uint32_t>(key.layer),
                                               static_cast<uint32_t>(key.kv_head),
                                               static_cast<uint32_t>(key.chunk)});
}

absl::Status MultiNodeClient::CreateSequence(const SequenceSpec& spec) {
  std::shared_ptr<const View> view;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (routing_.count(spec.sequence_id) != 0) {
      return absl::AlreadyExistsError(absl::StrCat("sequence ", spec.sequence_id, " exists"));
    }
    view = view_;  // the set current now is this sequence's for life
  }
  for (size_t i = 0; i < view->clients.size(); ++i) {
    const absl::Status s = view->clients[i]->CreateSequence(spec);
    if (!s.ok()) {
      for (size_t j = 0; j < i; ++j) view->clients[j]->DropSequence(spec.sequence_id).IgnoreError();
      return s;
    }
  }
  // The nodes validated the spec, so these sizes are in range.
  Routing r;
  r.spec = spec;
  r.last_chunk.assign(static_cast<size_t>(spec.n_layers) * spec.n_kv_heads, -1);
  r.holds.assign(static_cast<size_t>(spec.n_layers) * view->clients.size(), 0);
  r.view = std::move(view);
  std::lock_guard<std::mutex> lock(mu_);
  routing_[spec.sequence_id] = std::move(r);
  return absl::OkStatus();
}

absl::Status MultiNodeClient::UploadShard(const ShardUpload& upload) {
  const ShardKey& key = upload.key;
  std::shared_ptr<const View> view;
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
    view = it->second.view;
  }
  const size_t node = view->NodeFor(key);
  KVR_RETURN_IF_ERROR(view->clients[node]->UploadShard(upload));
  std::lock_guard<std::mutex> lock(mu_);
  auto it = routing_.find(key.sequence_id);
  if (it != routing_.end()) {
    Routing& r = it->second;
    int32_t& last = r.last_chunk[static_cast<size_t>(key.layer) * r.spec.n_kv_heads + key.kv_head];
    last = std::max(last, key.chunk);
    r.holds[static_cast<size_t>(key.layer) * view->clients.size() + node] = 1;
  }
  return absl::OkStatus();
}

absl::Status MultiNodeClient::RouteAppend(const AppendRequest& request,
                                          std::shared_ptr<const View>* view,
                                          size_t* node) const {
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
    *view = r.view;
  }
  *node = (*view)->NodeFor(key);
  return absl::OkStatus();
}

void MultiNodeClient::MarkHolds(uint64_t sequence_id, int32_t layer, const View& view,
                                size_t node) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = routing_.find(sequence_id);
  if (it != routing_.end()) {
    it->second.holds[static_cast<size_t>(layer) * view.clients.size() + node] = 1;
  }
}

absl::Status MultiNodeClient::Append(const AppendRequest& request) {
  std::shared_ptr<const View> view;
  size_t node = 0;
  KVR_RETURN_IF_ERROR(RouteAppend(request, &view, &node));
  KVR_RETURN_IF_ERROR(view->clients[node]->Append(request));
  if (request.keys.rows() > 0) MarkHolds(request.sequence_id, request.layer, *view, node);
  return absl::OkStatus();
}

void MultiNodeClient::AppendAsync(const AppendRequest& request, StatusCallback done) {
  std::shared_ptr<const View> view;
  size_t node = 0;
  if (absl::Status routed = RouteAppend(request, &view, &node); !routed.ok()) {
    done(std::move(routed));
    return;
  }
  RetrievalClient* const client = view->clients[node].get();
  const bool adds = request.keys.rows() > 0;
  client->AppendAsync(request, [this, view = std::move(view), node, adds,
                                sequence_id = request.sequence_id, layer = request.layer,
                                done = std::move(done)](absl::Status status) {
    if (status.ok() && adds) MarkHolds(sequence_id, layer, *view, node);
    done(std::move(status));
  });
}

void MultiNodeClient::AttendAsync(const AttendRequest& request, PartialsView out,
                                  AttendStats* stats, StatusCallback done) {
  std::vector<size_t> targets;
  std::shared_ptr<const View> view;
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
    view = r.view;
    const size_t n = view->clients.size();
    for (size_t i = 0; i < n; ++i) {
      if (r.holds[static_cast<size_t>(request.layer) * n + i]) targets.push_back(i);
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
    view->clients[targets[t]]->AttendAsync(
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
  std::shared_ptr<const View> view;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = routing_.find(sequence_id);
    if (it == routing_.end()) {
      return absl::NotFoundError(absl::StrCat("DropSequence: unknown sequence ", sequence_id));
    }
    view = std::move(it->second.view);
    routing_.erase(it);
  }
  absl::Status first;
  for (auto& c : view->clients) {
    absl::Status s = c->DropSequence(sequence_id);
    if (first.ok() && !s.ok()) first = s;
  }
  return first;
}

absl::StatusOr<NodeStats> MultiNodeClient::Stats() {
  // Every client in use, once: the current set and the sets of live sequences.
  std::vector<std::shared_ptr<RetrievalClient>> clients;
  {
    std::lock_guard<std::mutex> lock(mu_);
    std::set<const RetrievalClient*> seen;
    auto add = [&](const View& v) {
      for (const auto& c : v.clients) {
        if (seen.insert(c.get()).second) clients.push_back(c);
      }
    };
    add(*view_);
    for (const auto& [id, r] : routing_) add(*r.view);
  }
  NodeStats total;
  for (auto& c : clients) {
    KVR_ASSIGN_OR_RETURN(NodeStats s, c->Stats());
    // Every node of a sequence's set holds the sequence.
    total.sequences = std::max(total.sequences, s.sequences);
    total.shards += s.shards;
    total.indexed_keys += s.indexed_keys;
    total.tail_keys += s.tail_keys;
    total.seals += s.seals;
    total.memory_bytes += s.memory_bytes;
  }
  return total;
}

}  // namespace kvr::retrieval
