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
// Thread-safety: thread-safe (one channel, many concurrent calls).
#pragma once

#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "absl/time/time.h"
#include "grpcpp/channel.h"
#include "kvr/v1/retrieval.grpc.pb.h"
#include "retrieval_node/client/retrieval_client.h"

namespace kvr::retrieval {

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
};

class GrpcRetrievalClient final : public RetrievalClient {
 public:
  // `target`: a gRPC target such as "127.0.0.1:7000". Does not connect yet
  // (the first call does; see WaitForReady). InvalidArgument for bad options.
  static absl::StatusOr<std::unique_ptr<GrpcRetrievalClient>> Create(
      const std::string& target, const GrpcClientOptions& options = {});
  ~GrpcRetrievalClient() override;

  absl::Status CreateSequence(const SequenceSpec& spec) override;
  absl::Status UploadShard(const ShardUpload& upload) override;
  absl::Status Append(const AppendRequest& request) override;
  void AppendAsync(const AppendRequest& request, StatusCallback done) override;
  void AttendAsync(const AttendRequest& request, PartialsView out, AttendStats* stats,
                   StatusCallback done) override;
  absl::Status DropSequence(uint64_t sequence_id) override;
  absl::StatusOr<NodeStats> Stats() override;
  // The SyncShards RPC to this client's node (the destination), under
  // options.sync_timeout.
  absl::StatusOr<SyncResult> SyncShards(const SyncRequest& request) override;

  // Shards of one sequence or of every sequence (ListShards RPC).
  absl::StatusOr<std::vector<ShardInfo>> ListShards(std::optional<uint64_t> sequence_id);

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

  std::string target_;
  GrpcClientOptions options_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::RetrievalNode::Stub> stub_;
  std::mutex append_mu_;
  // AppendAsync calls not completed yet, per head, in issue order; the front
  // one is in flight. A head with none has no entry.
  std::map<HeadId, std::deque<std::unique_ptr<AppendCall>>> append_queues_;
};

}  // namespace kvr::retrieval
