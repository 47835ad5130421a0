// The CUDA backend against the CPU backend (the oracle), op by op on random
// inputs of Llama-3-8B slices (hidden 4096, heads 32/8, head_dim 128), with
// normalised MSE <= 1e-6 for fp32 paths and <= 5e-4 where bf16 rounding is
// involved; and stories260K greedy generation token-identical to the CPU.
// Every test that needs a device skips with the cudaGetDeviceCount result
// when there is none.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "common/half.h"
#include "gpu_worker/backend/backend.h"
#include "gpu_worker/backend/cuda/cuda_backend.h"
#include "gpu_worker/engine/generation.h"
#include "gpu_worker/engine/retrieval_engine.h"
#include "gpu_worker/model/generate.h"
#include "gpu_worker/model/llama2c_loader.h"
#include "gpu_worker/model/llama2c_tokenizer.h"
#include "gpu_worker/model/llama_model.h"
#include "gpu_worker/model/model_config.h"
#include "gtest/gtest.h"
#include "retrieval_node/client/in_process_client.h"
#include "tests/support/stories_model.h"

namespace kvr::worker {
namespace {

constexpr double kF32Nmse = 1e-6;
constexpr double kBf16Nmse = 5e-4;

std::vector<float> Random(size_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

// sum (a - b)^2 / sum b^2 (b the reference); 0 for two all-zero vectors.
double Nmse(const std::vector<float>& a, const std::vector<float>& b) {
  KVR_CHECK(a.size() == b.size());
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double d = double(a[i]) - double(b[i]);
    num += d * d;
    den += double(b[i]) * b[i];
  }
  return den == 0 ? num : num / den;
}

TEST(CudaRegistryTest, RegistersCudaAndExplainsMissingDevice) {
  ASSERT_TRUE(RegisterCudaBackend().ok());
  ASSERT_TRUE(RegisterCudaBackend().ok());  // idempotent
  const auto names = BackendRegistry::Names();
  EXPECT_NE(std::find(names.begin(), names.end(), "cuda"), names.end());
  std::string why;
  if (CudaDeviceCount(&why) == 0) {
    auto b = BackendRegistry::Create("cuda");
    ASSERT_FALSE(b.ok());
    EXPECT_EQ(b.status().code(), absl::StatusCode::kFailedPrecondition) << b.status();
    EXPECT_NE(b.status().message().find("no CUDA device"), std::string::npos) << b.status();
    GTEST_SKIP() << "no CUDA device: " << why;
  }
}

class CudaBackendTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string why;
    if (CudaDeviceCount(&why) == 0) GTEST_SKIP() << "no CUDA device: " << why;
    auto g = NewCudaBackend({});
    ASSERT_TRUE(g.ok()) << g.status();
    gpu_ = *std::move(g);
    auto c = BackendRegistry::Create("cpu", {});
    ASSERT_TRUE(c.ok()) << c.status();
    cpu_ = *std::move(c);
  }

