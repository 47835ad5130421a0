// LoadBackendPlugin with the CUDA backend plugin: built on the CPU emulator
// (KVR_TEST_PLUGIN = libkvr_cuda_emulated_plugin.so; runs everywhere) or the
// real libkvr_cuda_plugin.so (KVR_TEST_REAL_CUDA; needs the CUDA toolkit's
// libraries, a device only for the backend itself). Both: registration by
// name, idempotent loading, precise errors for what is not a plugin, and
// threads with 100 KiB stacks (civetweb's) still start once cuBLAS is loaded,
// which is the reason the backend is a plugin at all.
#include <pthread.h>

#include <string>
#include <vector>

#include "gpu_worker/backend/backend.h"
#include "gpu_worker/backend/backend_plugin.h"
#include "gtest/gtest.h"

namespace kvr::worker {
namespace {

TEST(BackendPluginTest, LoadsRegistersAndExplainsFailures) {
  auto name = LoadBackendPlugin(KVR_TEST_PLUGIN);
  ASSERT_TRUE(name.ok()) << name.status();
  EXPECT_EQ(*name, "cuda");
  const std::vector<std::string> names = BackendRegistry::Names();
  EXPECT_NE(std::find(names.begin(), names.end(), "cuda"), names.end());
  auto again = LoadBackendPlugin(KVR_TEST_PLUGIN);  // a no-op
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(*again, "cuda");

  auto missing = LoadBackendPlugin("/nonexistent/libkvr_cuda_plugin.so");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(missing.status().message().find("/nonexistent/libkvr_cuda_plugin.so"),
            std::string::npos)
      << missing.status();
  auto not_plugin = LoadBackendPlugin("libm.so.6");
  EXPECT_EQ(not_plugin.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(not_plugin.status().message().find("has no kvr_backend_plugin_v1"), std::string::npos)
      << not_plugin.status();
}

void* Nothing(void*) { return nullptr; }

TEST(BackendPluginTest, SmallThreadStacksStillStart) {
  ASSERT_TRUE(LoadBackendPlugin(KVR_TEST_PLUGIN).ok());
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  ASSERT_EQ(pthread_attr_setstacksize(&attr, 100 * 1024), 0);
  pthread_t thread;
  const int rc = pthread_create(&thread, &attr, &Nothing, nullptr);
  pthread_attr_destroy(&attr);
  ASSERT_EQ(rc, 0) << "pthread_create with a 100 KiB stack: " << rc;
  pthread_join(thread, nullptr);
}

#if defined(KVR_TEST_REAL_CUDA)
TEST(BackendPluginTest, RealPluginCreatesOrExplainsMissingDevice) {
  ASSERT_TRUE(LoadBackendPlugin(KVR_TEST_PLUGIN).ok());
  auto backend = BackendRegistry::Create("cuda");
  if (!backend.ok()) {
    EXPECT_EQ(backend.status().code(), absl::StatusCode::kFailedPrecondition) << backend.status();
    EXPECT_NE(backend.status().message().find("no CUDA device"), std::string::npos);
    GTEST_SKIP() << backend.status();
  }
  EXPECT_EQ((*backend)->name(), "cuda");
}
#else
TEST(BackendPluginTest, EmulatedPluginComputesLikeTheCpu) {
  ASSERT_TRUE(LoadBackendPlugin(KVR_TEST_PLUGIN).ok());
  auto gpu = BackendRegistry::Create("cuda");
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  EXPECT_NE((*gpu)->Describe().find("CPU emulator"), std::string::npos) << (*gpu)->Describe();
  auto cpu = BackendRegistry::Create("cpu");
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  const std::vector<float> x = {1, -2, 3, 0.5f, 4, -1}, w = {2, 1, 0, -3, 1, 1, 0.25f, 2, -1};
  std::vector<float> want(6), got(6);
  for (auto* b : {cpu->get(), gpu->get()}) {
    auto tx = b->Allocate(DType::kF32, 2, 3), tw = b->Allocate(DType::kF32, 3, 3),
         ty = b->Allocate(DType::kF32, 2, 3);
    ASSERT_TRUE(tx.ok() && tw.ok() && ty.ok());
    ASSERT_TRUE(b->UploadF32(x, *tx).ok());
    ASSERT_TRUE(b->UploadF32(w, *tw).ok());
    ASSERT_TRUE(b->MatMul(*tx, *tw, *ty).ok());
    ASSERT_TRUE(b->DownloadF32(*ty, b == cpu->get() ? want : got).ok());
  }
  EXPECT_EQ(got, want);  // small integers and quarters: exact on both
}
#endif

}  // namespace
}  // namespace kvr::worker
