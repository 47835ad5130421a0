// The retrieval-attention engine against the full-attention model
// (LlamaModel) on stories260K, the coverage invariant (every token attended
// exactly once: sinks ∪ node ∪ window = [0, pos]), sampling, generation, and
// the in-process retrieval node against exact attention and on bad input.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "tests/support/models.h"
#include "common/attention.h"
#include "gpu_worker/engine/generation.h"
#include "gpu_worker/engine/retrieval_engine.h"
#include "gpu_worker/engine/sampler.h"
#include "gpu_worker/model/generate.h"
#include "gpu_worker/model/llama2c_loader.h"
#include "gpu_worker/model/llama2c_tokenizer.h"
#include "gpu_worker/model/llama_model.h"
#include "gtest/gtest.h"
#include "retrieval_node/client/in_process_client.h"

namespace kvr::worker {
namespace {

using retrieval::IndexType;
using retrieval::NodeCoreOptions;
using retrieval::InProcessRetrievalClient;

constexpr char kLongPrompt[] =
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the "
    "park with her friends. One day, she saw a big red ball under a tree.";

class EngineTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::string model = test_support::BundledModelPath("stories260K.bin"), tok = test_support::BundledModelPath("tok512.bin");
    if (model.empty() || tok.empty()) {
      GTEST_FAIL() << "the bundled stories260K model is missing";
    }
    auto w = LoadLlama2c(model);
    ASSERT_TRUE(w.ok()) << w.status();
    weights_ = *w;
    auto t = Llama2cTokenizer::Load(tok, weights_->config.vocab_size);
    ASSERT_TRUE(t.ok()) << t.status();
    tokenizer_ = std::move(*t);
    BackendOptions bo;
    bo.num_threads = 1;
    auto b = BackendRegistry::Create("cpu", bo);
    ASSERT_TRUE(b.ok()) << b.status();
    backend_ = std::move(*b);
    auto m = LlamaModel::Create(backend_.get(), weights_);
    ASSERT_TRUE(m.ok()) << m.status();
    full_ = std::move(*m);
    MakeEngine(NodeCoreOptions{});
  }

  void MakeEngine(const NodeCoreOptions& node_options) {
    engine_.reset();
    auto n = InProcessRetrievalClient::Create(node_options);
    ASSERT_TRUE(n.ok()) << n.status();
    node_ = std::move(*n);
    auto e = RetrievalEngine::Create(backend_.get(), weights_, node_.get());
    ASSERT_TRUE(e.ok()) << e.status();
    engine_ = std::move(*e);
  }

  std::vector<int32_t> Encode(const std::string& text) {
    auto t = tokenizer_->Encode(text, /*add_bos=*/true);
    EXPECT_TRUE(t.ok()) << t.status();
    return t.ok() ? *t : std::vector<int32_t>{};
  }

  static int32_t Argmax(std::span<const float> v) {
    return static_cast<int32_t>(std::max_element(v.begin(), v.end()) - v.begin());
  }

