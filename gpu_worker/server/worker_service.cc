#include "gpu_worker/server/worker_service.h"

#include <chrono>
#include <deque>
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

#include <grpcpp/alarm.h>

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace kvr::worker {
namespace {

grpc::Status ToGrpc(const absl::Status& s) {
  if (s.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(s.code()), std::string(s.message()));
}

v1::FinishReason ToProto(FinishReason r) {
  switch (r) {
    case FinishReason::kLength:
      return v1::FINISH_REASON_LENGTH;
    case FinishReason::kStop:
      return v1::FINISH_REASON_STOP;
    case FinishReason::kEos:
      return v1::FINISH_REASON_EOS;
    case FinishReason::kContextFull:
      return v1::FINISH_REASON_CONTEXT_FULL;
    case FinishReason::kCancelled:
      return v1::FINISH_REASON_CANCELLED;
  }
  return v1::FINISH_REASON_UNSPECIFIED;
}

// `token`'s bytes after `prev` (-1: none, the prompt's first token).
std::string TokenBytes(const Tokenizer& tokenizer, int32_t prev, int32_t token) {
  absl::StatusOr<std::string> piece =
      tokenizer.Decode(prev < 0 ? tokenizer.bos_id() : prev, token);
  return piece.ok() ? *std::move(piece) : std::string();
}

// `lp` as the proto, each token's bytes decoded after `prev`.
void ToProto(const Tokenizer& tokenizer, int32_t prev, const TokenLogprobs& lp,
             v1::TokenLogprob* out) {
  out->set_token_id(lp.token);
  if (lp.has_logprob) out->set_logprob(lp.logprob);
  out->set_text(TokenBytes(tokenizer, prev, lp.token));
  for (const auto& [id, logprob] : lp.top) {
    v1::TopLogprob* t = out->add_top();
    t->set_token_id(id);
    t->set_logprob(logprob);
    t->set_text(TokenBytes(tokenizer, prev, id));
  }
}

// When a call must be cut short by --max_deadline_seconds: the time
// `max_seconds` from now, if the call's deadline (none counts as infinitely
// far) is later; nullopt when its own deadline comes first or max_seconds
// is 0 (no cap).
std::optional<std::chrono::system_clock::time_point> CutAt(
    const grpc::CallbackServerContext* context, double max_seconds) {
  if (max_seconds <= 0) return std::nullopt;
  const auto now = std::chrono::system_clock::now();
  const auto limit =
      now + std::chrono::duration_cast<std::chrono::system_clock::duration>(
                std::chrono::duration<double>(max_seconds));
  if (context->deadline() <= limit) return std::nullopt;
  return limit;
}

// The status of a call cut at --max_deadline_seconds.
grpc::Status CutStatus(double max_seconds) {
  return grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED,
                      absl::StrCat("the call ran for the worker's longest deadline, ", max_seconds,
                                   " s (--max_deadline_seconds); its own deadline was later"));
}

}  // namespace

std::string ValidUtf8(std::string_view text) {
  auto cont = [&text](size_t at, uint8_t lo = 0x80, uint8_t hi = 0xBF) {
    if (at >= text.size()) return false;
    const auto c = static_cast<uint8_t>(text[at]);
    return c >= lo && c <= hi;
  };
  std::string out;
  out.reserve(text.size());
  size_t i = 0;
  while (i < text.size()) {
    const auto b = static_cast<uint8_t>(text[i]);
    size_t n = 0;  // length of the valid sequence at i, 0: invalid
    if (b < 0x80) {
      n = 1;
    } else if (b >= 0xC2 && b <= 0xDF) {
      n = cont(i + 1) ? 2 : 0;
    } else if (b >= 0xE0 && b <= 0xEF) {
      const uint8_t lo = b == 0xE0 ? 0xA0 : 0x80, hi = b == 0xED ? 0x9F : 0xBF;
      n = cont(i + 1, lo, hi) && cont(i + 2) ? 3 : 0;
    } else if (b >= 0xF0 && b <= 0xF4) {
      const uint8_t lo = b == 0xF0 ? 0x90 : 0x80, hi = b == 0xF4 ? 0x8F : 0xBF;
      n = cont(i + 1, lo, hi) && cont(i + 2) && cont(i + 3) ? 4 : 0;
    }
    if (n == 0) {
      out += "\xEF\xBF\xBD";  // U+FFFD for the invalid byte
      ++i;
    } else {
      out.append(text.substr(i, n));
      i += n;
    }
  }
  return out;
}

