// Hugging Face `config.json` <-> LlamaConfig for Llama-family checkpoints
// (model_type "llama": Llama 2, Llama 3, Llama 3.1).
//
// Read fields (HF LlamaConfig names; defaults are HF's):
//   hidden_size -> dim, intermediate_size -> hidden_dim, num_hidden_layers,
//   num_attention_heads, num_key_value_heads (default num_attention_heads),
//   head_dim (default hidden_size / num_attention_heads), vocab_size,
//   max_position_embeddings -> seq_len, rope_theta (10000), rms_norm_eps
//   (1e-6), tie_word_embeddings (false), rope_scaling (null, or rope_type /
//   type "llama3" with factor, low_freq_factor, high_freq_factor,
//   original_max_position_embeddings).
// HF checkpoints use the "rotate_half" RoPE layout, so rope_style is always
// kHalfSplit. Rejected with InvalidArgument naming the field: a missing
// required field, a field of the wrong JSON type, model_type other than
// "llama", hidden_act other than "silu", attention_bias / mlp_bias true, and
// rope_scaling types other than "llama3" (linear, dynamic, yarn, ...).
#pragma once

#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "gpu_worker/model/model_config.h"

namespace kvr::worker {

// Parses config.json text; `name` (usually the path) prefixes error messages.
// The result passed LlamaConfig::Validate().
absl::StatusOr<LlamaConfig> ParseHfConfig(std::string_view json_text, const std::string& name);

// Reads and parses a config.json file. NotFound when it cannot be opened.
absl::StatusOr<LlamaConfig> LoadHfConfig(const std::string& path);

// config.json text (model_type "llama", architectures LlamaForCausalLM) that
// ParseHfConfig maps back to `config` except for rope_style, which is always
// kHalfSplit in HF files. `torch_dtype` is written verbatim ("float32",
// "bfloat16", "float16").
std::string HfConfigJson(const LlamaConfig& config, std::string_view torch_dtype);

}  // namespace kvr::worker