  // max_i |a_i - b_i| / max(1, max_i |b_i|): the error relative to the
  // logits' scale (float rounding in a differently ordered softmax sum).
  static double MaxRelDiff(std::span<const float> a, std::span<const float> b) {
    EXPECT_EQ(a.size(), b.size());
    double worst = 0.0, scale = 1.0;
    for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) {
      worst = std::max(worst, std::abs(double(a[i]) - b[i]));
      scale = std::max(scale, std::abs(double(b[i])));
    }
    return worst / scale;
  }

  // Checks the engine's last step: sinks ∪ node ∪ window == [0, pos], disjoint,
  // and the node holds exactly [node_begin, node_end) for every (layer, kv head).
  void CheckCoverage() {
    const StepCoverage& c = engine_->last_coverage();
    const AttentionOptions& a = engine_->attention();
    ASSERT_EQ(c.pos + 1, engine_->position());
    EXPECT_EQ(c.sink_end, std::min<int64_t>(a.sinks, c.pos + 1));
    EXPECT_EQ(c.node_begin, a.sinks);
    EXPECT_EQ(c.node_end, c.window_begin);
    EXPECT_EQ(c.window_end, c.pos + 1);
    EXPECT_LE(c.window_end - c.window_begin, a.window);
    EXPECT_EQ(c.attended(), c.pos + 1) << "pos " << c.pos;
    const LlamaConfig& cfg = engine_->config();
    for (int l = 0; l < cfg.n_layers; ++l) {
      for (int g = 0; g < cfg.n_kv_heads; ++g) {
        auto held = node_->core().HeldPositions(engine_->sequence_id(), l, g);
        ASSERT_TRUE(held.ok()) << held.status();
        ASSERT_EQ(static_cast<int64_t>(held->size()), c.node_end - c.node_begin)
            << "layer " << l << " kv head " << g << " pos " << c.pos;
        for (size_t i = 0; i < held->size(); ++i) {
          ASSERT_EQ((*held)[i], c.node_begin + static_cast<int64_t>(i));
        }
      }
    }
  }

  // Teacher-forced comparison with the full-attention model: the full model's
  // greedy tokens drive both; returns the worst logit difference and the
  // fraction of steps whose argmax agrees.
  struct Comparison {
    double max_rel_diff = 0.0;
    double top1_agreement = 0.0;
    int64_t max_node_tokens = 0;
  };
  Comparison CompareWithFull(const std::vector<int32_t>& prompt, const AttentionOptions& options,
                             int steps, bool check_coverage) {
    Comparison out;
    auto ref = full_->Prefill(prompt);
    auto got = engine_->Prefill(prompt, options);
    EXPECT_TRUE(ref.ok() && got.ok()) << ref.status() << got.status();
    if (!ref.ok() || !got.ok()) return out;
    std::vector<float> ref_logits(ref->begin(), ref->end());
    out.max_rel_diff = MaxRelDiff(*got, ref_logits);
    int agree = 0;
    int64_t pos = static_cast<int64_t>(prompt.size());
    for (int step = 0; step < steps; ++step) {
      const int32_t token = Argmax(ref_logits);
      agree += Argmax(*got) == token;
      auto r = full_->DecodeStep(token, pos++);
      got = engine_->DecodeStep(token);
      EXPECT_TRUE(r.ok() && got.ok()) << r.status() << got.status();
      if (!r.ok() || !got.ok()) return out;
      ref_logits.assign(r->begin(), r->end());
      out.max_rel_diff = std::max(out.max_rel_diff, MaxRelDiff(*got, ref_logits));
      out.max_node_tokens = std::max(out.max_node_tokens, engine_->stats().offloaded_tokens);
      if (check_coverage) CheckCoverage();
    }
    out.top1_agreement = double(agree) / steps;
    return out;
  }

  // `req` generated in full, then in retrieval mode, on the fixture's engine.
  std::pair<GenerateResult, GenerateResult> FullThenRetrieval(GenerateRequest req) {
    req.attention.mode = AttentionMode::kFull;
    auto full = Generate(*engine_, *tokenizer_, req);
    EXPECT_TRUE(full.ok()) << full.status();
    req.attention.mode = AttentionMode::kRetrieval;
    auto retr = Generate(*engine_, *tokenizer_, req);
    EXPECT_TRUE(retr.ok()) << retr.status();
    return {full.ok() ? *std::move(full) : GenerateResult{},
            retr.ok() ? *std::move(retr) : GenerateResult{}};
  }

  std::shared_ptr<const LlamaWeights> weights_;
  std::unique_ptr<Llama2cTokenizer> tokenizer_;
  std::unique_ptr<Backend> backend_;
  std::unique_ptr<LlamaModel> full_;
  std::unique_ptr<InProcessRetrievalClient> node_;
  std::unique_ptr<RetrievalEngine> engine_;
};

TEST_F(EngineTest, WindowCoveringTheContextEqualsFullAttention) {
  AttentionOptions o;
  o.sinks = 4;
  o.window = 512;
  const Comparison c = CompareWithFull(Encode("Once upon a time"), o, 100, true);
  std::printf("window covers context: max logit rel diff %.3g\n", c.max_rel_diff);
  EXPECT_LE(c.max_rel_diff, 1e-5);
  EXPECT_EQ(c.top1_agreement, 1.0);
  EXPECT_EQ(c.max_node_tokens, 0);
  auto stats = node_->Stats();
  ASSERT_TRUE(stats.ok());
  EXPECT_EQ(stats->indexed_keys + stats->tail_keys, 0);
}

TEST_F(EngineTest, FullModeEqualsLlamaModel) {
  AttentionOptions o;
  o.mode = AttentionMode::kFull;
  const Comparison c = CompareWithFull(Encode("Once upon a time"), o, 50, false);
  EXPECT_EQ(c.max_rel_diff, 0.0);
}

