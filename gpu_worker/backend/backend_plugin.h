// Backends built as shared modules and loaded at run time (dlopen), so a
// binary can use a backend whose libraries it does not link.
//
// Why not link it: cuBLAS and cuBLASLt carry ~110 KiB of static TLS, which
// glibc carves out of every thread's stack when they are linked into the
// executable, so threads that ask for small stacks (civetweb's 100 KiB
// /metrics threads) fail to start with EINVAL. Loaded with dlopen, the same
// libraries get dynamically allocated TLS and thread stacks are untouched.
//
// A plugin exports one C function, kvr_backend_plugin_v1, returning a
// BackendPlugin that lives as long as the module; LoadBackendPlugin checks it
// was built against this binary's Backend interface and registers its factory with
// BackendRegistry under its name. Plugins are never unloaded.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "gpu_worker/backend/backend.h"

namespace kvr::worker {

inline constexpr uint32_t kBackendPluginAbiVersion = 1;
inline constexpr char kBackendPluginSymbol[] = "kvr_backend_plugin_v1";

struct BackendPlugin {
  uint32_t abi_version = 0;         // kBackendPluginAbiVersion of the plugin's build
  const char* interface_id = "";    // KvrBackendInterfaceId() of the plugin's build
  const char* name = "";            // registry name, e.g. "cuda"
  absl::StatusOr<std::unique_ptr<Backend>> (*create)(const BackendOptions&) = nullptr;
};

// The Backend interface this binary was built with: the project version and
// a hash of backend.h, tensor.h, common/dtype.h and this header. A plugin
// must match it.
const char* KvrBackendInterfaceId();

// Loads the shared module at `path` (RTLD_NOW | RTLD_LOCAL; a path without a
// '/' is looked up by the dynamic loader) and registers its backend; returns
// the backend's name. Loading a module again returns its name and does
// nothing else. Errors: NotFound naming the path and the loader's message
// when it cannot be loaded; InvalidArgument when it lacks
// kvr_backend_plugin_v1 or was built against another Backend interface;
// AlreadyExists when another backend holds its name. Thread-safe.
absl::StatusOr<std::string> LoadBackendPlugin(const std::string& path);

// Where a plugin named `file` is loaded from when no path is given: next to
// the executable if it is there (an installed image), else in this build
// tree's plugin folder if it is there (development), else `file` alone (the
// dynamic loader's search path).
std::string DefaultPluginPath(std::string_view file);

inline constexpr char kCudaPluginFile[] = "libkvr_cuda_plugin.so";

// The backend a binary's --backend flag names: "cpu", or "cuda", which first
// loads the CUDA plugin from `cuda_plugin` (empty: DefaultPluginPath). Errors
// name the flag: InvalidArgument for another name, the plugin's load error
// (with how to build it), or the backend's own (e.g. no CUDA device).
absl::StatusOr<std::unique_ptr<Backend>> CreateBackendForFlag(std::string_view name,
                                                              const BackendOptions& options,
                                                              const std::string& cuda_plugin);

}  // namespace kvr::worker
