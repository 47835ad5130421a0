#include "gpu_worker/engine/retrieval_engine.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "retrieval_node/index/flat_index.h"

namespace kvr::worker {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point since) {
  return std::chrono::duration<double>(Clock::now() - since).count();
}

std::atomic<uint64_t> next_sequence_id{1};

}  // namespace

std::string_view AttentionModeName(AttentionMode mode) {
  return mode == AttentionMode::kFull ? "full" : "retrieval";
}

absl::StatusOr<AttentionMode> ParseAttentionMode(std::string_view name) {
  if (name == "full") return AttentionMode::kFull;
  if (name == "retrieval") return AttentionMode::kRetrieval;
  return absl::InvalidArgumentError(
      absl::StrCat("mode \"", std::string(name), "\" is not one of retrieval, full"));
}

absl::Status ValidateAttentionOptions(const AttentionOptions& o) {
  constexpr int kMaxTokens = LlamaConfig::kMaxSeqLen;
  if (o.mode != AttentionMode::kFull && o.mode != AttentionMode::kRetrieval) {
    return absl::InvalidArgumentError("mode: unknown attention mode");
  }
  if (o.sinks < 0 || o.sinks > kMaxTokens) {
    return absl::InvalidArgumentError(
        absl::StrCat("sinks ", o.sinks, " outside [0, ", kMaxTokens, "]"));
  }
  if (o.window < 1 || o.window > kMaxTokens) {
    return absl::InvalidArgumentError(
        absl::StrCat("window ", o.window, " outside [1, ", kMaxTokens, "]"));
  }
  if (o.top_k < 1 || o.top_k > index::kMaxSearchK) {
    return absl::InvalidArgumentError(
        absl::StrCat("top_k ", o.top_k, " outside [1, ", index::kMaxSearchK, "]"));
  }
  if (o.beam < 0 || o.beam > 1 << 16) {
    return absl::InvalidArgumentError(absl::StrCat("beam ", o.beam, " outside [0, 65536]"));
  }
  if (o.train_k < 1 || o.train_k > index::kMaxSearchK) {
    return absl::InvalidArgumentError(
        absl::StrCat("train_k ", o.train_k, " outside [1, ", index::kMaxSearchK, "]"));
  }
  KVR_RETURN_IF_ERROR(retrieval::ParseIndexType(retrieval::IndexTypeName(o.index)).status());
  return DTypeFromTag(static_cast<uint32_t>(o.value_dtype)).status();
}

absl::StatusOr<std::unique_ptr<RetrievalEngine>> RetrievalEngine::Create(
    Backend* backend, std::shared_ptr<const LlamaWeights> weights,
    retrieval::RetrievalClient* client, const EngineOptions& options) {
  if (backend == nullptr || weights == nullptr) {
    return absl::InvalidArgumentError("RetrievalEngine: null backend or weights");
  }
  std::unique_ptr<RetrievalEngine> e(new RetrievalEngine);
  KVR_RETURN_IF_ERROR(e->Init(backend, std::move(weights), client, options));
  return e;
}

RetrievalEngine::~RetrievalEngine() { EndSequence().IgnoreError(); }

