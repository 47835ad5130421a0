#include "retrieval_node/server/metrics.h"

#include <array>
#include <atomic>
#include <functional>
#include <mutex>
#include <utility>
#include <vector>

#include "prometheus/collectable.h"
#include "prometheus/counter.h"
#include "services/infra/metrics/metrics_endpoint.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"

namespace kvr::retrieval {
namespace {

constexpr std::array<std::string_view, kNodeMethodCount> kMethodNames = {
    "CreateSequence", "UploadShard", "Append", "Attend", "DropSequence", "ListShards", "Stats"};
// absl::StatusCode values 0 .. 16 (the gRPC codes).
constexpr size_t kCodeCount = 17;

// RPC latency: 50 µs .. 10 s, 1-2.5-5 steps.
const prometheus::Histogram::BucketBoundaries kRequestSeconds = {
    50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3,
    50e-3, 100e-3, 250e-3, 500e-3, 1.0,  2.5,    5.0,  10.0};
// Index builds: 1 ms .. 250 s.
const prometheus::Histogram::BucketBoundaries kBuildSeconds = {
    1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3,
    1.0,  2.5,    5.0,  10.0,  25.0,  50.0,  100.0,  250.0};
// Keys scored per query head: 32 .. 2^21, powers of two.
prometheus::Histogram::BucketBoundaries KeysScannedBuckets() {
  prometheus::Histogram::BucketBoundaries b;
  for (double v = 32; v <= double(1 << 21); v *= 2) b.push_back(v);
  return b;
}

constexpr std::array<IndexType, 3> kIndexTypes = {IndexType::kGraph, IndexType::kFlat,
                                                   IndexType::kIvf};

// Runs `refresh` (the holdings gauges), then returns the registry's
// families: what the exposer serves.
class ScrapeCollectable final : public prometheus::Collectable {
 public:
  ScrapeCollectable(std::shared_ptr<prometheus::Registry> registry, std::function<void()> refresh)
      : registry_(std::move(registry)), refresh_(std::move(refresh)) {}
  std::vector<prometheus::MetricFamily> Collect() const override {
    refresh_();
    return registry_->Collect();
  }

 private:
  const std::shared_ptr<prometheus::Registry> registry_;
  const std::function<void()> refresh_;
};

}  // namespace

struct NodeMetrics::Impl {
  Impl()
      : registry(std::make_shared<prometheus::Registry>()),
        requests(prometheus::BuildCounter()
                     .Name("kvr_node_requests_total")
                     .Help("kvr.v1.RetrievalNode RPCs finished, by method and gRPC status code")
                     .Register(*registry)),
        request_seconds(prometheus::BuildHistogram()
                            .Name("kvr_node_request_duration_seconds")
                            .Help("RPC time in the node, handler entry to Finish, by method")
                            .Register(*registry)),
        keys_scanned(prometheus::BuildHistogram()
                         .Name("kvr_node_attend_keys_scanned")
                         .Help("Keys scored (distance computations) per query head in one "
                               "successful Attend, summed over the shards searched")
                         .Register(*registry)
                         .Add({}, KeysScannedBuckets())),
        build_seconds(prometheus::BuildHistogram()
                          .Name("kvr_node_index_build_duration_seconds")
                          .Help("Seconds one successful UploadShard spent storing the shard and "
                                "building its index, by the index built")
                          .Register(*registry)),
        appended_tokens(prometheus::BuildCounter()
                            .Name("kvr_node_appended_tokens_total")
                            .Help("Tokens acknowledged by successful Append calls")
                            .Register(*registry)
                            .Add({})),
        sequences(GaugeFamily("kvr_node_sequences", "Sequences the node holds")),
        shards(GaugeFamily("kvr_node_shards",
                           "Shards (chunks of one sequence, layer and kv head) the node holds")),
        indexed_keys(GaugeFamily("kvr_node_indexed_keys", "Keys inside built indexes")),
        tail_keys(GaugeFamily("kvr_node_tail_keys",
                              "Appended keys not yet sealed into an index")),
        memory_used(GaugeFamily("kvr_node_memory_used_bytes",
                                "Shard bytes (keys, values, indexes, tails, in-flight "
                                "reservations) accounted against the memory budget")),
        memory_budget(GaugeFamily("kvr_node_memory_budget_bytes",
                                  "The node's memory budget (--memory_budget_bytes; 0 = "
                                  "unlimited)")),
        collectable(std::make_shared<ScrapeCollectable>(registry, [this] { RefreshHoldings(); })) {
    for (size_t m = 0; m < kNodeMethodCount; ++m) {
      const std::string method(kMethodNames[m]);
      method_seconds[m] = &request_seconds.Add({{"method", method}}, kRequestSeconds);
      // OK children exist from the start so every method shows a series.
      RequestCounter(m, 0);
    }
    for (IndexType t : kIndexTypes) {
      index_seconds[static_cast<size_t>(t)] =
          &build_seconds.Add({{"index", std::string(IndexTypeName(t))}}, kBuildSeconds);
    }
  }

