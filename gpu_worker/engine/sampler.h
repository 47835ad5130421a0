// Token sampling from logits: greedy, temperature, top-k, top-p (nucleus),
// repetition penalty, with a counter-based generator so the same seed gives
// the same tokens on every platform (no std:: distributions) and the draw
// for the token at absolute position p depends only on (seed, p): a request
// resumed at position p on another process (prompt + the tokens generated so
// far prefilled again) samples exactly what the first process would have.
#pragma once

#include <cstdint>
#include <span>
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
  uint64_t seed = 1;

  bool greedy() const { return temperature == 0.0f || top_k == 1; }
};

// InvalidArgument naming the field and its limits: temperature NaN, infinite
// or < 0; top_k < 0; top_p outside (0, 1]; repetition_penalty not finite or <= 0.
absl::Status ValidateSampling(const SamplingParams& params);

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

  const SamplingParams& params() const { return params_; }

 private:
  Sampler(const SamplingParams& params, int vocab_size);

  SamplingParams params_;
  std::vector<float> work_;
  std::vector<int32_t> order_;
  std::vector<uint8_t> seen_;
  std::vector<double> probs_;
};

}  // namespace kvr::worker
