// Fuzzes the llama2.c checkpoint loader (gpu_worker/model/llama2c_loader.h):
// ParseLlama2c over the input bytes; on success every weight view must lie
// inside the input.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <span>

#include "gpu_worker/model/llama2c_loader.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  // The loader reads floats in place: give it an aligned copy, as mmap would.
  auto copy = std::shared_ptr<std::byte[]>(new std::byte[size + 1]);
  if (size > 0) std::memcpy(copy.get(), data, size);
  auto weights = kvr::worker::ParseLlama2c(std::span<const std::byte>(copy.get(), size), copy,
                                           "fuzz input");
  (void)weights;
  return 0;
}
