// Active() honours KVR_SIMD. Active() chooses once per process, so this binary
// is registered several times with different KVR_SIMD values (see
// tests/unit/common.cmake); with none set it forces "scalar" itself.
#include <cstdlib>
#include <cstring>
#include <string>

#include <gtest/gtest.h>

#include "common/simd/kernels.h"

namespace kvr::simd {
namespace {

const Kernels& Best() {
  for (Isa isa : {Isa::kAvx512, Isa::kAvx2}) {
    if (const Kernels* k = ForIsa(isa)) return *k;
  }
  return ScalarKernels();
}

TEST(SimdDispatchEnvTest, ActiveHonoursKvrSimd) {
  const char* env = std::getenv("KVR_SIMD");
  if (env == nullptr) {
    ASSERT_EQ(setenv("KVR_SIMD", "scalar", 1), 0);
    env = "scalar";
  }
  const std::string want = env;
  // The named table when the CPU supports it, otherwise the best one.
  const Kernels* expected = &Best();
  for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512}) {
    const Kernels* k = ForIsa(isa);
    if (k != nullptr && want == k->name) expected = k;
  }
  if (want == "avx2" && ForIsa(Isa::kAvx2) == nullptr) {
    GTEST_SKIP() << "avx2 is not available on this CPU; fallback only";
  }
  if (want == "avx512" && ForIsa(Isa::kAvx512) == nullptr) {
    GTEST_SKIP() << "avx512 is not available on this CPU; fallback only";
  }
  EXPECT_STREQ(Active().name, expected->name) << "KVR_SIMD=" << want;
  EXPECT_EQ(&Active(), &Active());  // chosen once
}

}  // namespace
}  // namespace kvr::simd
