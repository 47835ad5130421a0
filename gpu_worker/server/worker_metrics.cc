#include "gpu_worker/server/worker_metrics.h"

#include <array>
#include <atomic>
#include <mutex>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "prometheus/collectable.h"
#include "prometheus/counter.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"
#include "services/infra/metrics/metrics_endpoint.h"

namespace kvr::worker {
namespace {

// absl::StatusCode values 0 .. 16 (the gRPC codes).
constexpr size_t kCodeCount = 17;

// Time to first token and prefill: 1 ms .. 120 s (1-2.5-5 steps).
const prometheus::Histogram::BucketBoundaries kLatencySeconds = {
    1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3,
    1.0,  2.5,    5.0,  10.0,  25.0,  50.0,  120.0};
// One batched decode step: 50 µs .. 10 s.
const prometheus::Histogram::BucketBoundaries kStepSeconds = {
    50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3,
    50e-3, 100e-3, 250e-3, 500e-3, 1.0,  2.5,    5.0,  10.0};

// Runs `refresh` (the load gauges), then returns the registry's families.
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

struct WorkerMetrics::Impl {
  Impl()
      : registry(std::make_shared<prometheus::Registry>()),
        requests(prometheus::BuildCounter()
                     .Name("kvr_worker_requests_total")
                     .Help("Generate calls finished, by gRPC status code")
                     .Register(*registry)),
        running(Gauge("kvr_worker_requests_running",
                      "Requests admitted: prefilling or decoding")),
        waiting(Gauge("kvr_worker_requests_waiting", "Requests queued for admission")),
        retrieval_nodes(Gauge("kvr_worker_retrieval_nodes",
                              "Retrieval nodes new sequences are placed on (current "
                              "membership; 1 for the in-process node)")),
        prompt_tokens(prometheus::BuildCounter()
                          .Name("kvr_worker_prompt_tokens_total")
                          .Help("Prompt tokens prefilled (successful prefills)")
                          .Register(*registry)
                          .Add({})),
        generated_tokens(prometheus::BuildCounter()
                             .Name("kvr_worker_generated_tokens_total")
                             .Help("Tokens sampled and streamed")
                             .Register(*registry)
                             .Add({})),
        ttft(Histogram("kvr_worker_time_to_first_token_seconds",
                       "Request accepted until its first token was sampled", kLatencySeconds)),
        prefill(Histogram("kvr_worker_prefill_duration_seconds",
                          "One successful prefill (RetrievalEngine::StartSequence)",
                          kLatencySeconds)),
        decode_step(Histogram("kvr_worker_decode_step_duration_seconds",
                              "One batched decode step over every decoding sequence",
                              kStepSeconds)),
        phases(prometheus::BuildCounter()
                   .Name("kvr_worker_step_phase_seconds_total")
                   .Help("Decode step seconds by phase: retrieval (blocked on retrieval nodes "
                         "and pending prefill hand-offs), attention (attention computed on the "
                         "worker), other (the rest: projections, FFN, sampling, ...); the "
                         "phases sum to the decode step durations")
                   .Register(*registry)),
        retrieval_phase(phases.Add({{"phase", "retrieval"}})),
        attention_phase(phases.Add({{"phase", "attention"}})),
        other_phase(phases.Add({{"phase", "other"}})),
        collectable(std::make_shared<ScrapeCollectable>(registry, [this] { RefreshLoad(); })) {
    RequestCounter(0);  // code="OK" exists from the start
  }

  prometheus::Gauge& Gauge(const std::string& name, const std::string& help) {
    return prometheus::BuildGauge().Name(name).Help(help).Register(*registry).Add({});
  }
  prometheus::Histogram& Histogram(const std::string& name, const std::string& help,
                                   const prometheus::Histogram::BucketBoundaries& buckets) {
    return prometheus::BuildHistogram().Name(name).Help(help).Register(*registry).Add({},
                                                                                    buckets);
  }

