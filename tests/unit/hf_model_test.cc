// Hugging Face checkpoints: config.json parsing (Llama 3.1 rope_scaling,
// defaults, errors), the llama2c -> HF converter and the safetensors loader.
// Oracle: stories260K through the llama2.c loader (itself checked against a
// double-precision reference in llama_forward_test) must give the same logits
// as the converted HF checkpoint, whose q/k rows are permuted for the
// rotate_half RoPE layout and run with RopeStyle::kHalfSplit.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <string>
#include <vector>

#include "tests/support/models.h"
#include "gpu_worker/backend/backend.h"
#include "gpu_worker/model/generate.h"
#include "gpu_worker/model/hf_config.h"
#include "gpu_worker/model/llama2c_loader.h"
#include "gpu_worker/model/llama2c_tokenizer.h"
#include "gpu_worker/model/llama_model.h"
#include "gpu_worker/model/safetensors_loader.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace kvr::worker {
namespace {

namespace fs = std::filesystem;
using Json = nlohmann::json;

std::string ReadAll(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}
void WriteAll(const fs::path& p, std::string_view s) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out.write(s.data(), static_cast<std::streamsize>(s.size()));
}

// A fresh directory under the test temp dir, removed at destruction.
class TempDir {
 public:
  explicit TempDir(const std::string& tag) {
    const char* base = std::getenv("TEST_TMPDIR");
    path_ = fs::path(base ? base : fs::temp_directory_path().string()) /
            ("kvr_hf_" + tag + "_" + std::to_string(::getpid()));
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~TempDir() { fs::remove_all(path_); }
  const fs::path& path() const { return path_; }
  std::string str() const { return path_.string(); }

 private:
  fs::path path_;
};

// The header JSON and data section of a safetensors file.
struct StFile {
  Json header;
  std::string data;
};
StFile SplitSt(const std::string& bytes) {
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<uint8_t>(bytes[static_cast<size_t>(i)]);
  return {Json::parse(bytes.substr(8, n)), bytes.substr(8 + n)};
}
std::string JoinSt(const Json& header, const std::string& data, int64_t claimed_len = -1) {
  const std::string h = header.dump();
  const uint64_t n = claimed_len >= 0 ? static_cast<uint64_t>(claimed_len) : h.size();
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i)
    out[static_cast<size_t>(i)] = static_cast<char>((n >> (8 * i)) & 0xff);
  return out + h + data;
}

// ---------------------------------------------------------------------------
// config.json
// ---------------------------------------------------------------------------

// meta-llama/Llama-3.1-8B config.json as published (Hugging Face hub).
constexpr char kLlama31Config[] = R"({
  "architectures": ["LlamaForCausalLM"],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "bos_token_id": 128000,
  "eos_token_id": 128001,
  "hidden_act": "silu",
  "hidden_size": 4096,
  "initializer_range": 0.02,
  "intermediate_size": 14336,
  "max_position_embeddings": 131072,
  "mlp_bias": false,
  "model_type": "llama",
  "num_attention_heads": 32,
  "num_hidden_layers": 32,
  "num_key_value_heads": 8,
  "pretraining_tp": 1,
  "rms_norm_eps": 1e-05,
  "rope_scaling": {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3"
  },
  "rope_theta": 500000.0,
  "tie_word_embeddings": false,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.43.0.dev0",
  "use_cache": true,
  "vocab_size": 128256
})";

void ExpectSameConfig(const LlamaConfig& a, const LlamaConfig& b) {
  EXPECT_EQ(a.dim, b.dim);
  EXPECT_EQ(a.hidden_dim, b.hidden_dim);
  EXPECT_EQ(a.n_layers, b.n_layers);
  EXPECT_EQ(a.n_heads, b.n_heads);
  EXPECT_EQ(a.n_kv_heads, b.n_kv_heads);
  EXPECT_EQ(a.head_dim, b.head_dim);
  EXPECT_EQ(a.vocab_size, b.vocab_size);
  EXPECT_EQ(a.seq_len, b.seq_len);
  EXPECT_EQ(a.rope_theta, b.rope_theta);
  EXPECT_EQ(a.rms_eps, b.rms_eps);
  EXPECT_EQ(a.tied_embeddings, b.tied_embeddings);
  EXPECT_EQ(a.rope_style, b.rope_style);
  ASSERT_EQ(a.rope_scaling.has_value(), b.rope_scaling.has_value());
  if (a.rope_scaling) {
    EXPECT_EQ(a.rope_scaling->factor, b.rope_scaling->factor);
    EXPECT_EQ(a.rope_scaling->low_freq_factor, b.rope_scaling->low_freq_factor);
    EXPECT_EQ(a.rope_scaling->high_freq_factor, b.rope_scaling->high_freq_factor);
    EXPECT_EQ(a.rope_scaling->original_max_position_embeddings,
              b.rope_scaling->original_max_position_embeddings);
  }
}

