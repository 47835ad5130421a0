// Many sequences on one RetrievalEngine (stories260K): interleaved and
// batched decode steps give every sequence exactly the logits and tokens it
// gets alone (full and retrieval modes, greedy and seeded sampling);
// cancellation (API and token, from another thread) drops a sequence's
// shards while the others go on unaffected; the pipelined prefill hand-off
// (uploads on background threads, awaited per layer at the first decode
// step) gives the same logits as the synchronous hand-off and really does
// not block prefill; decode steps of running sequences interleave with a new
// sequence's prefill layers.
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "tests/support/forwarding_client.h"
#include "tests/support/models.h"
#include "gpu_worker/engine/generation.h"
#include "gpu_worker/engine/retrieval_engine.h"
#include "gpu_worker/model/llama2c_loader.h"
#include "gpu_worker/model/llama2c_tokenizer.h"
#include "gtest/gtest.h"
#include "retrieval_node/client/in_process_client.h"

namespace kvr::worker {
namespace {

using retrieval::IndexType;
using retrieval::NodeCoreOptions;
using retrieval::InProcessRetrievalClient;

constexpr char kStory[] =
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the "
    "park with her friends. One day, she saw a big red ball under a tree.";
constexpr char kStory2[] =
    "Tom had a small dog called Max. Every morning they ran to the river and looked at the "
    "fish. One day Max found a shiny stone in the water.";

// A RetrievalClient that forwards to a node but holds every UploadShard until
// Release() (or a timeout: DeadlineExceeded), and can fail uploads.
class GatedClient final : public test_support::ForwardingRetrievalClient {
 public:
  explicit GatedClient(retrieval::RetrievalClient* node) : ForwardingRetrievalClient(node) {}

  void Release() {
    std::lock_guard<std::mutex> lock(mu_);
    open_ = true;
    cv_.notify_all();
  }
  void FailUploads(absl::Status st) {
    std::lock_guard<std::mutex> lock(mu_);
    fail_ = std::move(st);
  }
  int uploads_done() {
    std::lock_guard<std::mutex> lock(mu_);
    return done_;
  }

  absl::Status UploadShard(const retrieval::ShardUpload& upload) override {
    {
      std::unique_lock<std::mutex> lock(mu_);
      if (!cv_.wait_for(lock, std::chrono::seconds(20), [&] { return open_; })) {
        return absl::DeadlineExceededError("GatedClient: upload gate never opened");
      }
      if (!fail_.ok()) return fail_;
    }
    absl::Status st = ForwardingRetrievalClient::UploadShard(upload);
    std::lock_guard<std::mutex> lock(mu_);
    ++done_;
    return st;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool open_ = false;
  absl::Status fail_;
  int done_ = 0;
};

class EngineMultiTest : public ::testing::Test {
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
  }

  std::unique_ptr<InProcessRetrievalClient> MakeNode() {
    NodeCoreOptions no;
    no.tail_capacity = 16;  // seals during the runs below
    no.min_index_keys = 8;
    auto n = InProcessRetrievalClient::Create(no);
    EXPECT_TRUE(n.ok()) << n.status();
    return n.ok() ? std::move(*n) : nullptr;
  }

  std::unique_ptr<RetrievalEngine> MakeEngine(retrieval::RetrievalClient* client,
                                              EngineOptions options = {}) {
    auto e = RetrievalEngine::Create(backend_.get(), weights_, client, options);
    EXPECT_TRUE(e.ok()) << e.status();
    return e.ok() ? std::move(*e) : nullptr;
  }

  std::vector<int32_t> Encode(const std::string& text) {
    auto t = tokenizer_->Encode(text, /*add_bos=*/true);
    EXPECT_TRUE(t.ok()) << t.status();
    return t.ok() ? *t : std::vector<int32_t>{};
  }

  // ~n tokens of repeated story text.
  std::vector<int32_t> LongPrompt(size_t n) {
    std::string text;
    std::vector<int32_t> tokens;
    while (tokens.size() < n) {
      text += std::string(kStory) + " ";
      tokens = Encode(text);
    }
    tokens.resize(n);
    return tokens;
  }

