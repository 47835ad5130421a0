// bench/decode_common: the /proc VmRSS parser decode_bench reports worker and
// node memory with, and the list-flag parser its --contexts / --batches use.
#include "bench/decode_common.h"

#include "gtest/gtest.h"

namespace kvr::bench {
namespace {

TEST(ParseVmRssBytes, PaddedSmallValue) {
  EXPECT_EQ(ParseVmRssBytes("Name:\tdecode_bench\nVmHWM:\t  600000 kB\nVmRSS:\t  538755 kB\n"),
            int64_t{538755} * 1024);
}

// Regression: at >= 8 digits of kB (RSS >= ~9.5 GiB: full attention at 32K x
// batch 16) no space follows the tab; splitting on ' ' alone read 0.
TEST(ParseVmRssBytes, EightDigitsAfterTab) {
  EXPECT_EQ(ParseVmRssBytes("VmPeak:\t13000000 kB\nVmRSS:\t12345678 kB\nThreads:\t3\n"),
            int64_t{12345678} * 1024);
}

TEST(ParseVmRssBytes, AbsentOrMalformed) {
  EXPECT_EQ(ParseVmRssBytes(""), 0);
  EXPECT_EQ(ParseVmRssBytes("VmHWM:\t100 kB\n"), 0);
  EXPECT_EQ(ParseVmRssBytes("VmRSS:\tlots kB\n"), 0);
  EXPECT_EQ(ParseVmRssBytes("VmRSS:\t100 MB\n"), 0);
  EXPECT_EQ(ParseVmRssBytes("VmRSS:\t-5 kB\n"), 0);
}

TEST(ParseIntList, BoundsNamed) {
  auto ok = ParseIntList("batches", "1,4,16", 1, 256);
  ASSERT_TRUE(ok.ok());
  EXPECT_EQ(*ok, (std::vector<int64_t>{1, 4, 16}));
  auto bad = ParseIntList("batches", "1,0", 1, 256);
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("--batches"), absl::string_view::npos);
  EXPECT_NE(bad.status().message().find("[1, 256]"), absl::string_view::npos);
  EXPECT_FALSE(ParseIntList("contexts", "4096,x", 1024, 1 << 20).ok());
  EXPECT_FALSE(ParseIntList("contexts", "", 1024, 1 << 20).ok());
}

}  // namespace
}  // namespace kvr::bench
