// Helpers the harnesses share: where the reference inputs are, and the
// "load from the input, or encode the input with a reference" split the
// tokenizer harnesses use.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <string>
#include <string_view>
#include <vector>

#include "gpu_worker/model/tokenizer.h"

namespace kvr::fuzz {

// The repository's models/ and fuzz/corpus/ folders (compiled in; the
// environment's KVR_MODELS wins for models/).
inline std::string ModelsDir() {
  const char* env = std::getenv("KVR_MODELS");
  return env != nullptr && *env != '\0' ? std::string(env) : std::string(KVR_FUZZ_MODELS_DIR);
}
inline std::string CorpusDir() { return KVR_FUZZ_CORPUS_DIR; }

// The whole file, or "" when it cannot be read.
inline std::string ReadFileOrEmpty(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// A fixed text with ASCII, multi-byte UTF-8, digits, whitespace runs,
// special-token lookalikes and an invalid byte.
inline constexpr std::string_view kSampleText =
    "Once upon a time, h\xc3\xa9llo w\xc3\xb6rld 12345 \t\n  <s></s><|eot_id|> \xf0\x9f\x98\x80 \xff!";

// Encodes `text` (with and without BOS/EOS) and decodes every id back; any
// status is fine, a crash is not. Encoding is bounded by the caller's input.
inline void Exercise(const worker::Tokenizer& tokenizer, std::string_view text) {
  for (bool special : {false, true}) {
    auto ids = tokenizer.Encode(text, special, special);
    if (!ids.ok()) continue;
    int32_t prev = tokenizer.bos_id();
    for (int32_t id : *ids) {
      if (id < 0 || id >= tokenizer.vocab_size()) std::abort();  // an id outside the vocabulary
      (void)tokenizer.Decode(prev, id);
      prev = id;
    }
  }
  (void)tokenizer.Decode(0, -1);
  (void)tokenizer.Decode(0, tokenizer.vocab_size());
}

}  // namespace kvr::fuzz
