#include "retrieval_node/client/multi_node_client.h"

#include <algorithm>
#include <memory>
#include <map>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <set>
#include <utility>

#include "common/attention.h"

namespace kvr::retrieval {
namespace {

int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// The node (or the path to it) failed, not the request: another replica may
// answer.
bool IsTransportError(const absl::Status& s) {
  return absl::IsUnavailable(s) || absl::IsDeadlineExceeded(s) || absl::IsCancelled(s);
}

// Runs fn(0 .. n-1) concurrently (fn(0) on this thread) and returns when all
// returned.
void ForEachParallel(size_t n, const std::function<void(size_t)>& fn) {
  std::vector<std::thread> threads;
  threads.reserve(n > 0 ? n - 1 : 0);
  for (size_t i = 1; i < n; ++i) threads.emplace_back([&fn, i] { fn(i); });
  if (n > 0) fn(0);
  for (std::thread& t : threads) t.join();
}

// The node calls of one AttendBatchAsync / AppendBatchAsync, collected per
// node client while the batch issues its items on this thread (the per-item
// paths route, pick replicas and fan out as always; only the last step, the
// call to the node, is deferred) and then sent as ONE batch call per node.
// Calls made anywhere else (failover rounds, completions) go out one by one.
struct NodeBatches {
  struct AttendPart {
    std::vector<AttendBatchItem> items;
    std::vector<StatusCallback> done;
  };
  struct AppendPart {
    std::vector<AppendBatchItem> items;
    std::vector<StatusCallback> done;
  };
  std::map<RetrievalClient*, AttendPart> attends;
  std::map<RetrievalClient*, AppendPart> appends;
};
thread_local NodeBatches* tls_batches = nullptr;

// `node`->AttendAsync, or the item joins this thread's collected batch.
void SendAttend(RetrievalClient* node, const AttendRequest& request, PartialsView out,
                AttendStats* stats, StatusCallback done) {
  if (tls_batches == nullptr) {
    node->AttendAsync(request, out, stats, std::move(done));
    return;
  }
  NodeBatches::AttendPart& part = tls_batches->attends[node];
  part.items.push_back({request, out, stats, absl::OkStatus()});
  part.done.push_back(std::move(done));
}

// `node`->AppendAsync, or the item joins this thread's collected batch (its
// matrices must then stay valid until the batch is sent).
void SendAppend(RetrievalClient* node, const AppendRequest& request, StatusCallback done) {
  if (tls_batches == nullptr) {
    node->AppendAsync(request, std::move(done));
    return;
  }
  NodeBatches::AppendPart& part = tls_batches->appends[node];
  part.items.push_back({request, absl::OkStatus()});
  part.done.push_back(std::move(done));
}

// Sends each node its collected batch; every item's callback then gets the
// item's own status (a refused batch put its error in every item).
void SendBatches(NodeBatches& batches) {
  for (auto& [node, collected] : batches.attends) {
    auto part = std::make_shared<NodeBatches::AttendPart>(std::move(collected));
    node->AttendBatchAsync(part->items, [part](absl::Status) {
      for (size_t i = 0; i < part->items.size(); ++i) {
        StatusCallback callback = std::move(part->done[i]);
        callback(std::move(part->items[i].status));
      }
    });
  }
  for (auto& [node, collected] : batches.appends) {
    auto part = std::make_shared<NodeBatches::AppendPart>(std::move(collected));
    node->AppendBatchAsync(part->items, [part](absl::Status) {
      for (size_t i = 0; i < part->items.size(); ++i) {
        StatusCallback callback = std::move(part->done[i]);
        callback(std::move(part->items[i].status));
      }
    });
  }
}

// Joins a batch's items: `done` (OK) runs after the last one finished.
struct ItemJoin {
  std::atomic<size_t> left;
  StatusCallback done;
  ItemJoin(size_t n, StatusCallback d) : left(n), done(std::move(d)) {}
  void Finish() {
    if (left.fetch_sub(1, std::memory_order_acq_rel) == 1) done(absl::OkStatus());
  }
};

}  // namespace

// Lets a health watcher owned elsewhere reach this client while it exists.
struct MultiNodeClient::SinkState {
  std::mutex mu;
  MultiNodeClient* owner = nullptr;
};

size_t MultiNodeClient::HeadState::Index(int32_t chunk) {
  auto it = std::lower_bound(chunks.begin(), chunks.end(), chunk);
  const size_t i = static_cast<size_t>(it - chunks.begin());
  if (it == chunks.end() || *it != chunk) {
    chunks.insert(it, chunk);
    last_issued.insert(last_issued.begin() + static_cast<std::ptrdiff_t>(i), -1);
    acked.insert(acked.begin() + static_cast<std::ptrdiff_t>(i), 0);
  }
  return i;
}

MultiNodeClient::MultiNodeClient(std::shared_ptr<const View> view, Connector connect,
                                 MultiNodeOptions options)
    : options_(options),
      view_(std::move(view)),
      connect_(std::move(connect)),
      sink_(std::make_shared<SinkState>()) {
  for (const auto& h : view_->health) health_.emplace(h->id, h);
  sink_->owner = this;
  sync_thread_ = std::thread([this] { SyncLoop(); });
}

MultiNodeClient::~MultiNodeClient() {
  membership_.reset();  // no SetNodes from its refresh thread from here on
  {
    std::lock_guard<std::mutex> lock(sink_->mu);
    sink_->owner = nullptr;  // health watchers reach nothing from here on
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  sync_cv_.notify_all();
  sync_thread_.join();
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
    std::vector<std::unique_ptr<RetrievalClient>> clients, Connector connect,
    MultiNodeOptions options) {
  if (nodes.size() != clients.size()) {
    return absl::InvalidArgumentError(absl::StrCat(nodes.size(), " nodes but ", clients.size(),
                                                   " clients"));
  }
  for (size_t i = 0; i < clients.size(); ++i) {
    if (clients[i] == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat("client ", i, " is null"));
    }
  }
  if (options.replicas < 1 || options.replicas > 64) {
    return absl::InvalidArgumentError(
        absl::StrCat("replicas ", options.replicas, " outside [1, 64]"));
  }
  if (options.suspect_for < absl::ZeroDuration() || options.suspect_for > absl::Minutes(10) ||
      options.sync_backoff <= absl::ZeroDuration() || options.sync_backoff > absl::Minutes(1)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "suspect_for ", absl::FormatDuration(options.suspect_for), " outside [0, 10m] or ",
        "sync_backoff ", absl::FormatDuration(options.sync_backoff), " outside (0, 1m]"));
  }
  KVR_ASSIGN_OR_RETURN(placement::Placement placement,
                       placement::Placement::Create(std::move(nodes), /*replicas=*/1));
  auto view = std::make_shared<View>(View{std::move(placement), {}, {}});
  for (auto& c : clients) view->clients.push_back(std::move(c));
  for (const placement::NodeInfo& n : view->placement.nodes()) {
    auto h = std::make_shared<NodeHealth>();
    h->id = n.id;
    view->health.push_back(std::move(h));
  }
  return std::unique_ptr<MultiNodeClient>(
      new MultiNodeClient(std::move(view), std::move(connect), options));
}

