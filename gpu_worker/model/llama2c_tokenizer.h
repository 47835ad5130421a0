// The llama2.c tokenizer (tok*.bin written by llama2.c's tokenizer.py):
//   int32 max_token_length, then per token: float32 score, int32 len, len bytes.
// The file does not store the vocabulary size; the model's does.
//
// Encode reproduces run.c's encode() exactly (in O(n log n) time rather than
// run.c's O(n^2): a 1 MiB text takes well under a second): BOS (1); a dummy-prefix " "
// token when the text is non-empty; one token per UTF-8 codepoint (at most 4
// bytes), or byte-fallback tokens (byte + 3, i.e. "<0xXX>" pieces at ids
// 3..258) for codepoints not in the vocabulary; then repeatedly the adjacent
// pair whose concatenation is in the vocabulary with the highest score is
// merged (leftmost on ties; BOS takes part, as in run.c); EOS (2) last.
// Decode drops the piece's leading space after BOS and turns "<0xXX>" pieces
// into the raw byte, like run.c's decode().
#pragma once

#include <cstddef>
#include <memory>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

#include "gpu_worker/model/tokenizer.h"

namespace kvr::worker {

class Llama2cTokenizer final : public Tokenizer {
 public:
  // Reads `vocab_size` entries (<= 0: every entry up to the end of the file).
  // DataLoss naming the entry for a truncated file; InvalidArgument for a bad
  // max_token_length or length field.
  static absl::StatusOr<std::unique_ptr<Llama2cTokenizer>> Load(const std::string& path,
                                                                int vocab_size);
  static absl::StatusOr<std::unique_ptr<Llama2cTokenizer>> Parse(std::span<const std::byte> data,
                                                                 int vocab_size,
                                                                 const std::string& name);

  absl::StatusOr<std::vector<int32_t>> Encode(std::string_view text, bool add_bos,
                                              bool add_eos = false) const override;
  absl::StatusOr<std::string> Decode(int32_t prev_id, int32_t id) const override;
  int32_t bos_id() const override { return 1; }
  int32_t eos_id() const override { return 2; }
  int32_t vocab_size() const override { return static_cast<int32_t>(pieces_.size()); }
  // The longest piece: an output token stands for at most its piece's bytes
  // (a byte-fallback piece "<0xXX>" for one byte). 0 when <unk> (emitted for
  // unknown bytes without byte fallback) is empty, since merges with it
  // could then cover any number of bytes.
  size_t max_bytes_per_token() const override { return max_bytes_per_token_; }

  // The raw piece and merge score of `id` (valid ids only).
  const std::string& piece(int32_t id) const { return pieces_[static_cast<size_t>(id)]; }
  float score(int32_t id) const { return scores_[static_cast<size_t>(id)]; }
  // The id of an exact piece, or -1 (the lowest id when a piece repeats).
  int32_t Lookup(std::string_view piece) const;

 private:
  Llama2cTokenizer() = default;

  std::vector<std::string> pieces_;
  std::vector<float> scores_;
  std::unordered_map<std::string_view, int32_t> index_;  // views into pieces_
  bool byte_fallback_ = false;                           // ids 3..258 are "<0x00>".."<0xFF>"
  size_t max_bytes_per_token_ = 0;
};

}  // namespace kvr::worker
