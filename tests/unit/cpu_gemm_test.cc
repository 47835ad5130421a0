// The register-blocked matrix product (simd matmul_bf16 / matmul_f32) and
// the CPU backend's MatMul on it:
//  * every table the CPU has (scalar, AVX2, AVX-512, each forced through
//    ForIsa) against a double-precision oracle over random shapes (n 1..33,
//    d not a multiple of any vector width, odd m, padded strides) and
//    adversarial values (magnitudes 1e-20..1e15, exact cancellations), within
//    the rounding bound of its summation order; nothing outside the outputs
//    is written;
//  * batch invariance: a token's outputs are bit-identical alone, in any
//    batch and for any sub-range of weight rows;
//  * the backend's MatMul (blocked, the default) against the per-dot path
//    (KVR_CPU_GEMM=dot) within the same bound, and KVR_CPU_GEMM validation.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <iterator>
#include <limits>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "common/half.h"
#include "common/simd/kernels.h"
#include "gpu_worker/backend/backend.h"

namespace kvr {
namespace {

using simd::Isa;
using simd::Kernels;

constexpr double kUnit = 1.0 / (1 << 24);  // fp32 unit roundoff

// Summation terms per output in the longest chain of `isa`'s table: the
// scalar bf16 dot is one chain of d terms, the scalar f32 dot four chains of
// d / 4; the SIMD tables one chain of ceil(d / lanes) per lane, then a
// reduction of log2(lanes) levels. The error bound below is (terms + 2) units
// of roundoff times sum |x_k w_k|.
double ChainTerms(Isa isa, bool bf16, size_t d) {
  switch (isa) {
    case Isa::kScalar:
      return bf16 ? double(d) : double(d) / 4 + 3;
    case Isa::kAvx2:
      return std::ceil(double(d) / 8) + 3;
    case Isa::kAvx512:
      return std::ceil(double(d) / 16) + 4;
  }
  return double(d);
}

std::vector<const Kernels*> Tables() {
  std::vector<const Kernels*> out;
  for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512}) {
    if (const Kernels* k = simd::ForIsa(isa)) out.push_back(k);
  }
  return out;
}

// Values of one of several kinds: ordinary, huge, tiny (underflowing
// products), or mixed magnitudes.
float Draw(std::mt19937& rng, int kind) {
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::uniform_int_distribution<int> e(-20, 15);
  switch (kind) {
    case 0:
      return u(rng);
    case 1:
      return u(rng) * 1e15f;
    case 2:
      return u(rng) * 1e-20f;
    default:
      return u(rng) * std::pow(10.0f, static_cast<float>(e(rng)));
  }
}

struct Problem {
  size_t n, m, d, x_stride, w_stride, y_stride;
  std::vector<float> x, wf;  // wf: the weights as floats (bf16-exact when bf16)
  std::vector<uint16_t> wb;
};

// Random x [n x d] and w [m x d] (padded strides). With `cancel`, the second
// half of every row negates the first half's products exactly, so the true
// result is 0 (or the odd middle term) while sum |x w| is large.
Problem MakeProblem(std::mt19937& rng, size_t n, size_t m, size_t d, int kind, bool cancel) {
  Problem p{n, m, d, d + 3, d + 5, m + 2, {}, {}, {}};
  p.x.assign(n * p.x_stride, std::numeric_limits<float>::quiet_NaN());  // padding is never read
  p.wf.assign(m * p.w_stride, std::numeric_limits<float>::quiet_NaN());
  for (size_t t = 0; t < n; ++t) {
    for (size_t k = 0; k < d; ++k) p.x[t * p.x_stride + k] = Draw(rng, kind);
  }
  for (size_t o = 0; o < m; ++o) {
    for (size_t k = 0; k < d; ++k) {
      p.wf[o * p.w_stride + k] = Bf16ToFloat(FloatToBf16(Draw(rng, kind)));
    }
  }
  if (cancel) {
    const size_t half = d / 2;
    for (size_t t = 0; t < n; ++t) {
      for (size_t k = 0; k < half; ++k) p.x[t * p.x_stride + half + k] = -p.x[t * p.x_stride + k];
    }
    for (size_t o = 0; o < m; ++o) {
      for (size_t k = 0; k < half; ++k) p.wf[o * p.w_stride + half + k] = p.wf[o * p.w_stride + k];
    }
  }
  p.wb.resize(p.wf.size());
  for (size_t i = 0; i < p.wf.size(); ++i) p.wb[i] = FloatToBf16(p.wf[i]);
  return p;
}