TEST(HfConfigTest, ParsesLlama31) {
  auto c = ParseHfConfig(kLlama31Config, "llama31");
  ASSERT_TRUE(c.ok()) << c.status();
  ExpectSameConfig(*c, Llama31_8BConfig());
  EXPECT_EQ(c->RopeInvFreq(), Llama31_8BConfig().RopeInvFreq());
}

TEST(HfConfigTest, DefaultsAndRoundTrip) {
  // Llama-2-7B style: no num_key_value_heads, no head_dim, no rope_theta.
  auto c = ParseHfConfig(R"({"hidden_size": 4096, "intermediate_size": 11008,
      "num_hidden_layers": 32, "num_attention_heads": 32, "vocab_size": 32000,
      "max_position_embeddings": 4096, "rms_norm_eps": 1e-05, "rope_scaling": null})",
                         "llama2");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->n_kv_heads, 32);
  EXPECT_EQ(c->head_dim, 128);
  EXPECT_EQ(c->rope_theta, 10000.0f);
  EXPECT_FALSE(c->tied_embeddings);
  EXPECT_FALSE(c->rope_scaling.has_value());
  EXPECT_EQ(c->rope_style, RopeStyle::kHalfSplit);

  for (const LlamaConfig& want : {*c, Llama3_8BConfig(), Llama31_8BConfig()}) {
    auto back = ParseHfConfig(HfConfigJson(want, "bfloat16"), "roundtrip");
    ASSERT_TRUE(back.ok()) << back.status();
    ExpectSameConfig(*back, want);
  }
  // Floats are written in their shortest form.
  EXPECT_NE(HfConfigJson(Llama3_8BConfig(), "bfloat16").find("\"rms_norm_eps\": 1e-05"),
            std::string::npos);
}

TEST(HfConfigTest, ErrorsNameTheField) {
  Json base = Json::parse(kLlama31Config);
  struct Case {
    const char* what;
    std::function<void(Json&)> edit;
    const char* expect;
  };
  const std::vector<Case> cases = {
      {"missing", [](Json& j) { j.erase("hidden_size"); }, "hidden_size is missing"},
      {"type", [](Json& j) { j["num_hidden_layers"] = "32"; },
       "num_hidden_layers must be an integer"},
      {"negative", [](Json& j) { j["vocab_size"] = -5; }, "vocab_size = -5"},
      {"float int", [](Json& j) { j["intermediate_size"] = 1.5; }, "intermediate_size"},
      {"rope type", [](Json& j) { j["rope_scaling"]["rope_type"] = "yarn"; }, "\"yarn\""},
      {"rope field", [](Json& j) { j["rope_scaling"].erase("low_freq_factor"); },
       "rope_scaling.low_freq_factor is missing"},
      {"model type", [](Json& j) { j["model_type"] = "mistral"; }, "model_type \"mistral\""},
      {"act", [](Json& j) { j["hidden_act"] = "gelu"; }, "hidden_act \"gelu\""},
      {"bias", [](Json& j) { j["attention_bias"] = true; }, "attention_bias"},
      {"gqa", [](Json& j) { j["num_key_value_heads"] = 5; }, "n_kv_heads = 5"},
      {"heads", [](Json& j) { j["num_attention_heads"] = 3; }, "does not divide hidden_size"},
      {"eps", [](Json& j) { j["rms_norm_eps"] = 0; }, "rms_eps"},
  };
  for (const Case& c : cases) {
    Json j = base;
    c.edit(j);
    auto r = ParseHfConfig(j.dump(), "cfg");
    ASSERT_FALSE(r.ok()) << c.what;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << c.what;
    EXPECT_NE(r.status().message().find(c.expect), std::string::npos)
        << c.what << ": " << r.status();
  }
  auto bad = ParseHfConfig("{\"hidden_size\": 4", "trunc");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("not valid JSON"), std::string::npos);
  EXPECT_EQ(LoadHfConfig("/nonexistent/config.json").status().code(), absl::StatusCode::kNotFound);
}

