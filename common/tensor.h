// Non-owning row-major matrix views over contiguous float (or other) storage.
//
// A view never owns memory; the caller keeps the storage alive. Rows may be
// strided (stride >= cols) so a view can address a sub-block of a larger
// buffer, e.g. one head's slice of a [tokens, heads * dim] tensor.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "common/status.h"

namespace kvr {

template <typename T>
class MatrixViewT {
 public:
  MatrixViewT() = default;
  MatrixViewT(T* data, size_t rows, size_t cols, size_t stride)
      : data_(data), rows_(rows), cols_(cols), stride_(stride) {
    KVR_CHECK(stride >= cols || rows == 0);
  }
  MatrixViewT(T* data, size_t rows, size_t cols) : MatrixViewT(data, rows, cols, cols) {}
  // A view of a dense buffer; the buffer's size must be rows * cols.
  MatrixViewT(std::span<T> data, size_t rows, size_t cols)
      : MatrixViewT(data.data(), rows, cols, cols) {
    KVR_CHECK(data.size() == rows * cols);
  }
  // Converts a mutable view into a const one.
  template <typename U>
    requires(std::is_same_v<const U, T> && !std::is_same_v<U, T>)
  MatrixViewT(const MatrixViewT<U>& other)  // NOLINT(runtime/explicit)
      : data_(other.data()), rows_(other.rows()), cols_(other.cols()), stride_(other.stride()) {}

  T* data() const { return data_; }
  size_t rows() const { return rows_; }
  size_t cols() const { return cols_; }
  size_t stride() const { return stride_; }
  bool empty() const { return rows_ == 0; }

  T* row(size_t i) const { return data_ + i * stride_; }
  std::span<T> row_span(size_t i) const { return {row(i), cols_}; }
  T& at(size_t i, size_t j) const { return data_[i * stride_ + j]; }

  // Rows [begin, begin + count).
  MatrixViewT rows_slice(size_t begin, size_t count) const {
    KVR_CHECK(begin + count <= rows_);
    return MatrixViewT(data_ + begin * stride_, count, cols_, stride_);
  }
  // Columns [begin, begin + count) of every row.
  MatrixViewT cols_slice(size_t begin, size_t count) const {
    KVR_CHECK(begin + count <= cols_);
    return MatrixViewT(data_ + begin, rows_, count, stride_);
  }

 private:
  T* data_ = nullptr;
  size_t rows_ = 0;
  size_t cols_ = 0;
  size_t stride_ = 0;
};

using MatrixView = MatrixViewT<float>;
using ConstMatrixView = MatrixViewT<const float>;

// A dense owning row-major float matrix. Used for data sets, tests and tools,
// not on hot paths (which take views).
struct Matrix {
  size_t rows = 0;
  size_t cols = 0;
  std::vector<float> data;

  Matrix() = default;
  Matrix(size_t r, size_t c) : rows(r), cols(c), data(r * c) {}
  float* row(size_t i) { return data.data() + i * cols; }
  const float* row(size_t i) const { return data.data() + i * cols; }
  MatrixView view() { return MatrixView(data.data(), rows, cols); }
  ConstMatrixView view() const { return ConstMatrixView(data.data(), rows, cols); }
};

}  // namespace kvr