// One Generate stream. Deleted once both gRPC (OnDone) and the scheduler
// (on_done) are finished with it.
class WorkerService::GenerateReactor final
    : public grpc::ServerWriteReactor<v1::GenerateResponse> {
 public:
  GenerateReactor(GenerationScheduler* scheduler, const Tokenizer* tokenizer,
                  std::string request_id,
                  const std::function<void(absl::StatusCode)>* on_finished)
      : scheduler_(scheduler),
        tokenizer_(tokenizer),
        request_id_(std::move(request_id)),
        on_finished_(on_finished) {}

  // Submits `works` (one group per prompt, ToWorks; every choice's
  // callbacks are wired to this reactor with its index, prompt_index * n +
  // j, and they share one cancel token); on failure the stream finishes
  // with that status (groups already submitted are cancelled first). With
  // `cut_at`, a request still running then is cancelled and the call ends
  // DEADLINE_EXCEEDED naming --max_deadline_seconds (`max_seconds`).
  void Start(absl::StatusOr<std::vector<GenerationWork>> works,
             std::optional<std::chrono::system_clock::time_point> cut_at = std::nullopt,
             double max_seconds = 0) {
    if (!works.ok()) {
      FinishNow(ToGrpc(works.status()), /*work_done=*/true);
      return;
    }
    std::vector<int> group_choices;
    int total = 0;
    for (GenerationWork& group : *works) {
      const int n = 1 + static_cast<int>(group.forks.size());
      group_choices.push_back(n);
      Wire(group, total, /*progress=*/total == 0);
      for (size_t j = 0; j < group.forks.size(); ++j) {
        Wire(group.forks[j], total + 1 + static_cast<int>(j), /*progress=*/false);
      }
      total += n;
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      pending_ = total;
    }
    for (size_t g = 0; g < works->size(); ++g) {
      if (absl::Status s = scheduler_->Submit(std::move((*works)[g])); !s.ok()) {
        // This group and the later ones never run (their on_done is never
        // called); the earlier ones are cancelled and end the call.
        int never = 0;
        for (size_t k = g; k < works->size(); ++k) never += group_choices[k];
        cancel_.Cancel();
        std::lock_guard<std::mutex> lock(mu_);
        if (error_.ok()) error_ = ToGrpc(s);
        pending_ -= never;
        if (pending_ == 0) {
          work_done_ = true;
          Pump();
        }
        return;
      }
    }
    if (!cut_at.has_value()) return;
    // Armed only while the work runs: OnWorkDone cancels it (under mu_, so
    // it is never armed after), and this object outlives its callback.
    std::lock_guard<std::mutex> lock(mu_);
    if (work_done_) return;
    max_seconds_ = max_seconds;
    alarm_pending_ = true;
    cut_alarm_.Set(*cut_at, [this](bool fired) { OnCutAlarm(fired); });
  }

  void OnWriteDone(bool ok) override {
    std::lock_guard<std::mutex> lock(mu_);
    writing_ = false;
    if (!ok) cancelled_ = true;  // the stream is gone
    Pump();
  }

  void OnCancel() override {
    cancel_.Cancel();  // the scheduler stops the sequence and drops its shards
    std::lock_guard<std::mutex> lock(mu_);
    cancelled_ = true;
    Pump();
  }

  void OnDone() override {
    bool last;
    {
      std::lock_guard<std::mutex> lock(mu_);
      grpc_done_ = true;
      last = work_done_ && !alarm_pending_;
    }
    if (last) delete this;
  }

 private:
  // The --max_deadline_seconds alarm ran: `fired` at its time (the request
  // is cancelled and the call will end DEADLINE_EXCEEDED), or cancelled.
  // gRPC runs it on its executor, never inside Set or Cancel.
  void OnCutAlarm(bool fired) {
    bool last;
    {
      std::lock_guard<std::mutex> lock(mu_);
      alarm_pending_ = false;
      if (fired && !work_done_) {
        cut_ = true;
        cancel_.Cancel();  // the scheduler ends the request (on_done follows)
      }
      last = grpc_done_ && work_done_;
    }
    if (last) delete this;
  }

  void FinishNow(const grpc::Status& status, bool work_done) {
    std::lock_guard<std::mutex> lock(mu_);
    work_done_ = work_done;
    FinishCounted(status);
  }

  // Counts the call's outcome, then finishes it (so a client that has its
  // status sees it counted). Holds mu_.
  void FinishCounted(const grpc::Status& status) {
    finished_ = true;
    if (on_finished_ != nullptr && *on_finished_) {
      (*on_finished_)(static_cast<absl::StatusCode>(status.error_code()));
    }
    Finish(status);
  }

  // Sets `work`'s callbacks to this reactor as choice `index`, and its
  // cancel token to the call's; `progress`: it reports prefill progress
  // (the first prompt's primary only: PrefillProgress names no prompt).
  void Wire(GenerationWork& work, int index, bool progress) {
    work.cancel = cancel_;
    prev_tokens_.push_back(work.prompt.empty() ? 0 : work.prompt.back());
    work.on_tokens = [this, index](std::span<const int32_t> ids, std::string_view text) {
      OnTokens(index, ids, text);
    };
    if (work.logprobs >= 0) {
      work.on_logprobs = [this, index](std::span<const TokenLogprobs> lps) {
        OnLogprobs(index, lps);
      };
    }
    work.on_done = [this, index](absl::StatusOr<GenerationSummary> outcome) {
      OnWorkDone(index, std::move(outcome));
    };
    if (progress) {
      work.on_prefill_progress = [this](const PrefillProgress& p) { OnPrefillProgress(p); };
    }
  }

  // The trailing chunk of choice `index` in out_, added when the last
  // message is not one. Holds mu_.
  v1::GenerateChunk* TrailingChunk(int index) {
    if (out_.empty() || !out_.back().has_chunk() || out_.back().chunk().index() != index) {
      out_.emplace_back().mutable_chunk()->set_index(index);
    }
    return out_.back().mutable_chunk();
  }

  // Outgoing messages wait in out_ while a write is in flight; new tokens
  // join a trailing chunk of the same choice, and a new progress replaces a
  // trailing progress, so a slow reader gets fewer, larger messages in the
  // same order.
  void OnTokens(int index, std::span<const int32_t> ids, std::string_view text) {
    std::lock_guard<std::mutex> lock(mu_);
    v1::GenerateChunk* chunk = TrailingChunk(index);
    chunk->mutable_token_ids()->Add(ids.begin(), ids.end());
    // Pieces never end inside a complete character (RequestLoop holds an
    // incomplete tail back), so replacing per piece changes only bytes that
    // can never become valid; a proto3 string must be valid UTF-8 or the
    // client cannot parse the message (and loses it, and what follows).
    chunk->mutable_text()->append(ValidUtf8(text));
    Pump();
  }

  // Called just before OnTokens with the same tokens: they go into the
  // same trailing chunk.
  void OnLogprobs(int index, std::span<const TokenLogprobs> lps) {
    std::lock_guard<std::mutex> lock(mu_);
    v1::GenerateChunk* chunk = TrailingChunk(index);
    int32_t& prev = prev_tokens_[static_cast<size_t>(index)];
    for (const TokenLogprobs& lp : lps) {
      ToProto(*tokenizer_, prev, lp, chunk->add_logprobs());
      prev = lp.token;
    }
  }

  void OnPrefillProgress(const PrefillProgress& progress) {
    std::lock_guard<std::mutex> lock(mu_);
    if (out_.empty() || !out_.back().has_prefill_progress()) {
      out_.emplace_back().mutable_prefill_progress();
    }
    v1::PrefillProgress* p = out_.back().mutable_prefill_progress();
    p->set_prompt_tokens_done(progress.prompt_tokens_done);
    p->set_prompt_tokens_total(progress.prompt_tokens_total);
    p->set_layers_done(progress.layers_done);
    p->set_layers_total(progress.layers_total);
    Pump();
  }

  // Choice `index` ended: its GenerateFinal joins out_ (or its error ends
  // the call once every choice ended; the others are cancelled).
  void OnWorkDone(int index, absl::StatusOr<GenerationSummary> outcome) {
    bool last;
    {
      std::lock_guard<std::mutex> lock(mu_);
      work_done_ = --pending_ == 0;
      if (outcome.ok()) {
        v1::GenerateFinal* f = out_.emplace_back().mutable_summary();
        f->set_index(index);
        f->set_request_id(request_id_);
        f->set_finish_reason(ToProto(outcome->finish));
        f->mutable_usage()->set_prompt_tokens(outcome->prompt_tokens);
        f->mutable_usage()->set_completion_tokens(outcome->completion_tokens);
        v1::Timings* t = f->mutable_timings();
        t->set_queue_seconds(outcome->queue_seconds);
        t->set_time_to_first_token_seconds(outcome->time_to_first_token_seconds);
        t->set_mean_token_latency_seconds(outcome->mean_token_latency_seconds);
        t->set_prefill_seconds(outcome->prefill_seconds);
        t->set_node_wait_seconds(outcome->node_wait_seconds);
        t->set_total_seconds(outcome->total_seconds);
        for (size_t i = 0; i < outcome->prompt_logprobs.size(); ++i) {
          const int32_t prev = i == 0 ? -1 : outcome->prompt_logprobs[i - 1].token;
          ToProto(*tokenizer_, prev, outcome->prompt_logprobs[i], f->add_prompt_logprobs());
        }
      } else {
        if (error_.ok()) error_ = ToGrpc(outcome.status());
        cancel_.Cancel();  // the other choices stop: the call fails
      }
      if (cut_) error_ = CutStatus(max_seconds_);
      if (work_done_ && alarm_pending_) cut_alarm_.Cancel();  // its callback then deletes, if last
      Pump();
      last = work_done_ && grpc_done_ && !alarm_pending_;
    }
    if (last) delete this;
  }

  // Starts the next write or the Finish, when none is in flight. Holds mu_.
  void Pump() {
    if (writing_ || finished_) return;
    if (cancelled_) {
      FinishCounted(grpc::Status(grpc::StatusCode::CANCELLED, "generation cancelled"));
      return;
    }
    if (!out_.empty()) {
      in_flight_ = std::move(out_.front());
      out_.pop_front();
      writing_ = true;
      StartWrite(&in_flight_);
      return;
    }
    if (!work_done_) return;
    // Every choice's final went out through out_.
    FinishCounted(error_);
  }

  GenerationScheduler* const scheduler_;
  const Tokenizer* const tokenizer_;
  // Per choice: the token before its next logprobs entry's (its text).
  std::vector<int32_t> prev_tokens_;
  int pending_ = 0;  // choices whose on_done has not run yet
  const std::string request_id_;
  const std::function<void(absl::StatusCode)>* const on_finished_;
  CancelToken cancel_;
  std::mutex mu_;
  std::deque<v1::GenerateResponse> out_;
  v1::GenerateResponse in_flight_;
  bool writing_ = false;
  bool cancelled_ = false;
  bool finished_ = false;   // Finish (or StartWriteAndFinish) called
  bool work_done_ = false;  // the scheduler will not call us again
  bool grpc_done_ = false;  // OnDone ran
  grpc::Status error_ = grpc::Status::OK;
  // --max_deadline_seconds: the alarm that cuts the call, whether its
  // callback is still to run, and whether it cut the call.
  grpc::Alarm cut_alarm_;
  double max_seconds_ = 0;
  bool alarm_pending_ = false;
  bool cut_ = false;
};

