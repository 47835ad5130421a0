// AVX2 + FMA + F16C kernels. Only this file is compiled with those flags, and
// dispatch.cc hands the table out only on CPUs that have all three.
//
// Tails (lengths not a multiple of 8) use masked loads/stores for fp32 and a
// zero-padded stack copy for 16-bit data, so no kernel reads or writes past
// the element counts it is given.
//
// Numerics: sums are reassociated (several accumulators, FMA), so dot/l2/axpy
// differ from the scalar oracle by float rounding only. Conversions are
// bit-identical to common/half.h. max() skips NaNs like the scalar oracle.
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "common/simd/kernels.h"

namespace kvr::simd {
namespace {

constexpr size_t kW = 8;  // floats per __m256

// Rows ahead of the current group of four whose cache lines dot_gather
// prefetches, and how much of each row it prefetches (the hardware
// prefetcher follows longer rows on its own).
constexpr size_t kPrefetchRows = 8;
constexpr size_t kMaxPrefetchBytes = 1024;

// All-ones in the first r lanes (0 <= r <= 8).
inline __m256i TailMask(size_t r) {
  alignas(32) static constexpr int32_t kTable[16] = {-1, -1, -1, -1, -1, -1, -1, -1,
                                                     0,  0,  0,  0,  0,  0,  0,  0};
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kTable + 8 - r));
}

inline float HSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Lane i of the result is the horizontal sum of v_i.
inline __m128 HSum4(__m256 v0, __m256 v1, __m256 v2, __m256 v3) {
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(v0, v1), _mm256_hadd_ps(v2, v3));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// Loaders: 8 elements of a row type widened to fp32. LoadTail reads only the
// first r (< 8) elements and zero-fills the rest.
struct F32 {
  using T = float;
  static __m256 Load(const float* p) { return _mm256_loadu_ps(p); }
  static __m256 LoadTail(const float* p, size_t r) { return _mm256_maskload_ps(p, TailMask(r)); }
};

struct Bf16 {
  using T = uint16_t;
  static __m256 Load(const uint16_t* p) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
  static __m256 LoadTail(const uint16_t* p, size_t r) {
    uint16_t buf[kW] = {};
    std::memcpy(buf, p, r * sizeof(uint16_t));
    return Load(buf);
  }
};

struct Fp16 {
  using T = uint16_t;
  static __m256 Load(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static __m256 LoadTail(const uint16_t* p, size_t r) {
    uint16_t buf[kW] = {};
    std::memcpy(buf, p, r * sizeof(uint16_t));
    return Load(buf);
  }
};

template <class L>
float DotT(const float* a, const typename L::T* b, size_t d) {
  __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  size_t i = 0;
  for (; i + 4 * kW <= d; i += 4 * kW) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), L::Load(b + i), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + kW), L::Load(b + i + kW), s1);
    s2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 2 * kW), L::Load(b + i + 2 * kW), s2);
    s3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 3 * kW), L::Load(b + i + 3 * kW), s3);
  }
  for (; i + kW <= d; i += kW) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), L::Load(b + i), s0);
  if (i < d) s1 = _mm256_fmadd_ps(F32::LoadTail(a + i, d - i), L::LoadTail(b + i, d - i), s1);
  return HSum(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
}

