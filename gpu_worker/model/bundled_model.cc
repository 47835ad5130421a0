#include "gpu_worker/model/bundled_model.h"

#include <cstdlib>
#include <filesystem>
#include <system_error>
#include <vector>

namespace kvr::worker {

std::string FindBundledModelDir() {
  namespace fs = std::filesystem;
  std::vector<fs::path> candidates;
  if (const char* env = std::getenv("KVR_SHARED_MODELS"); env != nullptr && *env != '\0') {
    candidates.emplace_back(env);
  }
  std::error_code ec;
  const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  if (!ec) {
    // <repo>/build*/<dir>/<binary> -> <repo>/../shared/models
    candidates.push_back(exe.parent_path() / "../../../shared/models");
    candidates.push_back(exe.parent_path() / "../../shared/models");
  }
  candidates.emplace_back("../shared/models");
  candidates.emplace_back("shared/models");
  candidates.emplace_back(KVR_DEFAULT_MODEL_DIR);
  for (const fs::path& dir : candidates) {
    if (fs::exists(dir / "stories260K.bin", ec)) return fs::weakly_canonical(dir, ec).string();
  }
  return {};
}

}  // namespace kvr::worker
