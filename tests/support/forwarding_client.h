// A RetrievalClient that forwards every call to another client (a node), for
// tests that intercept a few calls (gate, record or fail them) and pass the
// rest through. Subclasses override what they intercept and call the base
// (or node()) to forward. AppendAsync, SyncShards and the replication hooks
// are not forwarded: they keep RetrievalClient's defaults.
#pragma once

#include <string_view>
#include <utility>

#include "retrieval_node/client/retrieval_client.h"

namespace kvr::test_support {

using kvr::PartialsView;

class ForwardingRetrievalClient : public retrieval::RetrievalClient {
 public:
  explicit ForwardingRetrievalClient(retrieval::RetrievalClient* node) : node_(node) {}

  absl::Status CreateSequence(const retrieval::SequenceSpec& spec) override {
    return node_->CreateSequence(spec);
  }
  absl::Status CreateSequence(const retrieval::SequenceSpec& spec,
                              std::string_view capability) override {
    return node_->CreateSequence(spec, capability);
  }
  absl::Status UploadShard(const retrieval::ShardUpload& upload) override {
    return node_->UploadShard(upload);
  }
  absl::Status Append(const retrieval::AppendRequest& request) override {
    return node_->Append(request);
  }
  void AttendAsync(const retrieval::AttendRequest& request, PartialsView out,
                   retrieval::AttendStats* stats, retrieval::StatusCallback done) override {
    node_->AttendAsync(request, out, stats, std::move(done));
  }
  absl::Status DropSequence(uint64_t sequence_id) override {
    return node_->DropSequence(sequence_id);
  }
  absl::Status DropSequence(uint64_t sequence_id, std::string_view capability) override {
    return node_->DropSequence(sequence_id, capability);
  }
  absl::StatusOr<retrieval::NodeStats> Stats() override { return node_->Stats(); }

 protected:
  retrieval::RetrievalClient* node() const { return node_; }

 private:
  retrieval::RetrievalClient* node_;
};

}  // namespace kvr::test_support
