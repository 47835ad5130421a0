// Reading and writing 2-D data-set matrices: float32 vectors (keys, queries,
// values) and int32 ids (ground-truth top-k lists).
//
// Formats, chosen by file extension:
//   .npy   NumPy format v1.0 / v2.0 / v3.0, C order only, exactly 2 dims.
//          float matrices: dtype '<f4'. id matrices: '<i4' (or '<i8' on read,
//          narrowed with a range check). Written as v1.0 (v2.0 when the header
//          needs more than 65535 bytes, which never happens for 2 dims).
//   .fbin  [rows u32 LE][cols u32 LE][rows*cols float32 LE]   (big-ann format)
//   .ibin  [rows u32 LE][cols u32 LE][rows*cols int32 LE]     (ids only)
//
// Every malformed file gives an error status that names the path and the
// problem, never a crash: NotFound (cannot open), InvalidArgument (unsupported
// extension / dtype / fortran order / number of dims / zero columns, malformed
// header, n*d overflow), DataLoss (truncated header or data, trailing bytes).
// Writes go to `path + ".tmp"` first and are renamed into place, so a reader
// never sees a half-written file under `path`.
//
// All functions are thread-safe (no shared state); they do plain buffered
// reads into the returned matrix (no mmap), so a file is read exactly once.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/tensor.h"

namespace kvr {

// A dense owning row-major int32 matrix, e.g. the ids of each query's exact
// top-k keys (row i = query i, sorted best first).
struct IdMatrix {
  size_t rows = 0;
  size_t cols = 0;
  std::vector<int32_t> data;

  IdMatrix() = default;
  IdMatrix(size_t r, size_t c) : rows(r), cols(c), data(r * c) {}
  int32_t* row(size_t i) { return data.data() + i * cols; }
  const int32_t* row(size_t i) const { return data.data() + i * cols; }
};

// float32 matrices; the format comes from the extension (.npy or .fbin).
absl::StatusOr<Matrix> ReadMatrixFile(const std::string& path);
// Writes rows() x cols() of `m` (a strided view is written densely).
// cols must be > 0; .fbin also needs rows, cols < 2^32.
absl::Status WriteMatrixFile(const std::string& path, ConstMatrixView m);

// Format-specific entry points (ignore the extension).
absl::StatusOr<Matrix> ReadNpyMatrix(const std::string& path);
absl::StatusOr<Matrix> ReadFbinMatrix(const std::string& path);
absl::Status WriteNpyMatrix(const std::string& path, ConstMatrixView m);
absl::Status WriteFbinMatrix(const std::string& path, ConstMatrixView m);

// int32 id matrices; the format comes from the extension (.npy or .ibin).
absl::StatusOr<IdMatrix> ReadIdMatrixFile(const std::string& path);
absl::Status WriteIdMatrixFile(const std::string& path, const IdMatrix& m);

// The shape of a parsed .npy header (exposed for tests and tools).
struct NpyHeader {
  std::string descr;           // e.g. "<f4"
  bool fortran_order = false;
  std::vector<uint64_t> shape;  // any number of dims
  size_t data_offset = 0;       // byte offset of the array data in the file
};

// Parses the preamble + header dictionary at the start of `bytes` (the first
// bytes of a file named `path`, used only in messages). Strict: the dict must
// have exactly the keys 'descr', 'fortran_order', 'shape' with a string, a
// boolean and a tuple of non-negative integers; only spaces may pad it, and
// nothing but a final newline may follow.
absl::StatusOr<NpyHeader> ParseNpyHeader(std::span<const uint8_t> bytes, const std::string& path);

}  // namespace kvr
