#include "gpu_worker/engine/generation.h"

#include <algorithm>
#include <deque>
#include <utility>

#include "absl/strings/str_cat.h"

namespace kvr::worker {
namespace {

// Streams text while holding back any suffix that could start a stop string.
class StopMatcher {
 public:
  StopMatcher(const std::vector<std::string>& stop, const TextCallback& on_text)
      : stop_(stop), on_text_(on_text) {
    for (const std::string& s : stop_) longest_ = std::max(longest_, s.size());
  }

  // Appends `piece`; returns true when a stop string now occurs (the text is
  // cut before it).
  bool Add(std::string_view piece, std::string* text) {
    text->append(piece);
    const size_t from = emitted_ > longest_ ? emitted_ - longest_ : 0;
    size_t cut = std::string::npos;
    for (const std::string& s : stop_) cut = std::min(cut, text->find(s, from));
    if (cut != std::string::npos) {
      text->resize(cut);
      Flush(*text);
      return true;
    }
    size_t hold = 0;
    for (const std::string& s : stop_) {
      for (size_t k = std::min(s.size() - 1, text->size()); k > hold; --k) {
        if (std::string_view(*text).substr(text->size() - k) == std::string_view(s).substr(0, k)) {
          hold = k;
          break;
        }
      }
    }
    Emit(*text, text->size() - hold);
    return false;
  }
  void Flush(const std::string& text) { Emit(text, text.size()); }

 private:
  void Emit(const std::string& text, size_t end) {
    if (end <= emitted_) return;
    if (on_text_) on_text_(std::string_view(text).substr(emitted_, end - emitted_));
    emitted_ = end;
  }

  const std::vector<std::string>& stop_;
  const TextCallback& on_text_;
  size_t longest_ = 0;
  size_t emitted_ = 0;
};

// One request's decode loop (shared by Generate and GenerateBatch): samples
// from each step's logits, streams the text, decides when to stop.
class RequestRun {
 public:
  // Validates the request and encodes its prompt.
  static absl::StatusOr<std::unique_ptr<RequestRun>> Create(const GenerateRequest& request,
                                                            const Tokenizer& tokenizer,
                                                            int vocab_size, TextCallback on_text) {
    if (request.max_tokens < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("max_tokens ", request.max_tokens, " must be >= 0"));
    }
    for (size_t i = 0; i < request.stop.size(); ++i) {
      if (request.stop[i].empty()) {
        return absl::InvalidArgumentError(absl::StrCat("stop[", i, "] is empty"));
      }
    }
    KVR_ASSIGN_OR_RETURN(Sampler sampler, Sampler::Create(request.sampling, vocab_size));
    KVR_ASSIGN_OR_RETURN(std::vector<int32_t> context,
                         tokenizer.Encode(request.prompt, /*add_bos=*/true));
    return std::unique_ptr<RequestRun>(new RequestRun(request, tokenizer, std::move(sampler),
                                                      std::move(context), std::move(on_text)));
  }

  const std::vector<int32_t>& context() const { return context_; }
  // The token the next decode step runs.
  int32_t token() const { return token_; }

  // Takes the logits of the last prefill / step (the sequence now holds
  // `position` tokens); returns true when the generation is over.
  absl::StatusOr<bool> Advance(std::span<const float> logits, int64_t position,
                               int64_t max_seq_len) {
    if (generated_ >= request_.max_tokens) return Finish(FinishReason::kLength);
    const int32_t next = sampler_.Sample(logits, context_);
    if (next == tokenizer_.bos_id() || next == tokenizer_.eos_id()) {
      return Finish(FinishReason::kEos);
    }
    KVR_ASSIGN_OR_RETURN(std::string piece, tokenizer_.Decode(token_, next));
    result_.tokens.push_back(next);
    context_.push_back(next);
    token_ = next;
    ++generated_;
    if (matcher_.Add(piece, &result_.text)) return Finish(FinishReason::kStop);
    if (generated_ == request_.max_tokens) return Finish(FinishReason::kLength);
    if (position >= max_seq_len) return Finish(FinishReason::kContextFull);
    return false;
  }

  // Ends the run with `reason`; true.
  bool Finish(FinishReason reason) {
    result_.finish = reason;
    if (reason != FinishReason::kStop) matcher_.Flush(result_.text);
    return true;
  }

  GenerateResult TakeResult(const EngineStats& stats) {
    result_.stats = stats;
    return std::move(result_);
  }

 private:
  RequestRun(const GenerateRequest& request, const Tokenizer& tokenizer, Sampler sampler,
             std::vector<int32_t> context, TextCallback on_text)
      : request_(request),
        tokenizer_(tokenizer),
        sampler_(std::move(sampler)),
        context_(std::move(context)),
        on_text_(std::move(on_text)),
        matcher_(request_.stop, on_text_) {
    result_.prompt_tokens = static_cast<int64_t>(context_.size());
    token_ = context_.back();
  }

  const GenerateRequest& request_;
  const Tokenizer& tokenizer_;
  Sampler sampler_;
  std::vector<int32_t> context_;
  TextCallback on_text_;
  StopMatcher matcher_;  // refers to request_.stop and on_text_
  GenerateResult result_;
  int32_t token_ = 0;
  int generated_ = 0;
};

}  // namespace

