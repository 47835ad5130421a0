// Scalar SQ8 kernels: the oracle every SIMD table must match bit for bit.
#include "common/simd/sq8_kernels.h"

namespace kvr::simd {
namespace {

int32_t DotI8Scalar(const uint8_t* a, const int8_t* b, size_t d) {
  int32_t s = 0;
  for (size_t j = 0; j < d; ++j) s += static_cast<int32_t>(a[j]) * static_cast<int32_t>(b[j]);
  return s;
}

void ScanSq8Scalar(const int8_t* q, const uint8_t* blocks, size_t nblocks, size_t dpad,
                   int32_t* out) {
  for (size_t b = 0; b < nblocks; ++b) {
    const uint8_t* block = blocks + b * Sq8BlockBytes(dpad);
    int32_t acc[kSq8Block] = {};
    for (size_t g = 0; g < dpad / 4; ++g) {
      const uint8_t* group = block + g * 64;
      for (size_t i = 0; i < kSq8Block; ++i) {
        for (size_t t = 0; t < 4; ++t) {
          acc[i] += static_cast<int32_t>(group[i * 4 + t]) * static_cast<int32_t>(q[g * 4 + t]);
        }
      }
    }
    for (size_t i = 0; i < kSq8Block; ++i) out[b * kSq8Block + i] = acc[i];
  }
}

void ScanSq8MultiScalar(const int8_t* q, size_t q_stride, size_t nq, const uint8_t* blocks,
                        size_t nblocks, size_t dpad, int32_t* out, size_t out_stride) {
  for (size_t t = 0; t < nq; ++t) {
    ScanSq8Scalar(q + t * q_stride, blocks, nblocks, dpad, out + t * out_stride);
  }
}

size_t SelectGeScalar(const int32_t* v, size_t n, int32_t t, uint32_t* idx) {
  return SelectGeFrom(v, 0, n, t, idx);
}

}  // namespace

size_t SelectGeFrom(const int32_t* v, size_t begin, size_t n, int32_t t, uint32_t* idx) {
  size_t m = 0;
  for (size_t i = begin; i < n; ++i) {
    if (v[i] >= t) idx[m++] = static_cast<uint32_t>(i);
  }
  return m;
}

const Sq8Kernels& ScalarSq8Kernels() {
  static const Sq8Kernels k{"scalar", &DotI8Scalar, &ScanSq8Scalar, &ScanSq8MultiScalar,
                            &SelectGeScalar};
  return k;
}

}  // namespace kvr::simd
