// A Tokenizer over a SentencePiece model file (tokenizer.model of Llama 2 and
// other SentencePiece-based Llamas), backed by Debian's libsentencepiece.
//
// Encode is SentencePiece's own encoding (normalization, dummy prefix, BPE or
// unigram, byte fallback as the model specifies), then BOS / EOS as asked.
// Decode(prev, id) gives the piece with "▁" (U+2581) turned into ' ', the
// leading space dropped right after BOS (as llama2.c does), "<0xXX>" byte
// pieces as the raw byte, control pieces (<s>, </s>) as "", and the unknown
// piece as " ⁇ " (SentencePiece's default unk surface).
// Thread-safe: Encode and Decode are const and SentencePiece's encoder is
// thread-safe for concurrent const use.
#pragma once

#include <memory>
#include <string>

#include "gpu_worker/model/tokenizer.h"

namespace sentencepiece {
class SentencePieceProcessor;
}

namespace kvr::worker {

class SentencePieceTokenizer final : public Tokenizer {
 public:
  // NotFound when the file cannot be opened; InvalidArgument when it is not a
  // SentencePiece model, or has no BOS / EOS piece.
  static absl::StatusOr<std::unique_ptr<SentencePieceTokenizer>> Load(const std::string& path);
  // The same from the serialized ModelProto bytes; `name` for errors.
  static absl::StatusOr<std::unique_ptr<SentencePieceTokenizer>> Parse(std::string_view model,
                                                                       const std::string& name);
  ~SentencePieceTokenizer() override;

  absl::StatusOr<std::vector<int32_t>> Encode(std::string_view text, bool add_bos,
                                              bool add_eos = false) const override;
  absl::StatusOr<std::string> Decode(int32_t prev_id, int32_t id) const override;
  int32_t bos_id() const override { return bos_; }
  int32_t eos_id() const override { return eos_; }
  int32_t vocab_size() const override { return vocab_; }

  // The raw piece of `id` ("▁Hello", "<0x0A>"); valid ids only.
  const std::string& piece(int32_t id) const;

 private:
  SentencePieceTokenizer();

  std::unique_ptr<sentencepiece::SentencePieceProcessor> sp_;
  int32_t bos_ = -1, eos_ = -1, vocab_ = 0;
};

}  // namespace kvr::worker
