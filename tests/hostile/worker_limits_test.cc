// Worker limits against hostile requests, below the gRPC layer (issue 14):
//
//  * attention options: sinks and window are bounded by the engine's context
//    (16777216 each used to allocate until the machine ran out of memory),
//    top_k / train_k by kMaxTopK; the message names the field and the limit;
//  * RetrievalEngine::CacheRows / SequenceBytes: a sequence's worker memory
//    is bounded by max_seq_len in both modes (exact numbers for stories260K);
//  * the llama2.c tokenizer's O(n log n) merge gives exactly run.c's
//    (quadratic) tokens on thousands of random strings (tok512 and a
//    vocabulary of tied, NaN and floor scores), encodes 1 MiB in ~0.3 s of
//    CPU (run.c's loop took 16-60 s), and never gives fewer
//    tokens than bytes / max_bytes_per_token() (the bound the worker uses to
//    refuse a prompt before encoding it);
//  * GenerationScheduler: the memory budget admits requests while their
//    SequenceBytes fit and answers RESOURCE_EXHAUSTED beyond (released when
//    a request ends); WhenFinished waiters are bounded, a cancelled waiter
//    frees its slot, and callbacks run off the decode thread.
#include <time.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <future>
#include <limits>
#include <memory>
#include <mutex>
#include <random>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "google/protobuf/stubs/common.h"
#include "gpu_worker/engine/attention_options.h"
#include "gpu_worker/engine/retrieval_engine.h"
#include "gpu_worker/server/generation_scheduler.h"
#include "gtest/gtest.h"
#include "retrieval_node/client/in_process_client.h"
#include "tests/support/stories_model.h"

namespace kvr::worker {
namespace {

void ExpectMessageHas(const absl::Status& s, const std::vector<std::string>& parts) {
  for (const std::string& p : parts) {
    EXPECT_NE(s.message().find(p), std::string::npos) << s << " lacks \"" << p << "\"";
  }
}

TEST(AttentionLimitsTest, SinksAndWindowAreBoundedByTheContext) {
  AttentionOptions o;
  o.sinks = 16777216;
  o.window = 16777216;
  absl::Status s = ValidateAttentionOptions(o, 512);
  EXPECT_TRUE(absl::IsInvalidArgument(s)) << s;
  ExpectMessageHas(s, {"sinks", "16777216", "512"});

  o.sinks = 4;
  s = ValidateAttentionOptions(o, 512);
  EXPECT_TRUE(absl::IsInvalidArgument(s)) << s;
  ExpectMessageHas(s, {"window", "16777216", "512"});

  // Full mode is held to the same limits.
  o.mode = AttentionMode::kFull;
  o.window = 513;
  s = ValidateAttentionOptions(o, 512);
  EXPECT_TRUE(absl::IsInvalidArgument(s)) << s;
  ExpectMessageHas(s, {"window", "513", "512"});

  // At the context: accepted (a window covering the whole context).
  o.mode = AttentionMode::kRetrieval;
  o.sinks = 512;
  o.window = 512;
  EXPECT_TRUE(ValidateAttentionOptions(o, 512).ok());

  o = AttentionOptions{};
  o.top_k = 4097;
  s = ValidateAttentionOptions(o, 512);
  EXPECT_TRUE(absl::IsInvalidArgument(s)) << s;
  ExpectMessageHas(s, {"top_k", "4097", "4096"});
  o = AttentionOptions{};
  o.train_k = 1 << 30;
  s = ValidateAttentionOptions(o, 512);
  EXPECT_TRUE(absl::IsInvalidArgument(s)) << s;
  ExpectMessageHas(s, {"train_k", "4096"});
}

class WorkerLimitsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    GOOGLE_PROTOBUF_VERIFY_VERSION;  // libprotobuf ahead of libsentencepiece
    ASSERT_TRUE(model_.Load()) << "could not load stories260K";
    auto n = retrieval::InProcessRetrievalClient::Create({});
    ASSERT_TRUE(n.ok()) << n.status();
    node_ = *std::move(n);
    auto e = RetrievalEngine::Create(model_.backend.get(), model_.weights, node_.get());
    ASSERT_TRUE(e.ok()) << e.status();
    engine_ = *std::move(e);
  }