constexpr float kSentinel = -12345.0f;

std::vector<float> RunTable(const Kernels& k, const Problem& p, bool bf16) {
  std::vector<float> y(p.n * p.y_stride, kSentinel);
  if (bf16) {
    k.matmul_bf16(p.x.data(), p.n, p.x_stride, p.wb.data(), p.m, p.w_stride, p.d, y.data(),
                  p.y_stride);
  } else {
    k.matmul_f32(p.x.data(), p.n, p.x_stride, p.wf.data(), p.m, p.w_stride, p.d, y.data(),
                 p.y_stride);
  }
  return y;
}

// Checks y against the double oracle within the ISA's bound; returns the
// worst error in units of sum |x w| (for the log).
double CheckAgainstOracle(const Kernels& k, const Problem& p, bool bf16,
                          const std::vector<float>& y, const std::string& what) {
  double worst = 0;
  const double terms = ChainTerms(k.isa, bf16, p.d) + 2;
  for (size_t t = 0; t < p.n; ++t) {
    for (size_t o = 0; o < p.m; ++o) {
      double sum = 0, abs_sum = 0;
      for (size_t kk = 0; kk < p.d; ++kk) {
        const double prod = double(p.x[t * p.x_stride + kk]) * p.wf[o * p.w_stride + kk];
        sum += prod;
        abs_sum += std::abs(prod);
      }
      const double got = y[t * p.y_stride + o];
      const double err = std::abs(got - sum);
      // Underflowed products (tiny kind) lose up to half the smallest
      // subnormal each.
      const double bound =
          terms * kUnit * abs_sum + double(p.d + 1) * std::numeric_limits<float>::denorm_min();
      if (!(err <= bound)) {
        ADD_FAILURE() << k.name << " " << what << ": y[" << t << "][" << o << "] = " << got
                      << ", oracle " << sum << ", |err| " << err << " > bound " << bound;
        return worst;
      }
      if (abs_sum > 0) worst = std::max(worst, err / abs_sum);
    }
    for (size_t o = p.m; o < p.y_stride; ++o) {
      if (y[t * p.y_stride + o] != kSentinel) {
        ADD_FAILURE() << k.name << " " << what << ": wrote y[" << t << "][" << o
                      << "] past m = " << p.m;
        return worst;
      }
    }
  }
  return worst;
}

TEST(CpuGemmKernelTest, EveryTableMatchesTheDoubleOracle) {
  const auto tables = Tables();
  ASSERT_FALSE(tables.empty());
  std::string names;
  for (const Kernels* k : tables) names += std::string(k->name) + " ";
  std::printf("tables tested: %s\n", names.c_str());
  std::mt19937 rng(20);
  const size_t ds[] = {1, 7, 15, 17, 33, 100, 257, 1000};
  const size_t ms[] = {1, 3, 5, 7, 9, 13, 31, 37};
  int cases = 0;
  for (size_t n = 1; n <= 33; ++n) {
    const size_t d = ds[(n * 5) % std::size(ds)];
    const size_t m = ms[(n * 3) % std::size(ms)];
    const int kind = static_cast<int>(n % 4);
    const bool cancel = n % 3 == 0 && d > 1;
    const Problem p = MakeProblem(rng, n, m, d, kind, cancel);
    const std::string what = "n " + std::to_string(n) + " m " + std::to_string(m) + " d " +
                             std::to_string(d) + " kind " + std::to_string(kind) +
                             (cancel ? " cancel" : "");
    for (const Kernels* k : tables) {
      for (bool bf16 : {true, false}) {
        CheckAgainstOracle(*k, p, bf16, RunTable(*k, p, bf16), what + (bf16 ? " bf16" : " f32"));
        ++cases;
      }
    }
  }
  // A decode-sized product: d 4100 (no vector multiple), 16 tokens.
  const Problem big = MakeProblem(rng, 16, 21, 4100, 0, false);
  for (const Kernels* k : tables) {
    for (bool bf16 : {true, false}) {
      const double worst =
          CheckAgainstOracle(*k, big, bf16, RunTable(*k, big, bf16), "16x4100->21");
      std::printf("%s %s 16x4100->21: worst |err| / sum|xw| = %.2e\n", k->name,
                  bf16 ? "bf16" : "f32", worst);
      ++cases;
    }
  }
  EXPECT_EQ(cases, static_cast<int>(tables.size()) * 2 * 34);
}

