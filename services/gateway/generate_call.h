// GenerateCall: one kvr.v1.Generation.Generate proxied to a worker, shared by
// the gRPC and the HTTP front ends.
//
//   * Admission: waits for a worker slot from the Balancer (FIFO, bounded,
//     until the request's deadline); refusals end the call with
//     RESOURCE_EXHAUSTED / UNAVAILABLE / DEADLINE_EXCEEDED.
//   * The worker call carries the request's deadline; Cancel() cancels it
//     (or leaves the queue), so the worker stops the sequence and drops its
//     shards.
//   * Resumption: when the worker's stream fails with UNAVAILABLE (the
//     worker died, its connection dropped or was refused, it is shutting
//     down) before the stream finished, the worker leaves rotation and the
//     request is re-issued on another worker (the failed one excluded)
//     after a backoff, with GenerateRequest.resume_tokens = the token ids
//     already passed on (after any the client itself sent there). The
//     worker replays them and streams only what follows, so the client
//     sees one continuous stream: no token or text repeated or missing
//     (sampling is per position: same seed, same draws; an unseeded request
//     uses the worker's default seed 1 everywhere, so it needs none), and
//     the summary's usage counts every token. At most
//     WorkerPoolOptions::max_resumes times, within the request's deadline;
//     prefill_progress from a resumed attempt is passed on only while no
//     token has been. Every other status is the request's own outcome
//     (INVALID_ARGUMENT, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED, ...) and is
//     passed on as is.
//   * Several choices (GenerateRequest.n > 1 or prompts): passed through as
//     one worker call (the worker prefills each prompt once); such a call
//     is NOT resumed (resume_tokens describe one choice), a lost worker
//     fails it with UNAVAILABLE; the prompt is counted (metrics, key
//     quota) once per prompt, from each prompt's first choice's final.
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
#include "grpcpp/alarm.h"
#include "grpcpp/support/status.h"
#include "kvr/v1/generation.pb.h"
#include "services/gateway/api_keys.h"
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

  // Charges the call to an API key (call before Start): `grant` (its
  // max_concurrent slot) is released when the call finishes, before
  // on_finish runs; the prompt's tokens (once a worker reports them) and
  // each chunk's tokens as they stream are debited from the key's
  // tokens_per_minute budget; kvr_gateway_key_* metrics under the key's
  // label.
  void SetApiKey(std::shared_ptr<ApiKeyGrant> grant);

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
  void OnUpstreamResponse(Attempt* attempt, v1::GenerateResponse response);
  void OnUpstreamDone(Attempt* attempt, const grpc::Status& status);
  // Re-issues the request, excluding `failed`, after the n-th resume's
  // backoff (Acquire at once when it is zero).
  void Resume(const std::string& failed, absl::Duration backoff);
  // The request the next attempt sends: request_ plus the tokens passed on.
  v1::GenerateRequest NextRequest();
  void Finish(const grpc::Status& status);

  WorkerPool* const pool_;
  GatewayMetrics* const metrics_;
  const Api api_;
  const v1::GenerateRequest request_;
  const absl::Time received_;
  const absl::Time deadline_;
  // The request asks for several choices (n > 1 or a prompts batch): its
  // stream interleaves them (GenerateChunk.index); see the file comment.
  const bool multi_choice_;
  const int choices_per_prompt_;  // n, >= 1

  std::mutex mu_;
  OnResponse on_response_;
  OnFinish on_finish_;
  bool cancelled_ = false;
  bool finished_ = false;
  bool queued_ = false;         // waiting for a slot
  uint64_t ticket_ = 0;         // of the queued Acquire, once known
  int resumes_ = 0;             // re-issues so far (<= max_resumes)
  bool got_summary_ = false;    // the stream finished: nothing to resume
  std::vector<int32_t> sent_tokens_;  // token ids passed on, in order
  // One per backoff waited (at most max_resumes), the last maybe pending;
  // kept until the call is destroyed so Cancel never reaches a freed one.
  std::vector<std::unique_ptr<grpc::Alarm>> alarms_;
  bool reached_worker_ = false;
  std::shared_ptr<ApiKeyGrant> key_;  // until Finish; null: no API keys
  int64_t prompt_debited_ = 0;        // prompt tokens charged to key_ so far
  absl::Time last_tokens_;      // when the previous tokens arrived
  bool got_tokens_ = false;
  Attempt* current_ = nullptr;  // the attempt running now
  // Every attempt made (at most 1 + max_resumes); destroyed with the call, so a
  // Cancel racing with an attempt's end never touches freed memory.
  std::vector<std::unique_ptr<Attempt>> attempts_;
};

}  // namespace kvr::gateway
