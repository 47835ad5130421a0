// Portable scalar kernels: the oracle every SIMD table is tested against.
#include <cmath>
#include <limits>

#include "common/half.h"
#include "common/simd/kernels.h"

namespace kvr::simd {
namespace {

float Dot(const float* a, const float* b, size_t d) {
  // Four accumulators keep the dependency chain short without changing the
  // result by more than float reassociation.
  float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  size_t i = 0;
  for (; i + 4 <= d; i += 4) {
    s0 += a[i] * b[i];
    s1 += a[i + 1] * b[i + 1];
    s2 += a[i + 2] * b[i + 2];
    s3 += a[i + 3] * b[i + 3];
  }
  for (; i < d; ++i) s0 += a[i] * b[i];
  return (s0 + s1) + (s2 + s3);
}

float L2Sqr(const float* a, const float* b, size_t d) {
  float s = 0;
  for (size_t i = 0; i < d; ++i) {
    const float t = a[i] - b[i];
    s += t * t;
  }
  return s;
}

void DotBatch(const float* q, const float* rows, size_t n, size_t d, size_t stride, float* out) {
  for (size_t i = 0; i < n; ++i) out[i] = Dot(q, rows + i * stride, d);
}

void DotBatchMulti(const float* q, size_t nq, size_t q_stride, const float* rows, size_t n,
                   size_t d, size_t stride, float* out, size_t out_stride) {
  for (size_t j = 0; j < nq; ++j) {
    DotBatch(q + j * q_stride, rows, n, d, stride, out + j * out_stride);
  }
}

void DotGather(const float* q, const float* base, const uint32_t* ids, size_t n, size_t d,
               size_t stride, float* out) {
  for (size_t i = 0; i < n; ++i) out[i] = Dot(q, base + static_cast<size_t>(ids[i]) * stride, d);
}

float DotBf16(const float* a, const uint16_t* b, size_t d) {
  float s = 0;
  for (size_t i = 0; i < d; ++i) s += a[i] * Bf16ToFloat(b[i]);
  return s;
}

void DotBatchBf16(const float* q, const uint16_t* rows, size_t n, size_t d, size_t stride,
                  float* out) {
  for (size_t i = 0; i < n; ++i) out[i] = DotBf16(q, rows + i * stride, d);
}

void DotGatherBf16(const float* q, const uint16_t* base, const uint32_t* ids, size_t n, size_t d,
                   size_t stride, float* out) {
  for (size_t i = 0; i < n; ++i) {
    out[i] = DotBf16(q, base + static_cast<size_t>(ids[i]) * stride, d);
  }
}

void Axpy(float a, const float* x, float* y, size_t d) {
  for (size_t i = 0; i < d; ++i) y[i] += a * x[i];
}
void AxpyBf16(float a, const uint16_t* x, float* y, size_t d) {
  for (size_t i = 0; i < d; ++i) y[i] += a * Bf16ToFloat(x[i]);
}
void AxpyFp16(float a, const uint16_t* x, float* y, size_t d) {
  for (size_t i = 0; i < d; ++i) y[i] += a * Fp16ToFloat(x[i]);
}

float ExpShiftSum(const float* x, float shift, float* out, size_t n) {
  float sum = 0;
  for (size_t i = 0; i < n; ++i) {
    const float t = x[i] - shift;
    out[i] = t < -87.0f ? 0.0f : std::exp(t);
    sum += out[i];
  }
  return sum;
}

float Max(const float* x, size_t n) {
  float m = -std::numeric_limits<float>::infinity();
  for (size_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

void Fp32ToBf16(const float* in, uint16_t* out, size_t n) {
  for (size_t i = 0; i < n; ++i) out[i] = FloatToBf16(in[i]);
}
void Bf16ToFp32(const uint16_t* in, float* out, size_t n) {
  for (size_t i = 0; i < n; ++i) out[i] = Bf16ToFloat(in[i]);
}
void Fp32ToFp16(const float* in, uint16_t* out, size_t n) {
  for (size_t i = 0; i < n; ++i) out[i] = FloatToFp16(in[i]);
}
void Fp16ToFp32(const uint16_t* in, float* out, size_t n) {
  for (size_t i = 0; i < n; ++i) out[i] = Fp16ToFloat(in[i]);
}

// The oracle's matrix product: one DotBf16 / Dot per (token, row).
void MatMulBf16(const float* x, size_t n, size_t x_stride, const uint16_t* w, size_t m,
                size_t w_stride, size_t d, float* y, size_t y_stride) {
  for (size_t t = 0; t < n; ++t) {
    for (size_t o = 0; o < m; ++o) y[t * y_stride + o] = DotBf16(x + t * x_stride, w + o * w_stride, d);
  }
}
void MatMulF32(const float* x, size_t n, size_t x_stride, const float* w, size_t m,
               size_t w_stride, size_t d, float* y, size_t y_stride) {
  for (size_t t = 0; t < n; ++t) {
    for (size_t o = 0; o < m; ++o) y[t * y_stride + o] = Dot(x + t * x_stride, w + o * w_stride, d);
  }
}

constexpr Kernels kScalar = {
    .isa = Isa::kScalar,
    .name = "scalar",
    .dot = Dot,
    .l2sqr = L2Sqr,
    .dot_batch = DotBatch,
    .dot_gather = DotGather,
    .dot_bf16 = DotBf16,
    .dot_batch_bf16 = DotBatchBf16,
    .dot_gather_bf16 = DotGatherBf16,
    .axpy = Axpy,
    .axpy_bf16 = AxpyBf16,
    .axpy_fp16 = AxpyFp16,
    .exp_shift_sum = ExpShiftSum,
    .max = Max,
    .fp32_to_bf16 = Fp32ToBf16,
    .bf16_to_fp32 = Bf16ToFp32,
    .fp32_to_fp16 = Fp32ToFp16,
    .fp16_to_fp32 = Fp16ToFp32,
    .dot_batch_multi = DotBatchMulti,
    .matmul_bf16 = MatMulBf16,
    .matmul_f32 = MatMulF32,
};

}  // namespace

const Kernels& ScalarKernels() { return kScalar; }

}  // namespace kvr::simd
