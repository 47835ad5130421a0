#include "services/infra/metrics/metric_set.h"

#include <mutex>
#include <utility>

namespace kvr::metrics {

Buckets MicrosToSecondsBuckets() {
  return {50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3,
          50e-3, 100e-3, 250e-3, 500e-3, 1.0,  2.5,    5.0,  10.0};
}

Buckets PowerOfTwoBuckets(double first, double last) {
  Buckets b;
  for (double v = first; v <= last; v *= 2) b.push_back(v);
  return b;
}

// Runs the scrape hook, then returns the registry's families.
class MetricSet::Scraped final : public prometheus::Collectable {
 public:
  explicit Scraped(std::shared_ptr<prometheus::Registry> registry)
      : registry_(std::move(registry)) {}

  void SetRefresh(std::function<void()> refresh) {
    std::lock_guard<std::mutex> lock(mu_);
    refresh_ = std::move(refresh);
  }

  std::vector<prometheus::MetricFamily> Collect() const override {
    std::function<void()> refresh;
    {
      std::lock_guard<std::mutex> lock(mu_);
      refresh = refresh_;
    }
    if (refresh) refresh();
    return registry_->Collect();
  }

 private:
  const std::shared_ptr<prometheus::Registry> registry_;
  mutable std::mutex mu_;
  std::function<void()> refresh_;
};

MetricSet::MetricSet()
    : registry_(std::make_shared<prometheus::Registry>()),
      scraped_(std::make_shared<Scraped>(registry_)) {}

MetricSet::~MetricSet() = default;

prometheus::Family<prometheus::Counter>& MetricSet::CounterFamily(const std::string& name,
                                                                  const std::string& help) {
  return prometheus::BuildCounter().Name(name).Help(help).Register(*registry_);
}

prometheus::Family<prometheus::Gauge>& MetricSet::GaugeFamily(const std::string& name,
                                                              const std::string& help) {
  return prometheus::BuildGauge().Name(name).Help(help).Register(*registry_);
}

prometheus::Family<prometheus::Histogram>& MetricSet::HistogramFamily(const std::string& name,
                                                                      const std::string& help) {
  return prometheus::BuildHistogram().Name(name).Help(help).Register(*registry_);
}

prometheus::Counter& MetricSet::Counter(const std::string& name, const std::string& help) {
  return CounterFamily(name, help).Add({});
}

prometheus::Gauge& MetricSet::Gauge(const std::string& name, const std::string& help) {
  return GaugeFamily(name, help).Add({});
}

prometheus::Histogram& MetricSet::Histogram(const std::string& name, const std::string& help,
                                            const Buckets& buckets) {
  return HistogramFamily(name, help).Add({}, buckets);
}

void MetricSet::OnScrape(std::function<void()> refresh) {
  scraped_->SetRefresh(std::move(refresh));
}

std::shared_ptr<prometheus::Collectable> MetricSet::collectable() const { return scraped_; }

CodeCounters::CodeCounters(prometheus::Family<prometheus::Counter>& family,
                           std::vector<prometheus::Labels> rows)
    : family_(family),
      rows_(std::move(rows)),
      slots_(std::make_unique<std::atomic<prometheus::Counter*>[]>(rows_.size() * kCodeCount)) {
  for (size_t row = 0; row < rows_.size(); ++row) Get(row, absl::StatusCode::kOk);
}

prometheus::Counter& CodeCounters::Get(size_t row, absl::StatusCode code) {
  auto c = static_cast<size_t>(code);
  if (c >= kCodeCount) c = static_cast<size_t>(absl::StatusCode::kUnknown);
  std::atomic<prometheus::Counter*>& slot = slots_[row * kCodeCount + c];
  prometheus::Counter* counter = slot.load(std::memory_order_acquire);
  if (counter == nullptr) {
    prometheus::Labels labels = rows_[row];
    labels["code"] = absl::StatusCodeToString(static_cast<absl::StatusCode>(c));
    // Two threads may both get here: Add returns the same child to both.
    counter = &family_.Add(labels);
    slot.store(counter, std::memory_order_release);
  }
  return *counter;
}

}  // namespace kvr::metrics