absl::Status RetrievalEngine::Init(Backend* backend, std::shared_ptr<const LlamaWeights> weights,
                                   retrieval::RetrievalClient* client,
                                   const EngineOptions& options) {
  KVR_RETURN_IF_ERROR(weights->Validate());
  backend_ = backend;
  client_ = client;
  weights_ = std::move(weights);
  const LlamaConfig& c = weights_->config;
  max_seq_len_ = options.max_seq_len > 0 ? options.max_seq_len : c.seq_len;
  if (max_seq_len_ > LlamaConfig::kMaxSeqLen) {
    return absl::InvalidArgumentError(absl::StrCat("max_seq_len ", max_seq_len_, " > ",
                                                   LlamaConfig::kMaxSeqLen));
  }
  if (options.max_batch_tokens <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_batch_tokens ", options.max_batch_tokens, " must be > 0"));
  }
  max_batch_ = std::min(options.max_batch_tokens, max_seq_len_);

  const std::shared_ptr<const void>& keep = weights_->storage;
  auto import = [&](const HostTensor& h) { return backend_->ImportHost(h, keep); };
  KVR_ASSIGN_OR_RETURN(token_embedding_, import(weights_->token_embedding));
  KVR_ASSIGN_OR_RETURN(final_norm_, import(weights_->final_norm));
  if (c.tied_embeddings && weights_->classifier.data == weights_->token_embedding.data) {
    classifier_ = token_embedding_;
  } else {
    KVR_ASSIGN_OR_RETURN(classifier_, import(weights_->classifier));
  }
  layers_.resize(static_cast<size_t>(c.n_layers));
  for (int l = 0; l < c.n_layers; ++l) {
    const LlamaLayerWeights& hw = weights_->layers[l];
    Layer& d = layers_[l];
    KVR_ASSIGN_OR_RETURN(d.attn_norm, import(hw.attn_norm));
    KVR_ASSIGN_OR_RETURN(d.wq, import(hw.wq));
    KVR_ASSIGN_OR_RETURN(d.wk, import(hw.wk));
    KVR_ASSIGN_OR_RETURN(d.wv, import(hw.wv));
    KVR_ASSIGN_OR_RETURN(d.wo, import(hw.wo));
    KVR_ASSIGN_OR_RETURN(d.ffn_norm, import(hw.ffn_norm));
    KVR_ASSIGN_OR_RETURN(d.w1, import(hw.w1));
    KVR_ASSIGN_OR_RETURN(d.w2, import(hw.w2));
    KVR_ASSIGN_OR_RETURN(d.w3, import(hw.w3));
  }
  const std::vector<float> inv_freq = c.RopeInvFreq();
  KVR_ASSIGN_OR_RETURN(inv_freq_, backend_->Allocate(DType::kF32, 1, c.head_dim / 2));
  KVR_RETURN_IF_ERROR(backend_->UploadF32(inv_freq, inv_freq_));

  auto row = [&](int64_t cols) { return backend_->Allocate(DType::kF32, 1, cols); };
  KVR_ASSIGN_OR_RETURN(x1_, row(c.dim));
  KVR_ASSIGN_OR_RETURN(xb1_, row(c.dim));
  KVR_ASSIGN_OR_RETURN(xb2_1_, row(c.dim));
  KVR_ASSIGN_OR_RETURN(q1_, row(c.q_dim()));
  KVR_ASSIGN_OR_RETURN(o1_, row(c.q_dim()));
  KVR_ASSIGN_OR_RETURN(o2_, row(c.q_dim()));
  KVR_ASSIGN_OR_RETURN(m1_, row(c.n_heads));
  KVR_ASSIGN_OR_RETURN(l1_, row(c.n_heads));
  KVR_ASSIGN_OR_RETURN(m2_, row(c.n_heads));
  KVR_ASSIGN_OR_RETURN(l2_, row(c.n_heads));
  KVR_ASSIGN_OR_RETURN(hb1_, row(c.hidden_dim));
  KVR_ASSIGN_OR_RETURN(hb2_1_, row(c.hidden_dim));
  KVR_ASSIGN_OR_RETURN(logits_, row(c.vocab_size));
  logits_host_.resize(static_cast<size_t>(c.vocab_size));
  q_host_.resize(static_cast<size_t>(c.q_dim()));
  k_row_host_.resize(static_cast<size_t>(c.kv_dim()));
  v_row_host_.resize(static_cast<size_t>(c.kv_dim()));
  node_partials_ = Partials(static_cast<size_t>(c.n_heads), static_cast<size_t>(c.head_dim));
  return absl::OkStatus();
}

