#include "services/gateway/gateway_metrics.h"

#include <utility>
#include <vector>

#include "services/infra/metrics/metric_set.h"

namespace kvr::gateway {
namespace {

// Time to first token and request duration: 10 ms .. 120 s.
const metrics::Buckets kRequestSeconds = {
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0};
// Between tokens: 100 µs .. 5 s.
const metrics::Buckets kTokenSeconds = {
    1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0};

// The `api` label values, by Api.
std::vector<prometheus::Labels> ApiRows() { return {{{"api", "grpc"}}, {{"api", "http"}}}; }

}  // namespace

struct GatewayMetrics::Impl {
  Impl()
      : requests(set.CounterFamily(
                     "kvr_gateway_requests_total",
                     "Generation requests finished, by front end (grpc, http) and gRPC status "
                     "code name (HTTP errors map to the matching code)"),
                 ApiRows()),
        running(set.Gauge("kvr_gateway_requests_running",
                          "Requests holding a worker slot (being generated)")),
        waiting(set.Gauge("kvr_gateway_requests_waiting",
                          "Requests queued for a worker slot (the admission queue depth)")),
        ttft(set.Histogram("kvr_gateway_time_to_first_token_seconds",
                           "From the gateway receiving a request to its first generated token",
                           kRequestSeconds)),
        itl(set.Histogram("kvr_gateway_inter_token_latency_seconds",
                          "Between consecutive generated tokens of one request, as seen by the "
                          "gateway (a chunk of n tokens counts n latencies of gap / n)",
                          kTokenSeconds)),
        duration(set.Histogram("kvr_gateway_request_duration_seconds",
                               "From the gateway receiving a request to its end, for requests "
                               "that reached a worker",
                               kRequestSeconds)),
        generated(set.Counter("kvr_gateway_generated_tokens_total",
                              "Tokens generated and streamed through the gateway")),
        prompt(set.Counter("kvr_gateway_prompt_tokens_total",
                           "Prompt tokens of requests that completed (from the workers' usage)")),
        resumed_family(set.CounterFamily(
            "kvr_gateway_resumed_streams_total",
            "Generation requests re-issued on another worker at least once (their worker "
            "failed with UNAVAILABLE mid-stream or before the first token), by how they ended "
            "(ok, error, cancelled)")),
        resumed_ok(resumed_family.Add({{"outcome", "ok"}})),
        resumed_error(resumed_family.Add({{"outcome", "error"}})),
        resumed_cancelled(resumed_family.Add({{"outcome", "cancelled"}})),
        resumes(set.Counter("kvr_gateway_stream_resumes_total",
                            "Re-issues of generation requests on another worker (a request "
                            "resumed twice counts 2)")),
        workers(set.GaugeFamily("kvr_gateway_workers", "Member workers by health-check state")),
        healthy(workers.Add({{"state", "healthy"}})),
        unhealthy(workers.Add({{"state", "unhealthy"}})),
        key_requests(set.CounterFamily(
            "kvr_gateway_key_requests_total",
            "Generation requests by API key id (the first 64 ids seen; the rest as \"other\") "
            "and gRPC status code name, refusals by the key's limits included")),
        key_tokens(set.CounterFamily(
            "kvr_gateway_key_tokens_total",
            "Tokens (prompt + completion) debited from API keys' tokens_per_minute budgets, by "
            "key id")),
        unauthenticated(set.CounterFamily(
            "kvr_gateway_unauthenticated_requests_total",
            "Requests refused for want of a valid API key (HTTP 401 / UNAUTHENTICATED), by "
            "reason (missing, invalid)")),
        unauthenticated_missing(unauthenticated.Add({{"reason", "missing"}})),
        unauthenticated_invalid(unauthenticated.Add({{"reason", "invalid"}})),
        keys_loaded(set.Gauge("kvr_gateway_api_keys", "API keys loaded from --api_keys_file")),
        reloads(set.CounterFamily("kvr_gateway_api_keys_reloads_total",
                                  "Re-reads of a changed --api_keys_file, by outcome (ok, "
                                  "error: the previous keys were kept)")),
        reloads_ok(reloads.Add({{"outcome", "ok"}})),
        reloads_error(reloads.Add({{"outcome", "error"}})) {}

