// A Tokenizer over a Hugging Face tokenizer.json with a byte-level BPE model
// (Llama 3 / 3.1, GPT-2 family).
//
// Supported tokenizer.json: model.type "BPE" (vocab, merges as "a b" strings
// or [a, b] pairs, ignore_merges), no normalizer, and one of two
// pre-tokenizers:
//   - kLlama3: Sequence[Split(Llama-3 regex, Isolated), ByteLevel(use_regex
//     false)], the Llama-3 pattern
//       (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|
//       ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
//   - kGpt2: ByteLevel(use_regex true), the GPT-2 pattern
//       's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
// Anything else (other normalizers, pre-tokenizers or models) is
// Unimplemented naming the part.
//
// The patterns are implemented by a hand-written scanner over UTF-8 code
// points, not a regex engine. Its limits: \p{L} / \p{N} are the Unicode 14.0
// general categories L* / N* (characters assigned later count as neither);
// \s is the Unicode White_Space property (as in Rust regex / Oniguruma, which
// HF tokenizers uses; JavaScript's \s differs at U+0085 and U+FEFF); the
// case-insensitive contractions fold ASCII only ('S matches, 'ſ does not);
// invalid UTF-8 bytes are scanned as single "other" characters (HF accepts
// only valid UTF-8).
//
// Encode: the text is first split on added tokens (tokenizer.json
// added_tokens, e.g. "<|begin_of_text|>"; leftmost, longest match; their
// lstrip/rstrip/single_word flags are ignored), so special tokens written in
// the text become their ids, as in HF's default. Each remaining segment is
// pre-tokenized, each piece mapped byte-wise through the GPT-2 byte-to-unicode
// table and merged by BPE: the lowest-rank adjacent pair first (leftmost on
// ties) until no pair has a merge; with ignore_merges a piece that is itself
// in the vocabulary is emitted directly. O(n log n) in the piece length. A
// byte whose single-character token is missing from the vocabulary is
// InvalidArgument (HF silently drops it). BOS / EOS are added only when asked
// (the tokenizer.json post_processor is not applied).
//
// Decode(prev, id) gives the token's bytes (the byte-level mapping undone;
// added tokens as their content); pieces may be partial UTF-8. bos_id /
// eos_id come from tokenizer_config.json's bos_token / eos_token when Load
// finds one beside tokenizer.json, else from the first present of
// "<|begin_of_text|>", "<s>", "<|endoftext|>" (BOS) and "<|end_of_text|>",
// "</s>", "<|endoftext|>" (EOS). Immutable after loading; thread-safe.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "gpu_worker/model/tokenizer.h"

namespace kvr::worker {

enum class PreTokenizer { kLlama3, kGpt2 };

// The pieces `text` splits into under `kind` (views into `text`; their
// concatenation is `text`).
std::vector<std::string_view> PreTokenize(PreTokenizer kind, std::string_view text);

struct HfBpeOptions {
  // Token strings for BOS / EOS; empty = tokenizer_config.json or the
  // well-known names above.
  std::string bos_token;
  std::string eos_token;
};

class HfBpeTokenizer final : public Tokenizer {
 public:
  // Reads tokenizer.json at `path`, and tokenizer_config.json from the same
  // directory when present. NotFound when `path` cannot be opened.
  static absl::StatusOr<std::unique_ptr<HfBpeTokenizer>> Load(const std::string& path,
                                                              HfBpeOptions options = {});
  // Parses tokenizer.json text; `name` for errors. InvalidArgument for
  // malformed JSON or inconsistent vocab / merges; Unimplemented for
  // unsupported components.
  static absl::StatusOr<std::unique_ptr<HfBpeTokenizer>> Parse(std::string_view json,
                                                               const std::string& name,
                                                               const HfBpeOptions& options = {});

  absl::StatusOr<std::vector<int32_t>> Encode(std::string_view text, bool add_bos,
                                              bool add_eos = false) const override;
  absl::StatusOr<std::string> Decode(int32_t prev_id, int32_t id) const override;
  int32_t bos_id() const override { return bos_; }
  int32_t eos_id() const override { return eos_; }
  // 1 + the largest id of the vocabulary and the added tokens.
  int32_t vocab_size() const override { return static_cast<int32_t>(tokens_.size()); }

  // The id of a token string as stored (byte-level form, e.g. "Ġthe"), or -1.
  int32_t TokenId(std::string_view token) const;
  PreTokenizer pre_tokenizer() const { return pre_; }

 private:
  HfBpeTokenizer() = default;
  absl::Status EncodePiece(std::string_view piece, std::vector<int32_t>* out) const;

  struct Merge {
    int32_t rank;
    int32_t id;
  };
  struct AddedToken {
    std::string content;
    int32_t id;
  };

  PreTokenizer pre_ = PreTokenizer::kLlama3;
  bool add_prefix_space_ = false;  // GPT-2 ByteLevel option
  bool ignore_merges_ = false;
  std::vector<std::string> tokens_;  // by id, byte-level form; "" for holes
  std::vector<uint8_t> is_added_;    // by id
  std::unordered_map<std::string, int32_t> vocab_;
  std::unordered_map<uint64_t, Merge> merges_;  // (left id << 32 | right id)
  std::vector<AddedToken> added_;               // longest content first
  int32_t byte_token_[256];                     // id of each byte's one-char token, or -1
  int32_t bos_ = -1, eos_ = -1;
};

}  // namespace kvr::worker