std::shared_ptr<MultiNodeClient::NodeHealth> MultiNodeClient::HealthFor(const std::string& id) {
  auto [it, inserted] = health_.try_emplace(id);
  if (inserted) {
    it->second = std::make_shared<NodeHealth>();
    it->second->id = id;
  }
  return it->second;
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
  auto view = std::make_shared<View>(View{std::move(placement), std::move(clients), {}});
  std::lock_guard<std::mutex> lock(mu_);
  for (const placement::NodeInfo& n : view->placement.nodes()) {
    view->health.push_back(HealthFor(n.id));
  }
  view_ = std::move(view);
  return absl::OkStatus();
}

void MultiNodeClient::SetNodeUp(const std::string& id, bool up) {
  bool wake = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = health_.find(id);
    if (it == health_.end()) return;
    NodeHealth& h = *it->second;
    const bool was_up = h.watch_up.exchange(up, std::memory_order_acq_rel);
    if (up && !was_up) {
      // It may have lost anything while away: every sequence using it
      // re-checks it by a sync before it serves again.
      h.suspect_until_ns.store(0, std::memory_order_release);
      for (auto& [seq, r] : routing_) {
        for (size_t i = 0; i < r.view->health.size(); ++i) {
          if (r.view->health[i].get() == &h) {
            r.stale[i] = 1;
            r.sync_failures[i] = 0;
            r.next_sync_ns[i] = 0;
          }
        }
      }
      wake = true;
    }
    if (up && orphans_.contains(id)) wake = true;
  }
  if (wake) sync_cv_.notify_all();
}

std::function<void(const std::string&, bool)> MultiNodeClient::health_sink() const {
  return [sink = sink_](const std::string& id, bool up) {
    std::lock_guard<std::mutex> lock(sink->mu);
    if (sink->owner != nullptr) sink->owner->SetNodeUp(id, up);
  };
}

bool MultiNodeClient::InSync(uint64_t sequence_id, const std::string& id) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = routing_.find(sequence_id);
  if (it == routing_.end()) return false;
  const Routing& r = it->second;
  for (size_t i = 0; i < r.view->health.size(); ++i) {
    if (r.view->health[i]->id == id) return r.stale[i] == 0;
  }
  return false;
}

bool MultiNodeClient::IsLive(const std::string& id) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = health_.find(id);
  return it != health_.end() && it->second->Live(NowNs());
}

void MultiNodeClient::Suspect(NodeHealth& node) {
  node.suspect_until_ns.store(NowNs() + absl::ToInt64Nanoseconds(options_.suspect_for),
                              std::memory_order_release);
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

void MultiNodeClient::Owners(const Routing& r, uint64_t sequence_id, int32_t layer,
                             int32_t kv_head, int32_t chunk, std::vector<size_t>* out) {
  out->resize(static_cast<size_t>(r.replicas));
  r.view->placement.NodesFor(
      placement::ShardKey{r.placement_id != 0 ? r.placement_id : sequence_id,
                          static_cast<uint32_t>(layer), static_cast<uint32_t>(kv_head),
                          static_cast<uint32_t>(chunk)},
      std::span<size_t>(*out));
}

absl::Status MultiNodeClient::CreateSequence(const SequenceSpec& spec) {
  return CreateSequence(spec, "");
}

absl::Status MultiNodeClient::CreateSequence(const SequenceSpec& spec,
                                             std::string_view capability) {
  std::shared_ptr<const View> current;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (routing_.count(spec.sequence_id) != 0) {
      return absl::AlreadyExistsError(absl::StrCat("sequence ", spec.sequence_id, " exists"));
    }
    current = view_;
  }
  // The sequence's view: the current set's live nodes, for life.
  const int64_t now = NowNs();
  std::shared_ptr<const View> view = current;
  std::vector<size_t> live;
  for (size_t i = 0; i < current->health.size(); ++i) {
    if (current->health[i]->Live(now)) live.push_back(i);
  }
  if (live.empty()) {
    return absl::UnavailableError(absl::StrCat("CreateSequence ", spec.sequence_id, ": none of ",
                                               current->health.size(),
                                               " retrieval nodes is live"));
  }
  if (live.size() != current->health.size()) {
    std::vector<placement::NodeInfo> nodes;
    for (size_t i : live) nodes.push_back(current->placement.node(i));
    KVR_ASSIGN_OR_RETURN(placement::Placement p, placement::Placement::Create(std::move(nodes), 1));
    auto sub = std::make_shared<View>(View{std::move(p), {}, {}});
    for (size_t i : live) {
      sub->clients.push_back(current->clients[i]);
      sub->health.push_back(current->health[i]);
    }
    view = std::move(sub);
  }
  const size_t n = view->clients.size();
  const int replicas = static_cast<int>(std::min<size_t>(static_cast<size_t>(options_.replicas), n));
  if (replicas < options_.replicas) {
    std::lock_guard<std::mutex> lock(mu_);
    if (!reduced_warned_) {
      reduced_warned_ = true;
      std::fprintf(stderr,
                   "kvr: --replicas %d but only %zu live retrieval node(s): new sequences get %d "
                   "replica(s) (under-replicated)\n",
                   options_.replicas, n, replicas);
    }
  }
  std::vector<absl::Status> results(n);
  ForEachParallel(n, [&](size_t i) {
    results[i] = view->clients[i]->CreateSequence(spec, capability);
  });
  absl::Status refused, transport;
  size_t failed = 0;
  for (const absl::Status& s : results) {
    if (s.ok()) continue;
    if (IsTransportError(s)) {
      ++failed;
      if (transport.ok()) transport = s;
    } else if (refused.ok()) {
      refused = s;
    }
  }
  if (!refused.ok() || failed >= static_cast<size_t>(replicas)) {
    for (size_t i = 0; i < n; ++i) {
      if (results[i].ok()) {
        view->clients[i]->DropSequence(spec.sequence_id, capability).IgnoreError();
      }
    }
    return !refused.ok() ? refused : transport;
  }
  // The nodes validated the spec, so these sizes are in range.
  Routing r;
  r.spec = spec;
  r.capability = std::string(capability);
  r.replicas = replicas;
  r.heads.resize(static_cast<size_t>(spec.n_layers) * static_cast<size_t>(spec.n_kv_heads));
  r.stale.assign(n, 0);
  r.syncing.assign(n, 0);
  r.sync_failures.assign(n, 0);
  r.next_sync_ns.assign(n, 0);
  r.catchup.assign(n, nullptr);
  for (size_t i = 0; i < n; ++i) {
    if (!results[i].ok()) {
      r.stale[i] = 1;
      Suspect(*view->health[i]);
    }
  }
  r.view = std::move(view);
  std::lock_guard<std::mutex> lock(mu_);
  routing_[spec.sequence_id] = std::move(r);
  return absl::OkStatus();
}

