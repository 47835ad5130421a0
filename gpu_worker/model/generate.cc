#include "gpu_worker/model/generate.h"

#include <algorithm>
#include <vector>

namespace kvr::worker {

absl::StatusOr<std::string> GenerateGreedy(LlamaModel& model, const Tokenizer& tokenizer,
                                           std::string_view prompt, int max_tokens) {
  KVR_ASSIGN_OR_RETURN(std::vector<int32_t> tokens, tokenizer.Encode(prompt, /*add_bos=*/true));
  KVR_ASSIGN_OR_RETURN(std::span<const float> logits, model.Prefill(tokens));
  std::string text;
  int32_t token = tokens.back();
  int64_t pos = static_cast<int64_t>(tokens.size());
  for (int step = 0; step < max_tokens; ++step) {
    const int32_t next =
        static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
    if (next == tokenizer.bos_id() || next == tokenizer.eos_id()) break;
    KVR_ASSIGN_OR_RETURN(std::string piece, tokenizer.Decode(token, next));
    text += piece;
    token = next;
    if (step + 1 == max_tokens || pos >= model.max_seq_len()) break;
    KVR_ASSIGN_OR_RETURN(logits, model.DecodeStep(token, pos));
    ++pos;
  }
  return text;
}

}  // namespace kvr::worker