// ---------------------------------------------------------------------------
// Converter + loader on stories260K
// ---------------------------------------------------------------------------

class HfCheckpointTest : public ::testing::Test {
 protected:
  void SetUp() override {
    model_path_ = test_support::BundledModelPath("stories260K.bin");
    if (model_path_.empty()) GTEST_FAIL() << "the bundled stories260K model is missing";
    auto w = LoadLlama2c(model_path_);
    ASSERT_TRUE(w.ok()) << w.status();
    ref_ = *w;
    BackendOptions o;
    o.num_threads = 2;
    backend_ = *BackendRegistry::Create("cpu", o);
  }

  // Logits of BOS + a short prompt (prefill), then of greedy decode steps.
  std::vector<std::vector<float>> Run(std::shared_ptr<const LlamaWeights> w, int steps = 8) {
    auto m = LlamaModel::Create(backend_.get(), std::move(w));
    KVR_CHECK(m.ok());
    std::vector<std::vector<float>> out;
    const std::vector<int32_t> prompt = {1, 403, 407, 261, 378};
    auto l = (*m)->Prefill(prompt);
    KVR_CHECK(l.ok());
    out.emplace_back(l->begin(), l->end());
    for (int s = 0; s < steps; ++s) {
      const auto& last = out.back();
      const int32_t next =
          static_cast<int32_t>(std::max_element(last.begin(), last.end()) - last.begin());
      auto d = (*m)->DecodeStep(next, static_cast<int64_t>(prompt.size()) + s);
      KVR_CHECK(d.ok());
      out.emplace_back(d->begin(), d->end());
    }
    return out;
  }

  static double MaxDiff(const std::vector<std::vector<float>>& a,
                        const std::vector<std::vector<float>>& b) {
    KVR_CHECK(a.size() == b.size());
    double m = 0;
    for (size_t i = 0; i < a.size(); ++i) {
      KVR_CHECK(a[i].size() == b[i].size());
      for (size_t j = 0; j < a[i].size(); ++j) m = std::max(m, std::abs(double(a[i][j]) - b[i][j]));
    }
    return m;
  }

  std::shared_ptr<const LlamaWeights> Convert(const TempDir& dir, HfWriteOptions o = {}) {
    absl::Status s = ConvertLlama2cToHf(model_path_, dir.str(), o);
    KVR_CHECK_MSG(s.ok(), s.ToString().c_str());
    auto w = LoadHfCheckpoint(dir.str());
    KVR_CHECK_MSG(w.ok(), w.status().ToString().c_str());
    return *w;
  }

  std::string model_path_;
  std::shared_ptr<const LlamaWeights> ref_;
  std::unique_ptr<Backend> backend_;
};

TEST_F(HfCheckpointTest, F32LogitsMatchLlama2c) {
  TempDir dir("f32");
  auto hf = Convert(dir);
  EXPECT_EQ(hf->config.rope_style, RopeStyle::kHalfSplit);
  EXPECT_TRUE(hf->config.tied_embeddings);
  EXPECT_EQ(hf->classifier.data, hf->token_embedding.data);
  EXPECT_EQ(hf->layers[0].wq.dtype, DType::kF32);
  // q/k really are permuted (the test would be vacuous otherwise) and v is not.
  EXPECT_NE(std::memcmp(hf->layers[0].wq.data, ref_->layers[0].wq.data, hf->layers[0].wq.bytes()),
            0);
  EXPECT_EQ(std::memcmp(hf->layers[0].wv.data, ref_->layers[0].wv.data, hf->layers[0].wv.bytes()),
            0);
  // Permutation: HF row h*d + t*d/2 + i == llama2.c row h*d + 2i + t.
  const int d = hf->config.head_dim;
  const int64_t cols = hf->config.dim;
  for (int64_t r = 0; r < hf->layers[2].wk.rows; ++r) {
    const int64_t h = r / d, t = (r % d) / (d / 2), i = r % (d / 2);
    ASSERT_EQ(std::memcmp(hf->layers[2].wk.f32() + r * cols,
                          ref_->layers[2].wk.f32() + (h * d + 2 * i + t) * cols, cols * 4),
              0)
        << "row " << r;
  }
  const auto want = Run(ref_);
  const auto got = Run(hf);
  std::printf("f32 HF vs llama2.c: max |logit diff| over %zu steps = %.3g\n", want.size(),
              MaxDiff(want, got));
  EXPECT_LE(MaxDiff(want, got), 1e-5);
  // Applying the interleaved style to HF weights would be wrong: the test can tell.
  auto wrong = std::make_shared<LlamaWeights>(*hf);
  wrong->config.rope_style = RopeStyle::kInterleaved;
  EXPECT_GT(MaxDiff(want, Run(wrong)), 1e-3);
}