// Dots of q with four rows at once: each q load is shared by four FMAs, two
// accumulators per row keep eight independent FMA chains in flight, and one
// horizontal reduction serves all four rows.
template <class L>
inline __m128 Dot4(const float* q, const typename L::T* r0, const typename L::T* r1,
                   const typename L::T* r2, const typename L::T* r3, size_t d) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  __m256 b0 = a0, b1 = a0, b2 = a0, b3 = a0;
  size_t i = 0;
  for (; i + 2 * kW <= d; i += 2 * kW) {
    const __m256 qa = _mm256_loadu_ps(q + i);
    const __m256 qb = _mm256_loadu_ps(q + i + kW);
    a0 = _mm256_fmadd_ps(qa, L::Load(r0 + i), a0);
    a1 = _mm256_fmadd_ps(qa, L::Load(r1 + i), a1);
    a2 = _mm256_fmadd_ps(qa, L::Load(r2 + i), a2);
    a3 = _mm256_fmadd_ps(qa, L::Load(r3 + i), a3);
    b0 = _mm256_fmadd_ps(qb, L::Load(r0 + i + kW), b0);
    b1 = _mm256_fmadd_ps(qb, L::Load(r1 + i + kW), b1);
    b2 = _mm256_fmadd_ps(qb, L::Load(r2 + i + kW), b2);
    b3 = _mm256_fmadd_ps(qb, L::Load(r3 + i + kW), b3);
  }
  if (i + kW <= d) {
    const __m256 qa = _mm256_loadu_ps(q + i);
    a0 = _mm256_fmadd_ps(qa, L::Load(r0 + i), a0);
    a1 = _mm256_fmadd_ps(qa, L::Load(r1 + i), a1);
    a2 = _mm256_fmadd_ps(qa, L::Load(r2 + i), a2);
    a3 = _mm256_fmadd_ps(qa, L::Load(r3 + i), a3);
    i += kW;
  }
  if (i < d) {
    const size_t r = d - i;
    const __m256 qt = F32::LoadTail(q + i, r);
    b0 = _mm256_fmadd_ps(qt, L::LoadTail(r0 + i, r), b0);
    b1 = _mm256_fmadd_ps(qt, L::LoadTail(r1 + i, r), b1);
    b2 = _mm256_fmadd_ps(qt, L::LoadTail(r2 + i, r), b2);
    b3 = _mm256_fmadd_ps(qt, L::LoadTail(r3 + i, r), b3);
  }
  return HSum4(_mm256_add_ps(a0, b0), _mm256_add_ps(a1, b1), _mm256_add_ps(a2, b2),
               _mm256_add_ps(a3, b3));
}

// out[i] = q . row(i) for i < n, four rows per Dot4. The last partial group
// repeats its final row, so every output comes from the same summation order
// whatever its position in the batch.
template <class L, class RowFn, class BeforeGroupFn>
inline void DotRows(const float* q, size_t n, size_t d, float* out, RowFn row,
                    BeforeGroupFn before_group) {
  size_t i = 0;
  for (; i + 4 <= n; i += 4) {
    before_group(i);
    _mm_storeu_ps(out + i, Dot4<L>(q, row(i), row(i + 1), row(i + 2), row(i + 3), d));
  }
  if (i < n) {
    const size_t r = n - i;
    const auto* last = row(n - 1);
    alignas(16) float tmp[4];
    _mm_store_ps(tmp, Dot4<L>(q, row(i), r > 1 ? row(i + 1) : last, r > 2 ? row(i + 2) : last,
                              last, d));
    std::memcpy(out + i, tmp, r * sizeof(float));
  }
}

template <class L>
void DotBatchT(const float* q, const typename L::T* rows, size_t n, size_t d, size_t stride,
               float* out) {
  DotRows<L>(
      q, n, d, out, [&](size_t i) { return rows + i * stride; }, [](size_t) {});
}

// One dot_batch per query: with 16 ymm registers a two-query block of Dot4
// would spill, so AVX2 gains nothing from sharing row loads.
void DotBatchMulti(const float* q, size_t nq, size_t q_stride, const float* rows, size_t n,
                   size_t d, size_t stride, float* out, size_t out_stride) {
  for (size_t j = 0; j < nq; ++j) {
    DotBatchT<F32>(q + j * q_stride, rows, n, d, stride, out + j * out_stride);
  }
}

template <class T>
inline void PrefetchRow(const T* row, size_t d) {
  const size_t bytes = std::min(d * sizeof(T), kMaxPrefetchBytes);
  if (bytes == 0) return;
  const char* p = reinterpret_cast<const char*>(row);
  for (size_t off = 0; off < bytes; off += 64) _mm_prefetch(p + off, _MM_HINT_T0);
  _mm_prefetch(p + bytes - 1, _MM_HINT_T0);  // a row need not start on a line boundary
}