absl::Status MultiNodeClient::RouteWrite(uint64_t sequence_id, int32_t layer, int32_t kv_head,
                                         std::optional<int32_t> chunk, int64_t first_position,
                                         size_t rows, const char* what, WriteRoute* route,
                                         const AppendRequest* append) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = routing_.find(sequence_id);
  if (it == routing_.end()) {
    return absl::NotFoundError(absl::StrCat(what, ": unknown sequence ", sequence_id));
  }
  Routing& r = it->second;
  const SequenceSpec& spec = r.spec;
  if (layer < 0 || layer >= spec.n_layers || kv_head < 0 || kv_head >= spec.n_kv_heads ||
      (chunk.has_value() && *chunk < 0)) {
    return absl::InvalidArgumentError(absl::StrCat(
        what, " to layer ", layer, ", kv head ", kv_head, chunk.has_value() ? ", chunk " : "",
        chunk.has_value() ? absl::StrCat(*chunk) : "", " outside the sequence's ", spec.n_layers,
        " layers x ", spec.n_kv_heads, " kv heads"));
  }
  HeadState& head =
      r.heads[static_cast<size_t>(layer) * static_cast<size_t>(spec.n_kv_heads) +
              static_cast<size_t>(kv_head)];
  route->chunk = chunk.has_value() ? *chunk : std::max(0, head.last_chunk);
  std::vector<size_t> owners;
  Owners(r, sequence_id, layer, kv_head, route->chunk, &owners);
  const int64_t now = NowNs();
  route->targets.clear();
  for (size_t o : owners) {
    if (r.stale[o]) {
      // Catching up: keep a copy to replay once its sync copied the rest.
      if (append != nullptr && r.catchup[o] != nullptr) LogForCatchUp(*append, r.catchup[o].get());
      continue;
    }
    if (!r.view->health[o]->Live(now)) {
      r.stale[o] = 1;  // it misses this write
      continue;
    }
    route->targets.push_back(o);
  }
  if (route->targets.empty()) {
    return absl::UnavailableError(absl::StrCat(
        what, ": no live in-sync replica of shard ",
        ShardKey{sequence_id, layer, kv_head, route->chunk}.DebugString(), " (", owners.size(),
        " owners)"));
  }
  // Recorded at issue: a sync is complete only when it reached these.
  route->prev_last_chunk = head.last_chunk;
  if (chunk.has_value()) head.last_chunk = std::max(head.last_chunk, *chunk);
  const size_t c = head.Index(route->chunk);
  route->prev_last_issued = head.last_issued[c];
  if (rows > 0) {
    head.last_issued[c] =
        std::max(head.last_issued[c], first_position + static_cast<int64_t>(rows) - 1);
  }
  route->set_last_issued = head.last_issued[c];
  route->view = r.view;
  return absl::OkStatus();
}

absl::Status MultiNodeClient::FinishWrite(uint64_t sequence_id, int32_t layer, int32_t kv_head,
                                          const WriteRoute& route,
                                          const std::vector<absl::Status>& results) {
  const View& view = *route.view;
  const std::vector<size_t>& targets = route.targets;
  absl::Status refused, transport;
  bool any_ok = false;
  for (size_t t = 0; t < targets.size(); ++t) {
    const absl::Status& s = results[t];
    if (s.ok()) {
      any_ok = true;
    } else if (IsTransportError(s)) {
      if (transport.ok()) transport = s;
      Suspect(*view.health[targets[t]]);
    } else if (refused.ok()) {
      refused = s;
    }
  }
  std::lock_guard<std::mutex> lock(mu_);
  auto it = routing_.find(sequence_id);
  if (it != routing_.end() && it->second.view == route.view) {
    Routing& r = it->second;
    for (size_t t = 0; t < targets.size(); ++t) {
      // A node that failed while another took the write, or that is gone,
      // no longer matches: it catches up by a sync before it serves again.
      if (!results[t].ok() && (any_ok || IsTransportError(results[t]))) r.stale[targets[t]] = 1;
    }
    HeadState& head = r.heads[static_cast<size_t>(layer) *
                                  static_cast<size_t>(r.spec.n_kv_heads) +
                              static_cast<size_t>(kv_head)];
    const size_t c = head.Index(route.chunk);
    if (any_ok) {
      head.acked[c] = 1;
    } else if (transport.ok()) {
      // Every owner refused it: nothing was written, so nothing was issued
      // (unless a later write moved the marks on).
      if (head.last_issued[c] == route.set_last_issued) head.last_issued[c] = route.prev_last_issued;
      if (!head.acked[c] && head.last_issued[c] < 0) {
        head.chunks.erase(head.chunks.begin() + static_cast<std::ptrdiff_t>(c));
        head.last_issued.erase(head.last_issued.begin() + static_cast<std::ptrdiff_t>(c));
        head.acked.erase(head.acked.begin() + static_cast<std::ptrdiff_t>(c));
      }
      if (head.last_chunk == route.chunk && route.prev_last_chunk < route.chunk) {
        head.last_chunk = route.prev_last_chunk;
      }
    }
  }
  if (any_ok) return absl::OkStatus();
  return !refused.ok() ? refused : transport;
}

