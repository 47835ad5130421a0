#include "retrieval_node/client/retrieval_client.h"

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <memory>

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

namespace {

// Joins the per-item calls of a default batch: `done` runs (with OK) after
// the last item's callback.
struct BatchJoin {
  std::atomic<size_t> left;
  StatusCallback done;
  BatchJoin(size_t n, StatusCallback d) : left(n), done(std::move(d)) {}
  void Finish() {
    if (left.fetch_sub(1, std::memory_order_acq_rel) == 1) done(absl::OkStatus());
  }
};

}  // namespace

void RetrievalClient::AttendBatchAsync(std::span<AttendBatchItem> items, StatusCallback done) {
  if (items.empty()) {
    done(absl::OkStatus());
    return;
  }
  auto join = std::make_shared<BatchJoin>(items.size(), std::move(done));
  for (AttendBatchItem& item : items) {
    AttendAsync(item.request, item.out, item.stats, [join, &item](absl::Status st) {
      item.status = std::move(st);
      join->Finish();
    });
  }
}

void RetrievalClient::AppendBatchAsync(std::span<AppendBatchItem> items, StatusCallback done) {
  if (items.empty()) {
    done(absl::OkStatus());
    return;
  }
  auto join = std::make_shared<BatchJoin>(items.size(), std::move(done));
  for (AppendBatchItem& item : items) {
    AppendAsync(item.request, [join, &item](absl::Status st) {
      item.status = std::move(st);
      join->Finish();
    });
  }
}

absl::Status RetrievalClient::AttendBatch(std::span<AttendBatchItem> items) {
  StatusWaiter waiter;
  AttendBatchAsync(items, waiter.callback());
  return waiter.Wait();
}

absl::Status RetrievalClient::AppendBatch(std::span<AppendBatchItem> items) {
  StatusWaiter waiter;
  AppendBatchAsync(items, waiter.callback());
  return waiter.Wait();
}

absl::Status RetrievalClient::ForkSequence(uint64_t source_id, std::string_view /*source_capability*/,
                                           uint64_t fork_id, std::string_view /*fork_capability*/) {
  return absl::UnimplementedError(absl::StrCat("ForkSequence ", source_id, " -> ", fork_id,
                                               ": this client cannot fork sequences"));
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
