#include "tools/dataset_io.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace kvr {
namespace {

// gtest-only substring check (no gmock dependency).
::testing::AssertionResult Contains(const std::string& text, const std::string& part) {
  if (text.find(part) != std::string::npos) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "'" << text << "' does not contain '" << part << "'";
}

std::string TempPath(const std::string& name) {
  return ::testing::TempDir() + "/kvr_dataset_io_" + std::to_string(getpid()) + "_" + name;
}

void WriteBytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out.good()) << path;
}

std::string ReadBytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

std::string U32(uint32_t v) { return std::string(reinterpret_cast<const char*>(&v), 4); }

std::string Floats(const std::vector<float>& v) {
  return std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(float));
}

Matrix TestMatrix(size_t rows, size_t cols) {
  Matrix m(rows, cols);
  for (size_t i = 0; i < m.data.size(); ++i) {
    m.data[i] = static_cast<float>(std::sin(0.37 * static_cast<double>(i)) * 1e3);
  }
  if (!m.data.empty()) {
    m.data[0] = -0.0f;
    m.data.back() = std::numeric_limits<float>::denorm_min();
  }
  return m;
}

void ExpectSameBits(const Matrix& a, const Matrix& b) {
  ASSERT_EQ(a.rows, b.rows);
  ASSERT_EQ(a.cols, b.cols);
  ASSERT_EQ(a.data.size(), b.data.size());
  // memcmp's pointers must be non-null even for 0 bytes (UBSan): an empty
  // matrix's vector has none.
  if (a.data.empty()) return;
  EXPECT_EQ(0, std::memcmp(a.data.data(), b.data.data(), a.data.size() * sizeof(float)));
}

// np.save of np.array([[1, 2, 3], [4, 5, 6]], dtype='<f4') (NumPy 1.x, format
// v1.0): magic, version, header length 118 ('v'), the dict padded with spaces
// to a 64-byte boundary and ended by '\n', then the data. Written out by hand
// as the oracle for the reader and the writer.
const char kNumpyHeaderV1[] =
    "\x93NUMPY\x01\x00\x76\x00"
    "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }"
    "                                                          \n";
const char kNumpyData[] =
    "\x00\x00\x80\x3f\x00\x00\x00\x40\x00\x00\x40\x40"
    "\x00\x00\x80\x40\x00\x00\xa0\x40\x00\x00\xc0\x40";

std::string NumpyFile() {
  return std::string(kNumpyHeaderV1, sizeof(kNumpyHeaderV1) - 1) +
         std::string(kNumpyData, sizeof(kNumpyData) - 1);
}

// A .npy with `dict` as its header text (v1.0, padded to 64 bytes).
std::string NpyWithHeader(const std::string& dict, const std::string& payload,
                          char major = 1) {
  std::string text = dict;
  const size_t prefix = major == 1 ? 10 : 12;
  while ((prefix + text.size() + 1) % 64 != 0) text.push_back(' ');
  text.push_back('\n');
  std::string out = "\x93NUMPY";
  out.push_back(major);
  out.push_back('\0');
  const uint32_t len = static_cast<uint32_t>(text.size());
  out.push_back(static_cast<char>(len & 0xff));
  out.push_back(static_cast<char>((len >> 8) & 0xff));
  if (major != 1) {
    out.push_back(static_cast<char>((len >> 16) & 0xff));
    out.push_back(static_cast<char>((len >> 24) & 0xff));
  }
  return out + text + payload;
}

TEST(DatasetIo, NumpyOracleIsReadExactly) {
  ASSERT_EQ(NumpyFile().size(), 128u + 24u);
  const std::string path = TempPath("oracle.npy");
  WriteBytes(path, NumpyFile());
  absl::StatusOr<Matrix> m = ReadMatrixFile(path);
  ASSERT_TRUE(m.ok()) << m.status();
  ASSERT_EQ(m->rows, 2u);
  ASSERT_EQ(m->cols, 3u);
  EXPECT_EQ(m->data, (std::vector<float>{1, 2, 3, 4, 5, 6}));
}

TEST(DatasetIo, WriterProducesNumpyBytes) {
  Matrix m(2, 3);
  m.data = {1, 2, 3, 4, 5, 6};
  const std::string path = TempPath("writer.npy");
  ASSERT_TRUE(WriteMatrixFile(path, m.view()).ok());
  EXPECT_EQ(ReadBytes(path), NumpyFile());
}

