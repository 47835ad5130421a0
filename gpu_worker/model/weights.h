// Host-side weights of a Llama-family model: typed, shaped views into memory
// owned by `storage` (a memory-mapped checkpoint, or heap buffers for random
// weights). Matrices are [out x in] row-major (y = x W^T), as llama2.c and
// Hugging Face store them. Norm weights and the final norm stay fp32; matrices
// and the embedding may be any DType a backend accepts (fp32 from llama2.c
// files; bf16 from random_weights.h or, later, safetensors).
//
// A LlamaWeights is immutable once built and safe to share across threads and
// models (hold it by shared_ptr; views stay valid while `storage` lives).
#pragma once

#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "gpu_worker/backend/tensor.h"
#include "gpu_worker/model/model_config.h"

namespace kvr::worker {

struct LlamaLayerWeights {
  HostTensor attn_norm;  // [1 x dim] f32
  HostTensor wq;         // [n_heads * head_dim x dim]
  HostTensor wk;         // [n_kv_heads * head_dim x dim]
  HostTensor wv;         // [n_kv_heads * head_dim x dim]
  HostTensor wo;         // [dim x n_heads * head_dim]
  HostTensor ffn_norm;   // [1 x dim] f32
  HostTensor w1;         // gate [hidden_dim x dim]
  HostTensor w2;         // down [dim x hidden_dim]
  HostTensor w3;         // up   [hidden_dim x dim]
};

struct LlamaWeights {
  LlamaConfig config;
  HostTensor token_embedding;  // [vocab x dim]
  std::vector<LlamaLayerWeights> layers;
  HostTensor final_norm;  // [1 x dim] f32
  HostTensor classifier;  // [vocab x dim]; aliases token_embedding when tied
  std::shared_ptr<const void> storage;

  // Internal if a view's shape or dtype disagrees with `config` (a loader
  // bug); InvalidArgument if the config itself is invalid.
  absl::Status Validate() const;
};

}  // namespace kvr::worker
