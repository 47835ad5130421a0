#include "services/gateway/gateway_metrics.h"

#include <array>
#include <atomic>
#include <mutex>
#include <utility>
#include <vector>

#include "prometheus/collectable.h"
#include "prometheus/counter.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"

namespace kvr::gateway {
namespace {

constexpr std::array<const char*, 2> kApiNames = {"grpc", "http"};
constexpr size_t kCodeCount = 17;  // absl::StatusCode 0 .. 16, the gRPC codes

// Time to first token and request duration: 10 ms .. 120 s.
const prometheus::Histogram::BucketBoundaries kRequestSeconds = {
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0};
// Between tokens: 100 µs .. 5 s.
const prometheus::Histogram::BucketBoundaries kTokenSeconds = {
    1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0};

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

struct GatewayMetrics::Impl {
  Impl()
      : registry(std::make_shared<prometheus::Registry>()),
        requests(prometheus::BuildCounter()
                     .Name("kvr_gateway_requests_total")
                     .Help("Generation requests finished, by front end (grpc, http) and gRPC "
                           "status code name (HTTP errors map to the matching code)")
                     .Register(*registry)),
        running(GaugeFamily("kvr_gateway_requests_running",
                            "Requests holding a worker slot (being generated)")),
        waiting(GaugeFamily("kvr_gateway_requests_waiting",
                            "Requests queued for a worker slot (the admission queue depth)")),
        ttft(prometheus::BuildHistogram()
                 .Name("kvr_gateway_time_to_first_token_seconds")
                 .Help("From the gateway receiving a request to its first generated token")
                 .Register(*registry)
                 .Add({}, kRequestSeconds)),
        itl(prometheus::BuildHistogram()
                .Name("kvr_gateway_inter_token_latency_seconds")
                .Help("Between consecutive generated tokens of one request, as seen by the "
                      "gateway (a chunk of n tokens counts n latencies of gap / n)")
                .Register(*registry)
                .Add({}, kTokenSeconds)),
        duration(prometheus::BuildHistogram()
                     .Name("kvr_gateway_request_duration_seconds")
                     .Help("From the gateway receiving a request to its end, for requests that "
                           "reached a worker")
                     .Register(*registry)
                     .Add({}, kRequestSeconds)),
        generated(prometheus::BuildCounter()
                      .Name("kvr_gateway_generated_tokens_total")
                      .Help("Tokens generated and streamed through the gateway")
                      .Register(*registry)
                      .Add({})),
        prompt(prometheus::BuildCounter()
                   .Name("kvr_gateway_prompt_tokens_total")
                   .Help("Prompt tokens of requests that completed (from the workers' usage)")
                   .Register(*registry)
                   .Add({})),
        workers(prometheus::BuildGauge()
                    .Name("kvr_gateway_workers")
                    .Help("Member workers by health-check state")
                    .Register(*registry)),
        healthy(workers.Add({{"state", "healthy"}})),
        unhealthy(workers.Add({{"state", "unhealthy"}})),
        collectable(std::make_shared<ScrapeCollectable>(registry, [this] { Refresh(); })) {
    // OK children exist from the start so every front end shows a series.
    for (size_t a = 0; a < kApiNames.size(); ++a) RequestCounter(a, 0);
  }

  prometheus::Gauge& GaugeFamily(const std::string& name, const std::string& help) {
    return prometheus::BuildGauge().Name(name).Help(help).Register(*registry).Add({});
  }

  // The {api, code} child, created on first use.
  prometheus::Counter& RequestCounter(size_t api, size_t code) {
    std::atomic<prometheus::Counter*>& slot = counters[api][code];
    prometheus::Counter* c = slot.load(std::memory_order_acquire);
    if (c == nullptr) {
      c = &requests.Add(
          {{"api", kApiNames[api]},
           {"code", absl::StatusCodeToString(static_cast<absl::StatusCode>(code))}});
      slot.store(c, std::memory_order_release);
    }
    return *c;
  }

  void Refresh() {
    std::function<GatewayLoad()> source;
    {
      std::lock_guard<std::mutex> lock(source_mu);
      source = load_source;
    }
    if (!source) return;
    const GatewayLoad l = source();
    running.Set(static_cast<double>(l.running));
    waiting.Set(static_cast<double>(l.waiting));
    healthy.Set(static_cast<double>(l.healthy_workers));
    unhealthy.Set(static_cast<double>(l.unhealthy_workers));
  }

  std::shared_ptr<prometheus::Registry> registry;
  prometheus::Family<prometheus::Counter>& requests;
  prometheus::Gauge& running;
  prometheus::Gauge& waiting;
  prometheus::Histogram& ttft;
  prometheus::Histogram& itl;
  prometheus::Histogram& duration;
  prometheus::Counter& generated;
  prometheus::Counter& prompt;
  prometheus::Family<prometheus::Gauge>& workers;
  prometheus::Gauge& healthy;
  prometheus::Gauge& unhealthy;
  std::array<std::array<std::atomic<prometheus::Counter*>, kCodeCount>, kApiNames.size()>
      counters{};

  std::mutex source_mu;
  std::function<GatewayLoad()> load_source;
  std::shared_ptr<ScrapeCollectable> collectable;
};

GatewayMetrics::GatewayMetrics() : impl_(std::make_unique<Impl>()) {}
GatewayMetrics::~GatewayMetrics() = default;

void GatewayMetrics::SetLoadSource(std::function<GatewayLoad()> source) {
  std::lock_guard<std::mutex> lock(impl_->source_mu);
  impl_->load_source = std::move(source);
}

std::shared_ptr<prometheus::Collectable> GatewayMetrics::collectable() const {
  return impl_->collectable;
}

void GatewayMetrics::RecordRequest(Api api, absl::StatusCode code, double seconds,
                                   bool reached_worker) {
  auto c = static_cast<size_t>(code);
  if (c >= kCodeCount) c = static_cast<size_t>(absl::StatusCode::kUnknown);
  impl_->RequestCounter(static_cast<size_t>(api), c).Increment();
  if (reached_worker) impl_->duration.Observe(seconds);
}

void GatewayMetrics::RecordFirstToken(double seconds) { impl_->ttft.Observe(seconds); }

void GatewayMetrics::RecordTokens(int64_t tokens, double seconds_since_previous, bool first) {
  if (tokens <= 0) return;
  impl_->generated.Increment(static_cast<double>(tokens));
  // The first chunk's latency is the time to first token (tokens that came
  // with it have no gap of their own to report).
  if (first) return;
  const double per_token = seconds_since_previous / static_cast<double>(tokens);
  for (int64_t i = 0; i < tokens; ++i) impl_->itl.Observe(per_token);
}

void GatewayMetrics::RecordPromptTokens(int64_t tokens) {
  if (tokens > 0) impl_->prompt.Increment(static_cast<double>(tokens));
}

}  // namespace kvr::gateway
