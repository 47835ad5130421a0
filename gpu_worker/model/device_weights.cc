#include "gpu_worker/model/device_weights.h"

#include "common/status.h"

namespace kvr::worker {

absl::StatusOr<DeviceWeights> DeviceWeights::Import(Backend* backend,
                                                    const LlamaWeights& weights) {
  const LlamaConfig& c = weights.config;
  const std::shared_ptr<const void>& keep = weights.storage;
  auto import = [&](const HostTensor& h) { return backend->ImportHost(h, keep); };
  DeviceWeights d;
  KVR_ASSIGN_OR_RETURN(d.token_embedding, import(weights.token_embedding));
  KVR_ASSIGN_OR_RETURN(d.final_norm, import(weights.final_norm));
  if (c.tied_embeddings && weights.classifier.data == weights.token_embedding.data) {
    d.classifier = d.token_embedding;
  } else {
    KVR_ASSIGN_OR_RETURN(d.classifier, import(weights.classifier));
  }
  d.layers.resize(static_cast<size_t>(c.n_layers));
  for (int l = 0; l < c.n_layers; ++l) {
    const LlamaLayerWeights& hw = weights.layers[l];
    DeviceLayerWeights& dl = d.layers[l];
    KVR_ASSIGN_OR_RETURN(dl.attn_norm, import(hw.attn_norm));
    KVR_ASSIGN_OR_RETURN(dl.wq, import(hw.wq));
    KVR_ASSIGN_OR_RETURN(dl.wk, import(hw.wk));
    KVR_ASSIGN_OR_RETURN(dl.wv, import(hw.wv));
    KVR_ASSIGN_OR_RETURN(dl.wo, import(hw.wo));
    KVR_ASSIGN_OR_RETURN(dl.ffn_norm, import(hw.ffn_norm));
    KVR_ASSIGN_OR_RETURN(dl.w1, import(hw.w1));
    KVR_ASSIGN_OR_RETURN(dl.w2, import(hw.w2));
    KVR_ASSIGN_OR_RETURN(dl.w3, import(hw.w3));
  }
  const std::vector<float> inv_freq = c.RopeInvFreq();
  KVR_ASSIGN_OR_RETURN(d.inv_freq, backend->Allocate(DType::kF32, 1, c.head_dim / 2));
  KVR_RETURN_IF_ERROR(backend->UploadF32(inv_freq, d.inv_freq));
  return d;
}

}  // namespace kvr::worker
