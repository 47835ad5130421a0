// Regression test for the worker fuzzer's first finding (fuzz/corpus/worker/
// crash-generate-invalid-utf8-text): tokens are byte pieces, so sampled or
// detokenized text may be malformed UTF-8, and the worker put it as is into
// proto3 `string` fields (GenerateChunk.text, DetokenizeResponse.text). A
// gRPC client cannot parse such a message: a Generate stream then ended OK
// with the chunk and the summary lost (or failed), and Detokenize failed.
// The worker now replaces invalid bytes with U+FFFD (ValidUtf8).
//
// Through the real WorkerService on an in-process gRPC server (stories260K,
// CPU backend, in-process node): Detokenize of a lone lead byte, and the
// fuzzer's Generate request (temperature 3.09), must reach the client.
#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "gpu_worker/engine/retrieval_engine.h"
#include "gpu_worker/server/generation_scheduler.h"
#include "gpu_worker/server/worker_service.h"
#include "grpcpp/client_context.h"
#include "grpcpp/server.h"
#include "grpcpp/server_builder.h"
#include "gtest/gtest.h"
#include "kvr/v1/generation.grpc.pb.h"
#include "retrieval_node/client/in_process_client.h"
#include "tests/support/stories_model.h"

namespace kvr::worker {
namespace {

// Whether a DetokenizeResponse carrying `text` survives a serialize / parse
// round trip (what a gRPC client does with it).
bool Parses(const std::string& text) {
  v1::DetokenizeResponse r;
  r.set_text(text);
  v1::DetokenizeResponse back;
  return back.ParseFromString(r.SerializeAsString()) && back.text() == text;
}

TEST(ValidUtf8, ReplacesEveryInvalidByteAndKeepsValidText) {
  const std::string kBad = "\xEF\xBF\xBD";
  struct Case {
    std::string in, out;
  };
  const std::vector<Case> cases = {
      {"Once upon a time", "Once upon a time"},
      {"h\xC3\xA9llo \xE2\x82\xAC \xF0\x9F\x98\x80", "h\xC3\xA9llo \xE2\x82\xAC \xF0\x9F\x98\x80"},
      {"\xC3" "a", kBad + "a"},                        // lead byte without continuation
      {"a\x80", "a" + kBad},                           // stray continuation byte
      {"\xC0\xAF", kBad + kBad},                       // overlong '/'
      {"\xED\xA0\x80", kBad + kBad + kBad},            // surrogate U+D800
      {"\xF4\x90\x80\x80", kBad + kBad + kBad + kBad},  // > U+10FFFF
      {"\xE2\x82", kBad + kBad},                       // truncated at the end
      {"\xFF", kBad},
  };
  for (const Case& c : cases) {
    EXPECT_EQ(ValidUtf8(c.in), c.out) << c.in;
    EXPECT_TRUE(Parses(ValidUtf8(c.in))) << c.in;
  }
  EXPECT_FALSE(Parses("\xC3" "a"));  // why: the client's parse refuses it
}

class WorkerUtf8Test : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(model_.Load());
    retrieval::NodeCoreOptions no;
    no.threads = 1;
    auto node = retrieval::InProcessRetrievalClient::Create(no);
    ASSERT_TRUE(node.ok()) << node.status();
    node_ = std::move(*node);
    auto engine = RetrievalEngine::Create(model_.backend.get(), model_.weights, node_.get());
    ASSERT_TRUE(engine.ok()) << engine.status();
    engine_ = std::move(*engine);
    auto scheduler = GenerationScheduler::Create(engine_.get(), model_.tokenizer.get(), {});
    ASSERT_TRUE(scheduler.ok()) << scheduler.status();
    scheduler_ = std::move(*scheduler);
    service_ = std::make_unique<WorkerService>(scheduler_.get(), model_.tokenizer.get(),
                                               node_.get(), model_.weights->config,
                                               engine_->max_seq_len(), WorkerServiceOptions{});
    grpc::ServerBuilder builder;
    builder.RegisterService(service_.get());
    server_ = builder.BuildAndStart();
    ASSERT_NE(server_, nullptr);
    stub_ = v1::Generation::NewStub(server_->InProcessChannel(grpc::ChannelArguments()));
  }
  void TearDown() override {
    if (server_ != nullptr) {
      server_->Shutdown();
      server_->Wait();
    }
    scheduler_.reset();
    service_.reset();
  }

  static void Deadline(grpc::ClientContext* c) {
    c->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  }

  test_support::StoriesModel model_;
  std::unique_ptr<retrieval::InProcessRetrievalClient> node_;
  std::unique_ptr<RetrievalEngine> engine_;
  std::unique_ptr<GenerationScheduler> scheduler_;
  std::unique_ptr<WorkerService> service_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<v1::Generation::Stub> stub_;
};

TEST_F(WorkerUtf8Test, DetokenizeOfALoneLeadByteReachesTheClient) {
  // tok512 (llama2.c): ids 3..258 are the byte pieces <0x00>..<0xFF>.
  v1::DetokenizeRequest r;
  r.add_ids(3 + 0xC3);
  r.add_ids(3 + 'a');
  grpc::ClientContext c;
  Deadline(&c);
  v1::DetokenizeResponse out;
  const grpc::Status st = stub_->Detokenize(&c, r, &out);
  ASSERT_TRUE(st.ok()) << st.error_code() << " " << st.error_message();
  EXPECT_EQ(out.text(), "\xEF\xBF\xBD" "a");
}

TEST_F(WorkerUtf8Test, HighTemperatureStreamEndsWithItsSummary) {
  // The fuzzer's request: temperature 198 / 64, 3 tokens.
  v1::GenerateRequest r;
  r.set_text("Lily and Tom went to the park.");
  r.set_max_tokens(3);
  r.mutable_sampling()->set_temperature(198.0f / 64.0f);
  grpc::ClientContext c;
  Deadline(&c);
  auto reader = stub_->Generate(&c, r);
  v1::GenerateResponse m;
  int64_t tokens = 0;
  bool summary = false;
  int64_t completion = -1;
  while (reader->Read(&m)) {
    if (m.has_chunk()) tokens += m.chunk().token_ids_size();
    if (m.has_summary()) {
      summary = true;
      completion = m.summary().usage().completion_tokens();
    }
  }
  const grpc::Status st = reader->Finish();
  ASSERT_TRUE(st.ok()) << st.error_code() << " " << st.error_message();
  EXPECT_TRUE(summary);
  EXPECT_EQ(completion, tokens);
  EXPECT_GE(tokens, 1);
  EXPECT_LE(tokens, 3);
}

}  // namespace
}  // namespace kvr::worker
