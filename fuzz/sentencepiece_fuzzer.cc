// Fuzzes the SentencePiece tokenizer (gpu_worker/model/sentencepiece_tokenizer.h).
// Byte 0 even: encode the rest with the seed model
// (fuzz/corpus/sentencepiece/tiny.model, after its mode byte); odd: the rest is a serialized
// ModelProto, loaded then used on a fixed text.
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>
#include <string_view>

#include "fuzz/fuzz_support.h"
#include "gpu_worker/model/sentencepiece_tokenizer.h"

using kvr::worker::SentencePieceTokenizer;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const std::string_view rest(reinterpret_cast<const char*>(data + 1), size - 1);
  if ((data[0] & 1) == 0) {
    static const SentencePieceTokenizer* seed = [] {
      const std::string model =
          kvr::fuzz::ReadFileOrEmpty(kvr::fuzz::CorpusDir() + "/sentencepiece/tiny.model");
      auto t = SentencePieceTokenizer::Parse(std::string_view(model).substr(1), "tiny.model");
      if (!t.ok()) std::abort();  // the seed model must load
      return t->release();
    }();
    kvr::fuzz::Exercise(*seed, rest);
    return 0;
  }
  auto t = SentencePieceTokenizer::Parse(rest, "fuzz input");
  if (t.ok()) kvr::fuzz::Exercise(**t, kvr::fuzz::kSampleText);
  return 0;
}
