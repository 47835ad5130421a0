// Fuzzes the Hugging Face tokenizer.json byte-level BPE tokenizer
// (gpu_worker/model/hf_bpe_tokenizer.h). Byte 0 even: encode the rest with
// the seed tokenizer (fuzz/corpus/hf_bpe/tokenizer.json, after its mode
// byte); odd: the rest is
// tokenizer.json text, loaded then used on a fixed text.
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>
#include <string_view>

#include "fuzz/fuzz_support.h"
#include "gpu_worker/model/hf_bpe_tokenizer.h"

using kvr::worker::HfBpeTokenizer;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const std::string_view rest(reinterpret_cast<const char*>(data + 1), size - 1);
  if ((data[0] & 1) == 0) {
    static const HfBpeTokenizer* seed = [] {
      const std::string json =
          kvr::fuzz::ReadFileOrEmpty(kvr::fuzz::CorpusDir() + "/hf_bpe/tokenizer.json");
      auto t = HfBpeTokenizer::Parse(std::string_view(json).substr(1), "tokenizer.json");
      if (!t.ok()) std::abort();  // the seed tokenizer must load
      return t->release();
    }();
    kvr::fuzz::Exercise(*seed, rest);
    return 0;
  }
  auto t = HfBpeTokenizer::Parse(rest, "fuzz input");
  if (t.ok()) kvr::fuzz::Exercise(**t, kvr::fuzz::kSampleText);
  return 0;
}
