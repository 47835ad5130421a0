// GrpcRetrievalClient: RetrievalClient over gRPC to one kvr_node
// (kvr.v1.RetrievalNode). Converts the plain structs to kvr.v1 messages
// (packed fp32 tensors), puts a deadline on every call and maps gRPC status
// codes back to absl::Status (same codes; DEADLINE_EXCEEDED / UNAVAILABLE
// when the node is slow or gone).
//
// This client never cancels a call itself: CANCELLED or UNAVAILABLE mean the
// node went away (e.g. shutting down) and the call may be retried elsewhere.
//
// AttendAsync uses gRPC's callback client API: `done` runs on a gRPC thread
// when the reply arrives; keep it short (hand heavy work elsewhere).
//
// AppendAsync is an async unary Append with the control deadline (counted
// from the call). The node may run concurrent RPCs in any order, so this
// client keeps appends to one (sequence, layer, kv head) in issue order by
// itself: the next append to a head is sent when the previous one
// completed (queued appends wait in the client; their deadline runs).
// Appends to different heads are all in flight at once. Destroy the client
// only after every asynchronous call's `done` ran.
//
// Liveness: the channel sends keepalive pings (GrpcClientOptions::keepalive,
// also on idle connections) and reconnects with a backoff capped at
// max_reconnect_backoff, so a node that returns is reconnected within about
// that long. WatchHealth follows the node's grpc.health.v1 Health/Watch
// stream: a killed node (connection reset) or a hung one (keepalive timeout)
// is reported down at once, a returning one up when it answers SERVING.
//
// Thread-safety: thread-safe (one channel, many concurrent calls).
#pragma once

#include <cstdint>
#include <condition_variable>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "absl/time/time.h"
#include "grpcpp/channel.h"
#include "kvr/v1/retrieval.grpc.pb.h"
#include "retrieval_node/client/retrieval_client.h"

namespace grpc {
class ChannelCredentials;
}  // namespace grpc

namespace kvr::retrieval {

// What RenewLeases answered: the owner's sequences on the node, and the
// node's lease period (0: leases never expire there).
struct RenewLeasesResult {
  int64_t sequences = 0;
  double lease_seconds = 0;
};

struct GrpcClientOptions {
  absl::Duration attend_timeout = absl::Seconds(2);
  absl::Duration upload_timeout = absl::Seconds(60);   // one UploadShard stream, build included
  absl::Duration control_timeout = absl::Seconds(10);  // CreateSequence, Append, Drop, admin
  // One SyncShards call: the destination's whole copy from the source (the
  // destination reads the source under this deadline too, capped by its
  // --max_deadline_seconds).
  absl::Duration sync_timeout = absl::Seconds(120);
  // Payload bytes per UploadShard stream message.
  size_t upload_chunk_bytes = size_t{1} << 20;
  // Channel limits; keep <= the server's --max_message_bytes.
  int max_message_bytes = 64 << 20;
  // Keepalive ping interval and how long a ping may go unanswered before
  // the connection is declared dead (a hung node is found within their
  // sum). Servers built on services/infra/rpc accept pings this often.
  absl::Duration keepalive = absl::Milliseconds(500);
  absl::Duration keepalive_timeout = absl::Milliseconds(500);
  // Reconnect backoff after a lost connection: starts at the initial one,
  // capped at the maximum (so a returning node is seen within ~max).
  absl::Duration initial_reconnect_backoff = absl::Milliseconds(100);
  absl::Duration max_reconnect_backoff = absl::Seconds(1);
  // Channel credentials (services/infra/security: mTLS presenting this
  // process's certificate); null = plaintext.
  std::shared_ptr<grpc::ChannelCredentials> credentials;
  // With TLS credentials: the name the node's certificate must carry when
  // it is not the target's host (a dns:/// node set dials the records' IPs;
  // the certificates name the service). Empty: the target's host.
  std::string tls_server_name;
};

class GrpcRetrievalClient final : public RetrievalClient {
 public:
  // `target`: a gRPC target such as "127.0.0.1:7000". Does not connect yet
  // (the first call does; see WaitForReady). InvalidArgument for bad options.
  static absl::StatusOr<std::unique_ptr<GrpcRetrievalClient>> Create(
      const std::string& target, const GrpcClientOptions& options = {});
  ~GrpcRetrievalClient() override;

