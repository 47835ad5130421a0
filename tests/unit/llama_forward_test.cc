// The full-attention Llama forward pass on the CPU backend against an
// independent double-precision reference (plain loops over the llama2.c file,
// no backend, no SIMD), greedy generation against llama2.c's known output,
// and prefill/decode consistency on random weights of other shapes.
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include "tests/support/models.h"
#include "gpu_worker/model/generate.h"
#include "gpu_worker/model/llama2c_loader.h"
#include "gpu_worker/model/llama2c_tokenizer.h"
#include "gpu_worker/model/llama_model.h"
#include "gpu_worker/model/random_weights.h"
#include "gtest/gtest.h"

namespace kvr::worker {
namespace {

// llama2.c's run.c forward pass, written out in double precision.
class ReferenceLlama2c {
 public:
  explicit ReferenceLlama2c(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    int32_t h[7];
    in.read(reinterpret_cast<char*>(h), sizeof(h));
    dim_ = h[0], hidden_ = h[1], layers_ = h[2], heads_ = h[3], kv_heads_ = h[4];
    vocab_ = std::abs(h[5]), seq_ = h[6];
    hs_ = dim_ / heads_;
    kv_dim_ = kv_heads_ * hs_;
    auto read = [&](size_t n) {
      std::vector<float> v(n);
      in.read(reinterpret_cast<char*>(v.data()), static_cast<std::streamsize>(n * 4));
      return v;
    };
    emb_ = read(size_t(vocab_) * dim_);
    rms_att_ = read(size_t(layers_) * dim_);
    wq_ = read(size_t(layers_) * dim_ * dim_);
    wk_ = read(size_t(layers_) * dim_ * kv_dim_);
    wv_ = read(size_t(layers_) * dim_ * kv_dim_);
    wo_ = read(size_t(layers_) * dim_ * dim_);
    rms_ffn_ = read(size_t(layers_) * dim_);
    w1_ = read(size_t(layers_) * dim_ * hidden_);
    w2_ = read(size_t(layers_) * dim_ * hidden_);
    w3_ = read(size_t(layers_) * dim_ * hidden_);
    rms_final_ = read(dim_);
    read(size_t(seq_) * hs_);  // freq_cis_real + freq_cis_imag
    wcls_ = h[5] > 0 ? emb_ : read(size_t(vocab_) * dim_);
    ok_ = static_cast<bool>(in);
    kc_.assign(layers_, std::vector<double>(size_t(seq_) * kv_dim_));
    vc_.assign(layers_, std::vector<double>(size_t(seq_) * kv_dim_));
  }
  bool ok() const { return ok_; }

