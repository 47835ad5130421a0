// AVX-512 VNNI SQ8 kernels (compiled with -mavx512f -mavx512bw
// -mavx512vnni): vpdpbusd multiplies unsigned code bytes by signed query
// bytes and adds each group of 4 products into an int32 lane, exactly.
// GCC 12's avx512fintrin.h initialises its "undefined" vectors from
// themselves, which -W(maybe-)uninitialized reports at every inlined use
// (as in kernels_avx512.cc).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include "common/simd/sq8_kernels.h"

namespace kvr::simd {
namespace {

int32_t DotI8Vnni(const uint8_t* a, const int8_t* b, size_t d) {
  __m512i acc = _mm512_setzero_si512();
  size_t j = 0;
  for (; j + 64 <= d; j += 64) {
    acc = _mm512_dpbusd_epi32(acc, _mm512_loadu_si512(a + j), _mm512_loadu_si512(b + j));
  }
  if (j < d) {
    const __mmask64 m = (~0ull) >> (64 - (d - j));
    acc = _mm512_dpbusd_epi32(acc, _mm512_maskz_loadu_epi8(m, a + j),
                              _mm512_maskz_loadu_epi8(m, b + j));
  }
  return _mm512_reduce_add_epi32(acc);
}

// Two blocks per iteration (independent accumulators hide vpdpbusd's
// latency); each 64-byte load is 16 keys x 4 dims against the group's 4
// query bytes broadcast.
void ScanSq8Vnni(const int8_t* q, const uint8_t* blocks, size_t nblocks, size_t dpad,
                 int32_t* out) {
  const size_t groups = dpad / 4;
  const size_t bytes = Sq8BlockBytes(dpad);
  size_t b = 0;
  for (; b + 2 <= nblocks; b += 2) {
    const uint8_t* p0 = blocks + b * bytes;
    const uint8_t* p1 = p0 + bytes;
    __m512i a0 = _mm512_setzero_si512(), a1 = _mm512_setzero_si512();
    __m512i c0 = _mm512_setzero_si512(), c1 = _mm512_setzero_si512();
    size_t g = 0;
    for (; g + 2 <= groups; g += 2) {
      int32_t qa, qb;
      __builtin_memcpy(&qa, q + g * 4, 4);
      __builtin_memcpy(&qb, q + g * 4 + 4, 4);
      const __m512i va = _mm512_set1_epi32(qa), vb = _mm512_set1_epi32(qb);
      a0 = _mm512_dpbusd_epi32(a0, _mm512_loadu_si512(p0 + g * 64), va);
      a1 = _mm512_dpbusd_epi32(a1, _mm512_loadu_si512(p1 + g * 64), va);
      c0 = _mm512_dpbusd_epi32(c0, _mm512_loadu_si512(p0 + g * 64 + 64), vb);
      c1 = _mm512_dpbusd_epi32(c1, _mm512_loadu_si512(p1 + g * 64 + 64), vb);
    }
    if (g < groups) {
      int32_t qa;
      __builtin_memcpy(&qa, q + g * 4, 4);
      const __m512i va = _mm512_set1_epi32(qa);
      a0 = _mm512_dpbusd_epi32(a0, _mm512_loadu_si512(p0 + g * 64), va);
      a1 = _mm512_dpbusd_epi32(a1, _mm512_loadu_si512(p1 + g * 64), va);
    }
    _mm512_storeu_si512(out + b * kSq8Block, _mm512_add_epi32(a0, c0));
    _mm512_storeu_si512(out + (b + 1) * kSq8Block, _mm512_add_epi32(a1, c1));
  }
  for (; b < nblocks; ++b) {
    const uint8_t* p0 = blocks + b * bytes;
    __m512i a0 = _mm512_setzero_si512();
    for (size_t g = 0; g < groups; ++g) {
      int32_t qa;
      __builtin_memcpy(&qa, q + g * 4, 4);
      a0 = _mm512_dpbusd_epi32(a0, _mm512_loadu_si512(p0 + g * 64), _mm512_set1_epi32(qa));
    }
    _mm512_storeu_si512(out + b * kSq8Block, a0);
  }
}

}  // namespace

const Sq8Kernels* Avx512VnniSq8KernelsOrNull() {
  static const Sq8Kernels k{"avx512vnni", &DotI8Vnni, &ScanSq8Vnni};
  return &k;
}

}  // namespace kvr::simd
