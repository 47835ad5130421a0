// A Llama model's weights imported into a Backend's memory, shared by the
// full-attention LlamaModel and the retrieval engine. Importing is a view on
// the CPU backend (no copy) and an upload on device backends.
#pragma once

#include <vector>

#include "absl/status/statusor.h"
#include "gpu_worker/backend/backend.h"
#include "gpu_worker/model/weights.h"

namespace kvr::worker {

struct DeviceLayerWeights {
  Tensor attn_norm, wq, wk, wv, wo, ffn_norm, w1, w2, w3;
};

struct DeviceWeights {
  Tensor token_embedding, final_norm;
  Tensor classifier;  // the embedding tensor itself when tied
  Tensor inv_freq;    // [1 x head_dim/2] RoPE inverse frequencies (scaling applied)
  std::vector<DeviceLayerWeights> layers;

  // Imports every tensor of `weights` into `backend`; `weights.storage` stays
  // alive as long as the imported tensors do.
  static absl::StatusOr<DeviceWeights> Import(Backend* backend, const LlamaWeights& weights);
};

}  // namespace kvr::worker
