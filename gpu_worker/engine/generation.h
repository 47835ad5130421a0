// Text generation on a RetrievalEngine: prompt -> tokens -> prefill -> a
// sampled decode loop with stop strings and a max token count, streaming the
// text as it is produced. Generate runs one request on the engine's own
// sequence; GenerateBatch runs many at once, each on its own EngineSequence,
// with one batched decode step over all active sequences per iteration (or
// round-robin single steps), and gives every request the same tokens it
// would get alone.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "gpu_worker/engine/cancel_token.h"
#include "gpu_worker/engine/retrieval_engine.h"
#include "gpu_worker/engine/sampler.h"
#include "gpu_worker/model/tokenizer.h"

namespace kvr::worker {

struct GenerateRequest {
  std::string prompt;  // encoded with BOS
  int max_tokens = 128;  // generated tokens, >= 0
  // Resuming: tokens an earlier run of this same request already generated
  // (and streamed). They are decoded after the prompt's prefill as the
  // first run decoded them, count against max_tokens and appear in the
  // result, but their text is not passed to on_text again (see
  // RequestLoop::Resume).
  std::vector<int32_t> resume_tokens;
  // Generation stops when the text contains one of these; the text is cut
  // before it (and it is never streamed). Non-empty strings.
  std::vector<std::string> stop;
  AttentionOptions attention;
  SamplingParams sampling;
  // Log-probabilities of the generated tokens with this many alternatives
  // ([0, kMaxTopLogprobs]); -1 = none (RequestLoop::SetLogprobs).
  int logprobs = -1;
  // Cancelling it (from any thread) stops the generation at the next step
  // (finish kCancelled, the text so far returned) and drops its shards.
  CancelToken cancel;
};

enum class FinishReason : uint8_t { kLength, kStop, kEos, kContextFull, kCancelled };
std::string_view FinishReasonName(FinishReason reason);

struct GenerateResult {
  std::string text;             // generated text only (stop string excluded)
  std::vector<int32_t> tokens;  // generated token ids
  // With GenerateRequest::logprobs >= 0: one per entry of `tokens`.
  std::vector<TokenLogprobs> logprobs;
  int64_t prompt_tokens = 0;
  FinishReason finish = FinishReason::kLength;
  EngineStats stats;
};

// Receives the text in order as it becomes final. A piece never ends inside
// a UTF-8 sequence (an incomplete trailing sequence is held back until its
// last byte arrives; at the end whatever is left is flushed as is, so
// malformed output still comes out); concatenated, the pieces equal
// GenerateResult::text.
using TextCallback = std::function<void(std::string_view)>;

// Length of the longest prefix of `text` that does not end inside a UTF-8
// sequence: text.size(), less the bytes of a trailing lead byte and its
// continuation bytes when fewer than the lead announces have arrived.
// Malformed bytes (stray continuation bytes, invalid leads) are not held.
size_t Utf8CompletePrefix(std::string_view text);

// One request's decode loop, shared by Generate, GenerateBatch and the
// worker's GenerationScheduler: samples the next token from each prefill /
// step's logits, decodes its text, holds back any suffix that could start a
// stop string (cut before it when one occurs) or that ends inside a UTF-8
// sequence, and decides when to finish. Streaming goes through TakeNew.
// Not thread-safe (one step at a time, as the sequence it drives).
class RequestLoop {
 public:
  // `prompt` (as prefilled; non-empty) seeds the sampler's context and the
  // first Decode; `stop` strings must be non-empty (see ValidateLoopFields).
  // `tokenizer` must outlive the loop.
  RequestLoop(std::vector<int32_t> prompt, int max_tokens, std::vector<std::string> stop,
              Sampler sampler, const Tokenizer& tokenizer);

  // InvalidArgument naming the field: max_tokens < 0, an empty stop string.
  static absl::Status ValidateLoopFields(int max_tokens, const std::vector<std::string>& stop);

  // Resuming a request another run already began: the next
  // tokens.size() calls of Advance take these tokens (what that run
  // generated and streamed, in order) instead of sampling, and process them
  // exactly as Advance processed them there (context, generated tokens,
  // text with its stop-string and UTF-8 hold-back, finish checks), but
  // mark them and the text they made final as already taken, so TakeNew
  // returns only what comes after them: the first text it returns is what
  // the first run would have streamed next. The caller prefills the prompt
  // and decode-steps token() as usual, so the sequence goes through the
  // same prefill and steps as the first run and, with per-position sampling
  // (Sampler), continues token-identically (prefilling prompt + tokens at
  // once would not: retrieval attention indexes a prefill differently from
  // appended steps). Call before the first Advance. InvalidArgument
  // (naming resume_tokens and the limit): more than max_tokens tokens, or
  // BOS / EOS among them.
  absl::Status Resume(std::vector<int32_t> tokens);
  // Resume tokens consumed by Advance so far.
  int replayed() const { return static_cast<int>(replay_next_); }

  // Takes the logits of the last prefill / step (the sequence now holds
  // `position` tokens); returns true when the generation is over (finish()
  // says why). Tokenizer errors pass through.
  absl::StatusOr<bool> Advance(std::span<const float> logits, int64_t position,
                               int64_t max_seq_len);
  // Ends the loop with `reason` (flushing every held-back byte unless the
  // reason is kStop, whose cut text is already final); returns true.
  bool Finish(FinishReason reason);

