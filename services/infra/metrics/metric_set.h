// MetricSet: the Prometheus set-up every kvr metrics class shares (NodeMetrics,
// WorkerMetrics, GatewayMetrics): a registry with one-line builders for
// counter / gauge / histogram families, the hook that sets the gauges read at
// scrape time, and the collectable a MetricsEndpoint serves. CodeCounters:
// the `..._requests_total{..., code}` children, cached per gRPC status code.
//
// Names follow STYLE rule 12 (`kvr_<subsystem>_<name>_<unit>`); each name is
// registered once (prometheus-cpp throws on a clash: a programmer error).
#pragma once

#include <atomic>
#include <cstddef>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "prometheus/collectable.h"
#include "prometheus/counter.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/labels.h"
#include "prometheus/registry.h"

namespace kvr::metrics {

using Buckets = prometheus::Histogram::BucketBoundaries;

// 50 µs .. 10 s in 1-2.5-5 steps: one RPC in a node, one batched decode step.
Buckets MicrosToSecondsBuckets();
// first, 2 first, 4 first, ... up to `last` (inclusive): e.g. keys scanned.
Buckets PowerOfTwoBuckets(double first, double last);

class MetricSet {
 public:
  MetricSet();
  ~MetricSet();
  MetricSet(const MetricSet&) = delete;
  MetricSet& operator=(const MetricSet&) = delete;

  // Families (and the series added to them) live as long as this object;
  // Family::Add is thread-safe and returns the existing series for known labels.
  prometheus::Family<prometheus::Counter>& CounterFamily(const std::string& name,
                                                         const std::string& help);
  prometheus::Family<prometheus::Gauge>& GaugeFamily(const std::string& name,
                                                     const std::string& help);
  prometheus::Family<prometheus::Histogram>& HistogramFamily(const std::string& name,
                                                             const std::string& help);
  // A family holding one unlabelled series, and that series.
  prometheus::Counter& Counter(const std::string& name, const std::string& help);
  prometheus::Gauge& Gauge(const std::string& name, const std::string& help);
  prometheus::Histogram& Histogram(const std::string& name, const std::string& help,
                                   const Buckets& buckets);

  // `refresh` runs at the start of every scrape, on the endpoint's thread,
  // to set the gauges that are read at scrape time; it replaces an earlier
  // hook. Thread-safe. Whatever `refresh` uses must stay alive while the
  // collectable is served.
  void OnScrape(std::function<void()> refresh);

  // What a MetricsEndpoint serves: runs the scrape hook, then collects every
  // family (in registration order within each metric type).
  std::shared_ptr<prometheus::Collectable> collectable() const;

 private:
  class Scraped;
  std::shared_ptr<prometheus::Registry> registry_;
  std::shared_ptr<Scraped> scraped_;
};

// The children of a counter family labelled by gRPC status code ("code":
// absl::StatusCodeToString) and, per row, fixed other labels (e.g.
// {"method", "Attend"}; one empty row for a family labelled by code alone).
// A child is created on first use and cached, so counting is an atomic load
// and an add. The OK child of every row is created up front, so each row
// shows a series from the start.
class CodeCounters {
 public:
  // `family` must outlive this object.
  CodeCounters(prometheus::Family<prometheus::Counter>& family,
               std::vector<prometheus::Labels> rows);
  CodeCounters(const CodeCounters&) = delete;
  CodeCounters& operator=(const CodeCounters&) = delete;

  // Thread-safe. `row` < the number of rows; a code outside the gRPC codes
  // (0 .. 16) counts as UNKNOWN.
  prometheus::Counter& Get(size_t row, absl::StatusCode code);

 private:
  static constexpr size_t kCodeCount = 17;  // absl::StatusCode 0 .. 16, the gRPC codes
  prometheus::Family<prometheus::Counter>& family_;
  const std::vector<prometheus::Labels> rows_;
  std::unique_ptr<std::atomic<prometheus::Counter*>[]> slots_;  // [row * kCodeCount + code]
};

}  // namespace kvr::metrics
