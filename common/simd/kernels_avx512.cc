// AVX-512 (F/BW/VL/DQ) + FMA + F16C kernels. Only this file is compiled with
// those flags, and dispatch.cc hands the table out only on CPUs that have them.
// No AVX512_BF16/FP16 instructions: bf16 widens with a shift.
//
// Tails (lengths not a multiple of 16) use mask registers, so no kernel reads
// or writes past the element counts it is given.
//
// Numerics: sums are reassociated (several accumulators, FMA), so dot/l2/axpy
// differ from the scalar oracle by float rounding only. Conversions are
// bit-identical to common/half.h. max() skips NaNs like the scalar oracle.
// GCC 12's avx512fintrin.h initialises its "undefined" vectors from
// themselves, which -W(maybe-)uninitialized reports at every inlined use.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "common/simd/kernels.h"

namespace kvr::simd {
namespace {

constexpr size_t kW = 16;  // floats per __m512

// See kernels_avx2.cc: rows prefetched ahead by dot_gather, and how much of each.
constexpr size_t kPrefetchRows = 8;
constexpr size_t kMaxPrefetchBytes = 1024;

// First r lanes (0 <= r <= 16).
inline __mmask16 TailMask(size_t r) { return static_cast<__mmask16>((1u << r) - 1u); }

// 16 lanes -> 8 lanes holding pairwise sums.
inline __m256 Fold(__m512 v) {
  return _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
}

inline float HSum(__m512 v) {
  const __m256 h = Fold(v);
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Lane i of the result is the horizontal sum of v_i.
inline __m128 HSum4(__m512 v0, __m512 v1, __m512 v2, __m512 v3) {
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(Fold(v0), Fold(v1)),
                                  _mm256_hadd_ps(Fold(v2), Fold(v3)));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// Loaders: 16 elements of a row type widened to fp32. LoadTail reads only the
// first r (< 16) elements and zero-fills the rest.
struct F32 {
  using T = float;
  static __m512 Load(const float* p) { return _mm512_loadu_ps(p); }
  static __m512 LoadTail(const float* p, size_t r) {
    return _mm512_maskz_loadu_ps(TailMask(r), p);
  }
};

struct Bf16 {
  using T = uint16_t;
  static __m512 Widen(__m256i h) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static __m512 Load(const uint16_t* p) {
    return Widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static __m512 LoadTail(const uint16_t* p, size_t r) {
    return Widen(_mm256_maskz_loadu_epi16(TailMask(r), p));
  }
};

struct Fp16 {
  using T = uint16_t;
  static __m512 Load(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static __m512 LoadTail(const uint16_t* p, size_t r) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(TailMask(r), p));
  }
};

template <class L>
float DotT(const float* a, const typename L::T* b, size_t d) {
  __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  size_t i = 0;
  for (; i + 4 * kW <= d; i += 4 * kW) {
    s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), L::Load(b + i), s0);
    s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + kW), L::Load(b + i + kW), s1);
    s2 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 2 * kW), L::Load(b + i + 2 * kW), s2);
    s3 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 3 * kW), L::Load(b + i + 3 * kW), s3);
  }
  for (; i + kW <= d; i += kW) s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), L::Load(b + i), s0);
  if (i < d) s1 = _mm512_fmadd_ps(F32::LoadTail(a + i, d - i), L::LoadTail(b + i, d - i), s1);
  return HSum(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
}

