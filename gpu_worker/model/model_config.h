// Shape and hyper-parameters of a Llama-family decoder (llama2.c models,
// Llama 2/3/3.1). Plain data; Validate() says whether a config is usable.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "gpu_worker/backend/backend.h"

namespace kvr::worker {

// Llama 3.1 "llama3" RoPE frequency scaling (Hugging Face rope_scaling with
// rope_type "llama3"): long wavelengths are divided by `factor`, short ones
// kept, the band between interpolated smoothly.
struct RopeScaling {
  float factor = 8.0f;
  float low_freq_factor = 1.0f;
  float high_freq_factor = 4.0f;
  int original_max_position_embeddings = 8192;
};

struct LlamaConfig {
  int dim = 0;         // model (residual stream) width
  int hidden_dim = 0;  // FFN inner width
  int n_layers = 0;
  int n_heads = 0;     // query heads
  int n_kv_heads = 0;  // key/value heads (GQA); divides n_heads
  int head_dim = 0;    // per-head width; usually dim / n_heads; even (RoPE pairs)
  int vocab_size = 0;
  int seq_len = 0;  // maximum context the model was trained/configured for
  float rope_theta = 10000.0f;
  float rms_eps = 1e-5f;
  bool tied_embeddings = true;  // classifier == token embedding
  RopeStyle rope_style = RopeStyle::kInterleaved;
  std::optional<RopeScaling> rope_scaling;

  // Limits that keep every size computation far from overflow.
  static constexpr int kMaxWidth = 1 << 20;  // dim, hidden_dim, head_dim
  static constexpr int kMaxLayers = 1 << 12;
  static constexpr int kMaxHeads = 1 << 12;
  static constexpr int kMaxVocab = 1 << 24;
  static constexpr int kMaxSeqLen = 1 << 24;

  // InvalidArgument naming the first offending field.
  absl::Status Validate() const;

  int64_t q_dim() const { return int64_t{n_heads} * head_dim; }
  int64_t kv_dim() const { return int64_t{n_kv_heads} * head_dim; }
  AttentionShape attention_shape() const { return {n_heads, n_kv_heads, head_dim, 0.0f}; }
  // Parameters (elements) of one layer / of the whole model (classifier
  // counted once when tied). Valid configs only.
  int64_t LayerParameterCount() const;
  int64_t ParameterCount() const;
  // Bytes of K plus V cache per token over all layers, at fp32.
  int64_t KvBytesPerToken() const { return 2 * int64_t{n_layers} * kv_dim() * 4; }

  // The head_dim / 2 RoPE inverse frequencies theta^(-2k / head_dim), computed
  // in fp32 exactly like llama2.c's run.c, then rope_scaling if set.
  std::vector<float> RopeInvFreq() const;

  std::string DebugString() const;
};

// Llama-3-8B / Llama-3.1-8B shapes (Hugging Face layout: untied classifier,
// half-split RoPE, theta 500000). No weights: see random_weights.h.
LlamaConfig Llama3_8BConfig();
LlamaConfig Llama31_8BConfig();

}  // namespace kvr::worker