  prometheus::Gauge& GaugeFamily(const std::string& name, const std::string& help) {
    return prometheus::BuildGauge().Name(name).Help(help).Register(*registry).Add({});
  }

  // The {method, code} child, created on first use (Family::Add is
  // thread-safe and returns the existing child for known labels).
  prometheus::Counter& RequestCounter(size_t method, size_t code) {
    std::atomic<prometheus::Counter*>& slot = request_counters[method][code];
    prometheus::Counter* c = slot.load(std::memory_order_acquire);
    if (c == nullptr) {
      c = &requests.Add(
          {{"method", std::string(kMethodNames[method])},
           {"code", absl::StatusCodeToString(static_cast<absl::StatusCode>(code))}});
      slot.store(c, std::memory_order_release);
    }
    return *c;
  }

  void RefreshHoldings() {
    std::function<NodeHoldings()> source;
    {
      std::lock_guard<std::mutex> lock(source_mu);
      source = holdings_source;
    }
    if (!source) return;
    const NodeHoldings h = source();
    sequences.Set(static_cast<double>(h.sequences));
    shards.Set(static_cast<double>(h.shards));
    indexed_keys.Set(static_cast<double>(h.indexed_keys));
    tail_keys.Set(static_cast<double>(h.tail_keys));
    memory_used.Set(static_cast<double>(h.memory_used_bytes));
    memory_budget.Set(static_cast<double>(h.memory_budget_bytes));
  }

  std::shared_ptr<prometheus::Registry> registry;
  prometheus::Family<prometheus::Counter>& requests;
  prometheus::Family<prometheus::Histogram>& request_seconds;
  prometheus::Histogram& keys_scanned;
  prometheus::Family<prometheus::Histogram>& build_seconds;
  prometheus::Counter& appended_tokens;
  prometheus::Gauge& sequences;
  prometheus::Gauge& shards;
  prometheus::Gauge& indexed_keys;
  prometheus::Gauge& tail_keys;
  prometheus::Gauge& memory_used;
  prometheus::Gauge& memory_budget;

  std::array<std::array<std::atomic<prometheus::Counter*>, kCodeCount>, kNodeMethodCount>
      request_counters{};
  std::array<prometheus::Histogram*, kNodeMethodCount> method_seconds{};
  std::array<prometheus::Histogram*, kIndexTypes.size()> index_seconds{};  // by IndexType

  std::mutex source_mu;
  std::function<NodeHoldings()> holdings_source;

  std::shared_ptr<ScrapeCollectable> collectable;
  // Declared last: destroyed first, so no scrape runs while the rest goes.
  std::unique_ptr<metrics::MetricsEndpoint> endpoint;
};

NodeMetrics::NodeMetrics() : impl_(std::make_unique<Impl>()) {}

NodeMetrics::~NodeMetrics() = default;

void NodeMetrics::SetHoldingsSource(std::function<NodeHoldings()> source) {
  std::lock_guard<std::mutex> lock(impl_->source_mu);
  impl_->holdings_source = std::move(source);
}

absl::StatusOr<int> NodeMetrics::Serve(const std::string& listen) {
  if (impl_->endpoint != nullptr) {
    return absl::FailedPreconditionError("metrics are already served");
  }
  absl::StatusOr<std::unique_ptr<metrics::MetricsEndpoint>> endpoint =
      metrics::MetricsEndpoint::Start(listen, impl_->collectable);
  if (!endpoint.ok()) return endpoint.status();
  impl_->endpoint = std::move(*endpoint);
  return impl_->endpoint->port();
}

void NodeMetrics::RecordRequest(NodeMethod method, absl::StatusCode code, double seconds) {
  const auto m = static_cast<size_t>(method);
  auto c = static_cast<size_t>(code);
  if (c >= kCodeCount) c = static_cast<size_t>(absl::StatusCode::kUnknown);
  impl_->RequestCounter(m, c).Increment();
  impl_->method_seconds[m]->Observe(seconds);
}

void NodeMetrics::RecordAttendScan(int64_t query_heads, int64_t distance_computations) {
  if (query_heads <= 0) return;
  impl_->keys_scanned.Observe(static_cast<double>(distance_computations) /
                              static_cast<double>(query_heads));
}

void NodeMetrics::RecordIndexBuild(IndexType index_type, double seconds) {
  const auto i = static_cast<size_t>(index_type);
  if (i < impl_->index_seconds.size()) impl_->index_seconds[i]->Observe(seconds);
}

void NodeMetrics::RecordAppendedTokens(int64_t tokens) {
  if (tokens > 0) impl_->appended_tokens.Increment(static_cast<double>(tokens));
}

std::string_view NodeMetrics::MethodName(NodeMethod method) {
  return kMethodNames[static_cast<size_t>(method)];
}

}  // namespace kvr::retrieval