// Dots of q with four rows at once; see kernels_avx2.cc.
template <class L>
inline __m128 Dot4(const float* q, const typename L::T* r0, const typename L::T* r1,
                   const typename L::T* r2, const typename L::T* r3, size_t d) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  __m512 b0 = a0, b1 = a0, b2 = a0, b3 = a0;
  size_t i = 0;
  for (; i + 2 * kW <= d; i += 2 * kW) {
    const __m512 qa = _mm512_loadu_ps(q + i);
    const __m512 qb = _mm512_loadu_ps(q + i + kW);
    a0 = _mm512_fmadd_ps(qa, L::Load(r0 + i), a0);
    a1 = _mm512_fmadd_ps(qa, L::Load(r1 + i), a1);
    a2 = _mm512_fmadd_ps(qa, L::Load(r2 + i), a2);
    a3 = _mm512_fmadd_ps(qa, L::Load(r3 + i), a3);
    b0 = _mm512_fmadd_ps(qb, L::Load(r0 + i + kW), b0);
    b1 = _mm512_fmadd_ps(qb, L::Load(r1 + i + kW), b1);
    b2 = _mm512_fmadd_ps(qb, L::Load(r2 + i + kW), b2);
    b3 = _mm512_fmadd_ps(qb, L::Load(r3 + i + kW), b3);
  }
  if (i + kW <= d) {
    const __m512 qa = _mm512_loadu_ps(q + i);
    a0 = _mm512_fmadd_ps(qa, L::Load(r0 + i), a0);
    a1 = _mm512_fmadd_ps(qa, L::Load(r1 + i), a1);
    a2 = _mm512_fmadd_ps(qa, L::Load(r2 + i), a2);
    a3 = _mm512_fmadd_ps(qa, L::Load(r3 + i), a3);
    i += kW;
  }
  if (i < d) {
    const size_t r = d - i;
    const __m512 qt = F32::LoadTail(q + i, r);
    b0 = _mm512_fmadd_ps(qt, L::LoadTail(r0 + i, r), b0);
    b1 = _mm512_fmadd_ps(qt, L::LoadTail(r1 + i, r), b1);
    b2 = _mm512_fmadd_ps(qt, L::LoadTail(r2 + i, r), b2);
    b3 = _mm512_fmadd_ps(qt, L::LoadTail(r3 + i, r), b3);
  }
  return HSum4(_mm512_add_ps(a0, b0), _mm512_add_ps(a1, b1), _mm512_add_ps(a2, b2),
               _mm512_add_ps(a3, b3));
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
    _mm_mask_storeu_ps(out + i, static_cast<__mmask8>(TailMask(r)),
                       Dot4<L>(q, row(i), r > 1 ? row(i + 1) : last, r > 2 ? row(i + 2) : last,
                               last, d));
  }
}

template <class L>
void DotBatchT(const float* q, const typename L::T* rows, size_t n, size_t d, size_t stride,
               float* out) {
  DotRows<L>(
      q, n, d, out, [&](size_t i) { return rows + i * stride; }, [](size_t) {});
}

