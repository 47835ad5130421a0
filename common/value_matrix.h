// ValueMatrix: an owning row-major matrix of attention values stored as fp32,
// bf16 or fp16, with the two operations partial attention needs (y += a * row,
// row -> fp32) dispatched to the SIMD kernels.
//
// Not thread-safe for writes; const methods may be called concurrently.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "common/dtype.h"
#include "common/status.h"
#include "common/tensor.h"

namespace kvr {

class ValueMatrix {
 public:
  // An empty matrix with `cols` columns (cols may be 0 only for a placeholder).
  ValueMatrix(DType dtype, size_t cols);
  ValueMatrix() : ValueMatrix(DType::kF32, 0) {}

  // Builds from raw little-endian element storage (rows * cols elements of
  // `dtype`, row-major, as raw_bytes() returns it). InvalidArgument when the
  // byte count does not match rows * cols * DTypeSize(dtype).
  static absl::StatusOr<ValueMatrix> FromRaw(DType dtype, size_t rows, size_t cols,
                                             std::span<const uint8_t> bytes);
  // Convenience: converts `values` (fp32) into a new matrix of `dtype`.
  static ValueMatrix FromFloat(DType dtype, ConstMatrixView values);

  DType dtype() const { return dtype_; }
  size_t rows() const { return rows_; }
  size_t cols() const { return cols_; }
  bool empty() const { return rows_ == 0; }

  // Appends rows converted from fp32 (round to nearest even for bf16/fp16).
  // InvalidArgument when values.cols() != cols().
  absl::Status Append(ConstMatrixView values);
  void Reserve(size_t rows);
  void Clear();

  // y[0..cols) += a * row(i). i < rows() (checked).
  void AccumulateRow(size_t i, float a, float* y) const;
  // out[0..cols) = row(i) as fp32. i < rows() (checked).
  void RowToFloat(size_t i, float* out) const;

  // Bytes held (capacity of the element storage).
  size_t MemoryBytes() const;
  // The element storage: rows() * cols() * DTypeSize(dtype()) bytes, row-major.
  std::span<const uint8_t> raw_bytes() const;
  // Typed access to the storage (the pointer matching dtype(); others null).
  const float* f32_data() const { return dtype_ == DType::kF32 ? f32_.data() : nullptr; }
  const uint16_t* half_data() const { return dtype_ == DType::kF32 ? nullptr : half_.data(); }

 private:
  DType dtype_;
  size_t cols_;
  size_t rows_ = 0;
  std::vector<float> f32_;      // kF32
  std::vector<uint16_t> half_;  // kBf16 / kF16 bit patterns
};

}  // namespace kvr