// The engine's StepBatch promise: each output depends on its token and row
// only, so a token alone, inside any batch, and against any slice of the
// weight rows gives the same bits.
TEST(CpuGemmKernelTest, ResultsAreBatchInvariantBitForBit) {
  std::mt19937 rng(7);
  // d 277: the last, partial 16-element block is odd; 300: even; 32, 16, 7:
  // no partial block, one block, only a partial one.
  for (size_t d : {size_t{277}, size_t{300}, size_t{32}, size_t{16}, size_t{7}}) {
    const size_t n = 33, m = 45;
    const Problem p = MakeProblem(rng, n, m, d, 0, false);
    for (const Kernels* k : Tables()) {
      for (bool bf16 : {true, false}) {
        const std::vector<float> all = RunTable(*k, p, bf16);
        for (size_t t = 0; t < n; ++t) {
          for (size_t count : {size_t{1}, size_t{2}, size_t{3}, size_t{4}, size_t{5}, size_t{7}}) {
            if (t + count > n) continue;
            for (size_t o0 : {size_t{0}, size_t{3}, size_t{8}}) {
              const size_t mm = m - o0 - (o0 == 3 ? 5 : 0);  // ragged slices too
              std::vector<float> y(count * p.y_stride, kSentinel);
              const float* x = p.x.data() + t * p.x_stride;
              if (bf16) {
                k->matmul_bf16(x, count, p.x_stride, p.wb.data() + o0 * p.w_stride, mm, p.w_stride,
                               d, y.data(), p.y_stride);
              } else {
                k->matmul_f32(x, count, p.x_stride, p.wf.data() + o0 * p.w_stride, mm, p.w_stride,
                              d, y.data(), p.y_stride);
              }
              for (size_t i = 0; i < count; ++i) {
                for (size_t o = 0; o < mm; ++o) {
                  ASSERT_EQ(y[i * p.y_stride + o], all[(t + i) * p.y_stride + o0 + o])
                      << k->name << (bf16 ? " bf16" : " f32") << " token " << t + i
                      << " of a batch of " << count << ", row " << o0 + o << ", d " << d;
                }
              }
            }
          }
        }
      }
    }
  }
}

// Nothing for zero tokens or zero rows (no reads, no writes).
TEST(CpuGemmKernelTest, EmptyProductsWriteNothing) {
  float y[4] = {kSentinel, kSentinel, kSentinel, kSentinel};
  const float x[4] = {1, 2, 3, 4};
  const uint16_t wb[4] = {0x3f80, 0x3f80, 0x3f80, 0x3f80};
  for (const Kernels* k : Tables()) {
    k->matmul_bf16(x, 0, 4, wb, 1, 4, 4, y, 4);
    k->matmul_bf16(x, 1, 4, wb, 0, 4, 4, y, 4);
    k->matmul_f32(x, 0, 4, x, 1, 4, 4, y, 4);
    for (float v : y) EXPECT_EQ(v, kSentinel) << k->name;
  }
}

