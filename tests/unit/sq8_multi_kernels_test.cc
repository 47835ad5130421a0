// The multi-query SQ8 kernels (common/simd/sq8_kernels.h: scan_sq8_multi,
// select_ge; session 26, issue 17 item 3): every table this CPU runs is
// bit-exact against the scalar oracle and against a plain int64 sum, for
// 1..19 queries (more than kSq8MaxMultiQueries included), d not a multiple
// of 4/16/32/64, key counts not a multiple of the block, extreme codes and
// queries, strides wider than the data; select_ge at INT32_MIN / INT32_MAX
// and counts not a multiple of the vector width.
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "common/simd/sq8_kernels.h"
#include "gtest/gtest.h"

namespace kvr::simd {
namespace {

enum class Fill { kRandom, kMaxProducts, kMinProducts, kAlternating };

uint8_t Code(Fill f, size_t i, std::mt19937& rng) {
  switch (f) {
    case Fill::kRandom:
      return static_cast<uint8_t>(rng());
    case Fill::kMaxProducts:
    case Fill::kMinProducts:
      return 255;
    case Fill::kAlternating:
      return (i % 2) ? 255 : 0;
  }
  return 0;
}

int8_t QueryByte(Fill f, size_t t, size_t j, std::mt19937& rng) {
  switch (f) {
    case Fill::kRandom:
      return static_cast<int8_t>(static_cast<int>(rng() % 256) - 128);
    case Fill::kMaxProducts:
      return 127;
    case Fill::kMinProducts:
      return -128;
    case Fill::kAlternating:
      return ((j + t) % 3 == 0) ? -128 : 127;
  }
  return 0;
}

TEST(Sq8MultiKernelsTest, EveryTableMatchesTheOracle) {
  const Sq8Kernels* tables[3];
  const size_t ntables = AvailableSq8(tables, 3);
  ASSERT_GE(ntables, 1u);
  std::printf("tables:");
  for (size_t t = 0; t < ntables; ++t) std::printf(" %s", tables[t]->name);
  std::printf("\n");
  std::mt19937 rng(11);
  const size_t dims[] = {1, 3, 4, 5, 17, 31, 33, 63, 64, 65, 127, 128, 129, 200};
  const size_t counts[] = {1, 15, 16, 17, 31, 33, 70};
  const size_t nqs[] = {1, 2, 3, 4, 5, 7, 8, 9, 16, 19};
  const Fill fills[] = {Fill::kRandom, Fill::kMaxProducts, Fill::kMinProducts,
                        Fill::kAlternating};
  int checked = 0;
  for (size_t d : dims) {
    const size_t dpad = Sq8PaddedDim(d);
    for (size_t n : counts) {
      for (Fill fill : fills) {
        const size_t nblocks = (n + kSq8Block - 1) / kSq8Block;
        std::vector<uint8_t> codes(n * d);
        for (size_t i = 0; i < codes.size(); ++i) codes[i] = Code(fill, i, rng);
        // Blocked layout, padding bytes random (the padded query entries are 0).
        std::vector<uint8_t> blocks(nblocks * Sq8BlockBytes(dpad));
        for (auto& b : blocks) b = static_cast<uint8_t>(rng());
        for (size_t i = 0; i < n; ++i) {
          for (size_t j = 0; j < d; ++j) blocks[Sq8BlockOffset(i, j, dpad)] = codes[i * d + j];
        }
        for (size_t nq : nqs) {
          // Strides wider than the data: the gaps hold garbage the kernels
          // must neither read as query bytes nor overwrite.
          const size_t q_stride = dpad + 8;
          const size_t out_stride = nblocks * kSq8Block + 5;
          std::vector<int8_t> q(nq * q_stride);
          for (auto& b : q) b = static_cast<int8_t>(rng());
          for (size_t t = 0; t < nq; ++t) {
            for (size_t j = 0; j < dpad; ++j) {
              q[t * q_stride + j] = j < d ? QueryByte(fill, t, j, rng) : int8_t{0};
            }
          }
          std::vector<int64_t> want(nq * n);
          for (size_t t = 0; t < nq; ++t) {
            for (size_t i = 0; i < n; ++i) {
              int64_t s = 0;
              for (size_t j = 0; j < d; ++j) {
                s += int64_t{codes[i * d + j]} * int64_t{q[t * q_stride + j]};
              }
              want[t * n + i] = s;
            }
          }
          for (size_t tb = 0; tb < ntables; ++tb) {
            SCOPED_TRACE(testing::Message() << tables[tb]->name << " d=" << d << " n=" << n
                                            << " nq=" << nq << " fill=" << static_cast<int>(fill));
            constexpr int32_t kSentinel = 0x5A5A5A5A;
            std::vector<int32_t> out(nq * out_stride, kSentinel);
            tables[tb]->scan_sq8_multi(q.data(), q_stride, nq, blocks.data(), nblocks, dpad,
                                       out.data(), out_stride);
            for (size_t t = 0; t < nq; ++t) {
              for (size_t i = 0; i < n; ++i) {
                ASSERT_EQ(int64_t{out[t * out_stride + i]}, want[t * n + i])
                    << "query " << t << " key " << i;
                ++checked;
              }
              for (size_t i = nblocks * kSq8Block; i < out_stride; ++i) {
                ASSERT_EQ(out[t * out_stride + i], kSentinel) << "wrote past the blocks";
              }
            }
          }
        }
      }
    }
  }
  EXPECT_GT(checked, 100000);
}

// The largest dimension and the most queries the kernels promise: all
// maximal products, no wrapping, every query's accumulator its own.
TEST(Sq8MultiKernelsTest, LargestDimensionEveryQueryExact) {
  const size_t d = kMaxSq8Dim;
  std::vector<uint8_t> blocks(2 * Sq8BlockBytes(d), 255);
  std::vector<int8_t> q(kSq8MaxMultiQueries * d);
  for (size_t t = 0; t < kSq8MaxMultiQueries; ++t) {
    for (size_t j = 0; j < d; ++j) q[t * d + j] = (t % 2 == 0) ? int8_t{-128} : int8_t{127};
  }
  const Sq8Kernels* tables[3];
  const size_t ntables = AvailableSq8(tables, 3);
  for (size_t tb = 0; tb < ntables; ++tb) {
    std::vector<int32_t> out(kSq8MaxMultiQueries * 2 * kSq8Block);
    tables[tb]->scan_sq8_multi(q.data(), d, kSq8MaxMultiQueries, blocks.data(), 2, d, out.data(),
                               2 * kSq8Block);
    for (size_t t = 0; t < kSq8MaxMultiQueries; ++t) {
      const int64_t want = (t % 2 == 0 ? -128 : 127) * int64_t{255} * int64_t(d);
      for (size_t i = 0; i < 2 * kSq8Block; ++i) {
        ASSERT_EQ(int64_t{out[t * 2 * kSq8Block + i]}, want) << tables[tb]->name << " query " << t;
      }
    }
  }
}

TEST(Sq8MultiKernelsTest, SelectGeMatchesTheOracle) {
  const Sq8Kernels* tables[3];
  const size_t ntables = AvailableSq8(tables, 3);
  std::mt19937 rng(5);
  constexpr int32_t kMin = std::numeric_limits<int32_t>::min();
  constexpr int32_t kMax = std::numeric_limits<int32_t>::max();
  const size_t counts[] = {0, 1, 7, 8, 9, 15, 16, 17, 31, 33, 512, 515};
  const int32_t thresholds[] = {kMin, kMin + 1, -1, 0, 1, 1000, kMax - 1, kMax};
  int checked = 0;
  for (size_t n : counts) {
    std::vector<int32_t> v(n);
    for (size_t i = 0; i < n; ++i) {
      switch (rng() % 5) {
        case 0: v[i] = kMin; break;
        case 1: v[i] = kMax; break;
        case 2: v[i] = static_cast<int32_t>(rng() % 3) - 1; break;
        case 3: v[i] = 1000 + static_cast<int32_t>(rng() % 3) - 1; break;
        default: v[i] = static_cast<int32_t>(rng()); break;
      }
    }
    for (int32_t t : thresholds) {
      std::vector<uint32_t> want;
      for (size_t i = 0; i < n; ++i) {
        if (v[i] >= t) want.push_back(static_cast<uint32_t>(i));
      }
      for (size_t tb = 0; tb < ntables; ++tb) {
        SCOPED_TRACE(testing::Message() << tables[tb]->name << " n=" << n << " t=" << t);
        std::vector<uint32_t> idx(n + 1, 0xFFFFFFFFu);
        const size_t m = tables[tb]->select_ge(v.data(), n, t, idx.data());
        ASSERT_EQ(m, want.size());
        for (size_t i = 0; i < m; ++i) ASSERT_EQ(idx[i], want[i]);
        ASSERT_EQ(idx[n], 0xFFFFFFFFu) << "wrote past n";
        ++checked;
      }
    }
  }
  EXPECT_GT(checked, 90);
}

}  // namespace
}  // namespace kvr::simd
