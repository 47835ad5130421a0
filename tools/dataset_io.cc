#include "tools/dataset_io.h"

#include <sys/stat.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"
#include "common/status.h"

namespace kvr {
namespace {

static_assert(std::numeric_limits<float>::is_iec559, "float32 IO assumes IEEE-754");
static_assert(sizeof(float) == 4);

constexpr uint8_t kNpyMagic[6] = {0x93, 'N', 'U', 'M', 'P', 'Y'};
// A 2-D header is < 128 bytes; anything past this is not a matrix file.
constexpr size_t kMaxNpyHeaderBytes = 1 << 16;

bool HostIsLittleEndian() {
  const uint16_t probe = 1;
  uint8_t first;
  std::memcpy(&first, &probe, 1);
  return first == 1;
}

absl::string_view Extension(const std::string& path) {
  const size_t slash = path.find_last_of('/');
  const size_t dot = path.find_last_of('.');
  if (dot == std::string::npos || (slash != std::string::npos && dot < slash)) return {};
  return absl::string_view(path).substr(dot);
}

struct FileCloser {
  void operator()(FILE* f) const {
    if (f != nullptr) std::fclose(f);
  }
};
using File = std::unique_ptr<FILE, FileCloser>;

// An open file plus its size, for reading.
struct InputFile {
  File file;
  uint64_t size = 0;
};

absl::StatusOr<InputFile> OpenForRead(const std::string& path) {
  FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr) {
    const int err = errno;
    if (err == ENOENT) return absl::NotFoundError(absl::StrCat(path, ": no such file"));
    return absl::ErrnoToStatus(err, absl::StrCat(path, ": cannot open for reading"));
  }
  InputFile in;
  in.file.reset(f);
  struct stat st;
  if (fstat(fileno(f), &st) != 0) {
    return absl::ErrnoToStatus(errno, absl::StrCat(path, ": cannot stat"));
  }
  if (!S_ISREG(st.st_mode)) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a regular file"));
  }
  in.size = static_cast<uint64_t>(st.st_size);
  return in;
}

// Reads exactly `n` bytes or fails naming `what`.
absl::Status ReadExact(const InputFile& in, const std::string& path, void* dst, size_t n,
                       absl::string_view what) {
  if (n == 0) return absl::OkStatus();
  const size_t got = std::fread(dst, 1, n, in.file.get());
  if (got != n) {
    if (std::ferror(in.file.get())) {
      return absl::ErrnoToStatus(errno, absl::StrCat(path, ": read error in ", what));
    }
    return absl::DataLossError(
        absl::StrCat(path, ": truncated ", what, ": expected ", n, " bytes, got ", got));
  }
  return absl::OkStatus();
}

// Bytes of a rows x cols matrix of `elem`-byte elements; InvalidArgument on
// overflow.
absl::StatusOr<uint64_t> PayloadBytes(uint64_t rows, uint64_t cols, uint64_t elem,
                                      const std::string& path) {
  uint64_t count = 0, bytes = 0;
  if (__builtin_mul_overflow(rows, cols, &count) || __builtin_mul_overflow(count, elem, &bytes) ||
      count > std::numeric_limits<size_t>::max() / elem) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": shape ", rows, " x ", cols, " overflows the addressable size"));
  }
  return bytes;
}