// Dot4<F32> for two queries at once: *o0 / *o1 are bit for bit Dot4<F32>(q0
// / q1, r0 .. r3, d) (the same accumulators and reduction per query), and
// each row load feeds both queries' FMAs (16 accumulators + 4 query + 1 row
// registers of the 32).
inline void Dot2x4(const float* q0, const float* q1, const float* r0, const float* r1,
                   const float* r2, const float* r3, size_t d, __m128* o0, __m128* o1) {
  __m512 a00 = _mm512_setzero_ps(), a01 = a00, a02 = a00, a03 = a00;
  __m512 b00 = a00, b01 = a00, b02 = a00, b03 = a00;
  __m512 a10 = a00, a11 = a00, a12 = a00, a13 = a00;
  __m512 b10 = a00, b11 = a00, b12 = a00, b13 = a00;
  size_t i = 0;
  for (; i + 2 * kW <= d; i += 2 * kW) {
    const __m512 q0a = _mm512_loadu_ps(q0 + i), q0b = _mm512_loadu_ps(q0 + i + kW);
    const __m512 q1a = _mm512_loadu_ps(q1 + i), q1b = _mm512_loadu_ps(q1 + i + kW);
    __m512 x = _mm512_loadu_ps(r0 + i);
    a00 = _mm512_fmadd_ps(q0a, x, a00);
    a10 = _mm512_fmadd_ps(q1a, x, a10);
    x = _mm512_loadu_ps(r1 + i);
    a01 = _mm512_fmadd_ps(q0a, x, a01);
    a11 = _mm512_fmadd_ps(q1a, x, a11);
    x = _mm512_loadu_ps(r2 + i);
    a02 = _mm512_fmadd_ps(q0a, x, a02);
    a12 = _mm512_fmadd_ps(q1a, x, a12);
    x = _mm512_loadu_ps(r3 + i);
    a03 = _mm512_fmadd_ps(q0a, x, a03);
    a13 = _mm512_fmadd_ps(q1a, x, a13);
    x = _mm512_loadu_ps(r0 + i + kW);
    b00 = _mm512_fmadd_ps(q0b, x, b00);
    b10 = _mm512_fmadd_ps(q1b, x, b10);
    x = _mm512_loadu_ps(r1 + i + kW);
    b01 = _mm512_fmadd_ps(q0b, x, b01);
    b11 = _mm512_fmadd_ps(q1b, x, b11);
    x = _mm512_loadu_ps(r2 + i + kW);
    b02 = _mm512_fmadd_ps(q0b, x, b02);
    b12 = _mm512_fmadd_ps(q1b, x, b12);
    x = _mm512_loadu_ps(r3 + i + kW);
    b03 = _mm512_fmadd_ps(q0b, x, b03);
    b13 = _mm512_fmadd_ps(q1b, x, b13);
  }
  if (i + kW <= d) {
    const __m512 q0a = _mm512_loadu_ps(q0 + i), q1a = _mm512_loadu_ps(q1 + i);
    __m512 x = _mm512_loadu_ps(r0 + i);
    a00 = _mm512_fmadd_ps(q0a, x, a00);
    a10 = _mm512_fmadd_ps(q1a, x, a10);
    x = _mm512_loadu_ps(r1 + i);
    a01 = _mm512_fmadd_ps(q0a, x, a01);
    a11 = _mm512_fmadd_ps(q1a, x, a11);
    x = _mm512_loadu_ps(r2 + i);
    a02 = _mm512_fmadd_ps(q0a, x, a02);
    a12 = _mm512_fmadd_ps(q1a, x, a12);
    x = _mm512_loadu_ps(r3 + i);
    a03 = _mm512_fmadd_ps(q0a, x, a03);
    a13 = _mm512_fmadd_ps(q1a, x, a13);
    i += kW;
  }
  if (i < d) {
    const size_t r = d - i;
    const __m512 q0t = F32::LoadTail(q0 + i, r), q1t = F32::LoadTail(q1 + i, r);
    __m512 x = F32::LoadTail(r0 + i, r);
    b00 = _mm512_fmadd_ps(q0t, x, b00);
    b10 = _mm512_fmadd_ps(q1t, x, b10);
    x = F32::LoadTail(r1 + i, r);
    b01 = _mm512_fmadd_ps(q0t, x, b01);
    b11 = _mm512_fmadd_ps(q1t, x, b11);
    x = F32::LoadTail(r2 + i, r);
    b02 = _mm512_fmadd_ps(q0t, x, b02);
    b12 = _mm512_fmadd_ps(q1t, x, b12);
    x = F32::LoadTail(r3 + i, r);
    b03 = _mm512_fmadd_ps(q0t, x, b03);
    b13 = _mm512_fmadd_ps(q1t, x, b13);
  }
  *o0 = HSum4(_mm512_add_ps(a00, b00), _mm512_add_ps(a01, b01), _mm512_add_ps(a02, b02),
              _mm512_add_ps(a03, b03));
  *o1 = HSum4(_mm512_add_ps(a10, b10), _mm512_add_ps(a11, b11), _mm512_add_ps(a12, b12),
              _mm512_add_ps(a13, b13));
}

// Rows per block that every query pair passes over while it sits in L1
// (8 KiB at d 128).
constexpr size_t kMultiRowBlock = 16;