// GetModelInfo waiting for finished requests. Deleted once both gRPC and the
// scheduler's waiter are finished with it.
class WorkerService::InfoReactor final : public grpc::ServerUnaryReactor {
 public:
  InfoReactor(const WorkerService* service, v1::GetModelInfoResponse* response)
      : service_(service), response_(response) {}

  // Answers once `n` requests have finished, or at once with the status of
  // a refused wait (too many waiting). Called by the handler before it
  // returns the reactor (so before any OnCancel); Ready() may run inline.
  // With `cut_at`, a wait still pending then ends DEADLINE_EXCEEDED naming
  // --max_deadline_seconds (`max_seconds`).
  void Wait(GenerationScheduler* scheduler, int64_t n,
            std::optional<std::chrono::system_clock::time_point> cut_at, double max_seconds) {
    scheduler_ = scheduler;
    const absl::Status s = scheduler->WhenFinished(n, [this] { Ready(); }, &waiter_id_);
    std::lock_guard<std::mutex> lock(mu_);
    if (!s.ok()) {
      waiter_done_ = true;
      finished_ = true;
      Finish(ToGrpc(s));
      return;
    }
    // Armed only while the call is unfinished (Ready / OnCancel cancel it
    // under mu_); this object outlives the alarm's callback.
    if (!cut_at.has_value() || finished_) return;
    max_seconds_ = max_seconds;
    alarm_pending_ = true;
    cut_alarm_.Set(*cut_at, [this](bool fired) { OnCutAlarm(fired); });
  }