  test_support::StoriesModel model_;
  std::unique_ptr<retrieval::InProcessRetrievalClient> node_;
  std::unique_ptr<RetrievalEngine> engine_;
};

TEST_F(WorkerLimitsTest, SequenceMemoryIsBoundedByTheContext) {
  const LlamaConfig& c = model_.weights->config;
  ASSERT_EQ(engine_->max_seq_len(), 512);
  const int64_t kv_row = 2 * c.kv_dim() * 4;  // K and V of one row, f32
  const int64_t extra = int64_t{c.vocab_size} * 4 + 512 * 4;
  AttentionOptions full;
  full.mode = AttentionMode::kFull;
  EXPECT_EQ(engine_->CacheRows(full), 512);
  EXPECT_EQ(engine_->SequenceBytes(full), c.n_layers * 512 * kv_row + extra);
  // stories260K: 5 layers, kv_dim 32 (the e2e test's budget relies on it).
  EXPECT_EQ(engine_->SequenceBytes(full), 659456);

  AttentionOptions r;  // sinks 4 + window 16 rows, device + host copies + flags
  EXPECT_EQ(engine_->CacheRows(r), 20);
  EXPECT_EQ(engine_->SequenceBytes(r), c.n_layers * 20 * (2 * kv_row + 1) + extra);

  // The largest valid window keeps no more than the context.
  r.sinks = 512;
  r.window = 512;
  ASSERT_TRUE(ValidateAttentionOptions(r, engine_->max_seq_len()).ok());
  EXPECT_EQ(engine_->CacheRows(r), 512);
  EXPECT_LE(engine_->SequenceBytes(r), 2 * engine_->SequenceBytes(full) + c.n_layers * 512);

  // A window past the context runs (and equals a window of the context).
  r.sinks = 4;
  r.window = 512;
  const std::vector<int32_t> prompt = model_.Encode("Once upon a time");
  absl::StatusOr<std::unique_ptr<EngineSequence>> seq =
      engine_->StartSequence(prompt, r, CancelToken(), nullptr);
  ASSERT_TRUE(seq.ok()) << seq.status();
}

// run.c's encode() merge loop as it was (O(n^2)), on the tokenizer's public
// pieces, scores and lookup: the oracle of the O(n log n) merge.
std::vector<int32_t> ReferenceEncode(const Llama2cTokenizer& t, std::string_view text) {
  bool byte_fallback = t.vocab_size() >= 259;
  for (int b = 0; b < 256 && byte_fallback; ++b) {
    static const char kHex[] = "0123456789ABCDEF";
    const std::string want = std::string("<0x") + kHex[b >> 4] + kHex[b & 15] + ">";
    byte_fallback = t.piece(b + 3) == want;
  }
  std::vector<int32_t> tokens{t.bos_id()};
  auto push_byte = [&](unsigned char b) {
    tokens.push_back(byte_fallback ? static_cast<int32_t>(b) + 3 : 0);
  };
  if (!text.empty()) {
    const int32_t space = t.Lookup(" ");
    if (space >= 0) {
      tokens.push_back(space);
    } else if (byte_fallback) {
      push_byte(' ');
    }
  }
  std::string buf;
  for (size_t i = 0; i < text.size(); ++i) {
    const unsigned char c = static_cast<unsigned char>(text[i]);
    if ((c & 0xC0) != 0x80) buf.clear();
    buf.push_back(static_cast<char>(c));
    const bool next_continues =
        i + 1 < text.size() && (static_cast<unsigned char>(text[i + 1]) & 0xC0) == 0x80;
    if (next_continues && buf.size() < 4) continue;
    const int32_t id = t.Lookup(buf);
    if (id >= 0) {
      tokens.push_back(id);
    } else {
      for (char b : buf) push_byte(static_cast<unsigned char>(b));
    }
    buf.clear();
  }
  for (;;) {
    float best_score = -1e10f;
    int32_t best_id = -1;
    size_t best = tokens.size();
    for (size_t i = 0; i + 1 < tokens.size(); ++i) {
      const int32_t id = t.Lookup(t.piece(tokens[i]) + t.piece(tokens[i + 1]));
      if (id >= 0 && t.score(id) > best_score) {
        best_score = t.score(id);
        best_id = id;
        best = i;
      }
    }
    if (best == tokens.size()) break;
    tokens[best] = best_id;
    tokens.erase(tokens.begin() + static_cast<std::ptrdiff_t>(best) + 1);
  }
  return tokens;
}