TEST(DatasetIo, NumpyHeaderVariantsParse) {
  const std::string payload = std::string(kNumpyData, sizeof(kNumpyData) - 1);
  const std::vector<std::string> dicts = {
      // No trailing comma, no spaces, double quotes, keys reordered.
      "{\"shape\":(2,3),\"descr\":\"<f4\",\"fortran_order\":False}",
      "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3,), }",
      "{'descr': '<f4', 'fortran_order': False, 'shape': (2L, 3L), }",
  };
  for (const std::string& dict : dicts) {
    for (char major : {1, 2, 3}) {
      const std::string path = TempPath("variant.npy");
      WriteBytes(path, NpyWithHeader(dict, payload, major));
      absl::StatusOr<Matrix> m = ReadNpyMatrix(path);
      ASSERT_TRUE(m.ok()) << dict << " v" << int{major} << ": " << m.status();
      EXPECT_EQ(m->data, (std::vector<float>{1, 2, 3, 4, 5, 6}));
    }
  }
}

TEST(DatasetIo, RoundTripBothFormats) {
  for (const char* ext : {".fbin", ".npy"}) {
    for (auto [rows, cols] : {std::pair<size_t, size_t>{7, 5}, {1, 128}, {0, 3}, {300, 1}}) {
      const Matrix m = TestMatrix(rows, cols);
      const std::string path = TempPath(std::string("roundtrip") + ext);
      ASSERT_TRUE(WriteMatrixFile(path, m.view()).ok()) << path;
      absl::StatusOr<Matrix> back = ReadMatrixFile(path);
      ASSERT_TRUE(back.ok()) << back.status();
      ExpectSameBits(m, *back);
    }
  }
}

TEST(DatasetIo, FbinLayout) {
  Matrix m(2, 3);
  m.data = {1, 2, 3, 4, 5, 6};
  const std::string path = TempPath("layout.fbin");
  ASSERT_TRUE(WriteMatrixFile(path, m.view()).ok());
  EXPECT_EQ(ReadBytes(path), U32(2) + U32(3) + Floats(m.data));
}

TEST(DatasetIo, StridedViewIsWrittenDensely) {
  const Matrix big = TestMatrix(6, 10);
  const ConstMatrixView block = big.view().rows_slice(1, 4).cols_slice(2, 5);
  Matrix expected(4, 5);
  for (size_t i = 0; i < 4; ++i) {
    for (size_t j = 0; j < 5; ++j) expected.row(i)[j] = block.at(i, j);
  }
  for (const char* ext : {".fbin", ".npy"}) {
    const std::string path = TempPath(std::string("strided") + ext);
    ASSERT_TRUE(WriteMatrixFile(path, block).ok());
    absl::StatusOr<Matrix> back = ReadMatrixFile(path);
    ASSERT_TRUE(back.ok()) << back.status();
    ExpectSameBits(expected, *back);
  }
}

TEST(DatasetIo, IdMatrixRoundTrip) {
  IdMatrix ids(3, 4);
  for (size_t i = 0; i < ids.data.size(); ++i) ids.data[i] = static_cast<int32_t>(i * 1000003 % 77) - 5;
  for (const char* ext : {".ibin", ".npy"}) {
    const std::string path = TempPath(std::string("ids") + ext);
    ASSERT_TRUE(WriteIdMatrixFile(path, ids).ok());
    absl::StatusOr<IdMatrix> back = ReadIdMatrixFile(path);
    ASSERT_TRUE(back.ok()) << back.status();
    EXPECT_EQ(back->rows, 3u);
    EXPECT_EQ(back->cols, 4u);
    EXPECT_EQ(back->data, ids.data);
  }
}

TEST(DatasetIo, Int64NpyIdsAreNarrowedWithRangeCheck) {
  std::vector<int64_t> wide = {1, -2, 3, 2147483647};
  std::string payload(reinterpret_cast<const char*>(wide.data()), wide.size() * 8);
  const std::string path = TempPath("ids64.npy");
  WriteBytes(path, NpyWithHeader("{'descr': '<i8', 'fortran_order': False, 'shape': (2, 2), }",
                                 payload));
  absl::StatusOr<IdMatrix> ids = ReadIdMatrixFile(path);
  ASSERT_TRUE(ids.ok()) << ids.status();
  EXPECT_EQ(ids->data, (std::vector<int32_t>{1, -2, 3, 2147483647}));

  wide[3] = int64_t{1} << 40;
  payload.assign(reinterpret_cast<const char*>(wide.data()), wide.size() * 8);
  WriteBytes(path, NpyWithHeader("{'descr': '<i8', 'fortran_order': False, 'shape': (2, 2), }",
                                 payload));
  ids = ReadIdMatrixFile(path);
  ASSERT_FALSE(ids.ok());
  EXPECT_EQ(ids.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(std::string(ids.status().message()), "does not fit in int32"));
}

struct BadFile {
  const char* name;   // test case label and file name (extension matters)
  std::string bytes;  // file contents
  absl::StatusCode code;
  const char* problem;  // expected substring of the message
};