  static int32_t Argmax(std::span<const float> v) {
    return static_cast<int32_t>(std::max_element(v.begin(), v.end()) - v.begin());
  }

  // Greedy logits of `steps` decode steps of one sequence run alone on a
  // fresh engine and node: logits[0] after prefill, then one per step.
  std::vector<std::vector<float>> Alone(const std::vector<int32_t>& prompt,
                                        const AttentionOptions& a, int steps) {
    auto node = MakeNode();
    auto engine = MakeEngine(node.get());
    std::vector<std::vector<float>> out;
    auto logits = engine->Prefill(prompt, a);
    EXPECT_TRUE(logits.ok()) << logits.status();
    if (!logits.ok()) return out;
    out.emplace_back(logits->begin(), logits->end());
    for (int i = 0; i < steps; ++i) {
      logits = engine->DecodeStep(Argmax(out.back()));
      EXPECT_TRUE(logits.ok()) << logits.status();
      if (!logits.ok()) return out;
      out.emplace_back(logits->begin(), logits->end());
    }
    return out;
  }

  static AttentionOptions Retrieval(IndexType index = IndexType::kGraph) {
    AttentionOptions a;
    a.sinks = 4;
    a.window = 16;
    a.top_k = 16;
    a.index = index;
    return a;
  }
  static AttentionOptions Full() {
    AttentionOptions a;
    a.mode = AttentionMode::kFull;
    return a;
  }

