// WorkerMetrics: the kvr_worker Prometheus metrics (STYLE rule 12; the list,
// with units and labels, is in README.md; set up with services/infra/metrics
// MetricSet); collectable() is what the `/metrics` endpoint serves.
//
// It is the scheduler's SchedulerObserver (prefill, first token, tokens,
// decode steps with their retrieval / attention / other split) and counts
// finished Generate calls by gRPC status code (RecordRequest). The gauges
// (requests running / waiting, retrieval nodes) are read from a callback at
// scrape time, so they are exact whenever Prometheus looks. No prometheus
// type appears in this header.
//
// Thread-safety: every Record / On* method is thread-safe and cheap (an
// atomic add, or a short mutex for histograms). SetLoadSource must be called
// before the metrics are served, from one thread.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "gpu_worker/server/generation_scheduler.h"

namespace prometheus {
class Collectable;
}  // namespace prometheus

namespace kvr::worker {

// The worker's load, sampled at scrape time.
struct WorkerLoad {
  int64_t requests_running = 0;  // admitted: prefilling or decoding
  int64_t requests_waiting = 0;  // queued
  int64_t retrieval_nodes = 0;   // current membership size (1: the in-process node)
  // Replication (a replicating client only; otherwise these stay 0 and the
  // counters do not move). The counters are the client's running totals.
  int64_t retrieval_nodes_up = 0;        // nodes live now (1: the in-process node)
  int64_t under_replicated_shards = 0;   // shards with fewer than R live in-sync owners
  int64_t failovers_unavailable = 0;     // Attend requests re-routed: node UNAVAILABLE
  int64_t failovers_deadline = 0;        // ... node past its deadline
  int64_t failovers_down = 0;            // shards sent past a down / stale first owner
  int64_t syncs_started = 0;
  int64_t syncs_succeeded = 0;
  int64_t syncs_failed = 0;
  int64_t keys_synced = 0;
};

class WorkerMetrics final : public SchedulerObserver {
 public:
  WorkerMetrics();
  ~WorkerMetrics() override;
  WorkerMetrics(const WorkerMetrics&) = delete;
  WorkerMetrics& operator=(const WorkerMetrics&) = delete;

  // Called on every scrape (on the endpoint's thread). Must be thread-safe
  // and stay callable while collectable() is served.
  void SetLoadSource(std::function<WorkerLoad()> source);

  // What the `/metrics` endpoint serves (refreshes the load gauges, then
  // every family). Stop serving it before this object is destroyed.
  std::shared_ptr<prometheus::Collectable> collectable() const;

  // One finished Generate call: kvr_worker_requests_total{code} += 1.
  void RecordRequest(absl::StatusCode code);

  // SchedulerObserver.
  void OnPrefill(int64_t prompt_tokens, double seconds) override;
  void OnFirstToken(double seconds) override;
  void OnTokens(int64_t n) override;
  void OnDecodeStep(const DecodeStepTiming& timing) override;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvr::worker