  absl::Status CreateSequence(const SequenceSpec& spec) override;
  // Sends `capability` and ProcessLeaseOwner(); once a sequence exists the
  // client renews this process's leases on its node every lease_seconds / 3
  // (the period the node reports; 20 s at most) until it is destroyed.
  absl::Status CreateSequence(const SequenceSpec& spec, std::string_view capability) override;
  absl::Status UploadShard(const ShardUpload& upload) override;
  absl::Status Append(const AppendRequest& request) override;
  void AppendAsync(const AppendRequest& request, StatusCallback done) override;
  void AttendAsync(const AttendRequest& request, PartialsView out, AttendStats* stats,
                   StatusCallback done) override;
  // One AttendBatch RPC (attend_timeout) / AppendBatch RPC (control_timeout)
  // for all items: per-item outcomes from the reply's statuses; an RPC
  // failure (or a reply with the wrong item count: Internal) is every
  // item's status and `done`'s.
  void AttendBatchAsync(std::span<AttendBatchItem> items, StatusCallback done) override;
  void AppendBatchAsync(std::span<AppendBatchItem> items, StatusCallback done) override;
  absl::Status DropSequence(uint64_t sequence_id) override;
  absl::Status DropSequence(uint64_t sequence_id, std::string_view capability) override;
  absl::Status ForkSequence(uint64_t source_id, std::string_view source_capability,
                            uint64_t fork_id, std::string_view fork_capability) override;
  absl::StatusOr<NodeStats> Stats() override;
  // The SyncShards RPC to this client's node (the destination), under
  // options.sync_timeout.
  absl::StatusOr<SyncResult> SyncShards(const SyncRequest& request) override;

  // Shards of one sequence (presenting `capability`) or of every sequence
  // this caller's principal created (ListShards RPC).
  absl::StatusOr<std::vector<ShardInfo>> ListShards(std::optional<uint64_t> sequence_id,
                                                    std::string_view capability = "");

  // One RenewLeases RPC for ProcessLeaseOwner() (the renewal thread's call;
  // tests may call it).
  absl::StatusOr<RenewLeasesResult> RenewLeases();

  // Starts watching the node's health (grpc.health.v1 Health/Watch of the
  // whole server, re-opened after `retry` whenever the stream ends):
  // `on_change(true)` when it answers SERVING, `on_change(false)` when the
  // stream fails or reports anything else. Called on the watch thread, only
  // on changes (the first report is always delivered); keep it short. At
  // most once per client; the watch stops when the client is destroyed.
  void WatchHealth(std::function<void(bool serving)> on_change,
                   absl::Duration retry = absl::Milliseconds(100));

  // Blocks until the channel is connected; DeadlineExceeded after `timeout`.
  absl::Status WaitForReady(absl::Duration timeout);

  const std::string& target() const { return target_; }
  const std::shared_ptr<grpc::Channel>& channel() const { return channel_; }

 private:
  GrpcRetrievalClient(const std::string& target, const GrpcClientOptions& options);

  struct AppendCall;
  using HeadId = std::tuple<uint64_t, int32_t, int32_t>;  // (sequence, layer, kv head)
  // Starts the RPC of the call at the front of its head's queue.
  void SendAppend(AppendCall* call);
  // Completion: pops the call, sends the head's next one, runs `done`.
  void OnAppendDone(AppendCall* call, absl::Status status);

  void HealthLoop(const std::function<void(bool)>& on_change, absl::Duration retry);
  // Starts the lease renewal thread (LeaseLoop) once.
  void StartLeaseRenewal();
  void LeaseLoop();

  std::string target_;
  GrpcClientOptions options_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::RetrievalNode::Stub> stub_;
  std::mutex append_mu_;
  // AppendAsync calls not completed yet, per head, in issue order; the front
  // one is in flight. A head with none has no entry.
  std::map<HeadId, std::deque<std::unique_ptr<AppendCall>>> append_queues_;

  // The health watch (WatchHealth): its thread, the stream it is reading
  // (cancelled to stop it) and the stop flag, under health_mu_.
  std::mutex health_mu_;
  std::condition_variable health_cv_;
  bool health_stop_ = false;
  grpc::ClientContext* health_context_ = nullptr;
  std::thread health_thread_;

  // Lease renewal (StartLeaseRenewal), under lease_mu_.
  std::mutex lease_mu_;
  std::condition_variable lease_cv_;
  bool lease_stop_ = false;
  std::thread lease_thread_;
};

}  // namespace kvr::retrieval