absl::Status MultiNodeClient::UploadShard(const ShardUpload& upload) {
  const ShardKey& key = upload.key;
  WriteRoute route;
  KVR_RETURN_IF_ERROR(RouteWrite(key.sequence_id, key.layer, key.kv_head, key.chunk,
                                 upload.first_position, upload.keys.rows(), "UploadShard",
                                 &route));
  std::vector<absl::Status> results(route.targets.size());
  ForEachParallel(route.targets.size(), [&](size_t t) {
    results[t] = route.view->clients[route.targets[t]]->UploadShard(upload);
  });
  return FinishWrite(key.sequence_id, key.layer, key.kv_head, route, results);
}

absl::Status MultiNodeClient::Append(const AppendRequest& request) {
  WriteRoute route;
  KVR_RETURN_IF_ERROR(RouteWrite(request.sequence_id, request.layer, request.kv_head,
                                 std::nullopt, request.first_position, request.keys.rows(),
                                 "Append", &route, &request));
  std::vector<absl::Status> results(route.targets.size());
  ForEachParallel(route.targets.size(), [&](size_t t) {
    results[t] = route.view->clients[route.targets[t]]->Append(request);
  });
  return FinishWrite(request.sequence_id, request.layer, request.kv_head, route, results);
}

void MultiNodeClient::AppendAsync(const AppendRequest& request, StatusCallback done) {
  struct Fan {
    WriteRoute route;
    std::vector<absl::Status> results;
    std::atomic<size_t> pending{0};
    StatusCallback done;
  };
  auto fan = std::make_shared<Fan>();
  if (absl::Status routed =
          RouteWrite(request.sequence_id, request.layer, request.kv_head, std::nullopt,
                     request.first_position, request.keys.rows(), "Append", &fan->route,
                     &request);
      !routed.ok()) {
    done(std::move(routed));
    return;
  }
  const size_t n = fan->route.targets.size();
  fan->results.resize(n);
  fan->pending.store(n);
  fan->done = std::move(done);
  for (size_t t = 0; t < n; ++t) {
    SendAppend(
        fan->route.view->clients[fan->route.targets[t]].get(), request, [this, fan, t, sequence_id = request.sequence_id, layer = request.layer,
                  kv_head = request.kv_head](absl::Status status) {
          fan->results[t] = std::move(status);
          if (fan->pending.fetch_sub(1, std::memory_order_acq_rel) != 1) return;
          absl::Status s = FinishWrite(sequence_id, layer, kv_head, fan->route, fan->results);
          StatusCallback callback = std::move(fan->done);
          callback(std::move(s));
        });
  }
}

// One Attend in flight: its requests by round, their partials, and the
// shards each asked for (which must outlive the node calls).
struct MultiNodeClient::AttendCall {
  AttendRequest request;  // shards unset; queries valid until `done`
  PartialsView out;
  AttendStats* stats_out = nullptr;
  StatusCallback done;
  std::shared_ptr<const View> view;
  int replicas = 1;
  std::vector<uint8_t> excluded;  // [node index]: failed in this Attend
  struct Sent {
    size_t node = 0;
    std::vector<HeadChunkRef> shards;  // what it was chosen for
    bool all = false;                  // sent with an empty list
    std::unique_ptr<Partials> partials;
    AttendStats stats;
    absl::Status status;
  };
  std::mutex mu;                           // guards `sent` growth (rounds)
  std::vector<std::unique_ptr<Sent>> sent;  // every request, in issue order
  size_t round_begin = 0;                   // first request of the current round
  std::atomic<size_t> pending{0};
};

void MultiNodeClient::AttendAsync(const AttendRequest& request, PartialsView out,
                                  AttendStats* stats, StatusCallback done) {
  auto call = std::make_shared<AttendCall>();
  std::vector<HeadChunkRef> shards;
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
    for (int32_t h = 0; h < r.spec.n_kv_heads; ++h) {
      const HeadState& head = r.heads[static_cast<size_t>(request.layer) *
                                          static_cast<size_t>(r.spec.n_kv_heads) +
                                      static_cast<size_t>(h)];
      for (size_t c = 0; c < head.chunks.size(); ++c) {
        if (head.acked[c]) shards.push_back({h, head.chunks[c]});
      }
    }
    call->view = r.view;
    call->replicas = r.replicas;
  }
  if (shards.empty()) {
    SetEmpty(out);
    if (stats != nullptr) *stats = AttendStats{};
    done(absl::OkStatus());
    return;
  }
  call->request = request;
  call->request.shards = {};
  call->out = out;
  call->stats_out = stats;
  call->done = std::move(done);
  call->excluded.assign(call->view->clients.size(), 0);
  StartAttendRound(call, std::move(shards));
}

void MultiNodeClient::StartAttendRound(const std::shared_ptr<AttendCall>& call,
                                       std::vector<HeadChunkRef> shards) {
  const size_t n = call->view->clients.size();
  const uint64_t seq = call->request.sequence_id;
  const int32_t layer = call->request.layer;
  std::vector<std::vector<HeadChunkRef>> per_node(n);
  std::vector<size_t> owned(n, 0);  // shards of the layer each node owns
  absl::Status unroutable;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = routing_.find(seq);
    if (it == routing_.end() || it->second.view != call->view) {
      unroutable = absl::NotFoundError(absl::StrCat("Attend: unknown sequence ", seq));
    } else {
      const Routing& r = it->second;
      const int64_t now = NowNs();
      std::vector<size_t> owners;
      for (const HeadChunkRef& s : shards) {
        Owners(r, seq, layer, s.kv_head, s.chunk, &owners);
        size_t chosen = n;
        for (size_t o : owners) {
          if (!call->excluded[o] && !r.stale[o] && r.view->health[o]->Live(now)) {
            chosen = o;
            break;
          }
        }
        if (chosen == n) {
          unroutable = absl::UnavailableError(absl::StrCat(
              "Attend: no live in-sync replica of shard ",
              ShardKey{seq, layer, s.kv_head, s.chunk}.DebugString(), " (", owners.size(),
              " owners)"));
          break;
        }
        if (chosen != owners[0]) failovers_down_.fetch_add(1, std::memory_order_relaxed);
        per_node[chosen].push_back(s);
      }
      // What each node holds of the layer: every acked shard it owns.
      if (unroutable.ok()) {
        for (int32_t h = 0; h < r.spec.n_kv_heads; ++h) {
          const HeadState& head = r.heads[static_cast<size_t>(layer) *
                                              static_cast<size_t>(r.spec.n_kv_heads) +
                                          static_cast<size_t>(h)];
          for (size_t c = 0; c < head.chunks.size(); ++c) {
            if (!head.acked[c]) continue;
            Owners(r, seq, layer, h, head.chunks[c], &owners);
            for (size_t o : owners) ++owned[o];
          }
        }
      }
    }
  }
  if (!unroutable.ok()) {
    StatusCallback done = std::move(call->done);
    done(std::move(unroutable));
    return;
  }
  std::vector<AttendCall::Sent*> batch;
  {
    std::lock_guard<std::mutex> lock(call->mu);
    call->round_begin = call->sent.size();
    for (size_t node = 0; node < n; ++node) {
      if (per_node[node].empty()) continue;
      auto s = std::make_unique<AttendCall::Sent>();
      s->node = node;
      // A node chosen for everything it holds of the layer gets the plain
      // request (what a node without shard lists serves; R = 1 always).
      s->all = per_node[node].size() == owned[node];
      s->shards = std::move(per_node[node]);
      s->partials = std::make_unique<Partials>(call->out.size(), call->out.dim());
      batch.push_back(s.get());
      call->sent.push_back(std::move(s));
    }
    // +1: completions that run inline must not finish the round early.
    call->pending.store(batch.size() + 1, std::memory_order_release);
  }
  for (AttendCall::Sent* s : batch) {
    AttendRequest req = call->request;
    if (!s->all) req.shards = std::span<const HeadChunkRef>(s->shards);
    SendAttend(
        call->view->clients[s->node].get(), req, s->partials->view(), &s->stats,
        [this, call, s](absl::Status status) {
          s->status = std::move(status);
          if (call->pending.fetch_sub(1, std::memory_order_acq_rel) == 1) OnAttendRoundDone(call);
        });
  }
  if (call->pending.fetch_sub(1, std::memory_order_acq_rel) == 1) OnAttendRoundDone(call);
}

