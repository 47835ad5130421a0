#include "gpu_worker/model/weights.h"

#include "absl/strings/str_cat.h"

namespace kvr::worker {
namespace {

absl::Status CheckView(const HostTensor& t, const char* name, int layer, int64_t rows, int64_t cols,
                       bool f32_only) {
  const std::string where =
      layer < 0 ? std::string(name) : absl::StrCat("layer ", layer, " ", name);
  if (t.rows != rows || t.cols != cols) {
    return absl::InternalError(absl::StrCat("weights: ", where, " is [", t.rows, " x ", t.cols,
                                            "], config wants [", rows, " x ", cols, "]"));
  }
  if (t.data == nullptr)
    return absl::InternalError(absl::StrCat("weights: ", where, " has no data"));
  if (f32_only && t.dtype != DType::kF32) {
    return absl::InternalError(
        absl::StrCat("weights: ", where, " must be f32, is ", DTypeName(t.dtype)));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status LlamaWeights::Validate() const {
  KVR_RETURN_IF_ERROR(config.Validate());
  const LlamaConfig& c = config;
  if (layers.size() != static_cast<size_t>(c.n_layers)) {
    return absl::InternalError(
        absl::StrCat("weights: ", layers.size(), " layers, config has ", c.n_layers));
  }
  KVR_RETURN_IF_ERROR(
      CheckView(token_embedding, "token_embedding", -1, c.vocab_size, c.dim, false));
  KVR_RETURN_IF_ERROR(CheckView(final_norm, "final_norm", -1, 1, c.dim, true));
  KVR_RETURN_IF_ERROR(CheckView(classifier, "classifier", -1, c.vocab_size, c.dim, false));
  for (int l = 0; l < c.n_layers; ++l) {
    const LlamaLayerWeights& w = layers[l];
    KVR_RETURN_IF_ERROR(CheckView(w.attn_norm, "attn_norm", l, 1, c.dim, true));
    KVR_RETURN_IF_ERROR(CheckView(w.wq, "wq", l, c.q_dim(), c.dim, false));
    KVR_RETURN_IF_ERROR(CheckView(w.wk, "wk", l, c.kv_dim(), c.dim, false));
    KVR_RETURN_IF_ERROR(CheckView(w.wv, "wv", l, c.kv_dim(), c.dim, false));
    KVR_RETURN_IF_ERROR(CheckView(w.wo, "wo", l, c.dim, c.q_dim(), false));
    KVR_RETURN_IF_ERROR(CheckView(w.ffn_norm, "ffn_norm", l, 1, c.dim, true));
    KVR_RETURN_IF_ERROR(CheckView(w.w1, "w1", l, c.hidden_dim, c.dim, false));
    KVR_RETURN_IF_ERROR(CheckView(w.w2, "w2", l, c.dim, c.hidden_dim, false));
    KVR_RETURN_IF_ERROR(CheckView(w.w3, "w3", l, c.hidden_dim, c.dim, false));
  }
  return absl::OkStatus();
}

}  // namespace kvr::worker
