#include "services/gateway/generate_call.h"

#include <grpcpp/grpcpp.h>

#include <cstdio>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/tsan_annotations.h"

namespace kvr::gateway {

// One try on one worker: the client side of its Generate stream. Keeps the
// call alive until gRPC is done with it.
//
// Reads are started from outside gRPC's reactions (RequestNext runs on the
// front end's thread once the previous response is passed on), which gRPC
// allows only under a hold: without one, the stream can end while no read
// is pending (deadline, cancellation, the worker's status arriving), gRPC
// then destroys its stream object and calls OnDone, and a StartRead issued
// after that (RequestNext read `current_` just before OnUpstreamDone
// cleared it) uses the destroyed stream (issue 14: "StartRead after
// OnDone"). So the attempt holds the stream from Start until it will issue
// no more reads: the last read came back empty (the stream ended), or the
// call was cancelled; Read after that is a no-op. While the hold is in
// place OnDone cannot run, so a Read under mu_ with the hold still held
// always reaches a live stream. The owner keeps reading or cancels, so the
// hold is always released.
class GenerateCall::Attempt final : public grpc::ClientReadReactor<v1::GenerateResponse> {
 public:
  Attempt(std::shared_ptr<GenerateCall> call, std::shared_ptr<WorkerChannel> worker)
      : call_(std::move(call)), worker_(std::move(worker)) {}

  const std::string& address() const { return worker_->address; }

  // Sends `request` (kept here until gRPC is done with it).
  void Start(v1::GenerateRequest request, absl::Time deadline) {
    request_ = std::move(request);
    ctx_.set_deadline(absl::ToChronoTime(deadline));
    worker_->generation->async()->Generate(&ctx_, &request_, this);
    AddHold();  // before StartCall, as gRPC requires
    StartRead(&response_);
    // gRPC orders StartCall / StartRead before the reactions (OnReadDone,
    // OnDone), which run on its threads; TSan cannot see that ordering.
    KVR_TSAN_RELEASE(this);
    StartCall();
  }
  // The next response; nothing once the stream ended or was cancelled.
  void Read() {
    std::lock_guard<std::mutex> lock(mu_);
    if (released_) return;
    KVR_TSAN_RELEASE(this);
    StartRead(&response_);
  }
  void Cancel() {
    ctx_.TryCancel();
    Release();
  }

  void OnReadDone(bool ok) override {
    KVR_TSAN_ACQUIRE(this);
    if (!ok) {  // the stream ended: OnDone follows once the hold is gone
      Release();
      return;
    }
    v1::GenerateResponse r = std::move(response_);
    response_.Clear();
    call_->OnUpstreamResponse(this, std::move(r));
  }

  void OnDone(const grpc::Status& status) override {
    KVR_TSAN_ACQUIRE(this);
    // The last callback: may release the call (and with it this attempt).
    std::shared_ptr<GenerateCall> call = std::move(call_);
    call->OnUpstreamDone(this, status);
  }

 private:
  // Drops the hold once; no read starts after it. Only called by an owner
  // of the GenerateCall or from a reaction, so the attempt outlives it.
  void Release() {
    std::lock_guard<std::mutex> lock(mu_);
    if (released_) return;
    released_ = true;
    KVR_TSAN_RELEASE(this);  // OnDone may follow on a gRPC thread
    RemoveHold();
  }

  std::shared_ptr<GenerateCall> call_;
  const std::shared_ptr<WorkerChannel> worker_;
  grpc::ClientContext ctx_;
  v1::GenerateRequest request_;
  v1::GenerateResponse response_;
  std::mutex mu_;
  bool released_ = false;  // the hold is gone: no more reads
};

std::shared_ptr<GenerateCall> GenerateCall::Create(WorkerPool* pool, GatewayMetrics* metrics,
                                                   Api api, v1::GenerateRequest request,
                                                   absl::Time received, absl::Time deadline,
                                                   OnResponse on_response, OnFinish on_finish) {
  return std::shared_ptr<GenerateCall>(new GenerateCall(pool, metrics, api, std::move(request),
                                                        received, deadline,
                                                        std::move(on_response),
                                                        std::move(on_finish)));
}

void GenerateCall::Start() { Acquire(/*exclude=*/{}); }

void GenerateCall::SetApiKey(std::shared_ptr<ApiKeyGrant> grant) {
  std::lock_guard<std::mutex> lock(mu_);
  key_ = std::move(grant);
}

GenerateCall::GenerateCall(WorkerPool* pool, GatewayMetrics* metrics, Api api,
                           v1::GenerateRequest request, absl::Time received, absl::Time deadline,
                           OnResponse on_response, OnFinish on_finish)
    : pool_(pool),
      metrics_(metrics),
      api_(api),
      request_(std::move(request)),
      received_(received),
      deadline_(deadline),
      multi_choice_((request_.has_n() && request_.n() > 1) || request_.prompts_size() > 0),
      choices_per_prompt_(request_.has_n() && request_.n() > 1 ? request_.n() : 1),
      on_response_(std::move(on_response)),
      on_finish_(std::move(on_finish)) {
  pool_->CallStarted();
}

GenerateCall::~GenerateCall() {
  alarms_.clear();
  attempts_.clear();
  pool_->CallEnded();
}

void GenerateCall::Acquire(const std::string& exclude) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    queued_ = true;
    ticket_ = 0;
  }
  // The grant may run inline (a free slot, or a refusal).
  const uint64_t ticket = pool_->balancer().Acquire(
      deadline_, exclude,
      [self = shared_from_this()](absl::StatusOr<std::string> address) {
        self->OnGrant(std::move(address));
      });
  bool abandon = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (queued_) {
      ticket_ = ticket;
      abandon = cancelled_;  // Cancel came before the ticket was known
    }
  }
  if (abandon) pool_->balancer().Abandon(ticket);
}