// Checks that exactly `payload` bytes follow `offset` in the file.
absl::Status CheckPayloadSize(const InputFile& in, const std::string& path, uint64_t offset,
                              uint64_t payload, uint64_t rows, uint64_t cols) {
  const uint64_t available = in.size >= offset ? in.size - offset : 0;
  if (available < payload) {
    return absl::DataLossError(absl::StrCat(path, ": truncated data: header says ", rows, " x ",
                                            cols, " (", payload, " bytes), file has ", available,
                                            " bytes after the header"));
  }
  if (available > payload) {
    return absl::DataLossError(absl::StrCat(path, ": ", available - payload,
                                            " trailing bytes after ", rows, " x ", cols,
                                            " matrix data (", payload, " bytes)"));
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------
// .npy header parsing
// ---------------------------------------------------------------------------

class HeaderParser {
 public:
  HeaderParser(absl::string_view text, const std::string& path) : text_(text), path_(path) {}

  absl::StatusOr<NpyHeader> Parse() {
    NpyHeader header;
    bool have_descr = false, have_order = false, have_shape = false;
    SkipSpace();
    KVR_RETURN_IF_ERROR(Expect('{'));
    for (;;) {
      SkipSpace();
      if (Peek() == '}') {
        ++pos_;
        break;
      }
      KVR_ASSIGN_OR_RETURN(std::string key, ParseString());
      SkipSpace();
      KVR_RETURN_IF_ERROR(Expect(':'));
      SkipSpace();
      if (key == "descr") {
        if (have_descr) return Error("duplicate key 'descr'");
        KVR_ASSIGN_OR_RETURN(header.descr, ParseString());
        have_descr = true;
      } else if (key == "fortran_order") {
        if (have_order) return Error("duplicate key 'fortran_order'");
        KVR_ASSIGN_OR_RETURN(header.fortran_order, ParseBool());
        have_order = true;
      } else if (key == "shape") {
        if (have_shape) return Error("duplicate key 'shape'");
        KVR_ASSIGN_OR_RETURN(header.shape, ParseShape());
        have_shape = true;
      } else {
        return Error(absl::StrCat("unexpected key '", key, "'"));
      }
      SkipSpace();
      if (Peek() == ',') {
        ++pos_;
        continue;
      }
      SkipSpace();
      KVR_RETURN_IF_ERROR(Expect('}'));
      break;
    }
    // Padding: spaces, then at most one final newline.
    while (pos_ < text_.size() && text_[pos_] == ' ') ++pos_;
    if (pos_ < text_.size() && text_[pos_] == '\n') ++pos_;
    if (pos_ != text_.size()) return Error("unexpected characters after the header dictionary");
    if (!have_descr) return Error("missing key 'descr'");
    if (!have_order) return Error("missing key 'fortran_order'");
    if (!have_shape) return Error("missing key 'shape'");
    return header;
  }

 private:
  char Peek() const { return pos_ < text_.size() ? text_[pos_] : '\0'; }
  void SkipSpace() {
    while (pos_ < text_.size() && (text_[pos_] == ' ' || text_[pos_] == '\t')) ++pos_;
  }
  absl::Status Error(absl::string_view what) const {
    return absl::InvalidArgumentError(
        absl::StrCat(path_, ": malformed .npy header at byte ", pos_, ": ", what));
  }
  absl::Status Expect(char c) {
    if (Peek() != c) return Error(absl::StrCat("expected '", std::string(1, c), "'"));
    ++pos_;
    return absl::OkStatus();
  }
  absl::StatusOr<std::string> ParseString() {
    const char quote = Peek();
    if (quote != '\'' && quote != '"') return Error("expected a quoted string");
    ++pos_;
    std::string out;
    while (pos_ < text_.size() && text_[pos_] != quote) {
      const char c = text_[pos_];
      if (c == '\\' || c == '\n' || static_cast<unsigned char>(c) < 0x20 ||
          static_cast<unsigned char>(c) >= 0x7f) {
        return Error("unsupported character in string");
      }
      out.push_back(c);
      ++pos_;
    }
    if (pos_ >= text_.size()) return Error("unterminated string");
    ++pos_;
    return out;
  }
  absl::StatusOr<bool> ParseBool() {
    if (text_.substr(pos_, 4) == "True") {
      pos_ += 4;
      return true;
    }
    if (text_.substr(pos_, 5) == "False") {
      pos_ += 5;
      return false;
    }
    return Error("expected True or False");
  }
  absl::StatusOr<uint64_t> ParseUint() {
    if (Peek() < '0' || Peek() > '9') return Error("expected a non-negative integer");
    uint64_t v = 0;
    while (Peek() >= '0' && Peek() <= '9') {
      const uint64_t digit = static_cast<uint64_t>(Peek() - '0');
      if (__builtin_mul_overflow(v, uint64_t{10}, &v) || __builtin_add_overflow(v, digit, &v)) {
        return Error("dimension does not fit in 64 bits");
      }
      ++pos_;
    }
    // Python 2 era writers append L to longs.
    if (Peek() == 'L') ++pos_;
    return v;
  }
  // A Python tuple of ints: (), (n,), (n, d), (n, d, ...), optional trailing comma.
  absl::StatusOr<std::vector<uint64_t>> ParseShape() {
    std::vector<uint64_t> shape;
    KVR_RETURN_IF_ERROR(Expect('('));
    SkipSpace();
    if (Peek() == ')') {
      ++pos_;
      return shape;
    }
    for (;;) {
      SkipSpace();
      KVR_ASSIGN_OR_RETURN(uint64_t dim, ParseUint());
      shape.push_back(dim);
      SkipSpace();
      if (Peek() == ',') {
        ++pos_;
        SkipSpace();
        if (Peek() == ')') {
          ++pos_;
          return shape;
        }
        continue;
      }
      if (Peek() == ')') {
        if (shape.size() == 1) return Error("a 1-tuple needs a trailing comma");
        ++pos_;
        return shape;
      }
      return Error("expected ',' or ')' in shape");
    }
  }

  absl::string_view text_;
  const std::string& path_;
  size_t pos_ = 0;
};

// Reads and parses the header of an open .npy file; leaves the file position
// at the start of the data.
absl::StatusOr<NpyHeader> ReadNpyHeader(const InputFile& in, const std::string& path) {
  uint8_t preamble[12];
  if (in.size < 10) {
    return absl::DataLossError(
        absl::StrCat(path, ": truncated .npy preamble (", in.size, " bytes, need >= 10)"));
  }
  KVR_RETURN_IF_ERROR(ReadExact(in, path, preamble, 10, ".npy preamble"));
  if (std::memcmp(preamble, kNpyMagic, sizeof(kNpyMagic)) != 0) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a .npy file (bad magic)"));
  }
  const uint8_t major = preamble[6];
  size_t preamble_size = 10;
  if (major == 2 || major == 3) {
    KVR_RETURN_IF_ERROR(ReadExact(in, path, preamble + 10, 2, ".npy preamble"));
    preamble_size = 12;
  } else if (major != 1) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": unsupported .npy version ",
                                                   int{major}, ".", int{preamble[7]}));
  }
  if (preamble[7] != 0) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": unsupported .npy version ",
                                                   int{major}, ".", int{preamble[7]}));
  }
  const uint64_t header_len =
      preamble_size == 10
          ? uint64_t{preamble[8]} | uint64_t{preamble[9]} << 8
          : uint64_t{preamble[8]} | uint64_t{preamble[9]} << 8 | uint64_t{preamble[10]} << 16 |
                uint64_t{preamble[11]} << 24;
  if (header_len > kMaxNpyHeaderBytes) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": .npy header length ", header_len,
                                                   " exceeds the limit ", kMaxNpyHeaderBytes));
  }
  if (in.size < preamble_size + header_len) {
    return absl::DataLossError(absl::StrCat(path, ": truncated .npy header: needs ", header_len,
                                            " bytes, file has ", in.size - preamble_size));
  }
  std::vector<uint8_t> bytes(preamble_size + header_len);
  std::memcpy(bytes.data(), preamble, preamble_size);
  KVR_RETURN_IF_ERROR(
      ReadExact(in, path, bytes.data() + preamble_size, header_len, ".npy header"));
  return ParseNpyHeader(bytes, path);
}

