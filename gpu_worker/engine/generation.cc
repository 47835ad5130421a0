#include "gpu_worker/engine/generation.h"

#include <algorithm>
#include <deque>
#include <utility>

#include "absl/strings/str_cat.h"

namespace kvr::worker {

size_t Utf8CompletePrefix(std::string_view text) {
  // Walk back over at most 3 continuation bytes (10xxxxxx) to a lead byte.
  const size_t n = text.size();
  for (size_t back = 1; back <= 4 && back <= n; ++back) {
    const auto c = static_cast<unsigned char>(text[n - back]);
    if ((c & 0xC0) == 0x80) continue;  // continuation byte
    size_t need = 0;
    if ((c & 0xE0) == 0xC0) {
      need = 2;
    } else if ((c & 0xF0) == 0xE0) {
      need = 3;
    } else if ((c & 0xF8) == 0xF0) {
      need = 4;
    } else {
      return n;  // ASCII or an invalid lead: nothing to wait for
    }
    return back < need ? n - back : n;
  }
  return n;  // only continuation bytes: malformed, not held
}

absl::Status RequestLoop::ValidateLoopFields(int max_tokens, const std::vector<std::string>& stop) {
  if (max_tokens < 0) {
    return absl::InvalidArgumentError(absl::StrCat("max_tokens ", max_tokens, " must be >= 0"));
  }
  for (size_t i = 0; i < stop.size(); ++i) {
    if (stop[i].empty()) return absl::InvalidArgumentError(absl::StrCat("stop[", i, "] is empty"));
  }
  return absl::OkStatus();
}

RequestLoop::RequestLoop(std::vector<int32_t> prompt, int max_tokens,
                         std::vector<std::string> stop, Sampler sampler,
                         const Tokenizer& tokenizer)
    : tokenizer_(tokenizer),
      sampler_(std::move(sampler)),
      max_tokens_(max_tokens),
      stop_(std::move(stop)),
      context_(std::move(prompt)) {
  for (const std::string& s : stop_) longest_stop_ = std::max(longest_stop_, s.size());
  prompt_tokens_ = static_cast<int64_t>(context_.size());
  sampler_.set_generated_from(context_.size());
  token_ = context_.empty() ? tokenizer_.bos_id() : context_.back();
}

absl::StatusOr<bool> RequestLoop::Advance(std::span<const float> logits, int64_t position,
                                          int64_t max_seq_len) {
  if (replay_next_ == replay_.size()) return AdvanceWith(logits, position, max_seq_len);
  absl::StatusOr<bool> done = AdvanceWith(logits, position, max_seq_len);
  // The first run streamed all of this already.
  taken_ids_ = tokens_.size();
  taken_text_ = emitted_;
  return done;
}

absl::StatusOr<bool> RequestLoop::AdvanceWith(std::span<const float> logits, int64_t position,
                                              int64_t max_seq_len) {
  if (generated() >= max_tokens_) return Finish(FinishReason::kLength);
  const bool replayed = replay_next_ < replay_.size();
  const int32_t next = replayed ? replay_[replay_next_++] : sampler_.Sample(logits, context_);
  if (tokenizer_.IsStopToken(next)) {
    return Finish(FinishReason::kEos);
  }
  KVR_ASSIGN_OR_RETURN(std::string piece, tokenizer_.Decode(token_, next));
  if (logprobs_ >= 0) {
    // Replayed tokens were streamed (with their logprobs) by the first run:
    // a placeholder keeps logprobs_out_ aligned with tokens_.
    logprobs_out_.push_back(replayed ? TokenLogprobs{next, false, 0.0f, {}}
                                     : sampler_.LastLogprobs(next, logprobs_));
  }
  tokens_.push_back(next);
  context_.push_back(next);
  token_ = next;
  if (AddText(piece)) return Finish(FinishReason::kStop);
  if (generated() == max_tokens_) return Finish(FinishReason::kLength);
  if (position >= max_seq_len) return Finish(FinishReason::kContextFull);
  return false;
}

absl::Status RequestLoop::Resume(std::vector<int32_t> tokens) {
  if (tokens.size() > static_cast<size_t>(std::max(0, max_tokens_))) {
    return absl::InvalidArgumentError(absl::StrCat("resume_tokens: ", tokens.size(),
                                                   " tokens, more than max_tokens ", max_tokens_));
  }
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (tokenizer_.IsStopToken(tokens[i])) {
      return absl::InvalidArgumentError(absl::StrCat(
          "resume_tokens[", i, "] = ", tokens[i], " is BOS or EOS (generation would have ended)"));
    }
  }
  replay_ = std::move(tokens);
  replay_next_ = 0;
  return absl::OkStatus();
}