void GenerateCall::OnGrant(absl::StatusOr<std::string> address) {
  std::unique_lock<std::mutex> lock(mu_);
  queued_ = false;
  ticket_ = 0;
  if (!address.ok()) {
    lock.unlock();
    const absl::Status& s = address.status();
    Finish(grpc::Status(static_cast<grpc::StatusCode>(s.code()), std::string(s.message())));
    return;
  }
  std::shared_ptr<WorkerChannel> worker = pool_->Get(*address);
  if (cancelled_ || worker == nullptr) {
    const bool cancelled = cancelled_;
    lock.unlock();
    pool_->balancer().Release(*address);
    Finish(cancelled ? grpc::Status(grpc::StatusCode::CANCELLED, "cancelled by the client")
                     : grpc::Status(grpc::StatusCode::UNAVAILABLE,
                                    absl::StrCat("worker ", *address, " left the membership")));
    return;
  }
  reached_worker_ = true;
  attempts_.push_back(std::make_unique<Attempt>(shared_from_this(), std::move(worker)));
  current_ = attempts_.back().get();
  Attempt* attempt = current_;
  v1::GenerateRequest request = NextRequest();
  lock.unlock();
  // A Cancel from now on reaches the attempt (TryCancel before the call
  // starts cancels it as soon as it does).
  attempt->Start(std::move(request), deadline_);
}

v1::GenerateRequest GenerateCall::NextRequest() {
  v1::GenerateRequest request = request_;
  // Both bounded: the client's by the request size cap, ours by max_tokens.
  request.mutable_resume_tokens()->Add(sent_tokens_.begin(), sent_tokens_.end());
  return request;
}

void GenerateCall::OnUpstreamResponse(Attempt* attempt, v1::GenerateResponse response) {
  OnResponse deliver;
  std::shared_ptr<ApiKeyGrant> key;
  int64_t debit = 0;  // tokens to charge to `key`
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (key_ != nullptr) {
      // The prompt once (a resumed attempt prefills it again: not charged
      // twice; progress after the first token is never the original
      // prompt's to report), each generated token as it streams (replayed
      // tokens are not streamed again); the summary settles the prompt with
      // the worker's count of the original prompt.
      int64_t prompt = 0;
      if (multi_choice_) {
        // Each prompt once, with the final of its first choice.
        if (response.has_summary() && response.summary().index() % choices_per_prompt_ == 0) {
          debit += response.summary().usage().prompt_tokens();
        }
      } else if (response.has_prefill_progress() && sent_tokens_.empty()) {
        prompt = response.prefill_progress().prompt_tokens_total();
      } else if (response.has_summary()) {
        prompt = response.summary().usage().prompt_tokens();
      }
      if (prompt > prompt_debited_) {
        debit += prompt - prompt_debited_;
        prompt_debited_ = prompt;
      }
      if (response.has_chunk()) debit += response.chunk().token_ids_size();
      if (debit > 0) key = key_;
    }
    if (response.has_prefill_progress() && !sent_tokens_.empty()) {
      // A resumed attempt prefilling again: the client is past that.
      deliver = nullptr;
    } else {
      deliver = on_response_;
    }
    if (response.has_chunk()) {
      sent_tokens_.insert(sent_tokens_.end(), response.chunk().token_ids().begin(),
                          response.chunk().token_ids().end());
    } else if (response.has_summary()) {
      got_summary_ = true;
    }
  }
  if (key != nullptr) {
    key->Debit(debit);
    metrics_->RecordKeyTokens(key->metric_label(), debit);
  }
  if (!deliver && response.has_prefill_progress()) {
    attempt->Read();  // nothing for the client: read on
    return;
  }
  const absl::Time now = absl::Now();
  if (response.has_chunk() && response.chunk().token_ids_size() > 0) {
    const bool first = !got_tokens_;
    if (first) metrics_->RecordFirstToken(absl::ToDoubleSeconds(now - received_));
    metrics_->RecordTokens(response.chunk().token_ids_size(),
                           first ? 0.0 : absl::ToDoubleSeconds(now - last_tokens_), first);
    got_tokens_ = true;
    last_tokens_ = now;
  } else if (response.has_summary() &&
             (!multi_choice_ || response.summary().index() % choices_per_prompt_ == 0)) {
    metrics_->RecordPromptTokens(response.summary().usage().prompt_tokens());  // once per prompt
  }
  if (deliver) deliver(std::move(response));
}