// Validates a parsed header as a 2-D C-order matrix of `descr` elements.
absl::Status CheckMatrixHeader(const NpyHeader& h, const std::string& path) {
  if (h.fortran_order) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": fortran_order True is not supported (write C order)"));
  }
  if (h.shape.size() != 2) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": expected a 2-D array, got ",
                                                   h.shape.size(), " dims (",
                                                   absl::StrJoin(h.shape, ", "), ")"));
  }
  if (h.shape[1] == 0) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": matrix has 0 columns"));
  }
  return absl::OkStatus();
}

// The .npy preamble + padded header for a C-order rows x cols `descr` array.
std::string NpyPreamble(absl::string_view descr, uint64_t rows, uint64_t cols) {
  std::string dict = absl::StrCat("{'descr': '", descr, "', 'fortran_order': False, 'shape': (",
                                  rows, ", ", cols, "), }");
  // v1.0: magic(6) + version(2) + u16 len; total padded to a multiple of 64
  // and ended by '\n' (what NumPy writes).
  size_t prefix = 10;
  size_t total = prefix + dict.size() + 1;
  size_t padded = (total + 63) / 64 * 64;
  bool v2 = padded - prefix > 0xffff;
  if (v2) {
    prefix = 12;
    total = prefix + dict.size() + 1;
    padded = (total + 63) / 64 * 64;
  }
  const size_t header_len = padded - prefix;
  std::string out(reinterpret_cast<const char*>(kNpyMagic), sizeof(kNpyMagic));
  out.push_back(static_cast<char>(v2 ? 2 : 1));
  out.push_back(0);
  for (size_t i = 0; i < (v2 ? 4u : 2u); ++i) {
    out.push_back(static_cast<char>((header_len >> (8 * i)) & 0xff));
  }
  out += dict;
  out.append(padded - prefix - dict.size() - 1, ' ');
  out.push_back('\n');
  return out;
}