void MultiNodeClient::OnAttendRoundDone(const std::shared_ptr<AttendCall>& call) {
  std::vector<HeadChunkRef> retry;
  {
    std::lock_guard<std::mutex> lock(call->mu);
    for (size_t i = call->round_begin; i < call->sent.size(); ++i) {
      AttendCall::Sent& s = *call->sent[i];
      if (s.status.ok()) continue;
      if (!IsTransportError(s.status)) {
        StatusCallback done = std::move(call->done);
        done(s.status);
        return;
      }
      (absl::IsDeadlineExceeded(s.status) ? failovers_deadline_ : failovers_unavailable_)
          .fetch_add(1, std::memory_order_relaxed);
      Suspect(*call->view->health[s.node]);
      call->excluded[s.node] = 1;
      retry.insert(retry.end(), s.shards.begin(), s.shards.end());
    }
  }
  if (!retry.empty()) {
    StartAttendRound(call, std::move(retry));  // each round excludes a node: <= N rounds
    return;
  }
  // Every shard answered exactly once: merge the successful requests in
  // issue order.
  SetEmpty(call->out);
  AttendStats total;
  for (const auto& s : call->sent) {
    if (!s->status.ok()) continue;
    MergeInto(call->out, s->partials->view());
    total.shards_searched += s->stats.shards_searched;
    total.keys_held += s->stats.keys_held;
    total.keys_attended += s->stats.keys_attended;
    total.distance_computations += s->stats.distance_computations;
    total.keys_estimated += s->stats.keys_estimated;
    total.clusters_estimated += s->stats.clusters_estimated;
    total.keys_exact_zone += s->stats.keys_exact_zone;
  }
  if (call->stats_out != nullptr) *call->stats_out = total;
  StatusCallback done = std::move(call->done);
  done(absl::OkStatus());
}

void MultiNodeClient::AttendBatchAsync(std::span<AttendBatchItem> items, StatusCallback done) {
  if (items.empty()) {
    done(absl::OkStatus());
    return;
  }
  auto join = std::make_shared<ItemJoin>(items.size(), std::move(done));
  NodeBatches batches;
  NodeBatches* const outer = std::exchange(tls_batches, &batches);
  for (AttendBatchItem& item : items) {
    AttendAsync(item.request, item.out, item.stats, [join, &item](absl::Status status) {
      item.status = std::move(status);
      join->Finish();
    });
  }
  tls_batches = outer;
  SendBatches(batches);
}

void MultiNodeClient::AppendBatchAsync(std::span<AppendBatchItem> items, StatusCallback done) {
  if (items.empty()) {
    done(absl::OkStatus());
    return;
  }
  auto join = std::make_shared<ItemJoin>(items.size(), std::move(done));
  NodeBatches batches;
  NodeBatches* const outer = std::exchange(tls_batches, &batches);
  for (AppendBatchItem& item : items) {
    AppendAsync(item.request, [join, &item](absl::Status status) {
      item.status = std::move(status);
      join->Finish();
    });
  }
  tls_batches = outer;
  SendBatches(batches);  // the items' matrices are still the caller's
}

void MultiNodeClient::RememberOrphan(const std::string& id, uint64_t sequence_id,
                                     const std::string& capability) {
  std::deque<std::pair<uint64_t, std::string>>& q = orphans_[id];
  q.emplace_back(sequence_id, capability);
  if (q.size() > kMaxOrphansPerNode) {
    std::fprintf(stderr, "kvr: node %s: forgetting a drop of sequence %llu (over %zu pending)\n",
                 id.c_str(), static_cast<unsigned long long>(q.front().first),
                 kMaxOrphansPerNode);
    q.pop_front();
  }
}

absl::Status MultiNodeClient::DropSequence(uint64_t sequence_id) {
  return DropSequence(sequence_id, "");
}

absl::Status MultiNodeClient::DropSequence(uint64_t sequence_id, std::string_view capability) {
  const std::string cap(capability);
  std::shared_ptr<const View> view;
  std::vector<size_t> targets;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = routing_.find(sequence_id);
    if (it == routing_.end()) {
      return absl::NotFoundError(absl::StrCat("DropSequence: unknown sequence ", sequence_id));
    }
    view = std::move(it->second.view);
    routing_.erase(it);
    const int64_t now = NowNs();
    for (size_t i = 0; i < view->clients.size(); ++i) {
      if (view->health[i]->Live(now)) {
        targets.push_back(i);
      } else {
        RememberOrphan(view->health[i]->id, sequence_id, cap);
      }
    }
  }
  std::vector<absl::Status> results(targets.size());
  ForEachParallel(targets.size(), [&](size_t t) {
    results[t] = view->clients[targets[t]]->DropSequence(sequence_id, cap);
  });
  absl::Status first;
  for (size_t t = 0; t < targets.size(); ++t) {
    const absl::Status& s = results[t];
    if (s.ok()) continue;
    if (IsTransportError(s)) {
      std::lock_guard<std::mutex> lock(mu_);
      RememberOrphan(view->health[targets[t]]->id, sequence_id, cap);
      Suspect(*view->health[targets[t]]);
    } else if (first.ok() && !absl::IsNotFound(s)) {
      first = s;
    } else if (first.ok() && absl::IsNotFound(s) && targets.size() == 1) {
      first = s;  // one node, as before: its NotFound is the answer
    }
  }
  return first;
}

