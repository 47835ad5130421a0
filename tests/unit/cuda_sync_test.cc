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
#include "gpu_worker/engine/generation.h"
#include "gpu_worker/engine/retrieval_engine.h"
#include "gtest/gtest.h"
#include "retrieval_node/client/in_process_client.h"
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

// Prefill of an offloaded prompt, then retrieval-mode decode steps, on
// stories260K. A decode step waits once per layer (the query the node needs,
// and with it the new token's k / v rows for the host copy that later appends
// come from) and once for the logits; nothing else: the node's partials go up
// through the upload ring, the window partial, the merge and the rest of the
// layer only queue. (3 per layer before the host copy: the leaving token's k
// and v were each downloaded on their own.)
TEST(CudaSyncTest, DecodeStepWaitsOnlyForItsDataDependences) {
  test_support::StoriesModel stories;
  ASSERT_TRUE(stories.Load());
  auto b = NewCudaBackend({});
  ASSERT_TRUE(b.ok()) << b.status();
  auto node = retrieval::InProcessRetrievalClient::Create({});
  ASSERT_TRUE(node.ok()) << node.status();
  auto engine = RetrievalEngine::Create(b->get(), stories.weights, node->get());
  ASSERT_TRUE(engine.ok()) << engine.status();
  const std::vector<int32_t> prompt = stories.Encode(
      "Once upon a time, there was a little girl named Lily. She loved to play outside in the "
      "park with her friends.");
  AttentionOptions options;
  ASSERT_GT(static_cast<int>(prompt.size()), options.sinks + options.window);
  const uint64_t before_prefill = HostWaits();
  auto logits = (*engine)->Prefill(prompt, options);
  ASSERT_TRUE(logits.ok()) << logits.status();
  // Prefill: per layer one wait for K, V and Q (host staging for the node)
  // and one for the training top-k of the layer's single chunk; then the
  // logits, and a scratch buffer growing on first use (cudaFree waits).
  // 217 before K/V/Q shared a wait, the top-k covered every KV head at once
  // and the static cache took runs of rows instead of one row per upload.
  const uint64_t prefill_waits = HostWaits() - before_prefill;
  const int prefill_layers = stories.weights->config.n_layers;
  EXPECT_LE(prefill_waits, static_cast<uint64_t>(2 * prefill_layers + 2));
  std::printf("prefill: %llu host waits\n", static_cast<unsigned long long>(prefill_waits));
  int32_t token = test_support::Argmax(*logits);
  const int layers = stories.weights->config.n_layers;
  for (int step = 0; step < 8; ++step) {
    const uint64_t before = HostWaits();
    auto next = (*engine)->DecodeStep(token);
    ASSERT_TRUE(next.ok()) << next.status();
    const uint64_t waits = HostWaits() - before;
    EXPECT_EQ(waits, static_cast<uint64_t>(layers + 1)) << "step " << step;
    std::printf("decode step %d: %llu host waits (%d layers)\n", step,
                static_cast<unsigned long long>(waits), layers);
    token = test_support::Argmax(*next);
  }
}

// Three sequences decoded as one batch on the CUDA backend give the CPU
// backend's tokens (each sequence's q and k / v rows come back through one
// DownloadMany per layer).
TEST(CudaSyncTest, BatchedRetrievalEqualsCpu) {
  test_support::StoriesModel stories;
  ASSERT_TRUE(stories.Load());
  auto gpu = NewCudaBackend({});
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  std::vector<GenerateRequest> requests(3);
  requests[0].prompt = "Once upon a time, there was a little girl named Lily. She loved to play";
  requests[1].prompt = "The cat";
  requests[2].prompt = "Tom and his dog Spot went to the big lake. The sun was warm and the water";
  for (GenerateRequest& r : requests) r.max_tokens = 48;
  std::vector<std::vector<int32_t>> tokens[2];
  Backend* backends[2] = {stories.backend.get(), gpu->get()};
  for (int side = 0; side < 2; ++side) {
    auto node = retrieval::InProcessRetrievalClient::Create({});
    ASSERT_TRUE(node.ok()) << node.status();
    auto engine = RetrievalEngine::Create(backends[side], stories.weights, node->get());
    ASSERT_TRUE(engine.ok()) << engine.status();
    BatchOptions batch;
    batch.batched = true;
    for (auto& r : GenerateBatch(**engine, *stories.tokenizer, requests, batch)) {
      ASSERT_TRUE(r.ok()) << r.status();
      tokens[side].push_back(r->tokens);
    }
  }
  EXPECT_EQ(tokens[1], tokens[0]);
}

}  // namespace
}  // namespace kvr::worker