std::string_view FinishReasonName(FinishReason reason) {
  switch (reason) {
    case FinishReason::kLength:
      return "length";
    case FinishReason::kStop:
      return "stop";
    case FinishReason::kEos:
      return "eos";
    case FinishReason::kContextFull:
      return "context_full";
    case FinishReason::kCancelled:
      return "cancelled";
  }
  return "unknown";
}

absl::StatusOr<GenerateResult> Generate(RetrievalEngine& engine, const Tokenizer& tokenizer,
                                        const GenerateRequest& request,
                                        const TextCallback& on_text) {
  KVR_ASSIGN_OR_RETURN(std::unique_ptr<RequestRun> run,
                       RequestRun::Create(request, tokenizer, engine.config().vocab_size, on_text));
  absl::StatusOr<std::span<const float>> logits =
      engine.Prefill(run->context(), request.attention, request.cancel);
  for (;;) {
    if (absl::IsCancelled(logits.status())) {
      run->Finish(FinishReason::kCancelled);
      break;
    }
    KVR_RETURN_IF_ERROR(logits.status());
    KVR_ASSIGN_OR_RETURN(const bool done,
                         run->Advance(*logits, engine.position(), engine.max_seq_len()));
    if (done) break;
    logits = engine.DecodeStep(run->token());
  }
  return run->TakeResult(engine.stats());
}

std::vector<absl::StatusOr<GenerateResult>> GenerateBatch(
    RetrievalEngine& engine, const Tokenizer& tokenizer,
    std::span<const GenerateRequest> requests, const BatchOptions& options,
    const BatchTextCallback& on_text) {
  std::vector<absl::StatusOr<GenerateResult>> results(
      requests.size(), absl::UnknownError("GenerateBatch: not run"));
  if (options.max_active < 1) {
    for (auto& r : results) {
      r = absl::InvalidArgumentError(
          absl::StrCat("max_active ", options.max_active, " must be >= 1"));
    }
    return results;
  }
  struct Active {
    size_t index;
    std::unique_ptr<RequestRun> run;
    std::unique_ptr<EngineSequence> seq;
  };
  std::deque<size_t> waiting;
  for (size_t i = 0; i < requests.size(); ++i) waiting.push_back(i);
  std::vector<Active> active;
  const int64_t max_seq_len = engine.max_seq_len();

  // Records a finished request and ends its sequence.
  auto finish = [&](Active& a) {
    results[a.index] = a.run->TakeResult(a.seq->stats());
    a.seq.reset();
  };
  // Applies one step's outcome; true when the request is over.
  auto advance = [&](Active& a, const absl::Status& st) {
    if (absl::IsCancelled(st)) {
      a.run->Finish(FinishReason::kCancelled);
      finish(a);
      return true;
    }
    absl::StatusOr<bool> done =
        st.ok() ? a.run->Advance(a.seq->logits(), a.seq->position(), max_seq_len)
                : absl::StatusOr<bool>(st);
    if (!done.ok()) {
      results[a.index] = done.status();
      a.seq.reset();
      return true;
    }
    if (*done) finish(a);
    return *done;
  };

  std::vector<EngineSequence*> seqs;
  std::vector<int32_t> tokens;
  std::vector<absl::Status> statuses;
  while (!waiting.empty() || !active.empty()) {
    // Admit waiting requests (prefill) while there is room.
    while (!waiting.empty() && active.size() < static_cast<size_t>(options.max_active)) {
      const size_t i = waiting.front();
      waiting.pop_front();
      const GenerateRequest& req = requests[i];
      TextCallback cb;
      if (on_text) cb = [&on_text, i](std::string_view piece) { on_text(i, piece); };
      absl::StatusOr<std::unique_ptr<RequestRun>> run =
          RequestRun::Create(req, tokenizer, engine.config().vocab_size, std::move(cb));
      if (!run.ok()) {
        results[i] = run.status();
        continue;
      }
      absl::StatusOr<std::unique_ptr<EngineSequence>> seq =
          engine.StartSequence((*run)->context(), req.attention, req.cancel);
      if (absl::IsCancelled(seq.status())) {
        (*run)->Finish(FinishReason::kCancelled);
        EngineStats stats;
        stats.prompt_tokens = static_cast<int64_t>((*run)->context().size());
        results[i] = (*run)->TakeResult(stats);
        continue;
      }
      if (!seq.ok()) {
        results[i] = seq.status();
        continue;
      }
      Active a{i, std::move(*run), std::move(*seq)};
      if (!advance(a, absl::OkStatus())) active.push_back(std::move(a));
    }
    if (active.empty()) continue;

    std::vector<Active> still;
    if (options.batched) {
      seqs.clear();
      tokens.clear();
      for (Active& a : active) {
        seqs.push_back(a.seq.get());
        tokens.push_back(a.run->token());
      }
      statuses.assign(active.size(), absl::OkStatus());
      const absl::Status batch = engine.StepBatch(seqs, tokens, statuses);
      for (size_t j = 0; j < active.size(); ++j) {
        if (!advance(active[j], batch.ok() ? statuses[j] : batch)) {
          still.push_back(std::move(active[j]));
        }
      }
    } else {
      for (Active& a : active) {
        const absl::Status st = engine.Step(*a.seq, a.run->token()).status();
        if (!advance(a, st)) still.push_back(std::move(a));
      }
    }
    active = std::move(still);
  }
  return results;
}

}  // namespace kvr::worker