absl::Status MultiNodeClient::ForkSequence(uint64_t source_id, std::string_view source_capability,
                                           uint64_t fork_id, std::string_view fork_capability) {
  Routing r;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = routing_.find(source_id);
    if (it == routing_.end()) {
      return absl::NotFoundError(absl::StrCat("ForkSequence: unknown sequence ", source_id));
    }
    if (routing_.count(fork_id) != 0) {
      return absl::AlreadyExistsError(absl::StrCat("sequence ", fork_id, " exists"));
    }
    const Routing& src = it->second;
    r.spec = src.spec;
    r.spec.sequence_id = fork_id;
    r.capability = std::string(fork_capability);
    r.placement_id = src.placement_id != 0 ? src.placement_id : source_id;
    r.view = src.view;
    r.replicas = src.replicas;
    r.heads = src.heads;
    r.stale = src.stale;  // a node stale for the source is stale for the fork
    const size_t n = r.view->clients.size();
    r.syncing.assign(n, 0);
    r.sync_failures.assign(n, 0);
    r.next_sync_ns.assign(n, 0);
    r.catchup.assign(n, nullptr);
  }
  // Every node of the view holds the source (CreateSequence went to all of
  // them), so every live one forks it; a node that cannot be reached is
  // stale for the fork and re-synced like any returning node.
  const std::shared_ptr<const View> view = r.view;
  const size_t n = view->clients.size();
  const int64_t now = NowNs();
  std::vector<absl::Status> results(n);
  ForEachParallel(n, [&](size_t i) {
    if (!view->health[i]->Live(now)) {
      results[i] = absl::UnavailableError("node down");
      return;
    }
    results[i] = view->clients[i]->ForkSequence(source_id, source_capability, fork_id,
                                                fork_capability);
  });
  absl::Status refused, transport;
  size_t failed = 0;
  for (size_t i = 0; i < n; ++i) {
    const absl::Status& s = results[i];
    if (s.ok()) continue;
    if (IsTransportError(s)) {
      ++failed;
      r.stale[i] = 1;
      Suspect(*view->health[i]);
      if (transport.ok()) transport = s;
    } else if (refused.ok()) {
      refused = s;
    }
  }
  if (!refused.ok() || failed == n) {
    for (size_t i = 0; i < n; ++i) {
      if (results[i].ok()) view->clients[i]->DropSequence(fork_id, fork_capability).IgnoreError();
    }
    return !refused.ok() ? refused : transport;
  }
  std::lock_guard<std::mutex> lock(mu_);
  if (!routing_.emplace(fork_id, std::move(r)).second) {
    return absl::AlreadyExistsError(absl::StrCat("sequence ", fork_id, " exists"));
  }
  return absl::OkStatus();
}

// One (sequence, node) to bring back in sync, or drops to deliver.
struct MultiNodeClient::SyncJob {
  uint64_t sequence_id = 0;
  SequenceSpec spec;
  std::string capability;  // the sequence's
  std::shared_ptr<const View> view;
  size_t node = 0;
  // Orphan drops (sequence, capability) for this node (sequence_id unused).
  std::vector<std::pair<uint64_t, std::string>> drops;
  std::shared_ptr<RetrievalClient> client;
  std::string node_id;
};

void MultiNodeClient::SyncLoop() {
  std::unique_lock<std::mutex> lock(mu_);
  while (!stopping_) {
    sync_cv_.wait_for(lock, std::chrono::milliseconds(100));
    if (stopping_) break;
    const int64_t now = NowNs();
    std::vector<SyncJob> jobs;
    for (auto& [seq, r] : routing_) {
      for (size_t i = 0; i < r.stale.size(); ++i) {
        if (!r.stale[i] || r.syncing[i] || now < r.next_sync_ns[i] ||
            !r.view->health[i]->Live(now)) {
          continue;
        }
        r.syncing[i] = 1;
        SyncJob job;
        job.sequence_id = seq;
        job.spec = r.spec;
        job.capability = r.capability;
        job.view = r.view;
        job.node = i;
        jobs.push_back(std::move(job));
      }
    }
    for (auto it = orphans_.begin(); it != orphans_.end();) {
      auto h = health_.find(it->first);
      if (h == health_.end() || !h->second->Live(now)) {
        ++it;
        continue;
      }
      SyncJob job;
      job.node_id = it->first;
      job.drops.assign(it->second.begin(), it->second.end());
      // The node's client: from any view holding it.
      auto find = [&](const View& v) {
        for (size_t i = 0; i < v.clients.size() && job.client == nullptr; ++i) {
          if (v.health[i]->id == job.node_id) job.client = v.clients[i];
        }
      };
      find(*view_);
      for (const auto& [s, r] : routing_) find(*r.view);
      if (job.client == nullptr) {
        orphans_.erase(it++);  // nothing uses the node any more
        continue;
      }
      jobs.push_back(std::move(job));
      orphans_.erase(it++);
    }
    if (jobs.empty()) continue;
    lock.unlock();
    // A few at a time: a catch-up costs a node-side scan of what is held, so
    // one rejoining node with many live sequences would otherwise wait for
    // them one by one.
    for (size_t first = 0; first < jobs.size(); first += kParallelSyncs) {
      ForEachParallel(std::min(kParallelSyncs, jobs.size() - first), [&](size_t i) {
        SyncJob& job = jobs[first + i];
        if (job.drops.empty()) {
          RunSync(job);
          return;
        }
        for (const auto& [s, cap] : job.drops) {
          const absl::Status st = job.client->DropSequence(s, cap);
          if (IsTransportError(st)) {
            std::lock_guard<std::mutex> relock(mu_);
            RememberOrphan(job.node_id, s, cap);
          }
        }
      });
    }
    lock.lock();
  }
}