// Flat retrieval with k >= offloaded tokens is exact: logits match full
// attention while tokens are offloaded at prefill, appended, and sealed.
TEST_F(EngineTest, FlatRetrievalWithLargeKEqualsFullAttention) {
  NodeCoreOptions no;
  no.tail_capacity = 16;
  MakeEngine(no);
  AttentionOptions o;
  o.sinks = 4;
  o.window = 16;
  o.top_k = 512;
  o.index = IndexType::kFlat;
  for (const char* prompt : {"Once upon a time", kLongPrompt}) {
    const std::vector<int32_t> tokens = Encode(prompt);
    const Comparison c = CompareWithFull(tokens, o, 100, true);
    std::printf("flat, k >= offloaded (%zu-token prompt): max logit rel diff %.3g, %lld tokens "
                "on the node at the end\n",
                tokens.size(), c.max_rel_diff, static_cast<long long>(c.max_node_tokens));
    EXPECT_LE(c.max_rel_diff, 1e-5) << prompt;
    EXPECT_EQ(c.top1_agreement, 1.0) << prompt;
    EXPECT_GT(c.max_node_tokens, 60) << prompt;
    auto stats = node_->Stats();
    ASSERT_TRUE(stats.ok());
    EXPECT_GT(stats->indexed_keys + stats->tail_keys, 0);
    EXPECT_GT(stats->seals, 0);
  }
}

// The same with the graph and IVF indexes when k covers every key (graph
// search with beam >= k reaches every key; IVF clamps to all lists).
TEST_F(EngineTest, ApproximateIndexesWithLargeKEqualFullAttention) {
  NodeCoreOptions no;
  no.tail_capacity = 16;
  no.min_index_keys = 8;
  no.ivf.default_nprobe = 1 << 20;
  MakeEngine(no);
  for (IndexType type : {IndexType::kGraph, IndexType::kIvf}) {
    AttentionOptions o;
    o.top_k = 512;
    o.beam = 1024;
    o.index = type;
    const Comparison c = CompareWithFull(Encode(kLongPrompt), o, 60, true);
    std::printf("%s, k >= offloaded: max logit rel diff %.3g\n",
                std::string(retrieval::IndexTypeName(type)).c_str(), c.max_rel_diff);
    EXPECT_LE(c.max_rel_diff, 1e-5) << retrieval::IndexTypeName(type);
  }
}

// Greedy generation with the attention-graph index at the tiny-model
// defaults (sinks 4, window 16, k 16) against full attention.
TEST_F(EngineTest, GraphRetrievalGreedyAgreesWithFullAttention) {
  GenerateRequest req;
  req.prompt = "Once upon a time";
  req.max_tokens = 100;
  const auto [full, retr] = FullThenRetrieval(req);
  ASSERT_EQ(full.tokens.size(), 100u);
  int agree = 0;
  for (size_t i = 0; i < 100 && i < retr.tokens.size(); ++i) {
    agree += full.tokens[i] == retr.tokens[i];
  }
  std::printf("graph retrieval greedy agreement (first 100 tokens): %d%%\n", agree);
  EXPECT_GE(agree, 90);
  EXPECT_GT(retr.stats.node_held_tokens, 0);
  auto stats = node_->Stats();
  ASSERT_TRUE(stats.ok());
  EXPECT_GT(stats->indexed_keys, 0);  // a tail was sealed into a graph

  // Teacher-forced with a prompt that is offloaded (graph built at prefill
  // from the prefill queries' exact top-k).
  AttentionOptions o;
  const Comparison c = CompareWithFull(Encode(kLongPrompt), o, 100, true);
  std::printf("graph retrieval teacher-forced top-1 agreement (long prompt): %.2f\n",
              c.top1_agreement);
  EXPECT_GE(c.top1_agreement, 0.9);
}

// A prompt shorter than the sinks (BOS + "The" = 2 tokens < 4): the first
// steps attend sinks only, then the window fills, then tokens leave it for the
// node. While everything is local, retrieval attention is full attention.
TEST_F(EngineTest, PromptShorterThanTheSinks) {
  GenerateRequest req;
  req.prompt = "The";
  req.max_tokens = 40;
  ASSERT_LT(Encode(req.prompt).size(), static_cast<size_t>(req.attention.sinks));
  const auto [full, retr] = FullThenRetrieval(req);
  ASSERT_EQ(retr.tokens.size(), 40u);
  const size_t local = static_cast<size_t>(req.attention.sinks + req.attention.window) -
                       Encode(req.prompt).size();
  for (size_t i = 0; i < local; ++i) EXPECT_EQ(retr.tokens[i], full.tokens[i]) << "token " << i;
  EXPECT_GT(retr.stats.node_held_tokens, 0);  // later tokens did leave the window
}

