// Fuzzes the Hugging Face checkpoint parsers (gpu_worker/model/):
// byte 0 even: ParseSafetensors over the rest (header JSON, dtypes, shapes,
// offsets; every entry's bytes must lie inside the input); odd:
// ParseHfConfig over the rest (config.json).
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <span>
#include <string_view>

#include "gpu_worker/model/hf_config.h"
#include "gpu_worker/model/safetensors_loader.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const auto* begin = reinterpret_cast<const std::byte*>(data + 1);
  const size_t n = size - 1;
  if ((data[0] & 1) == 0) {
    auto entries = kvr::worker::ParseSafetensors(std::span<const std::byte>(begin, n), "fuzz");
    if (!entries.ok()) return 0;
    for (const auto& e : *entries) {
      if (e.data.data() < begin || e.data.data() + e.data.size() > begin + n) std::abort();
    }
    return 0;
  }
  (void)kvr::worker::ParseHfConfig(std::string_view(reinterpret_cast<const char*>(begin), n),
                                   "config.json");
  return 0;
}
