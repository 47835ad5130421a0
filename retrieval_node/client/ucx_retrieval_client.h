// UcxRetrievalClient: RetrievalClient whose Attend goes over the node's UCX
// data plane (retrieval_node/wire/ucx_wire.h: UCP active messages carrying the kvr.v1
// AttendRequest / AttendResponse bytes; AttendBatch and, since session 26,
// AppendBatch likewise, as wire versions 3 and 4); every other call goes to an inner
// GrpcRetrievalClient. Results are the same as over gRPC (same messages,
// same handler on the node), status codes included.
//
// Create asks the node for its UCX address (GetEndpoints RPC) and connects.
// When UCX is unavailable (the node advertises no address or an old node
// lacks the RPC, UCX cannot start here, or the connection fails) the client
// falls back to gRPC for Attend; using_ucx() / fallback_reason() say which.
//
// Replies: a reply completes a call only when this client sent that call id
// and still waits for it; any other reply is dropped. Call ids start at a
// random point (UcxClientOptions::first_call_id) and are never reused.
//
// Deadlines: every UCX Attend fails with DEADLINE_EXCEEDED once
// `attend_timeout` passes without a reply (its late reply is dropped); a
// broken connection fails the calls in flight with UNAVAILABLE and the next
// call reconnects.
//
// Threads: one progress thread owns the UCP worker; `done` of a UCX Attend
// runs on it (keep it short). Thread-safe.
#pragma once

#include <memory>
#include <string>

#include "absl/time/time.h"
#include "retrieval_node/client/grpc_retrieval_client.h"
#include "retrieval_node/client/retrieval_client.h"

namespace kvr::retrieval {

struct UcxClientOptions {
  // Deadline of every UCX call (Attend, AttendBatch, AppendBatch).
  absl::Duration attend_timeout = absl::Seconds(2);
  // Connection setup at Create; past it the client falls back to gRPC.
  absl::Duration connect_timeout = absl::Seconds(5);
  // Largest reply accepted.
  size_t max_message_bytes = size_t{64} << 20;
  // After activity, keep polling this long before blocking (lower latency,
  // one core busy meanwhile). 0: block at once.
  int64_t busy_poll_us = 0;
  // false: never try UCX (always gRPC).
  bool enable_ucx = true;
  // The first call id this client issues (ids then count up, never reused).
  // 0 (the default): a random one, so that two clients' ids do not collide
  // and a reply this client did not issue matches none of its calls. Tests
  // pin it to model colliding ids.
  uint64_t first_call_id = 0;
};

class UcxRetrievalClient final : public RetrievalClient {
 public:
  // Wraps `grpc` (used for every call but Attend, and for Attend when UCX is
  // unavailable). Errors only for bad options; UCX trouble means fallback.
  static absl::StatusOr<std::unique_ptr<UcxRetrievalClient>> Create(
      std::unique_ptr<GrpcRetrievalClient> grpc, const UcxClientOptions& options = {});
  ~UcxRetrievalClient() override;

  absl::Status CreateSequence(const SequenceSpec& spec) override;
  absl::Status CreateSequence(const SequenceSpec& spec, std::string_view capability) override;
  absl::Status UploadShard(const ShardUpload& upload) override;
  absl::Status Append(const AppendRequest& request) override;
  // Over gRPC (GrpcRetrievalClient::AppendAsync: per-head order kept).
  void AppendAsync(const AppendRequest& request, StatusCallback done) override;
  void AttendAsync(const AttendRequest& request, PartialsView out, AttendStats* stats,
                   StatusCallback done) override;
  // One UCX call for the whole batch: wire version 3 for AttendBatch, 4 for
  // AppendBatch (session 26; same per-item statuses as gRPC's, deadline
  // attend_timeout); gRPC's without UCX. A node older than version 4
  // refuses an AppendBatch with FAILED_PRECONDITION naming the wire
  // version, before applying any item.
  void AttendBatchAsync(std::span<AttendBatchItem> items, StatusCallback done) override;
  void AppendBatchAsync(std::span<AppendBatchItem> items, StatusCallback done) override;
  absl::Status DropSequence(uint64_t sequence_id) override;
  absl::Status DropSequence(uint64_t sequence_id, std::string_view capability) override;
  absl::Status ForkSequence(uint64_t source_id, std::string_view source_capability,
                            uint64_t fork_id, std::string_view fork_capability) override;
  absl::StatusOr<NodeStats> Stats() override;
  // Over gRPC (GrpcRetrievalClient::SyncShards).
  absl::StatusOr<SyncResult> SyncShards(const SyncRequest& request) override;

  // True when Attend goes over UCX; otherwise fallback_reason() says why not.
  bool using_ucx() const { return transport_ != nullptr; }
  const absl::Status& fallback_reason() const { return fallback_reason_; }
  // The node's UCX address ("IPV4:PORT"), empty when not using UCX.
  const std::string& ucx_address() const { return ucx_address_; }
  GrpcRetrievalClient* grpc() const { return grpc_.get(); }
  // The first call id of the UCX transport (0 when not using UCX).
  uint64_t first_call_id() const;

 private:
  class Transport;
  UcxRetrievalClient(std::unique_ptr<GrpcRetrievalClient> grpc, const UcxClientOptions& options);

  std::unique_ptr<GrpcRetrievalClient> grpc_;
  UcxClientOptions options_;
  std::unique_ptr<Transport> transport_;
  absl::Status fallback_reason_;
  std::string ucx_address_;
};

}  // namespace kvr::retrieval