// Random text mixing story words (many merges), ASCII, multi-byte UTF-8 and
// invalid bytes (byte fallback).
std::string RandomText(std::mt19937& rng, size_t max_len) {
  static const char* const kWords[] = {"Once", " upon", " a", " time", " there", " was",
                                       " little", " girl", " Lily", ".", ",", " the",
                                       " happy", "  ", "\n", " played"};
  std::uniform_int_distribution<int> kind(0, 9);
  std::string s;
  const size_t len = std::uniform_int_distribution<size_t>(0, max_len)(rng);
  while (s.size() < len) {
    const int k = kind(rng);
    if (k < 6) {
      s += kWords[std::uniform_int_distribution<int>(0, 15)(rng)];
    } else if (k == 6) {
      s += static_cast<char>(std::uniform_int_distribution<int>(32, 126)(rng));
    } else if (k == 7) {
      s += "\xC3\xA9";  // é
      if (rng() % 2) s += "\xE2\x82\xAC";  // €
    } else if (k == 8) {
      s += "\xF0\x9F\x98\x80";  // 4-byte emoji
    } else {
      s += static_cast<char>(std::uniform_int_distribution<int>(128, 255)(rng));
    }
  }
  return s;
}

TEST_F(WorkerLimitsTest, TokenizerMergeEqualsRunCOnRandomText) {
  const Llama2cTokenizer& t = *model_.tokenizer;
  std::mt19937 rng(14);
  for (int i = 0; i < 3000; ++i) {
    const std::string text = RandomText(rng, i < 2900 ? 80 : 2000);
    absl::StatusOr<std::vector<int32_t>> got = t.Encode(text, /*add_bos=*/true);
    ASSERT_TRUE(got.ok()) << got.status();
    ASSERT_EQ(*got, ReferenceEncode(t, text)) << "text #" << i << ": \"" << text << "\"";
  }
}

// A tokenizer built to stress the merge order: many equal scores (ties go
// to the leftmost pair), a NaN and a score below run.c's -1e10 floor (never
// merged), an empty piece, no byte fallback (unknown bytes become <unk>).
TEST(TokenizerMergeOrderTest, AdversarialScoresEncodeLikeRunC) {
  const std::vector<std::pair<std::string, float>> vocab = {
      {"<unk>", 0.0f}, {"<s>", 0.0f},  {"</s>", 0.0f}, {" ", 0.0f},   {"a", 0.0f},
      {"b", 0.0f},     {"c", 0.0f},    {"aa", 1.0f},   {"ab", 1.0f},  {"ba", 1.0f},
      {"bb", 2.0f},    {"aab", 2.0f},  {"abc", 1.0f},  {" a", 1.0f},  {"ca", -2e10f},
      {"cc", std::numeric_limits<float>::quiet_NaN()}, {"", 5.0f},    {"aaaa", 1.0f},
      {"bbbb", 2.0f},  {" ab", 3.0f},  {"abab", 1.0f}, {"b ", 1.0f},  {"a ", 1.0f}};
  std::string bytes(4, '\0');
  const int32_t max_len = 4;
  std::memcpy(bytes.data(), &max_len, 4);
  for (const auto& [piece, score] : vocab) {
    const auto len = static_cast<int32_t>(piece.size());
    bytes.append(reinterpret_cast<const char*>(&score), 4);
    bytes.append(reinterpret_cast<const char*>(&len), 4);
    bytes += piece;
  }
  auto t = Llama2cTokenizer::Parse(std::as_bytes(std::span<const char>(bytes)), 0, "adversarial");
  ASSERT_TRUE(t.ok()) << t.status();
  std::mt19937 rng(3);
  const char kAlphabet[] = "aabbc x";
  for (int i = 0; i < 5000; ++i) {
    std::string text(std::uniform_int_distribution<size_t>(0, 60)(rng), ' ');
    for (char& c : text) c = kAlphabet[std::uniform_int_distribution<int>(0, 6)(rng)];
    absl::StatusOr<std::vector<int32_t>> got = (*t)->Encode(text, /*add_bos=*/true);
    ASSERT_TRUE(got.ok()) << got.status();
    ASSERT_EQ(*got, ReferenceEncode(**t, text)) << "\"" << text << "\"";
  }
}