template <class L>
void DotGatherT(const float* q, const typename L::T* base, const uint32_t* ids, size_t n,
                size_t d, size_t stride, float* out) {
  const auto row = [&](size_t i) { return base + static_cast<size_t>(ids[i]) * stride; };
  for (size_t j = 0; j < std::min(n, kPrefetchRows); ++j) PrefetchRow(row(j), d);
  DotRows<L>(q, n, d, out, row, [&](size_t i) {
    const size_t end = std::min(n, i + kPrefetchRows + 4);
    for (size_t j = i + kPrefetchRows; j < end; ++j) PrefetchRow(row(j), d);
  });
}

float Dot(const float* a, const float* b, size_t d) { return DotT<F32>(a, b, d); }
float DotBf16(const float* a, const uint16_t* b, size_t d) { return DotT<Bf16>(a, b, d); }

float L2Sqr(const float* a, const float* b, size_t d) {
  __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  size_t i = 0;
  for (; i + 4 * kW <= d; i += 4 * kW) {
    const __m256 t0 = _mm256_sub_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i));
    const __m256 t1 = _mm256_sub_ps(_mm256_loadu_ps(a + i + kW), _mm256_loadu_ps(b + i + kW));
    const __m256 t2 =
        _mm256_sub_ps(_mm256_loadu_ps(a + i + 2 * kW), _mm256_loadu_ps(b + i + 2 * kW));
    const __m256 t3 =
        _mm256_sub_ps(_mm256_loadu_ps(a + i + 3 * kW), _mm256_loadu_ps(b + i + 3 * kW));
    s0 = _mm256_fmadd_ps(t0, t0, s0);
    s1 = _mm256_fmadd_ps(t1, t1, s1);
    s2 = _mm256_fmadd_ps(t2, t2, s2);
    s3 = _mm256_fmadd_ps(t3, t3, s3);
  }
  for (; i + kW <= d; i += kW) {
    const __m256 t = _mm256_sub_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i));
    s0 = _mm256_fmadd_ps(t, t, s0);
  }
  if (i < d) {
    const __m256 t = _mm256_sub_ps(F32::LoadTail(a + i, d - i), F32::LoadTail(b + i, d - i));
    s1 = _mm256_fmadd_ps(t, t, s1);
  }
  return HSum(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
}

template <class L>
void AxpyT(float a, const typename L::T* x, float* y, size_t d) {
  const __m256 va = _mm256_set1_ps(a);
  size_t i = 0;
  for (; i + 2 * kW <= d; i += 2 * kW) {
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, L::Load(x + i), _mm256_loadu_ps(y + i)));
    _mm256_storeu_ps(y + i + kW,
                     _mm256_fmadd_ps(va, L::Load(x + i + kW), _mm256_loadu_ps(y + i + kW)));
  }
  for (; i + kW <= d; i += kW) {
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, L::Load(x + i), _mm256_loadu_ps(y + i)));
  }
  if (i < d) {
    const __m256i m = TailMask(d - i);
    _mm256_maskstore_ps(y + i, m,
                        _mm256_fmadd_ps(va, L::LoadTail(x + i, d - i), _mm256_maskload_ps(y + i, m)));
  }
}

// exp(t) for t in [-87.33, 88.72] (normal results): Cephes range reduction
// t = n ln2 + r, |r| <= ln2/2, a degree-7 polynomial for exp(r), and 2^n added
// straight into the exponent bits. Lanes with t < -87 give 0, t > 88.72 give
// +inf and NaN stays NaN, as in the scalar oracle.
inline __m256 Exp(__m256 t) {
  const __m256 x = _mm256_min_ps(_mm256_max_ps(t, _mm256_set1_ps(-87.5f)),
                                 _mm256_set1_ps(88.72283f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r);
  p = _mm256_add_ps(p, _mm256_set1_ps(1.0f));
  const __m256i scale = _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23);
  __m256 e = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), scale));
  e = _mm256_andnot_ps(_mm256_cmp_ps(t, _mm256_set1_ps(-87.0f), _CMP_LT_OQ), e);
  e = _mm256_blendv_ps(e, _mm256_set1_ps(__builtin_inff()),
                       _mm256_cmp_ps(t, _mm256_set1_ps(88.72283f), _CMP_GT_OQ));
  return _mm256_blendv_ps(e, t, _mm256_cmp_ps(t, t, _CMP_UNORD_Q));
}

