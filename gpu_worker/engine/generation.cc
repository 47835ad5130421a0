#include "gpu_worker/engine/generation.h"

#include <algorithm>

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
  }
  return "unknown";
}

absl::StatusOr<GenerateResult> Generate(RetrievalEngine& engine, const Tokenizer& tokenizer,
                                        const GenerateRequest& request,
                                        const TextCallback& on_text) {
  if (request.max_tokens < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_tokens ", request.max_tokens, " must be >= 0"));
  }
  for (size_t i = 0; i < request.stop.size(); ++i) {
    if (request.stop[i].empty()) {
      return absl::InvalidArgumentError(absl::StrCat("stop[", i, "] is empty"));
    }
  }
  KVR_ASSIGN_OR_RETURN(Sampler sampler,
                       Sampler::Create(request.sampling, engine.config().vocab_size));
  KVR_ASSIGN_OR_RETURN(std::vector<int32_t> context,
                       tokenizer.Encode(request.prompt, /*add_bos=*/true));
  KVR_ASSIGN_OR_RETURN(std::span<const float> logits, engine.Prefill(context, request.attention));

  GenerateResult result;
  result.prompt_tokens = static_cast<int64_t>(context.size());
  StopMatcher matcher(request.stop, on_text);
  int32_t token = context.back();
  for (int step = 0; step < request.max_tokens; ++step) {
    const int32_t next = sampler.Sample(logits, context);
    if (next == tokenizer.bos_id() || next == tokenizer.eos_id()) {
      result.finish = FinishReason::kEos;
      break;
    }
    KVR_ASSIGN_OR_RETURN(std::string piece, tokenizer.Decode(token, next));
    result.tokens.push_back(next);
    context.push_back(next);
    token = next;
    if (matcher.Add(piece, &result.text)) {
      result.finish = FinishReason::kStop;
      break;
    }
    if (step + 1 == request.max_tokens) break;
    if (engine.position() >= engine.max_seq_len()) {
      result.finish = FinishReason::kContextFull;
      break;
    }
    KVR_ASSIGN_OR_RETURN(logits, engine.DecodeStep(token));
  }
  if (result.finish != FinishReason::kStop) matcher.Flush(result.text);
  result.stats = engine.stats();
  return result;
}

}  // namespace kvr::worker
