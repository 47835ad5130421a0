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
  // Generation stops when the text contains one of these; the text is cut
  // before it (and it is never streamed). Non-empty strings.
  std::vector<std::string> stop;
  AttentionOptions attention;
  SamplingParams sampling;
  // Cancelling it (from any thread) stops the generation at the next step
  // (finish kCancelled, the text so far returned) and drops its shards.
  CancelToken cancel;
};

enum class FinishReason : uint8_t { kLength, kStop, kEos, kContextFull, kCancelled };
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