  std::shared_ptr<const LlamaWeights> weights_;
  std::unique_ptr<Llama2cTokenizer> tokenizer_;
  std::unique_ptr<Backend> backend_;
};

// Three sequences (retrieval graph, retrieval flat, full) started at
// different times and stepped interleaved — one at a time in rotating order,
// then as one batch — produce bit-identical logits to each run alone.
TEST_F(EngineMultiTest, InterleavedAndBatchedStepsEqualAlone) {
  const std::vector<int32_t> p0 = Encode(kStory), p1 = Encode(kStory2), p2 = Encode("Once upon");
  const AttentionOptions a0 = Retrieval(), a1 = Retrieval(IndexType::kFlat), a2 = Full();
  constexpr int kSteps = 60;
  const auto want0 = Alone(p0, a0, kSteps), want1 = Alone(p1, a1, kSteps),
             want2 = Alone(p2, a2, kSteps);
  ASSERT_EQ(want0.size(), kSteps + 1u);
  ASSERT_EQ(want1.size(), kSteps + 1u);
  ASSERT_EQ(want2.size(), kSteps + 1u);

  for (bool batched : {false, true}) {
    SCOPED_TRACE(batched ? "batched" : "round-robin");
    auto node = MakeNode();
    auto engine = MakeEngine(node.get());
    const std::vector<int32_t>* prompts[3] = {&p0, &p1, &p2};
    const AttentionOptions* opts[3] = {&a0, &a1, &a2};
    const std::vector<std::vector<float>>* want[3] = {&want0, &want1, &want2};
    std::unique_ptr<EngineSequence> seqs[3];
    int done[3] = {0, 0, 0};  // steps run
    // Sequence i starts after sequence i-1 has run 7 steps.
    for (int round = 0; done[2] < kSteps; ++round) {
      for (int i = 0; i < 3; ++i) {
        if (seqs[i] == nullptr && (i == 0 || done[i - 1] >= 7)) {
          auto s = engine->StartSequence(*prompts[i], *opts[i]);
          ASSERT_TRUE(s.ok()) << s.status();
          seqs[i] = std::move(*s);
          ASSERT_EQ(std::vector<float>(seqs[i]->logits().begin(), seqs[i]->logits().end()),
                    (*want[i])[0])
              << "prefill of sequence " << i;
        }
      }
      std::vector<EngineSequence*> batch;
      std::vector<int32_t> tokens;
      std::vector<int> which;
      for (int k = 0; k < 3; ++k) {
        const int i = (k + round) % 3;  // rotate the order
        if (seqs[i] == nullptr || done[i] >= kSteps) continue;
        batch.push_back(seqs[i].get());
        tokens.push_back(Argmax((*want[i])[done[i]]));
        which.push_back(i);
      }
      if (batched) {
        std::vector<absl::Status> st(batch.size());
        ASSERT_TRUE(engine->StepBatch(batch, tokens, st).ok());
        for (size_t j = 0; j < batch.size(); ++j) ASSERT_TRUE(st[j].ok()) << st[j];
      } else {
        for (size_t j = 0; j < batch.size(); ++j) {
          ASSERT_TRUE(engine->Step(*batch[j], tokens[j]).ok());
        }
      }
      for (size_t j = 0; j < batch.size(); ++j) {
        const int i = which[j];
        ++done[i];
        const std::span<const float> got = batch[j]->logits();
        ASSERT_EQ(std::vector<float>(got.begin(), got.end()), (*want[i])[done[i]])
            << "sequence " << i << " step " << done[i];
        // Coverage: every position attended exactly once, per sequence.
        const StepCoverage& c = batch[j]->last_coverage();
        ASSERT_EQ(c.attended(), c.pos + 1);
        ASSERT_EQ(c.pos + 1, batch[j]->position());
        if (opts[i]->mode == AttentionMode::kRetrieval) {
          for (int l = 0; l < weights_->config.n_layers; ++l) {
            auto held = node->core().HeldPositions(batch[j]->id(), l, 0);
            ASSERT_TRUE(held.ok()) << held.status();
            ASSERT_EQ(static_cast<int64_t>(held->size()), c.node_end - c.node_begin);
          }
        }
      }
    }
    EXPECT_NE(seqs[0]->id(), seqs[1]->id());
    EXPECT_NE(seqs[1]->id(), seqs[2]->id());
    EXPECT_GT(seqs[0]->stats().node_held_tokens, 0);
    EXPECT_GT(seqs[1]->stats().node_held_tokens, 0);
    auto st = node->Stats();
    ASSERT_TRUE(st.ok());
    EXPECT_EQ(st->sequences, 2);  // the full-attention one never goes to the node
    EXPECT_GT(st->seals, 0);
    for (auto& s : seqs) s.reset();
    st = node->Stats();
    ASSERT_TRUE(st.ok());
    EXPECT_EQ(st->sequences, 0);
    EXPECT_EQ(st->memory_bytes, 0);
  }
}

// GenerateBatch (batched and round-robin, fewer slots than requests) gives
// every request the tokens it gets alone, greedy and sampled with seeds.
TEST_F(EngineMultiTest, GenerateBatchEqualsGenerateAlone) {
  std::vector<GenerateRequest> reqs;
  const char* prompts[] = {kStory, kStory2, "Once upon a time", kStory, "Lily and Ben"};
  for (int i = 0; i < 5; ++i) {
    GenerateRequest r;
    r.prompt = prompts[i];
    r.max_tokens = 50 + 10 * i;
    r.attention = i == 2 ? Full() : Retrieval(i == 4 ? IndexType::kIvf : IndexType::kGraph);
    if (i % 2 == 1 || i == 3) {
      r.sampling.temperature = 1.0f;
      r.sampling.top_p = 0.9f;
      r.sampling.seed = 100 + i;
    }
    reqs.push_back(r);
  }
  std::vector<GenerateResult> alone;
  for (const GenerateRequest& r : reqs) {
    auto node = MakeNode();
    auto engine = MakeEngine(node.get());
    auto g = Generate(*engine, *tokenizer_, r);
    ASSERT_TRUE(g.ok()) << g.status();
    alone.push_back(*g);
  }
  // Requests 0 and 3 share a prompt but not the sampling: different tokens.
  EXPECT_NE(alone[0].tokens, alone[3].tokens);

  for (bool batched : {true, false}) {
    SCOPED_TRACE(batched ? "batched" : "round-robin");
    auto node = MakeNode();
    auto engine = MakeEngine(node.get());
    BatchOptions bo;
    bo.max_active = 3;
    bo.batched = batched;
    std::vector<std::string> streamed(reqs.size());
    auto results = GenerateBatch(*engine, *tokenizer_, reqs, bo,
                                 [&](size_t i, std::string_view p) { streamed[i] += p; });
    ASSERT_EQ(results.size(), reqs.size());
    for (size_t i = 0; i < reqs.size(); ++i) {
      ASSERT_TRUE(results[i].ok()) << i << ": " << results[i].status();
      EXPECT_EQ(results[i]->tokens, alone[i].tokens) << "request " << i;
      EXPECT_EQ(results[i]->text, alone[i].text) << "request " << i;
      EXPECT_EQ(results[i]->finish, alone[i].finish) << "request " << i;
      EXPECT_EQ(streamed[i], results[i]->text) << "request " << i;
    }
    auto st = node->Stats();
    ASSERT_TRUE(st.ok());
    EXPECT_EQ(st->sequences, 0);  // every finished request dropped its shards
    EXPECT_EQ(st->shards, 0);
  }

  // A bad request fails alone.
  std::vector<GenerateRequest> mixed = {reqs[0], reqs[1]};
  mixed[1].sampling.top_p = 0.0f;
  auto node = MakeNode();
  auto engine = MakeEngine(node.get());
  auto results = GenerateBatch(*engine, *tokenizer_, mixed);
  ASSERT_TRUE(results[0].ok()) << results[0].status();
  EXPECT_EQ(results[0]->tokens, alone[0].tokens);
  EXPECT_EQ(results[1].status().code(), absl::StatusCode::kInvalidArgument);
}

// Cancel by API and by token from another thread: the cancelled sequence's
// shards and bytes leave the node at once / at its next step; the other
// sequence keeps producing exactly its solo logits.
TEST_F(EngineMultiTest, CancellationDropsShardsOthersUnaffected) {
  const std::vector<int32_t> p0 = Encode(kStory), p1 = Encode(kStory2);
  const AttentionOptions a = Retrieval();
  constexpr int kSteps = 40;
  const auto want1 = Alone(p1, a, kSteps);
  ASSERT_EQ(want1.size(), kSteps + 1u);

  for (bool by_token : {false, true}) {
    SCOPED_TRACE(by_token ? "token from another thread" : "engine Cancel");
    auto node = MakeNode();
    auto engine = MakeEngine(node.get());
    auto s0 = engine->StartSequence(p0, a);
    auto s1 = engine->StartSequence(p1, a);
    ASSERT_TRUE(s0.ok() && s1.ok()) << s0.status() << s1.status();
    EngineSequence& victim = **s0;
    EngineSequence& other = **s1;
    const uint64_t victim_id = victim.id();
    int32_t t0 = Argmax(victim.logits());
    for (int step = 0; step < kSteps; ++step) {
      if (step == 10) {
        auto shards = node->core().ListShards(victim_id);
        ASSERT_TRUE(shards.ok()) << shards.status();
        EXPECT_GT(shards->size(), 0u);
        if (by_token) {
          std::thread([&victim] { victim.Cancel(); }).join();
          EXPECT_TRUE(victim.cancelled());
        } else {
          ASSERT_TRUE(engine->Cancel(victim).ok());
          EXPECT_EQ(node->core().ListShards(victim_id).status().code(),
                    absl::StatusCode::kNotFound);
        }
      }
      EngineSequence* batch[2] = {&victim, &other};
      const int32_t tokens[2] = {t0, Argmax(want1[step])};
      std::vector<absl::Status> st(2);
      ASSERT_TRUE(engine->StepBatch(batch, tokens, st).ok());
      if (step < 10) {
        ASSERT_TRUE(st[0].ok()) << st[0];
        t0 = Argmax(victim.logits());
      } else {
        EXPECT_EQ(st[0].code(), absl::StatusCode::kCancelled) << st[0];
        EXPECT_FALSE(victim.active());
      }
      ASSERT_TRUE(st[1].ok()) << st[1];
      ASSERT_EQ(std::vector<float>(other.logits().begin(), other.logits().end()),
                want1[step + 1])
          << "step " << step;
      if (step >= 10) {
        // Nothing of the victim on the node; the node holds exactly `other`.
        EXPECT_EQ(node->core().ListShards(victim_id).status().code(), absl::StatusCode::kNotFound);
        auto stats = node->Stats();
        auto others = node->core().ListShards(other.id());
        ASSERT_TRUE(stats.ok() && others.ok());
        int64_t bytes = 0;
        for (const auto& s : *others) bytes += s.memory_bytes;
        EXPECT_EQ(stats->sequences, 1);
        EXPECT_EQ(stats->shards, static_cast<int64_t>(others->size()));
        EXPECT_EQ(stats->memory_bytes, bytes);
      }
    }
    EXPECT_EQ(engine->Step(victim, 5).status().code(), absl::StatusCode::kCancelled);
  }
}

// Cancelled before prefill finishes: nothing is left on the node.
TEST_F(EngineMultiTest, CancelledPrefillLeavesNothing) {
  auto node = MakeNode();
  auto engine = MakeEngine(node.get());
  CancelToken cancel;
  cancel.Cancel();
  auto s = engine->StartSequence(LongPrompt(200), Retrieval(), cancel);
  EXPECT_EQ(s.status().code(), absl::StatusCode::kCancelled) << s.status();
  auto st = node->Stats();
  ASSERT_TRUE(st.ok());
  EXPECT_EQ(st->sequences, 0);
  EXPECT_EQ(st->memory_bytes, 0);
}

// Generate on one thread, cancelled from another while it runs: it stops
// with finish "cancelled", keeps the text so far, and the node is empty.
TEST_F(EngineMultiTest, GenerateCancelledFromAnotherThread) {
  auto node = MakeNode();
  auto engine = MakeEngine(node.get());
  GenerateRequest req;
  req.prompt = kStory;
  req.max_tokens = 300;
  req.attention = Retrieval();
  std::mutex mu;
  std::condition_variable cv;
  int pieces = 0;
  bool cancelled = false;
  absl::StatusOr<GenerateResult> result;
  std::thread gen([&] {
    result = Generate(*engine, *tokenizer_, req, [&](std::string_view) {
      std::unique_lock<std::mutex> lock(mu);
      if (++pieces == 5) {
        cv.notify_all();
        cv.wait(lock, [&] { return cancelled; });  // hold until cancelled
      }
    });
  });
  {
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [&] { return pieces >= 5; });
    req.cancel.Cancel();  // the request's token (copied into the engine)
    cancelled = true;
    cv.notify_all();
  }
  gen.join();
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->finish, FinishReason::kCancelled);
  EXPECT_GE(result->tokens.size(), 5u);
  EXPECT_LT(result->tokens.size(), 300u);
  EXPECT_EQ(FinishReasonName(result->finish), "cancelled");
  auto st = node->Stats();
  ASSERT_TRUE(st.ok());
  EXPECT_EQ(st->sequences, 0);
  EXPECT_EQ(st->shards, 0);
}

