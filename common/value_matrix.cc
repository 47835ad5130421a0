#include "common/value_matrix.h"

#include <cstring>

#include "common/simd/kernels.h"

namespace kvr {

ValueMatrix::ValueMatrix(DType dtype, size_t cols) : dtype_(dtype), cols_(cols) {}

absl::StatusOr<ValueMatrix> ValueMatrix::FromRaw(DType dtype, size_t rows, size_t cols,
                                                 std::span<const uint8_t> bytes) {
  const size_t elem = DTypeSize(dtype);
  size_t need = 0;
  if (__builtin_mul_overflow(rows, cols, &need) || __builtin_mul_overflow(need, elem, &need) ||
      need != bytes.size()) {
    return absl::InvalidArgumentError(absl::StrCat("value matrix: ", rows, " x ", cols, " ",
                                                   std::string(DTypeName(dtype)), " does not match the ",
                                                   bytes.size(), " bytes given"));
  }
  if (cols == 0 && rows != 0) {
    return absl::InvalidArgumentError("value matrix: rows without columns");
  }
  ValueMatrix m(dtype, cols);
  m.rows_ = rows;
  if (dtype == DType::kF32) {
    m.f32_.resize(rows * cols);
    if (!bytes.empty()) std::memcpy(m.f32_.data(), bytes.data(), bytes.size());
  } else {
    m.half_.resize(rows * cols);
    if (!bytes.empty()) std::memcpy(m.half_.data(), bytes.data(), bytes.size());
  }
  return m;
}

ValueMatrix ValueMatrix::FromFloat(DType dtype, ConstMatrixView values) {
  ValueMatrix m(dtype, values.cols());
  KVR_CHECK(m.Append(values).ok());
  return m;
}

absl::Status ValueMatrix::Append(ConstMatrixView values) {
  if (values.rows() == 0) return absl::OkStatus();
  if (values.cols() != cols_) {
    return absl::InvalidArgumentError(
        absl::StrCat("values have ", values.cols(), " columns, matrix has ", cols_));
  }
  const auto& k = simd::Active();
  const size_t old = rows_ * cols_;
  const size_t n = values.rows();
  if (dtype_ == DType::kF32) {
    f32_.resize(old + n * cols_);
    for (size_t i = 0; i < n; ++i) {
      std::memcpy(f32_.data() + old + i * cols_, values.row(i), cols_ * sizeof(float));
    }
  } else {
    half_.resize(old + n * cols_);
    auto convert = dtype_ == DType::kBf16 ? k.fp32_to_bf16 : k.fp32_to_fp16;
    for (size_t i = 0; i < n; ++i) convert(values.row(i), half_.data() + old + i * cols_, cols_);
  }
  rows_ += n;
  return absl::OkStatus();
}

void ValueMatrix::Reserve(size_t rows) {
  if (dtype_ == DType::kF32) {
    f32_.reserve(rows * cols_);
  } else {
    half_.reserve(rows * cols_);
  }
}

void ValueMatrix::Clear() {
  rows_ = 0;
  f32_.clear();
  half_.clear();
}

void ValueMatrix::AccumulateRow(size_t i, float a, float* y) const {
  KVR_CHECK(i < rows_);
  const auto& k = simd::Active();
  switch (dtype_) {
    case DType::kF32:
      k.axpy(a, f32_.data() + i * cols_, y, cols_);
      return;
    case DType::kBf16:
      k.axpy_bf16(a, half_.data() + i * cols_, y, cols_);
      return;
    case DType::kF16:
      k.axpy_fp16(a, half_.data() + i * cols_, y, cols_);
      return;
  }
}

void ValueMatrix::RowToFloat(size_t i, float* out) const {
  KVR_CHECK(i < rows_);
  const auto& k = simd::Active();
  switch (dtype_) {
    case DType::kF32:
      std::memcpy(out, f32_.data() + i * cols_, cols_ * sizeof(float));
      return;
    case DType::kBf16:
      k.bf16_to_fp32(half_.data() + i * cols_, out, cols_);
      return;
    case DType::kF16:
      k.fp16_to_fp32(half_.data() + i * cols_, out, cols_);
      return;
  }
}

size_t ValueMatrix::MemoryBytes() const {
  return f32_.capacity() * sizeof(float) + half_.capacity() * sizeof(uint16_t);
}

std::span<const uint8_t> ValueMatrix::raw_bytes() const {
  if (dtype_ == DType::kF32) {
    return {reinterpret_cast<const uint8_t*>(f32_.data()), rows_ * cols_ * sizeof(float)};
  }
  return {reinterpret_cast<const uint8_t*>(half_.data()), rows_ * cols_ * sizeof(uint16_t)};
}

}  // namespace kvr
