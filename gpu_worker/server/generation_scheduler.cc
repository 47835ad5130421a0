#include "gpu_worker/server/generation_scheduler.h"

#include <algorithm>
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

// One admitted request: its sequence and decode loop (the loop of
// generation.cc's RequestRun, with the streamed text collected per step).
class GenerationScheduler::Run {
 public:
  Run(Queued q, Sampler sampler)
      : work_(std::move(q.work)), accepted_(q.accepted), sampler_(std::move(sampler)) {
    context_ = work_.prompt;
    token_ = context_.back();
    for (const std::string& s : work_.stop) longest_stop_ = std::max(longest_stop_, s.size());
  }

  GenerationWork& work() { return work_; }
  EngineSequence* seq() { return seq_.get(); }
  int32_t token() const { return token_; }
  Clock::time_point accepted() const { return accepted_; }

  void set_sequence(std::unique_ptr<EngineSequence> seq, Clock::time_point prefill_start) {
    seq_ = std::move(seq);
    prefill_start_ = prefill_start;
  }
  void set_prefill_start(Clock::time_point t) { prefill_start_ = t; }

  // Takes the logits of the last prefill / step; streams what became final;
  // true when the request is over (finish() says why).
  absl::StatusOr<bool> Advance(std::span<const float> logits, int64_t position,
                               int64_t max_seq_len, const Tokenizer& tokenizer) {
    bool done = false;
    if (generated_ >= work_.max_tokens) {
      done = Finish(FinishReason::kLength);
    } else {
      const int32_t next = sampler_.Sample(logits, context_);
      const Clock::time_point now = Clock::now();
      if (next == tokenizer.bos_id() || next == tokenizer.eos_id()) {
        done = Finish(FinishReason::kEos);
      } else {
        KVR_ASSIGN_OR_RETURN(std::string piece, tokenizer.Decode(token_, next));
        if (generated_ == 0) first_token_ = now;
        last_token_ = now;
        new_ids_.push_back(next);
        context_.push_back(next);
        token_ = next;
        ++generated_;
        if (AddText(piece)) {
          done = Finish(FinishReason::kStop);
        } else if (generated_ == work_.max_tokens) {
          done = Finish(FinishReason::kLength);
        } else if (position >= max_seq_len) {
          done = Finish(FinishReason::kContextFull);
        }
      }
    }
    Stream();
    return done;
  }

  bool Finish(FinishReason reason) {
    finish_ = reason;
    if (reason != FinishReason::kStop) Emit(text_.size());
    return true;
  }

  GenerationSummary Summary() const {
    GenerationSummary s;
    s.finish = finish_;
    s.prompt_tokens = static_cast<int64_t>(work_.prompt.size());
    s.completion_tokens = generated_;
    const Clock::time_point now = Clock::now();
    s.queue_seconds = prefill_start_ > accepted_ ? Seconds(prefill_start_ - accepted_) : 0.0;
    if (generated_ > 0) s.time_to_first_token_seconds = Seconds(first_token_ - accepted_);
    if (generated_ > 1) s.mean_token_latency_seconds = Seconds(last_token_ - first_token_) / (generated_ - 1);
    if (seq_ != nullptr) {
      s.prefill_seconds = seq_->stats().prefill_seconds;
      s.node_wait_seconds = seq_->stats().node_wait_seconds;
    }
    s.total_seconds = Seconds(now - accepted_);
    return s;
  }

  // Ends the sequence (drops its shards from the nodes).
  void EndSequence() { seq_.reset(); }

 private:
  // Appends `piece` to the text; true when a stop string now occurs (the
  // text is cut before it). Holds back any suffix that may start one.
  bool AddText(std::string_view piece) {
    text_.append(piece);
    const size_t from = emitted_ > longest_stop_ ? emitted_ - longest_stop_ : 0;
    size_t cut = std::string::npos;
    for (const std::string& s : work_.stop) cut = std::min(cut, text_.find(s, from));
    if (cut != std::string::npos) {
      text_.resize(cut);
      Emit(text_.size());
      return true;
    }
    size_t hold = 0;
    for (const std::string& s : work_.stop) {
      for (size_t k = std::min(s.size() - 1, text_.size()); k > hold; --k) {
        if (std::string_view(text_).substr(text_.size() - k) == std::string_view(s).substr(0, k)) {
          hold = k;
          break;
        }
      }
    }
    Emit(text_.size() - hold);
    return false;
  }
  void Emit(size_t end) {
    if (end <= emitted_) return;
    pending_text_.append(text_, emitted_, end - emitted_);
    emitted_ = end;
  }
  void Stream() {
    if (new_ids_.empty() && pending_text_.empty()) return;
    if (work_.on_tokens) work_.on_tokens(new_ids_, pending_text_);
    new_ids_.clear();
    pending_text_.clear();
  }

