#include "gpu_worker/model/llama_model.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace kvr::worker {

absl::StatusOr<std::unique_ptr<LlamaModel>> LlamaModel::Create(
    Backend* backend, std::shared_ptr<const LlamaWeights> weights,
    const LlamaModelOptions& options) {
  if (backend == nullptr || weights == nullptr) {
    return absl::InvalidArgumentError("LlamaModel: null backend or weights");
  }
  std::unique_ptr<LlamaModel> m(new LlamaModel);
  KVR_RETURN_IF_ERROR(m->Init(backend, std::move(weights), options));
  return m;
}

absl::Status LlamaModel::Init(Backend* backend, std::shared_ptr<const LlamaWeights> weights,
                              const LlamaModelOptions& options) {
  KVR_RETURN_IF_ERROR(weights->Validate());
  backend_ = backend;
  weights_ = std::move(weights);
  const LlamaConfig& c = weights_->config;
  max_seq_len_ = options.max_seq_len > 0 ? options.max_seq_len : c.seq_len;
  if (options.max_batch_tokens <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("LlamaModel: max_batch_tokens = ", options.max_batch_tokens, " must be > 0"));
  }
  max_batch_ = std::min(options.max_batch_tokens, max_seq_len_);

  KVR_ASSIGN_OR_RETURN(DeviceWeights imported, DeviceWeights::Import(backend_, *weights_));
  token_embedding_ = imported.token_embedding;
  final_norm_ = imported.final_norm;
  classifier_ = imported.classifier;
  inv_freq_ = imported.inv_freq;
  layers_.resize(static_cast<size_t>(c.n_layers));
  for (int l = 0; l < c.n_layers; ++l) {
    Layer& d = layers_[l];
    static_cast<DeviceLayerWeights&>(d) = imported.layers[l];
    KVR_ASSIGN_OR_RETURN(d.k_cache, backend_->Allocate(DType::kF32, max_seq_len_, c.kv_dim()));
    KVR_ASSIGN_OR_RETURN(d.v_cache, backend_->Allocate(DType::kF32, max_seq_len_, c.kv_dim()));
  }

  auto act = [&](int64_t cols) { return backend_->Allocate(DType::kF32, max_batch_, cols); };
  KVR_ASSIGN_OR_RETURN(x_, act(c.dim));
  KVR_ASSIGN_OR_RETURN(xb_, act(c.dim));
  KVR_ASSIGN_OR_RETURN(xb2_, act(c.dim));
  KVR_ASSIGN_OR_RETURN(q_, act(c.q_dim()));
  KVR_ASSIGN_OR_RETURN(att_, act(c.q_dim()));
  KVR_ASSIGN_OR_RETURN(hb_, act(c.hidden_dim));
  KVR_ASSIGN_OR_RETURN(hb2_, act(c.hidden_dim));
  KVR_ASSIGN_OR_RETURN(logits_, backend_->Allocate(DType::kF32, 1, c.vocab_size));
  logits_host_.resize(static_cast<size_t>(c.vocab_size));
  positions_.resize(static_cast<size_t>(max_batch_));
  return absl::OkStatus();
}

absl::StatusOr<std::span<const float>> LlamaModel::Prefill(std::span<const int32_t> tokens) {
  if (tokens.empty()) return absl::InvalidArgumentError("Prefill: empty prompt");
  if (static_cast<int64_t>(tokens.size()) > max_seq_len_) {
    return absl::InvalidArgumentError(
        absl::StrCat("Prefill: ", tokens.size(), " tokens exceed max_seq_len ", max_seq_len_));
  }
  cached_ = 0;
  for (size_t begin = 0; begin < tokens.size(); begin += static_cast<size_t>(max_batch_)) {
    const size_t n = std::min(tokens.size() - begin, static_cast<size_t>(max_batch_));
    KVR_RETURN_IF_ERROR(
        Forward(tokens.subspan(begin, n), static_cast<int64_t>(begin), begin + n == tokens.size()));
  }
  return std::span<const float>(logits_host_);
}

