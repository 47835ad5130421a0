// A Hugging Face checkpoint's chat settings: the chat template, its
// bos/eos token strings (tokenizer_config.json) and the end-of-turn token
// ids generation stops at (generation_config.json `eos_token_id`, an id or a
// list, plus tokenizer_config.json's eos_token). The worker reports them in
// GetModelInfo (chat_template, bos_token, eos_token, stop_token_ids) and
// stops every request at the stop ids; the gateway renders the template.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "gpu_worker/model/tokenizer.h"

namespace kvr::worker {

// Largest chat template accepted (the gateway's renderer has the same bound).
inline constexpr size_t kMaxChatTemplateBytes = 64 * 1024;
// Largest tokenizer_config.json / generation_config.json read (Llama-3's
// tokenizer_config.json is ~50 KiB: 256 added tokens).
inline constexpr size_t kMaxChatConfigFileBytes = 16 << 20;
// Most end-of-turn ids kept.
inline constexpr size_t kMaxStopTokenIds = 64;

struct ChatConfig {
  std::string chat_template;  // empty: the model has none
  std::string bos_token;
  std::string eos_token;
  std::vector<int32_t> stop_token_ids;  // besides the tokenizer's eos_id
};

// Parses tokenizer_config.json text: `chat_template` as a string, or as a
// list of {"name", "template"} (the one named "default"; InvalidArgument
// when there is none), `bos_token` / `eos_token` as strings or {"content"}
// objects (null or absent: empty). InvalidArgument naming the field and
// `what` (the file) for malformed JSON, a wrong type or a template over
// kMaxChatTemplateBytes.
absl::StatusOr<ChatConfig> ParseTokenizerConfig(absl::string_view json_text, absl::string_view what);

// The `eos_token_id` of generation_config.json text (an int or a list of at
// most kMaxStopTokenIds ints; absent: none).
absl::StatusOr<std::vector<int32_t>> ParseGenerationConfigEos(absl::string_view json_text,
                                                              absl::string_view what);

// The chat config of a checkpoint: `model_dir`'s tokenizer_config.json and
// generation_config.json when present (model_dir empty or not a directory:
// none), then `override_file` (--chat_template) when set: a
// tokenizer_config.json (by its .json extension; its template, bos and eos
// replace the model's) or a raw Jinja template file (replaces the template
// only). Stop ids: generation_config's eos ids, plus eos_token when the
// tokenizer encodes it to exactly one id; the tokenizer's own eos_id and
// ids outside the vocabulary are left out.
absl::StatusOr<ChatConfig> ReadChatConfig(const std::string& model_dir,
                                          const std::string& override_file,
                                          const Tokenizer& tokenizer);

// `base` with extra end-of-turn ids: IsStopToken is also true for them.
// Everything else is `base`'s. `base` must outlive it.
class StopTokenTokenizer : public Tokenizer {
 public:
  StopTokenTokenizer(const Tokenizer* base, std::vector<int32_t> stop_ids)
      : base_(base), stop_ids_(std::move(stop_ids)) {}
  absl::StatusOr<std::vector<int32_t>> Encode(std::string_view text, bool add_bos,
                                              bool add_eos) const override {
    return base_->Encode(text, add_bos, add_eos);
  }
  absl::StatusOr<std::string> Decode(int32_t prev_id, int32_t id) const override {
    return base_->Decode(prev_id, id);
  }
  int32_t bos_id() const override { return base_->bos_id(); }
  int32_t eos_id() const override { return base_->eos_id(); }
  int32_t vocab_size() const override { return base_->vocab_size(); }
  size_t max_bytes_per_token() const override { return base_->max_bytes_per_token(); }
  bool IsStopToken(int32_t id) const override;

 private:
  const Tokenizer* base_;
  std::vector<int32_t> stop_ids_;
};

}  // namespace kvr::worker
