// Where the bundled stories260K model (stories260K.bin + tok512.bin) lives.
#pragma once

#include <string>

namespace kvr::worker {

// The first of these directories that holds stories260K.bin, canonicalised:
// $KVR_SHARED_MODELS; <repo>/../shared/models relative to the running
// executable (for binaries under <repo>/build*/<dir>/); ../shared/models and
// shared/models relative to the working directory; the source tree's
// ../shared/models as seen at build time. Empty when none holds it.
std::string FindBundledModelDir();

}  // namespace kvr::worker