TEST_F(EngineTest, GreedyGenerationMatchesLlama2c) {
  GenerateRequest req;
  req.prompt = "Once upon a time";
  req.max_tokens = 11;
  auto r = Generate(*engine_, *tokenizer_, req);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->text, ", there was a little girl named Lily.");
}

TEST_F(EngineTest, Sampling) {
  GenerateRequest req;
  req.prompt = "Once upon a time";
  req.max_tokens = 60;
  auto greedy = Generate(*engine_, *tokenizer_, req);
  ASSERT_TRUE(greedy.ok()) << greedy.status();

  // top_k = 1 is greedy whatever the temperature.
  req.sampling.temperature = 1.5f;
  req.sampling.top_k = 1;
  auto top1 = Generate(*engine_, *tokenizer_, req);
  ASSERT_TRUE(top1.ok()) << top1.status();
  EXPECT_EQ(top1->tokens, greedy->tokens);

  // Same seed, same text; another seed, (here) another text.
  req.sampling.top_k = 0;
  req.sampling.temperature = 1.0f;
  req.sampling.top_p = 0.95f;
  req.sampling.seed = 7;
  auto a = Generate(*engine_, *tokenizer_, req);
  auto b = Generate(*engine_, *tokenizer_, req);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->text, b->text);
  EXPECT_EQ(a->tokens, b->tokens);
  req.sampling.seed = 8;
  auto c = Generate(*engine_, *tokenizer_, req);
  ASSERT_TRUE(c.ok());
  EXPECT_NE(a->tokens, c->tokens);

  // Bad parameters.
  for (float t : {std::numeric_limits<float>::quiet_NaN(), -0.5f,
                  std::numeric_limits<float>::infinity()}) {
    GenerateRequest bad = req;
    bad.sampling.temperature = t;
    EXPECT_EQ(Generate(*engine_, *tokenizer_, bad).status().code(),
              absl::StatusCode::kInvalidArgument)
        << t;
  }
  for (float p : {0.0f, -0.1f, 1.01f, std::numeric_limits<float>::quiet_NaN()}) {
    GenerateRequest bad = req;
    bad.sampling.top_p = p;
    auto s = Generate(*engine_, *tokenizer_, bad).status();
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << p;
    EXPECT_NE(s.message().find("top_p"), absl::string_view::npos) << s;
  }
  GenerateRequest bad = req;
  bad.sampling.repetition_penalty = 0.0f;
  EXPECT_EQ(Generate(*engine_, *tokenizer_, bad).status().code(),
            absl::StatusCode::kInvalidArgument);
  bad = req;
  bad.attention.window = 0;
  EXPECT_EQ(Generate(*engine_, *tokenizer_, bad).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(SamplerTest, RepetitionPenaltyAndTopP) {
  SamplingParams p;
  p.repetition_penalty = 4.0f;
  auto s = Sampler::Create(p, 3);
  ASSERT_TRUE(s.ok());
  const std::vector<float> logits = {2.0f, 1.0f, -1.0f};
  const std::vector<int32_t> seen = {0};
  EXPECT_EQ(s->Sample(logits, {}), 0);
  EXPECT_EQ(s->Sample(logits, seen), 1);  // 2 / 4 = 0.5 < 1
  // A tiny nucleus keeps only the most likely token.
  p = SamplingParams{};
  p.temperature = 1.0f;
  p.top_p = 0.01f;
  auto n = Sampler::Create(p, 3);
  ASSERT_TRUE(n.ok());
  for (int i = 0; i < 20; ++i) EXPECT_EQ(n->Sample(logits, {}), 0);
}

TEST_F(EngineTest, StopStringsAndStreaming) {
  GenerateRequest req;
  req.prompt = "Once upon a time";
  req.max_tokens = 50;
  req.stop = {"Lily"};
  std::string streamed;
  auto r = Generate(*engine_, *tokenizer_, req, [&](std::string_view p) { streamed += p; });
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->text, ", there was a little girl named ");
  EXPECT_EQ(r->finish, FinishReason::kStop);
  EXPECT_EQ(streamed, r->text);
  req.stop.clear();
  req.max_tokens = 20;
  streamed.clear();
  r = Generate(*engine_, *tokenizer_, req, [&](std::string_view p) { streamed += p; });
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->finish, FinishReason::kLength);
  EXPECT_EQ(r->tokens.size(), 20u);
  EXPECT_EQ(streamed, r->text);
}