// The pipelined hand-off (uploads on background threads, a 2-slot staging
// ring so slots are reused while uploads run) gives exactly the logits of the
// synchronous hand-off, and the coverage invariant holds from the first step.
TEST_F(EngineMultiTest, PipelinedHandOffEqualsSynchronous) {
  const std::vector<int32_t> prompt = LongPrompt(400);
  for (IndexType index : {IndexType::kGraph, IndexType::kFlat}) {
    SCOPED_TRACE(std::string(retrieval::IndexTypeName(index)));
    const AttentionOptions a = Retrieval(index);
    std::vector<std::vector<float>> logits[2];
    for (int mode = 0; mode < 2; ++mode) {
      EngineOptions eo;
      eo.handoff_threads = mode == 0 ? 0 : 2;
      eo.handoff_depth = mode == 0 ? 0 : 2;
      auto node = MakeNode();
      auto engine = MakeEngine(node.get(), eo);
      auto l = engine->Prefill(prompt, a);
      ASSERT_TRUE(l.ok()) << l.status();
      logits[mode].emplace_back(l->begin(), l->end());
      for (int step = 0; step < 40; ++step) {
        l = engine->DecodeStep(Argmax(logits[0][step]));  // same tokens for both
        ASSERT_TRUE(l.ok()) << l.status();
        logits[mode].emplace_back(l->begin(), l->end());
        const StepCoverage& c = engine->last_coverage();
        ASSERT_EQ(c.attended(), c.pos + 1);
        for (int layer = 0; layer < weights_->config.n_layers; ++layer) {
          for (int g = 0; g < weights_->config.n_kv_heads; ++g) {
            auto held = node->core().HeldPositions(engine->sequence_id(), layer, g);
            ASSERT_TRUE(held.ok()) << held.status();
            ASSERT_EQ(static_cast<int64_t>(held->size()), c.node_end - c.node_begin);
            ASSERT_EQ(held->front(), c.node_begin);
            ASSERT_EQ(held->back(), c.node_end - 1);
          }
        }
      }
      EXPECT_EQ(engine->stats().offloaded_tokens, 400 - 16 - 4 + 40);
      EXPECT_GT(engine->stats().handoff_seconds, 0.0);
    }
    ASSERT_EQ(logits[0].size(), logits[1].size());
    for (size_t i = 0; i < logits[0].size(); ++i) {
      ASSERT_EQ(logits[0][i], logits[1][i]) << "step " << i;
    }
  }
}