TEST_F(HfCheckpointTest, ShardedMatchesSingleFile) {
  TempDir dir("sharded");
  HfWriteOptions o;
  o.max_shard_bytes = 200 << 10;
  auto hf = Convert(dir, o);
  EXPECT_FALSE(fs::exists(dir.path() / "model.safetensors"));
  EXPECT_TRUE(fs::exists(dir.path() / "model.safetensors.index.json"));
  EXPECT_TRUE(fs::exists(dir.path() / "model-00001-of-00006.safetensors"));
  EXPECT_LE(MaxDiff(Run(ref_), Run(hf)), 1e-5);
}

TEST_F(HfCheckpointTest, Bf16IsViewedInPlaceAndF16IsWidened) {
  TempDir dir16("bf16"), dir32("bf16to32"), dirh("f16");
  HfWriteOptions o;
  o.dtype = DType::kBf16;
  auto bf = Convert(dir16, o);
  EXPECT_EQ(bf->layers[1].wq.dtype, DType::kBf16);
  EXPECT_EQ(bf->token_embedding.dtype, DType::kBf16);
  EXPECT_EQ(bf->layers[1].attn_norm.dtype, DType::kF32);  // norms widened
  // In place: two views lie as far apart as their data_offsets in the file,
  // i.e. both alias the one mapping.
  const StFile file = SplitSt(ReadAll(dir16.path() / "model.safetensors"));
  const int64_t off_q = file.header["model.layers.1.self_attn.q_proj.weight"]["data_offsets"][0];
  const int64_t off_e = file.header["model.embed_tokens.weight"]["data_offsets"][0];
  EXPECT_EQ(static_cast<const char*>(bf->layers[1].wq.data) -
                static_cast<const char*>(bf->token_embedding.data),
            off_q - off_e);
  // Oracle for bf16: the same values re-saved as f32 (exact widening).
  ASSERT_TRUE(WriteHfCheckpoint(*bf, dir32.str(), {}).ok());
  auto bf32 = LoadHfCheckpoint(dir32.str());
  ASSERT_TRUE(bf32.ok()) << bf32.status();
  EXPECT_EQ((*bf32)->layers[1].wq.dtype, DType::kF32);
  const auto got = Run(bf), exact = Run(*bf32), ref = Run(ref_);
  std::printf("bf16 vs its f32 widening: %.3g; bf16 vs fp32 model: %.3g\n", MaxDiff(got, exact),
              MaxDiff(got, ref));
  EXPECT_LE(MaxDiff(got, exact), 1e-4);
  // Quantization error against the fp32 model stays small.
  EXPECT_LE(MaxDiff(got, ref), 0.25);

  o.dtype = DType::kF16;
  auto h = Convert(dirh, o);
  EXPECT_EQ(h->layers[1].wq.dtype, DType::kF32);
  std::printf("f16 vs fp32 model: %.3g\n", MaxDiff(Run(h), ref));
  EXPECT_LE(MaxDiff(Run(h), ref), 0.02);
}