absl::Status RetrievalEngine::EndSequence() {
  active_ = false;
  if (!on_node_) return absl::OkStatus();
  on_node_ = false;
  return client_->DropSequence(sequence_id_);
}

int64_t RetrievalEngine::Slot(int64_t pos) const {
  const int64_t s = attention_.sinks;
  return pos < s ? pos : s + (pos - s) % attention_.window;
}

absl::Status RetrievalEngine::PrepareStatic() {
  const int64_t rows = int64_t{attention_.sinks} + attention_.window;
  if (rows == static_rows_) return absl::OkStatus();
  const LlamaConfig& c = weights_->config;
  for (Layer& layer : layers_) {
    KVR_ASSIGN_OR_RETURN(layer.k_static, backend_->Allocate(DType::kF32, rows, c.kv_dim()));
    KVR_ASSIGN_OR_RETURN(layer.v_static, backend_->Allocate(DType::kF32, rows, c.kv_dim()));
  }
  static_rows_ = rows;
  return absl::OkStatus();
}

absl::StatusOr<std::span<const float>> RetrievalEngine::Prefill(std::span<const int32_t> tokens,
                                                                const AttentionOptions& options) {
  KVR_RETURN_IF_ERROR(ValidateAttentionOptions(options));
  if (tokens.empty()) return absl::InvalidArgumentError("Prefill: empty prompt");
  if (static_cast<int64_t>(tokens.size()) > max_seq_len_) {
    return absl::InvalidArgumentError(absl::StrCat("Prefill: ", tokens.size(),
                                                   " tokens exceed max_seq_len ", max_seq_len_));
  }
  if (options.mode == AttentionMode::kRetrieval && client_ == nullptr) {
    return absl::FailedPreconditionError("Prefill: retrieval mode needs a RetrievalClient");
  }
  KVR_RETURN_IF_ERROR(EndSequence());
  attention_ = options;
  stats_ = EngineStats{};
  coverage_ = StepCoverage{};
  stats_.prompt_tokens = static_cast<int64_t>(tokens.size());
  const Clock::time_point start = Clock::now();
  if (options.mode == AttentionMode::kFull) {
    if (full_ == nullptr) {
      LlamaModelOptions mo;
      mo.max_seq_len = max_seq_len_;
      mo.max_batch_tokens = max_batch_;
      KVR_ASSIGN_OR_RETURN(full_, LlamaModel::Create(backend_, weights_, mo));
    }
    KVR_ASSIGN_OR_RETURN(std::span<const float> logits, full_->Prefill(tokens));
    std::copy(logits.begin(), logits.end(), logits_host_.begin());
  } else {
    KVR_RETURN_IF_ERROR(PrefillRetrieval(tokens));
  }
  position_ = static_cast<int64_t>(tokens.size());
  active_ = true;
  stats_.prefill_seconds = Seconds(start);
  return std::span<const float>(logits_host_);
}

