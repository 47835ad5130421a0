// The "cuda" backend as a dlopen plugin (libkvr_cuda_plugin.so), loaded by
// kvr_worker --backend=cuda through LoadBackendPlugin; see
// gpu_worker/backend/backend_plugin.h for why it is not linked in. The module
// exports only kvr_backend_plugin_v1 (its static libraries are linked with
// --exclude-libs,ALL, so nothing in it interposes on the executable).
#include "gpu_worker/backend/backend_plugin.h"
#include "gpu_worker/backend/cuda/cuda_backend.h"

extern "C" __attribute__((visibility("default"))) const kvr::worker::BackendPlugin*
kvr_backend_plugin_v1() {
  static const kvr::worker::BackendPlugin plugin{
      kvr::worker::kBackendPluginAbiVersion, KVR_BACKEND_INTERFACE_ID, "cuda",
      &kvr::worker::NewCudaBackend};
  return &plugin;
}
