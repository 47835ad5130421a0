// GenerationScheduler: the worker's core (no gRPC types). Two threads share
// one RetrievalEngine:
//   * the prefill thread admits waiting requests, up to `max_concurrent`
//     sequences (prefilling + decoding), and prefills them one at a time
//     (RetrievalEngine::StartSequence), then samples each one's first token;
//   * the decode thread runs ONE batched decode step
//     (RetrievalEngine::StepBatch) over every decoding sequence, samples each
//     one's next token, streams it, and repeats; a prefilled request joins
//     the batch at the next step.
// So no prefill runs on the decode loop, and a long prompt does not stall
// the other streams: the engine releases its lock between prefill layers,
// and after each layer, while any sequence is decoding, the prefill thread
// waits until the decode thread has completed one more step (its tokens
// streamed) before the next layer. A decoding stream thus gets a token at
// least once per prefill layer — the gap between its tokens is bounded by
// one layer of the longest prompt plus one step — and a prefill takes at
// most n_layers decode steps longer.
//
// Requests beyond `max_concurrent` wait in a FIFO queue of at most
// `max_queue`; Submit rejects more with ResourceExhausted (with retry
// advice). A request whose CancelToken is cancelled (client gone, deadline)
// stops at its next step — or is dropped from the queue — and its sequence is
// destroyed, which drops its shards from the retrieval nodes.
//
// The per-request decode loop (sampling, stop strings and incomplete UTF-8
// held back, finish reasons) is RequestLoop of gpu_worker/engine/
// generation.h, the one Generate / GenerateBatch use, so a request gives the
// same tokens and text as an embedded Generate with the same settings.
//
// Thread-safety: every public method may be called from any thread. The
// callbacks of a request run on the scheduler's threads, one at a time and
// in order: on_prefill_progress (start, after each layer), on_tokens zero or
// more times, then on_done exactly once. They must not block long nor call back into
// the scheduler's Submit (WhenFinished is fine).
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "gpu_worker/engine/cancel_token.h"
#include "gpu_worker/engine/generation.h"
#include "gpu_worker/engine/retrieval_engine.h"
#include "gpu_worker/engine/sampler.h"
#include "gpu_worker/model/tokenizer.h"

