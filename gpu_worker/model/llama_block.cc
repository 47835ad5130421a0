#include "gpu_worker/model/llama_block.h"

#include <algorithm>

#include "common/status.h"

namespace kvr::worker {

absl::StatusOr<BlockActivations> BlockActivations::Allocate(Backend& backend,
                                                            const LlamaConfig& config,
                                                            int64_t rows, int64_t ffn_rows) {
  auto act = [&](int64_t n, int64_t cols) { return backend.Allocate(DType::kF32, n, cols); };
  BlockActivations a;
  KVR_ASSIGN_OR_RETURN(a.x, act(rows, config.dim));
  KVR_ASSIGN_OR_RETURN(a.xb, act(rows, config.dim));
  KVR_ASSIGN_OR_RETURN(a.xb2, act(rows, config.dim));
  KVR_ASSIGN_OR_RETURN(a.q, act(rows, config.q_dim()));
  KVR_ASSIGN_OR_RETURN(a.att, act(rows, config.q_dim()));
  KVR_ASSIGN_OR_RETURN(a.hb, act(ffn_rows, config.hidden_dim));
  KVR_ASSIGN_OR_RETURN(a.hb2, act(ffn_rows, config.hidden_dim));
  return a;
}

BlockActivations BlockActivations::Rows(int64_t n) const {
  return {x.Rows(0, n), xb.Rows(0, n), xb2.Rows(0, n), q.Rows(0, n), att.Rows(0, n), hb, hb2};
}

absl::Status LlamaBlock::Embed(std::span<const int32_t> tokens, const Tensor& x) const {
  return backend_->Embedding(weights_->token_embedding, tokens, x);
}

absl::Status LlamaBlock::Forward(int layer, std::span<const int32_t> positions,
                                 const BlockActivations& a, AttentionHook& hook) const {
  const LlamaConfig& c = *config_;
  const DeviceLayerWeights& w = weights_->layers[static_cast<size_t>(layer)];
  const Tensor& inv_freq = weights_->inv_freq;
  Backend& b = *backend_;
  const int64_t n = a.x.rows();
  KVR_CHECK(static_cast<int64_t>(positions.size()) == n && a.hb.rows() >= 1);

  KVR_RETURN_IF_ERROR(b.RmsNorm(a.x, w.attn_norm, c.rms_eps, a.xb));
  KVR_ASSIGN_OR_RETURN(std::span<const KvRun> runs, hook.KvRuns(layer));
  for (const KvRun& run : runs) {
    const Tensor xb = a.xb.Rows(run.row, run.rows);
    const std::span<const int32_t> run_positions =
        positions.subspan(static_cast<size_t>(run.row), static_cast<size_t>(run.rows));
    absl::Status st = b.MatMul(xb, w.wk, run.k);
    if (st.ok()) st = b.MatMul(xb, w.wv, run.v);
    if (st.ok()) st = b.Rope(run.k, c.n_kv_heads, c.head_dim, run_positions, inv_freq,
                             c.rope_style);
    if (st.ok()) continue;
    if (run.status == nullptr) return st;
    if (run.status->ok()) *run.status = std::move(st);
  }
  KVR_RETURN_IF_ERROR(b.MatMul(a.xb, w.wq, a.q));
  KVR_RETURN_IF_ERROR(b.Rope(a.q, c.n_heads, c.head_dim, positions, inv_freq, c.rope_style));
  KVR_RETURN_IF_ERROR(hook.Attend(layer, a.q, a.att));

  KVR_RETURN_IF_ERROR(b.MatMul(a.att, w.wo, a.xb2));
  KVR_RETURN_IF_ERROR(b.Add(a.x, a.xb2));
  KVR_RETURN_IF_ERROR(b.RmsNorm(a.x, w.ffn_norm, c.rms_eps, a.xb));
  const int64_t chunk = std::min(a.hb.rows(), n);
  for (int64_t begin = 0; begin < n; begin += chunk) {
    const int64_t rows = std::min(chunk, n - begin);
    const Tensor hb = a.hb.Rows(0, rows), hb2 = a.hb2.Rows(0, rows);
    const Tensor xb = a.xb.Rows(begin, rows);
    KVR_RETURN_IF_ERROR(b.MatMul(xb, w.w1, hb));
    KVR_RETURN_IF_ERROR(b.MatMul(xb, w.w3, hb2));
    KVR_RETURN_IF_ERROR(b.SwiGlu(hb, hb2, hb));
    KVR_RETURN_IF_ERROR(b.MatMul(hb, w.w2, a.xb2.Rows(begin, rows)));
  }
  return b.Add(a.x, a.xb2);
}

absl::Status LlamaBlock::Logits(const Tensor& x, const Tensor& normed,
                                const Tensor& logits) const {
  KVR_RETURN_IF_ERROR(backend_->RmsNorm(x, weights_->final_norm, config_->rms_eps, normed));
  return backend_->MatMul(normed, weights_->classifier, logits);
}

}  // namespace kvr::worker
