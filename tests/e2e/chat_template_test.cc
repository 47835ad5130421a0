// End-to-end chat templates (issue 19 item 2): real kvr_worker and
// kvr_gateway processes on 127.0.0.1 (ports read from their printed lines).
//
//  * A Hugging Face checkpoint converted from stories260K, with a
//    tokenizer_config.json carrying the Llama-3 chat template and a
//    generation_config.json: GetModelInfo reports the template, bos/eos
//    strings and the extra end-of-turn id; /v1/chat/completions prompts the
//    worker with exactly jinja2's rendering (python3-jinja2, configured as
//    transformers' apply_chat_template): usage.prompt_tokens, the greedy
//    text and token ids equal a /v1/completions call on the jinja2 text.
//  * Generation stops at generation_config.json's eos_token_id ids
//    (finish_reason "stop" after exactly the tokens before it).
//  * `kvr_worker --chat_template llama2.jinja` overrides the model's
//    template; the Llama-2 template's raise_exception on non-alternating
//    roles is a 400 whose message is the template's, param "messages".
//
// Usage: chat_template_e2e_test --kvr_gateway PATH --kvr_worker PATH
//          --templates DIR --oracle tests/unit/jinja_oracle.py --python PATH
#include <signal.h>
#include <sys/wait.h>

#include <httplib.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/subprocess.h"
#include "gpu_worker/model/safetensors_loader.h"
#include "grpcpp/client_context.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "gtest/gtest.h"
#include "kvr/v1/generation.grpc.pb.h"
#include "nlohmann/json.hpp"
#include "tests/support/gateway_process.h"
#include "tests/support/models.h"
#include "tests/support/server_process.h"
#include "tests/support/temp_dir.h"