namespace kvr::worker {

// Outcome of one request (FinishReason comes from generation.h).
struct GenerationSummary {
  FinishReason finish = FinishReason::kLength;
  int64_t prompt_tokens = 0;
  int64_t completion_tokens = 0;
  double queue_seconds = 0.0;          // accepted -> prefill start
  double time_to_first_token_seconds = 0.0;  // accepted -> first token sampled
  double mean_token_latency_seconds = 0.0;   // mean gap between sampled tokens
  double prefill_seconds = 0.0;
  double node_wait_seconds = 0.0;
  double total_seconds = 0.0;
  // GenerationWork::echo with logprobs >= 0: the prompt's (PromptLogprobs).
  std::vector<TokenLogprobs> prompt_logprobs;
};

// How far a prompt's prefill is. The prefill runs layer by layer over the
// whole prompt, so progress is counted in layers; prompt_tokens_done is
// prompt_tokens_total * layers_done / layers_total (rounded down).
struct PrefillProgress {
  int64_t prompt_tokens_done = 0;
  int64_t prompt_tokens_total = 0;
  int layers_done = 0;
  int layers_total = 0;
};

struct GenerationWork {
  std::vector<int32_t> prompt;  // token ids as prefilled (BOS included if wanted); non-empty
  int max_tokens = 128;         // >= 0
  // Resuming: tokens an earlier run of this request generated and streamed
  // (RequestLoop::Resume): decoded after `prompt`'s prefill without
  // sampling, counted in max_tokens and completion_tokens, not streamed
  // again. Usually empty.
  std::vector<int32_t> resume_tokens;
  std::vector<std::string> stop;  // non-empty strings
  AttentionOptions attention;
  SamplingParams sampling;
  CancelToken cancel;
  // New sampled token ids and the text made final with them (may be empty
  // while a possible stop string is held back).
  std::function<void(std::span<const int32_t> ids, std::string_view text)> on_tokens;
  // Log-probabilities of each sampled token with the `logprobs` most likely
  // alternatives ([0, kMaxTopLogprobs]); -1 = none. With `echo`, the
  // prompt's too (full attention: PromptLogprobs), in the summary.
  int logprobs = -1;
  bool echo = false;
  // With logprobs >= 0: called just before on_tokens with one entry per id
  // it receives. May be null.
  std::function<void(std::span<const TokenLogprobs>)> on_logprobs;
  // Exactly once. Cancelled requests end with OK and finish kCancelled.
  std::function<void(absl::StatusOr<GenerationSummary>)> on_done;
  // Prefill progress: 0 layers done when the prefill starts, then after
  // each layer (the last one: all prompt tokens done, just before the logits
  // are computed). Called on the prefill thread between layers: it must not
  // block (the next layer waits for it). May be null.
  std::function<void(const PrefillProgress&)> on_prefill_progress;
  // Times the scheduler recomputed this request (SchedulerOptions::
  // max_recomputes); set by the scheduler, 0 when submitted.
  int recomputes = 0;
  // More choices of the same prompt (GenerateRequest.n > 1): each a whole
  // request of its own (sampling, stop, max_tokens, callbacks, cancel) with
  // the same prompt and attention, no resume_tokens and no forks. The
  // prompt is prefilled once; each fork then gets its own sequence by
  // RetrievalEngine::ForkSequence right after the prefill (or, when the
  // nodes cannot fork, is queued again first and prefilled on its own).
  // The group is admitted as one (it takes 1 + forks.size() of
  // max_concurrent once a slot is free) and its memory reserved at Submit
  // for every choice.
  std::vector<GenerationWork> forks;
};

// What one batched decode step took, for metrics. `retrieval_seconds`: the
// step's sequences blocked on retrieval nodes (EngineStats node_wait_seconds
// + handoff_wait_seconds); `attention_seconds`: attention computed on the
// worker (EngineStats local_attention_seconds); `other_seconds`: the rest.
// Each is clamped so that the three sum to `seconds` exactly.
struct DecodeStepTiming {
  int sequences = 0;
  double seconds = 0.0;
  double retrieval_seconds = 0.0;
  double attention_seconds = 0.0;
  double other_seconds = 0.0;
};

// Metrics hooks, called on the scheduler's threads. Implementations must be
// thread-safe and cheap (the decode loop waits for them).
class SchedulerObserver {
 public:
  virtual ~SchedulerObserver() = default;
  // A prefill succeeded: `prompt_tokens` in `seconds` (StartSequence wall time).
  virtual void OnPrefill(int64_t prompt_tokens, double seconds) = 0;
  // A request's first token was sampled, `seconds` after it was accepted.
  virtual void OnFirstToken(double seconds) = 0;
  // `n` tokens were sampled (and streamed) for some request.
  virtual void OnTokens(int64_t n) = 0;
  virtual void OnDecodeStep(const DecodeStepTiming& timing) = 0;
};

struct SchedulerOptions {
  int max_concurrent = 8;  // sequences prefilling or decoding at once, >= 1
  int max_queue = 64;      // requests waiting beyond those, >= 0
  // Host memory the accepted requests (queued and running) may hold
  // together: RetrievalEngine::SequenceBytes, less SequenceBackendBytes when
  // backend_on_device; a request that would exceed it gets ResourceExhausted
  // from Submit, naming --host_memory_budget_bytes, before any work starts.
  // 0: no budget (only max_concurrent bounds memory). kvr_worker sets it
  // from --host_memory_budget_bytes.
  int64_t memory_budget_bytes = 0;
  // Likewise for device memory, when backend_on_device: the accepted
  // requests' SequenceBackendBytes (their K/V caches); ResourceExhausted
  // naming --device_memory_budget_bytes. 0: no budget. Ignored (no device
  // memory is used) unless backend_on_device.
  int64_t device_memory_budget_bytes = 0;
  // Whether the engine's backend tensors live in device memory (a GPU
  // backend: Backend::DeviceMemoryNow() has a value), so that
  // SequenceBackendBytes count against the device budget, not the host one.
  bool backend_on_device = false;
  // WhenFinished callbacks pending at once, >= 0; more get ResourceExhausted.
  int max_finish_waiters = 64;
  // A decoding request whose step fails with Unavailable (its retrieval
  // nodes lost every replica of a shard) is recomputed from its token ids:
  // its sequence is dropped and it is queued again, first, with
  // resume_tokens = every token it generated, so it prefills again on the
  // live nodes, re-decodes those tokens without streaming them again and
  // continues token-identically (RequestLoop::Resume). At most this many
  // times per request (>= 0; 0: such a request fails with Unavailable).
  int max_recomputes = 2;
  SchedulerObserver* observer = nullptr;  // may be null; must outlive the scheduler
};

struct SchedulerLoad {
  int active = 0;      // admitted: prefilling or decoding
  int prefilling = 0;  // of which prefilling
  int queued = 0;
  int64_t finished = 0;  // requests ended (any outcome) since start
  int64_t reserved_bytes = 0;  // host memory budget held by accepted requests (0 without a budget)
  int64_t reserved_device_bytes = 0;  // device memory budget held (0 without one)
};

class GenerationScheduler {
 public:
  // `engine` and `tokenizer` must outlive the scheduler. Starts the thread.
  static absl::StatusOr<std::unique_ptr<GenerationScheduler>> Create(
      RetrievalEngine* engine, const Tokenizer* tokenizer, const SchedulerOptions& options);
  // Cancels every request (their on_done runs) and joins the thread.
  ~GenerationScheduler();

  // Queues `work`. ResourceExhausted when the queue is full or its memory
  // (RetrievalEngine::SequenceBytes) does not fit what is left of
  // memory_budget_bytes (work.on_done is then never called);
  // FailedPrecondition after Shutdown. Fields must have been validated (see
  // ValidateWork). The memory stays reserved until on_done.
  absl::Status Submit(GenerationWork work);

