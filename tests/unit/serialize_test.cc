// Blob envelope, index round trips, and corruption / truncation handling.
#include "common/serialize.h"

#include <gtest/gtest.h>

#include <random>
#include <string>
#include <vector>

#include "retrieval_node/index/flat_index.h"
#include "retrieval_node/index/ivf_index.h"

namespace kvr::index {
namespace {

Matrix RandomMatrix(size_t rows, size_t cols, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> g;
  Matrix m(rows, cols);
  for (float& x : m.data) x = g(rng);
  return m;
}

std::span<const uint8_t> Bytes(const std::string& s) {
  return {reinterpret_cast<const uint8_t*>(s.data()), s.size()};
}

TEST(SerializeTest, Crc32cKnownValues) {
  EXPECT_EQ(Crc32c(Bytes("123456789")), 0xE3069283u);
  EXPECT_EQ(Crc32c({}), 0u);
  const std::string long_text(1000, 'x');
  // Incremental equals one-shot (covers the 8-byte and tail paths).
  const uint32_t part = Crc32c(Bytes(long_text.substr(0, 333)));
  EXPECT_EQ(Crc32c(Bytes(long_text.substr(333)), part), Crc32c(Bytes(long_text)));
}

TEST(SerializeTest, ReaderReportsTruncationAndTrailingBytes) {
  BinaryWriter w;
  w.Put<uint32_t>(7);
  w.PutArray(std::span<const float>(std::vector<float>{1, 2, 3}));
  BinaryReader r(w.bytes(), "widget");
  uint32_t v = 0;
  ASSERT_TRUE(r.Get(&v, "count").ok());
  std::vector<float> arr;
  const auto limited = BinaryReader(std::span(w.bytes()).subspan(4), "widget")
                           .GetArray(&arr, "values", 2);
  EXPECT_EQ(limited.code(), absl::StatusCode::kDataLoss);
  ASSERT_TRUE(r.GetArray(&arr, "values", 10).ok());
  EXPECT_EQ(arr, (std::vector<float>{1, 2, 3}));
  EXPECT_TRUE(r.ExpectEnd().ok());
  uint64_t extra = 0;
  const auto t = r.Get(&extra, "extra");
  EXPECT_EQ(t.code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(t.message().find("widget"), std::string::npos) << t;
  EXPECT_NE(t.message().find("extra"), std::string::npos) << t;
  BinaryReader r2(w.bytes(), "widget");
  ASSERT_TRUE(r2.Get(&v, "count").ok());
  const auto e = r2.ExpectEnd();
  EXPECT_EQ(e.code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(e.message().find("20 unexpected trailing bytes"), std::string::npos) << e;
}

TEST(SerializeTest, SealOpenRoundTrip) {
  const std::vector<uint8_t> payload = {1, 2, 3, 4, 5};
  const auto blob = SealBlob(42, 7, payload);
  auto opened = OpenBlob(blob);
  ASSERT_TRUE(opened.ok());
  EXPECT_EQ(opened->kind, 42u);
  EXPECT_EQ(opened->version, 7u);
  EXPECT_EQ(std::vector<uint8_t>(opened->payload.begin(), opened->payload.end()), payload);
  auto bad = blob;
  bad.back() ^= 1;
  const auto s = OpenBlob(bad).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(s.message().find("checksum"), std::string::npos) << s;
}

void ExpectSameSearch(const KeyIndex& a, const KeyIndex& b, const SearchParams& p) {
  const Matrix q = RandomMatrix(7, a.dim(), 99);
  std::vector<int64_t> ia(7 * p.k), ib(7 * p.k);
  std::vector<float> sa(7 * p.k), sb(7 * p.k);
  ASSERT_TRUE(a.Search(q.view(), p, ia, sa).ok());
  ASSERT_TRUE(b.Search(q.view(), p, ib, sb).ok());
  EXPECT_EQ(ia, ib);
  EXPECT_EQ(sa, sb);
}

TEST(SerializeTest, FlatAndIvfRoundTrip) {
  const Matrix keys = RandomMatrix(2000, 24, 1);
  auto flat = FlatIndex::Create(24);
  ASSERT_TRUE(flat.ok());
  ASSERT_TRUE((*flat)->Add(keys.view()).ok());
  std::vector<uint8_t> blob;
  ASSERT_TRUE((*flat)->Serialize(&blob).ok());
  auto loaded = LoadIndex(blob);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ((*loaded)->type(), IndexType::kFlat);
  EXPECT_EQ((*loaded)->size(), 2000u);
  ExpectSameSearch(**flat, **loaded, {.k = 20});

  auto ivf = IvfIndex::Build(keys.view(), {.nlist = 32, .default_nprobe = 5}, nullptr);
  ASSERT_TRUE(ivf.ok());
  ASSERT_TRUE((*ivf)->Add(RandomMatrix(10, 24, 2).view()).ok());
  blob.clear();
  ASSERT_TRUE((*ivf)->Serialize(&blob).ok());
  auto ivf2 = LoadIndex(blob);
  ASSERT_TRUE(ivf2.ok()) << ivf2.status();
  EXPECT_EQ((*ivf2)->type(), IndexType::kIvf);
  EXPECT_EQ((*ivf2)->size(), 2010u);
  ExpectSameSearch(**ivf, **ivf2, {.k = 20});
  ExpectSameSearch(**ivf, **ivf2, {.k = 20, .nprobe = 32});
  EXPECT_EQ((*ivf)->keys().row(2005)[3], (*ivf2)->keys().row(2005)[3]);
}

std::vector<std::vector<uint8_t>> SmallBlobs() {
  const Matrix keys = RandomMatrix(6, 3, 5);
  std::vector<std::vector<uint8_t>> blobs(2);
  auto flat = FlatIndex::Create(3);
  KVR_CHECK((*flat)->Add(keys.view()).ok());
  KVR_CHECK((*flat)->Serialize(&blobs[0]).ok());
  auto ivf = IvfIndex::Build(keys.view(), {.nlist = 2, .default_nprobe = 1}, nullptr);
  KVR_CHECK(ivf.ok());
  KVR_CHECK((*ivf)->Serialize(&blobs[1]).ok());
  return blobs;
}

TEST(SerializeTest, EverySingleByteCorruptionIsRejected) {
  for (const auto& blob : SmallBlobs()) {
    ASSERT_TRUE(LoadIndex(blob).ok());
    for (size_t i = 0; i < blob.size(); ++i) {
      for (uint8_t mask : {0xffu, 0x01u, 0x80u}) {
        auto bad = blob;
        bad[i] ^= mask;
        const auto r = LoadIndex(bad);
        EXPECT_FALSE(r.ok()) << "byte " << i << " mask " << int(mask);
        if (!r.ok()) {
          EXPECT_TRUE(r.status().code() == absl::StatusCode::kDataLoss ||
                      r.status().code() == absl::StatusCode::kInvalidArgument)
              << r.status();
        }
      }
    }
  }
}

TEST(SerializeTest, EveryTruncationIsDataLoss) {
  for (const auto& blob : SmallBlobs()) {
    for (size_t len = 0; len < blob.size(); ++len) {
      const auto r = LoadIndex(std::span(blob).first(len));
      ASSERT_FALSE(r.ok()) << len;
      EXPECT_EQ(r.status().code(), absl::StatusCode::kDataLoss) << len << " " << r.status();
    }
  }
}

TEST(SerializeTest, HugeClaimedCountsAreRejected) {
  // Correctly sealed payloads (checksum valid) whose fields lie.
  {
    BinaryWriter w;
    w.Put<uint64_t>(4);                     // dim
    w.Put<uint64_t>(1000000000000ull);      // 10^12 keys
    w.Put<uint64_t>(4000000000000ull);      // keys array count
    const auto blob = SealBlob(kFlatBlobKind, 1, w.bytes());
    const auto r = LoadIndex(blob);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kDataLoss) << r.status();
  }
  {
    BinaryWriter w;
    w.Put<uint64_t>(4);
    w.Put<uint64_t>(1000);                  // plausible size, but no data follows
    w.Put<uint64_t>(4000);
    const auto blob = SealBlob(kFlatBlobKind, 1, w.bytes());
    const auto r = LoadIndex(blob);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kDataLoss) << r.status();
  }
  {
    BinaryWriter w;
    w.Put<uint64_t>(4);
    w.Put<uint64_t>(1ull << 40);            // size
    w.Put<uint64_t>(1ull << 39);            // nlist
    const auto blob = SealBlob(kIvfBlobKind, 1, w.bytes());
    const auto r = LoadIndex(blob);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kDataLoss) << r.status();
  }
  {
    // A blob header claiming a huge payload.
    auto blob = SealBlob(1, 1, std::vector<uint8_t>(8));
    const uint64_t huge = 1ull << 60;
    std::memcpy(blob.data() + 12, &huge, 8);
    EXPECT_EQ(OpenBlob(blob).status().code(), absl::StatusCode::kDataLoss);
  }
  {
    const auto blob = SealBlob(77, 1, std::vector<uint8_t>(8));
    EXPECT_EQ(LoadIndex(blob).status().code(), absl::StatusCode::kInvalidArgument);
    const auto v2 = SealBlob(kFlatBlobKind, 2, std::vector<uint8_t>(8));
    EXPECT_EQ(LoadIndex(v2).status().code(), absl::StatusCode::kInvalidArgument);
  }
}

}  // namespace
}  // namespace kvr::index