// Each lane of Dot4 / Dot2x4 depends on its own query and row only, so the
// grouping of rows (and the repeated last row of a partial group) does not
// change any output: all equal DotBatchT<F32>'s.
void DotBatchMulti(const float* q, size_t nq, size_t q_stride, const float* rows, size_t n,
                   size_t d, size_t stride, float* out, size_t out_stride) {
  const auto row = [&](size_t i) { return rows + i * stride; };
  for (size_t i0 = 0; i0 < n; i0 += kMultiRowBlock) {
    const size_t i1 = std::min(n, i0 + kMultiRowBlock);
    size_t j = 0;
    for (; j + 2 <= nq; j += 2) {
      const float* qa = q + j * q_stride;
      const float* qb = qa + q_stride;
      float* oa = out + j * out_stride;
      float* ob = oa + out_stride;
      __m128 x, y;
      size_t i = i0;
      for (; i + 4 <= i1; i += 4) {
        Dot2x4(qa, qb, row(i), row(i + 1), row(i + 2), row(i + 3), d, &x, &y);
        _mm_storeu_ps(oa + i, x);
        _mm_storeu_ps(ob + i, y);
      }
      if (i < i1) {
        const size_t r = i1 - i;
        const float* last = row(i1 - 1);
        Dot2x4(qa, qb, row(i), r > 1 ? row(i + 1) : last, r > 2 ? row(i + 2) : last, last, d,
               &x, &y);
        const auto m = static_cast<__mmask8>(TailMask(r));
        _mm_mask_storeu_ps(oa + i, m, x);
        _mm_mask_storeu_ps(ob + i, m, y);
      }
    }
    if (j < nq) {
      DotBatchT<F32>(q + j * q_stride, row(i0), i1 - i0, d, stride, out + j * out_stride + i0);
    }
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
  __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  size_t i = 0;
  for (; i + 4 * kW <= d; i += 4 * kW) {
    const __m512 t0 = _mm512_sub_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i));
    const __m512 t1 = _mm512_sub_ps(_mm512_loadu_ps(a + i + kW), _mm512_loadu_ps(b + i + kW));
    const __m512 t2 =
        _mm512_sub_ps(_mm512_loadu_ps(a + i + 2 * kW), _mm512_loadu_ps(b + i + 2 * kW));
    const __m512 t3 =
        _mm512_sub_ps(_mm512_loadu_ps(a + i + 3 * kW), _mm512_loadu_ps(b + i + 3 * kW));
    s0 = _mm512_fmadd_ps(t0, t0, s0);
    s1 = _mm512_fmadd_ps(t1, t1, s1);
    s2 = _mm512_fmadd_ps(t2, t2, s2);
    s3 = _mm512_fmadd_ps(t3, t3, s3);
  }
  for (; i + kW <= d; i += kW) {
    const __m512 t = _mm512_sub_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i));
    s0 = _mm512_fmadd_ps(t, t, s0);
  }
  if (i < d) {
    const __m512 t = _mm512_sub_ps(F32::LoadTail(a + i, d - i), F32::LoadTail(b + i, d - i));
    s1 = _mm512_fmadd_ps(t, t, s1);
  }
  return HSum(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
}

template <class L>
void AxpyT(float a, const typename L::T* x, float* y, size_t d) {
  const __m512 va = _mm512_set1_ps(a);
  size_t i = 0;
  for (; i + 2 * kW <= d; i += 2 * kW) {
    _mm512_storeu_ps(y + i, _mm512_fmadd_ps(va, L::Load(x + i), _mm512_loadu_ps(y + i)));
    _mm512_storeu_ps(y + i + kW,
                     _mm512_fmadd_ps(va, L::Load(x + i + kW), _mm512_loadu_ps(y + i + kW)));
  }
  for (; i + kW <= d; i += kW) {
    _mm512_storeu_ps(y + i, _mm512_fmadd_ps(va, L::Load(x + i), _mm512_loadu_ps(y + i)));
  }
  if (i < d) {
    const __mmask16 m = TailMask(d - i);
    _mm512_mask_storeu_ps(
        y + i, m, _mm512_fmadd_ps(va, L::LoadTail(x + i, d - i), _mm512_maskz_loadu_ps(m, y + i)));
  }
}

// exp(t) exactly as in kernels_avx2.cc (Cephes reduction, degree-7
// polynomial, 2^n added into the exponent bits), so both tables agree lane
// for lane. t < -87 gives 0, t > 88.72 gives +inf, NaN stays NaN.
inline __m512 Exp(__m512 t) {
  const __m512 x = _mm512_min_ps(_mm512_max_ps(t, _mm512_set1_ps(-87.5f)),
                                 _mm512_set1_ps(88.72283f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r);
  p = _mm512_add_ps(p, _mm512_set1_ps(1.0f));
  const __m512i scale = _mm512_slli_epi32(_mm512_cvtps_epi32(n), 23);
  __m512 e = _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(p), scale));
  e = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(t, _mm512_set1_ps(-87.0f), _CMP_NLT_UQ), e);
  e = _mm512_mask_mov_ps(e, _mm512_cmp_ps_mask(t, _mm512_set1_ps(88.72283f), _CMP_GT_OQ),
                         _mm512_set1_ps(__builtin_inff()));
  return _mm512_mask_mov_ps(e, _mm512_cmp_ps_mask(t, t, _CMP_UNORD_Q), t);
}

