// Model-side pieces of the decode worker: config validation, the llama2.c
// checkpoint loader (including corrupted files), random weights, and the
// llama2.c tokenizer against hand-derived ids.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <unistd.h>

#include "tests/support/models.h"
#include "gpu_worker/model/bundled_model.h"
#include "gpu_worker/model/llama2c_loader.h"
#include "gpu_worker/model/llama2c_tokenizer.h"
#include "gpu_worker/model/model_config.h"
#include "gpu_worker/model/random_weights.h"
#include "gtest/gtest.h"

namespace kvr::worker {
namespace {

std::vector<char> ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<char>((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

std::string WriteTemp(const std::string& name, const std::vector<char>& bytes) {
  const std::string path = ::testing::TempDir() + "/kvr_worker_" + name;
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  return path;
}

// ---------------------------------------------------------------- config --

TEST(LlamaConfigTest, ValidateNamesTheField) {
  LlamaConfig c{};
  c.dim = 64;
  c.hidden_dim = 172;
  c.n_layers = 5;
  c.n_heads = 8;
  c.n_kv_heads = 4;
  c.head_dim = 8;
  c.vocab_size = 512;
  c.seq_len = 512;
  EXPECT_TRUE(c.Validate().ok()) << c.Validate();
  auto broken = [&](auto mutate, const char* field) {
    LlamaConfig b = c;
    mutate(b);
    const absl::Status s = b.Validate();
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << field;
    EXPECT_NE(s.message().find(field), std::string::npos) << s;
  };
  broken([](LlamaConfig& b) { b.dim = -1; }, "dim");
  broken([](LlamaConfig& b) { b.n_kv_heads = 3; }, "n_kv_heads");
  broken([](LlamaConfig& b) { b.n_kv_heads = 16; }, "n_kv_heads");
  broken([](LlamaConfig& b) { b.head_dim = 7; }, "head_dim");
  broken([](LlamaConfig& b) { b.vocab_size = 0; }, "vocab_size");
  broken([](LlamaConfig& b) { b.seq_len = 1 << 30; }, "seq_len");
  broken([](LlamaConfig& b) { b.rope_theta = 0; }, "rope_theta");
  broken([](LlamaConfig& b) { b.rope_scaling = RopeScaling{0.5f, 1, 4, 8192}; }, "rope_scaling");
}

TEST(LlamaConfigTest, Llama3ShapesAndRope) {
  const LlamaConfig c = Llama3_8BConfig();
  ASSERT_TRUE(c.Validate().ok());
  EXPECT_EQ(c.ParameterCount(), 8030261248);  // Meta-Llama-3-8B
  EXPECT_EQ(c.KvBytesPerToken(), 2 * 32 * 1024 * 4);
  const std::vector<float> base = c.RopeInvFreq();
  ASSERT_EQ(base.size(), 64u);
  EXPECT_FLOAT_EQ(base[0], 1.0f);
  EXPECT_NEAR(base[32], std::pow(500000.0, -0.5), 1e-9);
  // Llama 3.1 scaling: high frequencies untouched, the lowest divided by 8.
  const std::vector<float> scaled = Llama31_8BConfig().RopeInvFreq();
  EXPECT_EQ(scaled[0], base[0]);
  EXPECT_NEAR(scaled[63], base[63] / 8.0f, 1e-12);
  for (size_t k = 0; k < base.size(); ++k) {
    EXPECT_LE(scaled[k], base[k]);
    EXPECT_GE(scaled[k], base[k] / 8.0f * 0.999f);
  }
}

// ---------------------------------------------------------------- loader --

TEST(Llama2cLoaderTest, LoadsStories260K) {
  const std::string path = test_support::BundledModelPath("stories260K.bin");
  ASSERT_FALSE(path.empty());
  auto w = LoadLlama2c(path);
  ASSERT_TRUE(w.ok()) << w.status();
  const LlamaConfig& c = (*w)->config;
  EXPECT_EQ(c.dim, 64);
  EXPECT_EQ(c.hidden_dim, 172);
  EXPECT_EQ(c.n_layers, 5);
  EXPECT_EQ(c.n_heads, 8);
  EXPECT_EQ(c.n_kv_heads, 4);
  EXPECT_EQ(c.head_dim, 8);
  EXPECT_EQ(c.vocab_size, 512);
  EXPECT_EQ(c.seq_len, 512);
  EXPECT_TRUE(c.tied_embeddings);
  EXPECT_EQ((*w)->classifier.data, (*w)->token_embedding.data);
  // The first embedding float sits right after the 28-byte header.
  const std::vector<char> raw = ReadAll(path);
  float first;
  std::memcpy(&first, raw.data() + 28, 4);
  EXPECT_EQ((*w)->token_embedding.f32()[0], first);
  // The final norm is the last section before the two freq_cis tables.
  const size_t final_norm_off = raw.size() - 2 * 512 * 4 * 4 - 64 * 4;
  std::memcpy(&first, raw.data() + final_norm_off, 4);
  EXPECT_EQ((*w)->final_norm.f32()[0], first);
}

// ------------------------------------------------------ model discovery --

// Sets an environment variable for one scope and restores it after.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const std::string& value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old;
    had_old_ = std::getenv(name) != nullptr;
    ::setenv(name, value.c_str(), 1);
  }
  ~ScopedEnv() {
    if (had_old_) {
      ::setenv(name_, old_.c_str(), 1);
    } else {
      ::unsetenv(name_);
    }
  }

 private:
  const char* name_;
  std::string old_;
  bool had_old_ = false;
};

TEST(BundledModelTest, DiscoveryOrderFlagsThenEnvThenRepository) {
  namespace fs = std::filesystem;
  const std::string bundled = test_support::BundledModelPath("stories260K.bin");
  ASSERT_FALSE(bundled.empty());
  const std::string repo_models = fs::weakly_canonical(fs::path(bundled).parent_path()).string();
  // Without $KVR_MODELS: the repository's models/ (found from this test
  // binary's location under build*/, or the source path recorded at build).
  {
    ScopedEnv no_models("KVR_MODELS", "");
    ScopedEnv no_shared("KVR_SHARED_MODELS", "");
    EXPECT_EQ(FindBundledModelDir(), repo_models);
    auto paths = ResolveModelPaths("", "");
    ASSERT_TRUE(paths.ok()) << paths.status();
    EXPECT_EQ(paths->model, repo_models + "/stories260K.bin");
    EXPECT_EQ(paths->tokenizer, repo_models + "/tok512.bin");
  }
  // $KVR_MODELS naming a folder that holds stories260K.bin wins over it.
  const fs::path elsewhere = fs::temp_directory_path() / ("kvr_models_" + std::to_string(getpid()));
  fs::create_directories(elsewhere);
  { std::ofstream(elsewhere / "stories260K.bin") << "x"; }
  {
    ScopedEnv env("KVR_MODELS", elsewhere.string());
    EXPECT_EQ(FindBundledModelDir(), fs::weakly_canonical(elsewhere).string());
    // Flags win over everything; a missing one still defaults.
    auto paths = ResolveModelPaths("/m.bin", "");
    ASSERT_TRUE(paths.ok()) << paths.status();
    EXPECT_EQ(paths->model, "/m.bin");
    EXPECT_EQ(paths->tokenizer, fs::weakly_canonical(elsewhere).string() + "/tok512.bin");
  }
  // $KVR_MODELS naming a folder without the model is passed over.
  fs::remove(elsewhere / "stories260K.bin");
  {
    ScopedEnv env("KVR_MODELS", elsewhere.string());
    EXPECT_EQ(FindBundledModelDir(), repo_models);
  }
  fs::remove_all(elsewhere);
}

TEST(Llama2cLoaderTest, MissingFileIsNotFound) {
  EXPECT_EQ(LoadLlama2c("/nonexistent/model.bin").status().code(), absl::StatusCode::kNotFound);
}

class Llama2cCorruptTest : public ::testing::Test {
 protected:
  void SetUp() override {
    path_ = test_support::BundledModelPath("stories260K.bin");
    ASSERT_FALSE(path_.empty());
    raw_ = ReadAll(path_);
    ASSERT_EQ(raw_.size(), 1056540u);
  }
  // Loads a copy of the model with header field `field` set to `value`.
  absl::Status WithHeader(int field, int32_t value) {
    std::vector<char> copy = raw_;
    std::memcpy(copy.data() + 4 * field, &value, 4);
    return LoadLlama2c(WriteTemp("hdr.bin", copy)).status();
  }
  void ExpectError(const absl::Status& s, absl::StatusCode code, const char* needle) {
    EXPECT_EQ(s.code(), code) << s;
    EXPECT_NE(s.message().find(needle), std::string::npos) << "want '" << needle << "' in " << s;
  }

