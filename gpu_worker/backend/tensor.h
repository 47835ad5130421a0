// Tensor handles shared by every backend (CPU today, CUDA later).
//
// A Tensor is a cheap-to-copy handle to a dense row-major 2-D buffer
// [rows x cols] of one dtype, in the memory space of the backend that made it
// (host memory for "cpu", device memory for "cuda"). Vectors are [1 x n].
// Multi-head activations are [tokens x (heads * head_dim)]; ops that need the
// head split take the head counts as parameters. Copies of a handle share the
// storage; the storage lives as long as any handle (or Rows() view) does.
//
// Only backends dereference data(); engine code moves bytes in and out through
// Backend::Upload / Backend::Download. A handle is not synchronized: callers
// serialize use of one tensor the way they serialize use of its backend.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

#include "common/dtype.h"
#include "common/status.h"

namespace kvr::worker {

class Backend;

// A read-only view of a host buffer (e.g. weights in a memory-mapped file) that
// a backend can import; see Backend::ImportHost.
struct HostTensor {
  DType dtype = DType::kF32;
  int64_t rows = 0;
  int64_t cols = 0;
  const void* data = nullptr;

  size_t numel() const { return static_cast<size_t>(rows) * static_cast<size_t>(cols); }
  size_t bytes() const { return numel() * DTypeSize(dtype); }
  const float* f32() const { return static_cast<const float*>(data); }
};

class Tensor {
 public:
  Tensor() = default;

  // For backend implementations: a handle over `data` (an address in the
  // backend's memory space) kept alive by `storage`.
  Tensor(const Backend* owner, std::shared_ptr<void> storage, void* data, DType dtype, int64_t rows,
         int64_t cols)
      : owner_(owner),
        storage_(std::move(storage)),
        data_(data),
        dtype_(dtype),
        rows_(rows),
        cols_(cols) {
    KVR_CHECK(rows >= 0 && cols >= 0);
  }

  bool defined() const { return data_ != nullptr || (owner_ != nullptr && numel() == 0); }
  const Backend* owner() const { return owner_; }
  DType dtype() const { return dtype_; }
  int64_t rows() const { return rows_; }
  int64_t cols() const { return cols_; }
  size_t numel() const { return static_cast<size_t>(rows_) * static_cast<size_t>(cols_); }
  size_t bytes() const { return numel() * DTypeSize(dtype_); }

  // Rows [begin, begin + count) as a handle over the same storage.
  Tensor Rows(int64_t begin, int64_t count) const {
    KVR_CHECK(begin >= 0 && count >= 0 && begin + count <= rows_);
    return Tensor(owner_, storage_,
                  static_cast<std::byte*>(data_) +
                      static_cast<size_t>(begin) * static_cast<size_t>(cols_) * DTypeSize(dtype_),
                  dtype_, count, cols_);
  }

  // The address in the owning backend's memory space. Backends only.
  void* data() const { return data_; }
  template <typename T>
  T* data_as() const {
    return static_cast<T*>(data_);
  }

 private:
  const Backend* owner_ = nullptr;
  std::shared_ptr<void> storage_;
  void* data_ = nullptr;
  DType dtype_ = DType::kF32;
  int64_t rows_ = 0;
  int64_t cols_ = 0;
};

}  // namespace kvr::worker
