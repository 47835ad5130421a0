// The scalar fp16/bf16 conversions in common/half.h: the oracle for the SIMD
// ones, so they are checked against IEEE 754 facts here.
#include "common/half.h"

#include <cmath>
#include <cstdint>
#include <limits>

#include <gtest/gtest.h>

namespace kvr {
namespace {

bool IsFp16Nan(uint16_t h) { return (h & 0x7c00u) == 0x7c00u && (h & 0x3ffu) != 0; }
bool IsBf16Nan(uint16_t h) { return (h & 0x7f80u) == 0x7f80u && (h & 0x7fu) != 0; }

TEST(HalfTest, EveryFiniteFp16RoundTripsExactly) {
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const uint16_t x = static_cast<uint16_t>(h);
    if ((x & 0x7c00u) == 0x7c00u) continue;  // Inf / NaN
    const float f = Fp16ToFloat(x);
    ASSERT_TRUE(std::isfinite(f)) << std::hex << h;
    ASSERT_EQ(FloatToFp16(f), x) << "fp16 0x" << std::hex << h;
  }
}

TEST(HalfTest, EveryNonNanBf16RoundTripsExactly) {
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const uint16_t x = static_cast<uint16_t>(h);
    if (IsBf16Nan(x)) continue;
    ASSERT_EQ(FloatToBf16(Bf16ToFloat(x)), x) << "bf16 0x" << std::hex << h;
  }
}

TEST(HalfTest, Fp16ValuesMatchTheFormula) {
  // value = (-1)^s * 2^(e-15) * (1 + m/1024), subnormals 2^-14 * m/1024.
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const uint32_t e = (h >> 10) & 0x1f, m = h & 0x3ff;
    if (e == 0x1f) continue;
    const double mag = e == 0 ? std::ldexp(m / 1024.0, -14) : std::ldexp(1.0 + m / 1024.0, int(e) - 15);
    const double want = (h & 0x8000) ? -mag : mag;
    ASSERT_EQ(static_cast<double>(Fp16ToFloat(static_cast<uint16_t>(h))), want) << std::hex << h;
    ASSERT_EQ(std::signbit(Fp16ToFloat(static_cast<uint16_t>(h))), (h & 0x8000) != 0);
  }
}

TEST(HalfTest, Fp16Specials) {
  const float inf = std::numeric_limits<float>::infinity();
  EXPECT_EQ(Fp16ToFloat(0x7c00), inf);
  EXPECT_EQ(Fp16ToFloat(0xfc00), -inf);
  EXPECT_EQ(FloatToFp16(inf), 0x7c00);
  EXPECT_EQ(FloatToFp16(-inf), 0xfc00);
  EXPECT_EQ(FloatToFp16(0.0f), 0x0000);
  EXPECT_EQ(FloatToFp16(-0.0f), 0x8000);
  EXPECT_EQ(FloatToFp16(65504.0f), 0x7bff);                       // max finite
  EXPECT_EQ(FloatToFp16(std::nextafter(65520.0f, 0.0f)), 0x7bff);  // below halfway: stays
  EXPECT_EQ(FloatToFp16(65520.0f), 0x7c00);                       // halfway, odd max: to Inf
  EXPECT_EQ(FloatToFp16(1e30f), 0x7c00);
  EXPECT_EQ(FloatToFp16(std::ldexp(1.0f, -24)), 0x0001);         // smallest subnormal
  EXPECT_EQ(FloatToFp16(std::ldexp(1.0f, -25)), 0x0000);         // halfway to 0: even
  EXPECT_EQ(FloatToFp16(std::ldexp(1.5f, -25)), 0x0001);
  EXPECT_EQ(FloatToFp16(std::ldexp(3.0f, -25)), 0x0002);         // 1.5 ulp: to even
  EXPECT_EQ(FloatToFp16(std::ldexp(1.0f, -14)), 0x0400);         // smallest normal
  EXPECT_EQ(FloatToFp16(1.0f + std::ldexp(1.0f, -11)), 0x3c00);  // halfway: even
  EXPECT_EQ(FloatToFp16(1.0f + std::ldexp(3.0f, -11)), 0x3c02);  // halfway: even
  EXPECT_EQ(FloatToFp16(std::numeric_limits<float>::denorm_min()), 0x0000);
  EXPECT_EQ(FloatToFp16(-std::numeric_limits<float>::denorm_min()), 0x8000);
}

TEST(HalfTest, NansStayQuietNans) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  EXPECT_EQ(FloatToFp16(nan), 0x7e00);
  EXPECT_EQ(FloatToFp16(-nan), 0xfe00);
  // A signalling fp32 NaN whose payload lies only in the low bits must not
  // turn into Inf.
  EXPECT_EQ(FloatToFp16(BitsToFloat(0x7f800001u)), 0x7e00);
  EXPECT_TRUE(IsBf16Nan(FloatToBf16(BitsToFloat(0x7f800001u))));
  EXPECT_EQ(FloatToBf16(BitsToFloat(0x7f800001u)), 0x7fc0);
  EXPECT_EQ(FloatToBf16(BitsToFloat(0xffc00000u)), 0xffc0);
  // fp16 -> fp32 delivers a quiet NaN with the payload kept (IEEE 754, and
  // what F16C's vcvtph2ps does).
  EXPECT_EQ(FloatBits(Fp16ToFloat(0x7c01)), 0x7fc02000u);
  EXPECT_EQ(FloatBits(Fp16ToFloat(0xfd55)), 0xffeaa000u);
  EXPECT_EQ(FloatBits(Fp16ToFloat(0x7e00)), 0x7fc00000u);
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const uint16_t x = static_cast<uint16_t>(h);
    if (IsFp16Nan(x)) {
      ASSERT_TRUE(std::isnan(Fp16ToFloat(x)));
      ASSERT_TRUE(IsFp16Nan(FloatToFp16(Fp16ToFloat(x))));
    }
    if (IsBf16Nan(x)) {
      ASSERT_TRUE(IsBf16Nan(FloatToBf16(Bf16ToFloat(x))));
    }
  }
}

TEST(HalfTest, Bf16RoundsToNearestEven) {
  EXPECT_EQ(FloatToBf16(1.0f), 0x3f80);
  EXPECT_EQ(FloatToBf16(BitsToFloat(0x3f808000u)), 0x3f80);  // halfway, even below
  EXPECT_EQ(FloatToBf16(BitsToFloat(0x3f818000u)), 0x3f82);  // halfway, even above
  EXPECT_EQ(FloatToBf16(BitsToFloat(0x3f808001u)), 0x3f81);
  EXPECT_EQ(FloatToBf16(std::numeric_limits<float>::max()), 0x7f80);  // overflow to Inf
  EXPECT_EQ(FloatToBf16(-0.0f), 0x8000);
  EXPECT_EQ(FloatToBf16(BitsToFloat(0x00008000u)), 0x0000);  // subnormal halfway: even
  EXPECT_EQ(FloatToBf16(BitsToFloat(0x00018000u)), 0x0002);
}

}  // namespace
}  // namespace kvr
