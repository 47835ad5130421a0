// NodeMetrics: the kvr_node Prometheus metrics (STYLE rule 12).
//
// Owns every kvr_node_* family (the list, with units and labels, is in
// README.md; set up with services/infra/metrics MetricSet); collectable() is
// what the `/metrics` endpoint serves. No prometheus type is used in this
// header: the handlers record through the plain methods below, and the
// gauges that describe what the node holds (shards, bytes, budget) are read
// from a callback at scrape time, so they are exact whenever Prometheus looks.
//
// Thread-safety: every Record* method is thread-safe and cheap (an atomic
// add, or a short mutex for histograms); label children are resolved once
// per (method, code) and cached. SetHoldingsSource must be called before the
// metrics are served, from one thread.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include "common/status.h"
#include "retrieval_node/core/node_types.h"

namespace prometheus {
class Collectable;
}  // namespace prometheus

namespace kvr::retrieval {

// The kvr.v1.RetrievalNode methods, as the `method` label spells them.
enum class NodeMethod : uint8_t {
  kCreateSequence = 0,
  kUploadShard,
  kAppend,
  kAttend,
  kDropSequence,
  kListShards,
  kStats,
  kSyncShards,
  kReadShards,
  kRenewLeases,
  kAttendBatch,
  kAppendBatch,
  kForkSequence,
};
inline constexpr size_t kNodeMethodCount = 13;

// What the node holds, sampled at scrape time.
struct NodeHoldings {
  int64_t sequences = 0;
  int64_t shards = 0;               // chunks over every (sequence, layer, kv head)
  int64_t indexed_keys = 0;         // keys inside built indexes
  int64_t tail_keys = 0;            // appended keys not yet sealed into an index
  int64_t memory_used_bytes = 0;    // bytes accounted against the budget
  int64_t memory_budget_bytes = 0;  // 0 = unlimited
  int64_t quarantined_sequences = 0;  // set aside by recovery, not served
  int64_t upload_memory_used_bytes = 0;  // working memory reserved by uploads in flight
  int64_t leases_expired = 0;  // sequences dropped by lease expiry since start (a total)
  int64_t index_builds_pending = 0;  // deferred index builds queued or running
};

class NodeMetrics {
 public:
  NodeMetrics();
  ~NodeMetrics();
  NodeMetrics(const NodeMetrics&) = delete;
  NodeMetrics& operator=(const NodeMetrics&) = delete;

  // Called on every scrape (on the endpoint's thread) to fill the holdings
  // gauges. Must be thread-safe and must stay callable while collectable()
  // is served.
  void SetHoldingsSource(std::function<NodeHoldings()> source);

  // What the `/metrics` endpoint serves (refreshes the holdings gauges, then
  // every family). Stop serving it before this object is destroyed.
  std::shared_ptr<prometheus::Collectable> collectable() const;

  // One finished RPC: kvr_node_requests_total{method, code} += 1 and
  // kvr_node_request_duration_seconds{method} observes `seconds` (handler
  // entry to Finish).
  void RecordRequest(NodeMethod method, absl::StatusCode code, double seconds);
  // One successful Attend over `query_heads` query heads that scored
  // `distance_computations` keys in total (summed over heads and shards).
  void RecordAttendScan(int64_t query_heads, int64_t distance_computations);
  // One successful UploadShard: storing the shard and building its index (of
  // type `index_type`, the one it got) took `seconds`. A deferred build
  // (--defer_index_build) is recorded when it installs, with its own time.
  void RecordIndexBuild(IndexType index_type, double seconds);
  // The calibration of one successful UploadShard's index of `index_type`:
  // kvr_node_index_expected_recall{index} observes `expected_recall` (< 0:
  // unknown, not observed) and kvr_node_index_auto_search_seconds{index} the
  // measured µs per query of index auto's choice (<= 0: not measured).
  void RecordIndexCalibration(IndexType index_type, double measured_us, double expected_recall);
  // One AttendBatch that reached the node with `items` items
  // (kvr_node_attend_batch_items). Each item also counts as an Attend.
  void RecordAttendBatchItems(int64_t items);
  // Tokens acknowledged by one successful Append.
  void RecordAppendedTokens(int64_t tokens);

  // One successful SyncShards on this (destination) node: kvr_node_sync_
  // keys_received_total += keys, kvr_node_sync_received_bytes_total += bytes.
  void RecordSyncReceived(int64_t keys, int64_t bytes);
  // One ReadShards stream this (source) node sent (possibly cut short: what
  // was written counts): kvr_node_sync_keys_sent_total / _sent_bytes_total.
  void RecordSyncSent(int64_t keys, int64_t bytes);

  // Label value of `method` ("Attend", ...).
  static std::string_view MethodName(NodeMethod method);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvr::retrieval
