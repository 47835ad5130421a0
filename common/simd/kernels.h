// SIMD kernels with runtime ISA dispatch.
//
// One translation unit per ISA (kernels_scalar.cc, kernels_avx2.cc,
// kernels_avx512.cc), each compiled with its own flags; Active() picks the best
// one the CPU supports on first use. The scalar table always exists and is
// the test oracle. Set KVR_SIMD=scalar|avx2|avx512 to force a table (an
// unsupported choice falls back to the best supported one, with a warning).
//
// All kernels are thread-safe and allocation-free. Lengths are element counts.
// "bf16"/"fp16" storage is uint16_t bit patterns (see common/half.h).
#pragma once

#include <cstddef>
#include <cstdint>

namespace kvr::simd {

enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

struct Kernels {
  Isa isa;
  const char* name;

  // Inner product / squared L2 distance of two length-d vectors.
  float (*dot)(const float* a, const float* b, size_t d);
  float (*l2sqr)(const float* a, const float* b, size_t d);
  // out[i] = q . rows[i] for i < n; row i starts at rows + i * stride.
  void (*dot_batch)(const float* q, const float* rows, size_t n, size_t d, size_t stride,
                    float* out);
  // out[i] = q . (base + ids[i] * stride) for i < n: scattered rows (graph
  // neighbours), with the next rows prefetched while the current ones compute.
  void (*dot_gather)(const float* q, const float* base, const uint32_t* ids, size_t n, size_t d,
                     size_t stride, float* out);
  // The same with bf16 rows.
  float (*dot_bf16)(const float* a, const uint16_t* b, size_t d);
  void (*dot_batch_bf16)(const float* q, const uint16_t* rows, size_t n, size_t d,
                         size_t stride, float* out);
  void (*dot_gather_bf16)(const float* q, const uint16_t* base, const uint32_t* ids, size_t n,
                          size_t d, size_t stride, float* out);
  // y[i] += a * x[i], x in fp32 / bf16 / fp16.
  void (*axpy)(float a, const float* x, float* y, size_t d);
  void (*axpy_bf16)(float a, const uint16_t* x, float* y, size_t d);
  void (*axpy_fp16)(float a, const uint16_t* x, float* y, size_t d);
  // out[i] = exp(x[i] - shift), the argument rounded to float first; returns
  // the sum of out. Relative error of each term <= 1e-7 for arguments in
  // [-87, 0] (SIMD tables: worst 8.4e-8 over every float in that range);
  // exp of anything below -87 is exactly +0, NaN stays NaN.
  float (*exp_shift_sum)(const float* x, float shift, float* out, size_t n);
  // max over x[0..n), ignoring NaNs; -inf for n == 0 or all-NaN input.
  float (*max)(const float* x, size_t n);
  // Conversions; fp32 -> half rounds to nearest even, bit-identical to common/half.h.
  void (*fp32_to_bf16)(const float* in, uint16_t* out, size_t n);
  void (*bf16_to_fp32)(const uint16_t* in, float* out, size_t n);
  void (*fp32_to_fp16)(const float* in, uint16_t* out, size_t n);
  void (*fp16_to_fp32)(const uint16_t* in, float* out, size_t n);
  // Many queries against one run of rows (a GEMM-style block for exact
  // scans): out[j * out_stride + i] = q_j . rows[i] for j < nq, i < n, where
  // q_j starts at q + j * q_stride and row i at rows + i * stride. Every
  // output is bit-identical to dot_batch(q_j, rows, n, d, stride, ...)'s (the
  // same summation order); the SIMD tables read each row once per register
  // block of queries instead of once per query.
  void (*dot_batch_multi)(const float* q, size_t nq, size_t q_stride, const float* rows,
                          size_t n, size_t d, size_t stride, float* out, size_t out_stride);
  // A matrix product for the CPU backend's MatMul: y[t * y_stride + o] =
  // x_t . w_o for t < n, o < m, where x_t (fp32, d elements) starts at
  // x + t * x_stride and weight row w_o (fp32 or bf16) at w + o * w_stride.
  // fp32 accumulation; the activations are never rounded to bf16. Each
  // output depends only on x_t, w_o and d (never on n, m or where the pair
  // falls in the blocking): within one table a token's outputs are
  // bit-identical whether it runs alone or in a batch. The SIMD tables keep
  // a block of (weight rows x tokens) accumulators in registers, so each
  // weight vector is loaded and widened once per block of tokens instead of
  // once per token (dot_bf16's per-pair loop). No allocation; thread-safe;
  // callers split m across threads.
  void (*matmul_bf16)(const float* x, size_t n, size_t x_stride, const uint16_t* w, size_t m,
                      size_t w_stride, size_t d, float* y, size_t y_stride);
  void (*matmul_f32)(const float* x, size_t n, size_t x_stride, const float* w, size_t m,
                     size_t w_stride, size_t d, float* y, size_t y_stride);
};

// The kernel table for the best ISA this CPU supports (or KVR_SIMD's choice).
const Kernels& Active();
// The table for `isa`, or nullptr when it was not compiled in or the CPU lacks it.
const Kernels* ForIsa(Isa isa);

// Per-ISA tables, defined in their own translation units. The AVX tables must
// only be called on CPUs that support them (ForIsa checks).
const Kernels& ScalarKernels();
const Kernels* Avx2KernelsOrNull();    // nullptr when not compiled in
const Kernels* Avx512KernelsOrNull();  // nullptr when not compiled in

// Convenience wrappers over Active().
inline float Dot(const float* a, const float* b, size_t d) { return Active().dot(a, b, d); }
inline float L2Sqr(const float* a, const float* b, size_t d) { return Active().l2sqr(a, b, d); }

}  // namespace kvr::simd
