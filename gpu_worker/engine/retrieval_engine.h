// RetrievalEngine: runs one sequence at a time on a Backend with either full
// attention (the baseline, = LlamaModel) or RetrievalAttention.
//
// Retrieval mode (DESIGN §1). The worker keeps a static pattern per layer:
// S sink tokens (positions 0 .. S-1) and the W most recent tokens (the
// current one included) in a [S + W x kv_dim] cache (sinks in rows 0 .. S-1,
// position p >= S in the ring slot S + (p - S) mod W). Every other token
// lives on the retrieval node. A decode step at position `pos`, per layer:
//   1. q, k, v of the token; the token leaving the window (pos - W, when
//      >= S) is read from its ring slot and Appended to the node (per kv
//      head) before the new k, v overwrite that slot;
//   2. when the node holds tokens, AttendAsync(all query heads of the layer)
//      starts, and the local partial attention over the static cache runs
//      meanwhile; the node's top-k partials are merged in by log-sum-exp.
// So the attended set is sinks ∪ node ∪ window = [0, pos], disjoint
// (checked every step; last_coverage() exposes it to tests).
//
// Prefill runs layer by layer over the whole prompt (full causal attention,
// chunked over queries). When the prompt is longer than S + W, after each
// layer the middle tokens [S, P - W) of every kv head are uploaded as chunk 0
// with training data: each prefill query's exact top-train_k keys among them
// (queries of all the kv head's query heads), so the node builds the
// attention-aware index while later layers run.
//
// Not thread-safe: one caller at a time.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "common/attention.h"
#include "gpu_worker/backend/backend.h"
#include "gpu_worker/model/llama_model.h"
#include "gpu_worker/model/weights.h"
#include "retrieval_node/client/retrieval_client.h"

namespace kvr::worker {

enum class AttentionMode : uint8_t { kFull = 0, kRetrieval = 1 };
// "full", "retrieval".
std::string_view AttentionModeName(AttentionMode mode);
absl::StatusOr<AttentionMode> ParseAttentionMode(std::string_view name);

// Per-sequence attention settings.
struct AttentionOptions {
  AttentionMode mode = AttentionMode::kRetrieval;
  int sinks = 4;    // S >= 0
  int window = 16;  // W >= 1 (the current token is always local)
  int top_k = 16;   // keys the node attends per query head and shard
  int beam = 0;     // graph beam (0: index default)
  int train_k = 32; // exact top-k per prefill query for the graph build
  retrieval::IndexType index = retrieval::IndexType::kGraph;
  kvr::DType value_dtype = kvr::DType::kF32;  // how the node stores values
};

// InvalidArgument naming the field and its limit.
absl::Status ValidateAttentionOptions(const AttentionOptions& options);

struct EngineOptions {
  // Longest sequence (prompt + generated); 0 = config.seq_len.
  int64_t max_seq_len = 0;
  // Prefill query rows per attention / FFN chunk.
  int64_t max_batch_tokens = 64;
};

// Which positions one decode step attended (retrieval mode). Sinks
// [0, sink_end), node [node_begin, node_end), window [window_begin,
// window_end); a correct step has sink_end == node_begin, node_end ==
// window_begin, window_end == pos + 1 (full mode: window = [0, pos + 1)).
struct StepCoverage {
  int64_t pos = -1;
  int64_t sink_end = 0;
  int64_t node_begin = 0, node_end = 0;
  int64_t window_begin = 0, window_end = 0;
  // Attended positions counted over the three parts (== pos + 1 when each
  // position is attended exactly once).
  int64_t attended() const {
    return sink_end + (node_end - node_begin) + (window_end - window_begin);
  }
};

struct EngineStats {
  int64_t prompt_tokens = 0;
  int64_t decode_steps = 0;
  int64_t offloaded_tokens = 0;  // tokens on the node now (per layer and kv head)
  // Summed over decode steps, per query head and layer on average:
  int64_t local_tokens = 0;       // attended on the worker (sinks + window)
  int64_t node_held_tokens = 0;   // held by the node
  double retrieved_tokens = 0.0;  // attended by the node (top-k)
  int64_t attend_calls = 0;
  double prefill_seconds = 0.0;
  double decode_seconds = 0.0;
  double node_wait_seconds = 0.0;  // blocked on the node after local attention
};

class RetrievalEngine {
 public:
  // `backend` (and `client`, may be null: full mode only) must outlive the
  // engine.
  static absl::StatusOr<std::unique_ptr<RetrievalEngine>> Create(
      Backend* backend, std::shared_ptr<const LlamaWeights> weights,
      retrieval::RetrievalClient* client, const EngineOptions& options = {});
  ~RetrievalEngine();