TEST_F(EngineTest, EndSequenceFreesTheNode) {
  AttentionOptions o;
  ASSERT_TRUE(engine_->Prefill(Encode(kLongPrompt), o).ok());
  // Prefill hands uploads off without waiting; the first decode step waits
  // for them, so after it the node holds the prompt's shards.
  ASSERT_TRUE(engine_->DecodeStep(5).ok());
  auto st = node_->Stats();
  ASSERT_TRUE(st.ok());
  EXPECT_EQ(st->sequences, 1);
  EXPECT_GT(st->shards, 0);
  ASSERT_TRUE(engine_->EndSequence().ok());
  st = node_->Stats();
  ASSERT_TRUE(st.ok());
  EXPECT_EQ(st->sequences, 0);
  EXPECT_EQ(st->shards, 0);
  EXPECT_EQ(engine_->DecodeStep(5).status().code(), absl::StatusCode::kFailedPrecondition);
}

// ---- The in-process node on its own -------------------------------------

class NodeTest : public ::testing::Test {
 protected:
  static constexpr int kHeads = 4, kKvHeads = 2, kDim = 8, kLayers = 2;

  void SetUp() override {
    NodeCoreOptions o;
    o.tail_capacity = 8;
    auto n = InProcessRetrievalClient::Create(o);
    ASSERT_TRUE(n.ok());
    node_ = std::move(*n);
    spec_.sequence_id = 42;
    spec_.n_layers = kLayers;
    spec_.n_heads = kHeads;
    spec_.n_kv_heads = kKvHeads;
    spec_.head_dim = kDim;
    spec_.index_type = IndexType::kFlat;
    ASSERT_TRUE(node_->CreateSequence(spec_).ok());
  }

  static Matrix Random(size_t rows, size_t cols, uint32_t seed) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> nd;
    Matrix m(rows, cols);
    for (float& x : m.data) x = nd(rng);
    return m;
  }

  std::unique_ptr<InProcessRetrievalClient> node_;
  retrieval::SequenceSpec spec_;
};

// Upload + appends (sealed and not) with k >= keys: per query head, exact
// attention over its kv head's keys (GQA mapping h / (n_heads / n_kv_heads)).
TEST_F(NodeTest, AttendEqualsExactAttention) {
  const size_t n_up = 20, n_app = 13;
  Matrix keys[kKvHeads], values[kKvHeads];
  for (int g = 0; g < kKvHeads; ++g) {
    keys[g] = Random(n_up + n_app, kDim, 10 + g);
    values[g] = Random(n_up + n_app, kDim, 20 + g);
    retrieval::ShardUpload up;
    up.key = {42, 1, g, 0};
    up.first_position = 4;
    up.keys = keys[g].view().rows_slice(0, n_up);
    up.values = values[g].view().rows_slice(0, n_up);
    ASSERT_TRUE(node_->UploadShard(up).ok());
    for (size_t i = n_up; i < n_up + n_app; ++i) {
      retrieval::AppendRequest ap;
      ap.sequence_id = 42;
      ap.layer = 1;
      ap.kv_head = g;
      ap.first_position = 4 + static_cast<int64_t>(i);
      ap.keys = keys[g].view().rows_slice(i, 1);
      ap.values = values[g].view().rows_slice(i, 1);
      ASSERT_TRUE(node_->Append(ap).ok());
    }
  }
  auto stats = node_->Stats();
  ASSERT_TRUE(stats.ok());
  EXPECT_EQ(stats->indexed_keys + stats->tail_keys, int64_t{kKvHeads} * (n_up + n_app));
  EXPECT_GT(stats->seals, 0);
  EXPECT_GT(stats->tail_keys, 0);

  const Matrix q = Random(kHeads, kDim, 99);
  Partials got(kHeads, kDim);
  retrieval::AttendRequest req;
  req.sequence_id = 42;
  req.layer = 1;
  req.queries = q.view();
  req.k = 64;
  retrieval::AttendStats st;
  ASSERT_TRUE(node_->Attend(req, got.view(), &st).ok());
  EXPECT_EQ(st.keys_attended, int64_t{kHeads} * (n_up + n_app));
  const float scale = 1.0f / std::sqrt(float(kDim));
  for (int h = 0; h < kHeads; ++h) {
    const int g = h / (kHeads / kKvHeads);
    Partials want(1, kDim);
    const ValueMatrix v = ValueMatrix::FromFloat(kvr::DType::kF32, values[g].view());
    ASSERT_TRUE(ExactAttention(q.view().rows_slice(h, 1), keys[g].view(), v, scale, want.view()).ok());
    // Compare normalized outputs and the log-sum-exp.
    for (int j = 0; j < kDim; ++j) EXPECT_NEAR(got.o.row(h)[j], want.o.row(0)[j], 1e-5);
    EXPECT_NEAR(got.m[h] + std::log(got.l[h]), want.m[0] + std::log(want.l[0]), 1e-5);
  }
  // Layer 0 holds nothing: empty partials.
  req.layer = 0;
  ASSERT_TRUE(node_->Attend(req, got.view()).ok());
  for (int h = 0; h < kHeads; ++h) EXPECT_EQ(got.l[h], 0.0f);
}

