// A Llama-family decoder running on a Backend, with its own full KV cache:
// the full-attention baseline of the decode worker (the retrieval engine,
// which keeps only sinks + a window here, comes on top of the same ops).
//
// One sequence per model. Weights are imported into the backend once (the CPU
// backend aliases the host memory). KV cache: per layer K and V of
// [max_seq_len x n_kv_heads * head_dim] f32, i.e. config.KvBytesPerToken() *
// max_seq_len bytes in total; activations are sized for max_batch_tokens.
// Not thread-safe: one caller at a time.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "gpu_worker/backend/backend.h"
#include "gpu_worker/model/device_weights.h"
#include "gpu_worker/model/llama_block.h"
#include "gpu_worker/model/weights.h"

namespace kvr::worker {

struct LlamaModelOptions {
  // KV cache capacity in tokens; 0 = config.seq_len.
  int64_t max_seq_len = 0;
  // Tokens per forward chunk during Prefill (bounds activation memory).
  int64_t max_batch_tokens = 64;
};

class LlamaModel {
 public:
  // `backend` must outlive the model.
  static absl::StatusOr<std::unique_ptr<LlamaModel>> Create(
      Backend* backend, std::shared_ptr<const LlamaWeights> weights,
      const LlamaModelOptions& options = {});

  const LlamaConfig& config() const { return weights_->config; }
  Backend& backend() { return *backend_; }
  int64_t max_seq_len() const { return max_seq_len_; }
  // Positions 0 .. cached_tokens() - 1 hold valid K/V.
  int64_t cached_tokens() const { return cached_; }

  // Starts a new sequence: runs `tokens` at positions 0 .. n-1 (in chunks of
  // max_batch_tokens) and returns the logits [vocab] of the last position.
  // The span stays valid until the next call. InvalidArgument for an empty
  // prompt, a prompt longer than max_seq_len, or a token outside the vocab.
  absl::StatusOr<std::span<const float>> Prefill(std::span<const int32_t> tokens);

  // Runs one token at position `pos` (0 <= pos <= cached_tokens(), pos <
  // max_seq_len; K/V at positions >= pos are replaced) and returns its logits.
  absl::StatusOr<std::span<const float>> DecodeStep(int32_t token, int64_t pos);

 private:
  LlamaModel() = default;
  absl::Status Init(Backend* backend, std::shared_ptr<const LlamaWeights> weights,
                    const LlamaModelOptions& options);
  // Runs tokens at first_pos.. and, when `logits`, the classifier on the last.
  absl::Status Forward(std::span<const int32_t> tokens, int64_t first_pos, bool logits);

  Backend* backend_ = nullptr;
  std::shared_ptr<const LlamaWeights> weights_;
  int64_t max_seq_len_ = 0;
  int64_t max_batch_ = 0;
  int64_t cached_ = 0;

  DeviceWeights device_weights_;
  LlamaBlock block_;
  // Per layer, [max_seq_len x kv_dim].
  std::vector<Tensor> k_cache_, v_cache_;
  BlockActivations act_;  // [max_batch x ...]
  Tensor logits_;         // [1 x vocab]
  std::vector<float> logits_host_;
  std::vector<int32_t> positions_;
};

}  // namespace kvr::worker