TEST_F(HfCheckpointTest, GeneratesTheKnownStory) {
  const std::string tok_path = test_support::BundledModelPath("tok512.bin");
  if (tok_path.empty()) GTEST_FAIL() << "the bundled tok512.bin is missing";
  TempDir dir("gen");
  auto hf = Convert(dir);
  auto tok = Llama2cTokenizer::Load(tok_path, hf->config.vocab_size);
  ASSERT_TRUE(tok.ok()) << tok.status();
  auto m = LlamaModel::Create(backend_.get(), hf);
  ASSERT_TRUE(m.ok()) << m.status();
  auto text = GenerateGreedy(**m, **tok, "Once upon a time", 12);
  ASSERT_TRUE(text.ok()) << text.status();
  EXPECT_EQ(text->rfind(", there was a little girl named Lily.", 0), 0u) << *text;
}

// ---- Corrupt and inconsistent checkpoints ----------------------------------

class HfCorruptTest : public HfCheckpointTest {
 protected:
  void SetUp() override {
    HfCheckpointTest::SetUp();
    if (IsSkipped()) return;
    dir_ = std::make_unique<TempDir>("corrupt");
    ASSERT_TRUE(ConvertLlama2cToHf(model_path_, dir_->str(), {}).ok());
    st_path_ = dir_->path() / "model.safetensors";
    original_ = ReadAll(st_path_);
  }
  absl::Status Load() { return LoadHfCheckpoint(dir_->str()).status(); }
  void ExpectError(absl::StatusCode code, const std::string& needle) {
    absl::Status s = Load();
    EXPECT_EQ(s.code(), code) << s;
    EXPECT_NE(s.message().find(needle), std::string::npos) << s;
  }
  // Rewrites model.safetensors with an edited header (data unchanged).
  void EditHeader(const std::function<void(Json&)>& edit) {
    StFile f = SplitSt(original_);
    edit(f.header);
    WriteAll(st_path_, JoinSt(f.header, f.data));
  }
  void EditConfig(const std::function<void(Json&)>& edit) {
    Json j = Json::parse(ReadAll(dir_->path() / "config.json"));
    edit(j);
    WriteAll(dir_->path() / "config.json", j.dump());
  }

  std::unique_ptr<TempDir> dir_;
  fs::path st_path_;
  std::string original_;
};

TEST_F(HfCorruptTest, TruncatedAtManyLengthsIsDataLoss) {
  for (size_t len : {size_t{0}, size_t{3}, size_t{8}, size_t{20}, size_t{500}, original_.size() / 2,
                     original_.size() - 1}) {
    WriteAll(st_path_, original_.substr(0, len));
    absl::Status s = Load();
    EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << len << ": " << s;
    EXPECT_NE(s.message().find("model.safetensors"), std::string::npos) << s;
  }
}

TEST_F(HfCorruptTest, HeaderLengthBeyondFile) {
  StFile f = SplitSt(original_);
  WriteAll(st_path_, JoinSt(f.header, f.data, int64_t{1} << 40));
  ExpectError(absl::StatusCode::kDataLoss, "header length 1099511627776 is larger than");
}

TEST_F(HfCorruptTest, HeaderNotJson) {
  StFile f = SplitSt(original_);
  std::string bytes = JoinSt(f.header, f.data);
  bytes[8] = '[';
  bytes[9] = '{';
  WriteAll(st_path_, bytes);
  ExpectError(absl::StatusCode::kDataLoss, "not valid JSON");
}

TEST_F(HfCorruptTest, OffsetsOutsideData) {
  EditHeader([](Json& h) {
    h["model.layers.2.mlp.up_proj.weight"]["data_offsets"] = {1000000, 1000000 + 44032};
  });
  ExpectError(absl::StatusCode::kDataLoss, "model.layers.2.mlp.up_proj.weight: data_offsets");
}

TEST_F(HfCorruptTest, OffsetsDisagreeWithShape) {
  EditHeader([](Json& h) { h["model.norm.weight"]["shape"] = {65}; });
  ExpectError(absl::StatusCode::kDataLoss, "model.norm.weight");
}

TEST_F(HfCorruptTest, UnsupportedDtype) {
  EditHeader([](Json& h) { h["model.layers.0.self_attn.q_proj.weight"]["dtype"] = "I32"; });
  ExpectError(absl::StatusCode::kInvalidArgument,
              "model.layers.0.self_attn.q_proj.weight in model.safetensors has dtype I32");
}

TEST_F(HfCorruptTest, MissingTensor) {
  EditHeader([](Json& h) { h.erase("model.layers.3.mlp.up_proj.weight"); });
  ExpectError(absl::StatusCode::kInvalidArgument, "model.layers.3.mlp.up_proj.weight is missing");
}

