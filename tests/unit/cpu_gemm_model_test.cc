// Model-level check of the CPU backend's blocked MatMul (the default) against
// the per-dot path (KVR_CPU_GEMM=dot): the same weights run through two
// LlamaModels, one per path, and
//  * stories260K (f32 weights): 64 greedy decode steps after a prompt give
//    identical tokens, and every step's logits agree within 1e-5 of the
//    logits' scale;
//  * a random Llama-3-shaped model with bf16 weights (GQA, untied
//    classifier): a 23-token prefill (MatMuls of 23 rows: full and partial
//    token tiles) and 16 greedy steps give identical tokens and logits within
//    1e-5 of their scale.
// Both run the own kernels (no OpenBLAS) on 2 threads.
#include <gtest/gtest.h>

#include <cstdlib>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "gpu_worker/backend/backend.h"
#include "gpu_worker/model/llama_model.h"
#include "gpu_worker/model/model_config.h"
#include "gpu_worker/model/random_weights.h"
#include "tests/support/stories_model.h"

namespace kvr {
namespace {

using test_support::Argmax;
using test_support::MaxRelDiff;
using worker::Backend;
using worker::LlamaModel;
using worker::LlamaWeights;

// Logits agree within this much of max |logit| (float rounding of differently
// ordered dot products through the layers; measured ~1e-6).
constexpr double kLogitTolerance = 1e-5;

// A two-thread CPU backend with the own kernels; `gemm` is KVR_CPU_GEMM.
std::unique_ptr<Backend> MakeBackend(const char* gemm) {
  EXPECT_EQ(setenv("KVR_CPU_GEMM", gemm, 1), 0);
  worker::BackendOptions bo;
  bo.num_threads = 2;
  bo.cpu_matmul = worker::CpuMatMul::kOwn;
  auto b = worker::BackendRegistry::Create("cpu", bo);
  unsetenv("KVR_CPU_GEMM");
  EXPECT_TRUE(b.ok()) << b.status();
  return b.ok() ? std::move(*b) : nullptr;
}

// Prefills `prompt` and decodes `steps` greedy tokens on both paths;
// asserts identical tokens and logits within kLogitTolerance at every step.
void CompareGreedy(std::shared_ptr<const LlamaWeights> weights, std::span<const int32_t> prompt,
                   int steps) {
  auto dot_backend = MakeBackend("dot");
  auto blocked_backend = MakeBackend("blocked");
  ASSERT_TRUE(dot_backend && blocked_backend);
  ASSERT_NE(dot_backend->Describe().find("(per-dot)"), std::string::npos);
  ASSERT_NE(blocked_backend->Describe().find("(blocked)"), std::string::npos);
  auto dot = LlamaModel::Create(dot_backend.get(), weights);
  auto blocked = LlamaModel::Create(blocked_backend.get(), weights);
  ASSERT_TRUE(dot.ok() && blocked.ok());
  auto a = (*dot)->Prefill(prompt);
  auto b = (*blocked)->Prefill(prompt);
  ASSERT_TRUE(a.ok() && b.ok());
  double worst = 0;
  int64_t pos = static_cast<int64_t>(prompt.size());
  for (int step = 0;; ++step) {
    const double diff = MaxRelDiff(*b, *a);
    worst = std::max(worst, diff);
    ASSERT_LE(diff, kLogitTolerance) << "step " << step;
    const int32_t ta = Argmax(*a), tb = Argmax(*b);
    ASSERT_EQ(tb, ta) << "greedy tokens differ at step " << step;
    if (step == steps) break;
    a = (*dot)->DecodeStep(ta, pos);
    b = (*blocked)->DecodeStep(tb, pos);
    ASSERT_TRUE(a.ok() && b.ok());
    ++pos;
  }
  std::printf("%d steps: identical greedy tokens, worst logit diff %.2e of max |logit|\n", steps,
              worst);
}

TEST(CpuGemmModelTest, StoriesGreedyTokensAndLogitsMatchThePerDotPath) {
  test_support::StoriesModel model;
  ASSERT_TRUE(model.Load());
  const std::vector<int32_t> prompt = model.Encode("Once upon a time, a little girl");
  ASSERT_GT(prompt.size(), 3u);
  CompareGreedy(model.weights, prompt, 64);
}

TEST(CpuGemmModelTest, RandomBf16LlamaMatchesThePerDotPath) {
  worker::LlamaConfig c = worker::Llama31_8BConfig();
  c.dim = 256;
  c.hidden_dim = 688;
  c.n_heads = 8;
  c.n_kv_heads = 2;
  c.head_dim = 32;
  c.vocab_size = 1001;
  c.seq_len = 64;
  worker::RandomWeightsOptions ro;
  ro.n_layers_override = 2;
  ro.dtype = DType::kBf16;
  auto w = worker::MakeRandomWeights(c, ro);
  ASSERT_TRUE(w.ok()) << w.status();
  std::vector<int32_t> prompt;
  for (int i = 0; i < 23; ++i) prompt.push_back((i * 131 + 7) % c.vocab_size);
  CompareGreedy(*w, prompt, 16);
}

}  // namespace
}  // namespace kvr
