// InProcessRetrievalClient: RetrievalClient over a NodeCore in this process
// (embedded mode, tests). No sockets and no copies: every call goes straight
// to the core (retrieval_node/core/node_core.h, whose contracts it keeps:
// AttendAsync runs on the core's pool, AppendAsync applies the append before
// returning). Node-side operations (ListShards, HeldPositions, Recover, ...)
// are the core's: reach them through core().
//
// Thread-safety: thread-safe, as the core.
#pragma once

#include <cstdint>
#include <memory>

#include "common/attention.h"
#include "common/status.h"
#include "retrieval_node/client/retrieval_client.h"
#include "retrieval_node/core/node_core.h"

namespace kvr::retrieval {

class InProcessRetrievalClient final : public RetrievalClient {
 public:
  // A client over a new core built from `options` (InvalidArgument for bad
  // options, as NodeCore::Create).
  static absl::StatusOr<std::unique_ptr<InProcessRetrievalClient>> Create(
      const NodeCoreOptions& options = {});
  // A client over `core` (not null), which it owns.
  explicit InProcessRetrievalClient(std::unique_ptr<NodeCore> core);
  // Destroys the core: pending Attends finish first; every AppendAsync's
  // `done` must have run.
  ~InProcessRetrievalClient() override;

  absl::Status CreateSequence(const SequenceSpec& spec) override;
  absl::Status CreateSequence(const SequenceSpec& spec, std::string_view capability) override;
  absl::Status UploadShard(const ShardUpload& upload) override;
  absl::Status Append(const AppendRequest& request) override;
  void AppendAsync(const AppendRequest& request, StatusCallback done) override;
  void AttendAsync(const AttendRequest& request, PartialsView out, AttendStats* stats,
                   StatusCallback done) override;
  // One NodeCore batch call each (items searched in parallel on the core's
  // attend_threads pool).
  void AttendBatchAsync(std::span<AttendBatchItem> items, StatusCallback done) override;
  void AppendBatchAsync(std::span<AppendBatchItem> items, StatusCallback done) override;
  absl::Status DropSequence(uint64_t sequence_id) override;
  absl::Status DropSequence(uint64_t sequence_id, std::string_view capability) override;
  absl::Status ForkSequence(uint64_t source_id, std::string_view source_capability,
                            uint64_t fork_id, std::string_view fork_capability) override;
  absl::StatusOr<NodeStats> Stats() override;

  NodeCore& core() const { return *core_; }

 private:
  const std::unique_ptr<NodeCore> core_;
};

}  // namespace kvr::retrieval