TEST_F(HfCorruptTest, ShapeDisagreesWithConfig) {
  EditConfig([](Json& j) { j["intermediate_size"] = 100; });
  ExpectError(absl::StatusCode::kInvalidArgument,
              "model.layers.0.mlp.gate_proj.weight in model.safetensors has shape [172, 64], "
              "config.json wants [100, 64]");
}

TEST_F(HfCorruptTest, UntiedNeedsLmHead) {
  EditConfig([](Json& j) { j["tie_word_embeddings"] = false; });
  ExpectError(absl::StatusCode::kInvalidArgument, "lm_head.weight is missing");
}

TEST_F(HfCorruptTest, MissingFiles) {
  fs::remove(st_path_);
  ExpectError(absl::StatusCode::kNotFound, "neither model.safetensors");
  fs::remove(dir_->path() / "config.json");
  ExpectError(absl::StatusCode::kNotFound, "config.json");
}

TEST_F(HfCheckpointTest, MissingShardIsNamed) {
  TempDir dir("missing_shard");
  HfWriteOptions o;
  o.max_shard_bytes = 200 << 10;
  ASSERT_TRUE(ConvertLlama2cToHf(model_path_, dir.str(), o).ok());
  fs::remove(dir.path() / "model-00003-of-00006.safetensors");
  absl::Status s = LoadHfCheckpoint(dir.str()).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << s;
  EXPECT_NE(s.message().find("in shard model-00003-of-00006.safetensors, which does not exist"),
            std::string::npos)
      << s;

  // A weight_map entry that escapes the directory is refused.
  Json idx = Json::parse(ReadAll(dir.path() / "model.safetensors.index.json"));
  idx["weight_map"]["model.norm.weight"] = "../model.safetensors";
  WriteAll(dir.path() / "model.safetensors.index.json", idx.dump());
  s = LoadHfCheckpoint(dir.str()).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_NE(s.message().find("not a plain file name"), std::string::npos) << s;
}

TEST(SafetensorsTest, ParsesMinimalFileAndChecksEntries) {
  Json h = {{"__metadata__", {{"format", "pt"}}},
            {"a", {{"dtype", "F32"}, {"shape", {2}}, {"data_offsets", {0, 8}}}},
            {"b", {{"dtype", "BF16"}, {"shape", {1, 2}}, {"data_offsets", {8, 12}}}}};
  std::string bytes = JoinSt(h, std::string(12, '\x01'));
  auto e = ParseSafetensors(std::as_bytes(std::span<const char>(bytes)), "mini");
  ASSERT_TRUE(e.ok()) << e.status();
  ASSERT_EQ(e->size(), 2u);
  EXPECT_EQ((*e)[1].name, "b");
  EXPECT_EQ((*e)[1].shape, (std::vector<int64_t>{1, 2}));
  EXPECT_EQ((*e)[1].data.size(), 4u);

  for (const auto& [edit, needle] : std::vector<std::pair<std::function<void(Json&)>, std::string>>{
           {[](Json& j) {
              j["a"]["data_offsets"] = {8, 0};
            },
            "tensor a: data_offsets [8, 0]"},
           {[](Json& j) {
              j["a"]["data_offsets"] = {0, -8};
            },
            "two non-negative integers"},
           {[](Json& j) { j["a"]["shape"] = {"x"}; }, "bad shape"},
           {[](Json& j) {
              j["a"]["shape"] = {4294967296, 4294967296, 4294967296};
            },
            "overflows"},
           {[](Json& j) { j["a"].erase("dtype"); }, "dtype"},
           {[](Json& j) { j["b"] = 3; }, "tensor b: header entry is not an object"},
       }) {
    Json j = h;
    edit(j);
    std::string b = JoinSt(j, std::string(12, '\x01'));
    auto r = ParseSafetensors(std::as_bytes(std::span<const char>(b)), "mini");
    EXPECT_EQ(r.status().code(), absl::StatusCode::kDataLoss) << needle << ": " << r.status();
    EXPECT_NE(r.status().message().find(needle), std::string::npos) << r.status();
  }
}

}  // namespace
}  // namespace kvr::worker
