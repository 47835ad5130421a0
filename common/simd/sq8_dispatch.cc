// Chooses the SQ8 kernel table at run time from CPU features (and KVR_SIMD).
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "common/simd/sq8_kernels.h"

namespace kvr::simd {
namespace {

bool HasAvx2() { return __builtin_cpu_supports("avx2"); }
bool HasVnni() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vnni");
}

const Sq8Kernels& Choose() {
  const Sq8Kernels* avx2 = HasAvx2() ? Avx2Sq8KernelsOrNull() : nullptr;
  const Sq8Kernels* vnni = HasVnni() ? Avx512VnniSq8KernelsOrNull() : nullptr;
  const Sq8Kernels* best = vnni != nullptr ? vnni : avx2 != nullptr ? avx2 : &ScalarSq8Kernels();
  const char* want = std::getenv("KVR_SIMD");
  if (want == nullptr || *want == '\0') return *best;
  if (std::strcmp(want, "scalar") == 0) return ScalarSq8Kernels();
  if (std::strcmp(want, "avx2") == 0 && avx2 != nullptr) return *avx2;
  if (std::strcmp(want, "avx512") == 0 && vnni != nullptr) return *vnni;
  if (std::strcmp(want, "avx512") == 0 && avx2 != nullptr) return *avx2;  // no VNNI
  return *best;  // kernels.h's dispatch already warned about an unknown choice
}

}  // namespace

const Sq8Kernels& ActiveSq8() {
  static const Sq8Kernels& active = Choose();
  return active;
}

size_t AvailableSq8(const Sq8Kernels** out, size_t max) {
  size_t n = 0;
  if (n < max) out[n++] = &ScalarSq8Kernels();
  if (n < max && HasAvx2() && Avx2Sq8KernelsOrNull() != nullptr) out[n++] = Avx2Sq8KernelsOrNull();
  if (n < max && HasVnni() && Avx512VnniSq8KernelsOrNull() != nullptr) {
    out[n++] = Avx512VnniSq8KernelsOrNull();
  }
  return n;
}

}  // namespace kvr::simd