absl::Status RetrievalEngine::PrefillRetrieval(std::span<const int32_t> tokens) {
  const LlamaConfig& c = weights_->config;
  Backend& b = *backend_;
  const int64_t n = static_cast<int64_t>(tokens.size());
  const int64_t s = attention_.sinks, w = attention_.window;
  KVR_RETURN_IF_ERROR(PrepareStatic());

  sequence_id_ = next_sequence_id.fetch_add(1);
  retrieval::SequenceSpec spec;
  spec.sequence_id = sequence_id_;
  spec.n_layers = c.n_layers;
  spec.n_heads = c.n_heads;
  spec.n_kv_heads = c.n_kv_heads;
  spec.head_dim = c.head_dim;
  spec.value_dtype = attention_.value_dtype;
  spec.index_type = attention_.index;
  KVR_RETURN_IF_ERROR(client_->CreateSequence(spec));
  on_node_ = true;
  node_end_ = s;

  if (n > prefill_capacity_) {
    auto act = [&](int64_t rows, int64_t cols) { return b.Allocate(DType::kF32, rows, cols); };
    KVR_ASSIGN_OR_RETURN(px_, act(n, c.dim));
    KVR_ASSIGN_OR_RETURN(pxb_, act(n, c.dim));
    KVR_ASSIGN_OR_RETURN(pxb2_, act(n, c.dim));
    KVR_ASSIGN_OR_RETURN(pq_, act(n, c.q_dim()));
    KVR_ASSIGN_OR_RETURN(patt_, act(n, c.q_dim()));
    KVR_ASSIGN_OR_RETURN(pk_, act(n, c.kv_dim()));
    KVR_ASSIGN_OR_RETURN(pv_, act(n, c.kv_dim()));
    KVR_ASSIGN_OR_RETURN(phb_, act(max_batch_, c.hidden_dim));
    KVR_ASSIGN_OR_RETURN(phb2_, act(max_batch_, c.hidden_dim));
    prefill_capacity_ = n;
  }
  positions_.resize(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) positions_[i] = static_cast<int32_t>(i);
  const AttentionShape shape = c.attention_shape();
  const Tensor x = px_.Rows(0, n), xb = pxb_.Rows(0, n), xb2 = pxb2_.Rows(0, n),
               q = pq_.Rows(0, n), att = patt_.Rows(0, n), k = pk_.Rows(0, n),
               v = pv_.Rows(0, n);
  const bool offload = n > s + w;
  pk_host_.resize(static_cast<size_t>(n * c.kv_dim()));
  pv_host_.resize(static_cast<size_t>(n * c.kv_dim()));
  if (offload) pq_host_.resize(static_cast<size_t>(n * c.q_dim()));

  KVR_RETURN_IF_ERROR(b.Embedding(token_embedding_, tokens, x));
  for (int l = 0; l < c.n_layers; ++l) {
    const Layer& layer = layers_[l];
    KVR_RETURN_IF_ERROR(b.RmsNorm(x, layer.attn_norm, c.rms_eps, xb));
    KVR_RETURN_IF_ERROR(b.MatMul(xb, layer.wq, q));
    KVR_RETURN_IF_ERROR(b.MatMul(xb, layer.wk, k));
    KVR_RETURN_IF_ERROR(b.MatMul(xb, layer.wv, v));
    KVR_RETURN_IF_ERROR(b.Rope(q, c.n_heads, c.head_dim, positions_, inv_freq_, c.rope_style));
    KVR_RETURN_IF_ERROR(b.Rope(k, c.n_kv_heads, c.head_dim, positions_, inv_freq_, c.rope_style));
    for (int64_t begin = 0; begin < n; begin += max_batch_) {
      const int64_t rows = std::min(max_batch_, n - begin);
      KVR_RETURN_IF_ERROR(b.Attention(q.Rows(begin, rows), k, v, shape, begin,
                                      att.Rows(begin, rows)));
    }
    // Hand-off: sinks and window to the static cache, the middle to the node.
    KVR_RETURN_IF_ERROR(b.DownloadF32(k, pk_host_));
    KVR_RETURN_IF_ERROR(b.DownloadF32(v, pv_host_));
    const size_t kv = static_cast<size_t>(c.kv_dim());
    for (int64_t p = 0; p < n; ++p) {
      if (p >= s && p < n - w) continue;
      const int64_t slot = Slot(p);
      KVR_RETURN_IF_ERROR(b.UploadF32({pk_host_.data() + p * kv, kv}, layer.k_static.Rows(slot, 1)));
      KVR_RETURN_IF_ERROR(b.UploadF32({pv_host_.data() + p * kv, kv}, layer.v_static.Rows(slot, 1)));
    }
    if (offload) {
      KVR_RETURN_IF_ERROR(b.DownloadF32(q, pq_host_));
      KVR_RETURN_IF_ERROR(OffloadPrefill(l, n));
    }
    KVR_RETURN_IF_ERROR(b.MatMul(att, layer.wo, xb2));
    KVR_RETURN_IF_ERROR(b.Add(x, xb2));
    KVR_RETURN_IF_ERROR(b.RmsNorm(x, layer.ffn_norm, c.rms_eps, xb));
    for (int64_t begin = 0; begin < n; begin += max_batch_) {
      const int64_t rows = std::min(max_batch_, n - begin);
      const Tensor hb = phb_.Rows(0, rows), hb2 = phb2_.Rows(0, rows);
      KVR_RETURN_IF_ERROR(b.MatMul(xb.Rows(begin, rows), layer.w1, hb));
      KVR_RETURN_IF_ERROR(b.MatMul(xb.Rows(begin, rows), layer.w3, hb2));
      KVR_RETURN_IF_ERROR(b.SwiGlu(hb, hb2, hb));
      KVR_RETURN_IF_ERROR(b.MatMul(hb, layer.w2, xb2.Rows(begin, rows)));
    }
    KVR_RETURN_IF_ERROR(b.Add(x, xb2));
  }
  if (offload) node_end_ = n - w;
  stats_.offloaded_tokens = node_end_ - s;
  return Logits(x.Rows(n - 1, 1), xb.Rows(0, 1));
}

