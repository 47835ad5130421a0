// Hugging Face checkpoints in a build without nlohmann-json
// (KVR_WITH_SERVICES=OFF on a machine without nlohmann-json3-dev): compiled
// instead of hf_config.cc and safetensors_loader.cc. Every entry point fails
// with FailedPrecondition saying what is missing; llama2.c checkpoints and
// random weights are unaffected. HfConfigJson is not available at all (only
// the checkpoint writer uses it).
#include "absl/strings/str_cat.h"
#include "gpu_worker/model/hf_config.h"
#include "gpu_worker/model/safetensors_loader.h"

namespace kvr::worker {
namespace {

absl::Status NotBuilt(const std::string& what) {
  return absl::FailedPreconditionError(
      absl::StrCat(what, ": kvr was built without nlohmann-json, so Hugging Face config.json / "
                         "safetensors checkpoints are not supported (install nlohmann-json3-dev "
                         "and reconfigure, or use a llama2.c checkpoint)"));
}

}  // namespace

absl::StatusOr<LlamaConfig> ParseHfConfig(std::string_view, const std::string& name) {
  return NotBuilt(absl::StrCat("HF config ", name));
}

absl::StatusOr<LlamaConfig> LoadHfConfig(const std::string& path) {
  return NotBuilt(absl::StrCat("HF config ", path));
}

absl::StatusOr<std::vector<SafetensorsEntry>> ParseSafetensors(std::span<const std::byte>,
                                                               const std::string& name) {
  return NotBuilt(absl::StrCat("safetensors ", name));
}

absl::StatusOr<std::shared_ptr<const LlamaWeights>> LoadHfCheckpoint(const std::string& dir) {
  return NotBuilt(absl::StrCat("HF checkpoint ", dir));
}

absl::Status WriteHfCheckpoint(const LlamaWeights&, const std::string& dir,
                               const HfWriteOptions&) {
  return NotBuilt(absl::StrCat("writing HF checkpoint ", dir));
}

absl::Status ConvertLlama2cToHf(const std::string&, const std::string& dir,
                                const HfWriteOptions&) {
  return NotBuilt(absl::StrCat("writing HF checkpoint ", dir));
}

}  // namespace kvr::worker