// Prefill returns while every upload is still held back (so uploads do not
// block prefill compute), the first decode step waits for them, and the
// result equals the synchronous path. Upload errors surface at that step.
TEST_F(EngineMultiTest, PrefillDoesNotWaitForUploads) {
  const std::vector<int32_t> prompt = LongPrompt(120);
  const AttentionOptions a = Retrieval();
  const auto want = Alone(prompt, a, 5);  // default engine: pipelined too
  std::vector<std::vector<float>> sync;
  {
    EngineOptions eo;
    eo.handoff_threads = 0;
    auto node = MakeNode();
    auto engine = MakeEngine(node.get(), eo);
    auto l = engine->Prefill(prompt, a);
    ASSERT_TRUE(l.ok());
    sync.emplace_back(l->begin(), l->end());
    for (int i = 0; i < 5; ++i) {
      l = engine->DecodeStep(Argmax(sync.back()));
      ASSERT_TRUE(l.ok());
      sync.emplace_back(l->begin(), l->end());
    }
  }
  ASSERT_EQ(sync, want);

  auto node = MakeNode();
  GatedClient gated(node.get());
  auto engine = MakeEngine(&gated);
  auto l = engine->Prefill(prompt, a);
  ASSERT_TRUE(l.ok()) << l.status();
  EXPECT_EQ(gated.uploads_done(), 0);  // prefill finished with no upload done
  EXPECT_EQ(std::vector<float>(l->begin(), l->end()), want[0]);
  std::thread release([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    gated.Release();
  });
  std::vector<float> prev(l->begin(), l->end());
  for (int i = 0; i < 5; ++i) {
    l = engine->DecodeStep(Argmax(prev));
    ASSERT_TRUE(l.ok()) << l.status();
    prev.assign(l->begin(), l->end());
    EXPECT_EQ(prev, want[i + 1]) << "step " << i;
  }
  release.join();
  EXPECT_EQ(gated.uploads_done(), weights_->config.n_layers * weights_->config.n_kv_heads);
  EXPECT_GT(engine->stats().handoff_wait_seconds, 0.0);

  // A failing upload fails the first decode step, and the sequence ends.
  gated.FailUploads(absl::UnavailableError("node gone"));
  ASSERT_TRUE(engine->Prefill(prompt, a).ok());
  auto step = engine->DecodeStep(Argmax(want[0]));
  EXPECT_EQ(step.status().code(), absl::StatusCode::kUnavailable) << step.status();
  EXPECT_EQ(engine->DecodeStep(1).status().code(), absl::StatusCode::kFailedPrecondition);
  auto st = node->Stats();
  ASSERT_TRUE(st.ok());
  EXPECT_EQ(st->sequences, 0);
}