float ExpShiftSum(const float* x, float shift, float* out, size_t n) {
  const __m512 vs = _mm512_set1_ps(shift);
  __m512 sum = _mm512_setzero_ps();
  size_t i = 0;
  for (; i + kW <= n; i += kW) {
    const __m512 e = Exp(_mm512_sub_ps(_mm512_loadu_ps(x + i), vs));
    _mm512_storeu_ps(out + i, e);
    sum = _mm512_add_ps(sum, e);
  }
  if (i < n) {
    const __mmask16 m = TailMask(n - i);
    const __m512 e = _mm512_maskz_mov_ps(m, Exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + i), vs)));
    _mm512_mask_storeu_ps(out + i, m, e);
    sum = _mm512_add_ps(sum, e);
  }
  return HSum(sum);
}

// Like the scalar oracle, a NaN never replaces the running maximum: the result
// is the largest non-NaN element, or -inf when there is none.
float Max(const float* x, size_t n) {
  const __m512 neg_inf = _mm512_set1_ps(-__builtin_inff());
  __m512 m0 = neg_inf, m1 = neg_inf;
  size_t i = 0;
  // _mm512_max_ps(a, b) returns b when either is NaN, so the running maximum
  // goes second.
  for (; i + 2 * kW <= n; i += 2 * kW) {
    m0 = _mm512_max_ps(_mm512_loadu_ps(x + i), m0);
    m1 = _mm512_max_ps(_mm512_loadu_ps(x + i + kW), m1);
  }
  for (; i + kW <= n; i += kW) m0 = _mm512_max_ps(_mm512_loadu_ps(x + i), m0);
  if (i < n) m1 = _mm512_max_ps(_mm512_mask_loadu_ps(neg_inf, TailMask(n - i), x + i), m1);
  const __m512 v = _mm512_max_ps(m0, m1);
  const __m256 h = _mm256_max_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 16 fp32 -> bf16 as in FloatToBf16: round to nearest even on the bit pattern;
// NaN keeps its top bits with the quiet bit set.
inline __m256i Bf16Bits(__m512 f) {
  const __m512i u = _mm512_castps_si512(f);
  const __m512i hi = _mm512_srli_epi32(u, 16);
  const __m512i lsb = _mm512_and_si512(hi, _mm512_set1_epi32(1));
  const __m512i rounded =
      _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
  const __mmask16 is_nan = _mm512_cmpgt_epu32_mask(
      _mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)), _mm512_set1_epi32(0x7f800000));
  return _mm512_cvtepi32_epi16(
      _mm512_mask_mov_epi32(rounded, is_nan, _mm512_or_si512(hi, _mm512_set1_epi32(0x40))));
}

void Fp32ToBf16(const float* in, uint16_t* out, size_t n) {
  size_t i = 0;
  for (; i + kW <= n; i += kW) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), Bf16Bits(_mm512_loadu_ps(in + i)));
  }
  if (i < n) {
    const __mmask16 m = TailMask(n - i);
    _mm256_mask_storeu_epi16(out + i, m, Bf16Bits(_mm512_maskz_loadu_ps(m, in + i)));
  }
}

void Bf16ToFp32(const uint16_t* in, float* out, size_t n) {
  size_t i = 0;
  for (; i + kW <= n; i += kW) _mm512_storeu_ps(out + i, Bf16::Load(in + i));
  if (i < n) _mm512_mask_storeu_ps(out + i, TailMask(n - i), Bf16::LoadTail(in + i, n - i));
}

// 16 fp32 -> fp16 with F16C-style rounding (nearest even, Inf on overflow,
// exact subnormals). The hardware keeps a NaN's top payload bits;
// common/half.h returns the canonical quiet NaN (sign | 0x7e00), so NaN lanes
// are patched to match.
inline __m256i Fp16Bits(__m512 f) {
  const __m256i h = _mm512_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256i canonical =
      _mm256_or_si256(_mm256_and_si256(h, _mm256_set1_epi16(static_cast<int16_t>(0x8000))),
                      _mm256_set1_epi16(0x7e00));
  return _mm256_mask_mov_epi16(h, _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q), canonical);
}

