// Greedy (temperature 0, argmax) generation on the full-attention model, as
// llama2.c's run.c does it: the prompt is encoded with BOS, the model is run
// over it, then each step appends the argmax token (lowest id on ties) until
// max_tokens tokens, BOS or EOS, or the cache is full.
#pragma once

#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "gpu_worker/model/llama_model.h"
#include "gpu_worker/model/tokenizer.h"

namespace kvr::worker {

// The generated text only (not the prompt), pieces decoded with
// Tokenizer::Decode(previous, next).
absl::StatusOr<std::string> GenerateGreedy(LlamaModel& model, const Tokenizer& tokenizer,
                                           std::string_view prompt, int max_tokens);

}  // namespace kvr::worker
