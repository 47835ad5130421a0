#include "retrieval_node/client/retrieval_client.h"

#include <cstdio>
#include <cstdlib>

#include "absl/strings/str_cat.h"
#include "retrieval_node/core/sequence_access.h"

namespace kvr::retrieval {

absl::StatusOr<SequenceHandle> NewSequenceHandle() {
  SequenceHandle handle;
  KVR_ASSIGN_OR_RETURN(handle.id, RandomSequenceId());
  KVR_ASSIGN_OR_RETURN(handle.capability, RandomBytes(kCapabilityBytes));
  return handle;
}

const std::string& ProcessLeaseOwner() {
  static const std::string* const owner = [] {
    absl::StatusOr<std::string> bytes = RandomBytes(kCapabilityBytes);
    if (!bytes.ok()) {  // no CSPRNG: nothing about isolation can be trusted
      std::fprintf(stderr, "kvr: %s\n", bytes.status().ToString().c_str());
      std::abort();
    }
    return new std::string(*std::move(bytes));
  }();
  return *owner;
}

void RetrievalClient::AppendAsync(const AppendRequest& request, StatusCallback done) {
  done(Append(request));
}

absl::StatusOr<SyncResult> RetrievalClient::SyncShards(const SyncRequest& request) {
  return absl::UnimplementedError(absl::StrCat("SyncShards of sequence ", request.spec.sequence_id,
                                               ": this client does not talk to one networked node"));
}

absl::Status RetrievalClient::Attend(const AttendRequest& request, PartialsView out,
                                     AttendStats* stats) {
  StatusWaiter waiter;
  AttendAsync(request, out, stats, waiter.callback());
  return waiter.Wait();
}

}  // namespace kvr::retrieval
