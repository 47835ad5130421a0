// AVX2 SQ8 kernels (compiled with -mavx2). No VNNI: bytes are widened to
// int16 and multiplied with vpmaddwd (exact; vpmaddubsw would saturate).
#include <immintrin.h>

#include "common/simd/sq8_kernels.h"

namespace kvr::simd {
namespace {

inline int32_t HSum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

int32_t DotI8Avx2(const uint8_t* a, const int8_t* b, size_t d) {
  __m256i acc = _mm256_setzero_si256();
  size_t j = 0;
  for (; j + 16 <= d; j += 16) {
    const __m256i x = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a + j)));
    const __m256i y = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + j)));
    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(x, y));
  }
  int32_t s = HSum(acc);
  for (; j < d; ++j) s += static_cast<int32_t>(a[j]) * static_cast<int32_t>(b[j]);
  return s;
}

// One block of 16 keys. Each 16-byte load holds 4 keys x 4 dims; widened to
// int16 and multiplied by the group's 4 query values (repeated) it gives per
// key two int32 pair sums. acc[r] collects keys 4r..4r+3 over all groups.
void ScanSq8Avx2(const int8_t* q, const uint8_t* blocks, size_t nblocks, size_t dpad,
                 int32_t* out) {
  const size_t groups = dpad / 4;
  for (size_t b = 0; b < nblocks; ++b) {
    const uint8_t* block = blocks + b * Sq8BlockBytes(dpad);
    __m256i acc0 = _mm256_setzero_si256(), acc1 = _mm256_setzero_si256();
    __m256i acc2 = _mm256_setzero_si256(), acc3 = _mm256_setzero_si256();
    for (size_t g = 0; g < groups; ++g) {
      int32_t q4;
      __builtin_memcpy(&q4, q + g * 4, 4);
      const __m256i qw = _mm256_cvtepi8_epi16(_mm_set1_epi32(q4));
      const uint8_t* p = block + g * 64;
      acc0 = _mm256_add_epi32(acc0, _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), qw));
      acc1 = _mm256_add_epi32(acc1, _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16))), qw));
      acc2 = _mm256_add_epi32(acc2, _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 32))), qw));
      acc3 = _mm256_add_epi32(acc3, _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 48))), qw));
    }
    // acc0 lanes: key0 (2 pair sums), key1, | key2, key3. hadd(acc0, acc1)
    // = [k0 k1 k4 k5 | k2 k3 k6 k7]; permute to k0..k7.
    const __m256i lo = _mm256_permute4x64_epi64(_mm256_hadd_epi32(acc0, acc1), 0xD8);
    const __m256i hi = _mm256_permute4x64_epi64(_mm256_hadd_epi32(acc2, acc3), 0xD8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + b * kSq8Block), lo);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + b * kSq8Block + 8), hi);
  }
}

// No register blocking over queries here (AVX2 has 16 registers and the
// widening already needs them): one scan per query.
void ScanSq8MultiAvx2(const int8_t* q, size_t q_stride, size_t nq, const uint8_t* blocks,
                      size_t nblocks, size_t dpad, int32_t* out, size_t out_stride) {
  for (size_t t = 0; t < nq; ++t) {
    ScanSq8Avx2(q + t * q_stride, blocks, nblocks, dpad, out + t * out_stride);
  }
}

// v >= t as !(t > v): no overflow at t = INT32_MIN.
size_t SelectGeAvx2(const int32_t* v, size_t n, int32_t t, uint32_t* idx) {
  const __m256i vt = _mm256_set1_epi32(t);
  size_t m = 0, i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + i));
    const unsigned lt =
        static_cast<unsigned>(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(vt, x))));
    for (unsigned bits = ~lt & 0xFFu; bits != 0; bits &= bits - 1) {
      idx[m++] = static_cast<uint32_t>(i) + static_cast<uint32_t>(__builtin_ctz(bits));
    }
  }
  return m + SelectGeFrom(v, i, n, t, idx + m);
}

}  // namespace

const Sq8Kernels* Avx2Sq8KernelsOrNull() {
  static const Sq8Kernels k{"avx2", &DotI8Avx2, &ScanSq8Avx2, &ScanSq8MultiAvx2, &SelectGeAvx2};
  return &k;
}

}  // namespace kvr::simd
