#include "retrieval_node/client/in_process_client.h"

#include <utility>

namespace kvr::retrieval {

absl::StatusOr<std::unique_ptr<InProcessRetrievalClient>> InProcessRetrievalClient::Create(
    const NodeCoreOptions& options) {
  KVR_ASSIGN_OR_RETURN(std::unique_ptr<NodeCore> core, NodeCore::Create(options));
  return std::make_unique<InProcessRetrievalClient>(std::move(core));
}

InProcessRetrievalClient::InProcessRetrievalClient(std::unique_ptr<NodeCore> core)
    : core_(std::move(core)) {
  KVR_CHECK(core_ != nullptr);
}

InProcessRetrievalClient::~InProcessRetrievalClient() = default;

absl::Status InProcessRetrievalClient::CreateSequence(const SequenceSpec& spec) {
  return core_->CreateSequence(spec);
}

absl::Status InProcessRetrievalClient::CreateSequence(const SequenceSpec& spec,
                                                      std::string_view capability) {
  SequenceAccess access;
  access.capability = std::string(capability);
  return core_->CreateSequence(spec, access);
}

absl::Status InProcessRetrievalClient::UploadShard(const ShardUpload& upload) {
  return core_->UploadShard(upload);
}

absl::Status InProcessRetrievalClient::Append(const AppendRequest& request) {
  return core_->Append(request);
}

void InProcessRetrievalClient::AppendAsync(const AppendRequest& request, StatusCallback done) {
  core_->AppendAsync(request, std::move(done));
}

void InProcessRetrievalClient::AttendAsync(const AttendRequest& request, PartialsView out,
                                           AttendStats* stats, StatusCallback done) {
  core_->AttendAsync(request, out, stats, std::move(done));
}

void InProcessRetrievalClient::AttendBatchAsync(std::span<AttendBatchItem> items,
                                                StatusCallback done) {
  core_->AttendBatchAsync(items, std::move(done));
}

void InProcessRetrievalClient::AppendBatchAsync(std::span<AppendBatchItem> items,
                                                StatusCallback done) {
  core_->AppendBatchAsync(items, std::move(done));
}

absl::Status InProcessRetrievalClient::DropSequence(uint64_t sequence_id) {
  return core_->DropSequence(sequence_id);
}

absl::Status InProcessRetrievalClient::DropSequence(uint64_t sequence_id,
                                                    std::string_view capability) {
  return core_->DropSequence(sequence_id, capability);
}

absl::Status InProcessRetrievalClient::ForkSequence(uint64_t source_id,
                                                    std::string_view source_capability,
                                                    uint64_t fork_id,
                                                    std::string_view fork_capability) {
  SequenceAccess access;
  access.capability = std::string(fork_capability);
  return core_->ForkSequence(source_id, source_capability, fork_id, access);
}

absl::StatusOr<NodeStats> InProcessRetrievalClient::Stats() { return core_->Stats(); }

}  // namespace kvr::retrieval