// The backend's MatMul, blocked (default) vs per-dot (KVR_CPU_GEMM=dot), on
// 1 and 3 threads, bf16 and f32 weights (own kernels, no OpenBLAS), at
// shapes whose output count splits unevenly into the thread blocks.
TEST(CpuGemmBackendTest, BlockedMatMulMatchesPerDotPath) {
  using worker::Backend;
  using worker::BackendOptions;
  using worker::BackendRegistry;
  std::mt19937 rng(3);
  const size_t in = 4100, out = 1027;
  std::vector<float> wf(out * in);
  std::vector<uint16_t> wb(out * in);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  for (size_t i = 0; i < wf.size(); ++i) {
    wb[i] = FloatToBf16(u(rng));
    wf[i] = Bf16ToFloat(wb[i]);
  }
  const double terms = ChainTerms(simd::Active().isa, /*bf16=*/true, in) + 2;
  for (int threads : {1, 3}) {
    BackendOptions bo;
    bo.num_threads = threads;
    bo.cpu_matmul = worker::CpuMatMul::kOwn;
    ASSERT_EQ(setenv("KVR_CPU_GEMM", "dot", 1), 0);
    auto dot = BackendRegistry::Create("cpu", bo);
    ASSERT_EQ(setenv("KVR_CPU_GEMM", "blocked", 1), 0);
    auto blocked = BackendRegistry::Create("cpu", bo);
    unsetenv("KVR_CPU_GEMM");
    ASSERT_TRUE(dot.ok() && blocked.ok());
    EXPECT_NE((*dot)->Describe().find("own kernels (per-dot)"), std::string::npos)
        << (*dot)->Describe();
    EXPECT_NE((*blocked)->Describe().find("own kernels (blocked)"), std::string::npos)
        << (*blocked)->Describe();
    Backend* backends[2] = {dot->get(), blocked->get()};
    for (DType dtype : {DType::kBf16, DType::kF32}) {
      for (size_t n : {size_t{1}, size_t{2}, size_t{5}, size_t{16}, size_t{17}}) {
        std::vector<float> x(n * in);
        for (float& v : x) v = u(rng);
        std::vector<float> y[2];
        for (int b = 0; b < 2; ++b) {
          auto tx = *backends[b]->Allocate(DType::kF32, static_cast<int64_t>(n), in);
          auto tw = *backends[b]->Allocate(dtype, out, in);
          auto ty = *backends[b]->Allocate(DType::kF32, static_cast<int64_t>(n), out);
          ASSERT_TRUE(backends[b]->UploadF32(x, tx).ok());
          const auto w_bytes = dtype == DType::kBf16 ? std::as_bytes(std::span<const uint16_t>(wb))
                                                     : std::as_bytes(std::span<const float>(wf));
          ASSERT_TRUE(backends[b]->Upload(w_bytes, tw).ok());
          ASSERT_TRUE(backends[b]->MatMul(tx, tw, ty).ok());
          y[b].resize(n * out);
          ASSERT_TRUE(backends[b]->DownloadF32(ty, y[b]).ok());
        }
        // Each path is within its chain bound of the exact value (the
        // per-dot chains are no longer than the blocked ones), so they differ
        // by at most twice the blocked kernel's bound.
        for (size_t t = 0; t < n; ++t) {
          for (size_t o = 0; o < out; ++o) {
            double abs_sum = 0;
            for (size_t k = 0; k < in; ++k) {
              abs_sum += std::abs(double(x[t * in + k]) * wf[o * in + k]);
            }
            ASSERT_NEAR(y[1][t * out + o], y[0][t * out + o], 2 * terms * kUnit * abs_sum)
                << DTypeName(dtype) << " threads " << threads << " n " << n << " at [" << t << "]["
                << o << "]";
          }
        }
      }
    }
  }
}

TEST(CpuGemmBackendTest, EnvironmentChoiceIsValidated) {
  ASSERT_EQ(setenv("KVR_CPU_GEMM", "fast", 1), 0);
  auto bad = worker::BackendRegistry::Create("cpu");
  unsetenv("KVR_CPU_GEMM");
  EXPECT_TRUE(absl::IsInvalidArgument(bad.status())) << bad.status();
  EXPECT_NE(bad.status().message().find("KVR_CPU_GEMM=\"fast\""), std::string::npos)
      << bad.status();
  auto good = worker::BackendRegistry::Create("cpu");
  ASSERT_TRUE(good.ok()) << good.status();
  EXPECT_NE((*good)->Describe().find("(blocked)"), std::string::npos) << (*good)->Describe();
}

}  // namespace
}  // namespace kvr
