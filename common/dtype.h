// DType: the element type of stored tensors and values (fp32, bf16, fp16),
// one enum for the whole tree: the retrieval node's value storage
// (ValueMatrix, shard files, RPC tags) and the decode worker's tensors and
// weights (Backend, loaders). Name, size and parsing helpers.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

#include "absl/status/statusor.h"

namespace kvr {

// The numeric values are part of serialized formats (shard files, RPC tags)
// and of the backend plugin interface: never renumber.
enum class DType : uint8_t { kF32 = 0, kBf16 = 1, kF16 = 2 };

// "f32", "bf16", "f16" ("unknown" for a value outside the enum); a static
// string (absl::StrCat takes it, which Debian's absl does not for
// std::string_view).
constexpr const char* DTypeName(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return "f32";
    case DType::kBf16:
      return "bf16";
    case DType::kF16:
      return "f16";
  }
  return "unknown";
}

// Bytes per element: 4, 2, 2.
constexpr size_t DTypeSize(DType dtype) { return dtype == DType::kF32 ? 4 : 2; }

// Parses "f32"/"fp32"/"float32", "bf16"/"bfloat16", "f16"/"fp16"/"float16"
// (case-sensitive); InvalidArgument naming the value otherwise.
absl::StatusOr<DType> ParseDType(std::string_view name);

// Checks that a raw tag read from a file or RPC is a known DType.
absl::StatusOr<DType> DTypeFromTag(uint32_t tag);

}  // namespace kvr