  std::vector<double> Step(int token, int pos) {
    std::vector<double> x(emb_.begin() + size_t(token) * dim_,
                          emb_.begin() + size_t(token + 1) * dim_);
    for (int l = 0; l < layers_; ++l) {
      std::vector<double> xb = RmsNorm(x, &rms_att_[size_t(l) * dim_]);
      std::vector<double> q = MatVec(&wq_[size_t(l) * dim_ * dim_], xb, dim_, dim_);
      std::vector<double> k = MatVec(&wk_[size_t(l) * dim_ * kv_dim_], xb, kv_dim_, dim_);
      std::vector<double> v = MatVec(&wv_[size_t(l) * dim_ * kv_dim_], xb, kv_dim_, dim_);
      for (int i = 0; i < dim_; i += 2) {
        const double freq = std::pow(10000.0, -double(i % hs_) / hs_);
        const double c = std::cos(pos * freq), s = std::sin(pos * freq);
        auto rot = [&](std::vector<double>& t) {
          const double a = t[i], b = t[i + 1];
          t[i] = a * c - b * s;
          t[i + 1] = a * s + b * c;
        };
        rot(q);
        if (i < kv_dim_) rot(k);
      }
      std::copy(k.begin(), k.end(), kc_[l].begin() + size_t(pos) * kv_dim_);
      std::copy(v.begin(), v.end(), vc_[l].begin() + size_t(pos) * kv_dim_);
      std::vector<double> att_out(dim_, 0.0);
      for (int h = 0; h < heads_; ++h) {
        const int kvh = h / (heads_ / kv_heads_);
        std::vector<double> sc(pos + 1);
        double mx = -1e300;
        for (int t = 0; t <= pos; ++t) {
          double d = 0;
          for (int j = 0; j < hs_; ++j)
            d += q[h * hs_ + j] * kc_[l][size_t(t) * kv_dim_ + kvh * hs_ + j];
          sc[t] = d / std::sqrt(double(hs_));
          mx = std::max(mx, sc[t]);
        }
        double z = 0;
        for (double& s : sc) z += (s = std::exp(s - mx));
        for (int t = 0; t <= pos; ++t) {
          for (int j = 0; j < hs_; ++j) {
            att_out[h * hs_ + j] += sc[t] / z * vc_[l][size_t(t) * kv_dim_ + kvh * hs_ + j];
          }
        }
      }
      std::vector<double> o = MatVec(&wo_[size_t(l) * dim_ * dim_], att_out, dim_, dim_);
      for (int j = 0; j < dim_; ++j) x[j] += o[j];
      xb = RmsNorm(x, &rms_ffn_[size_t(l) * dim_]);
      std::vector<double> g = MatVec(&w1_[size_t(l) * dim_ * hidden_], xb, hidden_, dim_);
      std::vector<double> u = MatVec(&w3_[size_t(l) * dim_ * hidden_], xb, hidden_, dim_);
      for (int j = 0; j < hidden_; ++j) g[j] = g[j] / (1.0 + std::exp(-g[j])) * u[j];
      std::vector<double> d = MatVec(&w2_[size_t(l) * dim_ * hidden_], g, dim_, hidden_);
      for (int j = 0; j < dim_; ++j) x[j] += d[j];
    }
    x = RmsNorm(x, rms_final_.data());
    return MatVec(wcls_.data(), x, vocab_, dim_);
  }

 private:
  std::vector<double> RmsNorm(const std::vector<double>& x, const float* w) const {
    double ss = 0;
    for (double v : x) ss += v * v;
    const double inv = 1.0 / std::sqrt(ss / x.size() + 1e-5);
    std::vector<double> o(x.size());
    for (size_t j = 0; j < x.size(); ++j) o[j] = w[j] * x[j] * inv;
    return o;
  }
  static std::vector<double> MatVec(const float* w, const std::vector<double>& x, int out, int in) {
    std::vector<double> y(out, 0.0);
    for (int i = 0; i < out; ++i) {
      for (int j = 0; j < in; ++j) y[i] += double(w[size_t(i) * in + j]) * x[j];
    }
    return y;
  }

  int dim_, hidden_, layers_, heads_, kv_heads_, vocab_, seq_, hs_, kv_dim_;
  bool ok_ = false;
  std::vector<float> emb_, rms_att_, wq_, wk_, wv_, wo_, rms_ffn_, w1_, w2_, w3_, rms_final_, wcls_;
  std::vector<std::vector<double>> kc_, vc_;
};

class Stories260KTest : public ::testing::Test {
 protected:
  void SetUp() override {
    model_path_ = test_support::BundledModelPath("stories260K.bin");
    tok_path_ = test_support::BundledModelPath("tok512.bin");
    if (model_path_.empty() || tok_path_.empty()) {
      GTEST_FAIL() << "the bundled stories260K model is missing";
    }
    auto w = LoadLlama2c(model_path_);
    ASSERT_TRUE(w.ok()) << w.status();
    weights_ = *w;
    auto t = Llama2cTokenizer::Load(tok_path_, weights_->config.vocab_size);
    ASSERT_TRUE(t.ok()) << t.status();
    tok_ = *std::move(t);
  }
  std::unique_ptr<LlamaModel> MakeModel(Backend* b, int64_t batch = 64) {
    LlamaModelOptions o;
    o.max_batch_tokens = batch;
    auto m = LlamaModel::Create(b, weights_, o);
    KVR_CHECK(m.ok());
    return *std::move(m);
  }
  std::unique_ptr<Backend> Cpu(int threads) {
    BackendOptions o;
    o.num_threads = threads;
    return *BackendRegistry::Create("cpu", o);
  }

