// Fuzzes the llama2.c tokenizer (gpu_worker/model/llama2c_tokenizer.h).
// Byte 0 even: encode the rest with the bundled tok512.bin; odd: the rest is
// a tokenizer file (vocab size from byte 0: all entries, or 4 / 64 / 512),
// loaded then used on a fixed text.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <span>
#include <string_view>

#include "fuzz/fuzz_support.h"
#include "gpu_worker/model/llama2c_tokenizer.h"

using kvr::worker::Llama2cTokenizer;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const std::string_view rest(reinterpret_cast<const char*>(data + 1), size - 1);
  if ((data[0] & 1) == 0) {
    static const Llama2cTokenizer* bundled = [] {
      auto t = Llama2cTokenizer::Load(kvr::fuzz::ModelsDir() + "/tok512.bin", 512);
      if (!t.ok()) std::abort();  // the bundled tokenizer must load
      return t->release();
    }();
    kvr::fuzz::Exercise(*bundled, rest);
    return 0;
  }
  static constexpr int kVocab[] = {0, 4, 64, 512};
  auto t = Llama2cTokenizer::Parse(
      std::span<const std::byte>(reinterpret_cast<const std::byte*>(rest.data()), rest.size()),
      kVocab[(data[0] >> 1) % 4], "fuzz input");
  if (t.ok()) kvr::fuzz::Exercise(**t, kvr::fuzz::kSampleText);
  return 0;
}
