// GenerateCall: one kvr.v1.Generation.Generate proxied to a worker, shared by
// the gRPC and the HTTP front ends.
//
//   * Admission: waits for a worker slot from the Balancer (FIFO, bounded,
//     until the request's deadline); refusals end the call with
//     RESOURCE_EXHAUSTED / UNAVAILABLE / DEADLINE_EXCEEDED.
//   * The worker call carries the request's deadline; Cancel() cancels it
//     (or leaves the queue), so the worker stops the sequence and drops its
//     shards.
//   * A worker answering UNAVAILABLE before any response took the worker out
//     of rotation and the request is retried once on another worker.
//   * Responses are passed on unchanged, one at a time: the next is read from
//     the worker only after RequestNext() (so a slow client slows the worker
//     stream, whose worker coalesces tokens, instead of buffering here).
//   * Metrics: requests by front end and code, time to first token,
//     inter-token latency, duration, tokens.
//
// Thread-safety: Cancel and RequestNext may be called from any thread.
// Callbacks run on gRPC or balancer threads, one at a time, and must not
// block; on_finish runs exactly once and nothing runs after it.
#pragma once

#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/time/time.h"
#include "grpcpp/support/status.h"
#include "kvr/v1/generation.pb.h"
#include "services/gateway/gateway_metrics.h"
#include "services/gateway/worker_pool.h"

namespace kvr::gateway {

class GenerateCall : public std::enable_shared_from_this<GenerateCall> {
 public:
  using OnResponse = std::function<void(v1::GenerateResponse response)>;
  using OnFinish = std::function<void(const grpc::Status& status)>;

  // A call not started yet. `received` is when the front end got the
  // request (latency metrics start there); `deadline` bounds queueing and
  // the worker call. `pool` and `metrics` must outlive the call (see
  // WorkerPool::WaitForCalls).
  static std::shared_ptr<GenerateCall> Create(WorkerPool* pool, GatewayMetrics* metrics, Api api,
                                              v1::GenerateRequest request, absl::Time received,
                                              absl::Time deadline, OnResponse on_response,
                                              OnFinish on_finish);
  ~GenerateCall();

  // Queues for a worker slot. Callbacks may run before this returns (a
  // refusal finishes the call at once). Once only.
  void Start();

  // Asks for the response after the one just delivered.
  void RequestNext();
  // The client went away: leaves the queue or cancels the worker call; the
  // call then finishes with CANCELLED. Idempotent.
  void Cancel();

 private:
  class Attempt;

  GenerateCall(WorkerPool* pool, GatewayMetrics* metrics, Api api, v1::GenerateRequest request,
               absl::Time received, absl::Time deadline, OnResponse on_response,
               OnFinish on_finish);
  void Acquire(const std::string& exclude);
  void OnGrant(absl::StatusOr<std::string> address);
  void OnUpstreamResponse(v1::GenerateResponse response);
  void OnUpstreamDone(Attempt* attempt, const grpc::Status& status);
  void Finish(const grpc::Status& status);

  WorkerPool* const pool_;
  GatewayMetrics* const metrics_;
  const Api api_;
  const v1::GenerateRequest request_;
  const absl::Time received_;
  const absl::Time deadline_;

  std::mutex mu_;
  OnResponse on_response_;
  OnFinish on_finish_;
  bool cancelled_ = false;
  bool finished_ = false;
  bool queued_ = false;         // waiting for a slot
  uint64_t ticket_ = 0;         // of the queued Acquire, once known
  bool retried_ = false;
  bool got_response_ = false;   // from the current attempt
  bool reached_worker_ = false;
  absl::Time last_tokens_;      // when the previous tokens arrived
  bool got_tokens_ = false;
  Attempt* current_ = nullptr;  // the attempt running now
  // Every attempt made (at most two); destroyed with the call, so a
  // Cancel racing with an attempt's end never touches freed memory.
  std::vector<std::unique_ptr<Attempt>> attempts_;
};

}  // namespace kvr::gateway