absl::Status RetrievalEngine::OffloadPrefill(int layer, int64_t prompt_len) {
  const LlamaConfig& c = weights_->config;
  const int64_t s = attention_.sinks, w = attention_.window;
  const size_t d = static_cast<size_t>(c.head_dim);
  const size_t kv = static_cast<size_t>(c.kv_dim()), qd = static_cast<size_t>(c.q_dim());
  const size_t mid = static_cast<size_t>(prompt_len - w - s);
  const size_t group = static_cast<size_t>(c.n_heads / c.n_kv_heads);
  const size_t train_rows = static_cast<size_t>(prompt_len) * group;
  const int topk = static_cast<int>(std::min<size_t>(static_cast<size_t>(attention_.train_k), mid));
  train_queries_.resize(train_rows * d);
  train_ids_.resize(train_rows * static_cast<size_t>(topk));
  train_scores_.resize(train_ids_.size());
  for (int g = 0; g < c.n_kv_heads; ++g) {
    const ConstMatrixView keys(pk_host_.data() + static_cast<size_t>(s) * kv + g * d, mid, d, kv);
    const ConstMatrixView values(pv_host_.data() + static_cast<size_t>(s) * kv + g * d, mid, d, kv);
    // Every prefill query of the kv head's query heads trains its index.
    for (size_t p = 0; p < static_cast<size_t>(prompt_len); ++p) {
      for (size_t j = 0; j < group; ++j) {
        const float* src = pq_host_.data() + p * qd + (g * group + j) * d;
        std::copy_n(src, d, train_queries_.data() + (p * group + j) * d);
      }
    }
    const ConstMatrixView queries(train_queries_.data(), train_rows, d);
    KVR_RETURN_IF_ERROR(index::ExactTopK(keys, queries, topk, train_ids_, train_scores_,
                                         /*pool=*/nullptr));
    retrieval::ShardUpload up;
    up.key = {sequence_id_, layer, g, 0};
    up.first_position = s;
    up.keys = keys;
    up.values = values;
    up.train_topk = train_ids_;
    up.train_topk_width = static_cast<size_t>(topk);
    KVR_RETURN_IF_ERROR(client_->UploadShard(up));
  }
  return absl::OkStatus();
}

absl::Status RetrievalEngine::Logits(const Tensor& last_row, const Tensor& scratch_row) {
  const LlamaConfig& c = weights_->config;
  KVR_RETURN_IF_ERROR(backend_->RmsNorm(last_row, final_norm_, c.rms_eps, scratch_row));
  KVR_RETURN_IF_ERROR(backend_->MatMul(scratch_row, classifier_, logits_));
  return backend_->DownloadF32(logits_, logits_host_);
}

