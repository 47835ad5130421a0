// Every SIMD kernel table this CPU supports, checked against the scalar oracle
// (ScalarKernels()) on random and adversarial inputs. Tables the CPU lacks are
// skipped with a message.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "common/half.h"
#include "common/simd/kernels.h"

namespace kvr::simd {
namespace {

constexpr size_t kLengths[] = {0, 1, 3, 7, 8, 15, 16, 17, 31, 64, 100, 128, 129, 1000};
// Written past the end of every output; must survive each kernel call.
constexpr float kSentinel = -12345.678f;
constexpr size_t kGuard = 32;

// Products and sums are reassociated and fused, so a SIMD dot may differ from
// the scalar one by float rounding: allow 1e-5 of sum |a_i * b_i|.
constexpr double kDotRelTol = 1e-5;
// Per-term relative error bound of exp_shift_sum, as promised in kernels.h.
constexpr double kExpRelTol = 1e-7;

const char* IsaName(Isa isa) {
  switch (isa) {
    case Isa::kScalar:
      return "scalar";
    case Isa::kAvx2:
      return "avx2";
    case Isa::kAvx512:
      return "avx512";
  }
  return "?";
}

std::vector<float> RandomFloats(std::mt19937& rng, size_t n, float lo = -1.0f, float hi = 1.0f) {
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

std::vector<uint16_t> ToBf16(const std::vector<float>& v) {
  std::vector<uint16_t> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = FloatToBf16(v[i]);
  return out;
}

std::vector<uint16_t> ToFp16(const std::vector<float>& v) {
  std::vector<uint16_t> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = FloatToFp16(v[i]);
  return out;
}

// sum |q_i * row_i| in double: the scale of the rounding error of a dot.
template <class RowToFloat>
double AbsDot(const float* q, size_t d, RowToFloat row) {
  double s = 0;
  for (size_t i = 0; i < d; ++i) s += std::fabs(static_cast<double>(q[i]) * row(i));
  return s;
}

std::vector<float> Guarded(size_t n) { return std::vector<float>(n + kGuard, kSentinel); }

void ExpectGuardIntact(const std::vector<float>& v, size_t n) {
  for (size_t i = n; i < v.size(); ++i) ASSERT_EQ(v[i], kSentinel) << "write past n=" << n;
}

uint32_t Bits(float f) { return FloatBits(f); }

class SimdTest : public ::testing::TestWithParam<Isa> {
 protected:
  void SetUp() override {
    k_ = ForIsa(GetParam());
    if (k_ == nullptr) {
      GTEST_SKIP() << IsaName(GetParam())
                   << " kernels are not compiled in or this CPU does not support them";
    }
  }

  const Kernels* k_ = nullptr;
  const Kernels& ref_ = ScalarKernels();
  std::mt19937 rng_{12345};
};

TEST_P(SimdTest, TableIsComplete) {
  EXPECT_EQ(k_->isa, GetParam());
  EXPECT_STREQ(k_->name, IsaName(GetParam()));
  const void* entries[] = {
      reinterpret_cast<const void*>(k_->dot),          reinterpret_cast<const void*>(k_->l2sqr),
      reinterpret_cast<const void*>(k_->dot_batch),    reinterpret_cast<const void*>(k_->dot_gather),
      reinterpret_cast<const void*>(k_->dot_bf16),     reinterpret_cast<const void*>(k_->dot_batch_bf16),
      reinterpret_cast<const void*>(k_->dot_gather_bf16), reinterpret_cast<const void*>(k_->axpy),
      reinterpret_cast<const void*>(k_->axpy_bf16),    reinterpret_cast<const void*>(k_->axpy_fp16),
      reinterpret_cast<const void*>(k_->exp_shift_sum), reinterpret_cast<const void*>(k_->max),
      reinterpret_cast<const void*>(k_->fp32_to_bf16), reinterpret_cast<const void*>(k_->bf16_to_fp32),
      reinterpret_cast<const void*>(k_->fp32_to_fp16), reinterpret_cast<const void*>(k_->fp16_to_fp32),
  };
  for (const void* e : entries) EXPECT_NE(e, nullptr);
}

TEST_P(SimdTest, DotAndL2MatchScalar) {
  for (size_t d : kLengths) {
    // Offset by one float so the vectors are not 32-byte aligned.
    const std::vector<float> a = RandomFloats(rng_, d + 1), b = RandomFloats(rng_, d + 1);
    const float* pa = a.data() + 1;
    const float* pb = b.data() + 1;
    const double scale = AbsDot(pa, d, [&](size_t i) { return pb[i]; });
    EXPECT_NEAR(k_->dot(pa, pb, d), ref_.dot(pa, pb, d), kDotRelTol * scale + 1e-30) << "d=" << d;

    double l2_scale = 0;
    for (size_t i = 0; i < d; ++i) l2_scale += (double(pa[i]) - pb[i]) * (double(pa[i]) - pb[i]);
    EXPECT_NEAR(k_->l2sqr(pa, pb, d), ref_.l2sqr(pa, pb, d), kDotRelTol * l2_scale + 1e-30)
        << "d=" << d;
    if (d == 0) {
      EXPECT_EQ(k_->dot(pa, pb, 0), 0.0f);
      EXPECT_EQ(k_->l2sqr(pa, pb, 0), 0.0f);
    }
  }
}

TEST_P(SimdTest, DotBf16MatchesScalar) {
  for (size_t d : kLengths) {
    const std::vector<float> a = RandomFloats(rng_, d);
    const std::vector<uint16_t> b = ToBf16(RandomFloats(rng_, d));
    const double scale = AbsDot(a.data(), d, [&](size_t i) { return Bf16ToFloat(b[i]); });
    EXPECT_NEAR(k_->dot_bf16(a.data(), b.data(), d), ref_.dot_bf16(a.data(), b.data(), d),
                kDotRelTol * scale + 1e-30)
        << "d=" << d;
  }
}

// Row counts that exercise full groups of four, partial groups and n == 0.
constexpr size_t kRowCounts[] = {0, 1, 2, 3, 4, 5, 7, 9, 33};

TEST_P(SimdTest, DotBatchMatchesScalar) {
  for (size_t d : kLengths) {
    for (size_t pad : {size_t{0}, size_t{1}, size_t{13}}) {
      const size_t stride = d + pad;
      for (size_t n : kRowCounts) {
        const std::vector<float> q = RandomFloats(rng_, d);
        const std::vector<float> rows = RandomFloats(rng_, n * stride + 1);
        std::vector<float> got = Guarded(n), want(n);
        k_->dot_batch(q.data(), rows.data(), n, d, stride, got.data());
        ref_.dot_batch(q.data(), rows.data(), n, d, stride, want.data());
        for (size_t i = 0; i < n; ++i) {
          const float* row = rows.data() + i * stride;
          const double scale = AbsDot(q.data(), d, [&](size_t j) { return row[j]; });
          ASSERT_NEAR(got[i], want[i], kDotRelTol * scale + 1e-30)
              << "d=" << d << " stride=" << stride << " n=" << n << " row " << i;
        }
        ExpectGuardIntact(got, n);

        const std::vector<uint16_t> rows16 = ToBf16(rows);
        std::vector<float> got16 = Guarded(n), want16(n);
        k_->dot_batch_bf16(q.data(), rows16.data(), n, d, stride, got16.data());
        ref_.dot_batch_bf16(q.data(), rows16.data(), n, d, stride, want16.data());
        for (size_t i = 0; i < n; ++i) {
          const uint16_t* row = rows16.data() + i * stride;
          const double scale = AbsDot(q.data(), d, [&](size_t j) { return Bf16ToFloat(row[j]); });
          ASSERT_NEAR(got16[i], want16[i], kDotRelTol * scale + 1e-30)
              << "bf16 d=" << d << " stride=" << stride << " n=" << n << " row " << i;
        }
        ExpectGuardIntact(got16, n);
      }
    }
  }
}

TEST_P(SimdTest, DotGatherMatchesScalar) {
  constexpr size_t kBaseRows = 50;
  for (size_t d : kLengths) {
    for (size_t pad : {size_t{0}, size_t{5}}) {
      const size_t stride = d + pad;
      const std::vector<float> base = RandomFloats(rng_, kBaseRows * stride + 1);
      const std::vector<uint16_t> base16 = ToBf16(base);
      const std::vector<float> q = RandomFloats(rng_, d);
      for (size_t n : {size_t{0}, size_t{1}, size_t{3}, size_t{4}, size_t{6}, size_t{13},
                       size_t{64}}) {
        // Random ids, repeats allowed, always including the last row.
        std::uniform_int_distribution<uint32_t> pick(0, kBaseRows - 1);
        std::vector<uint32_t> ids(n);
        for (uint32_t& id : ids) id = pick(rng_);
        if (n > 0) ids[n / 2] = kBaseRows - 1;

        std::vector<float> got = Guarded(n), want(n);
        k_->dot_gather(q.data(), base.data(), ids.data(), n, d, stride, got.data());
        ref_.dot_gather(q.data(), base.data(), ids.data(), n, d, stride, want.data());
        std::vector<float> got16 = Guarded(n), want16(n);
        k_->dot_gather_bf16(q.data(), base16.data(), ids.data(), n, d, stride, got16.data());
        ref_.dot_gather_bf16(q.data(), base16.data(), ids.data(), n, d, stride, want16.data());
        for (size_t i = 0; i < n; ++i) {
          const size_t off = static_cast<size_t>(ids[i]) * stride;
          const double scale = AbsDot(q.data(), d, [&](size_t j) { return base[off + j]; });
          ASSERT_NEAR(got[i], want[i], kDotRelTol * scale + 1e-30)
              << "d=" << d << " n=" << n << " i=" << i;
          const double scale16 =
              AbsDot(q.data(), d, [&](size_t j) { return Bf16ToFloat(base16[off + j]); });
          ASSERT_NEAR(got16[i], want16[i], kDotRelTol * scale16 + 1e-30)
              << "bf16 d=" << d << " n=" << n << " i=" << i;
        }
        ExpectGuardIntact(got, n);
        ExpectGuardIntact(got16, n);
      }
    }
  }
}

TEST_P(SimdTest, AxpyMatchesScalar) {
  // FMA rounds once where the scalar code rounds twice: allow a few ulps of
  // |y| + |a x|.
  constexpr double kRelTol = 4e-7;
  for (size_t d : kLengths) {
    const float a = 0.75f;
    const std::vector<float> x = RandomFloats(rng_, d);
    const std::vector<uint16_t> xb = ToBf16(x), xh = ToFp16(x);
    const std::vector<float> y0 = RandomFloats(rng_, d);
    struct Case {
      const char* name;
      std::function<void(const Kernels&, float*)> run;
      std::function<float(size_t)> xi;
    };
    const Case cases[] = {
        {"fp32", [&](const Kernels& k, float* y) { k.axpy(a, x.data(), y, d); },
         [&](size_t i) { return x[i]; }},
        {"bf16", [&](const Kernels& k, float* y) { k.axpy_bf16(a, xb.data(), y, d); },
         [&](size_t i) { return Bf16ToFloat(xb[i]); }},
        {"fp16", [&](const Kernels& k, float* y) { k.axpy_fp16(a, xh.data(), y, d); },
         [&](size_t i) { return Fp16ToFloat(xh[i]); }},
    };
    for (const Case& c : cases) {
      std::vector<float> got = Guarded(d), want = y0;
      std::copy(y0.begin(), y0.end(), got.begin());
      c.run(*k_, got.data());
      c.run(ref_, want.data());
      for (size_t i = 0; i < d; ++i) {
        const double scale = std::fabs(y0[i]) + std::fabs(a * c.xi(i));
        ASSERT_NEAR(got[i], want[i], kRelTol * scale) << c.name << " d=" << d << " i=" << i;
      }
      ExpectGuardIntact(got, d);
    }
  }
}

TEST_P(SimdTest, ExpShiftSumWithinBound) {
  for (size_t n : kLengths) {
    const float shift = 3.5f;
    // Arguments x - shift in [-95, 0]: some below the -87 cut-off.
    const std::vector<float> x = RandomFloats(rng_, n, shift - 95.0f, shift);
    std::vector<float> got = Guarded(n);
    const float sum = k_->exp_shift_sum(x.data(), shift, got.data(), n);
    double want_sum = 0;
    for (size_t i = 0; i < n; ++i) {
      const float t = x[i] - shift;
      if (t < -87.0f) {
        ASSERT_EQ(Bits(got[i]), 0u) << "exp(" << t << ") must be exactly +0";
        continue;
      }
      const double want = std::exp(static_cast<double>(t));
      ASSERT_LE(std::fabs(got[i] - want), kExpRelTol * want) << "t=" << t;
      want_sum += want;
    }
    EXPECT_NEAR(sum, want_sum, 1e-6 * want_sum + 1e-30) << "n=" << n;
    ExpectGuardIntact(got, n);
  }
}

// A dense sweep of [-87, 0] plus the edges, reporting the worst error seen.
TEST_P(SimdTest, ExpShiftSumDenseSweep) {
  constexpr size_t kN = 1 << 20;
  std::vector<float> t(kN);
  for (size_t i = 0; i < kN; ++i) t[i] = -87.0f * static_cast<float>(i) / (kN - 1);
  t[1] = -87.0f;
  t[2] = std::nextafter(-87.0f, 0.0f);
  t[3] = -0.0f;
  t[4] = std::numeric_limits<float>::denorm_min();
  t[5] = -0.34657359f;  // -ln2/2, the edge of the reduced range
  t[6] = 0.34657359f;
  std::vector<float> got(kN);
  k_->exp_shift_sum(t.data(), 0.0f, got.data(), kN);
  double worst = 0;
  float worst_t = 0;
  for (size_t i = 0; i < kN; ++i) {
    const double want = std::exp(static_cast<double>(t[i]));
    const double rel = std::fabs(got[i] - want) / want;
    if (rel > worst) {
      worst = rel;
      worst_t = t[i];
    }
  }
  std::printf("[ %s ] exp_shift_sum worst relative error on [-87, 0]: %.3g at t=%.9g\n",
              k_->name, worst, worst_t);
  EXPECT_LE(worst, kExpRelTol);
}

TEST_P(SimdTest, ExpShiftSumSpecialArguments) {
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const std::vector<float> x = {-inf, -1000.0f, -87.0001f, -87.0f, 0.0f, nan, 88.0f, inf, 1.0f};
  std::vector<float> got(x.size());
  k_->exp_shift_sum(x.data(), 0.0f, got.data(), x.size());
  EXPECT_EQ(Bits(got[0]), 0u);
  EXPECT_EQ(Bits(got[1]), 0u);
  EXPECT_EQ(Bits(got[2]), 0u);
  EXPECT_NEAR(got[3], std::exp(-87.0), kExpRelTol * std::exp(-87.0));
  EXPECT_EQ(got[4], 1.0f);
  EXPECT_TRUE(std::isnan(got[5]));
  EXPECT_NEAR(got[6], std::exp(88.0), kExpRelTol * std::exp(88.0));
  EXPECT_EQ(got[7], inf);
  EXPECT_NEAR(got[8], std::exp(1.0), kExpRelTol * std::exp(1.0));
}

TEST_P(SimdTest, MaxMatchesScalar) {
  EXPECT_EQ(k_->max(nullptr, 0), -std::numeric_limits<float>::infinity());
  for (size_t n : kLengths) {
    std::vector<float> x = RandomFloats(rng_, n, -100.0f, -1.0f);  // all negative: 0 padding would show
    EXPECT_EQ(k_->max(x.data(), n), ref_.max(x.data(), n)) << "n=" << n;
    if (n == 0) continue;
    // The maximum in the very last element (the tail).
    x[n - 1] = 5.0f;
    EXPECT_EQ(k_->max(x.data(), n), 5.0f) << "n=" << n;
    // NaNs are skipped, as in the scalar oracle.
    x[0] = std::numeric_limits<float>::quiet_NaN();
    EXPECT_EQ(k_->max(x.data(), n), ref_.max(x.data(), n)) << "n=" << n;
  }
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const std::vector<float> all_nan(19, nan);
  EXPECT_EQ(k_->max(all_nan.data(), all_nan.size()), -std::numeric_limits<float>::infinity());
  const std::vector<float> with_inf = {1.0f, std::numeric_limits<float>::infinity(), nan, 2.0f};
  EXPECT_EQ(k_->max(with_inf.data(), with_inf.size()), std::numeric_limits<float>::infinity());
}

TEST_P(SimdTest, HalfToFp32BitExactForAllPatterns) {
  std::vector<uint16_t> all(65536);
  for (size_t i = 0; i < all.size(); ++i) all[i] = static_cast<uint16_t>(i);
  std::vector<float> bf(all.size()), fp(all.size());
  k_->bf16_to_fp32(all.data(), bf.data(), all.size());
  k_->fp16_to_fp32(all.data(), fp.data(), all.size());
  for (size_t i = 0; i < all.size(); ++i) {
    ASSERT_EQ(Bits(bf[i]), Bits(Bf16ToFloat(all[i]))) << "bf16 0x" << std::hex << i;
    ASSERT_EQ(Bits(fp[i]), Bits(Fp16ToFloat(all[i]))) << "fp16 0x" << std::hex << i;
  }
}

// fp32 inputs that stress rounding: specials, the fp16 overflow and subnormal
// edges, and for every half/bf16 value the exact halfway point to its
// neighbour and the floats either side of it.
std::vector<float> AdversarialFloats(std::mt19937& rng) {
  std::vector<uint32_t> bits = {
      0x00000000, 0x80000000, 0x00000001, 0x80000001, 0x007fffff, 0x00800000,  // 0, subnormal, min
      0x7f7fffff, 0xff7fffff, 0x7f800000, 0xff800000,                          // max, inf
      0x7f800001, 0xff800001, 0x7fc00000, 0xffc00000, 0x7fffffff, 0xffffffff,  // NaNs
      0x7fa00000, 0x7f802000, 0x7fbfe000, 0x7f800fff, 0x7f80ffff, 0x7f810000,  // NaN payloads
      0x477fe000, 0x477fefff, 0x477ff000, 0x477ff001, 0x47800000,              // 65504..65536
      0x33000000, 0x33000001, 0x32ffffff, 0x33800000, 0x33c00000, 0x33400000,  // 2^-25, 2^-24
      0x387fc000, 0x387fe000, 0x387fffff, 0x38800000,                          // 2^-14 edge
  };
  for (uint32_t h = 0; h < 0x7c00; ++h) {
    // Halfway between fp16 h and h + 1 (as fp32), and one ulp either side.
    const uint32_t lo = FloatBits(Fp16ToFloat(static_cast<uint16_t>(h)));
    const uint32_t hi = FloatBits(Fp16ToFloat(static_cast<uint16_t>(h + 1)));
    const uint32_t mid = FloatBits((BitsToFloat(lo) + BitsToFloat(hi)) * 0.5f);
    for (uint32_t b : {lo, mid - 1, mid, mid + 1}) {
      bits.push_back(b);
      bits.push_back(b | 0x80000000u);
    }
  }
  for (uint32_t h = 0; h < 0x10000; ++h) {
    // bf16: halfway is the low 16 bits == 0x8000.
    const uint32_t mid = (h << 16) | 0x8000u;
    for (uint32_t b : {mid - 1, mid, mid + 1}) bits.push_back(b);
  }
  std::uniform_int_distribution<uint32_t> any;
  for (int i = 0; i < (1 << 20); ++i) bits.push_back(any(rng));
  std::vector<float> out(bits.size());
  for (size_t i = 0; i < bits.size(); ++i) out[i] = BitsToFloat(bits[i]);
  std::uniform_real_distribution<float> in_range(-70000.0f, 70000.0f);
  for (int i = 0; i < (1 << 18); ++i) out.push_back(in_range(rng));
  return out;
}

TEST_P(SimdTest, Fp32ToHalfBitExact) {
  const std::vector<float> in = AdversarialFloats(rng_);
  std::vector<uint16_t> bf(in.size()), fp(in.size());
  k_->fp32_to_bf16(in.data(), bf.data(), in.size());
  k_->fp32_to_fp16(in.data(), fp.data(), in.size());
  for (size_t i = 0; i < in.size(); ++i) {
    ASSERT_EQ(bf[i], FloatToBf16(in[i])) << "bf16 of 0x" << std::hex << Bits(in[i]);
    ASSERT_EQ(fp[i], FloatToFp16(in[i])) << "fp16 of 0x" << std::hex << Bits(in[i]);
  }
}

TEST_P(SimdTest, ConversionTailsStayInBounds) {
  constexpr uint16_t kSentinel16 = 0xbeef;
  for (size_t n : kLengths) {
    const std::vector<float> in = RandomFloats(rng_, n, -1000.0f, 1000.0f);
    std::vector<uint16_t> bf(n + kGuard, kSentinel16), fp(n + kGuard, kSentinel16);
    k_->fp32_to_bf16(in.data(), bf.data(), n);
    k_->fp32_to_fp16(in.data(), fp.data(), n);
    for (size_t i = 0; i < n; ++i) {
      ASSERT_EQ(bf[i], FloatToBf16(in[i])) << "n=" << n;
      ASSERT_EQ(fp[i], FloatToFp16(in[i])) << "n=" << n;
    }
    for (size_t i = n; i < n + kGuard; ++i) {
      ASSERT_EQ(bf[i], kSentinel16) << "bf16 write past n=" << n;
      ASSERT_EQ(fp[i], kSentinel16) << "fp16 write past n=" << n;
    }
    std::vector<float> back_bf = Guarded(n), back_fp = Guarded(n);
    k_->bf16_to_fp32(bf.data(), back_bf.data(), n);
    k_->fp16_to_fp32(fp.data(), back_fp.data(), n);
    for (size_t i = 0; i < n; ++i) {
      ASSERT_EQ(Bits(back_bf[i]), Bits(Bf16ToFloat(bf[i])));
      ASSERT_EQ(Bits(back_fp[i]), Bits(Fp16ToFloat(fp[i])));
    }
    ExpectGuardIntact(back_bf, n);
    ExpectGuardIntact(back_fp, n);
  }
}

INSTANTIATE_TEST_SUITE_P(Isas, SimdTest,
                         ::testing::Values(Isa::kScalar, Isa::kAvx2, Isa::kAvx512),
                         [](const ::testing::TestParamInfo<Isa>& param_info) {
                           return std::string(IsaName(param_info.param));
                         });

TEST(SimdDispatchTest, ScalarIsAlwaysAvailable) {
  ASSERT_NE(ForIsa(Isa::kScalar), nullptr);
  EXPECT_EQ(ForIsa(Isa::kScalar), &ScalarKernels());
}

TEST(SimdDispatchTest, ForIsaReturnsTheMatchingTable) {
  for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512}) {
    if (const Kernels* k = ForIsa(isa)) {
      EXPECT_EQ(k->isa, isa);
    } else {
      std::printf("[ note ] %s is not available on this CPU\n", IsaName(isa));
    }
  }
}

}  // namespace
}  // namespace kvr::simd