void GenerateCall::RequestNext() {
  Attempt* attempt;
  {
    std::lock_guard<std::mutex> lock(mu_);
    attempt = finished_ ? nullptr : current_;
  }
  if (attempt != nullptr) attempt->Read();
}

void GenerateCall::Cancel() {
  Attempt* attempt = nullptr;
  uint64_t ticket = 0;
  grpc::Alarm* backoff = nullptr;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (cancelled_ || finished_) return;
    cancelled_ = true;
    attempt = current_;
    if (queued_) ticket = ticket_;
    if (!alarms_.empty()) backoff = alarms_.back().get();
  }
  if (ticket != 0) pool_->balancer().Abandon(ticket);
  if (attempt != nullptr) attempt->Cancel();
  // A pending backoff's callback then runs (with false) and finishes the
  // call as cancelled; one that already fired ignores this (its Acquire
  // sees cancelled_). Alarms are destroyed only with the call.
  if (backoff != nullptr) backoff->Cancel();
}

void GenerateCall::OnUpstreamDone(Attempt* attempt, const grpc::Status& status) {
  const std::string address = attempt->address();
  // Out of rotation first, so the freed slot goes to no one on that worker.
  if (status.error_code() == grpc::StatusCode::UNAVAILABLE) pool_->ReportUnavailable(address);
  pool_->balancer().Release(address);
  const WorkerPoolOptions& options = pool_->options();
  bool resume = false;
  absl::Duration backoff;
  {
    std::lock_guard<std::mutex> lock(mu_);
    current_ = nullptr;
    // UNAVAILABLE is what a lost worker looks like (connection dropped,
    // refused, or the worker shutting down); every other code is the
    // request's own outcome.
    // A call of several choices is not resumed: resume_tokens describe one.
    resume = status.error_code() == grpc::StatusCode::UNAVAILABLE && !got_summary_ &&
             !multi_choice_ && !cancelled_ && resumes_ < options.max_resumes;
    if (resume) {
      // The n-th resume waits resume_backoff * 2^(n-1), if the deadline allows.
      backoff = options.resume_backoff * (int64_t{1} << resumes_);
      resume = absl::Now() + backoff < deadline_;
    }
    if (resume) ++resumes_;
  }
  if (resume) {
    Resume(address, backoff);
    return;
  }
  Finish(status);
}

void GenerateCall::Resume(const std::string& failed, absl::Duration backoff) {
  std::fprintf(stderr, "kvr_gateway: resuming a Generate on another worker (%s failed)\n",
               failed.c_str());
  if (backoff <= absl::ZeroDuration()) {
    Acquire(failed);
    return;
  }
  std::lock_guard<std::mutex> lock(mu_);
  // The callback runs exactly once (at the deadline, or at once with false
  // when cancelled). It owns the call until then through `holder`, which it
  // empties: the alarm (owned by the call) then holds no reference back.
  auto holder = std::make_shared<std::shared_ptr<GenerateCall>>(shared_from_this());
  alarms_.push_back(std::make_unique<grpc::Alarm>());
  alarms_.back()->Set(absl::ToChronoTime(absl::Now() + backoff), [holder, failed](bool fired) {
    std::shared_ptr<GenerateCall> self = std::move(*holder);
    if (fired) {
      self->Acquire(failed);
    } else {
      self->Finish(grpc::Status(grpc::StatusCode::CANCELLED, "cancelled by the client"));
    }
  });
}

void GenerateCall::Finish(const grpc::Status& status) {
  OnFinish finish;
  std::shared_ptr<ApiKeyGrant> key;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (finished_) return;
    finished_ = true;
    finish = std::move(on_finish_);
    on_finish_ = nullptr;
    on_response_ = nullptr;
    key = std::move(key_);
  }
  metrics_->RecordRequest(api_, static_cast<absl::StatusCode>(status.error_code()),
                          absl::ToDoubleSeconds(absl::Now() - received_), reached_worker_);
  if (key != nullptr) {
    metrics_->RecordKeyRequest(key->metric_label(),
                               static_cast<absl::StatusCode>(status.error_code()));
    key.reset();  // the key's slot is free before the client hears the end
  }
  int resumes = 0;
  {
    std::lock_guard<std::mutex> lock(mu_);
    resumes = resumes_;
  }
  if (resumes > 0) {
    using Outcome = GatewayMetrics::ResumeOutcome;
    Outcome outcome = Outcome::kError;
    if (status.ok()) outcome = Outcome::kOk;
    if (status.error_code() == grpc::StatusCode::CANCELLED) outcome = Outcome::kCancelled;
    metrics_->RecordResumed(outcome, resumes);
  }
  if (finish) finish(status);
}

}  // namespace kvr::gateway
