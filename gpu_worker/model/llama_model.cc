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

  KVR_ASSIGN_OR_RETURN(device_weights_, DeviceWeights::Import(backend_, *weights_));
  block_ = LlamaBlock(backend_, &weights_->config, &device_weights_);
  k_cache_.resize(static_cast<size_t>(c.n_layers));
  v_cache_.resize(static_cast<size_t>(c.n_layers));
  for (int l = 0; l < c.n_layers; ++l) {
    KVR_ASSIGN_OR_RETURN(k_cache_[l], backend_->Allocate(DType::kF32, max_seq_len_, c.kv_dim()));
    KVR_ASSIGN_OR_RETURN(v_cache_[l], backend_->Allocate(DType::kF32, max_seq_len_, c.kv_dim()));
  }
  KVR_ASSIGN_OR_RETURN(act_, BlockActivations::Allocate(*backend_, c, max_batch_, max_batch_));
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

namespace {

// Full causal attention over the model's caches: the chunk's K/V go to rows
// first_pos .. first_pos + n - 1, its queries attend every row up to theirs.
class CausalCacheAttention final : public AttentionHook {
 public:
  CausalCacheAttention(Backend& backend, std::span<const Tensor> k_cache,
                       std::span<const Tensor> v_cache, AttentionShape shape, int64_t first_pos,
                       int64_t n)
      : backend_(backend), k_cache_(k_cache), v_cache_(v_cache), shape_(shape),
        first_pos_(first_pos), n_(n) {}

  absl::StatusOr<std::span<const KvRun>> KvRuns(int layer) override {
    const size_t l = static_cast<size_t>(layer);
    run_ = {0, n_, k_cache_[l].Rows(first_pos_, n_), v_cache_[l].Rows(first_pos_, n_), nullptr};
    return std::span<const KvRun>(&run_, 1);
  }
  absl::Status Attend(int layer, const Tensor& q, const Tensor& att) override {
    const size_t l = static_cast<size_t>(layer);
    return backend_.Attention(q, k_cache_[l], v_cache_[l], shape_, first_pos_, att);
  }

 private:
  Backend& backend_;
  const std::span<const Tensor> k_cache_, v_cache_;
  const AttentionShape shape_;
  const int64_t first_pos_, n_;
  KvRun run_;
};

}  // namespace

absl::Status LlamaModel::Forward(std::span<const int32_t> tokens, int64_t first_pos,
                                 bool want_logits) {
  const LlamaConfig& c = weights_->config;
  const int64_t n = static_cast<int64_t>(tokens.size());
  KVR_CHECK(n > 0 && n <= max_batch_ && first_pos + n <= max_seq_len_);
  for (int64_t i = 0; i < n; ++i) positions_[i] = static_cast<int32_t>(first_pos + i);
  const std::span<const int32_t> positions(positions_.data(), static_cast<size_t>(n));
  const BlockActivations a = act_.Rows(n);
  KVR_RETURN_IF_ERROR(block_.Embed(tokens, a.x));
  // Positions first_pos.. are being rewritten; until this pass finishes the
  // cache is valid only before them.
  cached_ = std::min(cached_, first_pos);
  CausalCacheAttention attention(*backend_, k_cache_, v_cache_, c.attention_shape(), first_pos,
                                 n);
  for (int l = 0; l < c.n_layers; ++l) {
    KVR_RETURN_IF_ERROR(block_.Forward(l, positions, a, attention));
  }
  cached_ = first_pos + n;
  if (!want_logits) return absl::OkStatus();
  KVR_RETURN_IF_ERROR(block_.Logits(a.x.Rows(n - 1, 1), a.xb.Rows(0, 1), logits_));
  return backend_->DownloadF32(logits_, logits_host_);
}

}  // namespace kvr::worker
