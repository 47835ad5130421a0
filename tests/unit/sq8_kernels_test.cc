// SQ8 kernels (common/simd/sq8_kernels.h): every table this CPU runs is
// bit-exact against the scalar oracle and against a plain int64 sum, on
// random and adversarial inputs (extreme codes 0/255 and queries -128/127,
// zero vectors, d not a multiple of 4/16/64, one and many blocks).
#include <cstdint>
#include <random>
#include <vector>

#include "common/simd/sq8_kernels.h"
#include "gtest/gtest.h"

namespace kvr::simd {
namespace {

enum class Fill { kRandom, kMaxProducts, kMinProducts, kZeroCodes, kZeroQuery, kAlternating };

struct Case {
  std::vector<uint8_t> codes;  // n x d, row-major
  std::vector<int8_t> query;   // d
};

Case Make(size_t n, size_t d, Fill fill, std::mt19937& rng) {
  Case c;
  c.codes.resize(n * d);
  c.query.resize(d);
  std::uniform_int_distribution<int> u8(0, 255), s8(-128, 127);
  for (size_t i = 0; i < n * d; ++i) {
    switch (fill) {
      case Fill::kRandom:
      case Fill::kZeroQuery:
        c.codes[i] = static_cast<uint8_t>(u8(rng));
        break;
      case Fill::kMaxProducts:
      case Fill::kMinProducts:
        c.codes[i] = 255;
        break;
      case Fill::kZeroCodes:
        c.codes[i] = 0;
        break;
      case Fill::kAlternating:
        c.codes[i] = (i % 2) ? 255 : 0;
        break;
    }
  }
  for (size_t j = 0; j < d; ++j) {
    switch (fill) {
      case Fill::kRandom:
      case Fill::kZeroCodes:
        c.query[j] = static_cast<int8_t>(s8(rng));
        break;
      case Fill::kMaxProducts:
        c.query[j] = 127;
        break;
      case Fill::kMinProducts:
        c.query[j] = -128;
        break;
      case Fill::kZeroQuery:
        c.query[j] = 0;
        break;
      case Fill::kAlternating:
        c.query[j] = (j % 3 == 0) ? -128 : 127;
        break;
    }
  }
  return c;
}

int64_t Oracle(const uint8_t* a, const int8_t* b, size_t d) {
  int64_t s = 0;
  for (size_t j = 0; j < d; ++j) s += int64_t{a[j]} * int64_t{b[j]};
  return s;
}

TEST(Sq8KernelsTest, EveryTableMatchesTheOracle) {
  const Sq8Kernels* tables[3];
  const size_t ntables = AvailableSq8(tables, 3);
  ASSERT_GE(ntables, 1u);
  EXPECT_STREQ(tables[0]->name, "scalar");
  std::mt19937 rng(7);
  const size_t dims[] = {1, 3, 4, 5, 15, 16, 17, 63, 64, 65, 127, 128, 129, 200, 4096};
  const size_t counts[] = {1, 15, 16, 17, 33, 70};
  const Fill fills[] = {Fill::kRandom,    Fill::kMaxProducts, Fill::kMinProducts,
                        Fill::kZeroCodes, Fill::kZeroQuery,   Fill::kAlternating};
  int checked = 0;
  for (size_t d : dims) {
    const size_t dpad = Sq8PaddedDim(d);
    for (size_t n : counts) {
      if (d == 4096 && n > 17) continue;  // bound the test's time
      for (Fill fill : fills) {
        const Case c = Make(n, d, fill, rng);
        // Blocked layout, padding bytes random (the padded query entries are 0).
        const size_t nblocks = (n + kSq8Block - 1) / kSq8Block;
        std::vector<uint8_t> blocks(nblocks * Sq8BlockBytes(dpad));
        for (auto& b : blocks) b = static_cast<uint8_t>(rng());
        for (size_t i = 0; i < n; ++i) {
          for (size_t j = 0; j < d; ++j) blocks[Sq8BlockOffset(i, j, dpad)] = c.codes[i * d + j];
        }
        std::vector<int8_t> qpad(dpad, 0);
        std::copy(c.query.begin(), c.query.end(), qpad.begin());
        for (size_t t = 0; t < ntables; ++t) {
          SCOPED_TRACE(testing::Message() << tables[t]->name << " d=" << d << " n=" << n
                                          << " fill=" << static_cast<int>(fill));
          std::vector<int32_t> out(nblocks * kSq8Block, -1);
          tables[t]->scan_sq8(qpad.data(), blocks.data(), nblocks, dpad, out.data());
          for (size_t i = 0; i < n; ++i) {
            const int64_t want = Oracle(&c.codes[i * d], c.query.data(), d);
            ASSERT_EQ(int64_t{out[i]}, want) << "key " << i;
            ASSERT_EQ(int64_t{tables[t]->dot_i8(&c.codes[i * d], c.query.data(), d)}, want)
                << "dot_i8 key " << i;
            ++checked;
          }
        }
      }
    }
  }
  EXPECT_GT(checked, 1000);
}

// The largest dimension the kernels promise: all-maximal products sum
// without wrapping.
TEST(Sq8KernelsTest, LargestDimensionDoesNotOverflow) {
  const size_t d = kMaxSq8Dim;
  std::vector<uint8_t> blocks(Sq8BlockBytes(d), 255);
  std::vector<int8_t> q(d, -128);
  const Sq8Kernels* tables[3];
  const size_t ntables = AvailableSq8(tables, 3);
  for (size_t t = 0; t < ntables; ++t) {
    std::vector<int32_t> out(kSq8Block);
    tables[t]->scan_sq8(q.data(), blocks.data(), 1, d, out.data());
    for (int32_t v : out) EXPECT_EQ(int64_t{v}, -int64_t{255} * 128 * int64_t(d)) << tables[t]->name;
  }
}

}  // namespace
}  // namespace kvr::simd
