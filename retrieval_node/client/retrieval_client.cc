#include "retrieval_node/client/retrieval_client.h"

namespace kvr::retrieval {

void RetrievalClient::AppendAsync(const AppendRequest& request, StatusCallback done) {
  done(Append(request));
}

absl::Status RetrievalClient::Attend(const AttendRequest& request, PartialsView out,
                                     AttendStats* stats) {
  StatusWaiter waiter;
  AttendAsync(request, out, stats, waiter.callback());
  return waiter.Wait();
}

}  // namespace kvr::retrieval