  std::string path_;
  std::vector<char> raw_;
};

TEST_F(Llama2cCorruptTest, TruncatedAtManyLengths) {
  struct Case {
    size_t size;
    const char* needle;
  };
  const size_t n = raw_.size();
  for (const Case& c : std::vector<Case>{{0, "header"},
                                         {10, "header"},
                                         {27, "header"},
                                         {28, "token_embedding_table"},
                                         {1000, "token_embedding_table"},
                                         {28 + 32768 * 4 + 320 * 4 + 100, "wq"},
                                         {n / 2, "w1"},
                                         {n - 4096 * 4 - 1, "rms_final_weight"},
                                         {n - 4096 * 4 + 100, "freq_cis_real"},
                                         {n - 4, "freq_cis_imag"}}) {
    std::vector<char> cut(raw_.begin(), raw_.begin() + static_cast<std::ptrdiff_t>(c.size));
    const absl::Status s = LoadLlama2c(WriteTemp("cut.bin", cut)).status();
    ExpectError(s, absl::StatusCode::kDataLoss, c.needle);
  }
}

TEST_F(Llama2cCorruptTest, BadHeaderFieldsAreNamed) {
  // Header order: dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len.
  ExpectError(WithHeader(0, -64), absl::StatusCode::kInvalidArgument, "dim = -64");
  ExpectError(WithHeader(1, 0), absl::StatusCode::kInvalidArgument, "hidden_dim = 0");
  ExpectError(WithHeader(2, -5), absl::StatusCode::kInvalidArgument, "n_layers = -5");
  ExpectError(WithHeader(3, 7), absl::StatusCode::kInvalidArgument, "n_heads = 7");
  ExpectError(WithHeader(4, 3), absl::StatusCode::kInvalidArgument, "n_kv_heads = 3");
  ExpectError(WithHeader(4, 16), absl::StatusCode::kInvalidArgument, "n_kv_heads = 16");
  ExpectError(WithHeader(5, 0), absl::StatusCode::kInvalidArgument, "vocab_size = 0");
  ExpectError(WithHeader(5, INT32_MIN), absl::StatusCode::kInvalidArgument, "vocab_size");
  // Absurd vs the limits, and plausible but larger than the file holds.
  ExpectError(WithHeader(6, 2000000000), absl::StatusCode::kInvalidArgument, "seq_len");
  ExpectError(WithHeader(6, 1 << 20), absl::StatusCode::kDataLoss, "seq_len");
  // Dims whose products are huge (n_layers * hidden_dim * dim ~ 2^52 floats).
  ExpectError(WithHeader(0, INT32_MAX), absl::StatusCode::kInvalidArgument, "dim");
  {
    std::vector<char> copy = raw_;
    const int32_t big[3] = {1 << 20, 1 << 20, 4096};
    std::memcpy(copy.data(), big, sizeof(big));
    const int32_t heads[2] = {1 << 12, 1 << 12};
    std::memcpy(copy.data() + 12, heads, sizeof(heads));
    ExpectError(LoadLlama2c(WriteTemp("big.bin", copy)).status(), absl::StatusCode::kDataLoss,
                "token_embedding_table");
  }
  // Unshared classifier claimed, but the file has none.
  ExpectError(WithHeader(5, -512), absl::StatusCode::kDataLoss, "wcls");
  // Trailing garbage.
  std::vector<char> longer = raw_;
  longer.resize(raw_.size() + 8);
  ExpectError(LoadLlama2c(WriteTemp("long.bin", longer)).status(), absl::StatusCode::kDataLoss,
              "after the last section");
}

// ---------------------------------------------------------- random weights --

TEST(RandomWeightsTest, DeterministicAndShaped) {
  LlamaConfig c = Llama3_8BConfig();
  // Llama-3 proportions scaled down 32x in width (keeps GQA 4:1, head_dim 128).
  c.dim = 128;
  c.hidden_dim = 448;
  c.n_heads = 4;
  c.n_kv_heads = 1;
  c.head_dim = 32;
  c.vocab_size = 1000;
  ThreadPool pool(2);
  RandomWeightsOptions o;
  o.seed = 7;
  o.n_layers_override = 2;
  o.pool = &pool;
  auto a = MakeRandomWeights(c, o);
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ((*a)->config.n_layers, 2);
  ASSERT_TRUE((*a)->Validate().ok());
  o.pool = nullptr;  // fill order must not matter
  auto b = MakeRandomWeights(c, o);
  ASSERT_TRUE(b.ok());
  const HostTensor& wa = (*a)->layers[1].w2;
  const HostTensor& wb = (*b)->layers[1].w2;
  ASSERT_EQ(std::memcmp(wa.data, wb.data, wa.bytes()), 0);
  // Std ~ 1/sqrt(in) for matrices.
  double ss = 0;
  for (size_t i = 0; i < wa.numel(); ++i) ss += double(wa.f32()[i]) * wa.f32()[i];
  EXPECT_NEAR(std::sqrt(ss / wa.numel()) * std::sqrt(448.0), 1.0, 0.02);
  o.seed = 8;
  auto d = MakeRandomWeights(c, o);
  ASSERT_TRUE(d.ok());
  EXPECT_NE(std::memcmp(wa.data, (*d)->layers[1].w2.data, wa.bytes()), 0);
  // bf16 storage halves the matrices; norms stay f32.
  o.dtype = DType::kBf16;
  auto h = MakeRandomWeights(c, o);
  ASSERT_TRUE(h.ok());
  EXPECT_EQ((*h)->layers[0].wq.dtype, DType::kBf16);
  EXPECT_EQ((*h)->layers[0].attn_norm.dtype, DType::kF32);
  o.dtype = DType::kF16;
  EXPECT_EQ(MakeRandomWeights(c, o).status().code(), absl::StatusCode::kInvalidArgument);
}

// ------------------------------------------------------------- tokenizer --

class TokenizerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    path_ = test_support::BundledModelPath("tok512.bin");
    ASSERT_FALSE(path_.empty());
    auto t = Llama2cTokenizer::Load(path_, 512);
    ASSERT_TRUE(t.ok()) << t.status();
    tok_ = *std::move(t);
  }
  std::vector<int32_t> Enc(std::string_view s, bool bos = true) {
    auto r = tok_->Encode(s, bos);
    KVR_CHECK(r.ok());
    return *r;
  }
  std::string Dec(const std::vector<int32_t>& ids) {
    std::string out;
    for (size_t i = 1; i < ids.size(); ++i) out += *tok_->Decode(ids[i - 1], ids[i]);
    return out;
  }