  void SetLoad(const GatewayLoad& l) {
    running.Set(static_cast<double>(l.running));
    waiting.Set(static_cast<double>(l.waiting));
    healthy.Set(static_cast<double>(l.healthy_workers));
    unhealthy.Set(static_cast<double>(l.unhealthy_workers));
  }

  metrics::MetricSet set;  // first: every family below lives in it
  metrics::CodeCounters requests;  // rows: by Api
  prometheus::Gauge& running;
  prometheus::Gauge& waiting;
  prometheus::Histogram& ttft;
  prometheus::Histogram& itl;
  prometheus::Histogram& duration;
  prometheus::Counter& generated;
  prometheus::Counter& prompt;
  prometheus::Family<prometheus::Counter>& resumed_family;
  prometheus::Counter& resumed_ok;
  prometheus::Counter& resumed_error;
  prometheus::Counter& resumed_cancelled;
  prometheus::Counter& resumes;
  prometheus::Family<prometheus::Gauge>& workers;
  prometheus::Gauge& healthy;
  prometheus::Gauge& unhealthy;
  prometheus::Family<prometheus::Counter>& key_requests;
  prometheus::Family<prometheus::Counter>& key_tokens;
  prometheus::Family<prometheus::Counter>& unauthenticated;
  prometheus::Counter& unauthenticated_missing;
  prometheus::Counter& unauthenticated_invalid;
  prometheus::Gauge& keys_loaded;
  prometheus::Family<prometheus::Counter>& reloads;
  prometheus::Counter& reloads_ok;
  prometheus::Counter& reloads_error;
};

GatewayMetrics::GatewayMetrics() : impl_(std::make_unique<Impl>()) {}
GatewayMetrics::~GatewayMetrics() = default;

void GatewayMetrics::SetLoadSource(std::function<GatewayLoad()> source) {
  impl_->set.OnScrape([impl = impl_.get(), source = std::move(source)] { impl->SetLoad(source()); });
}

std::shared_ptr<prometheus::Collectable> GatewayMetrics::collectable() const {
  return impl_->set.collectable();
}

void GatewayMetrics::RecordRequest(Api api, absl::StatusCode code, double seconds,
                                   bool reached_worker) {
  impl_->requests.Get(static_cast<size_t>(api), code).Increment();
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

void GatewayMetrics::RecordResumed(ResumeOutcome outcome, int resumes) {
  switch (outcome) {
    case ResumeOutcome::kOk:
      impl_->resumed_ok.Increment();
      break;
    case ResumeOutcome::kError:
      impl_->resumed_error.Increment();
      break;
    case ResumeOutcome::kCancelled:
      impl_->resumed_cancelled.Increment();
      break;
  }
  if (resumes > 0) impl_->resumes.Increment(static_cast<double>(resumes));
}

}  // namespace kvr::gateway

namespace kvr::gateway {

void GatewayMetrics::RecordKeyRequest(const std::string& key, absl::StatusCode code) {
  impl_->key_requests.Add({{"key", key}, {"code", absl::StatusCodeToString(code)}}).Increment();
}

void GatewayMetrics::RecordKeyTokens(const std::string& key, int64_t tokens) {
  if (tokens > 0) impl_->key_tokens.Add({{"key", key}}).Increment(static_cast<double>(tokens));
}

void GatewayMetrics::RecordUnauthenticated(bool missing) {
  (missing ? impl_->unauthenticated_missing : impl_->unauthenticated_invalid).Increment();
}

void GatewayMetrics::RecordKeysLoaded(bool ok, size_t keys, bool initial) {
  if (ok) impl_->keys_loaded.Set(static_cast<double>(keys));
  if (!initial) (ok ? impl_->reloads_ok : impl_->reloads_error).Increment();
}

}  // namespace kvr::gateway