float ExpShiftSum(const float* x, float shift, float* out, size_t n) {
  const __m256 vs = _mm256_set1_ps(shift);
  __m256 sum = _mm256_setzero_ps();
  size_t i = 0;
  for (; i + kW <= n; i += kW) {
    const __m256 e = Exp(_mm256_sub_ps(_mm256_loadu_ps(x + i), vs));
    _mm256_storeu_ps(out + i, e);
    sum = _mm256_add_ps(sum, e);
  }
  if (i < n) {
    const __m256i m = TailMask(n - i);
    const __m256 e = _mm256_and_ps(
        Exp(_mm256_sub_ps(_mm256_maskload_ps(x + i, m), vs)), _mm256_castsi256_ps(m));
    _mm256_maskstore_ps(out + i, m, e);
    sum = _mm256_add_ps(sum, e);
  }
  return HSum(sum);
}

// Like the scalar oracle, a NaN never replaces the running maximum: the result
// is the largest non-NaN element, or -inf when there is none.
float Max(const float* x, size_t n) {
  const __m256 neg_inf = _mm256_set1_ps(-__builtin_inff());
  __m256 m0 = neg_inf, m1 = neg_inf;
  size_t i = 0;
  // _mm256_max_ps(a, b) returns b when either is NaN, so the running maximum
  // goes second.
  for (; i + 2 * kW <= n; i += 2 * kW) {
    m0 = _mm256_max_ps(_mm256_loadu_ps(x + i), m0);
    m1 = _mm256_max_ps(_mm256_loadu_ps(x + i + kW), m1);
  }
  for (; i + kW <= n; i += kW) m0 = _mm256_max_ps(_mm256_loadu_ps(x + i), m0);
  if (i < n) {
    const __m256i m = TailMask(n - i);
    m1 = _mm256_max_ps(_mm256_blendv_ps(neg_inf, _mm256_maskload_ps(x + i, m),
                                        _mm256_castsi256_ps(m)),
                       m1);
  }
  __m256 v = _mm256_max_ps(m0, m1);
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 8 fp32 -> bf16 as in FloatToBf16: round to nearest even on the bit pattern;
// NaN keeps its top bits with the quiet bit set. Result in 32-bit lanes.
inline __m256i Bf16Bits(__m256 f) {
  const __m256i u = _mm256_castps_si256(f);
  const __m256i hi = _mm256_srli_epi32(u, 16);
  const __m256i lsb = _mm256_and_si256(hi, _mm256_set1_epi32(1));
  const __m256i rounded =
      _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
  const __m256i is_nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                            _mm256_set1_epi32(0x7f800000));
  return _mm256_blendv_epi8(rounded, _mm256_or_si256(hi, _mm256_set1_epi32(0x40)), is_nan);
}

// Eight 32-bit lanes holding 16-bit values -> eight 16-bit values, in order.
inline __m128i Narrow16(__m256i v) {
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(v, v), 0x08));
}

void Fp32ToBf16(const float* in, uint16_t* out, size_t n) {
  size_t i = 0;
  for (; i + 2 * kW <= n; i += 2 * kW) {
    // packus works per 128-bit lane; the permute restores element order.
    const __m256i packed = _mm256_packus_epi32(Bf16Bits(_mm256_loadu_ps(in + i)),
                                               Bf16Bits(_mm256_loadu_ps(in + i + kW)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i),
                        _mm256_permute4x64_epi64(packed, 0xd8));
  }
  for (; i + kW <= n; i += kW) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i),
                     Narrow16(Bf16Bits(_mm256_loadu_ps(in + i))));
  }
  if (i < n) {
    alignas(16) uint16_t tmp[kW];
    _mm_store_si128(reinterpret_cast<__m128i*>(tmp),
                    Narrow16(Bf16Bits(F32::LoadTail(in + i, n - i))));
    std::memcpy(out + i, tmp, (n - i) * sizeof(uint16_t));
  }
}

