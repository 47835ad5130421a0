#include "gpu_worker/server/generation_scheduler.h"

#include <algorithm>
#include <cstdio>
#include <limits>
#include <optional>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace kvr::worker {
namespace {

double Seconds(std::chrono::steady_clock::duration d) {
  return std::chrono::duration<double>(d).count();
}

// Prefixes a validation message with the name of the message holding the field.
absl::Status Prefixed(std::string_view prefix, const absl::Status& s) {
  if (s.ok()) return s;
  return absl::Status(s.code(), absl::StrCat(std::string(prefix), std::string(s.message())));
}

}  // namespace

// One admitted request: its work, its sequence and its RequestLoop (the
// decode loop shared with generation.cc), plus the timings of its summary.
class GenerationScheduler::Run {
 public:
  Run(Queued q, Sampler sampler, const Tokenizer& tokenizer)
      : work_(std::move(q.work)),
        accepted_(q.accepted),
        loop_(work_.prompt, work_.max_tokens, work_.stop, std::move(sampler), tokenizer) {}

  GenerationWork& work() { return work_; }
  RequestLoop& loop() { return loop_; }
  EngineSequence* seq() { return seq_.get(); }
  Clock::time_point accepted() const { return accepted_; }

  void set_sequence(std::unique_ptr<EngineSequence> seq) { seq_ = std::move(seq); }
  void set_prefill_start(Clock::time_point t) { prefill_start_ = t; }

  // Tokens sampled by this run (replayed resume tokens excluded).
  int sampled() const { return loop_.generated() - loop_.replayed(); }

  // Takes the logits of the last prefill / step; true when the request is
  // over (loop().finish() says why).
  absl::StatusOr<bool> Advance(int64_t max_seq_len) {
    const int before = sampled();
    absl::StatusOr<bool> done = loop_.Advance(seq_->logits(), seq_->position(), max_seq_len);
    if (sampled() > before) {
      const Clock::time_point now = Clock::now();
      if (before == 0) first_token_ = now;
      last_token_ = now;
    }
    return done;
  }

  GenerationSummary Summary() const {
    GenerationSummary s;
    s.finish = loop_.finish();
    s.prompt_tokens = static_cast<int64_t>(work_.prompt.size());
    s.completion_tokens = loop_.generated();
    const Clock::time_point now = Clock::now();
    s.queue_seconds = prefill_start_ > accepted_ ? Seconds(prefill_start_ - accepted_) : 0.0;
    const int n = sampled();
    if (n > 0) s.time_to_first_token_seconds = Seconds(first_token_ - accepted_);
    if (n > 1) s.mean_token_latency_seconds = Seconds(last_token_ - first_token_) / (n - 1);
    if (seq_ != nullptr) {
      s.prefill_seconds = seq_->stats().prefill_seconds;
      s.node_wait_seconds = seq_->stats().node_wait_seconds;
    }
    s.total_seconds = Seconds(now - accepted_);
    s.prompt_logprobs = prompt_logprobs;
    return s;
  }

  // Ends the sequence (drops its shards from the nodes).
  void EndSequence() { seq_.reset(); }

  // PromptLogprobs of the prompt (echo), reported in the summary.
  std::vector<TokenLogprobs> prompt_logprobs;
  // Scratch for streaming (reused per step).
  std::vector<TokenLogprobs> new_logprobs;
  std::vector<int32_t> new_ids;
  std::string new_text;

 private:
  GenerationWork work_;
  Clock::time_point accepted_, prefill_start_, first_token_, last_token_;
  RequestLoop loop_;
  std::unique_ptr<EngineSequence> seq_;
};

