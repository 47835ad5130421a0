#include "retrieval_node/server/metrics.h"

#include <array>
#include <utility>
#include <vector>

#include "services/infra/metrics/metric_set.h"

namespace kvr::retrieval {
namespace {

constexpr std::array<std::string_view, kNodeMethodCount> kMethodNames = {
    "CreateSequence", "UploadShard", "Append",    "Attend",    "DropSequence",
    "ListShards",     "Stats",       "SyncShards", "ReadShards", "RenewLeases",
    "AttendBatch",    "AppendBatch", "ForkSequence"};

// Index builds: 1 ms .. 250 s.
const metrics::Buckets kBuildSeconds = {
    1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3,
    1.0,  2.5,    5.0,  10.0,  25.0,  50.0,  100.0,  250.0};

constexpr std::array<IndexType, 6> kIndexTypes = {IndexType::kGraph, IndexType::kFlat,
                                                   IndexType::kIvf, IndexType::kFlatSq8,
                                                   IndexType::kIvfSq8, IndexType::kPcaSq8};

// Expected recall@k of a calibrated index: 0.5 .. 1.
const metrics::Buckets kRecallBuckets = {0.5,  0.8,  0.9,  0.93,  0.95, 0.96,
                                         0.97, 0.98, 0.99, 0.995, 1.0};

std::vector<prometheus::Labels> MethodRows() {
  std::vector<prometheus::Labels> rows;
  for (std::string_view m : kMethodNames) rows.push_back({{"method", std::string(m)}});
  return rows;
}

}  // namespace

struct NodeMetrics::Impl {
  Impl()
      : requests(set.CounterFamily(
                     "kvr_node_requests_total",
                     "kvr.v1.RetrievalNode RPCs finished, by method and gRPC status code"),
                 MethodRows()),
        request_seconds(set.HistogramFamily(
            "kvr_node_request_duration_seconds",
            "RPC time in the node, handler entry to Finish, by method")),
        keys_scanned(set.Histogram("kvr_node_attend_keys_scanned",
                                   "Keys scored (distance computations) per query head in one "
                                   "successful Attend, summed over the shards searched",
                                   // 32 .. 2^21 keys
                                   metrics::PowerOfTwoBuckets(32, double(1 << 21)))),
        batch_items(set.Histogram("kvr_node_attend_batch_items",
                                  "Items (one sequence's Attend each) per AttendBatch call",
                                  // 1 .. 2^16 items
                                  metrics::PowerOfTwoBuckets(1, double(1 << 16)))),
        build_seconds(set.HistogramFamily(
            "kvr_node_index_build_duration_seconds",
            "Seconds one successful UploadShard spent storing the shard and building its index, "
            "by the index built")),
        auto_search_seconds(set.HistogramFamily(
            "kvr_node_index_auto_search_seconds",
            "Index auto: the chosen kind's measured search time per query at its calibrated "
            "effort (one query per search, one thread, held-back queries), per upload, by the "
            "kind chosen")),
        expected_recall(set.HistogramFamily(
            "kvr_node_index_expected_recall",
            "Self-calibrated uploads: recall@k the index reached on the held-back queries at "
            "its chosen effort, by the kind")),
        appended_tokens(set.Counter("kvr_node_appended_tokens_total",
                                    "Tokens acknowledged by successful Append calls")),
        sequences(set.Gauge("kvr_node_sequences", "Sequences the node holds")),
        shards(set.Gauge("kvr_node_shards",
                         "Shards (chunks of one sequence, layer and kv head) the node holds")),
        indexed_keys(set.Gauge("kvr_node_indexed_keys", "Keys inside built indexes")),
        tail_keys(set.Gauge("kvr_node_tail_keys", "Appended keys not yet sealed into an index")),
        index_builds_pending(set.Gauge("kvr_node_index_builds_pending",
                                       "Deferred index builds queued or running")),
        memory_used(set.Gauge("kvr_node_memory_used_bytes",
                              "Shard bytes (keys, values, indexes, tails, in-flight "
                              "reservations) accounted against the memory budget")),
        memory_budget(set.Gauge("kvr_node_memory_budget_bytes",
                                "The node's memory budget (--memory_budget_bytes; 0 = "
                                "unlimited)")),
        quarantined(set.Gauge("kvr_node_quarantined_sequences",
                              "Sequences recovery set aside (corrupt, inconsistent or over the "
                              "memory budget): not served, records kept in the data dir")),
        upload_memory_used(set.Gauge("kvr_node_upload_memory_used_bytes",
                                     "Working memory reserved by UploadShard streams in flight "
                                     "against --upload_memory_bytes")),
        leases_expired(set.Counter("kvr_node_leases_expired_total",
                                   "Sequences dropped because their lease owner stopped "
                                   "renewing for --lease_seconds")),
        sync_keys_received(set.Counter("kvr_node_sync_keys_received_total",
                                       "Rows this node received as the destination of "
                                       "successful SyncShards calls")),
        sync_bytes_received(set.Counter("kvr_node_sync_received_bytes_total",
                                        "Payload bytes this node received from source nodes "
                                        "in successful SyncShards calls")),
        sync_keys_sent(set.Counter("kvr_node_sync_keys_sent_total",
                                   "Rows (with values) this node sent as the source of "
                                   "ReadShards streams")),
        sync_bytes_sent(set.Counter("kvr_node_sync_sent_bytes_total",
                                    "Payload bytes this node sent as the source of ReadShards "
                                    "streams")) {
    const metrics::Buckets request_buckets = metrics::MicrosToSecondsBuckets();
    for (size_t m = 0; m < kNodeMethodCount; ++m) {
      method_seconds[m] =
          &request_seconds.Add({{"method", std::string(kMethodNames[m])}}, request_buckets);
    }
    for (IndexType t : kIndexTypes) {
      index_seconds[static_cast<size_t>(t)] =
          &build_seconds.Add({{"index", std::string(IndexTypeName(t))}}, kBuildSeconds);
      auto_seconds[static_cast<size_t>(t)] = &auto_search_seconds.Add(
          {{"index", std::string(IndexTypeName(t))}}, request_buckets);
      recall[static_cast<size_t>(t)] =
          &expected_recall.Add({{"index", std::string(IndexTypeName(t))}}, kRecallBuckets);
    }
  }