  // InvalidArgument / OutOfRange naming the field and its limit.
  absl::Status ValidateWork(const GenerationWork& work) const;

  // Calls `callback` (on the scheduler's notifier thread — never the decode
  // or prefill thread, so it may block, e.g. on a node call — or inline when
  // already true) once at least `n` requests have finished — their sequences
  // destroyed and shards dropped; at the latest when the scheduler is
  // destroyed (then before the destructor returns).
  // ResourceExhausted (callback never called) when max_finish_waiters
  // callbacks are already pending. `*id` (when not null) names the waiter
  // for CancelWaiter.
  absl::Status WhenFinished(int64_t n, std::function<void()> callback, uint64_t* id = nullptr);
  // Removes a pending WhenFinished waiter (its slot is free again): true when
  // it was pending (its callback will never run), false when its callback
  // has run or is about to.
  bool CancelWaiter(uint64_t id);

  // Cancels every active and queued request and rejects new ones.
  void Shutdown();

  SchedulerLoad load() const;
  const SchedulerOptions& options() const { return options_; }

 private:
  using Clock = std::chrono::steady_clock;
  struct Queued {
    GenerationWork work;
    Clock::time_point accepted;
  };
  class Run;

  GenerationScheduler(RetrievalEngine* engine, const Tokenizer* tokenizer,
                      const SchedulerOptions& options);
  void PrefillLoop();
  void DecodeLoop();
  // Prefills `q` and samples its first token; the run to decode, or null
  // when it already ended (reported). The runs of q.work.forks (forked
  // from its sequence) go to *forked.
  std::unique_ptr<Run> Admit(Queued q, std::vector<std::unique_ptr<Run>>* forked);
  // After `primary`'s prefill: forks its sequence for each of `forks`, samples
  // their first tokens; runs still decoding go to *forked. A fork the
  // nodes cannot make (Unimplemented / FailedPrecondition) is queued again,
  // first, to be prefilled on its own.
  void AdmitForks(Run& primary, std::vector<GenerationWork> forks,
                  std::vector<std::unique_ptr<Run>>* forked);
  // Streams what `run` made final since its last call.
  void Stream(Run& run);
  void Finished(std::unique_ptr<Run> run);
  // The host and device bytes a request with `attention` holds while it
  // runs (see SchedulerOptions::backend_on_device); device is 0 unless the
  // backend is on a device. Each saturates at INT64_MAX.
  struct SequenceMemory {
    int64_t host = 0;
    int64_t device = 0;
  };
  SequenceMemory MemoryOf(const AttentionOptions& attention) const;
  // What `work` holds while it runs: its sequence, plus, with echo and
  // logprobs, the scratch full-attention sequence that scores its prompt
  // (PromptLogprobs), plus MemoryOf each of its forks. Saturates likewise.
  SequenceMemory MemoryOf(const GenerationWork& work) const;
  // Whether a request that failed with `why` is to be recomputed
  // (SchedulerOptions::max_recomputes).
  bool Recomputable(const GenerationWork& work, const absl::Status& why) const;
  // Queues `work` again, first, to be recomputed from its token ids:
  // `generated` = the tokens it streamed (its sequence already ended).
  void Recompute(GenerationWork work, std::vector<int32_t> generated, const absl::Status& why);
  // Reports the end of `work` and counts it finished; `was_active`: it was
  // admitted (counted in active_). Forks still in work.forks end with the
  // same outcome.
  void Ended(GenerationWork& work, absl::StatusOr<GenerationSummary> outcome, bool was_active);
  // Notifier thread: runs the WhenFinished callbacks in notify_ until
  // notify_stop_ and notify_ is empty.
  void NotifyLoop();
  // Between two prefill layers (prefill thread): while sequences are
  // decoding, waits until the decode thread completes one more step.
  void YieldToDecode();

  RetrievalEngine* const engine_;
  const Tokenizer* const tokenizer_;
  const SchedulerOptions options_;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Queued> queue_;
  std::vector<std::unique_ptr<Run>> prefilled_;  // ready to join the decode batch
  bool stopping_ = false;
  bool prefill_exited_ = false;
  int active_ = 0;      // prefilling + decoding + prefilled_
  int prefilling_ = 0;
  int decoding_ = 0;         // sequences in the decode thread's batch
  uint64_t decode_steps_ = 0;  // decode iterations completed (tokens streamed)
  int64_t finished_ = 0;
  // Host / device bytes (SequenceMemory) of every accepted, unfinished
  // request, each counted only under its budget.
  int64_t reserved_bytes_ = 0;
  int64_t reserved_device_bytes_ = 0;
  struct Waiter {
    int64_t n;
    uint64_t id;
    std::function<void()> callback;
  };
  std::vector<Waiter> finish_waiters_;
  uint64_t next_waiter_id_ = 1;
  std::deque<std::function<void()>> notify_;  // ready WhenFinished callbacks
  bool notify_stop_ = false;
  // Last: started once the rest is initialized.
  std::thread prefill_thread_;
  std::thread decode_thread_;
  std::thread notify_thread_;
};

}  // namespace kvr::worker
