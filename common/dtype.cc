#include "common/dtype.h"

#include <string>

#include "absl/strings/str_cat.h"

namespace kvr {

absl::StatusOr<DType> ParseDType(std::string_view name) {
  if (name == "f32" || name == "fp32" || name == "float32") return DType::kF32;
  if (name == "bf16" || name == "bfloat16") return DType::kBf16;
  if (name == "f16" || name == "fp16" || name == "float16") return DType::kF16;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown value dtype '", std::string(name), "' (expected f32, bf16 or f16)"));
}

absl::StatusOr<DType> DTypeFromTag(uint32_t tag) {
  if (tag <= static_cast<uint32_t>(DType::kF16)) return static_cast<DType>(tag);
  return absl::InvalidArgumentError(absl::StrCat("unknown value dtype tag ", tag));
}

}  // namespace kvr