void Bf16ToFp32(const uint16_t* in, float* out, size_t n) {
  size_t i = 0;
  for (; i + kW <= n; i += kW) _mm256_storeu_ps(out + i, Bf16::Load(in + i));
  if (i < n) _mm256_maskstore_ps(out + i, TailMask(n - i), Bf16::LoadTail(in + i, n - i));
}

// 8 fp32 -> fp16 with F16C (round to nearest even, Inf on overflow, exact
// subnormals). F16C keeps a NaN's top payload bits; common/half.h returns the
// canonical quiet NaN (sign | 0x7e00), so NaN lanes are patched to match.
inline __m128i Fp16Bits(__m256 f) {
  const __m128i h = _mm256_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256i nan32 = _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_UNORD_Q));
  const __m128i nan16 =
      _mm_packs_epi32(_mm256_castsi256_si128(nan32), _mm256_extracti128_si256(nan32, 1));
  const __m128i canonical =
      _mm_or_si128(_mm_and_si128(h, _mm_set1_epi16(static_cast<int16_t>(0x8000))),
                   _mm_set1_epi16(0x7e00));
  return _mm_blendv_epi8(h, canonical, nan16);
}

void Fp32ToFp16(const float* in, uint16_t* out, size_t n) {
  size_t i = 0;
  for (; i + kW <= n; i += kW) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), Fp16Bits(_mm256_loadu_ps(in + i)));
  }
  if (i < n) {
    alignas(16) uint16_t tmp[kW];
    _mm_store_si128(reinterpret_cast<__m128i*>(tmp), Fp16Bits(F32::LoadTail(in + i, n - i)));
    std::memcpy(out + i, tmp, (n - i) * sizeof(uint16_t));
  }
}

void Fp16ToFp32(const uint16_t* in, float* out, size_t n) {
  size_t i = 0;
  for (; i + kW <= n; i += kW) _mm256_storeu_ps(out + i, Fp16::Load(in + i));
  if (i < n) _mm256_maskstore_ps(out + i, TailMask(n - i), Fp16::LoadTail(in + i, n - i));
}

// ---- matmul_bf16 / matmul_f32: register-blocked matrix product ----
//
// Tiles of 4 weight rows x 2 tokens (8 accumulators + 4 weight vectors + 1
// token vector of the 16 registers), 8-float vectors. One accumulator per
// (token, row) pair over k in order, reduced by HSum4 with independent lanes:
// batch-invariant results. Unlike kernels_avx512.cc, one chain per pair: a
// single token runs 4 rows (4 memory streams) at a time, measured 0.65-0.85x
// of dot_bf16 at n = 1 (forced on an AVX-512 machine); the two-chain layout
// fits only 2 x 3 tiles in 16 registers, which lost most of the n = 16 gain
// (1.1x vs 4.5x over dot_bf16 with the weights in L3), so AVX2 keeps this one.

// Bytes of x rows per token chunk (kept in L2 while the weight tiles pass).
constexpr size_t kGemmChunkBytes = size_t{512} << 10;

template <class L, int R, int T>
void GemmTile(const float* x, size_t x_stride, const typename L::T* const* w, size_t d, float* y,
              size_t y_stride, size_t rows) {
  static_assert(R % 4 == 0 && R * T + R + 1 <= 16, "tile must fit the 16 ymm registers");
  __m256 acc[T][R];
#pragma GCC unroll 8
  for (int t = 0; t < T; ++t) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[t][r] = _mm256_setzero_ps();
  }
  size_t k = 0;
  for (; k + kW <= d; k += kW) {
    __m256 wv[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) wv[r] = L::Load(w[r] + k);
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) {
      const __m256 xv = _mm256_loadu_ps(x + static_cast<size_t>(t) * x_stride + k);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[t][r] = _mm256_fmadd_ps(xv, wv[r], acc[t][r]);
    }
  }
  if (k < d) {
    const size_t rest = d - k;
    __m256 wv[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) wv[r] = L::LoadTail(w[r] + k, rest);
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) {
      const __m256 xv = F32::LoadTail(x + static_cast<size_t>(t) * x_stride + k, rest);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[t][r] = _mm256_fmadd_ps(xv, wv[r], acc[t][r]);
    }
  }