void Fp32ToFp16(const float* in, uint16_t* out, size_t n) {
  size_t i = 0;
  for (; i + kW <= n; i += kW) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), Fp16Bits(_mm512_loadu_ps(in + i)));
  }
  if (i < n) {
    const __mmask16 m = TailMask(n - i);
    _mm256_mask_storeu_epi16(out + i, m, Fp16Bits(_mm512_maskz_loadu_ps(m, in + i)));
  }
}

void Fp16ToFp32(const uint16_t* in, float* out, size_t n) {
  size_t i = 0;
  for (; i + kW <= n; i += kW) _mm512_storeu_ps(out + i, Fp16::Load(in + i));
  if (i < n) _mm512_mask_storeu_ps(out + i, TailMask(n - i), Fp16::LoadTail(in + i, n - i));
}

// ---- matmul_bf16 / matmul_f32: register-blocked matrix product ----
//
// Per (token, row) pair, the arithmetic is fixed: the 16-element blocks
// b = 0 .. ceil(d / 16) - 1 of the pair (the last one masked when partial)
// are FMA'd in order into one register for even b and another for odd b; the
// output is HSum4's lane of (even + odd). HSum4's lanes are independent, so
// every schedule below gives a pair the same bits, whatever n, m, the tile or
// the pair's place in it: batches are bit-identical to single tokens.
//
// Two schedules:
//  * n <= 3 (GEMV-like, memory-bound): one weight row at a time, both
//    parities together (2n chains in flight), so the weights stream as one
//    sequential run like dot_bf16's and each row is widened once for the n
//    tokens;
//  * n >= 4: tiles of 4 rows x 3 tokens (24 accumulators + 4 weight vectors
//    + 1 token vector of the 32 registers): each widened weight vector feeds
//    3 FMAs instead of 1 and each token vector 4. The first token tile of
//    each row block prefetches the next block's rows into L2 (one line per
//    row every 64 bytes of k), so the fetch overlaps the block's compute.
// Why two chains per pair: with one, a single row is one dependent FMA chain
// (latency-bound), so n = 1 would need several rows in flight, i.e. several
// memory streams, measured 20-30% slower than dot_bf16's single stream on
// L3/DRAM-resident weights; two chains let n = 1 keep one stream, at
// dot_bf16's speed when the weights come from DRAM (decode: 1.8 GiB per
// step) and ~0.9x when one matrix sits in L3 (dot_bf16 keeps 4 chains per
// row, one more than fits the tiles below). The price: tiles of 4 x 3 instead of 4 x 6 (one chain
// per pair), ~0.67x of that tile's peak in L2 (bench: 148 vs 221 GFLOP/s,
// one core).

// x rows (fp32) of one token chunk kept in L2 while every weight tile passes
// over them; larger batches run in chunks of this many bytes of x.
constexpr size_t kGemmChunkBytes = size_t{512} << 10;
// At most this many tokens take the row-at-a-time schedule.
constexpr size_t kGemvMaxTokens = 3;

