#include "services/gateway/chat_template.h"

#include <ctime>
#include <memory>

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace kvr::gateway {

using nlohmann::json;

void AddChatGlobals(jinja::Dict* globals) {
  globals->Set("raise_exception",
               jinja::Value::MakeCallable(
                   [](jinja::CallArgs& a) -> absl::StatusOr<jinja::Value> {
                     return jinja::RaiseException(a.Get(0, "message").ToString());
                   },
                   "raise_exception"));
  globals->Set("strftime_now",
               jinja::Value::MakeCallable(
                   [](jinja::CallArgs& a) -> absl::StatusOr<jinja::Value> {
                     const jinja::Value& fmt = a.Get(0, "format");
                     if (!fmt.is_string() || fmt.str().size() > 256) {
                       return absl::InvalidArgumentError(
                           "strftime_now: expected a format string of at most 256 bytes");
                     }
                     const std::time_t now = std::time(nullptr);
                     std::tm tm{};
                     localtime_r(&now, &tm);
                     char buf[1024];
                     const size_t n = std::strftime(buf, sizeof(buf), fmt.str().c_str(), &tm);
                     return jinja::Value::String(std::string(buf, n));
                   },
                   "strftime_now"));
}

absl::StatusOr<ChatTemplate> ChatTemplate::Create(absl::string_view source, std::string bos_token,
                                                  std::string eos_token,
                                                  const jinja::Limits& limits) {
  absl::StatusOr<jinja::Template> t = jinja::Template::Parse(source, limits);
  if (!t.ok()) {
    return absl::Status(t.status().code(), absl::StrCat("chat_template: ", t.status().message()));
  }
  return ChatTemplate(*std::move(t), std::move(bos_token), std::move(eos_token));
}

absl::StatusOr<std::string> ChatTemplate::Render(const json& messages,
                                                 bool add_generation_prompt) const {
  auto vars = std::make_shared<jinja::Dict>();
  vars->Set("messages", JsonToValue(messages));
  vars->Set("bos_token", jinja::Value::String(bos_token_));
  vars->Set("eos_token", jinja::Value::String(eos_token_));
  vars->Set("add_generation_prompt", jinja::Value::Bool(add_generation_prompt));
  vars->Set("tools", jinja::Value::None());
  vars->Set("documents", jinja::Value::None());
  AddChatGlobals(vars.get());
  return template_.Render(jinja::Value::MakeDict(std::move(vars)));
}

}  // namespace kvr::gateway