  void SetHoldings(const NodeHoldings& h) {
    sequences.Set(static_cast<double>(h.sequences));
    shards.Set(static_cast<double>(h.shards));
    indexed_keys.Set(static_cast<double>(h.indexed_keys));
    tail_keys.Set(static_cast<double>(h.tail_keys));
    index_builds_pending.Set(static_cast<double>(h.index_builds_pending));
    memory_used.Set(static_cast<double>(h.memory_used_bytes));
    memory_budget.Set(static_cast<double>(h.memory_budget_bytes));
    quarantined.Set(static_cast<double>(h.quarantined_sequences));
    upload_memory_used.Set(static_cast<double>(h.upload_memory_used_bytes));
    // A total kept by the core: the counter catches up with it.
    const double expired = static_cast<double>(h.leases_expired);
    if (expired > leases_expired.Value()) leases_expired.Increment(expired - leases_expired.Value());
  }

  metrics::MetricSet set;  // first: every family below lives in it
  metrics::CodeCounters requests;  // rows: kMethodNames
  prometheus::Family<prometheus::Histogram>& request_seconds;
  prometheus::Histogram& keys_scanned;
  prometheus::Histogram& batch_items;
  prometheus::Family<prometheus::Histogram>& build_seconds;
  prometheus::Family<prometheus::Histogram>& auto_search_seconds;
  prometheus::Family<prometheus::Histogram>& expected_recall;
  prometheus::Counter& appended_tokens;
  prometheus::Gauge& sequences;
  prometheus::Gauge& shards;
  prometheus::Gauge& indexed_keys;
  prometheus::Gauge& tail_keys;
  prometheus::Gauge& index_builds_pending;
  prometheus::Gauge& memory_used;
  prometheus::Gauge& memory_budget;
  prometheus::Gauge& quarantined;
  prometheus::Gauge& upload_memory_used;
  prometheus::Counter& leases_expired;
  prometheus::Counter& sync_keys_received;
  prometheus::Counter& sync_bytes_received;
  prometheus::Counter& sync_keys_sent;
  prometheus::Counter& sync_bytes_sent;

