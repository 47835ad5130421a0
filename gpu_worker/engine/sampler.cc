#include "gpu_worker/engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace kvr::worker {

absl::Status ValidateSampling(const SamplingParams& p) {
  if (!std::isfinite(p.temperature) || p.temperature < 0.0f) {
    return absl::InvalidArgumentError(
        absl::StrCat("temperature ", p.temperature, " must be finite and >= 0"));
  }
  if (p.top_k < 0) {
    return absl::InvalidArgumentError(absl::StrCat("top_k ", p.top_k, " must be >= 0"));
  }
  if (!(p.top_p > 0.0f && p.top_p <= 1.0f)) {
    return absl::InvalidArgumentError(absl::StrCat("top_p ", p.top_p, " outside (0, 1]"));
  }
  if (!std::isfinite(p.repetition_penalty) || !(p.repetition_penalty > 0.0f)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "repetition_penalty ", p.repetition_penalty, " must be finite and > 0"));
  }
  const std::pair<const char*, float> additive[] = {{"presence_penalty", p.presence_penalty},
                                                    {"frequency_penalty", p.frequency_penalty}};
  for (const auto& [name, value] : additive) {
    if (!(value >= -2.0f && value <= 2.0f)) {  // NaN fails too
      return absl::InvalidArgumentError(
          absl::StrCat(name, " ", value, " outside [-2, 2]"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<Sampler> Sampler::Create(const SamplingParams& params, int vocab_size) {
  KVR_RETURN_IF_ERROR(ValidateSampling(params));
  if (vocab_size <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("vocab_size ", vocab_size, " must be > 0"));
  }
  return Sampler(params, vocab_size);
}

Sampler::Sampler(const SamplingParams& params, int vocab_size)
    : params_(params),
      work_(static_cast<size_t>(vocab_size)),
      order_(static_cast<size_t>(vocab_size)),
      seen_(static_cast<size_t>(vocab_size)) {
  if (params.presence_penalty != 0.0f || params.frequency_penalty != 0.0f) {
    counts_.resize(static_cast<size_t>(vocab_size));
  }
}

TokenLogprobs LogprobsOf(std::span<const float> logits, int32_t token, int top_n) {
  TokenLogprobs out;
  out.token = token;
  const size_t v = logits.size();
  KVR_CHECK(v > 0 && token >= 0 && static_cast<size_t>(token) < v);
  const float mx = *std::max_element(logits.begin(), logits.end());
  double total = 0.0;
  for (float x : logits) total += std::exp(static_cast<double>(x) - mx);
  const double lse = static_cast<double>(mx) + std::log(total);
  out.logprob = static_cast<float>(static_cast<double>(logits[static_cast<size_t>(token)]) - lse);
  const size_t n = std::min(v, static_cast<size_t>(std::max(top_n, 0)));
  if (n == 0) return out;
  // The n best by a bounded insertion (n <= kMaxTopLogprobs in practice).
  std::vector<int32_t> best;
  best.reserve(n + 1);
  auto better = [&](int32_t a, int32_t b) {
    return logits[static_cast<size_t>(a)] > logits[static_cast<size_t>(b)] ||
           (logits[static_cast<size_t>(a)] == logits[static_cast<size_t>(b)] && a < b);
  };
  for (size_t i = 0; i < v; ++i) {
    const auto id = static_cast<int32_t>(i);
    if (best.size() == n && !better(id, best.back())) continue;
    best.insert(std::upper_bound(best.begin(), best.end(), id, better), id);
    if (best.size() > n) best.pop_back();
  }
  out.top.reserve(n);
  for (int32_t id : best) {
    out.top.emplace_back(
        id, static_cast<float>(static_cast<double>(logits[static_cast<size_t>(id)]) - lse));
  }
  return out;
}

TokenLogprobs Sampler::LastLogprobs(int32_t token, int top_n) const {
  KVR_CHECK(last_v_ > 0);
  return LogprobsOf(std::span<const float>(work_.data(), last_v_), token, top_n);
}

namespace {

// SplitMix64's output function (a bijection of 64-bit words).
uint64_t Mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

}  // namespace

double Sampler::PositionUniform(uint64_t seed, uint64_t position) {
  constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ull;
  // The key is mixed first so that nearby seeds give unrelated streams (a
  // plain seed + position counter would make seed s at p+1 equal seed s+1 at p).
  const uint64_t key = Mix64(seed ^ 0xD1B54A32D192ED03ull);
  const uint64_t z = Mix64(key + (position + 1) * kGolden);  // wraps: defined for unsigned
  return static_cast<double>(z >> 11) * 0x1.0p-53;
}

int32_t Sampler::Sample(std::span<const float> logits, std::span<const int32_t> context) {
  const size_t v = std::min(logits.size(), work_.size());
  KVR_CHECK(v > 0);
  std::copy_n(logits.begin(), v, work_.begin());
  if (params_.repetition_penalty != 1.0f) {
    std::fill(seen_.begin(), seen_.end(), 0);
    for (int32_t t : context) {
      if (t < 0 || static_cast<size_t>(t) >= v || seen_[t]) continue;
      seen_[t] = 1;
      float& x = work_[t];
      x = x > 0.0f ? x / params_.repetition_penalty : x * params_.repetition_penalty;
    }
  }
  if (!counts_.empty()) {
    std::fill(counts_.begin(), counts_.end(), 0);
    for (size_t i = std::min(generated_from_, context.size()); i < context.size(); ++i) {
      const int32_t t = context[i];
      if (t >= 0 && static_cast<size_t>(t) < v) ++counts_[static_cast<size_t>(t)];
    }
    for (size_t t = 0; t < v; ++t) {
      if (counts_[t] == 0) continue;
      work_[t] -= params_.presence_penalty +
                  params_.frequency_penalty * static_cast<float>(counts_[t]);
    }
  }
  last_v_ = v;
  if (params_.greedy()) {
    return static_cast<int32_t>(std::max_element(work_.begin(), work_.begin() + v) -
                                work_.begin());
  }
  // Candidates sorted by logit (descending; lower id first on ties), cut to top_k.
  std::iota(order_.begin(), order_.begin() + v, 0);
  const size_t keep = params_.top_k > 0 ? std::min(v, static_cast<size_t>(params_.top_k)) : v;
  auto better = [&](int32_t a, int32_t b) {
    return work_[a] > work_[b] || (work_[a] == work_[b] && a < b);
  };
  std::partial_sort(order_.begin(), order_.begin() + keep, order_.begin() + v, better);
  // Softmax over the kept candidates at `temperature`, in double.
  const double inv_t = 1.0 / params_.temperature;
  const double mx = work_[order_[0]];
  double total = 0.0;
  std::vector<double>& probs = probs_;
  probs.resize(keep);
  for (size_t i = 0; i < keep; ++i) {
    probs[i] = std::exp((work_[order_[i]] - mx) * inv_t);
    total += probs[i];
  }
  // Nucleus: the shortest prefix whose mass reaches top_p.
  size_t n = keep;
  if (params_.top_p < 1.0f) {
    double mass = 0.0;
    for (size_t i = 0; i < keep; ++i) {
      mass += probs[i] / total;
      if (mass >= params_.top_p) {
        n = i + 1;
        break;
      }
    }
  }
  double kept = 0.0;
  for (size_t i = 0; i < n; ++i) kept += probs[i];
  double r = PositionUniform(params_.seed, context.size()) * kept;
  for (size_t i = 0; i < n; ++i) {
    r -= probs[i];
    if (r < 0.0) return order_[i];
  }
  return order_[n - 1];
}

}  // namespace kvr::worker