absl::StatusOr<std::unique_ptr<GenerationScheduler>> GenerationScheduler::Create(
    RetrievalEngine* engine, const Tokenizer* tokenizer, const SchedulerOptions& options) {
  if (engine == nullptr || tokenizer == nullptr) {
    return absl::InvalidArgumentError("GenerationScheduler: engine and tokenizer are required");
  }
  if (options.max_concurrent < 1 || options.max_concurrent > 4096) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_concurrent ", options.max_concurrent, " outside [1, 4096]"));
  }
  if (options.max_queue < 0 || options.max_queue > (1 << 20)) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_queue ", options.max_queue, " outside [0, 1048576]"));
  }
  if (options.memory_budget_bytes < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("host_memory_budget_bytes ", options.memory_budget_bytes, " must be >= 0"));
  }
  if (options.device_memory_budget_bytes < 0) {
    return absl::InvalidArgumentError(absl::StrCat("device_memory_budget_bytes ",
                                                   options.device_memory_budget_bytes,
                                                   " must be >= 0"));
  }
  if (options.max_finish_waiters < 0 || options.max_finish_waiters > (1 << 20)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "max_finish_waiters ", options.max_finish_waiters, " outside [0, 1048576]"));
  }
  if (options.max_recomputes < 0 || options.max_recomputes > 16) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_recomputes ", options.max_recomputes, " outside [0, 16]"));
  }
  auto s = std::unique_ptr<GenerationScheduler>(new GenerationScheduler(engine, tokenizer, options));
  s->prefill_thread_ = std::thread([p = s.get()] { p->PrefillLoop(); });
  s->decode_thread_ = std::thread([p = s.get()] { p->DecodeLoop(); });
  s->notify_thread_ = std::thread([p = s.get()] { p->NotifyLoop(); });
  return s;
}

GenerationScheduler::GenerationScheduler(RetrievalEngine* engine, const Tokenizer* tokenizer,
                                         const SchedulerOptions& options)
    : engine_(engine), tokenizer_(tokenizer), options_(options) {}

GenerationScheduler::~GenerationScheduler() {
  Shutdown();
  if (prefill_thread_.joinable()) prefill_thread_.join();
  if (decode_thread_.joinable()) decode_thread_.join();
  // Waiters that can no longer be satisfied are released (they re-read the
  // load) by the notifier, which then exits.
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (Waiter& w : finish_waiters_) notify_.push_back(std::move(w.callback));
    finish_waiters_.clear();
    notify_stop_ = true;
    cv_.notify_all();
  }
  if (notify_thread_.joinable()) notify_thread_.join();
}

void GenerationScheduler::NotifyLoop() {
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    cv_.wait(lock, [&] { return !notify_.empty() || notify_stop_; });
    if (notify_.empty()) return;  // and notify_stop_
    std::function<void()> f = std::move(notify_.front());
    notify_.pop_front();
    lock.unlock();
    f();
    lock.lock();
  }
}

void GenerationScheduler::Shutdown() {
  std::lock_guard<std::mutex> lock(mu_);
  stopping_ = true;
  cv_.notify_all();
}

SchedulerLoad GenerationScheduler::load() const {
  std::lock_guard<std::mutex> lock(mu_);
  return SchedulerLoad{active_,    prefilling_,    static_cast<int>(queue_.size()),
                       finished_,  reserved_bytes_, reserved_device_bytes_};
}