TEST_F(WorkerLimitsTest, TokenCountIsAtLeastBytesOverMaxBytesPerToken) {
  const Llama2cTokenizer& t = *model_.tokenizer;
  const size_t per_token = t.max_bytes_per_token();
  EXPECT_EQ(per_token, 7u);  // tok512's longest piece
  std::mt19937 rng(7);
  for (int i = 0; i < 2000; ++i) {
    const std::string text = RandomText(rng, 300);
    absl::StatusOr<std::vector<int32_t>> ids = t.Encode(text, /*add_bos=*/false);
    ASSERT_TRUE(ids.ok()) << ids.status();
    EXPECT_GE(ids->size() * per_token, text.size()) << text;
  }
}

TEST_F(WorkerLimitsTest, OneMiBEncodesInLinearTime) {
  std::mt19937 rng(1);
  std::string text;
  while (text.size() < (1u << 20)) text += RandomText(rng, 4096);
  // CPU time of this thread: the work done, whatever else the machine runs.
  auto cpu_seconds = [] {
    timespec ts{};
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
  };
  const double start = cpu_seconds();
  absl::StatusOr<std::vector<int32_t>> ids = model_.tokenizer->Encode(text, /*add_bos=*/true);
  const double seconds = cpu_seconds() - start;
  ASSERT_TRUE(ids.ok()) << ids.status();
  std::printf("1 MiB: %zu tokens in %.3f s of CPU\n", ids->size(), seconds);
  // run.c's loop took 16-60 s; the heap merge takes ~0.3 s.
  EXPECT_LT(seconds, 2.0);
  EXPECT_GE(ids->size() * model_.tokenizer->max_bytes_per_token(), text.size());
}

// A request of `prompt` in `mode`; on_done reports into `done`.
GenerationWork Work(const std::vector<int32_t>& prompt, AttentionMode mode, int max_tokens,
                    std::promise<absl::StatusOr<GenerationSummary>>* done) {
  GenerationWork w;
  w.prompt = prompt;
  w.max_tokens = max_tokens;
  w.attention.mode = mode;
  w.on_done = [done](absl::StatusOr<GenerationSummary> s) { done->set_value(std::move(s)); };
  return w;
}

