#include "gpu_worker/model/model_config.h"

#include <cmath>
#include <numbers>

#include "absl/strings/str_cat.h"

namespace kvr::worker {
namespace {

absl::Status CheckRange(const char* field, int64_t v, int64_t lo, int64_t hi) {
  if (v < lo || v > hi) {
    return absl::InvalidArgumentError(
        absl::StrCat("model config: ", field, " = ", v, " outside [", lo, ", ", hi, "]"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status LlamaConfig::Validate() const {
  KVR_RETURN_IF_ERROR(CheckRange("dim", dim, 1, kMaxWidth));
  KVR_RETURN_IF_ERROR(CheckRange("hidden_dim", hidden_dim, 1, kMaxWidth));
  KVR_RETURN_IF_ERROR(CheckRange("n_layers", n_layers, 1, kMaxLayers));
  KVR_RETURN_IF_ERROR(CheckRange("n_heads", n_heads, 1, kMaxHeads));
  KVR_RETURN_IF_ERROR(CheckRange("n_kv_heads", n_kv_heads, 1, n_heads));
  KVR_RETURN_IF_ERROR(CheckRange("head_dim", head_dim, 2, kMaxWidth));
  KVR_RETURN_IF_ERROR(CheckRange("vocab_size", vocab_size, 1, kMaxVocab));
  KVR_RETURN_IF_ERROR(CheckRange("seq_len", seq_len, 1, kMaxSeqLen));
  if (n_heads % n_kv_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat("model config: n_kv_heads = ", n_kv_heads,
                                                   " does not divide n_heads = ", n_heads));
  }
  if (head_dim % 2 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("model config: head_dim = ", head_dim, " must be even (RoPE pairs)"));
  }
  if (q_dim() > kMaxWidth) {
    return absl::InvalidArgumentError(
        absl::StrCat("model config: n_heads * head_dim = ", q_dim(), " exceeds ", kMaxWidth));
  }
  if (!(rope_theta > 0.0f) || !std::isfinite(rope_theta)) {
    return absl::InvalidArgumentError(
        absl::StrCat("model config: rope_theta = ", rope_theta, " must be finite and > 0"));
  }
  if (!(rms_eps > 0.0f) || !std::isfinite(rms_eps)) {
    return absl::InvalidArgumentError(
        absl::StrCat("model config: rms_eps = ", rms_eps, " must be finite and > 0"));
  }
  if (rope_scaling) {
    const RopeScaling& s = *rope_scaling;
    if (!(s.factor >= 1.0f) || !(s.low_freq_factor > 0.0f) ||
        !(s.high_freq_factor > s.low_freq_factor) || s.original_max_position_embeddings <= 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("model config: rope_scaling needs factor >= 1, 0 < low_freq_factor < "
                       "high_freq_factor, original_max_position_embeddings > 0; got factor=",
                       s.factor, " low_freq_factor=", s.low_freq_factor,
                       " high_freq_factor=", s.high_freq_factor,
                       " original_max_position_embeddings=", s.original_max_position_embeddings));
    }
  }
  return absl::OkStatus();
}

int64_t LlamaConfig::LayerParameterCount() const {
  const int64_t d = dim;
  return 2 * d + d * q_dim() + 2 * d * kv_dim() + q_dim() * d + 3 * d * int64_t{hidden_dim};
}

int64_t LlamaConfig::ParameterCount() const {
  const int64_t emb = int64_t{vocab_size} * dim;
  return emb + (tied_embeddings ? 0 : emb) + int64_t{n_layers} * LayerParameterCount() + dim;
}

std::vector<float> LlamaConfig::RopeInvFreq() const {
  const int half = head_dim / 2;
  std::vector<float> inv(static_cast<size_t>(half));
  for (int k = 0; k < half; ++k) {
    // run.c: freq = 1.0f / powf(10000.0f, head_dim / (float)head_size), head_dim = 2k.
    inv[k] = 1.0f / powf(rope_theta, static_cast<float>(2 * k) / static_cast<float>(head_dim));
  }
  if (rope_scaling) {
    const RopeScaling& s = *rope_scaling;
    const double old_len = s.original_max_position_embeddings;
    const double low_wavelen = old_len / s.low_freq_factor;
    const double high_wavelen = old_len / s.high_freq_factor;
    for (float& f : inv) {
      const double wavelen = 2.0 * std::numbers::pi / f;
      if (wavelen < high_wavelen) continue;  // high frequency: unchanged
      if (wavelen > low_wavelen) {
        f = static_cast<float>(f / s.factor);
        continue;
      }
      const double smooth =
          (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
      f = static_cast<float>((1.0 - smooth) * f / s.factor + smooth * f);
    }
  }
  return inv;
}

std::string LlamaConfig::DebugString() const {
  return absl::StrCat(
      "dim=", dim, " hidden_dim=", hidden_dim, " n_layers=", n_layers, " n_heads=", n_heads,
      " n_kv_heads=", n_kv_heads, " head_dim=", head_dim, " vocab_size=", vocab_size,
      " seq_len=", seq_len, " rope_theta=", rope_theta, " rms_eps=", rms_eps,
      " tied=", tied_embeddings ? "yes" : "no",
      " rope=", rope_style == RopeStyle::kInterleaved ? "interleaved" : "half_split",
      rope_scaling ? absl::StrCat(" rope_scaling.factor=", rope_scaling->factor) : std::string());
}

LlamaConfig Llama3_8BConfig() {
  LlamaConfig c;
  c.dim = 4096;
  c.hidden_dim = 14336;
  c.n_layers = 32;
  c.n_heads = 32;
  c.n_kv_heads = 8;
  c.head_dim = 128;
  c.vocab_size = 128256;
  c.seq_len = 8192;
  c.rope_theta = 500000.0f;
  c.rms_eps = 1e-5f;
  c.tied_embeddings = false;
  c.rope_style = RopeStyle::kHalfSplit;
  return c;
}

LlamaConfig Llama31_8BConfig() {
  LlamaConfig c = Llama3_8BConfig();
  c.seq_len = 131072;
  c.rope_scaling = RopeScaling{};
  return c;
}

}  // namespace kvr::worker