  // Reports each sampled token's log-probability with the `top_n` most
  // likely alternatives (Sampler::LastLogprobs); -1 = off (the default).
  // Call before the first Advance. InvalidArgument naming logprobs outside
  // [-1, kMaxTopLogprobs].
  absl::Status SetLogprobs(int top_n);

  // Moves the token ids sampled and the text made final since the last call
  // into *ids / *text (appended), and, when logprobs are on and `logprobs`
  // is not null, one TokenLogprobs per id into *logprobs. False when there
  // is nothing new.
  bool TakeNew(std::vector<int32_t>* ids, std::string* text,
               std::vector<TokenLogprobs>* logprobs = nullptr);

  // The token the next decode step runs.
  int32_t token() const { return token_; }
  const std::vector<int32_t>& context() const { return context_; }
  int64_t prompt_tokens() const { return prompt_tokens_; }
  int generated() const { return static_cast<int>(tokens_.size()); }
  FinishReason finish() const { return finish_; }
  // Generated text so far (cut before a stop string) and token ids.
  const std::string& text() const { return text_; }
  const std::vector<int32_t>& tokens() const { return tokens_; }
  std::string TakeText() { return std::move(text_); }
  std::vector<int32_t> TakeTokens() { return std::move(tokens_); }
  std::vector<TokenLogprobs> TakeLogprobs() { return std::move(logprobs_out_); }

 private:
  // Advance, taking the next resume token instead of sampling while any is
  // left.
  absl::StatusOr<bool> AdvanceWith(std::span<const float> logits, int64_t position,
                                   int64_t max_seq_len);
  // Appends `piece`; true when a stop string now occurs (the text is cut
  // before it).
  bool AddText(std::string_view piece);
  // Makes text_[0, end) final (less an incomplete UTF-8 tail unless `all`).
  void Emit(size_t end, bool all);

  const Tokenizer& tokenizer_;
  Sampler sampler_;
  const int max_tokens_;
  const std::vector<std::string> stop_;
  size_t longest_stop_ = 0;
  std::vector<int32_t> context_;
  int64_t prompt_tokens_ = 0;
  int32_t token_ = 0;
  FinishReason finish_ = FinishReason::kLength;
  std::string text_;
  std::vector<int32_t> tokens_;
  size_t emitted_ = 0;     // text_[0, emitted_) is final
  size_t taken_text_ = 0;  // text_[0, taken_text_) went out through TakeNew
  size_t taken_ids_ = 0;   // tokens_[0, taken_ids_) went out through TakeNew
  int logprobs_ = -1;                         // SetLogprobs
  std::vector<TokenLogprobs> logprobs_out_;  // one per tokens_ entry when logprobs_ >= 0
  std::vector<int32_t> replay_;  // Resume's tokens
  size_t replay_next_ = 0;       // replay_[0, replay_next_) consumed
};

// The log-probability of each token of `prompt` given the tokens before it
// under FULL attention (whatever mode the request generates with), with the
// `top_n` most likely alternatives ([0, kMaxTopLogprobs]); entry 0 has no
// logprob (has_logprob false). Runs on its own full-attention sequence of
// `engine`: prompt[0] is prefilled, then each next prompt token is one
// decode step (full-attention decode steps attend to every cached key, so
// each distribution equals a full-attention prefill's at that position to
// float rounding). That sequence is ended before return. InvalidArgument
// for an empty prompt or top_n out of range; engine errors (Cancelled via
// `cancel`, OutOfRange past the context) pass through.
absl::StatusOr<std::vector<TokenLogprobs>> PromptLogprobs(RetrievalEngine& engine,
                                                          std::span<const int32_t> prompt,
                                                          int top_n,
                                                          const CancelToken& cancel = CancelToken());

// InvalidArgument for bad request fields (naming the field), engine and
// tokenizer errors pass through. The engine's sequence stays active after
// return (EndSequence frees the node's copy; the next Generate does too).
absl::StatusOr<GenerateResult> Generate(RetrievalEngine& engine, const Tokenizer& tokenizer,
                                        const GenerateRequest& request,
                                        const TextCallback& on_text = nullptr);

struct BatchOptions {
  // Sequences decoding at once; more requests wait and start (prefill) as
  // others finish. >= 1.
  int max_active = 8;
  // true: one RetrievalEngine::StepBatch over the active sequences per
  // iteration; false: one Step per active sequence, round-robin.
  bool batched = true;
};

// Receives request `index`'s text as it becomes final (see TextCallback).
using BatchTextCallback = std::function<void(size_t index, std::string_view)>;

// Runs `requests` concurrently on `engine`, each on its own sequence, which
// is ended (its shards dropped) when the request finishes. Returns one
// result per request, in order: InvalidArgument for its bad fields, engine
// errors of its sequence; the others go on. `on_text` may be null.
std::vector<absl::StatusOr<GenerateResult>> GenerateBatch(
    RetrievalEngine& engine, const Tokenizer& tokenizer,
    std::span<const GenerateRequest> requests, const BatchOptions& options = {},
    const BatchTextCallback& on_text = nullptr);

}  // namespace kvr::worker