absl::Status GenerationScheduler::ValidateWork(const GenerationWork& work) const {
  const int vocab = engine_->config().vocab_size;
  if (work.prompt.empty()) return absl::InvalidArgumentError("prompt: empty (no tokens)");
  for (size_t i = 0; i < work.prompt.size(); ++i) {
    if (work.prompt[i] < 0 || work.prompt[i] >= vocab) {
      return absl::InvalidArgumentError(absl::StrCat("prompt token [", i, "] = ", work.prompt[i],
                                                     " outside [0, ", vocab, ")"));
    }
  }
  for (size_t i = 0; i < work.resume_tokens.size(); ++i) {
    if (work.resume_tokens[i] < 0 || work.resume_tokens[i] >= vocab) {
      return absl::InvalidArgumentError(absl::StrCat("resume_tokens[", i, "] = ",
                                                     work.resume_tokens[i], " outside [0, ",
                                                     vocab, ")"));
    }
  }
  if (work.logprobs < -1 || work.logprobs > kMaxTopLogprobs) {
    return absl::InvalidArgumentError(absl::StrCat("logprobs: ", work.logprobs, " outside [0, ",
                                                   kMaxTopLogprobs, "]"));
  }
  const int64_t limit = engine_->max_seq_len();
  // Both sizes are bounded by the request's message size: no overflow.
  const auto resume = static_cast<int64_t>(work.resume_tokens.size());
  if (resume > 0 && static_cast<int64_t>(work.prompt.size()) + resume > limit) {
    return absl::OutOfRangeError(absl::StrCat("resume_tokens: prompt ", work.prompt.size(),
                                              " + resume_tokens ", resume,
                                              " tokens exceed the model's context of ", limit,
                                              " tokens"));
  }
  if (resume > 0 && resume > work.max_tokens) {
    return absl::InvalidArgumentError(absl::StrCat("resume_tokens: ", resume,
                                                   " tokens, more than max_tokens ",
                                                   work.max_tokens));
  }
  if (static_cast<int64_t>(work.prompt.size()) > limit) {
    return absl::OutOfRangeError(absl::StrCat("prompt: ", work.prompt.size(),
                                              " tokens exceed the model's context of ", limit,
                                              " tokens"));
  }
  KVR_RETURN_IF_ERROR(RequestLoop::ValidateLoopFields(work.max_tokens, work.stop));
  KVR_RETURN_IF_ERROR(Prefixed("sampling.", ValidateSampling(work.sampling)));
  KVR_RETURN_IF_ERROR(
      Prefixed("attention.", ValidateAttentionOptions(work.attention, engine_->max_seq_len())));
  if (!work.forks.empty() && !work.resume_tokens.empty()) {
    return absl::InvalidArgumentError("n: more than one choice with resume_tokens");
  }
  for (const GenerationWork& f : work.forks) {
    if (f.prompt != work.prompt || !f.forks.empty() || !f.resume_tokens.empty() ||
        f.attention.mode != work.attention.mode || f.echo != work.echo) {
      return absl::InvalidArgumentError(
          "n: every choice must have the request's prompt, attention and echo, no "
          "resume_tokens");
    }
    KVR_RETURN_IF_ERROR(ValidateWork(f));
  }
  return absl::OkStatus();
}

absl::Status GenerationScheduler::Submit(GenerationWork work) {
  std::lock_guard<std::mutex> lock(mu_);
  if (stopping_) return absl::FailedPreconditionError("worker is shutting down");
  const int free_slots = options_.max_concurrent - active_;
  if (static_cast<int>(queue_.size()) >= options_.max_queue + std::max(0, free_slots)) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "worker overloaded: ", active_, " sequences decoding (max_concurrent ",
        options_.max_concurrent, ") and ", queue_.size(), " requests queued (max_queue ",
        options_.max_queue, "); retry after about 1 s with exponential backoff, or on another "
        "worker"));
  }
  const SequenceMemory need = MemoryOf(work);
  struct Budget {
    const char* kind;  // "host" / "device"
    int64_t bytes, budget, reserved;
  };
  const Budget budgets[] = {
      {"host", need.host, options_.memory_budget_bytes, reserved_bytes_},
      {"device", need.device, options_.backend_on_device ? options_.device_memory_budget_bytes : 0,
       reserved_device_bytes_}};
  for (const Budget& b : budgets) {
    if (b.budget > 0 && b.bytes > b.budget) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "worker ", b.kind, " memory budget: the request needs ", b.bytes, " bytes of ",
          b.kind, " memory (", engine_->CacheRows(work.attention),
          " K/V rows per layer, attention.mode ",
          std::string(AttentionModeName(work.attention.mode)),
          "), more than the whole memory budget of ", b.budget, " bytes (--", b.kind,
          "_memory_budget_bytes); use retrieval mode or a smaller window"));
    }
    if (b.budget > 0 && b.reserved > b.budget - b.bytes) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "worker ", b.kind, " memory budget: the request needs ", b.bytes, " bytes of ",
          b.kind, " memory, ", b.reserved, " of the memory budget of ", b.budget, " bytes (--",
          b.kind,
          "_memory_budget_bytes) are held by accepted requests; retry after about 1 s with "
          "exponential backoff, or on another worker"));
    }
  }
  // Counted only under a budget (the sizes saturate, a sum need not).
  if (budgets[0].budget > 0) reserved_bytes_ += need.host;
  if (budgets[1].budget > 0) reserved_device_bytes_ += need.device;
  queue_.push_back(Queued{std::move(work), Clock::now()});
  cv_.notify_all();
  return absl::OkStatus();
}