  // Starts a new sequence (dropping the previous one from the node): runs
  // `tokens` at positions 0 .. n-1 and returns the logits [vocab] of the last.
  // The span stays valid until the next call. InvalidArgument for an empty
  // or too long prompt, bad options or tokens; FailedPrecondition for
  // retrieval mode without a client; node errors pass through.
  absl::StatusOr<std::span<const float>> Prefill(std::span<const int32_t> tokens,
                                                 const AttentionOptions& options);

  // Runs `token` at position position() and returns its logits.
  // FailedPrecondition before Prefill; OutOfRange when the sequence is full.
  absl::StatusOr<std::span<const float>> DecodeStep(int32_t token);

  // Drops the current sequence from the node (no-op when none).
  absl::Status EndSequence();

  const LlamaConfig& config() const { return weights_->config; }
  int64_t max_seq_len() const { return max_seq_len_; }
  // Tokens in the current sequence (the next DecodeStep's position).
  int64_t position() const { return position_; }
  uint64_t sequence_id() const { return sequence_id_; }
  const AttentionOptions& attention() const { return attention_; }
  const StepCoverage& last_coverage() const { return coverage_; }
  const EngineStats& stats() const { return stats_; }

 private:
  struct Layer {
    Tensor attn_norm, wq, wk, wv, wo, ffn_norm, w1, w2, w3;
    Tensor k_static, v_static;  // [S + W x kv_dim]
  };

  RetrievalEngine() = default;
  absl::Status Init(Backend* backend, std::shared_ptr<const LlamaWeights> weights,
                    retrieval::RetrievalClient* client, const EngineOptions& options);
  absl::Status PrepareStatic();
  absl::Status PrefillRetrieval(std::span<const int32_t> tokens);
  // Uploads layer `layer`'s middle tokens [S, P - W) from host K/V/Q of the
  // whole prompt.
  absl::Status OffloadPrefill(int layer, int64_t prompt_len);
  absl::StatusOr<std::span<const float>> DecodeRetrieval(int32_t token);
  absl::Status Logits(const Tensor& last_row, const Tensor& scratch_row);
  int64_t Slot(int64_t pos) const;

  Backend* backend_ = nullptr;
  retrieval::RetrievalClient* client_ = nullptr;
  std::shared_ptr<const LlamaWeights> weights_;
  int64_t max_seq_len_ = 0;
  int64_t max_batch_ = 0;
  std::unique_ptr<LlamaModel> full_;  // full mode, created on first use

  AttentionOptions attention_;
  bool active_ = false;
  bool on_node_ = false;  // sequence_id_ registered on the node
  uint64_t sequence_id_ = 0;
  int64_t position_ = 0;
  int64_t node_end_ = 0;  // node holds [sinks, node_end_)
  int64_t static_rows_ = 0;
  StepCoverage coverage_;
  EngineStats stats_;

  Tensor token_embedding_, final_norm_, classifier_, inv_freq_;
  std::vector<Layer> layers_;
  // Decode activations [1 x ...].
  Tensor x1_, xb1_, xb2_1_, q1_, o1_, m1_, l1_, o2_, m2_, l2_, hb1_, hb2_1_;
  Tensor logits_;
  std::vector<float> logits_host_;
  // Prefill activations, sized for prefill_capacity_ rows.
  int64_t prefill_capacity_ = 0;
  Tensor px_, pxb_, pxb2_, pq_, patt_, pk_, pv_, phb_, phb2_;
  // Host staging.
  std::vector<float> q_host_;                 // n_heads * head_dim
  std::vector<float> k_row_host_, v_row_host_;  // kv_dim
  std::vector<float> pk_host_, pv_host_, pq_host_;  // prefill K/V/Q of one layer
  std::vector<float> train_queries_;
  std::vector<int64_t> train_ids_;
  std::vector<float> train_scores_;
  Partials node_partials_;
  std::vector<int32_t> positions_;
};

}  // namespace kvr::worker