  std::string model_path_, tok_path_;
  std::shared_ptr<const LlamaWeights> weights_;
  std::unique_ptr<Llama2cTokenizer> tok_;
};

TEST_F(Stories260KTest, FirstStepsMatchDoubleReference) {
  ReferenceLlama2c ref(model_path_);
  ASSERT_TRUE(ref.ok());
  auto backend = Cpu(1);
  auto model = MakeModel(backend.get());
  const std::vector<int32_t> tokens = {1, 403, 407};  // BOS " Once" " upon"
  std::vector<float> last;
  for (int pos = 0; pos < 3; ++pos) {
    auto got = model->DecodeStep(tokens[pos], pos);
    ASSERT_TRUE(got.ok()) << got.status();
    const std::vector<double> want = ref.Step(tokens[pos], pos);
    ASSERT_EQ(got->size(), want.size());
    double max_err = 0;
    for (size_t j = 0; j < want.size(); ++j)
      max_err = std::max(max_err, std::abs((*got)[j] - want[j]));
    EXPECT_LT(max_err, 1e-4) << "step " << pos;
    std::cout << "step " << pos << ": max |logit - reference| = " << max_err << "\n";
    last.assign(got->begin(), got->end());
  }
  // Prefill of the same three tokens (one batched pass; and in chunks of 2)
  // gives the same last logits.
  for (int64_t batch : {64, 2}) {
    auto m2 = MakeModel(backend.get(), batch);
    auto pre = m2->Prefill(tokens);
    ASSERT_TRUE(pre.ok()) << pre.status();
    for (size_t j = 0; j < last.size(); ++j) EXPECT_NEAR((*pre)[j], last[j], 1e-5) << j;
    EXPECT_EQ(m2->cached_tokens(), 3);
  }
}

TEST_F(Stories260KTest, GreedyContinuationMatchesLlama2c) {
  auto backend = Cpu(1);
  auto model = MakeModel(backend.get());
  auto text = GenerateGreedy(*model, *tok_, "Once upon a time", 64);
  ASSERT_TRUE(text.ok()) << text.status();
  std::cout << "greedy: Once upon a time" << *text << "\n";
  EXPECT_EQ(text->rfind(", there was a little girl named Lily.", 0), 0u) << *text;

  // The same with 3 threads and chunked prefill.
  auto backend3 = Cpu(3);
  auto model3 = MakeModel(backend3.get(), 2);
  auto text3 = GenerateGreedy(*model3, *tok_, "Once upon a time", 64);
  ASSERT_TRUE(text3.ok());
  EXPECT_EQ(*text3, *text);
}

// A measurement, not a check (benchmarks belong in bench/): run with
// --gtest_also_run_disabled_tests to print tokens/s.
TEST_F(Stories260KTest, DISABLED_DecodeThroughputOneThread) {
  auto backend = Cpu(1);
  auto model = MakeModel(backend.get());
  const int steps = 500;
  auto logits = model->Prefill(std::vector<int32_t>{1});
  ASSERT_TRUE(logits.ok());
  int32_t token = 1;
  const auto t0 = std::chrono::steady_clock::now();
  for (int pos = 1; pos <= steps; ++pos) {
    token =
        static_cast<int32_t>(std::max_element(logits->begin(), logits->end()) - logits->begin());
    logits = model->DecodeStep(token, pos);
    ASSERT_TRUE(logits.ok()) << logits.status();
  }
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::cout << "stories260K greedy decode, 1 thread: " << steps / s << " tokens/s (" << steps
            << " steps, positions 1.." << steps << ")\n";
  RecordProperty("tokens_per_second", std::to_string(steps / s));
}

TEST_F(Stories260KTest, RejectsBadArguments) {
  auto backend = Cpu(1);
  auto model = MakeModel(backend.get());
  EXPECT_EQ(model->Prefill({}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(model->Prefill(std::vector<int32_t>{1, 512}).status().code(),
            absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(model->Prefill(std::vector<int32_t>{1, 403}).ok());
  EXPECT_EQ(model->DecodeStep(407, 3).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(model->DecodeStep(407, -1).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(model->DecodeStep(407, 2).ok());
  EXPECT_EQ(model->DecodeStep(407, 512).status().code(), absl::StatusCode::kInvalidArgument);
}

// Random weights of a Llama-3-like shape (untied, half-split RoPE with 3.1
// scaling, GQA 4:1): chunked prefill equals token-by-token decode, and bf16
// weights stay close to f32.
TEST(RandomLlamaTest, PrefillChunksEqualStepwiseDecode) {
  LlamaConfig c = Llama31_8BConfig();
  c.dim = 96;
  c.hidden_dim = 256;
  c.n_heads = 8;
  c.n_kv_heads = 2;
  c.head_dim = 16;
  c.vocab_size = 300;
  c.seq_len = 64;
  RandomWeightsOptions ro;
  ro.n_layers_override = 3;
  auto w = MakeRandomWeights(c, ro);
  ASSERT_TRUE(w.ok()) << w.status();
  BackendOptions bo;
  bo.num_threads = 2;
  auto backend = *BackendRegistry::Create("cpu", bo);
  std::vector<int32_t> tokens;
  for (int i = 0; i < 11; ++i) tokens.push_back((i * 37 + 5) % c.vocab_size);

  LlamaModelOptions mo;
  mo.max_batch_tokens = 4;
  auto chunked = *LlamaModel::Create(backend.get(), *w, mo);
  auto pre = chunked->Prefill(tokens);
  ASSERT_TRUE(pre.ok()) << pre.status();
  const std::vector<float> want(pre->begin(), pre->end());

  auto stepwise = *LlamaModel::Create(backend.get(), *w);
  std::span<const float> got;
  for (size_t p = 0; p < tokens.size(); ++p) {
    auto r = stepwise->DecodeStep(tokens[p], static_cast<int64_t>(p));
    ASSERT_TRUE(r.ok()) << r.status();
    got = *r;
  }
  double scale = 0;
  for (float v : want) scale = std::max(scale, double(std::abs(v)));
  ASSERT_GT(scale, 0.1);
  for (size_t j = 0; j < want.size(); ++j) EXPECT_NEAR(got[j], want[j], 1e-4 * scale) << j;

  // Re-running the last position (rewind) reproduces its logits.
  auto again = stepwise->DecodeStep(tokens.back(), static_cast<int64_t>(tokens.size()) - 1);
  ASSERT_TRUE(again.ok());
  for (size_t j = 0; j < want.size(); ++j) EXPECT_NEAR((*again)[j], want[j], 1e-4 * scale);

  ro.dtype = DType::kBf16;
  auto wb = MakeRandomWeights(c, ro);
  ASSERT_TRUE(wb.ok());
  auto bf16 = *LlamaModel::Create(backend.get(), *wb, mo);
  auto pb = bf16->Prefill(tokens);
  ASSERT_TRUE(pb.ok()) << pb.status();
  double err = 0;
  for (size_t j = 0; j < want.size(); ++j)
    err = std::max(err, double(std::abs((*pb)[j] - want[j])));
  EXPECT_LT(err, 0.05 * scale);
}

}  // namespace
}  // namespace kvr::worker
