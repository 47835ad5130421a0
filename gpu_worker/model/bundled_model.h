// Where the bundled stories260K model (stories260K.bin + tok512.bin) lives,
// and how a binary's --model / --tokenizer flags default to it.
#pragma once

#include <string>
#include <string_view>

#include "common/status.h"

namespace kvr::worker {

// The first directory that holds stories260K.bin, canonicalised, in this
// order: $KVR_MODELS; the repository's models/ found from the running
// executable (a binary anywhere under <repo>/build*/); the source tree's
// models/ recorded at build time; then the older fallbacks $KVR_SHARED_MODELS,
// ../shared/models relative to the repository and to the working directory.
// Empty when none holds it.
std::string FindBundledModelDir();

// A checkpoint and its tokenizer.
struct ModelPaths {
  std::string model;
  std::string tokenizer;
};

// `model_flag` / `tokenizer_flag` where given (non-empty); each missing one
// defaults to stories260K.bin / tok512.bin in FindBundledModelDir().
// NotFound naming both ways out when a default is needed and no directory
// holds the bundled model.
absl::StatusOr<ModelPaths> ResolveModelPaths(std::string_view model_flag,
                                             std::string_view tokenizer_flag);

}  // namespace kvr::worker
