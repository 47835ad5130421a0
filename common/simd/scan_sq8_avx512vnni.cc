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

// NQ queries against `nb` (1 or 2) blocks per pass: every 64-byte code load
// feeds NQ vpdpbusd (the query's 4 bytes broadcast from memory), NQ * nb
// independent accumulators hide the instruction's latency.
// Blocks ahead whose codes a pass prefetches (a prefetch past the end of
// the codes is harmless: it never faults).
constexpr size_t kPrefetchBlocks = 4;

template <size_t NQ, size_t NB>
__attribute__((always_inline)) inline void MultiPass(const int8_t* q, size_t q_stride,
                                                     const uint8_t* p, size_t bytes, size_t groups,
                                                     int32_t* out, size_t out_stride) {
  __m512i acc[NB][NQ];
#pragma GCC unroll 16
  for (size_t b = 0; b < NB; ++b) {
#pragma GCC unroll 16
    for (size_t t = 0; t < NQ; ++t) acc[b][t] = _mm512_setzero_si512();
  }
  for (size_t g = 0; g < groups; ++g) {
#pragma GCC unroll 16
    for (size_t b = 0; b < NB; ++b) {
      _mm_prefetch(reinterpret_cast<const char*>(p + (b + kPrefetchBlocks) * bytes + g * 64),
                   _MM_HINT_T0);
      const __m512i c = _mm512_loadu_si512(p + b * bytes + g * 64);
#pragma GCC unroll 16
      for (size_t t = 0; t < NQ; ++t) {
        int32_t qa;
        __builtin_memcpy(&qa, q + t * q_stride + g * 4, 4);
        acc[b][t] = _mm512_dpbusd_epi32(acc[b][t], c, _mm512_set1_epi32(qa));
      }
    }
  }
#pragma GCC unroll 16
  for (size_t b = 0; b < NB; ++b) {
#pragma GCC unroll 16
    for (size_t t = 0; t < NQ; ++t) {
      _mm512_storeu_si512(out + t * out_stride + b * kSq8Block, acc[b][t]);
    }
  }
}

// Blocks per pass: 4 for one query, 2 for two to four (4..8 accumulators
// hide vpdpbusd's latency; each query's 4 bytes are broadcast once per
// pass). 5..8 queries run as two passes of <= 4 over the same two blocks,
// whose 4 KiB of codes the second pass finds in L1 (16 accumulators in one
// pass measured slower: one broadcast per vpdpbusd).
template <size_t NQ>
void ScanMultiVnni(const int8_t* q, size_t q_stride, const uint8_t* blocks, size_t nblocks,
                   size_t dpad, int32_t* out, size_t out_stride) {
  const size_t groups = dpad / 4;
  const size_t bytes = Sq8BlockBytes(dpad);
  if constexpr (NQ > 4) {
    const int8_t* q2 = q + 4 * q_stride;
    int32_t* out2 = out + 4 * out_stride;
    size_t b = 0;
    for (; b + 2 <= nblocks; b += 2) {
      MultiPass<4, 2>(q, q_stride, blocks + b * bytes, bytes, groups, out + b * kSq8Block,
                      out_stride);
      MultiPass<NQ - 4, 2>(q2, q_stride, blocks + b * bytes, bytes, groups,
                           out2 + b * kSq8Block, out_stride);
    }
    for (; b < nblocks; ++b) {
      MultiPass<4, 1>(q, q_stride, blocks + b * bytes, bytes, groups, out + b * kSq8Block,
                      out_stride);
      MultiPass<NQ - 4, 1>(q2, q_stride, blocks + b * bytes, bytes, groups,
                           out2 + b * kSq8Block, out_stride);
    }
  } else {
    constexpr size_t kNb = NQ == 1 ? 4 : 2;
    size_t b = 0;
    for (; b + kNb <= nblocks; b += kNb) {
      MultiPass<NQ, kNb>(q, q_stride, blocks + b * bytes, bytes, groups, out + b * kSq8Block,
                         out_stride);
    }
    for (; b < nblocks; ++b) {
      MultiPass<NQ, 1>(q, q_stride, blocks + b * bytes, bytes, groups, out + b * kSq8Block,
                       out_stride);
    }
  }
}

void ScanSq8MultiVnni(const int8_t* q, size_t q_stride, size_t nq, const uint8_t* blocks,
                      size_t nblocks, size_t dpad, int32_t* out, size_t out_stride) {
  switch (nq) {
    case 0: return;
    case 1: return ScanMultiVnni<1>(q, q_stride, blocks, nblocks, dpad, out, out_stride);
    case 2: return ScanMultiVnni<2>(q, q_stride, blocks, nblocks, dpad, out, out_stride);
    case 3: return ScanMultiVnni<3>(q, q_stride, blocks, nblocks, dpad, out, out_stride);
    case 4: return ScanMultiVnni<4>(q, q_stride, blocks, nblocks, dpad, out, out_stride);
    case 5: return ScanMultiVnni<5>(q, q_stride, blocks, nblocks, dpad, out, out_stride);
    case 6: return ScanMultiVnni<6>(q, q_stride, blocks, nblocks, dpad, out, out_stride);
    case 7: return ScanMultiVnni<7>(q, q_stride, blocks, nblocks, dpad, out, out_stride);
    default: break;
  }
  // More than the register budget: groups of 8.
  for (size_t t = 0; t < nq; t += 8) {
    const size_t m = nq - t < 8 ? nq - t : 8;
    if (m == 8) {
      ScanMultiVnni<8>(q + t * q_stride, q_stride, blocks, nblocks, dpad, out + t * out_stride,
                       out_stride);
    } else {
      ScanSq8MultiVnni(q + t * q_stride, q_stride, m, blocks, nblocks, dpad,
                       out + t * out_stride, out_stride);
    }
  }
}

size_t SelectGeVnni(const int32_t* v, size_t n, int32_t t, uint32_t* idx) {
  const __m512i vt = _mm512_set1_epi32(t);
  size_t m = 0, i = 0;
  for (; i + 16 <= n; i += 16) {
    for (uint32_t bits = _mm512_cmpge_epi32_mask(_mm512_loadu_si512(v + i), vt); bits != 0;
         bits &= bits - 1) {
      idx[m++] = static_cast<uint32_t>(i) + static_cast<uint32_t>(__builtin_ctz(bits));
    }
  }
  return m + SelectGeFrom(v, i, n, t, idx + m);
}

}  // namespace

const Sq8Kernels* Avx512VnniSq8KernelsOrNull() {
  static const Sq8Kernels k{"avx512vnni", &DotI8Vnni, &ScanSq8Vnni, &ScanSq8MultiVnni,
                            &SelectGeVnni};
  return &k;
}

}  // namespace kvr::simd
