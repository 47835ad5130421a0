#include "gpu_worker/backend/backend.h"

#include <map>
#include <mutex>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status.h"
#include "gpu_worker/backend/cpu/cpu_backend.h"

namespace kvr::worker {

absl::Status Backend::DownloadMany(std::span<const DownloadItem> items) {
  for (const DownloadItem& item : items) KVR_RETURN_IF_ERROR(Download(item.src, item.dst));
  return absl::OkStatus();
}

absl::Status Backend::TopK(const Tensor&, const Tensor&, const AttentionShape&, int, int64_t,
                          int64_t, int, std::span<int64_t>, std::span<float>) {
  return absl::UnimplementedError(
      absl::StrCat("backend '", std::string(name()), "' has no TopK op"));
}

namespace {

struct Registry {
  std::mutex mu;
  std::map<std::string, BackendFactory, std::less<>> factories;
};

// The built-in "cpu" backend is registered here rather than by a static
// initializer in its own file, so that linking the static library can never
// drop it.
Registry& GetRegistry() {
  static Registry* registry = [] {
    auto* r = new Registry;
    r->factories.emplace("cpu",
                         [](const BackendOptions& options) { return NewCpuBackend(options); });
    return r;
  }();
  return *registry;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Backend>> BackendRegistry::Create(std::string_view name,
                                                                 const BackendOptions& options) {
  BackendFactory factory;
  {
    Registry& r = GetRegistry();
    std::lock_guard<std::mutex> lock(r.mu);
    auto it = r.factories.find(name);
    if (it == r.factories.end()) {
      std::vector<std::string> names;
      for (const auto& [n, f] : r.factories) names.push_back(n);
      return absl::NotFoundError(absl::StrCat("no backend named '", std::string(name),
                                              "'; registered: ", absl::StrJoin(names, ", ")));
    }
    factory = it->second;
  }
  return factory(options);
}

absl::Status BackendRegistry::Register(std::string name, BackendFactory factory) {
  if (!factory)
    return absl::InvalidArgumentError(absl::StrCat("backend '", name, "': null factory"));
  Registry& r = GetRegistry();
  std::lock_guard<std::mutex> lock(r.mu);
  if (!r.factories.emplace(name, std::move(factory)).second) {
    return absl::AlreadyExistsError(absl::StrCat("backend '", name, "' is already registered"));
  }
  return absl::OkStatus();
}

std::vector<std::string> BackendRegistry::Names() {
  Registry& r = GetRegistry();
  std::lock_guard<std::mutex> lock(r.mu);
  std::vector<std::string> names;
  for (const auto& [n, f] : r.factories) names.push_back(n);
  return names;
}

}  // namespace kvr::worker
