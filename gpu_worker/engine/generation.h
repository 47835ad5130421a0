// Text generation on a RetrievalEngine: prompt -> tokens -> prefill -> a
// sampled decode loop with stop strings and a max token count, streaming the
// text as it is produced.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "gpu_worker/engine/retrieval_engine.h"
#include "gpu_worker/engine/sampler.h"
#include "gpu_worker/model/tokenizer.h"

namespace kvr::worker {

struct GenerateRequest {
  std::string prompt;  // encoded with BOS
  int max_tokens = 128;  // generated tokens, >= 0
  // Generation stops when the text contains one of these; the text is cut
  // before it (and it is never streamed). Non-empty strings.
  std::vector<std::string> stop;
  AttentionOptions attention;
  SamplingParams sampling;
};

enum class FinishReason : uint8_t { kLength, kStop, kEos, kContextFull };
std::string_view FinishReasonName(FinishReason reason);

struct GenerateResult {
  std::string text;             // generated text only (stop string excluded)
  std::vector<int32_t> tokens;  // generated token ids
  int64_t prompt_tokens = 0;
  FinishReason finish = FinishReason::kLength;
  EngineStats stats;
};

// Receives the text in order as it becomes final (pieces may split UTF-8
// sequences; concatenated they equal GenerateResult::text).
using TextCallback = std::function<void(std::string_view)>;

// InvalidArgument for bad request fields (naming the field), engine and
// tokenizer errors pass through. The engine's sequence stays active after
// return (EndSequence frees the node's copy; the next Generate does too).
absl::StatusOr<GenerateResult> Generate(RetrievalEngine& engine, const Tokenizer& tokenizer,
                                        const GenerateRequest& request,
                                        const TextCallback& on_text = nullptr);

}  // namespace kvr::worker