// An R x T tile, both parities in one pass: 2 * R * T accumulators + R
// weight vectors + 1 token vector of the 32 registers. rows <= R are valid;
// the rest repeat the last valid row and are not stored. `next` (or nullptr)
// is prefetched.
template <class L, int R, int T>
void GemmTile(const float* x, size_t x_stride, const typename L::T* const* w,
              const typename L::T* const* next, size_t d, float* y, size_t y_stride,
              size_t rows) {
  static_assert(R % 4 == 0 && 2 * R * T + R + 1 <= 32, "the tile must fit the 32 zmm registers");
  constexpr size_t kLine = 64 / sizeof(typename L::T);  // elements per cache line
  __m512 even[T][R], odd[T][R];
#pragma GCC unroll 8
  for (int t = 0; t < T; ++t) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) even[t][r] = odd[t][r] = _mm512_setzero_ps();
  }
  // One parity's block at k into acc (masked to `rest` elements when given).
  const auto block = [&](size_t k, __m512(&acc)[T][R], size_t rest) {
    __m512 wv[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) wv[r] = rest < kW ? L::LoadTail(w[r] + k, rest) : L::Load(w[r] + k);
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) {
      const float* xt = x + static_cast<size_t>(t) * x_stride + k;
      const __m512 xv = rest < kW ? F32::LoadTail(xt, rest) : _mm512_loadu_ps(xt);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[t][r] = _mm512_fmadd_ps(xv, wv[r], acc[t][r]);
    }
  };
  size_t k = 0;
  for (; k + 2 * kW <= d; k += 2 * kW) {
    if (next != nullptr) {
      // 2 * kW elements of k per step: one bf16 line, two f32 lines.
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
#pragma GCC unroll 2
        for (size_t l = 0; l < 2 * kW; l += kLine) {
          _mm_prefetch(reinterpret_cast<const char*>(next[r] + k + l), _MM_HINT_T1);
        }
      }
    }
    block(k, even, kW);
    block(k + kW, odd, kW);
  }
  if (k + kW <= d) {  // a full even block, then maybe a partial odd one
    block(k, even, kW);
    k += kW;
    if (k < d) block(k, odd, d - k);
  } else if (k < d) {  // a partial even block
    block(k, even, d - k);
  }
#pragma GCC unroll 8
  for (int t = 0; t < T; ++t) {
    float* yt = y + static_cast<size_t>(t) * y_stride;
#pragma GCC unroll 2
    for (int g = 0; g < R / 4; ++g) {
      const size_t f = static_cast<size_t>(g) * 4;
      if (f >= rows) break;
      const __m128 s = HSum4(
          _mm512_add_ps(even[t][f], odd[t][f]), _mm512_add_ps(even[t][f + 1], odd[t][f + 1]),
          _mm512_add_ps(even[t][f + 2], odd[t][f + 2]),
          _mm512_add_ps(even[t][f + 3], odd[t][f + 3]));
      _mm_mask_storeu_ps(yt + f, static_cast<__mmask8>(TailMask(std::min<size_t>(4, rows - f))),
                         s);
    }
  }
}

// Tokens [0, n) against R weight rows in tiles of at most T tokens; the first
// tile prefetches `next`.
template <class L, int R, int T>
void GemmRows(const float* x, size_t n, size_t x_stride, const typename L::T* const* w,
              const typename L::T* const* next, size_t d, float* y, size_t y_stride,
              size_t rows) {
  size_t t = 0;
  for (; t + T <= n; t += T) {
    GemmTile<L, R, T>(x + t * x_stride, x_stride, w, t == 0 ? next : nullptr, d,
                      y + t * y_stride, y_stride, rows);
  }
  if (t == n) return;
  const float* xt = x + t * x_stride;
  float* yt = y + t * y_stride;
  const typename L::T* const* pf = t == 0 ? next : nullptr;
  static_assert(T == 3, "the tail below covers 1..2 tokens");
  if (n - t == 1) return GemmTile<L, R, 1>(xt, x_stride, w, pf, d, yt, y_stride, rows);
  GemmTile<L, R, 2>(xt, x_stride, w, pf, d, yt, y_stride, rows);
}

// Weight rows in tiles of R, each over every token of a chunk.
template <class L, int R, int T>
void GemmChunk(const float* x, size_t n, size_t x_stride, const typename L::T* w, size_t m,
               size_t w_stride, size_t d, float* y, size_t y_stride) {
  const auto fill = [&](size_t o, const typename L::T** out) {
    const size_t rows = std::min<size_t>(R, m - o);
    for (size_t r = 0; r < static_cast<size_t>(R); ++r) {
      out[r] = w + (o + std::min(r, rows - 1)) * w_stride;
    }
  };
  const typename L::T* wr[R];
  const typename L::T* wn[R];
  fill(0, wr);
  for (size_t o = 0; o < m; o += R) {
    const bool more = o + R < m;
    if (more) fill(o + R, wn);
    GemmRows<L, R, T>(x, n, x_stride, wr, more ? wn : nullptr, d, y + o, y_stride,
                      std::min<size_t>(R, m - o));
    if (more) std::copy(wn, wn + R, wr);
  }
}

