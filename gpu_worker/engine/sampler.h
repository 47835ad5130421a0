// Token sampling from logits: greedy, temperature, top-k, top-p (nucleus),
// repetition penalty, with a counter-based generator so the same seed gives
// the same tokens on every platform (no std:: distributions) and the draw
// for the token at absolute position p depends only on (seed, p): a request
// resumed at position p on another process (prompt + the tokens generated so
// far prefilled again) samples exactly what the first process would have.
#pragma once

#include <cstdint>
#include <span>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace kvr::worker {

struct SamplingParams {
  // 0 = greedy (argmax, lowest id on ties); otherwise logits / temperature.
  float temperature = 0.0f;
  // Keep the k most likely tokens (0 = all; 1 = greedy).
  int top_k = 0;
  // Keep the smallest set of most likely tokens whose mass reaches top_p; in (0, 1].
  float top_p = 1.0f;
  // CTRL-style: the logit of every token already in the context is divided
  // by the penalty when positive, multiplied when negative. 1 = off; > 0.
  float repetition_penalty = 1.0f;
  // OpenAI's additive penalties over the generated tokens only (the tokens
  // of the context from Sampler::set_generated_from on): logit -=
  // presence_penalty * (count > 0) + frequency_penalty * count. [-2, 2]; 0 = off.
  float presence_penalty = 0.0f;
  float frequency_penalty = 0.0f;
  uint64_t seed = 1;

  bool greedy() const { return temperature == 0.0f || top_k == 1; }
};

// InvalidArgument naming the field and its limits: temperature NaN, infinite
// or < 0; top_k < 0; top_p outside (0, 1]; repetition_penalty not finite or
// <= 0; presence_penalty / frequency_penalty not finite or outside [-2, 2].
absl::Status ValidateSampling(const SamplingParams& params);

// Most alternatives a TokenLogprobs may carry (OpenAI's top_logprobs limit).
inline constexpr int kMaxTopLogprobs = 20;

// A token's log-probability under a distribution and the `top` most likely
// tokens of that distribution (most likely first, lower id first on ties).
struct TokenLogprobs {
  int32_t token = 0;
  bool has_logprob = true;  // false for a prompt's first token (nothing predicts it)
  float logprob = 0.0f;
  std::vector<std::pair<int32_t, float>> top;
};

// log_softmax(logits)[token] (computed in double) and the `top_n` (clamped
// to [0, logits.size()]) most likely tokens. `token` in [0, logits.size()).
TokenLogprobs LogprobsOf(std::span<const float> logits, int32_t token, int top_n);

class Sampler {
 public:
  // Validates `params`; `vocab_size` > 0.
  static absl::StatusOr<Sampler> Create(const SamplingParams& params, int vocab_size);

  // Picks the next token from `logits` (vocab_size floats). `context` holds
  // the tokens seen so far, prompt included (for the repetition penalty);
  // its size is the absolute position of the token drawn, which keys the
  // random draw (see PositionUniform). Not thread-safe (scratch buffers).
  int32_t Sample(std::span<const float> logits, std::span<const int32_t> context);

  // The uniform draw in [0, 1) for the token at absolute `position` of a
  // request seeded with `seed`: a pure function of the two (SplitMix64's
  // finalizer over a seed-derived key and the position), so draws do not
  // depend on how many tokens this process sampled before.
  static double PositionUniform(uint64_t seed, uint64_t position);

  // Context positions from `position` on are generated tokens: the only ones
  // presence_penalty / frequency_penalty count (default 0: all of them).
  void set_generated_from(size_t position) { generated_from_ = position; }

  // LogprobsOf the logits the last Sample drew from (after the penalties,
  // before temperature / top_k / top_p). Valid after a Sample only.
  TokenLogprobs LastLogprobs(int32_t token, int top_n) const;

  const SamplingParams& params() const { return params_; }

 private:
  Sampler(const SamplingParams& params, int vocab_size);

  SamplingParams params_;
  size_t generated_from_ = 0;
  size_t last_v_ = 0;  // logits in work_ after the last Sample
  std::vector<float> work_;
  std::vector<int32_t> order_;
  std::vector<uint8_t> seen_;
  std::vector<int32_t> counts_;  // per token: generated occurrences (penalties)
  std::vector<double> probs_;
};

}  // namespace kvr::worker