  void OnCancel() override {
    std::lock_guard<std::mutex> lock(mu_);
    EndWait(grpc::Status(grpc::StatusCode::CANCELLED, "GetModelInfo: cancelled while waiting"));
  }
  void OnDone() override {
    bool last;
    {
      std::lock_guard<std::mutex> lock(mu_);
      grpc_done_ = true;
      last = waiter_done_ && !alarm_pending_;
    }
    if (last) delete this;
  }

 private:
  // Finishes an unfinished wait with `status`, freeing the waiter's slot
  // (max_finish_waiters) now rather than when its count is reached (if the
  // scheduler no longer holds it, Ready() runs), and disarms the cut. Holds mu_.
  void EndWait(const grpc::Status& status) {
    if (finished_) return;
    finished_ = true;
    Finish(status);
    if (!waiter_done_ && scheduler_->CancelWaiter(waiter_id_)) waiter_done_ = true;
    if (alarm_pending_) cut_alarm_.Cancel();  // its callback then deletes, if last
  }

  // The --max_deadline_seconds alarm ran: `fired` at its time, or cancelled.
  // gRPC runs it on its executor, never inside Set or Cancel.
  void OnCutAlarm(bool fired) {
    bool last;
    {
      std::lock_guard<std::mutex> lock(mu_);
      alarm_pending_ = false;
      if (fired) EndWait(CutStatus(max_seconds_));
      last = grpc_done_ && waiter_done_;
    }
    if (last) delete this;
  }