  // The same host values as an f32 tensor on both backends.
  struct Pair {
    Tensor cpu, gpu;
  };
  Pair Make(const std::vector<float>& v, int64_t rows, int64_t cols) {
    Pair p{*cpu_->Allocate(DType::kF32, rows, cols), *gpu_->Allocate(DType::kF32, rows, cols)};
    KVR_CHECK(cpu_->UploadF32(v, p.cpu).ok());
    KVR_CHECK(gpu_->UploadF32(v, p.gpu).ok());
    return p;
  }
  Pair Zeros(int64_t rows, int64_t cols) {
    return {*cpu_->Allocate(DType::kF32, rows, cols), *gpu_->Allocate(DType::kF32, rows, cols)};
  }
  // bf16 (or f16) weights imported into both backends.
  Pair MakeHalf(const std::vector<float>& v, int64_t rows, int64_t cols, DType dtype) {
    half_store_.emplace_back(v.size());
    std::vector<uint16_t>& h = half_store_.back();
    for (size_t i = 0; i < v.size(); ++i) {
      h[i] = dtype == DType::kBf16 ? FloatToBf16(v[i]) : FloatToFp16(v[i]);
    }
    HostTensor ht{dtype, rows, cols, h.data()};
    return {*cpu_->ImportHost(ht, nullptr), *gpu_->ImportHost(ht, nullptr)};
  }
  std::vector<float> GetCpu(const Tensor& t) {
    std::vector<float> v(t.numel());
    KVR_CHECK(cpu_->DownloadF32(t, v).ok());
    return v;
  }
  std::vector<float> GetGpu(const Tensor& t) {
    std::vector<float> v(t.numel());
    const absl::Status s = gpu_->DownloadF32(t, v);
    KVR_CHECK_MSG(s.ok(), s.ToString().c_str());
    return v;
  }
  double PairNmse(const Pair& p) { return Nmse(GetGpu(p.gpu), GetCpu(p.cpu)); }

  std::unique_ptr<Backend> gpu_, cpu_;
  std::vector<std::vector<uint16_t>> half_store_;
};

