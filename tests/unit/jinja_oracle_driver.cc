// Renders Jinja cases for the jinja2 oracle (tests/unit/jinja_oracle.py):
// reads one JSON object per stdin line, {"template": str, "vars": {...},
// "limits": {...}?}, renders `template` with the chat globals
// (raise_exception, strftime_now) plus `vars`, and writes one line per case:
// {"ok": true, "text": str} or {"ok": false, "code": str, "error": str}.
#include <iostream>
#include <memory>
#include <string>

#include "nlohmann/json.hpp"
#include "services/gateway/chat_template.h"
#include "services/gateway/jinja.h"

int main() {
  using nlohmann::ordered_json;
  std::string line;
  while (std::getline(std::cin, line)) {
    ordered_json out;
    ordered_json in;
    try {
      in = ordered_json::parse(line);
    } catch (const std::exception& e) {
      std::cerr << "bad input line: " << e.what() << "\n";
      return 2;
    }
    kvr::jinja::Limits limits;
    if (in.contains("limits")) {
      const auto& l = in["limits"];
      if (l.contains("max_template_bytes")) limits.max_template_bytes = l["max_template_bytes"].get<size_t>();
      if (l.contains("max_depth")) limits.max_depth = l["max_depth"].get<int>();
      if (l.contains("max_loop_iterations")) limits.max_loop_iterations = l["max_loop_iterations"].get<int64_t>();
      if (l.contains("max_output_bytes")) limits.max_output_bytes = l["max_output_bytes"].get<size_t>();
      if (l.contains("max_call_depth")) limits.max_call_depth = l["max_call_depth"].get<int>();
    }
    absl::StatusOr<kvr::jinja::Template> t =
        kvr::jinja::Template::Parse(in["template"].get<std::string>(), limits);
    absl::StatusOr<std::string> text = t.ok() ? absl::StatusOr<std::string>(std::string()) : t.status();
    if (t.ok()) {
      kvr::jinja::Value vars = kvr::gateway::JsonToValue(in.value("vars", ordered_json::object()));
      auto globals = std::make_shared<kvr::jinja::Dict>();
      if (vars.is_mapping()) globals->items = vars.dict().items;
      kvr::gateway::AddChatGlobals(globals.get());
      text = t->Render(kvr::jinja::Value::MakeDict(std::move(globals)));
    }
    if (text.ok()) {
      out["ok"] = true;
      out["text"] = *text;
    } else {
      out["ok"] = false;
      out["code"] = absl::StatusCodeToString(text.status().code());
      out["error"] = std::string(text.status().message());
    }
    std::cout << out.dump(-1, ' ', false, ordered_json::error_handler_t::replace) << "\n";
  }
  return 0;
}