  std::array<prometheus::Histogram*, kNodeMethodCount> method_seconds{};
  std::array<prometheus::Histogram*, index::kNumIndexTypes> index_seconds{};  // by IndexType
  std::array<prometheus::Histogram*, index::kNumIndexTypes> auto_seconds{};   // by IndexType
  std::array<prometheus::Histogram*, index::kNumIndexTypes> recall{};         // by IndexType
};

NodeMetrics::NodeMetrics() : impl_(std::make_unique<Impl>()) {}

NodeMetrics::~NodeMetrics() = default;

void NodeMetrics::SetHoldingsSource(std::function<NodeHoldings()> source) {
  impl_->set.OnScrape(
      [impl = impl_.get(), source = std::move(source)] { impl->SetHoldings(source()); });
}

std::shared_ptr<prometheus::Collectable> NodeMetrics::collectable() const {
  return impl_->set.collectable();
}

void NodeMetrics::RecordRequest(NodeMethod method, absl::StatusCode code, double seconds) {
  const auto m = static_cast<size_t>(method);
  impl_->requests.Get(m, code).Increment();
  impl_->method_seconds[m]->Observe(seconds);
}

void NodeMetrics::RecordAttendScan(int64_t query_heads, int64_t distance_computations) {
  if (query_heads <= 0) return;
  impl_->keys_scanned.Observe(static_cast<double>(distance_computations) /
                              static_cast<double>(query_heads));
}

void NodeMetrics::RecordAttendBatchItems(int64_t items) {
  impl_->batch_items.Observe(static_cast<double>(items));
}

void NodeMetrics::RecordIndexBuild(IndexType index_type, double seconds) {
  const auto i = static_cast<size_t>(index_type);
  if (i < impl_->index_seconds.size() && impl_->index_seconds[i] != nullptr) {
    impl_->index_seconds[i]->Observe(seconds);
  }
}

void NodeMetrics::RecordIndexCalibration(IndexType index_type, double measured_us,
                                         double expected_recall) {
  const auto i = static_cast<size_t>(index_type);
  if (i >= impl_->recall.size() || impl_->recall[i] == nullptr) return;
  if (expected_recall >= 0) impl_->recall[i]->Observe(expected_recall);
  if (measured_us > 0) impl_->auto_seconds[i]->Observe(measured_us * 1e-6);
}

void NodeMetrics::RecordAppendedTokens(int64_t tokens) {
  if (tokens > 0) impl_->appended_tokens.Increment(static_cast<double>(tokens));
}

void NodeMetrics::RecordSyncReceived(int64_t keys, int64_t bytes) {
  if (keys > 0) impl_->sync_keys_received.Increment(static_cast<double>(keys));
  if (bytes > 0) impl_->sync_bytes_received.Increment(static_cast<double>(bytes));
}

void NodeMetrics::RecordSyncSent(int64_t keys, int64_t bytes) {
  if (keys > 0) impl_->sync_keys_sent.Increment(static_cast<double>(keys));
  if (bytes > 0) impl_->sync_bytes_sent.Increment(static_cast<double>(bytes));
}

std::string_view NodeMetrics::MethodName(NodeMethod method) {
  return kMethodNames[static_cast<size_t>(method)];
}

}  // namespace kvr::retrieval