GenerationScheduler::SequenceMemory GenerationScheduler::MemoryOf(
    const AttentionOptions& attention) const {
  const int64_t total = engine_->SequenceBytes(attention);
  if (!options_.backend_on_device) return {total, 0};
  const int64_t device = engine_->SequenceBackendBytes(attention);
  // A saturated total stays saturated (never less than what fits).
  return {total == std::numeric_limits<int64_t>::max() ? total : total - device, device};
}

absl::Status GenerationScheduler::WhenFinished(int64_t n, std::function<void()> callback,
                                               uint64_t* id) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    const uint64_t waiter_id = next_waiter_id_++;
    if (id != nullptr) *id = waiter_id;
    if (finished_ < n) {
      if (finish_waiters_.size() >= static_cast<size_t>(options_.max_finish_waiters)) {
        return absl::ResourceExhaustedError(absl::StrCat(
            "wait_finished_requests: ", finish_waiters_.size(),
            " calls are already waiting (limit ", options_.max_finish_waiters, ")"));
      }
      finish_waiters_.push_back(Waiter{n, waiter_id, std::move(callback)});
      return absl::OkStatus();
    }
  }
  callback();
  return absl::OkStatus();
}

GenerationScheduler::SequenceMemory GenerationScheduler::MemoryOf(
    const GenerationWork& work) const {
  SequenceMemory m = MemoryOf(work.attention);
  constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
  const auto add = [&](const SequenceMemory& more) {
    m.host = m.host > kMax - more.host ? kMax : m.host + more.host;
    m.device = m.device > kMax - more.device ? kMax : m.device + more.device;
  };
  // Each fork holds a sequence of its own, and reserves what it needs if it
  // runs alone (the fallback when the nodes cannot fork: its own echo
  // scratch); Ended returns exactly MemoryOf(fork) for each.
  for (const GenerationWork& f : work.forks) add(MemoryOf(f));
  if (!work.echo || work.logprobs < 0) return m;
  AttentionOptions full;
  full.mode = AttentionMode::kFull;
  add(MemoryOf(full));
  return m;
}

bool GenerationScheduler::CancelWaiter(uint64_t id) {
  std::lock_guard<std::mutex> lock(mu_);
  for (auto it = finish_waiters_.begin(); it != finish_waiters_.end(); ++it) {
    if (it->id == id) {
      finish_waiters_.erase(it);
      return true;
    }
  }
  return false;
}

void GenerationScheduler::Ended(GenerationWork& work, absl::StatusOr<GenerationSummary> outcome,
                                bool was_active) {
  std::vector<GenerationWork> forks = std::move(work.forks);
  work.forks.clear();
  // The forks' memory and slots go first (MemoryOf(work) below is the
  // primary's alone now); they hear the same outcome.
  for (GenerationWork& f : forks) Ended(f, outcome, was_active);
  {
    // Counted before on_done: a client that has seen its stream end (and
    // then reads the load or the metrics) finds it no longer running.
    std::lock_guard<std::mutex> lock(mu_);
    ++finished_;
    if (was_active) --active_;
    const SequenceMemory held = MemoryOf(work);
    if (options_.memory_budget_bytes > 0) reserved_bytes_ -= held.host;
    if (options_.backend_on_device && options_.device_memory_budget_bytes > 0) {
      reserved_device_bytes_ -= held.device;
    }
  }
  if (work.on_done) work.on_done(std::move(outcome));
  // Ready waiters go to the notifier thread: their callbacks may block (the
  // service's reads the nodes' stats), and this is the decode or prefill
  // thread.
  std::lock_guard<std::mutex> lock(mu_);
  bool any = false;
  for (size_t i = 0; i < finish_waiters_.size();) {
    if (finish_waiters_[i].n <= finished_) {
      notify_.push_back(std::move(finish_waiters_[i].callback));
      finish_waiters_.erase(finish_waiters_.begin() + static_cast<std::ptrdiff_t>(i));
      any = true;
    } else {
      ++i;
    }
  }
  if (any) cv_.notify_all();
}

