// How often the CUDA backend and the engine on it make the host wait for the
// device, counted by the CPU emulator (kvr::cuda_emu::HostWaits): waits are
// what keeps the GPU idle between kernels and the host from overlapping the
// retrieval fan-out, so their number per op and per decode step is part of
// the backend's contract. Counts, not timings: exact and machine-independent.
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "gpu_worker/backend/backend.h"
#include "gpu_worker/backend/cuda/cuda_backend.h"
#include "gpu_worker/backend/cuda/emulator/cuda_emulator.h"
#include "gpu_worker/engine/retrieval_engine.h"
#include "gtest/gtest.h"
#include "retrieval_node/client/in_process_node.h"
#include "tests/support/stories_model.h"

namespace kvr::worker {
namespace {

using cuda_emu::HostWaits;

TEST(CudaSyncTest, OnlyResultsWaitForTheDevice) {
  auto b = NewCudaBackend({});
  ASSERT_TRUE(b.ok()) << b.status();
  Backend& gpu = **b;
  const int64_t n = 4, d = 64;
  std::vector<Tensor> t;
  for (int i = 0; i < 10; ++i) {
    auto x = gpu.Allocate(DType::kF32, n, d);
    ASSERT_TRUE(x.ok()) << x.status();
    t.push_back(*x);
  }
  std::vector<float> host(n * d, 1.0f);
  ASSERT_TRUE(gpu.Synchronize().ok());
  const uint64_t start = HostWaits();
  // Ops and up to 8 staged uploads in a row queue without waiting...
  ASSERT_TRUE(gpu.Add(t[0], t[1]).ok());
  for (int i = 0; i < 8; ++i) ASSERT_TRUE(gpu.UploadF32(host, t[2 + i]).ok());
  ASSERT_TRUE(gpu.SwiGlu(t[2], t[3], t[4]).ok());
  EXPECT_EQ(HostWaits(), start);
  // ... the 9th reuses the first pinned buffer: it waits for that copy.
  ASSERT_TRUE(gpu.UploadF32(host, t[9]).ok());
  EXPECT_EQ(HostWaits(), start + 1);
  // A result on the host waits once.
  ASSERT_TRUE(gpu.DownloadF32(t[4], host).ok());
  EXPECT_EQ(HostWaits(), start + 2);
  // Rope at the same positions twice (q and k) stages them once, no wait.
  const std::vector<int32_t> pos = {0, 1, 2, 3};
  auto inv = gpu.Allocate(DType::kF32, 1, d / 2);
  ASSERT_TRUE(inv.ok());
  ASSERT_TRUE(gpu.Rope(t[5], 1, d, pos, *inv, RopeStyle::kInterleaved).ok());
  ASSERT_TRUE(gpu.Rope(t[6], 1, d, pos, *inv, RopeStyle::kInterleaved).ok());
  EXPECT_EQ(HostWaits(), start + 2);
}

// A retrieval-mode decode step on stories260K: per layer the host must see
// the query (for the node) and, once tokens leave the window, that token's
// key and value rows (appended to the node); then the logits once. Nothing
// else may wait: the node's partials go up through the upload ring and the
// merge, the window partial and the rest of the layer only queue.
TEST(CudaSyncTest, DecodeStepWaitsOnlyForItsDataDependences) {
  test_support::StoriesModel stories;
  std::string skip;
  if (!stories.Load(&skip)) GTEST_SKIP() << skip;
  auto b = NewCudaBackend({});
  ASSERT_TRUE(b.ok()) << b.status();
  auto node = retrieval::InProcessRetrievalNode::Create({});
  ASSERT_TRUE(node.ok()) << node.status();
  auto engine = RetrievalEngine::Create(b->get(), stories.weights, node->get());
  ASSERT_TRUE(engine.ok()) << engine.status();
  const std::vector<int32_t> prompt = stories.Encode(
      "Once upon a time, there was a little girl named Lily. She loved to play outside in the "
      "park with her friends.");
  AttentionOptions options;
  ASSERT_GT(static_cast<int>(prompt.size()), options.sinks + options.window);
  auto logits = (*engine)->Prefill(prompt, options);
  ASSERT_TRUE(logits.ok()) << logits.status();
  int32_t token = test_support::Argmax(*logits);
  const int layers = stories.weights->config.n_layers;
  for (int step = 0; step < 8; ++step) {
    const uint64_t before = HostWaits();
    auto next = (*engine)->DecodeStep(token);
    ASSERT_TRUE(next.ok()) << next.status();
    const uint64_t waits = HostWaits() - before;
    // q + k row + v row per layer, the logits once.
    EXPECT_LE(waits, static_cast<uint64_t>(3 * layers + 1)) << "step " << step;
    std::printf("decode step %d: %llu host waits (%d layers)\n", step,
                static_cast<unsigned long long>(waits), layers);
    token = test_support::Argmax(*next);
  }
}

}  // namespace
}  // namespace kvr::worker