absl::StatusOr<std::span<const float>> LlamaModel::DecodeStep(int32_t token, int64_t pos) {
  if (pos < 0 || pos > cached_ || pos >= max_seq_len_) {
    return absl::InvalidArgumentError(absl::StrCat("DecodeStep: pos ", pos, " outside [0, ",
                                                   std::min(cached_, max_seq_len_ - 1), "]"));
  }
  KVR_RETURN_IF_ERROR(Forward(std::span<const int32_t>(&token, 1), pos, true));
  return std::span<const float>(logits_host_);
}

absl::Status LlamaModel::Forward(std::span<const int32_t> tokens, int64_t first_pos,
                                 bool want_logits) {
  const LlamaConfig& c = weights_->config;
  const int64_t n = static_cast<int64_t>(tokens.size());
  KVR_CHECK(n > 0 && n <= max_batch_ && first_pos + n <= max_seq_len_);
  for (int64_t i = 0; i < n; ++i) positions_[i] = static_cast<int32_t>(first_pos + i);
  const std::span<const int32_t> positions(positions_.data(), static_cast<size_t>(n));
  const AttentionShape shape = c.attention_shape();
  Backend& b = *backend_;

  const Tensor x = x_.Rows(0, n), xb = xb_.Rows(0, n), xb2 = xb2_.Rows(0, n), q = q_.Rows(0, n),
               att = att_.Rows(0, n), hb = hb_.Rows(0, n), hb2 = hb2_.Rows(0, n);
  KVR_RETURN_IF_ERROR(b.Embedding(token_embedding_, tokens, x));
  // Positions first_pos.. are being rewritten; until this pass finishes the
  // cache is valid only before them.
  cached_ = std::min(cached_, first_pos);
  for (const Layer& layer : layers_) {
    const Tensor k = layer.k_cache.Rows(first_pos, n), v = layer.v_cache.Rows(first_pos, n);
    KVR_RETURN_IF_ERROR(b.RmsNorm(x, layer.attn_norm, c.rms_eps, xb));
    KVR_RETURN_IF_ERROR(b.MatMul(xb, layer.wq, q));
    KVR_RETURN_IF_ERROR(b.MatMul(xb, layer.wk, k));
    KVR_RETURN_IF_ERROR(b.MatMul(xb, layer.wv, v));
    KVR_RETURN_IF_ERROR(b.Rope(q, c.n_heads, c.head_dim, positions, inv_freq_, c.rope_style));
    KVR_RETURN_IF_ERROR(b.Rope(k, c.n_kv_heads, c.head_dim, positions, inv_freq_, c.rope_style));
    KVR_RETURN_IF_ERROR(b.Attention(q, layer.k_cache, layer.v_cache, shape, first_pos, att));
    KVR_RETURN_IF_ERROR(b.MatMul(att, layer.wo, xb2));
    KVR_RETURN_IF_ERROR(b.Add(x, xb2));
    KVR_RETURN_IF_ERROR(b.RmsNorm(x, layer.ffn_norm, c.rms_eps, xb));
    KVR_RETURN_IF_ERROR(b.MatMul(xb, layer.w1, hb));
    KVR_RETURN_IF_ERROR(b.MatMul(xb, layer.w3, hb2));
    KVR_RETURN_IF_ERROR(b.SwiGlu(hb, hb2, hb));
    KVR_RETURN_IF_ERROR(b.MatMul(hb, layer.w2, xb2));
    KVR_RETURN_IF_ERROR(b.Add(x, xb2));
  }
  cached_ = first_pos + n;
  if (!want_logits) return absl::OkStatus();
  const Tensor last = x.Rows(n - 1, 1), normed = xb.Rows(0, 1);
  KVR_RETURN_IF_ERROR(b.RmsNorm(last, final_norm_, c.rms_eps, normed));
  KVR_RETURN_IF_ERROR(b.MatMul(normed, classifier_, logits_));
  return b.DownloadF32(logits_, logits_host_);
}

}  // namespace kvr::worker