void GenerationScheduler::Stream(Run& run) {
  run.new_ids.clear();
  run.new_text.clear();
  run.new_logprobs.clear();
  if (!run.loop().TakeNew(&run.new_ids, &run.new_text, &run.new_logprobs)) return;
  if (options_.observer != nullptr && !run.new_ids.empty()) {
    options_.observer->OnTokens(static_cast<int64_t>(run.new_ids.size()));
  }
  if (run.work().on_logprobs && !run.new_logprobs.empty()) {
    run.work().on_logprobs(run.new_logprobs);
  }
  if (run.work().on_tokens) run.work().on_tokens(run.new_ids, run.new_text);
}

void GenerationScheduler::Finished(std::unique_ptr<Run> run) {
  Stream(*run);
  GenerationSummary summary = run->Summary();
  run->EndSequence();  // shards dropped before anyone hears of the end
  Ended(run->work(), std::move(summary), /*was_active=*/true);
}

bool GenerationScheduler::Recomputable(const GenerationWork& work, const absl::Status& why) const {
  return absl::IsUnavailable(why) && !work.cancel.cancelled() &&
         work.recomputes < options_.max_recomputes;
}

void GenerationScheduler::Recompute(GenerationWork work, std::vector<int32_t> generated,
                                    const absl::Status& why) {
  // The tokens streamed so far: what the loop generated, or, while it was
  // still replaying an earlier resume, that resume's longer list (one is a
  // prefix of the other).
  if (work.resume_tokens.size() > generated.size()) generated = std::move(work.resume_tokens);
  work.resume_tokens = std::move(generated);
  ++work.recomputes;
  work.on_prefill_progress = nullptr;  // the client already saw its prefill
  const int slots = 1 + static_cast<int>(work.forks.size());
  std::fprintf(stderr,
               "kvr_worker: recomputing a request from its %zu prompt + %zu generated tokens "
               "(recompute %d): %s\n",
               work.prompt.size(), work.resume_tokens.size(), work.recomputes,
               std::string(why.message()).c_str());
  std::lock_guard<std::mutex> lock(mu_);
  active_ -= slots;  // its memory budget stays reserved: the request goes on
  queue_.push_front(Queued{std::move(work), Clock::now()});
  cv_.notify_all();
}

