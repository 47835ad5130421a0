// Backend ops vs plain double-precision loops (the oracle), on random inputs.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <random>
#include <vector>

#include "common/half.h"
#include "gpu_worker/backend/backend.h"
#include "gpu_worker/backend/cpu/cpu_backend.h"
#include "gtest/gtest.h"

namespace kvr::worker {
namespace {

std::vector<float> Random(size_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

class BackendTest : public ::testing::TestWithParam<int> {
 protected:
  void SetUp() override {
    BackendOptions o;
    o.num_threads = GetParam();
    auto b = BackendRegistry::Create("cpu", o);
    ASSERT_TRUE(b.ok()) << b.status();
    backend_ = *std::move(b);
  }

  Tensor Make(const std::vector<float>& v, int64_t rows, int64_t cols) {
    auto t = backend_->Allocate(DType::kF32, rows, cols);
    KVR_CHECK(t.ok());
    KVR_CHECK(backend_->UploadF32(v, *t).ok());
    return *t;
  }
  Tensor Zeros(int64_t rows, int64_t cols) { return *backend_->Allocate(DType::kF32, rows, cols); }
  std::vector<float> Get(const Tensor& t) {
    std::vector<float> v(t.numel());
    KVR_CHECK(backend_->DownloadF32(t, v).ok());
    return v;
  }

  std::unique_ptr<Backend> backend_;
};

// Reference attention for query row i at position p over keys [b, e) ∩ [0, p]:
// returns o (normalized), m, l in double.
struct RefPartial {
  std::vector<double> o;
  double m = -std::numeric_limits<double>::infinity();
  double l = 0;
};
RefPartial RefAttend(const std::vector<float>& q, const std::vector<float>& k,
                     const std::vector<float>& v, const AttentionShape& s, size_t i, size_t h,
                     int64_t pos, int64_t b, int64_t e) {
  const size_t hd = s.head_dim, qc = s.q_cols(), kc = s.kv_cols();
  const size_t kvh = h / (s.n_heads / s.n_kv_heads);
  RefPartial r;
  r.o.assign(hd, 0.0);
  std::vector<double> sc;
  const int64_t end = std::min(e, pos + 1);
  for (int64_t j = b; j < end; ++j) {
    double d = 0;
    for (size_t t = 0; t < hd; ++t) d += double(q[i * qc + h * hd + t]) * k[j * kc + kvh * hd + t];
    sc.push_back(d / std::sqrt(double(hd)));
  }
  if (sc.empty()) return r;
  for (double x : sc) r.m = std::max(r.m, x);
  for (size_t j = 0; j < sc.size(); ++j) {
    const double w = std::exp(sc[j] - r.m);
    r.l += w;
    for (size_t t = 0; t < hd; ++t) r.o[t] += w * v[(b + j) * kc + kvh * hd + t];
  }
  for (double& x : r.o) x /= r.l;
  return r;
}

TEST(BackendRegistryTest, CreatesCpuAndNamesUnknown) {
  auto cpu = BackendRegistry::Create("cpu");
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  EXPECT_EQ((*cpu)->name(), "cpu");
  auto none = BackendRegistry::Create("tpu");
  EXPECT_EQ(none.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(none.status().message().find("cpu"), std::string::npos) << none.status();
  EXPECT_EQ(BackendRegistry::Register("cpu", NewCpuBackend).code(),
            absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(BackendRegistry::Register("null", nullptr).code(), absl::StatusCode::kInvalidArgument);
}

TEST_P(BackendTest, MatMulMatchesLoops) {
  const int n = 5, in = 37, out = 23;
  const auto x = Random(n * in, 1), w = Random(out * in, 2);
  Tensor tx = Make(x, n, in), tw = Make(w, out, in), ty = Zeros(n, out);
  ASSERT_TRUE(backend_->MatMul(tx, tw, ty).ok());
  const auto y = Get(ty);
  for (int i = 0; i < n; ++i) {
    for (int o = 0; o < out; ++o) {
      double ref = 0;
      for (int j = 0; j < in; ++j) ref += double(x[i * in + j]) * w[o * in + j];
      EXPECT_NEAR(y[i * out + o], ref, 1e-4) << i << "," << o;
    }
  }
  // bf16 weights: the same against the bf16-rounded matrix.
  std::vector<uint16_t> wb(w.size());
  for (size_t j = 0; j < w.size(); ++j) wb[j] = FloatToBf16(w[j]);
  Tensor twb = *backend_->Allocate(DType::kBf16, out, in);
  ASSERT_TRUE(backend_->Upload(std::as_bytes(std::span<const uint16_t>(wb)), twb).ok());
  ASSERT_TRUE(backend_->MatMul(tx, twb, ty).ok());
  const auto yb = Get(ty);
  for (int i = 0; i < n; ++i) {
    for (int o = 0; o < out; ++o) {
      double ref = 0;
      for (int j = 0; j < in; ++j) ref += double(x[i * in + j]) * Bf16ToFloat(wb[o * in + j]);
      EXPECT_NEAR(yb[i * out + o], ref, 1e-4);
    }
  }
  // Shape errors are statuses.
  Tensor bad = Zeros(n, out + 1);
  EXPECT_EQ(backend_->MatMul(tx, tw, bad).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(backend_->MatMul(tx, tx, ty).code(), absl::StatusCode::kInvalidArgument);
}

TEST_P(BackendTest, RmsNormSwiGluAddMatchLoops) {
  const int n = 3, d = 19;
  const auto x = Random(n * d, 3), w = Random(d, 4), y = Random(n * d, 5);
  Tensor tx = Make(x, n, d), tw = Make(w, 1, d), to = Zeros(n, d);
  ASSERT_TRUE(backend_->RmsNorm(tx, tw, 1e-5f, to).ok());
  auto o = Get(to);
  for (int i = 0; i < n; ++i) {
    double ss = 0;
    for (int j = 0; j < d; ++j) ss += double(x[i * d + j]) * x[i * d + j];
    const double inv = 1.0 / std::sqrt(ss / d + 1e-5);
    for (int j = 0; j < d; ++j) EXPECT_NEAR(o[i * d + j], w[j] * x[i * d + j] * inv, 1e-5);
  }
  Tensor ty = Make(y, n, d);
  ASSERT_TRUE(backend_->SwiGlu(tx, ty, to).ok());
  o = Get(to);
  for (int j = 0; j < n * d; ++j) {
    const double g = x[j];
    EXPECT_NEAR(o[j], g / (1 + std::exp(-g)) * y[j], 1e-5);
  }
  ASSERT_TRUE(backend_->Add(tx, ty).ok());
  o = Get(tx);
  for (int j = 0; j < n * d; ++j) EXPECT_FLOAT_EQ(o[j], x[j] + y[j]);
}

TEST_P(BackendTest, RopeMatchesLoopsBothStyles) {
  const int n = 4, heads = 3, hd = 8;
  const auto x = Random(n * heads * hd, 6);
  const std::vector<int32_t> pos = {0, 1, 17, 300};
  std::vector<float> inv(hd / 2);
  for (int k = 0; k < hd / 2; ++k) inv[k] = std::pow(10000.0f, -2.0f * k / hd);
  Tensor tinv = Make(inv, 1, hd / 2);
  for (RopeStyle style : {RopeStyle::kInterleaved, RopeStyle::kHalfSplit}) {
    Tensor tx = Make(x, n, heads * hd);
    ASSERT_TRUE(backend_->Rope(tx, heads, hd, pos, tinv, style).ok());
    const auto y = Get(tx);
    for (int i = 0; i < n; ++i) {
      for (int h = 0; h < heads; ++h) {
        for (int k = 0; k < hd / 2; ++k) {
          const int a = style == RopeStyle::kInterleaved ? 2 * k : k;
          const int c = style == RopeStyle::kInterleaved ? 2 * k + 1 : k + hd / 2;
          const size_t base = size_t(i) * heads * hd + h * hd;
          const double ang = double(pos[i]) * double(inv[k]);
          const double v0 = x[base + a], v1 = x[base + c];
          // fp32 angle at position 300 carries ~1e-5 relative error.
          EXPECT_NEAR(y[base + a], v0 * std::cos(ang) - v1 * std::sin(ang), 2e-4);
          EXPECT_NEAR(y[base + c], v0 * std::sin(ang) + v1 * std::cos(ang), 2e-4);
        }
      }
    }
  }
}

TEST_P(BackendTest, CausalGqaAttentionMatchesLoops) {
  const AttentionShape s{4, 2, 8, 0.0f};
  const int S = 20, n = 5, first = 7;
  const auto q = Random(n * s.q_cols(), 7), k = Random(S * s.kv_cols(), 8),
             v = Random(S * s.kv_cols(), 9);
  Tensor tq = Make(q, n, s.q_cols()), tk = Make(k, S, s.kv_cols()), tv = Make(v, S, s.kv_cols());
  Tensor to = Zeros(n, s.q_cols());
  ASSERT_TRUE(backend_->Attention(tq, tk, tv, s, first, to).ok());
  const auto o = Get(to);
  for (int i = 0; i < n; ++i) {
    for (int h = 0; h < s.n_heads; ++h) {
      const RefPartial r = RefAttend(q, k, v, s, i, h, first + i, 0, S);
      for (int t = 0; t < s.head_dim; ++t) {
        EXPECT_NEAR(o[i * s.q_cols() + h * s.head_dim + t], r.o[t], 1e-5);
      }
    }
  }
  // Positions past the cache are an error, not a read out of bounds.
  EXPECT_EQ(backend_->Attention(tq, tk, tv, s, S - 2, to).code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_P(BackendTest, PartialAttentionPartsAndMergeEqualFull) {
  const AttentionShape s{6, 3, 16, 0.0f};
  const int S = 64, n = 3, first = 40;
  const auto q = Random(n * s.q_cols(), 10, 2.0f), k = Random(S * s.kv_cols(), 11, 2.0f),
             v = Random(S * s.kv_cols(), 12);
  Tensor tq = Make(q, n, s.q_cols()), tk = Make(k, S, s.kv_cols()), tv = Make(v, S, s.kv_cols());
  Tensor full = Zeros(n, s.q_cols());
  ASSERT_TRUE(backend_->Attention(tq, tk, tv, s, first, full).ok());
  const auto want = Get(full);

  // Disjoint ranges covering [0, S); [41, 50) is empty for query 0 (position
  // 40) and [50, 64) for every query.
  const std::vector<std::pair<int, int>> ranges = {{13, 30}, {0, 5},   {30, 41},
                                                   {5, 13},  {41, 50}, {50, 64}};
  Tensor o = Zeros(n, s.q_cols()), m = Zeros(n, s.n_heads), l = Zeros(n, s.n_heads);
  Tensor o2 = Zeros(n, s.q_cols()), m2 = Zeros(n, s.n_heads), l2 = Zeros(n, s.n_heads);
  bool first_part = true;
  for (auto [b, e] : ranges) {
    Tensor& po = first_part ? o : o2;
    Tensor& pm = first_part ? m : m2;
    Tensor& pl = first_part ? l : l2;
    ASSERT_TRUE(backend_->PartialAttention(tq, tk, tv, s, first, b, e, po, pm, pl).ok());
    // Each partial matches the oracle's (o, m, l).
    const auto go = Get(po), gm = Get(pm), gl = Get(pl);
    for (int i = 0; i < n; ++i) {
      for (int h = 0; h < s.n_heads; ++h) {
        const RefPartial r = RefAttend(q, k, v, s, i, h, first + i, b, e);
        if (r.l == 0) {
          EXPECT_EQ(gl[i * s.n_heads + h], 0.0f);
          EXPECT_TRUE(std::isinf(gm[i * s.n_heads + h]) && gm[i * s.n_heads + h] < 0);
        } else {
          EXPECT_NEAR(gm[i * s.n_heads + h], r.m, 1e-5);
          EXPECT_NEAR(gl[i * s.n_heads + h], r.l, 1e-4 * r.l);
        }
        for (int t = 0; t < s.head_dim; ++t) {
          EXPECT_NEAR(go[i * s.q_cols() + h * s.head_dim + t], r.o[t], 1e-5);
        }
      }
    }
    if (!first_part) {
      ASSERT_TRUE(backend_->MergeAttention(o, m, l, o2, m2, l2, s.head_dim).ok());
    }
    first_part = false;
  }
  const auto got = Get(o);
  for (size_t j = 0; j < want.size(); ++j) EXPECT_NEAR(got[j], want[j], 1e-5) << j;
}

TEST_P(BackendTest, SoftmaxArgmaxEmbedding) {
  const int n = 2, V = 11;
  auto x = Random(n * V, 13, 3.0f);
  x[V + 4] = 100.0f;
  Tensor tx = Make(x, n, V);
  std::vector<int32_t> am(n);
  ASSERT_TRUE(backend_->Argmax(tx, am).ok());
  for (int i = 0; i < n; ++i) {
    int best = 0;
    for (int j = 1; j < V; ++j) best = x[i * V + j] > x[i * V + best] ? j : best;
    EXPECT_EQ(am[i], best);
  }
  ASSERT_TRUE(backend_->Softmax(tx, 0.5f).ok());
  const auto p = Get(tx);
  for (int i = 0; i < n; ++i) {
    double mx = -1e300, z = 0;
    for (int j = 0; j < V; ++j) mx = std::max(mx, double(x[i * V + j]) / 0.5);
    for (int j = 0; j < V; ++j) z += std::exp(double(x[i * V + j]) / 0.5 - mx);
    for (int j = 0; j < V; ++j) {
      EXPECT_NEAR(p[i * V + j], std::exp(double(x[i * V + j]) / 0.5 - mx) / z, 1e-6);
    }
  }
  EXPECT_EQ(backend_->Softmax(tx, 0.0f).code(), absl::StatusCode::kInvalidArgument);

  const auto table = Random(V * 4, 14);
  Tensor tt = Make(table, V, 4), te = Zeros(3, 4);
  const std::vector<int32_t> ids = {3, 0, 10};
  ASSERT_TRUE(backend_->Embedding(tt, ids, te).ok());
  const auto e = Get(te);
  for (int i = 0; i < 3; ++i) {
    for (int j = 0; j < 4; ++j) EXPECT_EQ(e[i * 4 + j], table[ids[i] * 4 + j]);
  }
  const std::vector<int32_t> bad = {1, 11, 2};
  const absl::Status st = backend_->Embedding(tt, bad, te);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("token 11"), std::string::npos) << st;
}

// The OpenBLAS path (forced, whatever core it detected) against the own
// kernels on a prefill-like shape: fp32 GEMMs with different summation
// orders, so equal to float rounding.
TEST(CpuMatMulTest, OpenBlasMatchesOwnKernels) {
  BackendOptions own_options, blas_options;
  own_options.num_threads = blas_options.num_threads = 2;
  own_options.cpu_matmul = CpuMatMul::kOwn;
  blas_options.cpu_matmul = CpuMatMul::kOpenBlas;
  auto own = BackendRegistry::Create("cpu", own_options);
  ASSERT_TRUE(own.ok()) << own.status();
  EXPECT_NE((*own)->Describe().find("own kernels"), std::string::npos) << (*own)->Describe();
  auto blas = BackendRegistry::Create("cpu", blas_options);
  if (absl::IsFailedPrecondition(blas.status())) {
    GTEST_SKIP() << blas.status();  // built without OpenBLAS
  }
  ASSERT_TRUE(blas.ok()) << blas.status();
  EXPECT_NE((*blas)->Describe().find("OpenBLAS sgemm"), std::string::npos)
      << (*blas)->Describe();
  std::printf("%s\n", (*blas)->Describe().c_str());
  const int in = 300, out = 257;
  for (int n : {1, 15, 16, 64}) {
    const auto x = Random(size_t(n) * in, 3), w = Random(size_t(out) * in, 4, 0.05f);
    std::vector<float> y[2];
    Backend* backends[2] = {own->get(), blas->get()};
    for (int b = 0; b < 2; ++b) {
      Tensor tx = *backends[b]->Allocate(DType::kF32, n, in);
      Tensor tw = *backends[b]->Allocate(DType::kF32, out, in);
      Tensor ty = *backends[b]->Allocate(DType::kF32, n, out);
      ASSERT_TRUE(backends[b]->UploadF32(x, tx).ok());
      ASSERT_TRUE(backends[b]->UploadF32(w, tw).ok());
      ASSERT_TRUE(backends[b]->MatMul(tx, tw, ty).ok());
      y[b].resize(size_t(n) * out);
      ASSERT_TRUE(backends[b]->DownloadF32(ty, y[b]).ok());
    }
    for (size_t i = 0; i < y[0].size(); ++i) {
      ASSERT_NEAR(y[1][i], y[0][i], 1e-5 * (1.0 + std::abs(y[0][i]))) << "n " << n << " at " << i;
    }
  }
}

TEST(CpuMatMulTest, EnvironmentOverrideIsValidated) {
  ASSERT_EQ(setenv("KVR_CPU_MATMUL", "mkl", 1), 0);
  auto bad = BackendRegistry::Create("cpu");
  ASSERT_EQ(setenv("KVR_CPU_MATMUL", "own", 1), 0);
  auto own = BackendRegistry::Create("cpu");
  unsetenv("KVR_CPU_MATMUL");
  EXPECT_TRUE(absl::IsInvalidArgument(bad.status())) << bad.status();
  EXPECT_NE(bad.status().message().find("KVR_CPU_MATMUL"), std::string::npos) << bad.status();
  ASSERT_TRUE(own.ok()) << own.status();
  EXPECT_NE((*own)->Describe().find("own kernels"), std::string::npos) << (*own)->Describe();
}

TEST_P(BackendTest, ForeignTensorsAreRejected) {
  auto other = BackendRegistry::Create("cpu");
  ASSERT_TRUE(other.ok());
  Tensor mine = Zeros(2, 2);
  Tensor theirs = *(*other)->Allocate(DType::kF32, 2, 2);
  EXPECT_EQ(backend_->Add(mine, theirs).code(), absl::StatusCode::kInvalidArgument);
}

INSTANTIATE_TEST_SUITE_P(Threads, BackendTest, ::testing::Values(1, 3),
                         [](const auto& param_info) { return "t" + std::to_string(param_info.param); });

}  // namespace
}  // namespace kvr::worker
