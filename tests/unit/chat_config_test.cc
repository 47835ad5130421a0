// A checkpoint's chat settings (gpu_worker/model/chat_config.h):
// tokenizer_config.json's chat_template in both forms, bos/eos in both
// forms, generation_config.json's eos_token_id, the --chat_template
// override (raw Jinja or a tokenizer_config.json), the stop ids kept, and
// every bound named in the error; StopTokenTokenizer stops at the extra ids.
#include "gpu_worker/model/chat_config.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "gpu_worker/model/llama2c_tokenizer.h"
#include "tests/support/models.h"
#include "tests/support/temp_dir.h"

namespace kvr::worker {
namespace {

void Write(const std::string& path, const std::string& text) { std::ofstream(path) << text; }

void ExpectError(const absl::Status& s, const std::string& needle) {
  ASSERT_FALSE(s.ok());
  EXPECT_NE(std::string(s.message()).find(needle), std::string::npos) << s.message();
}

TEST(ChatConfig, TokenizerConfigForms) {
  absl::StatusOr<ChatConfig> c = ParseTokenizerConfig(
      R"({"chat_template": "{{ x }}", "bos_token": "<s>", "eos_token": {"content": "</s>", "lstrip": false}})",
      "tc");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->chat_template, "{{ x }}");
  EXPECT_EQ(c->bos_token, "<s>");
  EXPECT_EQ(c->eos_token, "</s>");
  c = ParseTokenizerConfig(
      R"({"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}],
          "bos_token": null})",
      "tc");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->chat_template, "D");
  EXPECT_EQ(c->bos_token, "");
  ExpectError(ParseTokenizerConfig(R"({"chat_template": [{"name": "rag", "template": "R"}]})", "tc").status(),
              "tc: chat_template: the list has no template named \"default\"");
  ExpectError(ParseTokenizerConfig(R"({"chat_template": 3})", "tc").status(),
              "chat_template must be a string or a list");
  ExpectError(ParseTokenizerConfig(R"({"eos_token": 3})", "tc").status(), "tc: eos_token must be");
  ExpectError(ParseTokenizerConfig("{", "tc").status(), "tc: invalid JSON");
  ExpectError(ParseTokenizerConfig(std::string(100, '[') + std::string(100, ']'), "tc").status(),
              "nested deeper than 64");
  const std::string big = "{\"chat_template\": \"" + std::string(kMaxChatTemplateBytes + 1, 'a') + "\"}";
  ExpectError(ParseTokenizerConfig(big, "tc").status(), "65537 bytes, limit 65536");
}

TEST(ChatConfig, GenerationConfigEos) {
  EXPECT_EQ(*ParseGenerationConfigEos(R"({"eos_token_id": 7})", "gc"), std::vector<int32_t>({7}));
  EXPECT_EQ(*ParseGenerationConfigEos(R"({"eos_token_id": [1, 9]})", "gc"), std::vector<int32_t>({1, 9}));
  EXPECT_TRUE(ParseGenerationConfigEos(R"({"temperature": 0.6})", "gc")->empty());
  ExpectError(ParseGenerationConfigEos(R"({"eos_token_id": [-1]})", "gc").status(),
              "gc: eos_token_id: expected non-negative int32 ids");
  std::string many = "{\"eos_token_id\": [";
  for (int i = 0; i < 65; ++i) many += (i ? ",1" : "1");
  ExpectError(ParseGenerationConfigEos(many + "]}", "gc").status(), "65 ids, limit 64");
}

TEST(ChatConfig, ReadsDirectoryAndOverride) {
  const std::string tok_path = test_support::BundledModelPath("tok512.bin");
  ASSERT_FALSE(tok_path.empty());
  auto tok = Llama2cTokenizer::Load(tok_path, 512);
  ASSERT_TRUE(tok.ok()) << tok.status();
  test_support::TempDir dir("kvr_chat_config");
  Write(dir.path() + "/tokenizer_config.json",
        R"({"chat_template": "model {{ bos_token }}", "bos_token": "<s>", "eos_token": "</s>"})");
  // 2 is the tokenizer's eos (left out), 600 is outside the vocabulary.
  Write(dir.path() + "/generation_config.json", R"({"eos_token_id": [2, 13, 13, 600]})");
  absl::StatusOr<ChatConfig> c = ReadChatConfig(dir.path(), "", **tok);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->chat_template, "model {{ bos_token }}");
  EXPECT_EQ(c->stop_token_ids, std::vector<int32_t>({13}));

  Write(dir.path() + "/override.jinja", "raw {{ messages }}\n");
  c = ReadChatConfig(dir.path(), dir.path() + "/override.jinja", **tok);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->chat_template, "raw {{ messages }}\n");
  EXPECT_EQ(c->bos_token, "<s>");  // a raw template keeps the model's tokens

  Write(dir.path() + "/other.json", R"({"chat_template": "json", "bos_token": "[B]"})");
  c = ReadChatConfig("", dir.path() + "/other.json", **tok);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->chat_template, "json");
  EXPECT_EQ(c->bos_token, "[B]");

  ExpectError(ReadChatConfig("", dir.path() + "/missing.jinja", **tok).status(),
              "--chat_template " + dir.path() + "/missing.jinja");
  Write(dir.path() + "/big.jinja", std::string(kMaxChatTemplateBytes + 1, 'x'));
  ExpectError(ReadChatConfig("", dir.path() + "/big.jinja", **tok).status(), "bytes, limit 65536");

  StopTokenTokenizer stops(tok->get(), {13});
  EXPECT_TRUE(stops.IsStopToken(13));
  EXPECT_TRUE(stops.IsStopToken((*tok)->eos_id()));
  EXPECT_FALSE(stops.IsStopToken(14));
  EXPECT_FALSE((*tok)->IsStopToken(13));
}

}  // namespace
}  // namespace kvr::worker
