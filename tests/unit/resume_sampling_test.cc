// Resuming a generation on another process (issue 15, worker loss): the
// sampler's draw for the token at absolute position p depends only on
// (seed, p), so generating N tokens in one go equals generating k, then
// starting over from prompt + those k tokens (RequestLoop::Resume, what a
// worker does with GenerateRequest.resume_tokens) for the rest: token for
// token, text for text, for several seeds, temperatures, top_p, k, and both
// attention modes (stories260K on a fresh engine per run, as on another
// worker). Resume also reproduces the streamed text exactly: a resumed run
// streams what the first one would have streamed after token k, including
// text held back for a possible stop string and the first resumed piece's
// leading space.
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "gpu_worker/engine/generation.h"
#include "gpu_worker/engine/retrieval_engine.h"
#include "gpu_worker/engine/sampler.h"
#include "gtest/gtest.h"
#include "retrieval_node/client/in_process_client.h"
#include "tests/support/stories_model.h"

namespace kvr::worker {
namespace {

using retrieval::InProcessRetrievalClient;
using retrieval::NodeCoreOptions;

constexpr char kPrompt[] = "Once upon a time, there was a little girl named Lily. She";

// The same logits at every position, so the token drawn depends only on
// the uniform draw there.
std::vector<float> FlatLogits(int vocab) {
  std::vector<float> logits(static_cast<size_t>(vocab));
  for (int i = 0; i < vocab; ++i) {
    logits[static_cast<size_t>(i)] = 0.01f * static_cast<float>(i % 37);
  }
  return logits;
}

// A sampler's token at position p is the same whether it drew tokens at
// positions 0..p-1 first (one process) or starts at p (a resumed one).
TEST(PositionSamplingTest, DrawDependsOnlyOnSeedAndPosition) {
  constexpr int kVocab = 512;
  const std::vector<float> logits = FlatLogits(kVocab);
  for (uint64_t seed : {uint64_t{1}, uint64_t{7}, uint64_t{0xFFFFFFFFFFFFFFFFull}}) {
    SamplingParams p;
    p.temperature = 1.0f;
    p.seed = seed;
    auto one_go = Sampler::Create(p, kVocab);
    ASSERT_TRUE(one_go.ok()) << one_go.status();
    std::vector<int32_t> context = {1};
    std::vector<int32_t> drawn;
    for (int i = 0; i < 64; ++i) {
      drawn.push_back(one_go->Sample(logits, context));
      context.push_back(drawn.back());
    }
    // Fresh samplers, each asked only at position 1 + i.
    for (int i = 0; i < 64; i += 7) {
      auto fresh = Sampler::Create(p, kVocab);
      ASSERT_TRUE(fresh.ok());
      const std::span<const int32_t> prefix(context.data(), static_cast<size_t>(1 + i));
      EXPECT_EQ(fresh->Sample(logits, prefix), drawn[static_cast<size_t>(i)])
          << "seed " << seed << " position " << 1 + i;
    }
    EXPECT_EQ(Sampler::PositionUniform(seed, 5), Sampler::PositionUniform(seed, 5));
  }
  // Not a shifted copy of a neighbouring seed's stream, and not constant.
  EXPECT_NE(Sampler::PositionUniform(1, 1), Sampler::PositionUniform(2, 0));
  EXPECT_NE(Sampler::PositionUniform(1, 1), Sampler::PositionUniform(1, 2));
  double sum = 0.0;
  for (uint64_t i = 0; i < 4096; ++i) {
    const double u = Sampler::PositionUniform(3, i);
    ASSERT_GE(u, 0.0);
    ASSERT_LT(u, 1.0);
    sum += u;
  }
  EXPECT_NEAR(sum / 4096.0, 0.5, 0.02);  // mean of U[0,1): sd 0.0045 here
}

class ResumeSamplingTest : public ::testing::Test {
 protected:
  void SetUp() override { ASSERT_TRUE(model_.Load()); }