bool RequestLoop::Finish(FinishReason reason) {
  finish_ = reason;
  Emit(text_.size(), /*all=*/true);
  return true;
}

absl::Status RequestLoop::SetLogprobs(int top_n) {
  if (top_n < -1 || top_n > kMaxTopLogprobs) {
    return absl::InvalidArgumentError(
        absl::StrCat("logprobs: ", top_n, " outside [0, ", kMaxTopLogprobs, "]"));
  }
  logprobs_ = top_n;
  return absl::OkStatus();
}

bool RequestLoop::TakeNew(std::vector<int32_t>* ids, std::string* text,
                          std::vector<TokenLogprobs>* logprobs) {
  const bool any = taken_ids_ < tokens_.size() || taken_text_ < emitted_;
  if (logprobs != nullptr && logprobs_ >= 0) {
    logprobs->insert(logprobs->end(),
                     logprobs_out_.begin() + static_cast<std::ptrdiff_t>(taken_ids_),
                     logprobs_out_.end());
  }
  ids->insert(ids->end(), tokens_.begin() + static_cast<std::ptrdiff_t>(taken_ids_),
              tokens_.end());
  taken_ids_ = tokens_.size();
  text->append(text_, taken_text_, emitted_ - taken_text_);
  taken_text_ = emitted_;
  return any;
}

bool RequestLoop::AddText(std::string_view piece) {
  text_.append(piece);
  const size_t from = emitted_ > longest_stop_ ? emitted_ - longest_stop_ : 0;
  size_t cut = std::string::npos;
  for (const std::string& s : stop_) cut = std::min(cut, text_.find(s, from));
  if (cut != std::string::npos) {
    text_.resize(cut);
    Emit(text_.size(), /*all=*/true);
    return true;
  }
  // Hold back the longest suffix that is a proper prefix of a stop string.
  size_t hold = 0;
  for (const std::string& s : stop_) {
    for (size_t k = std::min(s.size() - 1, text_.size()); k > hold; --k) {
      if (std::string_view(text_).substr(text_.size() - k) == std::string_view(s).substr(0, k)) {
        hold = k;
        break;
      }
    }
  }
  Emit(text_.size() - hold, /*all=*/false);
  return false;
}

void RequestLoop::Emit(size_t end, bool all) {
  if (!all) end = Utf8CompletePrefix(std::string_view(text_).substr(0, end));
  if (end > emitted_) emitted_ = end;
}

