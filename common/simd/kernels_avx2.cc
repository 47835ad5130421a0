// Placeholder until the avx2 kernels land: reports "not compiled in".
#include "common/simd/kernels.h"

namespace kvr::simd {
const Kernels* Avx2KernelsOrNull() { return nullptr; }
}  // namespace kvr::simd