  // The {code} child, created on first use (Family::Add is thread-safe and
  // returns the existing child for known labels).
  prometheus::Counter& RequestCounter(size_t code) {
    std::atomic<prometheus::Counter*>& slot = request_counters[code];
    prometheus::Counter* c = slot.load(std::memory_order_acquire);
    if (c == nullptr) {
      c = &requests.Add({{"code", absl::StatusCodeToString(static_cast<absl::StatusCode>(code))}});
      slot.store(c, std::memory_order_release);
    }
    return *c;
  }

  void RefreshLoad() {
    std::function<WorkerLoad()> source;
    {
      std::lock_guard<std::mutex> lock(source_mu);
      source = load_source;
    }
    if (!source) return;
    const WorkerLoad l = source();
    running.Set(static_cast<double>(l.requests_running));
    waiting.Set(static_cast<double>(l.requests_waiting));
    retrieval_nodes.Set(static_cast<double>(l.retrieval_nodes));
  }

  std::shared_ptr<prometheus::Registry> registry;
  prometheus::Family<prometheus::Counter>& requests;
  prometheus::Gauge& running;
  prometheus::Gauge& waiting;
  prometheus::Gauge& retrieval_nodes;
  prometheus::Counter& prompt_tokens;
  prometheus::Counter& generated_tokens;
  prometheus::Histogram& ttft;
  prometheus::Histogram& prefill;
  prometheus::Histogram& decode_step;
  prometheus::Family<prometheus::Counter>& phases;
  prometheus::Counter& retrieval_phase;
  prometheus::Counter& attention_phase;
  prometheus::Counter& other_phase;
  std::array<std::atomic<prometheus::Counter*>, kCodeCount> request_counters{};

  std::mutex source_mu;
  std::function<WorkerLoad()> load_source;

  std::shared_ptr<ScrapeCollectable> collectable;
  // Declared last: destroyed first, so no scrape runs while the rest goes.
  std::unique_ptr<metrics::MetricsEndpoint> endpoint;
};

WorkerMetrics::WorkerMetrics() : impl_(std::make_unique<Impl>()) {}

WorkerMetrics::~WorkerMetrics() = default;

void WorkerMetrics::SetLoadSource(std::function<WorkerLoad()> source) {
  std::lock_guard<std::mutex> lock(impl_->source_mu);
  impl_->load_source = std::move(source);
}

absl::StatusOr<std::string> WorkerMetrics::Serve(const std::string& listen) {
  if (impl_->endpoint != nullptr) {
    return absl::FailedPreconditionError("metrics are already served");
  }
  absl::StatusOr<std::unique_ptr<metrics::MetricsEndpoint>> endpoint =
      metrics::MetricsEndpoint::Start(listen, impl_->collectable);
  if (!endpoint.ok()) return endpoint.status();
  impl_->endpoint = std::move(*endpoint);
  return impl_->endpoint->address();
}

void WorkerMetrics::RecordRequest(absl::StatusCode code) {
  auto c = static_cast<size_t>(code);
  if (c >= kCodeCount) c = static_cast<size_t>(absl::StatusCode::kUnknown);
  impl_->RequestCounter(c).Increment();
}

void WorkerMetrics::OnPrefill(int64_t prompt_tokens, double seconds) {
  impl_->prompt_tokens.Increment(static_cast<double>(prompt_tokens));
  impl_->prefill.Observe(seconds);
}

void WorkerMetrics::OnFirstToken(double seconds) { impl_->ttft.Observe(seconds); }

void WorkerMetrics::OnTokens(int64_t n) {
  impl_->generated_tokens.Increment(static_cast<double>(n));
}

void WorkerMetrics::OnDecodeStep(const DecodeStepTiming& t) {
  impl_->decode_step.Observe(t.seconds);
  impl_->retrieval_phase.Increment(t.retrieval_seconds);
  impl_->attention_phase.Increment(t.attention_seconds);
  impl_->other_phase.Increment(t.other_seconds);
}

}  // namespace kvr::worker
