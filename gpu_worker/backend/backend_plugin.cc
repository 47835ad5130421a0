#include "gpu_worker/backend/backend_plugin.h"

#include <dlfcn.h>

#include <filesystem>
#include <map>
#include <mutex>

#include "absl/strings/str_cat.h"

namespace kvr::worker {

const char* KvrBackendInterfaceId() { return KVR_BACKEND_INTERFACE_ID; }

absl::StatusOr<std::string> LoadBackendPlugin(const std::string& path) {
  static std::mutex mu;
  static auto* loaded = new std::map<void*, std::string>();  // module handle -> name
  std::lock_guard<std::mutex> lock(mu);
  void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (handle == nullptr) {
    const char* why = dlerror();
    return absl::NotFoundError(absl::StrCat("cannot load backend plugin ", path, ": ",
                                            why != nullptr ? why : "unknown dlopen error"));
  }
  if (auto it = loaded->find(handle); it != loaded->end()) {
    dlclose(handle);  // drop the extra reference; the module stays loaded
    return it->second;
  }
  using Entry = const BackendPlugin* (*)();
  auto entry = reinterpret_cast<Entry>(dlsym(handle, kBackendPluginSymbol));
  const BackendPlugin* plugin = entry != nullptr ? entry() : nullptr;
  absl::Status bad;
  if (plugin == nullptr) {
    bad = absl::InvalidArgumentError(
        absl::StrCat("backend plugin ", path, " has no ", kBackendPluginSymbol));
  } else if (plugin->abi_version != kBackendPluginAbiVersion || plugin->interface_id == nullptr ||
             std::string_view(KvrBackendInterfaceId()) != plugin->interface_id) {
    bad = absl::InvalidArgumentError(absl::StrCat(
        "backend plugin ", path, " was built against Backend interface ",
        plugin->interface_id != nullptr ? plugin->interface_id : "?", " (plugin ABI ",
        plugin->abi_version, "); this binary has ", KvrBackendInterfaceId(), " (plugin ABI ",
        kBackendPluginAbiVersion, "): build them from the same tree"));
  } else if (plugin->create == nullptr || plugin->name == nullptr || *plugin->name == '\0') {
    bad = absl::InvalidArgumentError(
        absl::StrCat("backend plugin ", path, " has no name or factory"));
  }
  if (!bad.ok()) {
    dlclose(handle);
    return bad;
  }
  const auto create = plugin->create;
  absl::Status registered = BackendRegistry::Register(
      plugin->name, [create](const BackendOptions& options) { return create(options); });
  if (!registered.ok()) {
    dlclose(handle);
    return absl::Status(registered.code(),
                        absl::StrCat("backend plugin ", path, ": ", registered.message()));
  }
  (*loaded)[handle] = plugin->name;
  return std::string(plugin->name);
}

std::string DefaultPluginPath(std::string_view file) {
  std::error_code ec;
  const std::filesystem::path exe = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (!ec) {
    const std::filesystem::path beside = exe.parent_path() / file;
    if (std::filesystem::exists(beside, ec)) return beside.string();
  }
  const std::filesystem::path built = std::filesystem::path(KVR_BUILD_PLUGIN_DIR) / file;
  if (std::filesystem::exists(built, ec)) return built.string();
  return std::string(file);
}

absl::StatusOr<std::unique_ptr<Backend>> CreateBackendForFlag(std::string_view name,
                                                              const BackendOptions& options,
                                                              const std::string& cuda_plugin) {
  if (name != "cpu" && name != "cuda") {
    return absl::InvalidArgumentError(
        absl::StrCat("--backend \"", std::string(name), "\" is not one of cpu, cuda"));
  }
  if (name == "cuda") {
    const std::string path = cuda_plugin.empty() ? DefaultPluginPath(kCudaPluginFile) : cuda_plugin;
    absl::StatusOr<std::string> loaded = LoadBackendPlugin(path);
    if (!loaded.ok()) {
      return absl::Status(loaded.status().code(),
                          absl::StrCat("--backend cuda: ", loaded.status().message(),
                                       " (build target kvr_cuda_plugin where nvcc is found, and "
                                       "pass its path with --cuda_plugin)"));
    }
    if (*loaded != name) {
      return absl::InvalidArgumentError(absl::StrCat("--cuda_plugin ", path, " provides backend '",
                                                     *loaded, "', not 'cuda'"));
    }
  }
  absl::StatusOr<std::unique_ptr<Backend>> backend = BackendRegistry::Create(name, options);
  if (!backend.ok()) {
    return absl::Status(backend.status().code(), absl::StrCat("--backend ", std::string(name),
                                                              ": ", backend.status().message()));
  }
  return backend;
}

}  // namespace kvr::worker