namespace {

// Validates a GenerateRequest's fields and encodes its prompt into a loop.
absl::StatusOr<std::unique_ptr<RequestLoop>> MakeLoop(const GenerateRequest& request,
                                                      const Tokenizer& tokenizer, int vocab_size) {
  KVR_RETURN_IF_ERROR(RequestLoop::ValidateLoopFields(request.max_tokens, request.stop));
  KVR_ASSIGN_OR_RETURN(Sampler sampler, Sampler::Create(request.sampling, vocab_size));
  KVR_ASSIGN_OR_RETURN(std::vector<int32_t> context,
                       tokenizer.Encode(request.prompt, /*add_bos=*/true));
  for (size_t i = 0; i < request.resume_tokens.size(); ++i) {
    const int32_t t = request.resume_tokens[i];
    if (t < 0 || t >= vocab_size) {
      return absl::InvalidArgumentError(
          absl::StrCat("resume_tokens[", i, "] = ", t, " outside [0, ", vocab_size, ")"));
    }
  }
  auto loop = std::make_unique<RequestLoop>(std::move(context), request.max_tokens, request.stop,
                                            std::move(sampler), tokenizer);
  KVR_RETURN_IF_ERROR(loop->Resume(request.resume_tokens));
  KVR_RETURN_IF_ERROR(loop->SetLogprobs(request.logprobs));
  return loop;
}

// Passes the text `loop` made final to `on_text` (when set).
void Stream(RequestLoop& loop, const TextCallback& on_text, std::vector<int32_t>* ids_scratch,
            std::string* text_scratch) {
  ids_scratch->clear();
  text_scratch->clear();
  loop.TakeNew(ids_scratch, text_scratch);
  if (on_text && !text_scratch->empty()) on_text(*text_scratch);
}

GenerateResult TakeResult(RequestLoop& loop, const EngineStats& stats) {
  GenerateResult r;
  r.prompt_tokens = loop.prompt_tokens();
  r.finish = loop.finish();
  r.text = loop.TakeText();
  r.tokens = loop.TakeTokens();
  r.logprobs = loop.TakeLogprobs();
  r.stats = stats;
  return r;
}

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

absl::StatusOr<std::vector<TokenLogprobs>> PromptLogprobs(RetrievalEngine& engine,
                                                          std::span<const int32_t> prompt,
                                                          int top_n, const CancelToken& cancel) {
  if (prompt.empty()) return absl::InvalidArgumentError("prompt: empty");
  if (top_n < 0 || top_n > kMaxTopLogprobs) {
    return absl::InvalidArgumentError(
        absl::StrCat("logprobs: ", top_n, " outside [0, ", kMaxTopLogprobs, "]"));
  }
  AttentionOptions full;
  full.mode = AttentionMode::kFull;
  KVR_ASSIGN_OR_RETURN(std::unique_ptr<EngineSequence> seq,
                       engine.StartSequence(prompt.first(1), full, cancel));
  std::vector<TokenLogprobs> out;
  out.reserve(prompt.size());
  out.push_back(TokenLogprobs{prompt[0], false, 0.0f, {}});
  const auto vocab = static_cast<size_t>(engine.config().vocab_size);
  for (size_t i = 1; i < prompt.size(); ++i) {
    if (prompt[i] < 0 || static_cast<size_t>(prompt[i]) >= vocab) {
      return absl::InvalidArgumentError(
          absl::StrCat("tokens[", i, "]: ", prompt[i], " outside [0, ", vocab, ")"));
    }
    out.push_back(LogprobsOf(seq->logits(), prompt[i], top_n));
    if (i + 1 < prompt.size()) KVR_RETURN_IF_ERROR(engine.Step(*seq, prompt[i]).status());
  }
  KVR_RETURN_IF_ERROR(engine.EndSequence(*seq));
  return out;
}

absl::StatusOr<GenerateResult> Generate(RetrievalEngine& engine, const Tokenizer& tokenizer,
                                        const GenerateRequest& request,
                                        const TextCallback& on_text) {
  KVR_ASSIGN_OR_RETURN(std::unique_ptr<RequestLoop> run,
                       MakeLoop(request, tokenizer, engine.config().vocab_size));
  std::vector<int32_t> ids;
  std::string text;
  absl::StatusOr<std::span<const float>> logits =
      engine.Prefill(run->context(), request.attention, request.cancel);
  for (;;) {
    if (absl::IsCancelled(logits.status())) {
      run->Finish(FinishReason::kCancelled);
      break;
    }
    KVR_RETURN_IF_ERROR(logits.status());
    absl::StatusOr<bool> done = run->Advance(*logits, engine.position(), engine.max_seq_len());
    if (!done.ok()) return done.status();
    Stream(*run, on_text, &ids, &text);
    if (*done) break;
    logits = engine.DecodeStep(run->token());
  }
  Stream(*run, on_text, &ids, &text);
  return TakeResult(*run, engine.stats());
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
    std::unique_ptr<RequestLoop> run;
    std::unique_ptr<EngineSequence> seq;
    TextCallback on_text;
  };
  std::deque<size_t> waiting;
  for (size_t i = 0; i < requests.size(); ++i) waiting.push_back(i);
  std::vector<Active> active;
  const int64_t max_seq_len = engine.max_seq_len();

  std::vector<int32_t> ids_scratch;
  std::string text_scratch;
  // Records a finished request and ends its sequence.
  auto finish = [&](Active& a) {
    Stream(*a.run, a.on_text, &ids_scratch, &text_scratch);
    results[a.index] = TakeResult(*a.run, a.seq->stats());
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
    if (*done) {
      finish(a);
    } else {
      Stream(*a.run, a.on_text, &ids_scratch, &text_scratch);
    }
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
      absl::StatusOr<std::unique_ptr<RequestLoop>> run =
          MakeLoop(req, tokenizer, engine.config().vocab_size);
      if (!run.ok()) {
        results[i] = run.status();
        continue;
      }
      absl::StatusOr<std::unique_ptr<EngineSequence>> seq =
          engine.StartSequence((*run)->context(), req.attention, req.cancel);
      if (absl::IsCancelled(seq.status())) {
        (*run)->Finish(FinishReason::kCancelled);
        EngineStats stats;
        stats.prompt_tokens = (*run)->prompt_tokens();
        results[i] = TakeResult(**run, stats);
        continue;
      }
      if (!seq.ok()) {
        results[i] = seq.status();
        continue;
      }
      Active a{i, std::move(*run), std::move(*seq), std::move(cb)};
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