// A prefill releases the engine between layers: decode steps of another
// sequence run in the gaps — from the prefill's own layer callback and from
// a second thread — and every logit (the stepping sequence's, the new
// sequence's prefill and later steps) equals its solo run bit for bit. A
// token cancelled in a gap stops the prefill there and leaves nothing on the
// node.
TEST_F(EngineMultiTest, DecodeStepsRunBetweenPrefillLayers) {
  const int n_layers = weights_->config.n_layers;
  const std::vector<int32_t> pa = Encode(kStory), pb = LongPrompt(400);
  const AttentionOptions a = Retrieval();
  const int kSteps = 2 * n_layers + 6;
  const auto want_a = Alone(pa, a, kSteps);
  ASSERT_EQ(want_a.size(), kSteps + 1u);
  for (const AttentionOptions& b_opts : {Retrieval(), Full()}) {
    SCOPED_TRACE(std::string(AttentionModeName(b_opts.mode)));
    const auto want_b = Alone(pb, b_opts, 5);
    ASSERT_EQ(want_b.size(), 6u);
    for (bool from_thread : {false, true}) {
      SCOPED_TRACE(from_thread ? "steps from a decode thread" : "steps from the callback");
      auto node = MakeNode();
      auto engine = MakeEngine(node.get());
      auto sa = engine->StartSequence(pa, a);
      ASSERT_TRUE(sa.ok()) << sa.status();
      EngineSequence& seq_a = **sa;
      int done_a = 0;  // steps of A run (guarded by mu below when threaded)
      auto step_a = [&] {
        const absl::StatusOr<std::span<const float>> l =
            engine->Step(seq_a, Argmax(want_a[done_a]));
        ASSERT_TRUE(l.ok()) << l.status();
        ++done_a;
        ASSERT_EQ(std::vector<float>(l->begin(), l->end()), want_a[done_a])
            << "A's step " << done_a;
      };
      // Threaded: the callback asks the decode thread for one step and waits
      // until it ran (a step it cannot run while the prefill holds the engine).
      std::mutex mu;
      std::condition_variable cv;
      int asked = 0, ran = 0;
      bool stop = false;
      std::thread decoder;
      if (from_thread) {
        decoder = std::thread([&] {
          std::unique_lock<std::mutex> lock(mu);
          for (;;) {
            cv.wait(lock, [&] { return stop || ran < asked; });
            if (ran == asked) return;
            lock.unlock();
            step_a();
            lock.lock();
            ++ran;
            cv.notify_all();
          }
        });
      }
      std::vector<std::pair<int, int>> layers;
      auto sb = engine->StartSequence(pb, b_opts, CancelToken(), [&](int done, int total) {
        layers.emplace_back(done, total);
        if (!from_thread) {
          step_a();
          return;
        }
        std::unique_lock<std::mutex> lock(mu);
        ++asked;
        cv.notify_all();
        ASSERT_TRUE(cv.wait_for(lock, std::chrono::seconds(30), [&] { return ran == asked; }))
            << "a decode step could not run between prefill layers";
      });
      if (from_thread) {
        {
          std::lock_guard<std::mutex> lock(mu);
          stop = true;
          cv.notify_all();
        }
        decoder.join();
      }
      ASSERT_TRUE(sb.ok()) << sb.status();
      EngineSequence& seq_b = **sb;
      ASSERT_EQ(layers.size(), static_cast<size_t>(n_layers));
      for (int l = 0; l < n_layers; ++l) {
        EXPECT_EQ(layers[l], std::make_pair(l + 1, n_layers));
      }
      ASSERT_EQ(done_a, n_layers);  // one step of A per prefill layer of B
      ASSERT_EQ(std::vector<float>(seq_b.logits().begin(), seq_b.logits().end()), want_b[0])
          << "B's prefill";
      // Then both as one batch.
      for (int i = 0; i < 5; ++i) {
        EngineSequence* batch[2] = {&seq_a, &seq_b};
        const int32_t tokens[2] = {Argmax(want_a[done_a]), Argmax(want_b[i])};
        std::vector<absl::Status> st(2);
        ASSERT_TRUE(engine->StepBatch(batch, tokens, st).ok());
        ASSERT_TRUE(st[0].ok() && st[1].ok()) << st[0] << st[1];
        ++done_a;
        ASSERT_EQ(std::vector<float>(seq_a.logits().begin(), seq_a.logits().end()),
                  want_a[done_a]);
        ASSERT_EQ(std::vector<float>(seq_b.logits().begin(), seq_b.logits().end()),
                  want_b[i + 1]);
      }
    }
  }

  // Cancelled in the gap after layer 2: Cancelled, nothing of it on the node.
  auto node = MakeNode();
  auto engine = MakeEngine(node.get());
  auto sa = engine->StartSequence(pa, a);
  ASSERT_TRUE(sa.ok()) << sa.status();
  CancelToken cancel;
  int calls = 0;
  auto sb = engine->StartSequence(pb, a, cancel, [&](int done, int) {
    ++calls;
    if (done == 2) cancel.Cancel();
  });
  EXPECT_EQ(sb.status().code(), absl::StatusCode::kCancelled) << sb.status();
  EXPECT_EQ(calls, 2);
  auto st = node->Stats();
  ASSERT_TRUE(st.ok());
  EXPECT_EQ(st->sequences, 1);  // A only
  auto l = engine->Step(**sa, Argmax(want_a[0]));
  ASSERT_TRUE(l.ok()) << l.status();
  EXPECT_EQ(std::vector<float>(l->begin(), l->end()), want_a[1]);
}