std::vector<int64_t> MultiNodeClient::IssuedTo(const Routing& r, uint64_t sequence_id,
                                               size_t node, bool* owns) {
  const size_t n_kv = static_cast<size_t>(r.spec.n_kv_heads);
  std::vector<int64_t> issued(r.heads.size(), -1);
  std::vector<size_t> owners;
  if (owns != nullptr) *owns = false;
  for (size_t hi = 0; hi < r.heads.size(); ++hi) {
    const HeadState& head = r.heads[hi];
    for (size_t c = 0; c < head.chunks.size(); ++c) {
      Owners(r, sequence_id, static_cast<int32_t>(hi / n_kv), static_cast<int32_t>(hi % n_kv),
             head.chunks[c], &owners);
      if (std::find(owners.begin(), owners.end(), node) == owners.end()) continue;
      if (owns != nullptr) *owns = true;
      issued[hi] = std::max(issued[hi], head.last_issued[c]);
    }
  }
  return issued;
}

void MultiNodeClient::LogForCatchUp(const AppendRequest& append, CatchUpLog* log) {
  if (log->overflow) return;
  const size_t rows = append.keys.rows(), cols = append.keys.cols();
  const int64_t bytes = static_cast<int64_t>(2 * rows * cols * sizeof(float));
  if (log->bytes + bytes > kMaxCatchUpBytes || append.values.rows() != rows ||
      append.values.cols() != cols) {
    log->overflow = true;
    log->entries.clear();
    log->bytes = 0;
    return;
  }
  CatchUpLog::Entry e;
  e.layer = append.layer;
  e.kv_head = append.kv_head;
  e.first_position = append.first_position;
  e.rows = rows;
  e.cols = cols;
  e.keys.resize(rows * cols);
  e.values.resize(rows * cols);
  for (size_t i = 0; i < rows; ++i) {
    std::copy_n(append.keys.row(i), cols, e.keys.data() + i * cols);
    std::copy_n(append.values.row(i), cols, e.values.data() + i * cols);
  }
  log->bytes += bytes;
  log->entries.push_back(std::move(e));
}

void MultiNodeClient::RunSync(SyncJob& job) {
  const size_t node = job.node;
  const std::string& dest_id = job.view->health[node]->id;
  // Under the mutex: the shards the node owns, each with its source (the
  // first other live in-sync owner), and the positions issued to them.
  std::map<size_t, std::vector<ShardRef>> by_source;
  bool owns_any = false;
  absl::Status plan;
  const size_t heads = static_cast<size_t>(job.spec.n_layers) *
                       static_cast<size_t>(job.spec.n_kv_heads);
  // Per head the node owns a chunk of: the last position issued when the
  // sync began (the copy must reach it; later appends are in `log`).
  std::vector<int64_t> issued_at_start(heads, -1);
  std::shared_ptr<CatchUpLog> log;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = routing_.find(job.sequence_id);
    if (it == routing_.end() || it->second.view != job.view) return;  // dropped meanwhile
    Routing& r = it->second;
    const int64_t now = NowNs();
    std::vector<size_t> owners;
    for (int32_t layer = 0; layer < r.spec.n_layers && plan.ok(); ++layer) {
      for (int32_t h = 0; h < r.spec.n_kv_heads && plan.ok(); ++h) {
        const HeadState& head = r.heads[static_cast<size_t>(layer) *
                                            static_cast<size_t>(r.spec.n_kv_heads) +
                                        static_cast<size_t>(h)];
        for (size_t c = 0; c < head.chunks.size(); ++c) {
          const int32_t chunk = head.chunks[c];
          Owners(r, job.sequence_id, layer, h, chunk, &owners);
          if (std::find(owners.begin(), owners.end(), node) == owners.end()) continue;
          owns_any = true;
          size_t source = job.view->clients.size();
          for (size_t o : owners) {
            if (o != node && !r.stale[o] && r.view->health[o]->Live(now)) {
              source = o;
              break;
            }
          }
          if (source == job.view->clients.size()) {
            plan = absl::UnavailableError(absl::StrCat(
                "no live in-sync source for shard ",
                ShardKey{job.sequence_id, layer, h, chunk}.DebugString()));
            break;
          }
          by_source[source].push_back({layer, h, chunk});
        }
      }
    }
    if (plan.ok() && owns_any) {
      issued_at_start = IssuedTo(r, job.sequence_id, node, nullptr);
      log = std::make_shared<CatchUpLog>();
      r.catchup[node] = log;
    }
  }
  RetrievalClient& dest = *job.view->clients[node];
  std::vector<SyncResult> results;
  absl::Status st = plan;
  if (st.ok() && !owns_any) {
    // Nothing to copy: the node needs the sequence only.
    st = dest.CreateSequence(job.spec, job.capability);
    if (absl::IsAlreadyExists(st)) st = absl::OkStatus();
  }
  for (auto& [source, shards] : by_source) {
    if (!st.ok()) break;
    SyncRequest req;
    req.spec = job.spec;
    req.source_address = job.view->placement.node(source).address;
    req.shards = shards;
    req.capability = job.capability;
    syncs_started_.fetch_add(1, std::memory_order_relaxed);
    absl::StatusOr<SyncResult> res = dest.SyncShards(req);
    if (!res.ok()) {
      syncs_failed_.fetch_add(1, std::memory_order_relaxed);
      st = res.status();
      break;
    }
    syncs_succeeded_.fetch_add(1, std::memory_order_relaxed);
    keys_synced_.fetch_add(res->keys_copied, std::memory_order_relaxed);
    results.push_back(*std::move(res));
  }
  std::unique_lock<std::mutex> lock(mu_);
  auto it = routing_.find(job.sequence_id);
  if (it == routing_.end() || it->second.view != job.view) return;
  // What the node holds per head after the copy, then after each replayed
  // append.
  std::vector<int64_t> have(heads, -1);
  bool done = st.ok();
  for (const SyncResult& res : results) {
    if (res.last_positions.size() != heads) {
      done = false;
      break;
    }
    for (size_t hi = 0; hi < heads; ++hi) have[hi] = std::max(have[hi], res.last_positions[hi]);
  }
  // Everything issued before the log began must have come with the copy
  // (an append still in flight to the source then may not have).
  for (size_t hi = 0; hi < heads && done; ++hi) {
    if (issued_at_start[hi] >= 0 && have[hi] < issued_at_start[hi]) done = false;
  }
  // Replay the appends issued during the copy, oldest first, until none is
  // left; the last check happens under the mutex, so from the moment the
  // node is marked in sync every append goes to it directly.
  while (done && log != nullptr) {
    if (log->overflow) {
      done = false;
      break;
    }
    std::vector<CatchUpLog::Entry> entries = std::move(log->entries);
    log->entries.clear();
    log->bytes = 0;
    if (entries.empty()) break;
    lock.unlock();
    // Sent all at once with AppendAsync (the client keeps each head's order
    // and the node groups their syncs), then waited for: replaying one by
    // one could not keep up with a sequence that goes on decoding.
    struct Pending {
      std::mutex mu;
      std::condition_variable cv;
      size_t left = 0;
      absl::Status first_error;
    } pending;
    absl::Status replay;
    for (const CatchUpLog::Entry& e : entries) {
      const size_t hi = static_cast<size_t>(e.layer) * static_cast<size_t>(job.spec.n_kv_heads) +
                        static_cast<size_t>(e.kv_head);
      const int64_t last = e.first_position + static_cast<int64_t>(e.rows) - 1;
      if (e.rows == 0 || last <= have[hi]) continue;  // the copy had it
      if (have[hi] >= 0 && e.first_position > have[hi] + 1) {
        replay = absl::FailedPreconditionError("a gap before a logged append");
        break;
      }
      const size_t skip =
          have[hi] >= e.first_position ? static_cast<size_t>(have[hi] - e.first_position + 1) : 0;
      AppendRequest a;
      a.sequence_id = job.sequence_id;
      a.layer = e.layer;
      a.kv_head = e.kv_head;
      a.first_position = e.first_position + static_cast<int64_t>(skip);
      a.keys = ConstMatrixView(e.keys.data() + skip * e.cols, e.rows - skip, e.cols);
      a.values = ConstMatrixView(e.values.data() + skip * e.cols, e.rows - skip, e.cols);
      {
        std::lock_guard<std::mutex> plock(pending.mu);
        ++pending.left;
      }
      dest.AppendAsync(a, [&pending](absl::Status status) {
        std::lock_guard<std::mutex> plock(pending.mu);
        if (!status.ok() && pending.first_error.ok()) pending.first_error = std::move(status);
        if (--pending.left == 0) pending.cv.notify_all();
      });
      have[hi] = last;
    }
    {
      std::unique_lock<std::mutex> plock(pending.mu);
      pending.cv.wait(plock, [&pending] { return pending.left == 0; });
      if (replay.ok()) replay = pending.first_error;
    }
    lock.lock();
    it = routing_.find(job.sequence_id);
    if (it == routing_.end() || it->second.view != job.view) return;
    if (!replay.ok()) {
      done = false;
      if (st.ok()) st = replay;
    }
  }
  Routing& r = it->second;
  r.syncing[node] = 0;
  if (r.catchup[node] == log) r.catchup[node] = nullptr;
  if (done) {
    // In sync only if the node now holds every position issued to the
    // shards it owns (an upload issued during the copy means another round).
    bool owns_now = false;
    const std::vector<int64_t> expected = IssuedTo(r, job.sequence_id, node, &owns_now);
    if (!owns_any) {
      done = !owns_now;  // a write was issued meanwhile: copy it next round
    } else {
      for (size_t hi = 0; hi < heads && done; ++hi) {
        if (expected[hi] >= 0 && have[hi] != expected[hi]) done = false;
      }
    }
  }
  if (done) {
    r.stale[node] = 0;
    r.sync_failures[node] = 0;
    std::fprintf(stderr, "kvr: node %s back in sync for sequence %llu\n", dest_id.c_str(),
                 static_cast<unsigned long long>(job.sequence_id));
    return;
  }
  const int failures = std::min(r.sync_failures[node]++, 4);
  r.next_sync_ns[node] =
      NowNs() + (absl::ToInt64Nanoseconds(options_.sync_backoff) << failures);
  if (!st.ok() && r.sync_failures[node] == 1) {
    std::fprintf(stderr, "kvr: sync of sequence %llu to node %s failed (retrying): %s\n",
                 static_cast<unsigned long long>(job.sequence_id), dest_id.c_str(),
                 std::string(st.message()).c_str());
  }
}