absl::StatusOr<std::span<const float>> RetrievalEngine::DecodeStep(int32_t token) {
  if (!active_) return absl::FailedPreconditionError("DecodeStep: no sequence (call Prefill)");
  if (position_ >= max_seq_len_) {
    return absl::OutOfRangeError(
        absl::StrCat("DecodeStep: sequence full at max_seq_len ", max_seq_len_));
  }
  const Clock::time_point start = Clock::now();
  if (attention_.mode == AttentionMode::kFull) {
    KVR_ASSIGN_OR_RETURN(std::span<const float> logits, full_->DecodeStep(token, position_));
    std::copy(logits.begin(), logits.end(), logits_host_.begin());
    coverage_ = StepCoverage{position_, 0, 0, 0, 0, position_ + 1};
    stats_.local_tokens += position_ + 1;
  } else {
    const absl::Status st = DecodeRetrieval(token).status();
    if (!st.ok()) {
      // Some layers may have appended to the node: the sequence cannot go on.
      active_ = false;
      return st;
    }
  }
  ++position_;
  ++stats_.decode_steps;
  stats_.decode_seconds += Seconds(start);
  return std::span<const float>(logits_host_);
}

absl::StatusOr<std::span<const float>> RetrievalEngine::DecodeRetrieval(int32_t token) {
  const LlamaConfig& c = weights_->config;
  Backend& b = *backend_;
  const int64_t pos = position_;
  const int64_t s = attention_.sinks, w = attention_.window;
  const int32_t pos32 = static_cast<int32_t>(pos);
  const std::span<const int32_t> positions(&pos32, 1);
  const AttentionShape shape = c.attention_shape();
  const size_t d = static_cast<size_t>(c.head_dim);
  const int64_t slot = Slot(pos);
  // The token leaving the window this step (it shares the new token's slot).
  const int64_t leaving = pos - w;
  const bool evict = leaving >= s;
  if (evict) KVR_CHECK_MSG(leaving == node_end_, "window eviction out of order");
  const int64_t node_end = evict ? leaving + 1 : node_end_;
  const int64_t local_rows = std::min(pos + 1, static_rows_);

  coverage_.pos = pos;
  coverage_.sink_end = std::min(pos + 1, s);
  coverage_.node_begin = s;
  coverage_.node_end = std::max(s, node_end);
  coverage_.window_begin = std::max(s, node_end);
  coverage_.window_end = pos + 1;
  KVR_CHECK_MSG(coverage_.attended() == pos + 1 &&
                    local_rows == coverage_.sink_end + (coverage_.window_end -
                                                        coverage_.window_begin),
                "attention coverage: sinks + node + window != [0, pos]");
  const bool ask_node = node_end > s;

  KVR_RETURN_IF_ERROR(b.Embedding(token_embedding_, std::span<const int32_t>(&token, 1), x1_));
  for (int l = 0; l < c.n_layers; ++l) {
    const Layer& layer = layers_[l];
    const Tensor k_row = layer.k_static.Rows(slot, 1), v_row = layer.v_static.Rows(slot, 1);
    KVR_RETURN_IF_ERROR(b.RmsNorm(x1_, layer.attn_norm, c.rms_eps, xb1_));
    if (evict) {
      KVR_RETURN_IF_ERROR(b.DownloadF32(k_row, k_row_host_));
      KVR_RETURN_IF_ERROR(b.DownloadF32(v_row, v_row_host_));
      for (int g = 0; g < c.n_kv_heads; ++g) {
        retrieval::AppendRequest req;
        req.sequence_id = sequence_id_;
        req.layer = l;
        req.kv_head = g;
        req.first_position = leaving;
        req.keys = ConstMatrixView(k_row_host_.data() + g * d, 1, d);
        req.values = ConstMatrixView(v_row_host_.data() + g * d, 1, d);
        KVR_RETURN_IF_ERROR(client_->Append(req));
      }
    }
    KVR_RETURN_IF_ERROR(b.MatMul(xb1_, layer.wq, q1_));
    KVR_RETURN_IF_ERROR(b.MatMul(xb1_, layer.wk, k_row));
    KVR_RETURN_IF_ERROR(b.MatMul(xb1_, layer.wv, v_row));
    KVR_RETURN_IF_ERROR(b.Rope(q1_, c.n_heads, c.head_dim, positions, inv_freq_, c.rope_style));
    KVR_RETURN_IF_ERROR(
        b.Rope(k_row, c.n_kv_heads, c.head_dim, positions, inv_freq_, c.rope_style));

    retrieval::StatusWaiter waiter;
    retrieval::AttendStats attend_stats;
    if (ask_node) {
      KVR_RETURN_IF_ERROR(b.DownloadF32(q1_, q_host_));
      retrieval::AttendRequest req;
      req.sequence_id = sequence_id_;
      req.layer = l;
      req.queries = ConstMatrixView(q_host_.data(), static_cast<size_t>(c.n_heads), d);
      req.k = attention_.top_k;
      req.beam = attention_.beam;
      client_->AttendAsync(req, node_partials_.view(), &attend_stats, waiter.callback());
    }
    // The static pattern (sinks + window, in slot order: no mask needed).
    const absl::Status local =
        b.PartialAttention(q1_, layer.k_static, layer.v_static, shape,
                           /*first_pos=*/local_rows, 0, local_rows, o1_, m1_, l1_);
    if (ask_node) {
      // Always wait: the node writes into node_partials_ and attend_stats.
      const Clock::time_point wait = Clock::now();
      const absl::Status remote = waiter.Wait();
      stats_.node_wait_seconds += Seconds(wait);
      KVR_RETURN_IF_ERROR(local);
      KVR_RETURN_IF_ERROR(remote);
      ++stats_.attend_calls;
      stats_.retrieved_tokens += static_cast<double>(attend_stats.keys_attended) /
                                 (static_cast<double>(c.n_heads) * c.n_layers);
      KVR_RETURN_IF_ERROR(b.UploadF32(node_partials_.o.data, o2_));
      KVR_RETURN_IF_ERROR(b.UploadF32(node_partials_.m, m2_));
      KVR_RETURN_IF_ERROR(b.UploadF32(node_partials_.l, l2_));
      KVR_RETURN_IF_ERROR(b.MergeAttention(o1_, m1_, l1_, o2_, m2_, l2_, c.head_dim));
    } else {
      KVR_RETURN_IF_ERROR(local);
    }
    KVR_RETURN_IF_ERROR(b.MatMul(o1_, layer.wo, xb2_1_));
    KVR_RETURN_IF_ERROR(b.Add(x1_, xb2_1_));
    KVR_RETURN_IF_ERROR(b.RmsNorm(x1_, layer.ffn_norm, c.rms_eps, xb1_));
    KVR_RETURN_IF_ERROR(b.MatMul(xb1_, layer.w1, hb1_));
    KVR_RETURN_IF_ERROR(b.MatMul(xb1_, layer.w3, hb2_1_));
    KVR_RETURN_IF_ERROR(b.SwiGlu(hb1_, hb2_1_, hb1_));
    KVR_RETURN_IF_ERROR(b.MatMul(hb1_, layer.w2, xb2_1_));
    KVR_RETURN_IF_ERROR(b.Add(x1_, xb2_1_));
  }
  node_end_ = node_end;
  stats_.offloaded_tokens = node_end_ - s;
  stats_.local_tokens += local_rows;
  stats_.node_held_tokens += node_end_ - s;
  KVR_RETURN_IF_ERROR(Logits(x1_, xb1_));
  return std::span<const float>(logits_host_);
}

}  // namespace kvr::worker