  void Ready() {
    bool last;
    {
      std::lock_guard<std::mutex> lock(mu_);
      waiter_done_ = true;
      if (!finished_) {
        finished_ = true;
        service_->FillInfo(response_);
        Finish(grpc::Status::OK);
      }
      if (alarm_pending_) cut_alarm_.Cancel();
      last = grpc_done_ && !alarm_pending_;
    }
    if (last) delete this;
  }

  const WorkerService* const service_;
  v1::GetModelInfoResponse* const response_;
  GenerationScheduler* scheduler_ = nullptr;  // set by Wait
  uint64_t waiter_id_ = 0;                     // likewise
  std::mutex mu_;
  bool finished_ = false, grpc_done_ = false, waiter_done_ = false;
  grpc::Alarm cut_alarm_;  // --max_deadline_seconds, while the wait runs
  double max_seconds_ = 0;
  bool alarm_pending_ = false;  // its callback is still to run
};

WorkerService::WorkerService(GenerationScheduler* scheduler, const Tokenizer* tokenizer,
                             retrieval::RetrievalClient* node, const LlamaConfig& config,
                             int64_t max_context_tokens, WorkerServiceOptions options)
    : scheduler_(scheduler),
      tokenizer_(tokenizer),
      node_(node),
      config_(config),
      max_context_tokens_(max_context_tokens),
      options_(std::move(options)) {
  for (int i = 0; i < WorkerServiceOptions::kTokenizeThreads; ++i) {
    tokenize_threads_.emplace_back([this] { TokenizeLoop(); });
  }
}

WorkerService::~WorkerService() {
  {
    std::lock_guard<std::mutex> lock(tokenize_mu_);
    tokenize_stop_ = true;
  }
  tokenize_cv_.notify_all();
  for (std::thread& t : tokenize_threads_) t.join();
}

void WorkerService::TokenizeLoop() {
  std::unique_lock<std::mutex> lock(tokenize_mu_);
  for (;;) {
    tokenize_cv_.wait(lock, [&] { return !tokenize_jobs_.empty() || tokenize_stop_; });
    if (tokenize_jobs_.empty()) return;  // and stopping
    std::function<void()> job = std::move(tokenize_jobs_.front());
    tokenize_jobs_.pop_front();
    lock.unlock();
    job();
    lock.lock();
  }
}

absl::StatusOr<std::vector<int32_t>> WorkerService::PromptIds(bool is_text,
                                                             const std::string& text,
                                                             const v1::TokenIds& tokens,
                                                             std::string_view field,
                                                             bool add_bos) const {
  using O = WorkerServiceOptions;
  const std::string name(field);
  if (is_text) {
    if (text.empty()) return absl::InvalidArgumentError(absl::StrCat(name, "text: empty prompt"));
    if (text.size() > O::kMaxPromptBytes) {
      return absl::InvalidArgumentError(
          absl::StrCat(name, "text: ", text.size(), " bytes, limit ", O::kMaxPromptBytes));
    }
    // Text that cannot fit the context is refused before it is encoded
    // (the encoding's time grows with the text).
    if (const size_t per_token = tokenizer_->max_bytes_per_token(); per_token > 0) {
      const size_t min_tokens = (text.size() + per_token - 1) / per_token;
      if (min_tokens > static_cast<size_t>(max_context_tokens_)) {
        return absl::OutOfRangeError(absl::StrCat(
            name, "prompt: text of ", text.size(), " bytes is at least ", min_tokens,
            " tokens (a token covers at most ", per_token,
            " bytes), over the model's context of ", max_context_tokens_, " tokens"));
      }
    }
    absl::StatusOr<std::vector<int32_t>> ids = tokenizer_->Encode(text, add_bos);
    if (!ids.ok()) {
      return absl::InvalidArgumentError(absl::StrCat(name, "text: ", ids.status().message()));
    }
    return ids;
  }
  // Refused before the copy: more ids than the context can never run.
  if (tokens.ids_size() > O::kMaxPromptTokens || tokens.ids_size() > max_context_tokens_) {
    return absl::OutOfRangeError(absl::StrCat(name, "tokens: ", tokens.ids_size(),
                                              " ids exceed the model's context of ",
                                              max_context_tokens_, " tokens"));
  }
  return std::vector<int32_t>(tokens.ids().begin(), tokens.ids().end());
}