bool MultiNodeClient::GetReplicationStats(ReplicationStats* out) const {
  ReplicationStats s;
  {
    std::lock_guard<std::mutex> lock(mu_);
    const int64_t now = NowNs();
    s.nodes = static_cast<int64_t>(health_.size());
    for (const auto& [id, h] : health_) s.nodes_up += h->Live(now) ? 1 : 0;
    std::vector<size_t> owners;
    for (const auto& [seq, r] : routing_) {
      const size_t heads = r.heads.size();
      for (size_t hi = 0; hi < heads; ++hi) {
        const int32_t layer = static_cast<int32_t>(hi / static_cast<size_t>(r.spec.n_kv_heads));
        const int32_t h = static_cast<int32_t>(hi % static_cast<size_t>(r.spec.n_kv_heads));
        for (int32_t chunk : r.heads[hi].chunks) {
          Owners(r, seq, layer, h, chunk, &owners);
          int good = 0;
          for (size_t o : owners) good += (!r.stale[o] && r.view->health[o]->Live(now)) ? 1 : 0;
          if (good < options_.replicas) ++s.under_replicated_shards;
        }
      }
    }
  }
  s.attend_failovers_unavailable = failovers_unavailable_.load(std::memory_order_relaxed);
  s.attend_failovers_deadline = failovers_deadline_.load(std::memory_order_relaxed);
  s.attend_failovers_down = failovers_down_.load(std::memory_order_relaxed);
  s.syncs_started = syncs_started_.load(std::memory_order_relaxed);
  s.syncs_succeeded = syncs_succeeded_.load(std::memory_order_relaxed);
  s.syncs_failed = syncs_failed_.load(std::memory_order_relaxed);
  s.keys_synced = keys_synced_.load(std::memory_order_relaxed);
  *out = s;
  return true;
}

absl::StatusOr<NodeStats> MultiNodeClient::Stats() {
  // Every live client in use, once: the current set and the sets of live
  // sequences.
  std::vector<std::shared_ptr<RetrievalClient>> clients;
  {
    std::lock_guard<std::mutex> lock(mu_);
    const int64_t now = NowNs();
    std::set<const RetrievalClient*> seen;
    auto add = [&](const View& v) {
      for (size_t i = 0; i < v.clients.size(); ++i) {
        if (v.health[i]->Live(now) && seen.insert(v.clients[i].get()).second) {
          clients.push_back(v.clients[i]);
        }
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
    total.shard_uploads += s.shard_uploads;
    total.forks += s.forks;
  }
  return total;
}

}  // namespace kvr::retrieval
