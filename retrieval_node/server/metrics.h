// NodeMetrics: the kvr_node Prometheus metrics (STYLE rule 12) and the
// `/metrics` HTTP endpoint that serves them.
//
// Owns a prometheus::Registry with every kvr_node_* family (the list, with
// units and labels, is in README.md) and, after Serve(), a prometheus-cpp
// Exposer. No prometheus type appears in this header: the handlers record
// through the plain methods below, and the gauges that describe what the node
// holds (shards, bytes, budget) are read from a callback at scrape time, so
// they are exact whenever Prometheus looks.
//
// Thread-safety: every Record* method is thread-safe and cheap (an atomic
// add, or a short mutex for histograms); label children are resolved once
// per (method, code) and cached. Serve / SetHoldingsSource must be called
// before the node serves requests, from one thread.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include "common/status.h"
#include "retrieval_node/core/node_types.h"

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
};
inline constexpr size_t kNodeMethodCount = 7;

// What the node holds, sampled at scrape time.
struct NodeHoldings {
  int64_t sequences = 0;
  int64_t shards = 0;               // chunks over every (sequence, layer, kv head)
  int64_t indexed_keys = 0;         // keys inside built indexes
  int64_t tail_keys = 0;            // appended keys not yet sealed into an index
  int64_t memory_used_bytes = 0;    // bytes accounted against the budget
  int64_t memory_budget_bytes = 0;  // 0 = unlimited
};

class NodeMetrics {
 public:
  NodeMetrics();
  ~NodeMetrics();
  NodeMetrics(const NodeMetrics&) = delete;
  NodeMetrics& operator=(const NodeMetrics&) = delete;

  // Called on every scrape (on an exposer thread) to fill the holdings gauges.
  // Must be thread-safe and must stay callable until this object is
  // destroyed (or until Serve was never called).
  void SetHoldingsSource(std::function<NodeHoldings()> source);

  // Starts serving GET /metrics on `listen` ("host:port"; port 0 picks a free
  // one) and returns the bound port. InvalidArgument for a malformed address,
  // Unavailable when it cannot bind. At most once.
  absl::StatusOr<int> Serve(const std::string& listen);

  // One finished RPC: kvr_node_requests_total{method, code} += 1 and
  // kvr_node_request_duration_seconds{method} observes `seconds` (handler
  // entry to Finish).
  void RecordRequest(NodeMethod method, absl::StatusCode code, double seconds);
  // One successful Attend over `query_heads` query heads that scored
  // `distance_computations` keys in total (summed over heads and shards).
  void RecordAttendScan(int64_t query_heads, int64_t distance_computations);
  // One successful UploadShard: storing the shard and building its index (of
  // type `index_type`, the one it got) took `seconds`.
  void RecordIndexBuild(IndexType index_type, double seconds);
  // Tokens acknowledged by one successful Append.
  void RecordAppendedTokens(int64_t tokens);

  // Label value of `method` ("Attend", ...).
  static std::string_view MethodName(NodeMethod method);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvr::retrieval
