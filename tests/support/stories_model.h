// stories260K (the bundled llama2.c model) for worker tests: weights,
// tokenizer and a one-thread CPU backend, loaded once per fixture, plus the
// logits comparison the engine tests use. A missing model is a failure
// (tests/support/models.h).
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "tests/support/models.h"
#include "gpu_worker/backend/backend.h"
#include "gpu_worker/model/llama2c_loader.h"
#include "gpu_worker/model/llama2c_tokenizer.h"
#include "gpu_worker/model/weights.h"

namespace kvr::test_support {

struct StoriesModel {
  std::shared_ptr<const worker::LlamaWeights> weights;
  std::unique_ptr<worker::Llama2cTokenizer> tokenizer;
  std::unique_ptr<worker::Backend> backend;

  // Loads stories260K + tok512 and a CPU backend of `threads` threads. Returns
  // false after recording a test failure when anything is missing or broken:
  // the model is part of the repository, so nothing here is a reason to skip.
  bool Load(int threads = 1) {
    const std::string model = BundledModelPath("stories260K.bin");
    const std::string tok = BundledModelPath("tok512.bin");
    if (model.empty() || tok.empty()) return false;
    auto w = worker::LoadLlama2c(model);
    EXPECT_TRUE(w.ok()) << w.status();
    if (!w.ok()) return false;
    weights = *w;
    auto t = worker::Llama2cTokenizer::Load(tok, weights->config.vocab_size);
    EXPECT_TRUE(t.ok()) << t.status();
    if (!t.ok()) return false;
    tokenizer = std::move(*t);
    worker::BackendOptions bo;
    bo.num_threads = threads;
    auto b = worker::BackendRegistry::Create("cpu", bo);
    EXPECT_TRUE(b.ok()) << b.status();
    if (!b.ok()) return false;
    backend = std::move(*b);
    return true;
  }

  std::vector<int32_t> Encode(const std::string& text) const {
    auto t = tokenizer->Encode(text, /*add_bos=*/true);
    EXPECT_TRUE(t.ok()) << t.status();
    return t.ok() ? *t : std::vector<int32_t>{};
  }
};

inline int32_t Argmax(std::span<const float> v) {
  return static_cast<int32_t>(std::max_element(v.begin(), v.end()) - v.begin());
}

// max_i |a_i - b_i| / max(1, max_i |b_i|): the error relative to the logits'
// scale (float rounding in a differently ordered softmax sum).
inline double MaxRelDiff(std::span<const float> a, std::span<const float> b) {
  EXPECT_EQ(a.size(), b.size());
  double worst = 0.0, scale = 1.0;
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) {
    worst = std::max(worst, std::abs(double(a[i]) - b[i]));
    scale = std::max(scale, std::abs(double(b[i])));
  }
  return worst / scale;
}

}  // namespace kvr::test_support