// ---------------------------------------------------------------------------
// Writing
// ---------------------------------------------------------------------------

// Writes through a temporary file renamed into place on success.
class OutputFile {
 public:
  explicit OutputFile(const std::string& path) : path_(path), tmp_(path + ".tmp") {}
  ~OutputFile() {
    if (file_ != nullptr) {
      std::fclose(file_);
      std::remove(tmp_.c_str());
    }
  }

  absl::Status Open() {
    file_ = std::fopen(tmp_.c_str(), "wb");
    if (file_ == nullptr) {
      return absl::ErrnoToStatus(errno, absl::StrCat(path_, ": cannot open ", tmp_,
                                                     " for writing"));
    }
    return absl::OkStatus();
  }
  absl::Status Write(const void* data, size_t n) {
    if (n != 0 && std::fwrite(data, 1, n, file_) != n) {
      return absl::ErrnoToStatus(errno, absl::StrCat(path_, ": write failed"));
    }
    return absl::OkStatus();
  }
  absl::Status Commit() {
    FILE* f = file_;
    file_ = nullptr;
    if (std::fclose(f) != 0) {
      const int err = errno;
      std::remove(tmp_.c_str());
      return absl::ErrnoToStatus(err, absl::StrCat(path_, ": write failed on close"));
    }
    if (std::rename(tmp_.c_str(), path_.c_str()) != 0) {
      const int err = errno;
      std::remove(tmp_.c_str());
      return absl::ErrnoToStatus(err, absl::StrCat(path_, ": cannot rename ", tmp_));
    }
    return absl::OkStatus();
  }

 private:
  std::string path_;
  std::string tmp_;
  FILE* file_ = nullptr;
};

absl::Status CheckWritable(const std::string& path, uint64_t rows, uint64_t cols, bool u32_dims) {
  if (!HostIsLittleEndian()) {
    return absl::UnimplementedError(absl::StrCat(path, ": big-endian hosts are not supported"));
  }
  if (cols == 0) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": cannot write a matrix with 0 columns"));
  }
  if (u32_dims && (rows > std::numeric_limits<uint32_t>::max() ||
                   cols > std::numeric_limits<uint32_t>::max())) {
    return absl::InvalidArgumentError(absl::StrCat(
        path, ": shape ", rows, " x ", cols, " does not fit the format's 32-bit dims"));
  }
  return absl::OkStatus();
}

template <typename T>
absl::Status WriteRows(OutputFile& out, const T* data, size_t rows, size_t cols, size_t stride) {
  if (stride == cols) return out.Write(data, rows * cols * sizeof(T));
  for (size_t i = 0; i < rows; ++i) {
    KVR_RETURN_IF_ERROR(out.Write(data + i * stride, cols * sizeof(T)));
  }
  return absl::OkStatus();
}

// [rows u32][cols u32][payload]
template <typename T>
absl::Status WriteBin(const std::string& path, const T* data, size_t rows, size_t cols,
                      size_t stride) {
  KVR_RETURN_IF_ERROR(CheckWritable(path, rows, cols, /*u32_dims=*/true));
  OutputFile out(path);
  KVR_RETURN_IF_ERROR(out.Open());
  const uint32_t dims[2] = {static_cast<uint32_t>(rows), static_cast<uint32_t>(cols)};
  KVR_RETURN_IF_ERROR(out.Write(dims, sizeof(dims)));
  KVR_RETURN_IF_ERROR(WriteRows(out, data, rows, cols, stride));
  return out.Commit();
}

template <typename T>
absl::Status WriteNpy(const std::string& path, absl::string_view descr, const T* data,
                      size_t rows, size_t cols, size_t stride) {
  KVR_RETURN_IF_ERROR(CheckWritable(path, rows, cols, /*u32_dims=*/false));
  OutputFile out(path);
  KVR_RETURN_IF_ERROR(out.Open());
  const std::string preamble = NpyPreamble(descr, rows, cols);
  KVR_RETURN_IF_ERROR(out.Write(preamble.data(), preamble.size()));
  KVR_RETURN_IF_ERROR(WriteRows(out, data, rows, cols, stride));
  return out.Commit();
}