TEST_F(WorkerLimitsTest, MemoryBudgetAdmitsWhatFitsAndRefusesTheRest) {
  AttentionOptions full;
  full.mode = AttentionMode::kFull;
  const int64_t full_bytes = engine_->SequenceBytes(full);
  const int64_t small_bytes = engine_->SequenceBytes(AttentionOptions{});
  SchedulerOptions so;
  so.max_concurrent = 4;
  so.max_queue = 8;
  so.memory_budget_bytes = full_bytes + small_bytes;  // one full + one retrieval
  auto sched = GenerationScheduler::Create(engine_.get(), model_.tokenizer.get(), so);
  ASSERT_TRUE(sched.ok()) << sched.status();
  const std::vector<int32_t> prompt = model_.Encode("Once upon a time");

  std::promise<absl::StatusOr<GenerationSummary>> a_done, c_done, d_done;
  GenerationWork a = Work(prompt, AttentionMode::kFull, 400, &a_done);
  CancelToken a_cancel = a.cancel;
  ASSERT_TRUE((*sched)->Submit(std::move(a)).ok());
  EXPECT_EQ((*sched)->load().reserved_bytes, full_bytes);

  std::promise<absl::StatusOr<GenerationSummary>> unused;
  absl::Status s = (*sched)->Submit(Work(prompt, AttentionMode::kFull, 4, &unused));
  EXPECT_TRUE(absl::IsResourceExhausted(s)) << s;
  ExpectMessageHas(s, {"memory budget", std::to_string(full_bytes),
                       std::to_string(full_bytes + small_bytes), "retry"});

  // A retrieval-mode request still fits, and runs.
  ASSERT_TRUE((*sched)->Submit(Work(prompt, AttentionMode::kRetrieval, 4, &c_done)).ok());
  absl::StatusOr<GenerationSummary> c = c_done.get_future().get();
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->completion_tokens, 4);

  // More than the whole budget: refused as such.
  SchedulerOptions tiny = so;
  tiny.memory_budget_bytes = full_bytes - 1;
  auto sched2 = GenerationScheduler::Create(engine_.get(), model_.tokenizer.get(), tiny);
  ASSERT_TRUE(sched2.ok());
  s = (*sched2)->Submit(Work(prompt, AttentionMode::kFull, 4, &unused));
  EXPECT_TRUE(absl::IsResourceExhausted(s)) << s;
  ExpectMessageHas(s, {"whole memory budget", std::to_string(full_bytes - 1)});

  // Once the full-mode request ends its memory is free again.
  a_cancel.Cancel();
  ASSERT_TRUE(a_done.get_future().get().ok());
  EXPECT_EQ((*sched)->load().reserved_bytes, 0);
  ASSERT_TRUE((*sched)->Submit(Work(prompt, AttentionMode::kFull, 2, &d_done)).ok());
  absl::StatusOr<GenerationSummary> d = d_done.get_future().get();
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_EQ(d->completion_tokens, 2);
  EXPECT_EQ((*sched)->load().reserved_bytes, 0);
}

TEST_F(WorkerLimitsTest, FinishWaitersAreBoundedAndRunOffTheDecodeThread) {
  SchedulerOptions so;
  so.max_finish_waiters = 2;
  auto sched = GenerationScheduler::Create(engine_.get(), model_.tokenizer.get(), so);
  ASSERT_TRUE(sched.ok()) << sched.status();
  uint64_t first = 0, second = 0;
  ASSERT_TRUE((*sched)->WhenFinished(1000000, [] {}, &first).ok());
  std::mutex mu;
  std::condition_variable cv;
  bool ran = false;
  std::thread::id ran_on;
  ASSERT_TRUE((*sched)
                  ->WhenFinished(
                      1,
                      [&] {
                        std::lock_guard<std::mutex> lock(mu);
                        ran = true;
                        ran_on = std::this_thread::get_id();
                        cv.notify_all();
                      },
                      &second)
                  .ok());
  absl::Status s = (*sched)->WhenFinished(5, [] {});
  EXPECT_TRUE(absl::IsResourceExhausted(s)) << s;
  ExpectMessageHas(s, {"wait_finished_requests", "limit 2"});

  // A cancelled waiter frees its slot; cancelling twice finds nothing.
  EXPECT_TRUE((*sched)->CancelWaiter(first));
  EXPECT_FALSE((*sched)->CancelWaiter(first));
  uint64_t third = 0;
  ASSERT_TRUE((*sched)->WhenFinished(1000000, [] {}, &third).ok());

  // One request ends: the second waiter runs, on neither the test's thread
  // nor (as the callback may block) inside the request's on_done.
  std::promise<absl::StatusOr<GenerationSummary>> done;
  std::thread::id done_on;
  GenerationWork w = Work(model_.Encode("Once"), AttentionMode::kRetrieval, 1, &done);
  w.on_done = [&](absl::StatusOr<GenerationSummary> r) {
    done_on = std::this_thread::get_id();
    done.set_value(std::move(r));
  };
  ASSERT_TRUE((*sched)->Submit(std::move(w)).ok());
  ASSERT_TRUE(done.get_future().get().ok());
  {
    std::unique_lock<std::mutex> lock(mu);
    ASSERT_TRUE(cv.wait_for(lock, std::chrono::seconds(60), [&] { return ran; }));
  }
  EXPECT_NE(ran_on, done_on);
  EXPECT_NE(ran_on, std::this_thread::get_id());
  EXPECT_FALSE((*sched)->CancelWaiter(second));
  EXPECT_TRUE((*sched)->CancelWaiter(third));
}

}  // namespace
}  // namespace kvr::worker
