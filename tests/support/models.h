// Where tests find model files. The bundled model (stories260K.bin,
// tok512.bin) is part of the repository: ctest points $KVR_MODELS at models/
// and a test that needs it fails, never skips, when it is missing. Larger
// optional files (the Llama-2 tokenizers) may sit in $KVR_SHARED_MODELS
// beside the repository; tests that need those skip without them.
#pragma once

#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <string>

namespace kvr::test_support {

// $KVR_MODELS/<file>; records a test failure and returns "" when it is not there.
inline std::string BundledModelPath(const char* file) {
  const char* dir = std::getenv("KVR_MODELS");
  if (dir == nullptr || *dir == '\0') {
    ADD_FAILURE() << "KVR_MODELS is not set (ctest sets it to the repository's models/)";
    return {};
  }
  std::string path = std::string(dir) + "/" + file;
  if (!std::filesystem::exists(path)) {
    ADD_FAILURE() << path << " is missing: the bundled model belongs in the repository";
    return {};
  }
  return path;
}

// $KVR_SHARED_MODELS/<file> when it exists, else "" (the caller skips).
inline std::string OptionalModelPath(const char* file) {
  const char* dir = std::getenv("KVR_SHARED_MODELS");
  if (dir == nullptr || *dir == '\0') return {};
  std::string path = std::string(dir) + "/" + file;
  return std::filesystem::exists(path) ? path : std::string();
}

}  // namespace kvr::test_support