// Reads [rows u32][cols u32] and checks the payload size for `elem` bytes.
absl::StatusOr<std::pair<uint64_t, uint64_t>> ReadBinHeader(const InputFile& in,
                                                            const std::string& path,
                                                            uint64_t elem) {
  if (!HostIsLittleEndian()) {
    return absl::UnimplementedError(absl::StrCat(path, ": big-endian hosts are not supported"));
  }
  if (in.size < 8) {
    return absl::DataLossError(
        absl::StrCat(path, ": truncated header (", in.size, " bytes, need 8)"));
  }
  uint32_t dims[2];
  KVR_RETURN_IF_ERROR(ReadExact(in, path, dims, sizeof(dims), "header"));
  if (dims[1] == 0) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": matrix has 0 columns"));
  }
  KVR_ASSIGN_OR_RETURN(const uint64_t payload, PayloadBytes(dims[0], dims[1], elem, path));
  KVR_RETURN_IF_ERROR(CheckPayloadSize(in, path, 8, payload, dims[0], dims[1]));
  return std::pair<uint64_t, uint64_t>{dims[0], dims[1]};
}

}  // namespace

absl::StatusOr<NpyHeader> ParseNpyHeader(std::span<const uint8_t> bytes, const std::string& path) {
  if (bytes.size() < 10) {
    return absl::DataLossError(absl::StrCat(path, ": truncated .npy preamble"));
  }
  if (std::memcmp(bytes.data(), kNpyMagic, sizeof(kNpyMagic)) != 0) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a .npy file (bad magic)"));
  }
  const uint8_t major = bytes[6], minor = bytes[7];
  if ((major != 1 && major != 2 && major != 3) || minor != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": unsupported .npy version ", int{major}, ".", int{minor}));
  }
  const size_t prefix = major == 1 ? 10 : 12;
  if (bytes.size() < prefix) {
    return absl::DataLossError(absl::StrCat(path, ": truncated .npy preamble"));
  }
  uint64_t header_len = 0;
  for (size_t i = 8; i < prefix; ++i) header_len |= uint64_t{bytes[i]} << (8 * (i - 8));
  if (header_len > kMaxNpyHeaderBytes) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": .npy header length ", header_len,
                                                   " exceeds the limit ", kMaxNpyHeaderBytes));
  }
  if (bytes.size() < prefix + header_len) {
    return absl::DataLossError(absl::StrCat(path, ": truncated .npy header: needs ", header_len,
                                            " bytes, have ", bytes.size() - prefix));
  }
  const absl::string_view text(reinterpret_cast<const char*>(bytes.data()) + prefix, header_len);
  HeaderParser parser(text, path);
  KVR_ASSIGN_OR_RETURN(NpyHeader header, parser.Parse());
  header.data_offset = prefix + header_len;
  return header;
}

absl::StatusOr<Matrix> ReadNpyMatrix(const std::string& path) {
  if (!HostIsLittleEndian()) {
    return absl::UnimplementedError(absl::StrCat(path, ": big-endian hosts are not supported"));
  }
  KVR_ASSIGN_OR_RETURN(InputFile in, OpenForRead(path));
  KVR_ASSIGN_OR_RETURN(NpyHeader header, ReadNpyHeader(in, path));
  if (header.descr != "<f4") {
    return absl::InvalidArgumentError(absl::StrCat(path, ": dtype '", header.descr,
                                                   "' is not supported, expected '<f4'"));
  }
  KVR_RETURN_IF_ERROR(CheckMatrixHeader(header, path));
  const uint64_t rows = header.shape[0], cols = header.shape[1];
  KVR_ASSIGN_OR_RETURN(const uint64_t payload, PayloadBytes(rows, cols, 4, path));
  KVR_RETURN_IF_ERROR(CheckPayloadSize(in, path, header.data_offset, payload, rows, cols));
  Matrix m(rows, cols);
  KVR_RETURN_IF_ERROR(ReadExact(in, path, m.data.data(), payload, "data"));
  return m;
}

absl::StatusOr<Matrix> ReadFbinMatrix(const std::string& path) {
  KVR_ASSIGN_OR_RETURN(InputFile in, OpenForRead(path));
  KVR_ASSIGN_OR_RETURN(auto dims, ReadBinHeader(in, path, 4));
  Matrix m(dims.first, dims.second);
  KVR_RETURN_IF_ERROR(ReadExact(in, path, m.data.data(), m.data.size() * 4, "data"));
  return m;
}