void GenerationScheduler::AdmitForks(Run& primary, std::vector<GenerationWork> forks,
                                     std::vector<std::unique_ptr<Run>>* forked) {
  for (GenerationWork& f : forks) {
    absl::StatusOr<Sampler> sampler = Sampler::Create(f.sampling, engine_->config().vocab_size);
    if (!sampler.ok()) {
      Ended(f, sampler.status(), /*was_active=*/true);
      continue;
    }
    absl::StatusOr<std::unique_ptr<EngineSequence>> seq =
        engine_->ForkSequence(*primary.seq(), f.cancel);
    if (absl::IsUnimplemented(seq.status()) || absl::IsFailedPrecondition(seq.status())) {
      // The nodes cannot fork (e.g. persistent nodes): this choice is
      // prefilled on its own, next. Its memory stays reserved.
      f.on_prefill_progress = nullptr;
      std::lock_guard<std::mutex> lock(mu_);
      --active_;
      queue_.push_front(Queued{std::move(f), primary.accepted()});
      cv_.notify_all();
      continue;
    }
    auto run = std::make_unique<Run>(Queued{std::move(f), primary.accepted()},
                                     *std::move(sampler), *tokenizer_);
    GenerationWork& w = run->work();
    if (!seq.ok()) {
      Ended(w, seq.status(), /*was_active=*/true);
      continue;
    }
    run->set_prefill_start(Clock::now());
    run->prompt_logprobs = primary.prompt_logprobs;
    if (absl::Status lp = run->loop().SetLogprobs(w.logprobs); !lp.ok()) {
      Ended(w, std::move(lp), /*was_active=*/true);
      continue;
    }
    run->set_sequence(*std::move(seq));
    absl::StatusOr<bool> done = run->Advance(engine_->max_seq_len());
    if (!done.ok()) {
      run->EndSequence();
      Ended(run->work(), done.status(), /*was_active=*/true);
      continue;
    }
    if (run->sampled() > 0 && options_.observer != nullptr) {
      options_.observer->OnFirstToken(Seconds(Clock::now() - run->accepted()));
    }
    if (*done) {
      Finished(std::move(run));
      continue;
    }
    Stream(*run);
    forked->push_back(std::move(run));
  }
}

std::unique_ptr<GenerationScheduler::Run> GenerationScheduler::Admit(
    Queued q, std::vector<std::unique_ptr<Run>>* forked) {
  absl::StatusOr<Sampler> sampler = Sampler::Create(q.work.sampling, engine_->config().vocab_size);
  if (!sampler.ok()) {
    Ended(q.work, sampler.status(), /*was_active=*/true);
    return nullptr;
  }
  auto run = std::make_unique<Run>(std::move(q), *std::move(sampler), *tokenizer_);
  const Clock::time_point start = Clock::now();
  run->set_prefill_start(start);
  GenerationWork& w = run->work();
  // A copy: the work keeps its resume tokens in case it is recomputed.
  if (absl::Status replay = run->loop().Resume(w.resume_tokens); !replay.ok()) {
    Ended(w, std::move(replay), /*was_active=*/true);
    return nullptr;
  }
  if (absl::Status lp = run->loop().SetLogprobs(w.logprobs); !lp.ok()) {
    Ended(w, std::move(lp), /*was_active=*/true);
    return nullptr;
  }
  if (w.cancel.cancelled()) {
    run->loop().Finish(FinishReason::kCancelled);
    Finished(std::move(run));
    return nullptr;
  }
  if (w.echo && w.logprobs >= 0) {
    // Full attention over the prompt on a scratch sequence of its own (see
    // PromptLogprobs); a resumed request already delivered nothing of it
    // (the summary comes last), so it is computed again there too.
    absl::StatusOr<std::vector<TokenLogprobs>> lp =
        PromptLogprobs(*engine_, w.prompt, w.logprobs, w.cancel);
    if (absl::IsCancelled(lp.status())) {
      run->loop().Finish(FinishReason::kCancelled);
      Finished(std::move(run));
      return nullptr;
    }
    if (!lp.ok()) {
      Ended(w, Prefixed("prompt logprobs: ", lp.status()), /*was_active=*/true);
      return nullptr;
    }
    run->prompt_logprobs = *std::move(lp);
  }
  const auto total = static_cast<int64_t>(w.prompt.size());
  const int n_layers = engine_->config().n_layers;
  auto progress = [&](int layers_done) {
    if (!w.on_prefill_progress) return;
    w.on_prefill_progress(PrefillProgress{total * layers_done / n_layers, total, layers_done,
                                          n_layers});
  };
  progress(0);
  absl::StatusOr<std::unique_ptr<EngineSequence>> seq = engine_->StartSequence(
      w.prompt, w.attention, w.cancel, [&](int layers_done, int /*n_layers*/) {
        progress(layers_done);
        YieldToDecode();
      });
  if (absl::IsCancelled(seq.status())) {
    run->loop().Finish(FinishReason::kCancelled);
    Finished(std::move(run));
    return nullptr;
  }
  if (!seq.ok()) {
    if (Recomputable(w, seq.status())) {
      Recompute(std::move(w), {}, seq.status());
    } else {
      Ended(w, seq.status(), /*was_active=*/true);
    }
    return nullptr;
  }
  if (options_.observer != nullptr) options_.observer->OnPrefill(total, Seconds(Clock::now() - start));
  run->set_sequence(*std::move(seq));
  if (!w.forks.empty()) {
    std::vector<GenerationWork> forks = std::move(w.forks);
    w.forks.clear();
    AdmitForks(*run, std::move(forks), forked);
  }
  absl::StatusOr<bool> done = run->Advance(engine_->max_seq_len());
  if (!done.ok()) {
    run->EndSequence();
    Ended(run->work(), done.status(), /*was_active=*/true);
    return nullptr;
  }
  if (run->sampled() > 0 && options_.observer != nullptr) {
    options_.observer->OnFirstToken(Seconds(Clock::now() - run->accepted()));
  }
  if (*done) {
    Finished(std::move(run));
    return nullptr;
  }
  Stream(*run);
  return run;
}