TEST_F(EngineMultiTest, BadBatches) {
  auto node = MakeNode();
  auto engine = MakeEngine(node.get());
  auto other_engine = MakeEngine(node.get());
  auto s = engine->StartSequence(Encode(kStory), Retrieval());
  auto foreign = other_engine->StartSequence(Encode(kStory), Retrieval());
  ASSERT_TRUE(s.ok() && foreign.ok());
  EngineSequence* twice[2] = {s->get(), s->get()};
  const int32_t tokens[2] = {1, 1};
  std::vector<absl::Status> st(2);
  EXPECT_EQ(engine->StepBatch(twice, tokens, st).code(), absl::StatusCode::kInvalidArgument);
  EngineSequence* mixed[2] = {s->get(), foreign->get()};
  EXPECT_EQ(engine->StepBatch(mixed, tokens, st).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(engine->StepBatch(mixed, std::span<const int32_t>(tokens, 1), st).code(),
            absl::StatusCode::kInvalidArgument);
  // A bad token fails the batch's backend op; an ended sequence fails alone.
  auto ended = engine->StartSequence(Encode(kStory2), Retrieval());
  ASSERT_TRUE(ended.ok());
  ASSERT_TRUE(engine->EndSequence(**ended).ok());
  EngineSequence* pair[2] = {s->get(), ended->get()};
  const int32_t ok_tokens[2] = {5, 5};
  ASSERT_TRUE(engine->StepBatch(pair, ok_tokens, st).ok());
  EXPECT_TRUE(st[0].ok()) << st[0];
  EXPECT_EQ(st[1].code(), absl::StatusCode::kFailedPrecondition);
  foreign->reset();
  other_engine.reset();
}

}  // namespace
}  // namespace kvr::worker