absl::StatusOr<GenerationWork> WorkerService::ToWork(const v1::GenerateRequest& r) const {
  KVR_ASSIGN_OR_RETURN(std::vector<GenerationWork> works, ToWorks(r));
  return std::move(works.front());
}

absl::StatusOr<std::vector<GenerationWork>> WorkerService::ToWorks(
    const v1::GenerateRequest& r) const {
  using O = WorkerServiceOptions;
  GenerationWork w;
  if (r.request_id().size() > O::kMaxRequestIdBytes) {
    return absl::InvalidArgumentError(absl::StrCat("request_id: ", r.request_id().size(),
                                                   " bytes, limit ", O::kMaxRequestIdBytes));
  }
  const int n = r.has_n() ? r.n() : 1;
  if (n < 1 || n > options_.max_n) {
    return absl::InvalidArgumentError(
        absl::StrCat("n: ", n, " outside [1, ", options_.max_n, "] (--max_n)"));
  }
  if (r.prompts_size() > options_.max_prompts) {
    return absl::InvalidArgumentError(absl::StrCat("prompts: ", r.prompts_size(),
                                                   " prompts, limit ", options_.max_prompts,
                                                   " (--max_prompts)"));
  }
  if (r.prompts_size() > 0 && r.prompt_case() != v1::GenerateRequest::PROMPT_NOT_SET) {
    return absl::InvalidArgumentError("prompts: set either prompts or text / tokens, not both");
  }
  // Every prompt's ids, checked before any work is built.
  const bool add_bos = !r.has_add_bos() || r.add_bos();
  std::vector<std::vector<int32_t>> prompts;
  switch (r.prompt_case()) {
    case v1::GenerateRequest::kText:
    case v1::GenerateRequest::kTokens: {
      KVR_ASSIGN_OR_RETURN(std::vector<int32_t> ids,
                           PromptIds(r.prompt_case() == v1::GenerateRequest::kText, r.text(),
                                     r.tokens(), "", add_bos));
      prompts.push_back(std::move(ids));
      break;
    }
    default:
      if (r.prompts_size() == 0) return absl::InvalidArgumentError("prompt: set text or tokens");
      for (int i = 0; i < r.prompts_size(); ++i) {
        const v1::Prompt& p = r.prompts(i);
        if (p.kind_case() == v1::Prompt::KIND_NOT_SET) {
          return absl::InvalidArgumentError(absl::StrCat("prompts[", i, "]: set text or tokens"));
        }
        KVR_ASSIGN_OR_RETURN(std::vector<int32_t> ids,
                             PromptIds(p.kind_case() == v1::Prompt::kText, p.text(), p.tokens(),
                                       absl::StrCat("prompts[", i, "]."), add_bos));
        prompts.push_back(std::move(ids));
      }
  }
  w.max_tokens = r.has_max_tokens() ? r.max_tokens() : 128;
  // Refused before the copy, like tokens: more than the context can never run.
  if (r.resume_tokens_size() > max_context_tokens_) {
    return absl::OutOfRangeError(absl::StrCat("resume_tokens: ", r.resume_tokens_size(),
                                              " ids exceed the model's context of ",
                                              max_context_tokens_, " tokens"));
  }
  w.resume_tokens.assign(r.resume_tokens().begin(), r.resume_tokens().end());
  if (r.stop_size() > O::kMaxStopStrings) {
    return absl::InvalidArgumentError(
        absl::StrCat("stop: ", r.stop_size(), " strings, limit ", O::kMaxStopStrings));
  }
  for (int i = 0; i < r.stop_size(); ++i) {
    if (r.stop(i).size() > O::kMaxStopBytes) {
      return absl::InvalidArgumentError(
          absl::StrCat("stop[", i, "]: ", r.stop(i).size(), " bytes, limit ", O::kMaxStopBytes));
    }
    w.stop.push_back(r.stop(i));
  }
  const v1::SamplingParams& s = r.sampling();
  w.sampling.temperature = s.temperature();
  w.sampling.top_k = s.top_k();
  if (s.has_top_p()) w.sampling.top_p = s.top_p();
  if (s.has_repetition_penalty()) w.sampling.repetition_penalty = s.repetition_penalty();
  if (s.has_seed()) w.sampling.seed = s.seed();
  if (s.has_presence_penalty()) w.sampling.presence_penalty = s.presence_penalty();
  if (s.has_frequency_penalty()) w.sampling.frequency_penalty = s.frequency_penalty();
  if (r.has_logprobs()) {
    if (r.logprobs() < 0 || r.logprobs() > kMaxTopLogprobs) {
      return absl::InvalidArgumentError(absl::StrCat("logprobs: ", r.logprobs(), " outside [0, ",
                                                     kMaxTopLogprobs, "]"));
    }
    w.logprobs = r.logprobs();
  }
  w.echo = r.echo();
  const v1::AttentionParams& a = r.attention();
  if (!a.mode().empty()) {
    absl::StatusOr<AttentionMode> mode = ParseAttentionMode(a.mode());
    if (!mode.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("attention.mode: unknown mode \"", a.mode(),
                                                     "\" (expected \"full\" or \"retrieval\")"));
    }
    w.attention.mode = *mode;
  }
  if (a.has_sinks()) w.attention.sinks = a.sinks();
  if (a.has_window()) w.attention.window = a.window();
  if (a.has_top_k()) w.attention.top_k = a.top_k();
  if (a.has_beam()) w.attention.beam = a.beam();
  if (a.has_chunk_tokens()) w.attention.chunk_tokens = a.chunk_tokens();
  if (a.has_estimate()) {
    absl::StatusOr<EstimateMode> e = ParseEstimateMode(a.estimate());
    if (!e.ok()) {
      // The value is echoed bounded: the message stays small whatever was sent.
      return absl::InvalidArgumentError(absl::StrCat(
          "attention.estimate: \"", absl::string_view(a.estimate()).substr(0, 32),
          "\" is not one of \"default\", \"on\", \"off\""));
    }
    w.attention.estimate = *e;
  }
  if (n > 1 && !w.resume_tokens.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("n: ", n, " choices with resume_tokens (a resumed stream has one choice)"));
  }
  // One group per prompt: choice 0 is the primary, 1..n-1 its forks with
  // seed + j. Callbacks and the cancel token are the caller's to set.
  std::vector<GenerationWork> works;
  works.reserve(prompts.size());
  for (size_t p = 0; p < prompts.size(); ++p) {
    GenerationWork group = w;
    group.prompt = std::move(prompts[p]);
    const GenerationWork first = group;  // the choices' template (no forks)
    for (int j = 1; j < n; ++j) {
      GenerationWork choice = first;
      choice.sampling.seed = w.sampling.seed + static_cast<uint64_t>(j);  // mod 2^64
      group.forks.push_back(std::move(choice));
    }
    if (absl::Status st = scheduler_->ValidateWork(group); !st.ok()) {
      if (r.prompts_size() == 0) return st;
      return absl::Status(st.code(), absl::StrCat("prompts[", p, "]: ", st.message()));
    }
    works.push_back(std::move(group));
  }
  return works;
}

