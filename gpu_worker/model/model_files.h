// Reading model files from disk: a read-only mapping of a whole file
// (checkpoints) and a whole small text file (JSON configs, tokenizers).
#pragma once

#include <cstddef>
#include <memory>
#include <span>
#include <string>

#include "absl/strings/string_view.h"
#include "common/status.h"

namespace kvr::worker {

// A read-only mapping of a whole file; `bytes` stays valid while any copy of
// `keepalive` does (an empty file has no mapping and empty bytes).
struct MappedFile {
  std::shared_ptr<const void> keepalive;
  std::span<const std::byte> bytes;
};

// Maps `path` read-only. NotFound when it cannot be opened (the message names
// `what` and the path), Internal when stat or mmap fails.
absl::StatusOr<MappedFile> MapFile(const std::string& path, absl::string_view what = "file");

// The whole content of `path`. NotFound when it cannot be opened, DataLoss on
// a read error.
absl::StatusOr<std::string> ReadText(const std::string& path);

}  // namespace kvr::worker