absl::Status WriteNpyMatrix(const std::string& path, ConstMatrixView m) {
  return WriteNpy(path, "<f4", m.data(), m.rows(), m.cols(), m.stride());
}

absl::Status WriteFbinMatrix(const std::string& path, ConstMatrixView m) {
  return WriteBin(path, m.data(), m.rows(), m.cols(), m.stride());
}

absl::StatusOr<Matrix> ReadMatrixFile(const std::string& path) {
  const absl::string_view ext = Extension(path);
  if (ext == ".npy") return ReadNpyMatrix(path);
  if (ext == ".fbin") return ReadFbinMatrix(path);
  return absl::InvalidArgumentError(absl::StrCat(
      path, ": unsupported extension '", ext, "' for a float matrix (use .npy or .fbin)"));
}

absl::Status WriteMatrixFile(const std::string& path, ConstMatrixView m) {
  const absl::string_view ext = Extension(path);
  if (ext == ".npy") return WriteNpyMatrix(path, m);
  if (ext == ".fbin") return WriteFbinMatrix(path, m);
  return absl::InvalidArgumentError(absl::StrCat(
      path, ": unsupported extension '", ext, "' for a float matrix (use .npy or .fbin)"));
}

absl::StatusOr<IdMatrix> ReadIdMatrixFile(const std::string& path) {
  const absl::string_view ext = Extension(path);
  if (ext == ".ibin") {
    KVR_ASSIGN_OR_RETURN(InputFile in, OpenForRead(path));
    KVR_ASSIGN_OR_RETURN(auto dims, ReadBinHeader(in, path, 4));
    IdMatrix m(dims.first, dims.second);
    KVR_RETURN_IF_ERROR(ReadExact(in, path, m.data.data(), m.data.size() * 4, "data"));
    return m;
  }
  if (ext != ".npy") {
    return absl::InvalidArgumentError(absl::StrCat(
        path, ": unsupported extension '", ext, "' for an id matrix (use .npy or .ibin)"));
  }
  if (!HostIsLittleEndian()) {
    return absl::UnimplementedError(absl::StrCat(path, ": big-endian hosts are not supported"));
  }
  KVR_ASSIGN_OR_RETURN(InputFile in, OpenForRead(path));
  KVR_ASSIGN_OR_RETURN(NpyHeader header, ReadNpyHeader(in, path));
  if (header.descr != "<i4" && header.descr != "<i8") {
    return absl::InvalidArgumentError(absl::StrCat(
        path, ": dtype '", header.descr, "' is not supported for ids, expected '<i4' or '<i8'"));
  }
  KVR_RETURN_IF_ERROR(CheckMatrixHeader(header, path));
  const uint64_t rows = header.shape[0], cols = header.shape[1];
  const uint64_t elem = header.descr == "<i4" ? 4 : 8;
  KVR_ASSIGN_OR_RETURN(const uint64_t payload, PayloadBytes(rows, cols, elem, path));
  KVR_RETURN_IF_ERROR(CheckPayloadSize(in, path, header.data_offset, payload, rows, cols));
  IdMatrix m(rows, cols);
  if (elem == 4) {
    KVR_RETURN_IF_ERROR(ReadExact(in, path, m.data.data(), payload, "data"));
    return m;
  }
  std::vector<int64_t> wide(rows * cols);
  KVR_RETURN_IF_ERROR(ReadExact(in, path, wide.data(), payload, "data"));
  for (size_t i = 0; i < wide.size(); ++i) {
    if (wide[i] < std::numeric_limits<int32_t>::min() ||
        wide[i] > std::numeric_limits<int32_t>::max()) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": id ", wide[i], " at element ", i,
                                                     " does not fit in int32"));
    }
    m.data[i] = static_cast<int32_t>(wide[i]);
  }
  return m;
}

absl::Status WriteIdMatrixFile(const std::string& path, const IdMatrix& m) {
  KVR_CHECK(m.data.size() == m.rows * m.cols);
  const absl::string_view ext = Extension(path);
  if (ext == ".ibin") return WriteBin(path, m.data.data(), m.rows, m.cols, m.cols);
  if (ext == ".npy") return WriteNpy(path, "<i4", m.data.data(), m.rows, m.cols, m.cols);
  return absl::InvalidArgumentError(absl::StrCat(
      path, ": unsupported extension '", ext, "' for an id matrix (use .npy or .ibin)"));
}

}  // namespace kvr
