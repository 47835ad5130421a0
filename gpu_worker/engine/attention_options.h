// Per-sequence attention settings of the decode engine: full attention or
// RetrievalAttention (sinks + window on the worker, the rest on retrieval
// nodes), and the knobs of the latter.
#pragma once

#include <cstdint>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/value_matrix.h"
#include "gpu_worker/model/model_config.h"
#include "retrieval_node/client/retrieval_client.h"

namespace kvr::worker {

enum class AttentionMode : uint8_t { kFull = 0, kRetrieval = 1 };
// "full", "retrieval".
std::string_view AttentionModeName(AttentionMode mode);
absl::StatusOr<AttentionMode> ParseAttentionMode(std::string_view name);

// Remainder estimation per Attend (issue 18; retrieval::EstimateMode):
// "default" (the node's --estimate), "off", "on".
using retrieval::EstimateMode;
std::string_view EstimateModeName(EstimateMode mode);
// InvalidArgument naming the value and the accepted names.
absl::StatusOr<EstimateMode> ParseEstimateMode(std::string_view name);

// Per-sequence attention settings.
struct AttentionOptions {
  AttentionMode mode = AttentionMode::kRetrieval;
  int sinks = 4;    // S >= 0
  int window = 16;  // W >= 1 (the current token is always local)
  int top_k = 16;   // keys the node attends per query head and shard
  int beam = 0;     // graph beam (0: index default)
  int train_k = 32; // exact top-k per prefill query for the graph build
  // Offloaded tokens per node shard (placement chunk) of one (layer, kv
  // head), >= 1. Each chunk gets its own index and its own top_k, and chunks
  // are placed on nodes independently.
  int chunk_tokens = 16384;
  retrieval::IndexType index = retrieval::IndexType::kGraph;
  kvr::DType value_dtype = kvr::DType::kF32;  // how the node stores values
  // Whether the nodes add an estimate of the keys top-k leaves behind
  // (AttendRequest::estimate): kDefault leaves it to each node's --estimate.
  EstimateMode estimate = EstimateMode::kDefault;
};

// InvalidArgument naming the field and its limit. `max_seq_len` is the
// engine's context (tokens): sinks and window are each at most max_seq_len,
// and the engine keeps min(sinks + window, max_seq_len) K/V rows per layer
// (a window reaching past the context is the whole context; a full-attention
// sequence keeps max_seq_len rows), so one request's memory is bounded by the
// model, not by the client. top_k and train_k are at most kMaxTopK
// (common/exact_topk.h); chunk_tokens (a shard size, not an allocation) at
// most LlamaConfig::kMaxSeqLen.
absl::Status ValidateAttentionOptions(const AttentionOptions& options,
                                      int64_t max_seq_len = LlamaConfig::kMaxSeqLen);

}  // namespace kvr::worker