std::vector<BadFile> BadFiles() {
  const std::string six = Floats({1, 2, 3, 4, 5, 6});
  auto npy = [&](const std::string& dict, const std::string& payload) {
    return NpyWithHeader(dict, payload);
  };
  const std::string good_dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }";
  std::string huge_len = NumpyFile();
  huge_len[6] = 2;  // v2.0 with a 4-byte length read from header bytes: absurd
  std::string bad_version = NumpyFile();
  bad_version[6] = 4;
  return {
      {"empty.fbin", "", absl::StatusCode::kDataLoss, "truncated header"},
      {"short_header.fbin", U32(2).substr(0, 3), absl::StatusCode::kDataLoss, "truncated header"},
      {"short_data.fbin", U32(2) + U32(3) + Floats({1, 2, 3, 4, 5}), absl::StatusCode::kDataLoss,
       "truncated data"},
      {"trailing.fbin", U32(2) + U32(3) + six + "x", absl::StatusCode::kDataLoss,
       "trailing bytes"},
      {"lies.fbin", U32(1000) + U32(3) + six, absl::StatusCode::kDataLoss, "truncated data"},
      {"zero_cols.fbin", U32(5) + U32(0), absl::StatusCode::kInvalidArgument, "0 columns"},
      {"overflow.fbin", U32(0xffffffffu) + U32(0xffffffffu) + six,
       absl::StatusCode::kInvalidArgument, "overflows"},
      {"empty.npy", "", absl::StatusCode::kDataLoss, "truncated .npy preamble"},
      {"magic.npy", "\x93NUMPZ\x01\x00\x10\x00" + std::string(16, ' '),
       absl::StatusCode::kInvalidArgument, "bad magic"},
      {"version.npy", bad_version, absl::StatusCode::kInvalidArgument, "unsupported .npy version"},
      {"huge_header.npy", huge_len, absl::StatusCode::kInvalidArgument, "exceeds the limit"},
      {"short_header.npy", NumpyFile().substr(0, 60), absl::StatusCode::kDataLoss,
       "truncated .npy header"},
      {"short_data.npy", NumpyFile().substr(0, NumpyFile().size() - 1),
       absl::StatusCode::kDataLoss, "truncated data"},
      {"trailing.npy", NumpyFile() + "abcd", absl::StatusCode::kDataLoss, "trailing bytes"},
      {"lies.npy", npy("{'descr': '<f4', 'fortran_order': False, 'shape': (100, 3), }", six),
       absl::StatusCode::kDataLoss, "truncated data"},
      {"f8.npy", npy("{'descr': '<f8', 'fortran_order': False, 'shape': (2, 3), }", six + six),
       absl::StatusCode::kInvalidArgument, "dtype '<f8'"},
      {"big_endian.npy", npy("{'descr': '>f4', 'fortran_order': False, 'shape': (2, 3), }", six),
       absl::StatusCode::kInvalidArgument, "dtype '>f4'"},
      {"fortran.npy", npy("{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), }", six),
       absl::StatusCode::kInvalidArgument, "fortran_order"},
      {"three_dims.npy",
       npy("{'descr': '<f4', 'fortran_order': False, 'shape': (1, 2, 3), }", six),
       absl::StatusCode::kInvalidArgument, "2-D"},
      {"one_dim.npy", npy("{'descr': '<f4', 'fortran_order': False, 'shape': (6,), }", six),
       absl::StatusCode::kInvalidArgument, "2-D"},
      {"scalar.npy", npy("{'descr': '<f4', 'fortran_order': False, 'shape': (), }", six),
       absl::StatusCode::kInvalidArgument, "2-D"},
      {"zero_cols.npy", npy("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 0), }", ""),
       absl::StatusCode::kInvalidArgument, "0 columns"},
      {"overflow.npy",
       npy("{'descr': '<f4', 'fortran_order': False, 'shape': (4294967296, 4294967296), }", six),
       absl::StatusCode::kInvalidArgument, "overflows"},
      {"digits.npy",
       npy("{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999, 3), }", six),
       absl::StatusCode::kInvalidArgument, "64 bits"},
      {"extra_key.npy",
       npy("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), 'x': 1, }", six),
       absl::StatusCode::kInvalidArgument, "unexpected key 'x'"},
      {"missing_key.npy", npy("{'descr': '<f4', 'shape': (2, 3), }", six),
       absl::StatusCode::kInvalidArgument, "missing key 'fortran_order'"},
      {"duplicate_key.npy",
       npy("{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }", six),
       absl::StatusCode::kInvalidArgument, "duplicate key"},
      {"bad_shape.npy", npy("{'descr': '<f4', 'fortran_order': False, 'shape': (2 3), }", six),
       absl::StatusCode::kInvalidArgument, "malformed .npy header"},
      {"negative.npy", npy("{'descr': '<f4', 'fortran_order': False, 'shape': (-2, 3), }", six),
       absl::StatusCode::kInvalidArgument, "malformed .npy header"},
      {"bad_bool.npy", npy("{'descr': '<f4', 'fortran_order': 0, 'shape': (2, 3), }", six),
       absl::StatusCode::kInvalidArgument, "True or False"},
      {"junk_after.npy", npy(good_dict + " junk", six), absl::StatusCode::kInvalidArgument,
       "after the header dictionary"},
      {"not_dict.npy", npy("['descr', '<f4']", six), absl::StatusCode::kInvalidArgument,
       "expected '{'"},
      {"unterminated.npy", npy("{'descr: '<f4', 'fortran_order': False, 'shape': (2, 3), }", six),
       absl::StatusCode::kInvalidArgument, "malformed .npy header"},
      {"matrix.txt", six, absl::StatusCode::kInvalidArgument, "unsupported extension"},
  };
}

