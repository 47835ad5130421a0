#include "gpu_worker/server/worker_metrics.h"

#include <algorithm>
#include <mutex>
#include <utility>
#include <vector>

#include "services/infra/metrics/metric_set.h"

namespace kvr::worker {
namespace {

// Time to first token and prefill: 1 ms .. 120 s (1-2.5-5 steps).
const metrics::Buckets kLatencySeconds = {
    1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3,
    1.0,  2.5,    5.0,  10.0,  25.0,  50.0,  120.0};

}  // namespace

struct WorkerMetrics::Impl {
  Impl()
      : requests(set.CounterFamily("kvr_worker_requests_total",
                                   "Generate calls finished, by gRPC status code"),
                 std::vector<prometheus::Labels>(1)),
        running(set.Gauge("kvr_worker_requests_running",
                          "Requests admitted: prefilling or decoding")),
        waiting(set.Gauge("kvr_worker_requests_waiting", "Requests queued for admission")),
        retrieval_nodes(set.Gauge("kvr_worker_retrieval_nodes",
                                  "Retrieval nodes new sequences are placed on (current "
                                  "membership; 1 for the in-process node)")),
        prompt_tokens(set.Counter("kvr_worker_prompt_tokens_total",
                                  "Prompt tokens prefilled (successful prefills)")),
        generated_tokens(
            set.Counter("kvr_worker_generated_tokens_total", "Tokens sampled and streamed")),
        ttft(set.Histogram("kvr_worker_time_to_first_token_seconds",
                           "Request accepted until its first token was sampled",
                           kLatencySeconds)),
        prefill(set.Histogram("kvr_worker_prefill_duration_seconds",
                              "One successful prefill (RetrievalEngine::StartSequence)",
                              kLatencySeconds)),
        // One batched decode step: 50 µs .. 10 s.
        decode_step(set.Histogram("kvr_worker_decode_step_duration_seconds",
                                  "One batched decode step over every decoding sequence",
                                  metrics::MicrosToSecondsBuckets())),
        phases(set.CounterFamily(
            "kvr_worker_step_phase_seconds_total",
            "Decode step seconds by phase: retrieval (blocked on retrieval nodes and pending "
            "prefill hand-offs), attention (attention computed on the worker), other (the rest: "
            "projections, FFN, sampling, ...); the phases sum to the decode step durations")),
        retrieval_phase(phases.Add({{"phase", "retrieval"}})),
        attention_phase(phases.Add({{"phase", "attention"}})),
        other_phase(phases.Add({{"phase", "other"}})),
        nodes_up(set.Gauge("kvr_worker_retrieval_nodes_up",
                           "Retrieval nodes live now (health watch up, not suspected after a "
                           "failed call)")),
        under_replicated(set.Gauge("kvr_worker_under_replicated_shards",
                                   "Shards of live sequences with fewer than --replicas live, "
                                   "in-sync owners")),
        failovers(set.CounterFamily("kvr_worker_attend_failovers_total",
                                    "Attend work moved to another replica, by reason: "
                                    "unavailable / deadline (a node request failed and was "
                                    "re-sent), down (a shard's first owner was down or stale)")),
        failover_unavailable(failovers.Add({{"reason", "unavailable"}})),
        failover_deadline(failovers.Add({{"reason", "deadline"}})),
        failover_down(failovers.Add({{"reason", "down"}})),
        syncs(set.CounterFamily("kvr_worker_replica_syncs_total",
                                "Node-to-node replica syncs (SyncShards calls) by result: "
                                "started, succeeded, failed")),
        syncs_started(syncs.Add({{"result", "started"}})),
        syncs_succeeded(syncs.Add({{"result", "succeeded"}})),
        syncs_failed(syncs.Add({{"result", "failed"}})),
        keys_synced(set.Counter("kvr_worker_replica_keys_synced_total",
                                "Keys copied node to node to bring stale replicas back in sync")) {}

  void SetLoad(const WorkerLoad& l) {
    running.Set(static_cast<double>(l.requests_running));
    waiting.Set(static_cast<double>(l.requests_waiting));
    retrieval_nodes.Set(static_cast<double>(l.retrieval_nodes));
    nodes_up.Set(static_cast<double>(l.retrieval_nodes_up));
    under_replicated.Set(static_cast<double>(l.under_replicated_shards));
    // The client's totals only grow; add what is new since the last scrape.
    std::lock_guard<std::mutex> lock(totals_mu);
    Advance(failover_unavailable, l.failovers_unavailable, seen.failovers_unavailable);
    Advance(failover_deadline, l.failovers_deadline, seen.failovers_deadline);
    Advance(failover_down, l.failovers_down, seen.failovers_down);
    Advance(syncs_started, l.syncs_started, seen.syncs_started);
    Advance(syncs_succeeded, l.syncs_succeeded, seen.syncs_succeeded);
    Advance(syncs_failed, l.syncs_failed, seen.syncs_failed);
    Advance(keys_synced, l.keys_synced, seen.keys_synced);
  }
  static void Advance(prometheus::Counter& c, int64_t total, int64_t& seen_total) {
    if (total > seen_total) c.Increment(static_cast<double>(total - seen_total));
    seen_total = std::max(seen_total, total);
  }

  metrics::MetricSet set;  // first: every family below lives in it
  metrics::CodeCounters requests;  // one row: {code} only
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
  prometheus::Gauge& nodes_up;
  prometheus::Gauge& under_replicated;
  prometheus::Family<prometheus::Counter>& failovers;
  prometheus::Counter& failover_unavailable;
  prometheus::Counter& failover_deadline;
  prometheus::Counter& failover_down;
  prometheus::Family<prometheus::Counter>& syncs;
  prometheus::Counter& syncs_started;
  prometheus::Counter& syncs_succeeded;
  prometheus::Counter& syncs_failed;
  prometheus::Counter& keys_synced;
  std::mutex totals_mu;  // scrapes may overlap
  WorkerLoad seen;       // the totals already counted
};

WorkerMetrics::WorkerMetrics() : impl_(std::make_unique<Impl>()) {}

WorkerMetrics::~WorkerMetrics() = default;

void WorkerMetrics::SetLoadSource(std::function<WorkerLoad()> source) {
  impl_->set.OnScrape([impl = impl_.get(), source = std::move(source)] { impl->SetLoad(source()); });
}

std::shared_ptr<prometheus::Collectable> WorkerMetrics::collectable() const {
  return impl_->set.collectable();
}

void WorkerMetrics::RecordRequest(absl::StatusCode code) {
  impl_->requests.Get(0, code).Increment();
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
