// NodeService: the kvr.v1.RetrievalNode gRPC service (callback API).
//
// Thin layer: every handler validates the request (dtype enums, shapes vs
// packed byte sizes, NaN/Inf, k / beam / nprobe / scale ranges, upload
// stream order and declared sizes), converts it to the plain structs of
// retrieval_node/core/node_types.h (retrieval_node/wire/proto_convert.h)
// and calls the core (NodeCore, which holds no gRPC types). No handler
// blocks a gRPC thread on an index search or build:
//   * Attend goes to the core's AttendAsync (its own thread pool) and the
//     reactor is finished from the completion;
//   * Append / DropSequence / ListShards / Stats run on this service's
//     control pool and UploadShard's build on its upload pool (they take
//     sequence locks that an index build may hold for a while; the separate
//     upload lane keeps builds from delaying other sequences' appends);
//   * CreateSequence runs inline (a map insert).
// A rejected request changes nothing in the core.
//
// Thread-safety: gRPC calls the handlers concurrently; the core is
// thread-safe. Lifetime: the core must outlive the service, and the server
// must be shut down (Server::Shutdown, which waits for every reactor) before
// the service is destroyed.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>

#include "common/thread_pool.h"
#include "kvr/v1/retrieval.grpc.pb.h"
#include "retrieval_node/core/node_core.h"
#include "retrieval_node/server/metrics.h"

namespace grpc {
class ChannelCredentials;
}  // namespace grpc

namespace kvr::retrieval {

struct NodeServiceOptions {
  // Threads running appends and admin calls off the gRPC threads.
  size_t control_threads = 2;
  // Threads running UploadShard index builds: their own lane, so a large
  // upload (seconds of index build) never holds a control thread and never
  // queues other tenants' Appends behind it. Also bounds the builds running
  // at once.
  size_t upload_threads = 2;
  // Largest payload (keys + values + training data bytes) one UploadShard
  // stream may declare; larger → RESOURCE_EXHAUSTED naming this limit.
  int64_t max_upload_bytes = int64_t{4} << 30;
  // Longest deadline a call may carry, seconds from its arrival (0 = no
  // cap). A call with a later deadline, or none, is INVALID_ARGUMENT naming
  // this limit before any work: a stalled call (an upload stream that stops
  // sending) can then hold its buffers for at most this long. 600 s = 10x
  // the longest deadline the node's own clients use (UploadShard, 60 s).
  double max_deadline_seconds = 600.0;
  // Threads running SyncShards (the destination's blocking read of the
  // source's ReadShards stream, then the install), and as many again for the
  // source side of ReadShards (snapshot, then one message at a time): their
  // own lanes, so a long copy never holds a control or upload thread. Also
  // bounds the syncs and reads running at once (further ones queue).
  size_t sync_threads = 2;
  // The node's gRPC message limit (kvr_node --max_message_bytes): a
  // ReadShards chunk message larger than this is RESOURCE_EXHAUSTED naming
  // it, and SyncShards reads its source with this receive limit.
  int max_message_bytes = 64 << 20;
  // Items one AttendBatch / AppendBatch may carry (kvr_node
  // --max_batch_items): more is RESOURCE_EXHAUSTED naming max_batch_items.
  size_t max_batch_items = 1024;
  // Where handlers record requests, latencies, scans, builds and appends
  // (metrics.h); not owned, must outlive the service. Null: no metrics.
  NodeMetrics* metrics = nullptr;
  // Credentials of the channel SyncShards opens to its source node's
  // ReadShards (services/infra/security: mTLS presenting this node's
  // certificate); null = plaintext.
  std::shared_ptr<grpc::ChannelCredentials> peer_credentials;
};

class NodeService final : public v1::RetrievalNode::CallbackService {
 public:
  // `core` is not owned and must outlive the service.
  NodeService(NodeCore* core, const NodeServiceOptions& options);
  ~NodeService() override;

