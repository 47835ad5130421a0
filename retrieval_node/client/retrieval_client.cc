#include "retrieval_node/client/retrieval_client.h"

#include "absl/strings/str_cat.h"

namespace kvr::retrieval {

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
