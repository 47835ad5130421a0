#include "gpu_worker/model/bundled_model.h"

#include <cstdlib>
#include <filesystem>
#include <system_error>
#include <vector>

#include "absl/strings/str_cat.h"

namespace kvr::worker {
namespace {

namespace fs = std::filesystem;

constexpr const char kModelFile[] = "stories260K.bin";
constexpr const char kTokenizerFile[] = "tok512.bin";

void AddEnv(const char* name, std::vector<fs::path>* out) {
  if (const char* env = std::getenv(name); env != nullptr && *env != '\0') out->emplace_back(env);
}

}  // namespace

std::string FindBundledModelDir() {
  std::vector<fs::path> candidates;
  AddEnv("KVR_MODELS", &candidates);
  std::error_code ec;
  const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  // <repo>/build*/<dir>.../<binary>: the first ancestor with models/ is the
  // repository (binaries sit one to four levels below the build folder).
  std::vector<fs::path> ancestors;
  if (!ec) {
    fs::path dir = exe.parent_path();
    for (int up = 0; up < 6 && dir.has_relative_path(); ++up, dir = dir.parent_path()) {
      ancestors.push_back(dir);
    }
  }
  for (const fs::path& dir : ancestors) candidates.push_back(dir / "models");
  candidates.emplace_back(KVR_DEFAULT_MODEL_DIR);
  AddEnv("KVR_SHARED_MODELS", &candidates);
  for (const fs::path& dir : ancestors) candidates.push_back(dir / "../shared/models");
  candidates.emplace_back("../shared/models");
  candidates.emplace_back("shared/models");
  for (const fs::path& dir : candidates) {
    if (fs::exists(dir / kModelFile, ec)) return fs::weakly_canonical(dir, ec).string();
  }
  return {};
}

absl::StatusOr<ModelPaths> ResolveModelPaths(std::string_view model_flag,
                                             std::string_view tokenizer_flag) {
  ModelPaths paths{std::string(model_flag), std::string(tokenizer_flag)};
  if (!paths.model.empty() && !paths.tokenizer.empty()) return paths;
  const std::string dir = FindBundledModelDir();
  if (dir.empty()) {
    return absl::NotFoundError(absl::StrCat(
        "no model: pass --model and --tokenizer, or set KVR_MODELS to a directory holding ",
        kModelFile, " and ", kTokenizerFile, " (the repository's models/ folder has them)"));
  }
  if (paths.model.empty()) paths.model = absl::StrCat(dir, "/", kModelFile);
  if (paths.tokenizer.empty()) paths.tokenizer = absl::StrCat(dir, "/", kTokenizerFile);
  return paths;
}

}  // namespace kvr::worker
