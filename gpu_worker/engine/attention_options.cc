#include "gpu_worker/engine/attention_options.h"

#include <string>

#include "absl/strings/str_cat.h"
#include "common/exact_topk.h"
#include "common/status.h"
#include "gpu_worker/model/model_config.h"

namespace kvr::worker {

std::string_view AttentionModeName(AttentionMode mode) {
  return mode == AttentionMode::kFull ? "full" : "retrieval";
}

absl::StatusOr<AttentionMode> ParseAttentionMode(std::string_view name) {
  if (name == "full") return AttentionMode::kFull;
  if (name == "retrieval") return AttentionMode::kRetrieval;
  return absl::InvalidArgumentError(
      absl::StrCat("mode \"", std::string(name), "\" is not one of retrieval, full"));
}

std::string_view EstimateModeName(EstimateMode mode) {
  switch (mode) {
    case EstimateMode::kOff:
      return "off";
    case EstimateMode::kOn:
      return "on";
    case EstimateMode::kDefault:
      break;
  }
  return "default";
}

absl::StatusOr<EstimateMode> ParseEstimateMode(std::string_view name) {
  if (name == "default") return EstimateMode::kDefault;
  if (name == "off") return EstimateMode::kOff;
  if (name == "on") return EstimateMode::kOn;
  return absl::InvalidArgumentError(
      absl::StrCat("estimate \"", std::string(name), "\" is not one of default, on, off"));
}

absl::Status ValidateAttentionOptions(const AttentionOptions& o, int64_t max_seq_len) {
  constexpr int kMaxTokens = LlamaConfig::kMaxSeqLen;
  if (max_seq_len < 1 || max_seq_len > kMaxTokens) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_seq_len ", max_seq_len, " outside [1, ", kMaxTokens, "]"));
  }
  if (o.mode != AttentionMode::kFull && o.mode != AttentionMode::kRetrieval) {
    return absl::InvalidArgumentError("mode: unknown attention mode");
  }
  if (o.sinks < 0 || o.sinks > max_seq_len) {
    return absl::InvalidArgumentError(absl::StrCat(
        "sinks ", o.sinks, " outside [0, ", max_seq_len, "] (the model's context)"));
  }
  if (o.window < 1 || o.window > max_seq_len) {
    return absl::InvalidArgumentError(absl::StrCat(
        "window ", o.window, " outside [1, ", max_seq_len, "] (the model's context)"));
  }
  if (o.top_k < 1 || o.top_k > kMaxTopK) {
    return absl::InvalidArgumentError(
        absl::StrCat("top_k ", o.top_k, " outside [1, ", kMaxTopK, "]"));
  }
  if (o.beam < 0 || o.beam > 1 << 16) {
    return absl::InvalidArgumentError(absl::StrCat("beam ", o.beam, " outside [0, 65536]"));
  }
  if (o.train_k < 1 || o.train_k > kMaxTopK) {
    return absl::InvalidArgumentError(
        absl::StrCat("train_k ", o.train_k, " outside [1, ", kMaxTopK, "]"));
  }
  if (o.chunk_tokens < 1 || o.chunk_tokens > kMaxTokens) {
    return absl::InvalidArgumentError(
        absl::StrCat("chunk_tokens ", o.chunk_tokens, " outside [1, ", kMaxTokens, "]"));
  }
  if (o.estimate != EstimateMode::kDefault && o.estimate != EstimateMode::kOff &&
      o.estimate != EstimateMode::kOn) {
    return absl::InvalidArgumentError(absl::StrCat(
        "estimate ", static_cast<int32_t>(o.estimate), " is not one of default, on, off"));
  }
  KVR_RETURN_IF_ERROR(retrieval::ParseIndexType(retrieval::IndexTypeName(o.index)).status());
  return DTypeFromTag(static_cast<uint32_t>(o.value_dtype)).status();
}

}  // namespace kvr::worker