  std::string path_;
  std::unique_ptr<Llama2cTokenizer> tok_;
};

// Expected ids are read off the vocabulary (dump tok512.bin: score, len,
// bytes per entry; ids 259.. are the merges, score = -(id - 259)) and the
// merge rule applied by hand: run.c starts from [BOS, " ", one token per
// character] and repeatedly merges the adjacent pair whose concatenation has
// the highest score.
TEST_F(TokenizerTest, EncodesLikeRunC) {
  ASSERT_EQ(tok_->vocab_size(), 512);
  EXPECT_EQ(tok_->piece(403), " Once");
  EXPECT_EQ(tok_->piece(407), " upon");
  EXPECT_EQ(tok_->piece(261), " a");
  EXPECT_EQ(tok_->piece(378), " time");
  // Each word with its dummy-prefix / separator space is a single merge
  // result: " Once"(403) " upon"(407) " a"(261) " time"(378).
  EXPECT_EQ(Enc("Once upon a time"), (std::vector<int32_t>{1, 403, 407, 261, 378}));
  // "Hello world": singles " H e l l o   w o r l d"; merges in score order:
  // " w"(263, -4), "or"(304, -45), "ll"(306, -47), " H"(320, -61),
  // "ld"(341, -82), " H"+"e" = " He"(346, -87); nothing else is in the vocab.
  EXPECT_EQ(Enc("Hello world"), (std::vector<int32_t>{1, 346, 306, 414, 263, 304, 341}));
  // No BOS, and empty text adds no dummy prefix.
  EXPECT_EQ(Enc("Lily", false), (std::vector<int32_t>{317}));
  EXPECT_EQ(Enc("", true), (std::vector<int32_t>{1}));
  EXPECT_EQ(*tok_->Encode("Lily", true, true), (std::vector<int32_t>{1, 317, 2}));
}

