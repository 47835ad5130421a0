// Placeholder until the avx512 kernels land: reports "not compiled in".
#include "common/simd/kernels.h"

namespace kvr::simd {
const Kernels* Avx512KernelsOrNull() { return nullptr; }
}  // namespace kvr::simd