TEST_F(NodeTest, BadInput) {
  const Matrix k = Random(4, kDim, 1), v = Random(4, kDim, 2), wide = Random(4, kDim + 1, 3);
  retrieval::AppendRequest ap;
  ap.sequence_id = 7;  // unknown
  ap.keys = k.view();
  ap.values = v.view();
  EXPECT_EQ(node_->Append(ap).code(), absl::StatusCode::kNotFound);
  Partials out(kHeads, kDim);
  const Matrix q = Random(kHeads, kDim, 4);
  retrieval::AttendRequest req;
  req.sequence_id = 7;
  req.queries = q.view();
  req.k = 4;
  EXPECT_EQ(node_->Attend(req, out.view()).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(node_->DropSequence(7).code(), absl::StatusCode::kNotFound);
  retrieval::ShardUpload up;
  up.key = {7, 0, 0, 0};
  up.keys = k.view();
  up.values = v.view();
  EXPECT_EQ(node_->UploadShard(up).code(), absl::StatusCode::kNotFound);

  // Dimension and range mismatches name the field and the limit.
  ap.sequence_id = 42;
  ap.keys = wide.view();
  absl::Status s = node_->Append(ap);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("keys dim 9 != head_dim 8"), absl::string_view::npos) << s;
  ap.keys = k.view();
  ap.layer = kLayers;
  s = node_->Append(ap);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("layer 2 outside [0, 2)"), absl::string_view::npos) << s;
  ap.layer = 0;
  ap.values = v.view().rows_slice(0, 3);
  EXPECT_EQ(node_->Append(ap).code(), absl::StatusCode::kInvalidArgument);
  ap.values = v.view();
  ASSERT_TRUE(node_->Append(ap).ok());
  // Positions already held.
  EXPECT_EQ(node_->Append(ap).code(), absl::StatusCode::kInvalidArgument);
  req.sequence_id = 42;
  const Matrix q3 = Random(kHeads - 1, kDim, 5);
  req.queries = q3.view();
  s = node_->Attend(req, out.view());
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("queries rows 3 != 4"), absl::string_view::npos) << s;
  req.queries = q.view();
  req.k = 0;
  EXPECT_EQ(node_->Attend(req, out.view()).code(), absl::StatusCode::kInvalidArgument);
  req.k = 4;
  EXPECT_TRUE(node_->Attend(req, out.view()).ok());
  up.key = {42, 0, 1, 0};
  const std::vector<int64_t> bad_ids = {0, 9};  // id 9 >= 4 keys
  up.train_topk = bad_ids;
  up.train_topk_width = 2;
  EXPECT_EQ(node_->UploadShard(up).code(), absl::StatusCode::kInvalidArgument);
  retrieval::SequenceSpec bad = spec_;
  bad.sequence_id = 43;
  bad.n_heads = 3;  // not a multiple of n_kv_heads
  EXPECT_EQ(node_->CreateSequence(bad).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(node_->CreateSequence(spec_).code(), absl::StatusCode::kAlreadyExists);

  // DropSequence frees the shards.
  auto st = node_->Stats();
  ASSERT_TRUE(st.ok());
  EXPECT_GT(st->shards, 0);
  ASSERT_TRUE(node_->DropSequence(42).ok());
  st = node_->Stats();
  ASSERT_TRUE(st.ok());
  EXPECT_EQ(st->sequences, 0);
  EXPECT_EQ(st->shards, 0);
  EXPECT_EQ(st->memory_bytes, 0);
}

}  // namespace
}  // namespace kvr::worker