// The n <= 3 schedule: rows one at a time (both parities of a row together),
// reduced four rows per HSum4.
template <class L, int T>
void GemvRows(const float* x, size_t x_stride, const typename L::T* w, size_t m,
              size_t w_stride, size_t d, float* y, size_t y_stride) {
  for (size_t o = 0; o < m; o += 4) {
    const size_t rows = std::min<size_t>(4, m - o);
    __m512 sum[T][4];
    for (size_t r = 0; r < 4; ++r) {
      __m512 e[T], od[T];
#pragma GCC unroll 4
      for (int t = 0; t < T; ++t) e[t] = od[t] = _mm512_setzero_ps();
      if (r < rows) {
        const typename L::T* wr = w + (o + r) * w_stride;
        size_t k = 0;
        for (; k + 2 * kW <= d; k += 2 * kW) {
          const __m512 we = L::Load(wr + k), wo = L::Load(wr + k + kW);
#pragma GCC unroll 4
          for (int t = 0; t < T; ++t) {
            const float* xt = x + static_cast<size_t>(t) * x_stride + k;
            e[t] = _mm512_fmadd_ps(_mm512_loadu_ps(xt), we, e[t]);
            od[t] = _mm512_fmadd_ps(_mm512_loadu_ps(xt + kW), wo, od[t]);
          }
        }
        if (k + kW <= d) {  // a full even block, then maybe a partial odd one
          const __m512 we = L::Load(wr + k);
#pragma GCC unroll 4
          for (int t = 0; t < T; ++t) {
            e[t] = _mm512_fmadd_ps(_mm512_loadu_ps(x + static_cast<size_t>(t) * x_stride + k), we,
                                   e[t]);
          }
          k += kW;
          if (k < d) {
            const __m512 wo = L::LoadTail(wr + k, d - k);
#pragma GCC unroll 4
            for (int t = 0; t < T; ++t) {
              od[t] = _mm512_fmadd_ps(
                  F32::LoadTail(x + static_cast<size_t>(t) * x_stride + k, d - k), wo, od[t]);
            }
          }
        } else if (k < d) {  // a partial even block
          const __m512 we = L::LoadTail(wr + k, d - k);
#pragma GCC unroll 4
          for (int t = 0; t < T; ++t) {
            e[t] = _mm512_fmadd_ps(
                F32::LoadTail(x + static_cast<size_t>(t) * x_stride + k, d - k), we, e[t]);
          }
        }
      }
#pragma GCC unroll 4
      for (int t = 0; t < T; ++t) sum[t][r] = _mm512_add_ps(e[t], od[t]);
    }
    const __mmask8 mask = static_cast<__mmask8>(TailMask(rows));
#pragma GCC unroll 4
    for (int t = 0; t < T; ++t) {
      _mm_mask_storeu_ps(y + static_cast<size_t>(t) * y_stride + o, mask,
                         HSum4(sum[t][0], sum[t][1], sum[t][2], sum[t][3]));
    }
  }
}

template <class L>
void MatMulT(const float* x, size_t n, size_t x_stride, const typename L::T* w, size_t m,
             size_t w_stride, size_t d, float* y, size_t y_stride) {
  if (n == 0 || m == 0) return;
  static_assert(kGemvMaxTokens == 3);
  switch (n) {
    case 1:
      return GemvRows<L, 1>(x, x_stride, w, m, w_stride, d, y, y_stride);
    case 2:
      return GemvRows<L, 2>(x, x_stride, w, m, w_stride, d, y, y_stride);
    case 3:
      return GemvRows<L, 3>(x, x_stride, w, m, w_stride, d, y, y_stride);
    default:
      break;
  }
  constexpr size_t kT = 3;
  const size_t row_bytes = std::max<size_t>(1, d * sizeof(float));
  const size_t chunk = std::max(kT, kGemmChunkBytes / row_bytes / kT * kT);
  for (size_t t = 0; t < n; t += chunk) {
    GemmChunk<L, 4, kT>(x + t * x_stride, std::min(chunk, n - t), x_stride, w, m, w_stride, d,
                        y + t * y_stride, y_stride);
  }
}

constexpr Kernels kAvx512 = {
    .isa = Isa::kAvx512,
    .name = "avx512",
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

const Kernels* Avx512KernelsOrNull() { return &kAvx512; }

}  // namespace kvr::simd