void GenerationScheduler::YieldToDecode() {
  std::unique_lock<std::mutex> lock(mu_);
  // Prefilled runs join the batch at the decode thread's next iteration.
  if (decoding_ == 0 && prefilled_.empty()) return;
  const uint64_t seen = decode_steps_;
  // The decode thread never waits while it has sequences, so this wait is
  // bounded by one step (and the engine lets that step in: its lock is free
  // until the next layer starts).
  cv_.wait(lock, [&] {
    return decode_steps_ > seen || (decoding_ == 0 && prefilled_.empty()) || stopping_;
  });
}

void GenerationScheduler::PrefillLoop() {
  for (;;) {
    std::vector<Queued> dropped;
    std::optional<Queued> next;
    bool exit = false;
    {
      std::unique_lock<std::mutex> lock(mu_);
      // Wakes for a request it may admit, a cancelled one to drop, or stop.
      // (The decode thread notifies after every step, so cancellations of
      // queued requests are seen at the latest one step later.)
      cv_.wait(lock, [&] {
        if (stopping_) return true;
        if (queue_.empty()) return false;
        if (active_ < options_.max_concurrent) return true;
        return std::any_of(queue_.begin(), queue_.end(),
                           [](const Queued& q) { return q.work.cancel.cancelled(); });
      });
      for (auto it = queue_.begin(); it != queue_.end();) {
        if (stopping_ || it->work.cancel.cancelled()) {
          dropped.push_back(std::move(*it));
          it = queue_.erase(it);
        } else {
          ++it;
        }
      }
      if (stopping_) {
        exit = true;
      } else if (!queue_.empty() && active_ < options_.max_concurrent) {
        next.emplace(std::move(queue_.front()));
        queue_.pop_front();
        active_ += 1 + static_cast<int>(next->work.forks.size());
        ++prefilling_;
      }
    }
    for (Queued& q : dropped) {
      GenerationSummary s;
      s.finish = FinishReason::kCancelled;
      s.prompt_tokens = static_cast<int64_t>(q.work.prompt.size());
      s.queue_seconds = s.total_seconds = Seconds(Clock::now() - q.accepted);
      Ended(q.work, s, /*was_active=*/false);
    }
    if (exit) break;
    if (!next.has_value()) continue;
    std::vector<std::unique_ptr<Run>> forked;
    std::unique_ptr<Run> run = Admit(*std::move(next), &forked);
    std::lock_guard<std::mutex> lock(mu_);
    --prefilling_;
    const bool ready = run != nullptr || !forked.empty();
    if (run != nullptr) prefilled_.push_back(std::move(run));
    for (auto& f : forked) prefilled_.push_back(std::move(f));
    if (ready) cv_.notify_all();
  }
  std::lock_guard<std::mutex> lock(mu_);
  prefill_exited_ = true;
  cv_.notify_all();
}