namespace kvr::gateway {
namespace {

using nlohmann::json;
using test_support::GatewayProcess;
using test_support::ServerProcess;

std::string g_gateway;
std::string g_worker;
std::string g_templates;
std::string g_oracle;
std::string g_python;

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

void WriteFile(const std::string& path, const std::string& text) {
  std::ofstream(path, std::ios::binary) << text;
}

// jinja2's rendering of `tmpl` with `vars` (jinja_oracle.py --render).
std::string Jinja2Render(const std::string& dir, const std::string& tmpl, const json& vars) {
  const std::string in = dir + "/render_case.json";
  WriteFile(in, json{{"template", tmpl}, {"vars", vars}}.dump());
  auto proc = Subprocess::Start({g_python, g_oracle, "--render", in});
  if (!proc.ok()) return ADD_FAILURE() << proc.status(), "";
  absl::StatusOr<std::string> line = (*proc)->WaitForLine("rendered: ", absl::Seconds(60));
  if (!line.ok()) return ADD_FAILURE() << "jinja2 render: " << line.status(), "";
  (void)(*proc)->Stop(0, absl::Seconds(30));
  return json::parse(*line).get<std::string>();
}

v1::GetModelInfoResponse Info(const std::string& address) {
  auto stub = v1::Generation::NewStub(grpc::CreateChannel(address, grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  v1::GetModelInfoResponse info;
  const grpc::Status s = stub->GetModelInfo(&ctx, {}, &info);
  EXPECT_TRUE(s.ok()) << s.error_message();
  return info;
}

// The worker's encoding of `text`, with or without its BOS id first.
std::vector<int32_t> Tokenize(const std::string& address, const std::string& text, bool add_bos) {
  auto stub = v1::Generation::NewStub(grpc::CreateChannel(address, grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  v1::TokenizeRequest request;
  request.set_text(text);
  request.set_add_bos(add_bos);
  v1::TokenizeResponse response;
  const grpc::Status s = stub->Tokenize(&ctx, request, &response);
  EXPECT_TRUE(s.ok()) << s.error_message();
  return std::vector<int32_t>(response.ids().begin(), response.ids().end());
}

// POSTs `body` to the gateway; (status, parsed body).
std::pair<int, json> Post(const std::string& http, const std::string& path, const json& body) {
  httplib::Client client("http://" + http);
  client.set_read_timeout(120, 0);
  auto res = client.Post(path, body.dump(), "application/json");
  if (!res) return {0, json()};
  return {res->status, json::parse(res->body, nullptr, false)};
}

bool StopOk(ServerProcess* p) {
  const std::optional<int> st = p->Stop(SIGTERM);
  return st.has_value() && WIFEXITED(*st) && WEXITSTATUS(*st) == 0;
}

class ChatTemplateE2e : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_FALSE(dir_.path().empty());
    model_ = test_support::BundledModelPath("stories260K.bin");
    tokenizer_ = test_support::BundledModelPath("tok512.bin");
    ASSERT_FALSE(model_.empty());
    hf_ = dir_.path() + "/stories260K-chat";
    ASSERT_TRUE(worker::ConvertLlama2cToHf(model_, hf_).ok());
    llama3_ = ReadFile(g_templates + "/llama3.jinja");
    ASSERT_FALSE(llama3_.empty());
    WriteFile(hf_ + "/tokenizer_config.json",
              json{{"chat_template", llama3_}, {"bos_token", "<s>"},
                   {"eos_token", {{"content", "</s>"}, {"special", true}}}}
                  .dump());
  }

  test_support::TempDir dir_{"kvr_chat_e2e"};
  std::string model_, tokenizer_, hf_, llama3_;
};

TEST_F(ChatTemplateE2e, GatewayPromptsWithTheModelsTemplateAndStopsAtEndOfTurnIds) {
  // A reference worker on the plain checkpoint: the greedy continuation of
  // a prompt, whose third token then becomes an end-of-turn id.
  auto plain = ServerProcess::Start(g_worker, "kvr_worker",
                                    {"--chat_template=" + g_templates + "/llama2.jinja"});
  ASSERT_TRUE(plain != nullptr && plain->listening());
  auto plain_gw = GatewayProcess::Start(g_gateway, {"--workers=" + plain->address()});
  ASSERT_TRUE(plain_gw != nullptr);
  const json completion = {{"model", "stories260K"}, {"prompt", "Once upon a time"},
                           {"max_tokens", 12}, {"temperature", 0}};
  auto [st0, ref] = Post(plain_gw->http(), "/v1/completions", completion);
  ASSERT_EQ(st0, 200) << ref.dump();
  const std::vector<int32_t> ref_ids = ref["kvr"]["token_ids"].get<std::vector<int32_t>>();
  ASSERT_GE(ref_ids.size(), 4u);
  const int32_t eot = ref_ids[2];
  ASSERT_NE(eot, 2);

  // --chat_template overrides the model's (the bundled model has none) and
  // the Llama-2 template's raise_exception is a 400 with its message.
  const v1::GetModelInfoResponse plain_info = Info(plain->address());
  EXPECT_EQ(plain_info.chat_template(), ReadFile(g_templates + "/llama2.jinja"));
  auto [st1, refused] = Post(plain_gw->http(), "/v1/chat/completions",
                             {{"model", "stories260K"},
                              {"messages", {{{"role", "user"}, {"content", "a"}},
                                            {{"role", "user"}, {"content", "b"}}}},
                              {"max_tokens", 4}});
  EXPECT_EQ(st1, 400) << refused.dump();
  EXPECT_EQ(refused["error"]["message"],
            "messages: Conversation roles must alternate user/assistant/user/assistant/...");
  EXPECT_EQ(refused["error"]["param"], "messages");
  EXPECT_EQ(refused["error"]["type"], "invalid_request_error");

  // The HF checkpoint with its own template and end-of-turn ids.
  WriteFile(hf_ + "/generation_config.json", json{{"eos_token_id", {2, eot}}}.dump());
  auto worker = ServerProcess::Start(g_worker, "kvr_worker",
                                     {"--model=" + hf_, "--tokenizer=" + tokenizer_});
  ASSERT_TRUE(worker != nullptr && worker->listening());
  const v1::GetModelInfoResponse info = Info(worker->address());
  EXPECT_EQ(info.chat_template(), llama3_);
  EXPECT_EQ(info.bos_token(), "<s>");
  EXPECT_EQ(info.eos_token(), "</s>");
  ASSERT_EQ(info.stop_token_ids_size(), 1);
  EXPECT_EQ(info.stop_token_ids(0), eot);
  auto gw = GatewayProcess::Start(g_gateway, {"--workers=" + worker->address()});
  ASSERT_TRUE(gw != nullptr);
  const std::string model = "stories260K-chat";

  // Stops at the end-of-turn id: exactly the two tokens before it.
  json stopped_req = completion;
  stopped_req["model"] = model;
  auto [st2, stopped] = Post(gw->http(), "/v1/completions", stopped_req);
  ASSERT_EQ(st2, 200) << stopped.dump();
  EXPECT_EQ(stopped["choices"][0]["finish_reason"], "stop");
  EXPECT_EQ(stopped["kvr"]["token_ids"].get<std::vector<int32_t>>(),
            std::vector<int32_t>(ref_ids.begin(), ref_ids.begin() + 2));
  EXPECT_EQ(stopped["usage"]["completion_tokens"], 2);

  // Conversations (system or not, several turns, unicode, quotes, braces,
  // whitespace the template trims): the chat prompt is jinja2's rendering.
  const std::vector<json> conversations = {
      json::array({{{"role", "user"}, {"content", "Tell me a story about a cat."}}}),
      json::array({{{"role", "system"}, {"content", "  You tell short stories.\n"}},
                   {{"role", "user"}, {"content", "Once there was a dog named {{ Max }}"}},
                   {{"role", "assistant"}, {"content", "The dog's name was \"Max\" 🐶. "}},
                   {{"role", "developer"}, {"content", "Be kind {% if %}"}},
                   {{"role", "user"}, {"content", [] {
                      return json::array({{{"type", "text"}, {"text", "What did "}},
                                          {{"type", "text"}, {"text", "Max do? é\t"}}});
                    }()}}}),
  };
  for (const json& messages : conversations) {
    json vars = {{"bos_token", "<s>"}, {"eos_token", "</s>"}, {"add_generation_prompt", true},
                 {"tools", nullptr}, {"documents", nullptr}};
    json flat = json::array();
    for (const json& m : messages) {
      std::string content;
      if (m["content"].is_string()) {
        content = m["content"];
      } else {
        for (const json& part : m["content"]) content += part["text"].get<std::string>();
      }
      flat.push_back({{"role", m["role"] == "developer" ? "system" : m["role"]}, {"content", content}});
    }
    vars["messages"] = flat;
    const std::string rendered = Jinja2Render(dir_.path(), llama3_, vars);
    ASSERT_TRUE(absl::StartsWith(rendered, "<s><|start_header_id|>")) << rendered;
    ASSERT_TRUE(absl::EndsWith(rendered, "<|start_header_id|>assistant<|end_header_id|>\n\n"));

    auto [st3, chat] = Post(gw->http(), "/v1/chat/completions",
                            {{"model", model}, {"messages", messages}, {"max_tokens", 10},
                             {"temperature", 0}});
    ASSERT_EQ(st3, 200) << chat.dump();
    // The worker adds BOS to a text prompt: it stands for the "<s>".
    auto [st4, comp] = Post(gw->http(), "/v1/completions",
                            {{"model", model}, {"prompt", rendered.substr(3)}, {"max_tokens", 10},
                             {"temperature", 0}});
    ASSERT_EQ(st4, 200) << comp.dump();
    EXPECT_EQ(chat["usage"]["prompt_tokens"], comp["usage"]["prompt_tokens"]);
    EXPECT_EQ(chat["choices"][0]["message"]["content"], comp["choices"][0]["text"]);
    EXPECT_EQ(chat["kvr"]["token_ids"], comp["kvr"]["token_ids"]);
    EXPECT_EQ(chat["choices"][0]["finish_reason"], comp["choices"][0]["finish_reason"]);
    // The template's headers, not the plain format's few tokens.
    EXPECT_GT(chat["usage"]["prompt_tokens"].get<int>(), 40);
  }

  EXPECT_TRUE(gw->Stop());
  EXPECT_TRUE(StopOk(worker.get()));
  EXPECT_TRUE(plain_gw->Stop());
  EXPECT_TRUE(StopOk(plain.get()));
}

TEST_F(ChatTemplateE2e, TemplateWithoutBosGetsNoBosFromTheWorker) {
  // ChatML renders no BOS: the prompt's ids are the rendering's encoding
  // alone, as apply_chat_template + encode(add_special_tokens=False) gives
  // them (a regression: the worker used to prepend BOS to every text prompt).
  const std::string chatml = ReadFile(g_templates + "/chatml.jinja");
  ASSERT_FALSE(chatml.empty());
  auto worker = ServerProcess::Start(g_worker, "kvr_worker",
                                     {"--chat_template=" + g_templates + "/chatml.jinja"});
  ASSERT_TRUE(worker != nullptr && worker->listening());
  auto gw = GatewayProcess::Start(g_gateway, {"--workers=" + worker->address()});
  ASSERT_TRUE(gw != nullptr);
  const json messages = json::array({{{"role", "user"}, {"content", "Tell me about Lily."}}});
  const std::string rendered = Jinja2Render(
      dir_.path(), chatml,
      {{"messages", messages}, {"bos_token", ""}, {"eos_token", ""},
       {"add_generation_prompt", true}, {"tools", nullptr}, {"documents", nullptr}});
  ASSERT_TRUE(absl::StartsWith(rendered, "<|im_start|>system")) << rendered;
  const std::vector<int32_t> ids = Tokenize(worker->address(), rendered, /*add_bos=*/false);
  const v1::GetModelInfoResponse info = Info(worker->address());
  ASSERT_FALSE(ids.empty());
  ASSERT_NE(ids.front(), info.bos_id());

  auto [st1, chat] = Post(gw->http(), "/v1/chat/completions",
                          {{"model", "stories260K"}, {"messages", messages}, {"max_tokens", 8},
                           {"temperature", 0}});
  ASSERT_EQ(st1, 200) << chat.dump();
  auto [st2, comp] = Post(gw->http(), "/v1/completions",
                          {{"model", "stories260K"}, {"prompt", ids}, {"max_tokens", 8},
                           {"temperature", 0}});
  ASSERT_EQ(st2, 200) << comp.dump();
  EXPECT_EQ(chat["usage"]["prompt_tokens"].get<size_t>(), ids.size());
  EXPECT_EQ(chat["kvr"]["token_ids"], comp["kvr"]["token_ids"]);
  EXPECT_EQ(chat["choices"][0]["message"]["content"], comp["choices"][0]["text"]);

  EXPECT_TRUE(gw->Stop());
  EXPECT_TRUE(StopOk(worker.get()));
}

}  // namespace
}  // namespace kvr::gateway

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    if (flag == "--kvr_gateway") kvr::gateway::g_gateway = argv[i + 1];
    if (flag == "--kvr_worker") kvr::gateway::g_worker = argv[i + 1];
    if (flag == "--templates") kvr::gateway::g_templates = argv[i + 1];
    if (flag == "--oracle") kvr::gateway::g_oracle = argv[i + 1];
    if (flag == "--python") kvr::gateway::g_python = argv[i + 1];
  }
  if (kvr::gateway::g_gateway.empty() || kvr::gateway::g_worker.empty() ||
      kvr::gateway::g_templates.empty() || kvr::gateway::g_oracle.empty() ||
      kvr::gateway::g_python.empty()) {
    std::fprintf(stderr,
                 "usage: chat_template_e2e_test --kvr_gateway PATH --kvr_worker PATH --templates DIR "
                 "--oracle jinja_oracle.py --python PATH\n");
    return 2;
  }
  return RUN_ALL_TESTS();
}