TEST_F(CudaBackendTest, EmbeddingF32AndBf16) {
  const int64_t vocab = 1000, d = 4096;
  const std::vector<int32_t> tokens = {0, 999, 17, 17, 512};
  const auto table = Random(vocab * d, 1);
  Pair t32 = Make(table, vocab, d);
  Pair t16 = MakeHalf(table, vocab, d, DType::kBf16);
  for (Pair* t : {&t32, &t16}) {
    Pair out = Zeros(tokens.size(), d);
    ASSERT_TRUE(cpu_->Embedding(t->cpu, tokens, out.cpu).ok());
    ASSERT_TRUE(gpu_->Embedding(t->gpu, tokens, out.gpu).ok());
    EXPECT_EQ(PairNmse(out), 0.0);
  }
  Pair out = Zeros(1, d);
  const std::vector<int32_t> bad = {int32_t(vocab)};
  EXPECT_EQ(gpu_->Embedding(t32.gpu, bad, out.gpu).code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(CudaBackendTest, RmsNormSwiGluAdd) {
  const int64_t n = 7, d = 4096, h = 14336;
  Pair x = Make(Random(n * d, 2), n, d);
  Pair w = Make(Random(d, 3, 0.1f), 1, d);
  Pair out = Zeros(n, d);
  ASSERT_TRUE(cpu_->RmsNorm(x.cpu, w.cpu, 1e-5f, out.cpu).ok());
  ASSERT_TRUE(gpu_->RmsNorm(x.gpu, w.gpu, 1e-5f, out.gpu).ok());
  EXPECT_LE(PairNmse(out), kF32Nmse);
  // In place (out aliases x).
  ASSERT_TRUE(cpu_->RmsNorm(x.cpu, w.cpu, 1e-5f, x.cpu).ok());
  ASSERT_TRUE(gpu_->RmsNorm(x.gpu, w.gpu, 1e-5f, x.gpu).ok());
  EXPECT_LE(PairNmse(x), kF32Nmse);

  Pair g = Make(Random(n * h, 4, 3.0f), n, h);
  Pair u = Make(Random(n * h, 5), n, h);
  Pair s = Zeros(n, h);
  ASSERT_TRUE(cpu_->SwiGlu(g.cpu, u.cpu, s.cpu).ok());
  ASSERT_TRUE(gpu_->SwiGlu(g.gpu, u.gpu, s.gpu).ok());
  EXPECT_LE(PairNmse(s), kF32Nmse);
  ASSERT_TRUE(cpu_->Add(s.cpu, u.cpu).ok());
  ASSERT_TRUE(gpu_->Add(s.gpu, u.gpu).ok());
  EXPECT_LE(PairNmse(s), kF32Nmse);
}

TEST_F(CudaBackendTest, MatMulF32AndHalfWeights) {
  const int64_t in = 4096, out = 1024;
  const auto wv = Random(out * in, 6, 0.02f);
  Pair w32 = Make(wv, out, in);
  Pair wbf = MakeHalf(wv, out, in, DType::kBf16);
  for (int64_t n : {1, 5, 8, 9, 33}) {
    Pair x = Make(Random(n * in, 7 + n), n, in);
    Pair y = Zeros(n, out);
    ASSERT_TRUE(cpu_->MatMul(x.cpu, w32.cpu, y.cpu).ok());
    ASSERT_TRUE(gpu_->MatMul(x.gpu, w32.gpu, y.gpu).ok());
    EXPECT_LE(PairNmse(y), kF32Nmse) << "f32 n=" << n;
    ASSERT_TRUE(cpu_->MatMul(x.cpu, wbf.cpu, y.cpu).ok());
    ASSERT_TRUE(gpu_->MatMul(x.gpu, wbf.gpu, y.gpu).ok());
    // GEMV (n <= 8) multiplies in fp32 like the CPU; cuBLAS rounds x to bf16.
    EXPECT_LE(PairNmse(y), n <= 8 ? kF32Nmse : kBf16Nmse) << "bf16 n=" << n;
  }
}

TEST_F(CudaBackendTest, RopeLlama31ScalingBothStyles) {
  const LlamaConfig c = Llama31_8BConfig();
  const std::vector<float> inv = c.RopeInvFreq();
  ASSERT_EQ(static_cast<int>(inv.size()), c.head_dim / 2);
  const int64_t n = 6;
  const std::vector<int32_t> pos = {0, 1, 77, 4095, 8191, 131071};
  Pair f = Make(inv, 1, c.head_dim / 2);
  for (RopeStyle style : {RopeStyle::kInterleaved, RopeStyle::kHalfSplit}) {
    Pair x = Make(Random(n * c.n_heads * c.head_dim, 8), n, c.n_heads * c.head_dim);
    ASSERT_TRUE(cpu_->Rope(x.cpu, c.n_heads, c.head_dim, pos, f.cpu, style).ok());
    ASSERT_TRUE(gpu_->Rope(x.gpu, c.n_heads, c.head_dim, pos, f.gpu, style).ok());
    EXPECT_LE(PairNmse(x), kF32Nmse);
  }
}

AttentionShape Llama3Shape() { return {32, 8, 128, 0.0f}; }

TEST_F(CudaBackendTest, CausalPrefillAttention) {
  const AttentionShape s = Llama3Shape();
  for (auto [n, first_pos] : {std::pair<int64_t, int64_t>{300, 0}, {65, 1000}, {1, 4095}}) {
    const int64_t cache = first_pos + n;
    Pair q = Make(Random(n * s.q_cols(), 9), n, s.q_cols());
    Pair k = Make(Random(cache * s.kv_cols(), 10), cache, s.kv_cols());
    Pair v = Make(Random(cache * s.kv_cols(), 11), cache, s.kv_cols());
    Pair o = Zeros(n, s.q_cols());
    ASSERT_TRUE(cpu_->Attention(q.cpu, k.cpu, v.cpu, s, first_pos, o.cpu).ok());
    ASSERT_TRUE(gpu_->Attention(q.gpu, k.gpu, v.gpu, s, first_pos, o.gpu).ok());
    EXPECT_LE(PairNmse(o), kF32Nmse) << "n=" << n << " first_pos=" << first_pos;
  }
}

// Decode-style partial over the static pattern (sinks + window, split-K on
// the GPU) merged with a "retrieved" partial equals full attention.
TEST_F(CudaBackendTest, PartialAttentionAndMerge) {
  const AttentionShape s = Llama3Shape();
  const int64_t cache = 20000, n = 1, pos = cache - 1;
  Pair q = Make(Random(n * s.q_cols(), 12), n, s.q_cols());
  Pair k = Make(Random(cache * s.kv_cols(), 13), cache, s.kv_cols());
  Pair v = Make(Random(cache * s.kv_cols(), 14), cache, s.kv_cols());
  struct Part {
    Pair o, m, l;
  };
  auto partial = [&](int64_t b, int64_t e) {
    Part p{Zeros(n, s.q_cols()), Zeros(n, s.n_heads), Zeros(n, s.n_heads)};
    KVR_CHECK(cpu_->PartialAttention(q.cpu, k.cpu, v.cpu, s, pos, b, e, p.o.cpu, p.m.cpu, p.l.cpu)
                  .ok());
    KVR_CHECK(gpu_->PartialAttention(q.gpu, k.gpu, v.gpu, s, pos, b, e, p.o.gpu, p.m.gpu, p.l.gpu)
                  .ok());
    return p;
  };
  Part window = partial(cache - 2048, cache);
  Part mid = partial(4, cache - 2048);
  Part sinks = partial(0, 4);
  Part empty = partial(7, 7);
  for (Part* p : {&window, &mid, &sinks}) {
    EXPECT_LE(PairNmse(p->o), kF32Nmse);
    EXPECT_LE(PairNmse(p->m), kF32Nmse);
    EXPECT_LE(PairNmse(p->l), kF32Nmse);
  }
  EXPECT_EQ(GetGpu(empty.l.gpu), std::vector<float>(s.n_heads, 0.0f));
  for (Part* p : {&mid, &sinks, &empty}) {
    ASSERT_TRUE(cpu_->MergeAttention(window.o.cpu, window.m.cpu, window.l.cpu, p->o.cpu, p->m.cpu,
                                     p->l.cpu, s.head_dim)
                    .ok());
    ASSERT_TRUE(gpu_->MergeAttention(window.o.gpu, window.m.gpu, window.l.gpu, p->o.gpu, p->m.gpu,
                                     p->l.gpu, s.head_dim)
                    .ok());
  }
  EXPECT_LE(PairNmse(window.o), kF32Nmse);
  Pair full = Zeros(n, s.q_cols());
  ASSERT_TRUE(gpu_->Attention(q.gpu, k.gpu, v.gpu, s, pos, full.gpu).ok());
  EXPECT_LE(Nmse(GetGpu(window.o.gpu), GetGpu(full.gpu)), kF32Nmse);
}

TEST_F(CudaBackendTest, SoftmaxArgmax) {
  const int64_t n = 3, vocab = 128256;
  auto logits = Random(n * vocab, 15, 4.0f);
  logits[vocab + 5] = logits[vocab + 9] = 1000.0f;  // tie: the lower index wins
  Pair x = Make(logits, n, vocab);
  std::vector<int32_t> a(n), b(n);
  ASSERT_TRUE(cpu_->Argmax(x.cpu, a).ok());
  ASSERT_TRUE(gpu_->Argmax(x.gpu, b).ok());
  EXPECT_EQ(a, b);
  EXPECT_EQ(b[1], 5);
  ASSERT_TRUE(cpu_->Softmax(x.cpu, 0.7f).ok());
  ASSERT_TRUE(gpu_->Softmax(x.gpu, 0.7f).ok());
  EXPECT_LE(PairNmse(x), kF32Nmse);
}

// Exact top-k per KV head (the prefill training kNN) against brute force.
TEST_F(CudaBackendTest, TopKMatchesBruteForce) {
  const AttentionShape s = Llama3Shape();
  const int64_t n = 9, cache = 3000, kb = 100, ke = 2900;
  const int top_k = 32, group = s.n_heads / s.n_kv_heads;
  ASSERT_GE(gpu_->MaxTopK(), top_k);
  const auto qv = Random(n * s.q_cols(), 16), kv = Random(cache * s.kv_cols(), 17);
  Pair q = Make(qv, n, s.q_cols());
  Pair k = Make(kv, cache, s.kv_cols());
  std::vector<int64_t> ids(n * group * top_k);
  std::vector<float> scores(ids.size());
  for (int g : {0, 5, s.n_kv_heads - 1}) {
    ASSERT_TRUE(gpu_->TopK(q.gpu, k.gpu, s, g, kb, ke, top_k, ids, scores).ok());
    for (int64_t i = 0; i < n; ++i) {
      for (int j = 0; j < group; ++j) {
        const int h = g * group + j;
        std::vector<std::pair<double, int64_t>> all;
        for (int64_t key = kb; key < ke; ++key) {
          double d = 0;
          for (int t = 0; t < s.head_dim; ++t) {
            d += double(qv[i * s.q_cols() + h * s.head_dim + t]) *
                 kv[key * s.kv_cols() + g * s.head_dim + t];
          }
          all.push_back({d, key - kb});
        }
        std::sort(all.begin(), all.end(), [](auto& a, auto& b) {
          return a.first > b.first || (a.first == b.first && a.second < b.second);
        });
        // fp32 sums in another order: scores within 1e-4 relative; the ids
        // agree wherever neighbouring exact scores are further apart.
        const size_t row = (i * group + j) * top_k;
        for (int r = 0; r < top_k; ++r) {
          EXPECT_NEAR(scores[row + r], all[r].first, 1e-4 * (1 + std::fabs(all[r].first)));
          const bool clear = (r == 0 || all[r - 1].first - all[r].first > 1e-3) &&
                             all[r].first - all[r + 1].first > 1e-3;
          if (clear) {
            EXPECT_EQ(ids[row + r], all[r].second) << "g=" << g << " i=" << i << " j=" << j;
          }
        }
      }
    }
  }
  // Every KV head in one call: head g's block equals the per-head call.
  std::vector<int64_t> all_ids(ids.size() * s.n_kv_heads);
  std::vector<float> all_scores(all_ids.size());
  ASSERT_TRUE(
      gpu_->TopK(q.gpu, k.gpu, s, Backend::kAllKvHeads, kb, ke, top_k, all_ids, all_scores).ok());
  for (int g = 0; g < s.n_kv_heads; ++g) {
    ASSERT_TRUE(gpu_->TopK(q.gpu, k.gpu, s, g, kb, ke, top_k, ids, scores).ok());
    EXPECT_TRUE(std::equal(ids.begin(), ids.end(), all_ids.begin() + g * ids.size())) << g;
    EXPECT_TRUE(std::equal(scores.begin(), scores.end(), all_scores.begin() + g * ids.size()));
  }
  EXPECT_EQ(gpu_->TopK(q.gpu, k.gpu, s, s.n_kv_heads, kb, ke, top_k, ids, scores).code(),
            absl::StatusCode::kInvalidArgument);  // kv_head out of range
  EXPECT_EQ(gpu_->TopK(q.gpu, k.gpu, s, Backend::kAllKvHeads, kb, ke, top_k, ids, scores).code(),
            absl::StatusCode::kInvalidArgument);  // outputs sized for one head
  EXPECT_EQ(gpu_->TopK(q.gpu, k.gpu, s, 0, kb, ke, 65, ids, scores).code(),
            absl::StatusCode::kUnimplemented);  // k 65 > MaxTopK()
  EXPECT_EQ(gpu_->TopK(q.gpu, k.gpu, s, 0, kb, ke, 16, ids, scores).code(),
            absl::StatusCode::kInvalidArgument);  // outputs sized for 32
  EXPECT_EQ(cpu_->MaxTopK(), 0);
  EXPECT_EQ(cpu_->TopK(q.cpu, k.cpu, s, 0, kb, ke, top_k, ids, scores).code(),
            absl::StatusCode::kUnimplemented);
}

// Argument checks belong to Backend (backend.cc), not to each backend: the
// same bad call fails with the same status on both backends.
TEST_F(CudaBackendTest, ArgumentChecksAreTheSameOnBothBackends) {
  const AttentionShape s = Llama3Shape();
  Pair x = Make(Random(4 * 64, 30), 4, 64);
  Pair narrow = Make(Random(32, 31), 1, 32);
  Pair out = Zeros(2, 64);
  Pair q = Make(Random(2 * s.q_cols(), 32), 2, s.q_cols());
  Pair k = Make(Random(16 * s.kv_cols(), 33), 16, s.kv_cols());
  Pair o = Zeros(2, s.q_cols()), m = Zeros(2, s.n_heads), l = Zeros(2, s.n_heads);
  const std::vector<int32_t> tokens = {3, 64};
  std::vector<int32_t> argmax(3);
  auto bad_calls = [&](bool gpu) {
    Backend& b = gpu ? *gpu_ : *cpu_;
    auto t = [gpu](const Pair& p) { return gpu ? p.gpu : p.cpu; };
    return std::vector<absl::Status>{
        b.RmsNorm(t(x), t(narrow), 1e-5f, t(x)),
        b.Softmax(t(x), 0.0f),
        b.Embedding(t(x), tokens, t(out)),
        b.MatMul(t(x), t(narrow), t(out)),
        b.PartialAttention(t(q), t(k), t(k), s, 0, 4, 17, t(o), t(m), t(l)),
        b.Argmax(t(x), argmax),
        b.Download(t(x), {}),
    };
  };
  const std::vector<absl::Status> on_cpu = bad_calls(false), on_gpu = bad_calls(true);
  ASSERT_EQ(on_cpu.size(), on_gpu.size());
  for (size_t i = 0; i < on_cpu.size(); ++i) {
    EXPECT_EQ(on_cpu[i].code(), absl::StatusCode::kInvalidArgument) << on_cpu[i];
    EXPECT_EQ(on_cpu[i], on_gpu[i]) << i;
  }
  EXPECT_EQ(on_cpu[0].message(), "RmsNorm weight: got [1 x 32 f32], want [1 x 64 f32]");
  EXPECT_EQ(on_cpu[2].message(), "Embedding: token 64 at index 1 outside vocab [0, 4)");
  EXPECT_EQ(cpu_->Add(x.cpu, x.gpu).message(),
            "Add y: tensor does not belong to this cpu backend");
  EXPECT_EQ(gpu_->Add(x.gpu, x.cpu).message(),
            "Add y: tensor does not belong to this cuda backend");
  // The optional TopK: what each backend says it supports.
  EXPECT_TRUE(gpu_->SupportsOp(OptionalOp::kTopK));
  EXPECT_FALSE(cpu_->SupportsOp(OptionalOp::kTopK));
}

TEST_F(CudaBackendTest, OutOfMemoryIsResourceExhausted) {
  auto t = gpu_->Allocate(DType::kF32, int64_t{1} << 20, int64_t{1} << 20);  // 4 TiB
  ASSERT_FALSE(t.ok());
  EXPECT_EQ(t.status().code(), absl::StatusCode::kResourceExhausted) << t.status();
  EXPECT_NE(t.status().message().find("4398046511104 bytes"), std::string::npos) << t.status();
  // The backend still works afterwards.
  Pair x = Make(Random(16, 18), 4, 4);
  EXPECT_EQ(PairNmse(x), 0.0);
}

constexpr const char* kPrompts[] = {
    "Once upon a time", "The little dog", "Lily and Ben", "One day", "Tom had a red ball",
    "The sun was", "Sara wanted to", "In the park", "A big bird", "Mom said", "The cat",
    "There was a girl", "He ran to the", "They played", "The boy was sad", "Spot", "At night",
    "The tree", "She found a", "Timmy"};

class CudaStoriesTest : public CudaBackendTest {
 protected:
  void SetUp() override {
    CudaBackendTest::SetUp();
    if (IsSkipped()) return;
    if (!stories_.Load()) return;
    weights_ = stories_.weights;
    tokenizer_ = stories_.tokenizer.get();
  }

  test_support::StoriesModel stories_;
  std::shared_ptr<const LlamaWeights> weights_;
  const Llama2cTokenizer* tokenizer_ = nullptr;
};

TEST_F(CudaStoriesTest, GreedyEqualsCpu) {
  auto cpu_model = LlamaModel::Create(cpu_.get(), weights_);
  auto gpu_model = LlamaModel::Create(gpu_.get(), weights_);
  ASSERT_TRUE(cpu_model.ok()) << cpu_model.status();
  ASSERT_TRUE(gpu_model.ok()) << gpu_model.status();
  for (const char* prompt : kPrompts) {
    auto a = GenerateGreedy(**cpu_model, *tokenizer_, prompt, 128);
    auto b = GenerateGreedy(**gpu_model, *tokenizer_, prompt, 128);
    ASSERT_TRUE(a.ok()) << a.status();
    ASSERT_TRUE(b.ok()) << b.status();
    EXPECT_EQ(*a, *b) << "prompt: " << prompt;
  }
}

// Retrieval attention (sinks 4 + window 16 on the backend, the rest on an
// in-process node with the attention-graph index, k 16): the engine on the
// CUDA backend generates the CPU backend's greedy tokens.
TEST_F(CudaStoriesTest, RetrievalGreedyEqualsCpu) {
  struct Side {
    std::unique_ptr<retrieval::InProcessRetrievalClient> node;
    std::unique_ptr<RetrievalEngine> engine;
  };
  auto make = [&](Backend* backend) {
    Side side;
    auto node = retrieval::InProcessRetrievalClient::Create({});
    KVR_CHECK(node.ok());
    side.node = std::move(*node);
    auto engine = RetrievalEngine::Create(backend, weights_, side.node.get());
    KVR_CHECK_MSG(engine.ok(), engine.status().ToString().c_str());
    side.engine = std::move(*engine);
    return side;
  };
  Side cpu = make(cpu_.get()), gpu = make(gpu_.get());
  // Prompts longer than sinks + window (20 tokens) are offloaded at prefill,
  // with the graph trained on the prefill queries' top-k: ExactTopK on the
  // CPU side, the backend's TopK op on the GPU side.
  std::vector<std::string> prompts(std::begin(kPrompts), std::end(kPrompts));
  prompts.push_back(
      "Once upon a time, there was a little girl named Lily. She loved to play outside in the "
      "park with her friends. One day, she saw a big red ball under a tree.");
  prompts.push_back(
      "Tom and his dog Spot went to the big lake. The sun was warm and the water was blue. Tom "
      "wanted to swim, but Spot was scared of the water.");
  int64_t retrieved = 0, gpu_topk = 0;
  for (const std::string& prompt : prompts) {
    GenerateRequest req;
    req.prompt = prompt;
    req.max_tokens = 128;
    req.attention.mode = AttentionMode::kRetrieval;
    auto a = Generate(*cpu.engine, *tokenizer_, req);
    auto b = Generate(*gpu.engine, *tokenizer_, req);
    ASSERT_TRUE(a.ok()) << a.status();
    ASSERT_TRUE(b.ok()) << b.status();
    EXPECT_EQ(a->tokens, b->tokens) << "prompt: " << prompt;
    EXPECT_EQ(a->stats.backend_topk_shards, 0);
    retrieved += b->stats.node_held_tokens;
    gpu_topk += b->stats.backend_topk_shards;
  }
  EXPECT_GT(retrieved, 0);  // the nodes took part
  // 2 long prompts x 5 layers x 4 kv heads x 1 chunk, on the device.
  EXPECT_EQ(gpu_topk, 2 * weights_->config.n_layers * weights_->config.n_kv_heads);
}

}  // namespace
}  // namespace kvr::worker