  GenerationWork work_;
  Clock::time_point accepted_, prefill_start_, first_token_, last_token_;
  Sampler sampler_;
  std::unique_ptr<EngineSequence> seq_;
  std::vector<int32_t> context_;
  int32_t token_ = 0;
  int generated_ = 0;
  FinishReason finish_ = FinishReason::kLength;
  std::string text_;          // generated text so far (cut at a stop string)
  size_t emitted_ = 0;        // text_[0, emitted_) has been streamed
  size_t longest_stop_ = 0;
  std::vector<int32_t> new_ids_;
  std::string pending_text_;
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
  auto s = std::unique_ptr<GenerationScheduler>(new GenerationScheduler(engine, tokenizer, options));
  s->thread_ = std::thread([p = s.get()] { p->Loop(); });
  return s;
}

GenerationScheduler::GenerationScheduler(RetrievalEngine* engine, const Tokenizer* tokenizer,
                                         const SchedulerOptions& options)
    : engine_(engine), tokenizer_(tokenizer), options_(options) {}

GenerationScheduler::~GenerationScheduler() {
  Shutdown();
  if (thread_.joinable()) thread_.join();
  // Waiters that can no longer be satisfied are released (they re-read the load).
  std::vector<std::pair<int64_t, std::function<void()>>> waiters;
  {
    std::lock_guard<std::mutex> lock(mu_);
    waiters.swap(finish_waiters_);
  }
  for (auto& w : waiters) w.second();
}

void GenerationScheduler::Shutdown() {
  std::lock_guard<std::mutex> lock(mu_);
  stopping_ = true;
  cv_.notify_all();
}

SchedulerLoad GenerationScheduler::load() const {
  std::lock_guard<std::mutex> lock(mu_);
  return SchedulerLoad{active_, static_cast<int>(queue_.size()), finished_};
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
  const int64_t limit = engine_->max_seq_len();
  if (static_cast<int64_t>(work.prompt.size()) > limit) {
    return absl::OutOfRangeError(absl::StrCat("prompt: ", work.prompt.size(),
                                              " tokens exceed the model's context of ", limit,
                                              " tokens"));
  }
  if (work.max_tokens < 0) {
    return absl::InvalidArgumentError(absl::StrCat("max_tokens ", work.max_tokens, " must be >= 0"));
  }
  for (size_t i = 0; i < work.stop.size(); ++i) {
    if (work.stop[i].empty()) return absl::InvalidArgumentError(absl::StrCat("stop[", i, "] is empty"));
  }
  KVR_RETURN_IF_ERROR(Prefixed("sampling.", ValidateSampling(work.sampling)));
  return Prefixed("attention.", ValidateAttentionOptions(work.attention));
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
  queue_.push_back(Queued{std::move(work), Clock::now()});
  cv_.notify_all();
  return absl::OkStatus();
}

void GenerationScheduler::WhenFinished(int64_t n, std::function<void()> callback) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (finished_ < n) {
      finish_waiters_.emplace_back(n, std::move(callback));
      return;
    }
  }
  callback();
}

void GenerationScheduler::Ended(GenerationWork& work, absl::StatusOr<GenerationSummary> outcome,
                                bool was_active) {
  if (work.on_done) work.on_done(std::move(outcome));
  std::vector<std::function<void()>> ready;
  {
    std::lock_guard<std::mutex> lock(mu_);
    ++finished_;
    if (was_active) --active_;
    for (size_t i = 0; i < finish_waiters_.size();) {
      if (finish_waiters_[i].first <= finished_) {
        ready.push_back(std::move(finish_waiters_[i].second));
        finish_waiters_.erase(finish_waiters_.begin() + static_cast<std::ptrdiff_t>(i));
      } else {
        ++i;
      }
    }
  }
  for (auto& f : ready) f();
}

void GenerationScheduler::Finished(std::unique_ptr<Run> run) {
  GenerationSummary summary = run->Summary();
  run->EndSequence();  // shards dropped before anyone hears of the end
  Ended(run->work(), std::move(summary), /*was_active=*/true);
}