  // One run on a fresh node and engine (as on another worker): the result,
  // and the text streamed through on_text in *streamed.
  absl::StatusOr<GenerateResult> Run(const GenerateRequest& request, std::string* streamed) {
    NodeCoreOptions no;
    no.tail_capacity = 16;  // seals during the run: retrieval really retrieves
    no.min_index_keys = 8;
    auto node = InProcessRetrievalClient::Create(no);
    if (!node.ok()) return node.status();
    auto engine = RetrievalEngine::Create(model_.backend.get(), model_.weights, node->get(), {});
    if (!engine.ok()) return engine.status();
    return Generate(**engine, *model_.tokenizer, request,
                    [streamed](std::string_view piece) { streamed->append(piece); });
  }

  test_support::StoriesModel model_;
};

struct Case {
  float temperature;
  float top_p;
  uint64_t seed;
  AttentionMode mode;
};

TEST_F(ResumeSamplingTest, ResumedRunEqualsOneGo) {
  constexpr int kTokens = 40;
  const std::vector<Case> cases = {
      {0.0f, 1.0f, 1, AttentionMode::kRetrieval},   // greedy
      {1.0f, 1.0f, 7, AttentionMode::kRetrieval},
      {0.8f, 0.9f, 12345, AttentionMode::kRetrieval},
      {1.3f, 0.95f, 99, AttentionMode::kFull},
      {1.0f, 1.0f, 0xFFFFFFFFFFFFFFFFull, AttentionMode::kFull},
  };
  int compared = 0;
  for (const Case& c : cases) {
    GenerateRequest req;
    req.prompt = kPrompt;
    req.max_tokens = kTokens;
    req.sampling.temperature = c.temperature;
    req.sampling.top_p = c.top_p;
    req.sampling.seed = c.seed;
    req.attention.mode = c.mode;
    std::string streamed;
    absl::StatusOr<GenerateResult> whole = Run(req, &streamed);
    ASSERT_TRUE(whole.ok()) << whole.status();
    ASSERT_EQ(streamed, whole->text);
    ASSERT_GT(whole->tokens.size(), size_t{20}) << "seed " << c.seed << ": ended early";
    for (size_t k : {size_t{1}, size_t{9}, whole->tokens.size() - 1}) {
      SCOPED_TRACE(testing::Message() << "T=" << c.temperature << " top_p=" << c.top_p
                                      << " seed=" << c.seed << " k=" << k);
      GenerateRequest resumed = req;
      resumed.resume_tokens.assign(whole->tokens.begin(),
                                   whole->tokens.begin() + static_cast<std::ptrdiff_t>(k));
      std::string rest;
      absl::StatusOr<GenerateResult> r = Run(resumed, &rest);
      ASSERT_TRUE(r.ok()) << r.status();
      EXPECT_EQ(r->tokens, whole->tokens);
      EXPECT_EQ(r->text, whole->text);
      EXPECT_EQ(r->finish, whole->finish);
      EXPECT_EQ(r->prompt_tokens, whole->prompt_tokens);
      // What was streamed after the resume is the tail of the whole text
      // (the client already had the rest).
      ASSERT_LE(rest.size(), whole->text.size());
      EXPECT_EQ(whole->text.substr(whole->text.size() - rest.size()), rest);
      ++compared;
    }
  }
  EXPECT_EQ(compared, 15);
  // Different seeds do draw different tokens (the seed is really used).
  GenerateRequest a;
  a.prompt = kPrompt;
  a.max_tokens = kTokens;
  a.sampling.temperature = 1.0f;
  a.sampling.seed = 7;
  GenerateRequest b = a;
  b.sampling.seed = 8;
  std::string ignored;
  auto ra = Run(a, &ignored), rb = Run(b, &ignored);
  ASSERT_TRUE(ra.ok() && rb.ok());
  EXPECT_NE(ra->tokens, rb->tokens);
}

// RequestLoop::Resume, token by token with forced tokens (one-hot greedy
// logits): after replaying k tokens, TakeNew yields exactly what the
// uninterrupted loop yields after its k-th token, for every k, with a stop
// string whose prefix is held back across the resume point and pieces that
// start with a space (llama2.c strips the space only right after BOS).
TEST_F(ResumeSamplingTest, ReplayStreamsWhatTheFirstRunWould) {
  const Tokenizer& tok = *model_.tokenizer;
  const int vocab = model_.weights->config.vocab_size;
  const std::vector<int32_t> prompt = model_.Encode("Once upon");
  std::vector<int32_t> forced = model_.Encode("a time there was a big park. The park was fun.");
  forced.erase(forced.begin());  // no BOS among generated tokens (the encoder adds " " before "a")
  ASSERT_GT(forced.size(), size_t{8});
  const std::vector<std::string> stop = {"park was", "xyz"};
  auto step_logits = [&](int32_t id) {
    std::vector<float> l(static_cast<size_t>(vocab), 0.0f);
    l[static_cast<size_t>(id)] = 10.0f;
    return l;
  };
  auto make_loop = [&] {
    auto s = Sampler::Create(SamplingParams{}, vocab);
    EXPECT_TRUE(s.ok());
    return std::make_unique<RequestLoop>(prompt, 64, stop, *std::move(s), tok);
  };
  // The uninterrupted run: what TakeNew returned after each token.
  auto whole = make_loop();
  std::vector<std::string> text_after;  // text_after[i]: after token i + 1
  std::vector<int32_t> ids;
  std::string text;
  size_t n = 0;
  for (; n < forced.size(); ++n) {
    auto done = whole->Advance(step_logits(forced[n]),
                               static_cast<int64_t>(prompt.size() + n), 1 << 20);
    ASSERT_TRUE(done.ok()) << done.status();
    whole->TakeNew(&ids, &text);
    text_after.push_back(text);
    if (*done) break;
  }
  ASSERT_EQ(whole->finish(), FinishReason::kStop);  // "park was" occurs
  const size_t generated = ids.size();
  ASSERT_EQ(whole->text(), text);
  bool held_across = false;
  for (size_t k = 1; k < generated; ++k) {
    SCOPED_TRACE(testing::Message() << "k=" << k);
    auto resumed = make_loop();
    ASSERT_TRUE(resumed->Resume(std::vector<int32_t>(ids.begin(),
                                                     ids.begin() + static_cast<std::ptrdiff_t>(k)))
                    .ok());
    std::vector<int32_t> rest_ids;
    std::string rest_text;
    for (size_t i = 0; i < generated; ++i) {
      // Resume tokens are taken whatever the logits say (here: BOS, which
      // would end the generation if it were sampled).
      const int32_t logit_token = i < k ? tok.bos_id() : ids[i];
      auto done = resumed->Advance(step_logits(logit_token),
                                   static_cast<int64_t>(prompt.size() + i), 1 << 20);
      ASSERT_TRUE(done.ok());
      EXPECT_EQ(resumed->token(), ids[i]);
      resumed->TakeNew(&rest_ids, &rest_text);
      if (i + 1 == k) {
        EXPECT_TRUE(rest_ids.empty());  // replayed: nothing new to stream
        EXPECT_TRUE(rest_text.empty());
        EXPECT_EQ(resumed->replayed(), static_cast<int>(k));
      }
      if (*done) break;
    }
    EXPECT_EQ(resumed->finish(), FinishReason::kStop);
    EXPECT_EQ(std::vector<int32_t>(ids.begin() + static_cast<std::ptrdiff_t>(k), ids.end()),
              rest_ids);
    EXPECT_EQ(text_after[k - 1] + rest_text, text);
    EXPECT_EQ(resumed->text(), text);
    // The first run had decoded more than it streamed at k: "park" held back.
    std::string decoded;
    for (size_t i = 0; i < k; ++i) {
      decoded += *tok.Decode(i == 0 ? prompt.back() : ids[i - 1], ids[i]);
    }
    if (decoded.size() > text_after[k - 1].size()) held_across = true;
  }
  EXPECT_TRUE(held_across) << "no resume point had held-back text: the case tests nothing";
  EXPECT_EQ(text.find(" a time"), 0u) << text;  // the leading space is kept after a prompt

  // Hostile resumes are refused, naming the field.
  auto too_many = make_loop();
  absl::Status s = too_many->Resume(std::vector<int32_t>(65, forced[0]));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("max_tokens 64"), std::string::npos) << s;
  auto eos = make_loop();
  s = eos->Resume(std::vector<int32_t>{forced[0], tok.eos_id()});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("resume_tokens[1]"), std::string::npos) << s;
}

}  // namespace
}  // namespace kvr::worker