TEST(DatasetIo, BadFilesAreRejectedNamingFileAndProblem) {
  for (const BadFile& bad : BadFiles()) {
    SCOPED_TRACE(bad.name);
    const std::string path = TempPath(bad.name);
    WriteBytes(path, bad.bytes);
    absl::StatusOr<Matrix> m = ReadMatrixFile(path);
    ASSERT_FALSE(m.ok());
    EXPECT_EQ(m.status().code(), bad.code) << m.status();
    EXPECT_TRUE(Contains(std::string(m.status().message()), path));
    EXPECT_TRUE(Contains(std::string(m.status().message()), bad.problem));
  }
}

TEST(DatasetIo, BadIdFilesAreRejected) {
  const std::string path = TempPath("short.ibin");
  WriteBytes(path, U32(4) + U32(4) + U32(1));
  absl::StatusOr<IdMatrix> ids = ReadIdMatrixFile(path);
  ASSERT_FALSE(ids.ok());
  EXPECT_EQ(ids.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_TRUE(Contains(std::string(ids.status().message()), path));

  const std::string f4 = TempPath("f4_ids.npy");
  WriteBytes(f4, NumpyFile());
  ids = ReadIdMatrixFile(f4);
  ASSERT_FALSE(ids.ok());
  EXPECT_TRUE(Contains(std::string(ids.status().message()), "dtype '<f4'"));

  ids = ReadIdMatrixFile(TempPath("ids.fbin"));
  ASSERT_FALSE(ids.ok());
  EXPECT_TRUE(Contains(std::string(ids.status().message()), "unsupported extension"));
}

TEST(DatasetIo, MissingFileIsNotFound) {
  const std::string path = TempPath("does_not_exist.fbin");
  absl::StatusOr<Matrix> m = ReadMatrixFile(path);
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(Contains(std::string(m.status().message()), path));
}

TEST(DatasetIo, DirectoryIsNotAFile) {
  const std::string path = ::testing::TempDir() + "/kvr_dataset_io_dir.npy";
  ::mkdir(path.c_str(), 0700);
  absl::StatusOr<Matrix> m = ReadMatrixFile(path);
  ASSERT_FALSE(m.ok());
  EXPECT_TRUE(Contains(std::string(m.status().message()), path));
}

TEST(DatasetIo, WriteErrorsNameTheFile) {
  const Matrix m = TestMatrix(2, 2);
  const std::string no_dir = TempPath("no/such/dir/x.fbin");
  absl::Status s = WriteMatrixFile(no_dir, m.view());
  ASSERT_FALSE(s.ok());
  EXPECT_TRUE(Contains(std::string(s.message()), no_dir));

  s = WriteMatrixFile(TempPath("x.csv"), m.view());
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(std::string(s.message()), "unsupported extension"));

  Matrix empty_cols(3, 0);
  s = WriteMatrixFile(TempPath("zero.npy"), empty_cols.view());
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
}

TEST(DatasetIo, FailedWriteLeavesNoFileBehind) {
  // The final rename fails because the target is a directory: the temporary
  // file must be cleaned up and the error must name the target.
  const std::string path = TempPath("is_a_dir.fbin");
  ::mkdir(path.c_str(), 0700);
  const Matrix m = TestMatrix(4, 4);
  const absl::Status s = WriteMatrixFile(path, m.view());
  ASSERT_FALSE(s.ok());
  EXPECT_TRUE(Contains(std::string(s.message()), path));
  EXPECT_FALSE(std::ifstream(path + ".tmp").good());
}

}  // namespace
}  // namespace kvr
