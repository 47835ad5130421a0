// Chooses the kernel table at run time from CPU features (and KVR_SIMD).
#include <cpuid.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>

#include "common/simd/kernels.h"

namespace kvr::simd {
namespace {

// F16C from CPUID leaf 1 (clang's __builtin_cpu_supports does not know "f16c").
bool HasF16c() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  return __get_cpuid(1, &eax, &ebx, &ecx, &edx) != 0 && (ecx & bit_F16C) != 0;
}

bool CpuSupports(Isa isa) {
  switch (isa) {
    case Isa::kScalar:
      return true;
    case Isa::kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             HasF16c();
    case Isa::kAvx512:
      // The AVX-512 file is also compiled with -mfma -mf16c.
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("fma") && HasF16c();
  }
  return false;
}

const Kernels* Compiled(Isa isa) {
  switch (isa) {
    case Isa::kScalar:
      return &ScalarKernels();
    case Isa::kAvx2:
      return Avx2KernelsOrNull();
    case Isa::kAvx512:
      return Avx512KernelsOrNull();
  }
  return nullptr;
}

const Kernels& Choose() {
  const Kernels* best = &ScalarKernels();
  for (Isa isa : {Isa::kAvx2, Isa::kAvx512}) {
    if (const Kernels* k = ForIsa(isa)) best = k;
  }
  const char* want = std::getenv("KVR_SIMD");
  if (want == nullptr || *want == '\0') return *best;
  for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512}) {
    const Kernels* k = Compiled(isa);
    if (k != nullptr && std::strcmp(k->name, want) == 0) {
      if (CpuSupports(isa)) return *k;
      break;
    }
  }
  std::fprintf(stderr, "kvr: KVR_SIMD=%s is not available on this CPU; using %s\n", want,
               best->name);
  return *best;
}

}  // namespace

const Kernels* ForIsa(Isa isa) {
  const Kernels* k = Compiled(isa);
  return (k != nullptr && CpuSupports(isa)) ? k : nullptr;
}

const Kernels& Active() {
  static const Kernels& active = Choose();
  return active;
}

}  // namespace kvr::simd
