#include "gpu_worker/backend/cpu/openblas_gemm.h"

#include <algorithm>
#include <cctype>
#include <cstdlib>

#ifdef KVR_HAVE_OPENBLAS
#include <cblas.h>
#endif

namespace kvr::worker {

#ifdef KVR_HAVE_OPENBLAS

bool OpenBlasBuilt() { return true; }

std::string OpenBlasCoreName() {
  const char* name = openblas_get_corename();
  return name == nullptr ? std::string() : std::string(name);
}

void OpenBlasSgemmNT(int threads, size_t n, size_t in, size_t out, const float* x,
                     const float* w, float* y) {
  // A process-wide setting; cheap when unchanged.
  openblas_set_num_threads(std::max(1, threads));
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<blasint>(n),
              static_cast<blasint>(out), static_cast<blasint>(in), 1.0f, x,
              static_cast<blasint>(in), w, static_cast<blasint>(in), 0.0f, y,
              static_cast<blasint>(out));
}

#else

bool OpenBlasBuilt() { return false; }
std::string OpenBlasCoreName() { return {}; }
void OpenBlasSgemmNT(int, size_t, size_t, size_t, const float*, const float*, float*) {
  std::abort();  // callers check OpenBlasBuilt()
}

#endif

bool OpenBlasCoreIsModern(std::string_view core) {
  std::string lower(core);
  std::transform(lower.begin(), lower.end(), lower.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  for (std::string_view modern : {"haswell", "zen", "skylakex", "cooperlake", "sapphirerapids"}) {
    if (lower == modern) return true;
  }
  return false;
}

}  // namespace kvr::worker
