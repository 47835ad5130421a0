// A model's chat template (Hugging Face tokenizer_config.json
// `chat_template`) rendered the way transformers' apply_chat_template
// renders it: the Jinja subset of jinja.h with the variables messages,
// bos_token, eos_token, add_generation_prompt, tools (none) and documents
// (none), and the globals raise_exception(msg) and strftime_now(fmt).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include "absl/strings/string_view.h"

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"
#include "services/gateway/jinja.h"

namespace kvr::gateway {

// JSON → Jinja value (objects keep their key order as nlohmann stores it;
// the gateway parses bodies into ordered maps only where it matters: the
// message fields are looked up by name). Depth is bounded by the caller
// (request bodies by kMaxJsonDepth).
// Works for nlohmann::json and nlohmann::ordered_json (insertion order,
// as Python's dicts).
template <typename Json>
jinja::Value JsonToValue(const Json& j) {
  switch (j.type()) {
    case nlohmann::json::value_t::null:
      return jinja::Value::None();
    case nlohmann::json::value_t::boolean:
      return jinja::Value::Bool(j.template get<bool>());
    case nlohmann::json::value_t::number_integer:
      return jinja::Value::Int(j.template get<int64_t>());
    case nlohmann::json::value_t::number_unsigned: {
      const uint64_t u = j.template get<uint64_t>();
      if (u > static_cast<uint64_t>(INT64_MAX)) return jinja::Value::Float(static_cast<double>(u));
      return jinja::Value::Int(static_cast<int64_t>(u));
    }
    case nlohmann::json::value_t::number_float:
      return jinja::Value::Float(j.template get<double>());
    case nlohmann::json::value_t::string:
      return jinja::Value::String(j.template get<std::string>());
    case nlohmann::json::value_t::array: {
      jinja::List items;
      items.reserve(j.size());
      for (const auto& x : j) items.push_back(JsonToValue(x));
      return jinja::Value::MakeList(std::move(items));
    }
    case nlohmann::json::value_t::object: {
      auto d = std::make_shared<jinja::Dict>();
      for (auto it = j.begin(); it != j.end(); ++it) d->Append(it.key(), JsonToValue(it.value()));
      return jinja::Value::MakeDict(std::move(d));
    }
    default:
      return jinja::Value();
  }
}

class ChatTemplate {
 public:
  // Parses `source`; InvalidArgument "chat_template: template:L:C: ..." on
  // a syntax error or a limit.
  static absl::StatusOr<ChatTemplate> Create(absl::string_view source, std::string bos_token,
                                             std::string eos_token,
                                             const jinja::Limits& limits = {});

  // Renders `messages` (a JSON array of message objects). InvalidArgument
  // naming the template position for template errors and limits;
  // FailedPrecondition with the template's own message for
  // raise_exception(msg). Thread-safe.
  absl::StatusOr<std::string> Render(const nlohmann::json& messages,
                                     bool add_generation_prompt) const;

  const std::string& bos_token() const { return bos_token_; }
  const std::string& eos_token() const { return eos_token_; }

 private:
  ChatTemplate(jinja::Template t, std::string bos, std::string eos)
      : template_(std::move(t)), bos_token_(std::move(bos)), eos_token_(std::move(eos)) {}
  jinja::Template template_;
  std::string bos_token_;
  std::string eos_token_;
};

// The globals apply_chat_template adds: raise_exception(msg) →
// FailedPrecondition(msg); strftime_now(fmt) → the local time formatted by
// strftime (fmt at most 256 bytes).
void AddChatGlobals(jinja::Dict* globals);

}  // namespace kvr::gateway
