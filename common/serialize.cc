#include "common/serialize.h"

#include <array>

#include "absl/strings/str_format.h"

namespace kvr {
namespace {

constexpr uint8_t kMagic[4] = {'K', 'V', 'R', 'B'};
// magic + version + kind + payload length + crc.
constexpr size_t kHeaderBytes = 4 + 4 + 4 + 8 + 4;

// Slicing-by-8 tables for the reflected Castagnoli polynomial.
struct Crc32cTables {
  std::array<std::array<uint32_t, 256>, 8> t{};
  constexpr Crc32cTables() {
    constexpr uint32_t kPoly = 0x82f63b78u;
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int j = 0; j < 8; ++j) c = (c & 1u) ? (c >> 1) ^ kPoly : c >> 1;
      t[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; ++i) {
      for (size_t s = 1; s < 8; ++s) t[s][i] = (t[s - 1][i] >> 8) ^ t[0][t[s - 1][i] & 0xffu];
    }
  }
};
constexpr Crc32cTables kCrc;

}  // namespace

uint32_t Crc32c(std::span<const uint8_t> data, uint32_t crc) {
  uint32_t c = ~crc;
  const uint8_t* p = data.data();
  size_t n = data.size();
  const auto& t = kCrc.t;
  while (n >= 8) {
    uint32_t lo, hi;
    std::memcpy(&lo, p, 4);
    std::memcpy(&hi, p + 4, 4);
    lo ^= c;
    c = t[7][lo & 0xff] ^ t[6][(lo >> 8) & 0xff] ^ t[5][(lo >> 16) & 0xff] ^ t[4][lo >> 24] ^
        t[3][hi & 0xff] ^ t[2][(hi >> 8) & 0xff] ^ t[1][(hi >> 16) & 0xff] ^ t[0][hi >> 24];
    p += 8;
    n -= 8;
  }
  while (n-- > 0) c = (c >> 8) ^ t[0][(c ^ *p++) & 0xffu];
  return ~c;
}

absl::Status BinaryReader::ExpectEnd() const {
  if (remaining() == 0) return absl::OkStatus();
  return absl::DataLossError(absl::StrCat(what_, ": ", remaining(),
                                          " unexpected trailing bytes after byte ", pos_, " of ",
                                          data_.size()));
}

absl::Status BinaryReader::Truncated(absl::string_view field, uint64_t need) const {
  return absl::DataLossError(absl::StrCat(what_, ": truncated at field '", std::string(field), "': need ",
                                          need, " bytes at offset ", pos_, ", ", remaining(),
                                          " remain"));
}

std::vector<uint8_t> SealBlob(uint32_t kind, uint32_t version, std::span<const uint8_t> payload) {
  BinaryWriter w;
  for (uint8_t b : kMagic) w.Put(b);
  w.Put<uint32_t>(version);
  w.Put<uint32_t>(kind);
  w.Put<uint64_t>(payload.size());
  w.Put<uint32_t>(Crc32c(payload));
  std::vector<uint8_t> out = std::move(w.mutable_bytes());
  out.insert(out.end(), payload.begin(), payload.end());
  return out;
}

absl::StatusOr<OpenedBlob> OpenBlob(std::span<const uint8_t> blob) {
  if (blob.size() < kHeaderBytes) {
    return absl::DataLossError(absl::StrCat("blob: ", blob.size(),
                                            " bytes is shorter than the ", kHeaderBytes,
                                            "-byte header"));
  }
  if (std::memcmp(blob.data(), kMagic, 4) != 0) {
    return absl::DataLossError("blob: bad magic (expected \"KVRB\")");
  }
  BinaryReader r(blob.subspan(4), "blob header");
  OpenedBlob out;
  uint64_t length = 0;
  uint32_t crc = 0;
  KVR_RETURN_IF_ERROR(r.Get(&out.version, "version"));
  KVR_RETURN_IF_ERROR(r.Get(&out.kind, "kind"));
  KVR_RETURN_IF_ERROR(r.Get(&length, "payload length"));
  KVR_RETURN_IF_ERROR(r.Get(&crc, "crc32c"));
  const size_t remain = blob.size() - kHeaderBytes;
  if (length != remain) {
    return absl::DataLossError(absl::StrCat("blob: header claims a ", length,
                                            "-byte payload but ", remain, " bytes follow"));
  }
  out.payload = blob.subspan(kHeaderBytes);
  const uint32_t actual = Crc32c(out.payload);
  if (actual != crc) {
    return absl::DataLossError(absl::StrFormat(
        "blob: payload checksum mismatch (crc32c stored %08x, computed %08x over %d bytes)", crc,
        actual, out.payload.size()));
  }
  return out;
}

absl::Status CheckBlobKind(const OpenedBlob& blob, uint32_t kind, uint32_t min_version,
                           uint32_t max_version, absl::string_view name) {
  if (blob.kind != kind) {
    const bool vowel = !name.empty() && absl::string_view("aeiou").find(name[0]) !=
                                            absl::string_view::npos;
    return absl::InvalidArgumentError(
        absl::StrCat("blob kind ", blob.kind, " is not ", vowel ? "an " : "a ", name));
  }
  if (blob.version < min_version || blob.version > max_version) {
    return absl::InvalidArgumentError(absl::StrCat(name, ": unsupported format version ",
                                                   blob.version, " (this build reads ",
                                                   max_version, ")"));
  }
  return absl::OkStatus();
}

}  // namespace kvr