grpc::ServerWriteReactor<v1::GenerateResponse>* WorkerService::Generate(
    grpc::CallbackServerContext* context, const v1::GenerateRequest* request) {
  auto* reactor =
      new GenerateReactor(scheduler_, tokenizer_, request->request_id(), &options_.on_generate_finished);
  if (context->deadline() <= std::chrono::system_clock::now()) {
    reactor->Start(absl::DeadlineExceededError("deadline expired before the request started"));
    return reactor;
  }
  reactor->Start(ToWorks(*request), CutAt(context, options_.max_deadline_seconds),
                 options_.max_deadline_seconds);
  return reactor;
}

grpc::ServerUnaryReactor* WorkerService::Tokenize(grpc::CallbackServerContext* context,
                                                  const v1::TokenizeRequest* request,
                                                  v1::TokenizeResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  if (request->text().size() > WorkerServiceOptions::kMaxPromptBytes) {
    reactor->Finish(grpc::Status(
        grpc::StatusCode::INVALID_ARGUMENT,
        absl::StrCat("text: ", request->text().size(), " bytes, limit ",
                     WorkerServiceOptions::kMaxPromptBytes)));
    return reactor;
  }
  // Encoding takes time linear in the text (up to ~0.3 s for 1 MiB): not on
  // a gRPC thread. The call's objects stay valid until Finish.
  auto job = [this, context, request, response, reactor] {
    if (context->IsCancelled()) {
      reactor->Finish(grpc::Status(grpc::StatusCode::CANCELLED, "Tokenize: cancelled"));
      return;
    }
    if (context->deadline() <= std::chrono::system_clock::now()) {
      reactor->Finish(grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED,
                                   "Tokenize: deadline expired before encoding"));
      return;
    }
    absl::StatusOr<std::vector<int32_t>> ids =
        tokenizer_->Encode(request->text(), request->add_bos());
    if (!ids.ok()) {
      reactor->Finish(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                                   absl::StrCat("text: ", ids.status().message())));
      return;
    }
    response->mutable_ids()->Add(ids->begin(), ids->end());
    reactor->Finish(grpc::Status::OK);
  };
  {
    std::lock_guard<std::mutex> lock(tokenize_mu_);
    if (tokenize_jobs_.size() < WorkerServiceOptions::kMaxTokenizeWaiting) {
      tokenize_jobs_.push_back(std::move(job));
      tokenize_cv_.notify_one();
      return reactor;
    }
  }
  reactor->Finish(grpc::Status(
      grpc::StatusCode::RESOURCE_EXHAUSTED,
      absl::StrCat("Tokenize: ", WorkerServiceOptions::kMaxTokenizeWaiting,
                   " calls already waiting to be encoded (limit ",
                   WorkerServiceOptions::kMaxTokenizeWaiting, "); retry after about 1 s")));
  return reactor;
}