  grpc::ServerUnaryReactor* CreateSequence(grpc::CallbackServerContext* context,
                                           const v1::CreateSequenceRequest* request,
                                           v1::CreateSequenceResponse* response) override;
  grpc::ServerReadReactor<v1::UploadShardRequest>* UploadShard(
      grpc::CallbackServerContext* context, v1::UploadShardResponse* response) override;
  grpc::ServerUnaryReactor* Append(grpc::CallbackServerContext* context,
                                   const v1::AppendRequest* request,
                                   v1::AppendResponse* response) override;
  grpc::ServerUnaryReactor* Attend(grpc::CallbackServerContext* context,
                                   const v1::AttendRequest* request,
                                   v1::AttendResponse* response) override;
  // Batches (retrieval.proto): each item validated and served exactly as
  // Attend / Append serve it, its outcome in statuses[i]; the items of an
  // AttendBatch are searched in parallel on the core's attend_threads pool,
  // an AppendBatch's items applied in item order on the control pool.
  grpc::ServerUnaryReactor* AttendBatch(grpc::CallbackServerContext* context,
                                        const v1::AttendBatchRequest* request,
                                        v1::AttendBatchResponse* response) override;
  grpc::ServerUnaryReactor* AppendBatch(grpc::CallbackServerContext* context,
                                        const v1::AppendBatchRequest* request,
                                        v1::AppendBatchResponse* response) override;
  grpc::ServerUnaryReactor* DropSequence(grpc::CallbackServerContext* context,
                                         const v1::DropSequenceRequest* request,
                                         v1::DropSequenceResponse* response) override;
  // NodeCore::ForkSequence on the control pool (it copies the source's
  // values and tail); the fork is owned by the caller's principal.
  grpc::ServerUnaryReactor* ForkSequence(grpc::CallbackServerContext* context,
                                         const v1::ForkSequenceRequest* request,
                                         v1::ForkSequenceResponse* response) override;
  grpc::ServerUnaryReactor* ListShards(grpc::CallbackServerContext* context,
                                       const v1::ListShardsRequest* request,
                                       v1::ListShardsResponse* response) override;
  grpc::ServerUnaryReactor* Stats(grpc::CallbackServerContext* context,
                                  const v1::StatsRequest* request,
                                  v1::StatsResponse* response) override;
  // Node-to-node copy (see retrieval.proto): SyncShards on the destination
  // reads the source's ReadShards stream on the sync pool and installs the
  // result (NodeCore::SyncShards); ReadShards streams NodeCore::ReadShards
  // one message at a time (the sync thread waits for each write).
  grpc::ServerUnaryReactor* SyncShards(grpc::CallbackServerContext* context,
                                       const v1::SyncShardsRequest* request,
                                       v1::SyncShardsResponse* response) override;
  grpc::ServerWriteReactor<v1::ReadShardsResponse>* ReadShards(
      grpc::CallbackServerContext* context, const v1::ReadShardsRequest* request) override;

  // Renews the caller's leases (NodeCore::RenewLeases) and says the node's
  // lease_seconds.
  grpc::ServerUnaryReactor* RenewLeases(grpc::CallbackServerContext* context,
                                        const v1::RenewLeasesRequest* request,
                                        v1::RenewLeasesResponse* response) override;

  // Answers with the address set by SetUcxAddress (empty: UCX off).
  grpc::ServerUnaryReactor* GetEndpoints(grpc::CallbackServerContext* context,
                                         const v1::GetEndpointsRequest* request,
                                         v1::GetEndpointsResponse* response) override;

  // Attend with no gRPC types around it, shared by the gRPC handler and the
  // UCX data plane (ucx_endpoint.h): validates `request`, runs the search on
  // the core's pool, fills `response` and calls `done` once (on any thread;
  // also counted in the Attend metrics). `request` is read only before this
  // returns; `response` must stay valid until `done` runs.
  // `batch_item`: one item of an AttendBatch (searched on the core's
  // attend_threads pool; counted in the Attend metrics all the same).
  void HandleAttend(const v1::AttendRequest& request, v1::AttendResponse* response,
                    std::function<void(absl::Status)> done, bool batch_item = false);
  // AttendBatch with no gRPC types around it (gRPC handler and UCX data
  // plane): RESOURCE_EXHAUSTED naming max_batch_items for too many items
  // (`done` gets it, nothing runs); otherwise fills response->items /
  // statuses (one per request item, each from HandleAttend) and calls
  // `done` with OK once every item finished. `request` and `response` must
  // stay valid until `done` runs.
  void HandleAttendBatch(const v1::AttendBatchRequest& request,
                         v1::AttendBatchResponse* response,
                         std::function<void(absl::Status)> done);
  // AppendBatch likewise (items applied in order on the control pool).
  void HandleAppendBatch(const v1::AppendBatchRequest& request,
                         v1::AppendBatchResponse* response,
                         std::function<void(absl::Status)> done);

  // The UCX listener address GetEndpoints advertises ("IPV4:PORT").
  void SetUcxAddress(const std::string& address);

  // Limits the handlers enforce on Attend.
  static constexpr int32_t kMaxBeam = 1 << 16;
  static constexpr int32_t kMaxNprobe = 1 << 16;
  // Entries of AttendRequest.shards one Attend may list before the node
  // looks at the sequence (which then bounds them by n_kv_heads x held
  // chunks of the layer).
  static constexpr size_t kMaxAttendShards = size_t{1} << 20;

 private:
  class UploadReactor;
  class ReadReactor;

  NodeCore* const core_;
  const NodeServiceOptions options_;
  std::unique_ptr<ThreadPool> control_;
  std::unique_ptr<ThreadPool> upload_;
  std::unique_ptr<ThreadPool> sync_;  // SyncShards (destination)
  std::unique_ptr<ThreadPool> read_;  // ReadShards (source): apart, so two nodes syncing
                                      // from each other never wait on each other's pool
  std::mutex endpoints_mu_;
  std::string ucx_address_;
};

}  // namespace kvr::retrieval
