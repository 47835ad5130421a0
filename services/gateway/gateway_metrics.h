// GatewayMetrics: the kvr_gateway_* Prometheus metrics (STYLE rule 12; the
// list with units and labels is in README.md; the Helm chart's dashboards
// query these names; set up with services/infra/metrics MetricSet). No
// prometheus type is used in this header.
//
// Thread-safety: every Record* method is thread-safe and cheap (atomic adds,
// a short mutex inside histograms). The gauges of queue depth, running
// requests and worker health are read from a callback at scrape time, so
// they are exact whenever Prometheus looks.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace prometheus {
class Collectable;
}  // namespace prometheus

namespace kvr::gateway {

// Which front end a request came through: the `api` label.
enum class Api : uint8_t { kGrpc = 0, kHttp = 1 };

// Sampled at scrape time.
struct GatewayLoad {
  int64_t running = 0;  // requests holding a worker slot
  int64_t waiting = 0;  // requests queued for a slot
  int64_t healthy_workers = 0;
  int64_t unhealthy_workers = 0;
};

class GatewayMetrics {
 public:
  GatewayMetrics();
  ~GatewayMetrics();
  GatewayMetrics(const GatewayMetrics&) = delete;
  GatewayMetrics& operator=(const GatewayMetrics&) = delete;

  // Called on every scrape (on an exposer thread); must be thread-safe and
  // stay callable while the metrics are served.
  void SetLoadSource(std::function<GatewayLoad()> source);

  // What the `/metrics` endpoint serves (refreshes the load gauges, then
  // every family). Stop serving it before this object is destroyed.
  std::shared_ptr<prometheus::Collectable> collectable() const;

  // One finished generation request (or a request refused before reaching a
  // worker): kvr_gateway_requests_total{api, code} += 1, and, when it reached
  // a worker, kvr_gateway_request_duration_seconds observes `seconds`.
  void RecordRequest(Api api, absl::StatusCode code, double seconds, bool reached_worker);
  // The first token of a request `seconds` after the gateway received it.
  void RecordFirstToken(double seconds);
  // `tokens` more tokens arrived `seconds_since_previous` after the previous
  // ones: kvr_gateway_generated_tokens_total += tokens and, unless this is
  // the first chunk, each counts one inter-token latency of seconds / tokens.
  void RecordTokens(int64_t tokens, double seconds_since_previous, bool first);
  void RecordPromptTokens(int64_t tokens);

  // How a resumed request ended: kvr_gateway_resumed_streams_total{outcome}.
  enum class ResumeOutcome : uint8_t { kOk = 0, kError = 1, kCancelled = 2 };
  // A request that was re-issued on another worker at least once (its
  // worker failed with UNAVAILABLE, mid-stream or before its first token)
  // ended with `outcome`; `resumes` is how many times it was re-issued
  // (kvr_gateway_stream_resumes_total += resumes).
  void RecordResumed(ResumeOutcome outcome, int resumes);

  // API keys (services/gateway/api_keys.h). `key` is a key's metrics label
  // (its id, or "other" beyond kMaxApiKeyMetricLabels ids: bounded
  // cardinality); never a key.
  // A generation request of `key` finished or was refused with `code`:
  // kvr_gateway_key_requests_total{key, code} += 1.
  void RecordKeyRequest(const std::string& key, absl::StatusCode code);
  // kvr_gateway_key_tokens_total{key} += tokens (prompt + completion).
  void RecordKeyTokens(const std::string& key, int64_t tokens);
  // A request refused 401 / UNAUTHENTICATED:
  // kvr_gateway_unauthenticated_requests_total{reason = missing|invalid} += 1.
  void RecordUnauthenticated(bool missing);
  // The keys file was (re)loaded: kvr_gateway_api_keys = keys, and
  // kvr_gateway_api_keys_reloads_total{outcome = ok|error} += 1 unless
  // `initial` (the load at start).
  void RecordKeysLoaded(bool ok, size_t keys, bool initial);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvr::gateway