#pragma GCC unroll 8
  for (int t = 0; t < T; ++t) {
    float* yt = y + static_cast<size_t>(t) * y_stride;
#pragma GCC unroll 2
    for (int g = 0; g < R / 4; ++g) {
      const size_t first = static_cast<size_t>(g) * 4;
      if (first >= rows) break;
      const __m128 s =
          HSum4(acc[t][first], acc[t][first + 1], acc[t][first + 2], acc[t][first + 3]);
      _mm_maskstore_ps(yt + first,
                       _mm256_castsi256_si128(TailMask(std::min<size_t>(4, rows - first))), s);
    }
  }
}

// Tokens [0, n) against R weight rows (rows <= R valid; the rest repeat the
// last valid row and are not stored), in tiles of T tokens and a last one.
template <class L, int R, int T>
void GemmRows(const float* x, size_t n, size_t x_stride, const typename L::T* const* w, size_t d,
              float* y, size_t y_stride, size_t rows) {
  static_assert(T == 2, "the tail below handles one leftover token");
  size_t t = 0;
  for (; t + T <= n; t += T) {
    GemmTile<L, R, T>(x + t * x_stride, x_stride, w, d, y + t * y_stride, y_stride, rows);
  }
  if (t < n) GemmTile<L, R, 1>(x + t * x_stride, x_stride, w, d, y + t * y_stride, y_stride, rows);
}

template <class L>
void MatMulT(const float* x, size_t n, size_t x_stride, const typename L::T* w, size_t m,
             size_t w_stride, size_t d, float* y, size_t y_stride) {
  constexpr int kR = 4, kT = 2;
  if (n == 0 || m == 0) return;
  const size_t row_bytes = std::max<size_t>(1, d * sizeof(float));
  const size_t chunk = std::max<size_t>(kT, kGemmChunkBytes / row_bytes / kT * kT);
  for (size_t t0 = 0; t0 < n; t0 += chunk) {
    const size_t nt = std::min(chunk, n - t0);
    for (size_t o = 0; o < m; o += kR) {
      const size_t rows = std::min<size_t>(kR, m - o);
      const typename L::T* wr[kR];
      for (size_t r = 0; r < static_cast<size_t>(kR); ++r) {
        wr[r] = w + (o + std::min(r, rows - 1)) * w_stride;
      }
      GemmRows<L, kR, kT>(x + t0 * x_stride, nt, x_stride, wr, d, y + t0 * y_stride + o,
                          y_stride, rows);
    }
  }
}

constexpr Kernels kAvx2 = {
    .isa = Isa::kAvx2,
    .name = "avx2",
    .dot = Dot,
    .l2sqr = L2Sqr,
    .dot_batch = DotBatchT<F32>,
    .dot_gather = DotGatherT<F32>,
    .dot_bf16 = DotBf16,
    .dot_batch_bf16 = DotBatchT<Bf16>,
    .dot_gather_bf16 = DotGatherT<Bf16>,
    .axpy = AxpyT<F32>,
    .axpy_bf16 = AxpyT<Bf16>,
    .axpy_fp16 = AxpyT<Fp16>,
    .exp_shift_sum = ExpShiftSum,
    .max = Max,
    .fp32_to_bf16 = Fp32ToBf16,
    .bf16_to_fp32 = Bf16ToFp32,
    .fp32_to_fp16 = Fp32ToFp16,
    .fp16_to_fp32 = Fp16ToFp32,
    .dot_batch_multi = DotBatchMulti,
    .matmul_bf16 = MatMulT<Bf16>,
    .matmul_f32 = MatMulT<F32>,
};

}  // namespace

const Kernels* Avx2KernelsOrNull() { return &kAvx2; }

}  // namespace kvr::simd