void GenerationScheduler::DecodeLoop() {
  std::vector<std::unique_ptr<Run>> active;
  std::vector<EngineSequence*> seqs;
  std::vector<int32_t> tokens;
  std::vector<absl::Status> statuses;
  std::vector<double> retrieval_before, attention_before;
  auto retrieval_of = [](const EngineStats& s) {
    return s.node_wait_seconds + s.handoff_wait_seconds;
  };
  for (;;) {
    bool stopping = false;
    {
      std::unique_lock<std::mutex> lock(mu_);
      if (active.empty()) {
        cv_.wait(lock, [&] { return !prefilled_.empty() || (stopping_ && prefill_exited_); });
      }
      for (auto& r : prefilled_) active.push_back(std::move(r));
      prefilled_.clear();
      decoding_ = static_cast<int>(active.size());
      stopping = stopping_;
      if (active.empty() && stopping_ && prefill_exited_) break;
    }
    if (stopping) {
      for (auto& r : active) r->work().cancel.Cancel();
    }
    seqs.clear();
    tokens.clear();
    retrieval_before.clear();
    attention_before.clear();
    for (auto& r : active) {
      seqs.push_back(r->seq());
      tokens.push_back(r->loop().token());
      retrieval_before.push_back(retrieval_of(r->seq()->stats()));
      attention_before.push_back(r->seq()->stats().local_attention_seconds);
    }
    statuses.assign(active.size(), absl::OkStatus());
    const Clock::time_point step_start = Clock::now();
    const absl::Status batch = engine_->StepBatch(seqs, tokens, statuses);
    if (options_.observer != nullptr) {
      DecodeStepTiming t;
      t.sequences = static_cast<int>(active.size());
      t.seconds = Seconds(Clock::now() - step_start);
      double retrieval = 0.0, attention = 0.0;
      for (size_t j = 0; j < active.size(); ++j) {
        const EngineStats& st = active[j]->seq()->stats();
        retrieval += retrieval_of(st) - retrieval_before[j];
        attention += st.local_attention_seconds - attention_before[j];
      }
      // Per-sequence waits of one batch happen one after another inside the
      // step, so they fit in it; the clamps only absorb clock rounding.
      t.retrieval_seconds = std::clamp(retrieval, 0.0, t.seconds);
      t.attention_seconds = std::clamp(attention, 0.0, t.seconds - t.retrieval_seconds);
      t.other_seconds = t.seconds - t.retrieval_seconds - t.attention_seconds;
      options_.observer->OnDecodeStep(t);
    }
    std::vector<std::unique_ptr<Run>> still;
    for (size_t j = 0; j < active.size(); ++j) {
      std::unique_ptr<Run>& r = active[j];
      const absl::Status st = batch.ok() ? statuses[j] : batch;
      if (absl::IsCancelled(st)) {
        r->loop().Finish(FinishReason::kCancelled);
        Finished(std::move(r));
        continue;
      }
      absl::StatusOr<bool> done =
          st.ok() ? r->Advance(engine_->max_seq_len()) : absl::StatusOr<bool>(st);
      if (!done.ok()) {
        r->EndSequence();
        if (Recomputable(r->work(), done.status())) {
          const std::vector<int32_t>& context = r->loop().context();
          Recompute(std::move(r->work()),
                    std::vector<int32_t>(context.begin() + static_cast<std::ptrdiff_t>(
                                                               r->loop().prompt_tokens()),
                                         context.end()),
                    done.status());
        } else {
          Ended(r->work(), done.status(), /*was_active=*/true);
        }
      } else if (*done) {
        Finished(std::move(r));
      } else {
        Stream(*r);
        still.push_back(std::move(r));
      }
    }
    active = std::move(still);
    // Lets the prefill thread see freed slots, cancelled queued requests and
    // (between prefill layers) that this step's tokens went out.
    std::lock_guard<std::mutex> lock(mu_);
    ++decode_steps_;
    decoding_ = static_cast<int>(active.size());
    cv_.notify_all();
  }
}

}  // namespace kvr::worker
