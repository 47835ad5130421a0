// The tokenizer interface the worker uses (llama2.c, SentencePiece and HF
// tokenizer.json implementations share it). Implementations are immutable
// after loading and thread-safe.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace kvr::worker {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;

  // Token ids of `text` (UTF-8 bytes), preceded by bos_id() when add_bos and
  // followed by eos_id() when add_eos.
  virtual absl::StatusOr<std::vector<int32_t>> Encode(std::string_view text, bool add_bos,
                                                      bool add_eos = false) const = 0;
  // The text of token `id` when it follows `prev_id` (implementations may,
  // e.g., drop a leading space after BOS). Raw-byte tokens give that byte,
  // so pieces may be partial UTF-8. InvalidArgument for an id out of range.
  virtual absl::StatusOr<std::string> Decode(int32_t prev_id, int32_t id) const = 0;

  virtual int32_t bos_id() const = 0;
  virtual int32_t eos_id() const = 0;
  virtual int32_t vocab_size() const = 0;

  // The most bytes of input text one token of Encode's output can stand for,
  // or 0 when the tokenizer cannot bound it (e.g. normalization may drop
  // input). Encode(text) then has at least ceil(text.size() / this) tokens,
  // so a caller can reject text that cannot fit a context before encoding.
  virtual size_t max_bytes_per_token() const { return 0; }

  // Whether sampling `id` ends generation: BOS, EOS, and (chat_config.h's
  // StopTokenTokenizer) a model's extra end-of-turn ids such as Llama-3's
  // <|eot_id|>.
  virtual bool IsStopToken(int32_t id) const { return id == bos_id() || id == eos_id(); }
};

}  // namespace kvr::worker