grpc::ServerUnaryReactor* WorkerService::Detokenize(grpc::CallbackServerContext* context,
                                                    const v1::DetokenizeRequest* request,
                                                    v1::DetokenizeResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  if (request->ids_size() > WorkerServiceOptions::kMaxDetokenizeIds) {
    reactor->Finish(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                                 absl::StrCat("ids: ", request->ids_size(), " ids, limit ",
                                              WorkerServiceOptions::kMaxDetokenizeIds)));
    return reactor;
  }
  std::string text;
  int32_t prev = tokenizer_->bos_id();
  for (int i = 0; i < request->ids_size(); ++i) {
    const int32_t id = request->ids(i);
    if (id < 0 || id >= config_.vocab_size) {
      reactor->Finish(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                                   absl::StrCat("ids[", i, "] = ", id, " outside [0, ",
                                                config_.vocab_size, ")")));
      return reactor;
    }
    absl::StatusOr<std::string> piece = tokenizer_->Decode(prev, id);
    if (!piece.ok()) {
      reactor->Finish(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                                   absl::StrCat("ids[", i, "]: ", piece.status().message())));
      return reactor;
    }
    text += *piece;
    prev = id;
  }
  response->set_text(ValidUtf8(text));  // a proto3 string: see ValidUtf8
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

void WorkerService::FillInfo(v1::GetModelInfoResponse* response) const {
  response->set_model(options_.model_name);
  response->set_backend(options_.backend);
  response->set_vocab_size(config_.vocab_size);
  response->set_max_context_tokens(max_context_tokens_);
  response->set_n_layers(config_.n_layers);
  response->set_n_heads(config_.n_heads);
  response->set_n_kv_heads(config_.n_kv_heads);
  response->set_dim(config_.dim);
  response->set_bos_id(tokenizer_->bos_id());
  response->set_eos_id(tokenizer_->eos_id());
  response->set_chat_template(options_.chat.chat_template);
  response->set_bos_token(options_.chat.bos_token);
  response->set_eos_token(options_.chat.eos_token);
  for (const int32_t id : options_.chat.stop_token_ids) response->add_stop_token_ids(id);
  response->set_max_concurrent(scheduler_->options().max_concurrent);
  response->set_max_queue(scheduler_->options().max_queue);
  const SchedulerLoad load = scheduler_->load();
  response->set_active_sequences(load.active);
  response->set_queued_requests(load.queued);
  response->set_finished_requests(load.finished);
  if (node_ != nullptr) {
    if (absl::StatusOr<retrieval::NodeStats> st = node_->Stats(); st.ok()) {
      response->set_node_sequences(st->sequences);
      response->set_node_shards(st->shards);
    } else {
      response->set_node_sequences(-1);  // unknown (a node did not answer)
      response->set_node_shards(-1);
    }
  }
}

grpc::ServerUnaryReactor* WorkerService::GetModelInfo(grpc::CallbackServerContext* context,
                                                      const v1::GetModelInfoRequest* request,
                                                      v1::GetModelInfoResponse* response) {
  if (request->wait_finished_requests() > 0) {
    auto* reactor = new InfoReactor(this, response);
    reactor->Wait(scheduler_, request->wait_finished_requests(),
                  CutAt(context, options_.max_deadline_seconds), options_.max_deadline_seconds);
    return reactor;
  }
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  FillInfo(response);
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

}  // namespace kvr::worker