std::unique_ptr<GenerationScheduler::Run> GenerationScheduler::Admit(Queued q) {
  absl::StatusOr<Sampler> sampler = Sampler::Create(q.work.sampling, engine_->config().vocab_size);
  if (!sampler.ok()) {
    Ended(q.work, sampler.status(), /*was_active=*/true);
    return nullptr;
  }
  auto run = std::make_unique<Run>(std::move(q), *std::move(sampler));
  const Clock::time_point start = Clock::now();
  run->set_prefill_start(start);
  GenerationWork& w = run->work();
  if (w.cancel.cancelled()) {
    run->Finish(FinishReason::kCancelled);
    Finished(std::move(run));
    return nullptr;
  }
  absl::StatusOr<std::unique_ptr<EngineSequence>> seq =
      engine_->StartSequence(w.prompt, w.attention, w.cancel);
  if (absl::IsCancelled(seq.status())) {
    run->Finish(FinishReason::kCancelled);
    Finished(std::move(run));
    return nullptr;
  }
  if (!seq.ok()) {
    Ended(w, seq.status(), /*was_active=*/true);
    return nullptr;
  }
  run->set_sequence(*std::move(seq), start);
  absl::StatusOr<bool> done = run->Advance(run->seq()->logits(), run->seq()->position(),
                                           engine_->max_seq_len(), *tokenizer_);
  if (!done.ok()) {
    run->EndSequence();
    Ended(run->work(), done.status(), /*was_active=*/true);
    return nullptr;
  }
  if (*done) {
    Finished(std::move(run));
    return nullptr;
  }
  return run;
}

void GenerationScheduler::Loop() {
  std::vector<std::unique_ptr<Run>> active;
  std::vector<EngineSequence*> seqs;
  std::vector<int32_t> tokens;
  std::vector<absl::Status> statuses;
  for (;;) {
    std::vector<Queued> admit, dropped;
    bool stopping = false;
    {
      std::unique_lock<std::mutex> lock(mu_);
      if (active.empty()) cv_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
      stopping = stopping_;
      if (stopping && queue_.empty() && active.empty()) break;
      // Requests cancelled while queued (or all, when stopping) end now.
      for (auto it = queue_.begin(); it != queue_.end();) {
        if (stopping || it->work.cancel.cancelled()) {
          dropped.push_back(std::move(*it));
          it = queue_.erase(it);
        } else {
          ++it;
        }
      }
      while (!queue_.empty() &&
             active.size() + admit.size() < static_cast<size_t>(options_.max_concurrent)) {
        admit.push_back(std::move(queue_.front()));
        queue_.pop_front();
      }
      active_ = static_cast<int>(active.size() + admit.size());
    }
    for (Queued& q : dropped) {
      GenerationSummary s;
      s.finish = FinishReason::kCancelled;
      s.prompt_tokens = static_cast<int64_t>(q.work.prompt.size());
      s.queue_seconds = s.total_seconds = Seconds(Clock::now() - q.accepted);
      Ended(q.work, s, /*was_active=*/false);
    }
    for (Queued& q : admit) {
      if (std::unique_ptr<Run> run = Admit(std::move(q)); run != nullptr) {
        active.push_back(std::move(run));
      }
    }
    if (stopping) {
      for (auto& r : active) r->work().cancel.Cancel();
    }
    if (!active.empty()) {
      seqs.clear();
      tokens.clear();
      for (auto& r : active) {
        seqs.push_back(r->seq());
        tokens.push_back(r->token());
      }
      statuses.assign(active.size(), absl::OkStatus());
      const absl::Status batch = engine_->StepBatch(seqs, tokens, statuses);
      std::vector<std::unique_ptr<Run>> still;
      for (size_t j = 0; j < active.size(); ++j) {
        std::unique_ptr<Run>& r = active[j];
        const absl::Status st = batch.ok() ? statuses[j] : batch;
        if (absl::IsCancelled(st)) {
          r->Finish(FinishReason::kCancelled);
          Finished(std::move(r));
          continue;
        }
        absl::StatusOr<bool> done =
            st.ok() ? r->Advance(r->seq()->logits(), r->seq()->position(), engine_->max_seq_len(),
                                 *tokenizer_)
                    : absl::StatusOr<bool>(st);
        if (!done.ok()) {
          r->EndSequence();
          Ended(r->work(), done.status(), /*was_active=*/true);
        } else if (*done) {
          Finished(std::move(r));
        } else {
          still.push_back(std::move(r));
        }
      }
      active = std::move(still);
    }
    std::lock_guard<std::mutex> lock(mu_);
    active_ = static_cast<int>(active.size());
  }
}

}  // namespace kvr::worker
