// Versioned, checksummed binary blobs for index and shard persistence.
//
// A blob is: magic "KVRB" (4 bytes) | format version u32 | kind tag u32 |
// payload length u64 | payload crc32c u32 | payload. Readers check every
// field and every length against the bytes that remain, so a truncated or
// corrupted blob is a DataLoss/InvalidArgument status, never a crash or an
// over-read. All integers are little-endian (the only byte order kvr runs on).
#pragma once

#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include "absl/strings/string_view.h"
#include <type_traits>
#include <vector>

#include "common/status.h"

namespace kvr {

// CRC-32C (Castagnoli) of `data`, continuing from `crc` (0 to start).
uint32_t Crc32c(std::span<const uint8_t> data, uint32_t crc = 0);

// Appends little-endian PODs and arrays to a byte buffer.
class BinaryWriter {
 public:
  template <typename T>
    requires std::is_trivially_copyable_v<T>
  void Put(const T& v) {
    const auto* p = reinterpret_cast<const uint8_t*>(&v);
    buf_.insert(buf_.end(), p, p + sizeof(T));
  }
  // Writes the element count (u64) then the elements.
  template <typename T>
    requires std::is_trivially_copyable_v<T>
  void PutArray(std::span<const T> v) {
    Put<uint64_t>(v.size());
    const auto* p = reinterpret_cast<const uint8_t*>(v.data());
    buf_.insert(buf_.end(), p, p + v.size_bytes());
  }
  void PutString(absl::string_view s) {
    PutArray(std::span<const char>(s.data(), s.size()));
  }
  const std::vector<uint8_t>& bytes() const { return buf_; }
  std::vector<uint8_t>& mutable_bytes() { return buf_; }
  size_t size() const { return buf_.size(); }

 private:
  std::vector<uint8_t> buf_;
};

// Reads what BinaryWriter wrote, bounds-checked. `what` names the object in
// error messages ("attention graph index").
class BinaryReader {
 public:
  BinaryReader(std::span<const uint8_t> data, absl::string_view what)
      : data_(data), what_(what) {}

  template <typename T>
    requires std::is_trivially_copyable_v<T>
  absl::Status Get(T* v, absl::string_view field) {
    if (remaining() < sizeof(T)) return Truncated(field, sizeof(T));
    std::memcpy(v, data_.data() + pos_, sizeof(T));
    pos_ += sizeof(T);
    return absl::OkStatus();
  }
  // Reads an array written by PutArray; fails if its count exceeds
  // `max_count` or the bytes that remain.
  template <typename T>
    requires std::is_trivially_copyable_v<T>
  absl::Status GetArray(std::vector<T>* v, absl::string_view field, uint64_t max_count) {
    uint64_t n = 0;
    KVR_RETURN_IF_ERROR(Get(&n, field));
    if (n > max_count) {
      return absl::DataLossError(absl::StrCat(what_, ": field '", std::string(field), "' has ", n,
                                              " elements, limit ", max_count));
    }
    if (n > remaining() / sizeof(T)) return Truncated(field, n * sizeof(T));
    v->resize(n);
    if (n > 0) std::memcpy(v->data(), data_.data() + pos_, n * sizeof(T));
    pos_ += n * sizeof(T);
    return absl::OkStatus();
  }
  absl::Status GetString(std::string* s, absl::string_view field, uint64_t max_len) {
    std::vector<char> tmp;
    KVR_RETURN_IF_ERROR(GetArray(&tmp, field, max_len));
    s->assign(tmp.begin(), tmp.end());
    return absl::OkStatus();
  }
  size_t remaining() const { return data_.size() - pos_; }
  // OK when every byte was consumed; DataLoss naming the trailing bytes otherwise.
  absl::Status ExpectEnd() const;

 private:
  absl::Status Truncated(absl::string_view field, uint64_t need) const;

  std::span<const uint8_t> data_;
  size_t pos_ = 0;
  std::string what_;
};

// Wraps `payload` in the checksummed envelope described above.
std::vector<uint8_t> SealBlob(uint32_t kind, uint32_t version, std::span<const uint8_t> payload);

struct OpenedBlob {
  uint32_t kind = 0;
  uint32_t version = 0;
  std::span<const uint8_t> payload;  // points into the input
};
// Checks the envelope (magic, lengths, checksum) and returns its payload.
absl::StatusOr<OpenedBlob> OpenBlob(std::span<const uint8_t> blob);
// InvalidArgument unless `blob` is of `kind` ("blob kind K is not a NAME")
// with a version in [min_version, max_version] ("NAME: unsupported format
// version V (this build reads MAX)"); `name` names the format, e.g.
// "flat index".
absl::Status CheckBlobKind(const OpenedBlob& blob, uint32_t kind, uint32_t min_version,
                           uint32_t max_version, absl::string_view name);

}  // namespace kvr