TEST_F(TokenizerTest, ByteFallbackAndMultibyteCodepoints) {
  // U+20AC "€" (e2 82 ac) is a vocab piece (503); " x" is not a piece, so the
  // dummy " " (410) stays alone.
  EXPECT_EQ(Enc("x\u20ACy"), (std::vector<int32_t>{1, 410, 444, 503, 422}));
  // U+1F600 (f0 9f 98 80) is not: four byte tokens, byte + 3.
  EXPECT_EQ(Enc("dog \U0001F600"),
            (std::vector<int32_t>{1, 400, 428, 410, 0xF0 + 3, 0x9F + 3, 0x98 + 3, 0x80 + 3}));
  // Decoding byte tokens gives the raw bytes back.
  EXPECT_EQ(Dec(Enc("dog \U0001F600")), "dog \U0001F600");
  EXPECT_EQ(*tok_->Decode(5, 3 + 0x41), "A");
}

TEST_F(TokenizerTest, DecodeRoundTrip) {
  // After BOS the leading space of the first piece is dropped.
  EXPECT_EQ(*tok_->Decode(1, 403), "Once");
  EXPECT_EQ(*tok_->Decode(403, 407), " upon");
  for (const char* s : {"Once upon a time", "Lily and Tim went to the park.",
                        "She said, \"Hello!\" \u2014 caf\u00e9"}) {
    EXPECT_EQ(Dec(Enc(s)), s);
  }
  EXPECT_EQ(tok_->Decode(1, 512).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(tok_->Decode(1, -1).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(TokenizerTest, TruncatedFileIsDataLoss) {
  const std::vector<char> raw = ReadAll(path_);
  for (size_t cut : {size_t{0}, size_t{2}, size_t{4}, size_t{9}, raw.size() / 2, raw.size() - 1}) {
    std::vector<char> part(raw.begin(), raw.begin() + static_cast<std::ptrdiff_t>(cut));
    auto t = Llama2cTokenizer::Load(WriteTemp("tok.bin", part), 512);
    EXPECT_EQ(t.status().code(), absl::StatusCode::kDataLoss) << cut << ": " << t.status();
  }
  std::vector<char> bad = raw;
  const int32_t neg = -3;
  std::memcpy(bad.data() + 4 + 4, &neg, 4);  // token 0's length
  EXPECT_EQ(Llama2cTokenizer::Load(WriteTemp("tok.bin", bad), 512).status().code(),
            absl::StatusCode::kInvalidArgument);
  // Reading to the end of the file finds the same 512 tokens.
  auto all = Llama2cTokenizer::Load(path_, 0);
  ASSERT_TRUE(all.ok());
  EXPECT_EQ((*all)->vocab_size(), 512);
}

}  // namespace
}  // namespace kvr::worker
