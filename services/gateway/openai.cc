#include "services/gateway/openai.h"

#include <cmath>
#include <limits>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace kvr::gateway {
namespace {

using nlohmann::json;

std::string TypeName(const json& v) { return v.type_name(); }

// A value as an error message quotes it: numbers and strings as JSON, at
// most kMaxQuotedBytes; arrays and objects by their type and size only (so
// formatting an error never walks, or copies, a large or deep value).
constexpr size_t kMaxQuotedBytes = 64;
std::string Quote(const json& v) {
  if (v.is_array()) return absl::StrCat("an array of ", v.size());
  if (v.is_object()) return absl::StrCat("an object of ", v.size(), " fields");
  std::string out = v.dump(-1, ' ', false, json::error_handler_t::replace);
  if (out.size() > kMaxQuotedBytes) {
    out.resize(kMaxQuotedBytes);
    out += "...";
  }
  return out;
}

bool Present(const json& body, const char* field) {
  auto it = body.find(field);
  return it != body.end() && !it->is_null();
}

// A JSON number that fits a finite float.
std::optional<ApiError> GetFloat(const json& body, const char* field, float* out, bool* set) {
  *set = false;
  if (!Present(body, field)) return std::nullopt;
  const json& v = body.at(field);
  if (!v.is_number()) {
    return InvalidRequest(field, absl::StrCat(field, ": expected a number, got ", TypeName(v)));
  }
  const double d = v.get<double>();
  if (!std::isfinite(d) || std::fabs(d) > std::numeric_limits<float>::max()) {
    return InvalidRequest(field, absl::StrCat(field, ": ", Quote(v), " is not a finite float"));
  }
  *out = static_cast<float>(d);
  *set = true;
  return std::nullopt;
}

// A JSON integer (or an integral float) within [lo, hi].
std::optional<ApiError> GetInt(const json& body, const std::string& name, const json& v,
                               int64_t lo, int64_t hi, int64_t* out) {
  double d;
  if (v.is_number_integer()) {
    if (v.is_number_unsigned() && v.get<uint64_t>() > static_cast<uint64_t>(hi)) {
      return InvalidRequest(name, absl::StrCat(name, ": ", Quote(v), " outside [", lo, ", ", hi,
                                               "]"));
    }
    const int64_t i = v.get<int64_t>();
    if (i < lo || i > hi) {
      return InvalidRequest(name,
                            absl::StrCat(name, ": ", i, " outside [", lo, ", ", hi, "]"));
    }
    *out = i;
    return std::nullopt;
  }
  if (v.is_number_float() && std::isfinite(d = v.get<double>()) && d == std::floor(d)) {
    if (d < static_cast<double>(lo) || d > static_cast<double>(hi)) {
      return InvalidRequest(name, absl::StrCat(name, ": ", Quote(v), " outside [", lo, ", ", hi,
                                               "]"));
    }
    *out = static_cast<int64_t>(d);
    return std::nullopt;
  }
  return InvalidRequest(name, absl::StrCat(name, ": expected an integer, got ",
                                           v.is_number() ? Quote(v) : TypeName(v)));
}

std::optional<ApiError> GetOptionalInt(const json& body, const char* field, int64_t lo, int64_t hi,
                                       int64_t* out, bool* set) {
  *set = false;
  if (!Present(body, field)) return std::nullopt;
  if (auto e = GetInt(body, field, body.at(field), lo, hi, out)) return e;
  *set = true;
  return std::nullopt;
}

// A field that must be absent, null or equal to its neutral value.
std::optional<ApiError> Unsupported(const json& body, const char* field, const json& neutral,
                                    const std::string& why) {
  if (!Present(body, field)) return std::nullopt;
  const json& v = body.at(field);
  if (v == neutral) return std::nullopt;
  if (neutral.is_boolean() && v.is_number() && v == 0) return std::nullopt;
  return InvalidRequest(field, absl::StrCat(field, ": ", why));
}

std::optional<ApiError> ParseStop(const json& body, v1::GenerateRequest* r) {
  if (!Present(body, "stop")) return std::nullopt;
  const json& v = body.at("stop");
  if (v.is_string()) {
    r->add_stop(v.get<std::string>());
    return std::nullopt;
  }
  if (!v.is_array()) {
    return InvalidRequest("stop", absl::StrCat("stop: expected a string or an array of strings, "
                                               "got ", TypeName(v)));
  }
  if (v.size() > static_cast<size_t>(kMaxStopStrings)) {
    return InvalidRequest("stop", absl::StrCat("stop: ", v.size(), " strings, limit ",
                                               kMaxStopStrings));
  }
  for (size_t i = 0; i < v.size(); ++i) {
    if (!v[i].is_string()) {
      return InvalidRequest("stop", absl::StrCat("stop[", i, "]: expected a string, got ",
                                                 TypeName(v[i])));
    }
    r->add_stop(v[i].get<std::string>());
  }
  return std::nullopt;
}

std::optional<ApiError> ParseKvr(const json& body, v1::AttentionParams* a) {
  if (!Present(body, "kvr")) return std::nullopt;
  const json& k = body.at("kvr");
  if (!k.is_object()) {
    return InvalidRequest("kvr", absl::StrCat("kvr: expected an object, got ", TypeName(k)));
  }
  for (const auto& [key, value] : k.items()) {
    const std::string name = absl::StrCat("kvr.", key);
    if (key == "mode") {
      if (!value.is_string()) {
        return InvalidRequest(name, absl::StrCat(name, ": expected \"retrieval\" or \"full\", got ",
                                                 TypeName(value)));
      }
      a->set_mode(value.get<std::string>());
      continue;
    }
    if (key == "estimate") {
      if (value.is_null()) continue;
      if (!value.is_string()) {
        return InvalidRequest(name, absl::StrCat(name, ": expected \"default\", \"on\" or "
                                                 "\"off\", got ", TypeName(value)));
      }
      a->set_estimate(value.get<std::string>());  // validated by the worker
      continue;
    }
    int64_t i = 0;
    if (key == "sinks" || key == "window" || key == "k" || key == "budget") {
      if (value.is_null()) continue;
      if (auto e = GetInt(k, name, value, std::numeric_limits<int32_t>::min(),
                          std::numeric_limits<int32_t>::max(), &i)) {
        return e;
      }
      const auto v = static_cast<int32_t>(i);
      if (key == "sinks") a->set_sinks(v);
      if (key == "window") a->set_window(v);
      if (key == "k") a->set_top_k(v);
      if (key == "budget") a->set_beam(v);
      continue;
    }
    return InvalidRequest(name, absl::StrCat(name, ": unknown field (expected mode, sinks, "
                                             "window, k, budget, estimate)"));
  }
  return std::nullopt;
}

// One token-id prompt `p` (named `name`) into `r`.
std::optional<ApiError> ParseTokenPrompt(const json& body, const std::string& name, const json& p,
                                         v1::GenerateRequest* r) {
  if (p.empty()) return InvalidRequest("prompt", absl::StrCat(name, ": empty array"));
  v1::TokenIds* ids = r->mutable_tokens();
  for (size_t i = 0; i < p.size(); ++i) {
    int64_t id = 0;
    if (auto e = GetInt(body, absl::StrCat(name, "[", i, "]"), p[i], 0,
                        std::numeric_limits<int32_t>::max(), &id)) {
      e->param = "prompt";
      return e;
    }
    ids->add_ids(static_cast<int32_t>(id));
  }
  return std::nullopt;
}

// `prompt`: a string, an array of token ids, or an array of either (a
// batch: one choice group per prompt, at most limits.max_prompts).
std::optional<ApiError> ParsePrompts(const json& body, const ApiLimits& limits,
                                     std::vector<v1::GenerateRequest>* prompts) {
  if (!Present(body, "prompt")) return InvalidRequest("prompt", "prompt: required");
  const json& p = body.at("prompt");
  if (p.is_string()) {
    prompts->emplace_back().set_text(p.get<std::string>());
    return std::nullopt;
  }
  if (!p.is_array()) {
    return InvalidRequest("prompt", absl::StrCat("prompt: expected a string, an array of token "
                                                 "ids, or an array of those, got ", TypeName(p)));
  }
  if (p.empty()) return InvalidRequest("prompt", "prompt: empty array");
  if (!p[0].is_string() && !p[0].is_array()) {
    return ParseTokenPrompt(body, "prompt", p, &prompts->emplace_back());
  }
  if (p.size() > static_cast<size_t>(limits.max_prompts)) {
    return InvalidRequest("prompt", absl::StrCat("prompt: ", p.size(), " prompts, limit ",
                                                 limits.max_prompts, " (--max_prompts)"));
  }
  for (size_t i = 0; i < p.size(); ++i) {
    const std::string name = absl::StrCat("prompt[", i, "]");
    if (p[i].is_string()) {
      prompts->emplace_back().set_text(p[i].get<std::string>());
    } else if (p[i].is_array()) {
      if (auto e = ParseTokenPrompt(body, name, p[i], &prompts->emplace_back())) return e;
    } else {
      return InvalidRequest("prompt", absl::StrCat(name, ": expected a string or an array of "
                                                   "token ids, got ", TypeName(p[i])));
    }
  }
  return std::nullopt;
}

// A boolean field (absent or null: false).
std::optional<ApiError> GetBool(const json& body, const char* field, bool* out) {
  *out = false;
  if (!Present(body, field)) return std::nullopt;
  if (!body.at(field).is_boolean()) {
    return InvalidRequest(field, absl::StrCat(field, ": expected a boolean, got ",
                                              TypeName(body.at(field))));
  }
  *out = body.at(field).get<bool>();
  return std::nullopt;
}

std::optional<ApiError> ParseMessages(const json& body, v1::GenerateRequest* r, json* messages) {
  if (!Present(body, "messages")) return InvalidRequest("messages", "messages: required");
  const json& m = body.at("messages");
  if (!m.is_array()) {
    return InvalidRequest("messages",
                          absl::StrCat("messages: expected an array, got ", TypeName(m)));
  }
  if (m.empty()) return InvalidRequest("messages", "messages: empty array");
  std::vector<std::pair<std::string, std::string>> turns;
  for (size_t i = 0; i < m.size(); ++i) {
    const std::string name = absl::StrCat("messages[", i, "]");
    const json& msg = m[i];
    if (!msg.is_object()) {
      return InvalidRequest("messages",
                            absl::StrCat(name, ": expected an object, got ", TypeName(msg)));
    }
    auto role = msg.find("role");
    if (role == msg.end() || !role->is_string()) {
      return InvalidRequest("messages", absl::StrCat(name, ".role: required string"));
    }
    const std::string r_name = role->get<std::string>();
    if (r_name != "system" && r_name != "developer" && r_name != "user" &&
        r_name != "assistant") {
      return InvalidRequest("messages",
                            absl::StrCat(name, ".role: \"", r_name,
                                         "\" is not one of system, developer, user, assistant"));
    }
    std::string text;
    auto content = msg.find("content");
    if (content == msg.end() || content->is_null()) {
      return InvalidRequest("messages", absl::StrCat(name, ".content: required"));
    }
    if (content->is_string()) {
      text = content->get<std::string>();
    } else if (content->is_array()) {
      for (size_t j = 0; j < content->size(); ++j) {
        const json& part = (*content)[j];
        auto type = part.is_object() ? part.find("type") : part.end();
        if (!part.is_object() || type == part.end() || *type != "text" ||
            !part.contains("text") || !part.at("text").is_string()) {
          return InvalidRequest(
              "messages", absl::StrCat(name, ".content[", j,
                                       "]: only {\"type\": \"text\", \"text\": ...} parts are "
                                       "supported"));
        }
        text += part.at("text").get<std::string>();
      }
    } else {
      return InvalidRequest("messages", absl::StrCat(name, ".content: expected a string or an "
                                                     "array of text parts, got ",
                                                     TypeName(*content)));
    }
    const std::string role_name = r_name == "developer" ? "system" : r_name;
    messages->push_back(json{{"role", role_name}, {"content", text}});
    turns.emplace_back(role_name, std::move(text));
  }
  r->set_text(ChatPrompt(turns));
  return std::nullopt;
}

}  // namespace

std::optional<ApiError> ParseBody(std::string_view text, json* out) {
  // Nesting depth measured before parsing, in one pass: brackets outside
  // strings. For valid JSON this is exactly the value's depth; invalid JSON
  // is then reported by the parser (or refused here first, which is as
  // correct).
  int depth = 0;
  bool in_string = false;
  bool escaped = false;
  for (const char c : text) {
    if (in_string) {
      if (escaped) {
        escaped = false;
      } else if (c == '\\') {
        escaped = true;
      } else if (c == '"') {
        in_string = false;
      }
      continue;
    }
    if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > kMaxJsonDepth) {
        return InvalidRequest("", absl::StrCat("request body: JSON nested deeper than the limit of ",
                                               kMaxJsonDepth, " levels"));
      }
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
  try {
    *out = json::parse(text);
  } catch (const json::exception& err) {
    // parse_error, and also out_of_range (a number such as 1e999 that
    // overflows a double): both the client's fault, so 400, not 500.
    return InvalidRequest("", absl::StrCat("request body: invalid JSON (", err.what(), ")"));
  }
  return std::nullopt;
}

json ApiError::ToJson() const {
  json e = {{"message", message}, {"type", type}, {"param", nullptr}, {"code", nullptr}};
  if (!param.empty()) e["param"] = param;
  if (!code.empty()) e["code"] = code;
  return json{{"error", e}};
}

ApiError InvalidRequest(std::string param, std::string message) {
  ApiError e;
  e.http_status = 400;
  e.message = std::move(message);
  e.type = "invalid_request_error";
  e.param = std::move(param);
  e.grpc_code = absl::StatusCode::kInvalidArgument;
  return e;
}

ApiError FromStatus(absl::StatusCode code, const std::string& message) {
  ApiError e;
  e.message = message;
  e.grpc_code = code;
  switch (code) {
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kFailedPrecondition:
      e.http_status = 400;
      e.type = "invalid_request_error";
      break;
    case absl::StatusCode::kOutOfRange:
      e.http_status = 400;
      e.type = "invalid_request_error";
      e.code = "context_length_exceeded";
      break;
    case absl::StatusCode::kNotFound:
      e.http_status = 404;
      e.type = "invalid_request_error";
      e.code = "not_found";
      break;
    case absl::StatusCode::kResourceExhausted:
      e.http_status = 429;
      e.type = "rate_limit_error";
      e.code = "overloaded";
      break;
    case absl::StatusCode::kUnavailable:
      e.http_status = 503;
      e.type = "service_unavailable_error";
      e.code = "no_worker";
      break;
    case absl::StatusCode::kDeadlineExceeded:
      e.http_status = 504;
      e.type = "timeout_error";
      e.code = "deadline_exceeded";
      break;
    case absl::StatusCode::kCancelled:
      e.http_status = 499;
      e.type = "cancelled";
      break;
    case absl::StatusCode::kUnimplemented:
      e.http_status = 501;
      e.type = "not_implemented_error";
      break;
    default:
      e.http_status = 500;
      e.type = "server_error";
      break;
  }
  // Messages start with the offending field ("max_tokens: -1 ...",
  // "top_p 1.5 outside ...", "messages[2].role: ...").
  if (e.http_status == 400) {
    const size_t end = e.message.find_first_not_of("abcdefghijklmnopqrstuvwxyz0123456789_.[]");
    std::string field = e.message.substr(0, end);
    if (const size_t bracket = field.find('['); bracket != std::string::npos) {
      field.resize(bracket);
    }
    static const char* const kFields[] = {
        "model",  "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature",
        "top_p",  "top_k",  "seed",     "stop",       "stream",                "stream_options",
        "n",      "repetition_penalty", "presence_penalty", "frequency_penalty", "logprobs",
        "top_logprobs", "echo", "user"};
    bool known = absl::StartsWith(field, "kvr.");
    for (const char* f : kFields) known = known || field == f;
    if (known) e.param = field;
  }
  return e;
}

std::string RenameWorkerFields(Route route, std::string_view message) {
  const std::string prompt = route == Route::kChatCompletions ? "messages" : "prompt";
  // Longest names first: "attention.top_k" before "attention.".
  const std::pair<const char*, std::string> renames[] = {
      {"sampling.", ""},
      {"attention.top_k", "kvr.k"},
      {"attention.beam", "kvr.budget"},
      {"attention.", "kvr."},
      {"text", prompt},
      {"tokens", prompt},
      {"prompt", prompt},
  };
  for (const auto& [from, to] : renames) {
    if (message.rfind(from, 0) == 0) {
      return to + std::string(message.substr(std::string_view(from).size()));
    }
  }
  return std::string(message);
}

std::optional<ApiError> ParseRequest(Route route, const json& body, ParsedRequest* out,
                                     const ApiLimits& limits) {
  if (!body.is_object()) {
    return InvalidRequest("", absl::StrCat("request body: expected a JSON object, got ",
                                           TypeName(body)));
  }
  out->route = route;
  v1::GenerateRequest& r = out->request;
  if (!Present(body, "model") || !body.at("model").is_string()) {
    return InvalidRequest("model", "model: required string");
  }
  out->model = body.at("model").get<std::string>();
  if (route == Route::kCompletions) {
    if (auto e = ParsePrompts(body, limits, &out->prompts)) return e;
    r.MergeFrom(out->prompts[0]);
  } else {
    out->messages = json::array();
    if (auto e = ParseMessages(body, &r, &out->messages)) return e;
  }
  bool set = false;
  int64_t i = 0;
  const char* max_tokens_field =
      route == Route::kChatCompletions && Present(body, "max_completion_tokens")
          ? "max_completion_tokens"
          : "max_tokens";
  if (auto e = GetOptionalInt(body, max_tokens_field, std::numeric_limits<int32_t>::min(),
                              std::numeric_limits<int32_t>::max(), &i, &set)) {
    return e;
  }
  if (set) {
    if (i < 0) {
      return InvalidRequest(max_tokens_field,
                            absl::StrCat(max_tokens_field, ": ", i, " must be >= 0"));
    }
    r.set_max_tokens(static_cast<int32_t>(i));
  }
  float f = 0.0f;
  v1::SamplingParams* s = r.mutable_sampling();
  if (auto e = GetFloat(body, "temperature", &f, &set)) return e;
  if (set) {
    if (f < 0.0f) {
      return InvalidRequest("temperature", absl::StrCat("temperature: ", f, " must be >= 0"));
    }
    s->set_temperature(f);
  } else {
    s->set_temperature(1.0f);  // OpenAI's default
  }
  if (auto e = GetFloat(body, "top_p", &f, &set)) return e;
  if (set) s->set_top_p(f);
  if (auto e = GetFloat(body, "repetition_penalty", &f, &set)) return e;
  if (set) s->set_repetition_penalty(f);
  if (auto e = GetOptionalInt(body, "top_k", std::numeric_limits<int32_t>::min(),
                              std::numeric_limits<int32_t>::max(), &i, &set)) {
    return e;
  }
  if (set) s->set_top_k(static_cast<int32_t>(i));
  if (Present(body, "seed")) {
    const json& v = body.at("seed");
    if (v.is_number_unsigned()) {
      s->set_seed(v.get<uint64_t>());
    } else if (auto e = GetInt(body, "seed", v, 0, std::numeric_limits<int64_t>::max(), &i)) {
      return e;
    } else {
      s->set_seed(static_cast<uint64_t>(i));
    }
  }
  if (auto e = ParseStop(body, &r)) return e;
  // The worker takes at most kMaxStopStrings (OpenAI's 4): a chat request
  // that uses all four goes without the turn stop.
  if (route == Route::kChatCompletions && r.stop_size() < kMaxStopStrings) {
    r.add_stop(kChatStop);
    out->chat_stop_added = true;
  }
  if (Present(body, "stream")) {
    if (!body.at("stream").is_boolean()) {
      return InvalidRequest("stream", absl::StrCat("stream: expected a boolean, got ",
                                                   TypeName(body.at("stream"))));
    }
    out->stream = body.at("stream").get<bool>();
  }
  if (Present(body, "stream_options")) {
    const json& so = body.at("stream_options");
    if (!so.is_object()) {
      return InvalidRequest("stream_options", absl::StrCat("stream_options: expected an object, "
                                                           "got ", TypeName(so)));
    }
    if (Present(so, "include_usage")) {
      if (!so.at("include_usage").is_boolean()) {
        return InvalidRequest("stream_options", "stream_options.include_usage: expected a boolean");
      }
      out->include_usage = so.at("include_usage").get<bool>();
    }
  }
  if (auto e = GetOptionalInt(body, "n", 1, limits.max_n, &i, &set)) {
    // The value quoted by its shape ("an array of 3"), never dumped whole.
    e->message = absl::StrCat("n: ", Quote(body.at("n")), " outside [1, ", limits.max_n,
                              "] (--max_n)");
    return e;
  }
  if (set) out->n = static_cast<int>(i);
  if (Present(body, "best_of")) {
    if (auto e = GetInt(body, "best_of", body.at("best_of"), 1, 1, &i)) {
      e->message = "best_of: only 1 is supported";
      return e;
    }
  }
  // Log-probabilities: completions `logprobs: N` (alternatives, [0, 5] as
  // OpenAI's legacy API), chat `logprobs: true` + `top_logprobs: N` ([0, 20]).
  if (route == Route::kCompletions) {
    if (auto e = GetOptionalInt(body, "logprobs", 0, kMaxCompletionLogprobs, &i, &set)) return e;
    if (set) out->logprobs = static_cast<int>(i);
    if (auto e = GetBool(body, "echo", &out->echo)) return e;
    if (out->echo) r.set_echo(true);
  } else {
    bool want = false;
    if (auto e = GetBool(body, "logprobs", &want)) return e;
    if (auto e = GetOptionalInt(body, "top_logprobs", 0, kMaxChatTopLogprobs, &i, &set)) return e;
    if (set && !want) {
      return InvalidRequest("top_logprobs", "top_logprobs: requires logprobs: true");
    }
    if (want) out->logprobs = set ? static_cast<int>(i) : 0;
    if (Present(body, "echo")) return InvalidRequest("echo", "echo: only /v1/completions has it");
  }
  if (out->logprobs >= 0) {
    r.set_logprobs(out->logprobs);
  } else if (out->echo && r.has_tokens()) {
    r.set_logprobs(0);  // the prompt's text comes from its token pieces
  }
  if (auto e = GetFloat(body, "presence_penalty", &f, &set)) return e;
  if (set) s->set_presence_penalty(f);
  if (auto e = GetFloat(body, "frequency_penalty", &f, &set)) return e;
  if (set) s->set_frequency_penalty(f);
  if (Present(body, "user")) {
    const json& u = body.at("user");
    if (!u.is_string()) {
      return InvalidRequest("user", absl::StrCat("user: expected a string, got ", TypeName(u)));
    }
    if (u.get_ref<const std::string&>().size() > kMaxUserBytes) {
      return InvalidRequest("user", absl::StrCat("user: ", u.get_ref<const std::string&>().size(),
                                                 " bytes, limit ", kMaxUserBytes));
    }
    out->user = u.get<std::string>();
  }
  if (auto e = Unsupported(body, "suffix", "", "suffix (insertion) is not supported")) return e;
  if (Present(body, "tools") && !(body.at("tools").is_array() && body.at("tools").empty())) {
    return InvalidRequest("tools", "tools: tool calls are not supported");
  }
  if (auto e = ParseKvr(body, r.mutable_attention())) return e;
  return std::nullopt;
}

std::string ChatPrompt(const std::vector<std::pair<std::string, std::string>>& messages) {
  std::string out;
  for (const auto& [role, content] : messages) {
    const char* name = role == "system" ? "System" : role == "user" ? "User" : "Assistant";
    absl::StrAppend(&out, name, ": ", content, "\n");
  }
  out += "Assistant:";
  return out;
}

std::optional<ApiError> ApplyChatTemplate(const ChatTemplate& tmpl, ParsedRequest* parsed) {
  absl::StatusOr<std::string> text = tmpl.Render(parsed->messages, /*add_generation_prompt=*/true);
  if (!text.ok()) {
    if (text.status().code() == absl::StatusCode::kFailedPrecondition) {  // raise_exception
      return InvalidRequest("messages", absl::StrCat("messages: ", text.status().message()));
    }
    return InvalidRequest("messages", absl::StrCat("messages: the model's chat template failed: ",
                                                   text.status().message()));
  }
  std::string prompt = *std::move(text);
  if (!tmpl.bos_token().empty() && absl::StartsWith(prompt, tmpl.bos_token())) {
    // The worker's BOS id stands for the rendered one.
    prompt.erase(0, tmpl.bos_token().size());
  } else {
    // A template that renders no BOS (ChatML) gets none from the worker either.
    parsed->request.set_add_bos(false);
  }
  parsed->request.set_text(std::move(prompt));
  if (parsed->chat_stop_added && parsed->request.stop_size() > 0 &&
      parsed->request.stop(parsed->request.stop_size() - 1) == kChatStop) {
    parsed->request.mutable_stop()->RemoveLast();
    parsed->chat_stop_added = false;
  }
  return std::nullopt;
}

std::string FinishReasonName(v1::FinishReason reason) {
  switch (reason) {
    case v1::FINISH_REASON_STOP:
    case v1::FINISH_REASON_EOS:
      return "stop";
    case v1::FINISH_REASON_LENGTH:
    case v1::FINISH_REASON_CONTEXT_FULL:
      return "length";
    default:
      return "stop";
  }
}

std::string Utf8Joiner::Push(std::string_view piece) {
  pending_.append(piece);
  // Where the last (possibly incomplete) character starts: at most 3 bytes
  // back from the end, at the first byte that is not a continuation byte.
  size_t cut = pending_.size();
  for (size_t back = 1; back <= 4 && back <= pending_.size(); ++back) {
    const auto c = static_cast<unsigned char>(pending_[pending_.size() - back]);
    if ((c & 0xC0) == 0x80) continue;  // continuation byte
    const size_t need = c < 0x80 ? 1 : (c & 0xE0) == 0xC0 ? 2 : (c & 0xF0) == 0xE0 ? 3
                                    : (c & 0xF8) == 0xF0 ? 4 : 1;
    if (need > back) cut = pending_.size() - back;  // incomplete: hold it back
    break;
  }
  std::string out = pending_.substr(0, cut);
  pending_.erase(0, cut);
  return out;
}

std::string Utf8Joiner::Flush() { return std::exchange(pending_, {}); }

std::vector<v1::GenerateRequest> ChoiceRequests(const ParsedRequest& parsed) {
  std::vector<v1::GenerateRequest> out;
  const size_t groups = parsed.prompts.empty() ? 1 : parsed.prompts.size();
  out.reserve(groups * static_cast<size_t>(std::max(1, parsed.n)));
  for (size_t p = 0; p < groups; ++p) {
    for (int j = 0; j < std::max(1, parsed.n); ++j) {
      v1::GenerateRequest& r = out.emplace_back(parsed.request);
      if (!parsed.prompts.empty()) {
        r.clear_text();
        r.clear_tokens();
        r.MergeFrom(parsed.prompts[p]);
      }
      if (j > 0) {
        const uint64_t seed = r.sampling().has_seed() ? r.sampling().seed() : 1;
        r.mutable_sampling()->set_seed(seed + static_cast<uint64_t>(j));  // wraps: defined
      }
    }
  }
  return out;
}

v1::GenerateRequest WorkerRequest(const ParsedRequest& parsed) {
  v1::GenerateRequest r = parsed.request;
  if (parsed.n > 1) r.set_n(parsed.n);
  if (parsed.prompts.size() == 1) {
    r.clear_text();
    r.clear_tokens();
    r.MergeFrom(parsed.prompts[0]);
  } else if (parsed.prompts.size() > 1) {
    r.clear_text();
    r.clear_tokens();
    for (const v1::GenerateRequest& p : parsed.prompts) {
      v1::Prompt* out = r.add_prompts();
      if (p.has_text()) {
        out->set_text(p.text());
      } else if (p.has_tokens()) {
        *out->mutable_tokens() = p.tokens();
      }
    }
  }
  return r;
}

namespace {

std::vector<int> Bytes(const std::string& s) {
  std::vector<int> out;
  out.reserve(s.size());
  for (char c : s) out.push_back(static_cast<unsigned char>(c));
  return out;
}

json NullableLogprob(const v1::TokenLogprob& t) {
  return t.has_logprob() ? json(t.logprob()) : json(nullptr);
}

}  // namespace

json LogprobsJson(Route route, const std::vector<v1::TokenLogprob>& tokens,
                  int64_t* text_offset) {
  if (route == Route::kChatCompletions) {
    json content = json::array();
    for (const v1::TokenLogprob& t : tokens) {
      json top = json::array();
      for (const v1::TopLogprob& a : t.top()) {
        top.push_back({{"token", a.text()}, {"logprob", a.logprob()}, {"bytes", Bytes(a.text())}});
      }
      content.push_back({{"token", t.text()},
                         {"logprob", NullableLogprob(t)},
                         {"bytes", Bytes(t.text())},
                         {"top_logprobs", top}});
    }
    return json{{"content", content}};
  }
  json toks = json::array(), lps = json::array(), tops = json::array(), offsets = json::array();
  for (const v1::TokenLogprob& t : tokens) {
    toks.push_back(t.text());
    lps.push_back(NullableLogprob(t));
    if (!t.has_logprob()) {
      tops.push_back(nullptr);
    } else {
      json top = json::object();
      for (const v1::TopLogprob& a : t.top()) {
        if (!top.contains(a.text())) top[a.text()] = a.logprob();
      }
      tops.push_back(top);
    }
    offsets.push_back(*text_offset);
    *text_offset += static_cast<int64_t>(t.text().size());
  }
  return json{{"tokens", toks}, {"token_logprobs", lps}, {"top_logprobs", tops},
              {"text_offset", offsets}};
}

json ChoiceJson(Route route, int index, const std::string& text, const std::string& finish_reason,
                json logprobs) {
  json choice = {{"index", index}, {"finish_reason", finish_reason}};
  if (route == Route::kChatCompletions) {
    choice["message"] = {{"role", "assistant"}, {"content", text}};
  } else {
    choice["text"] = text;
  }
  choice["logprobs"] = std::move(logprobs);
  return choice;
}

json ResponseJson(const ResponseInfo& info, json choices, const v1::Usage& usage,
                  const std::vector<int32_t>& token_ids, const v1::Timings& t) {
  return json{
      {"id", info.id},
      {"object", info.route == Route::kChatCompletions ? "chat.completion" : "text_completion"},
      {"created", info.created},
      {"model", info.model},
      {"choices", std::move(choices)},
      {"usage",
       {{"prompt_tokens", usage.prompt_tokens()},
        {"completion_tokens", usage.completion_tokens()},
        {"total_tokens", usage.prompt_tokens() + usage.completion_tokens()}}},
      {"kvr",
       {{"token_ids", token_ids},
        {"timings",
         {{"queue_seconds", t.queue_seconds()},
          {"time_to_first_token_seconds", t.time_to_first_token_seconds()},
          {"mean_token_latency_seconds", t.mean_token_latency_seconds()},
          {"prefill_seconds", t.prefill_seconds()},
          {"node_wait_seconds", t.node_wait_seconds()},
          {"total_seconds", t.total_seconds()}}}}}};
}

json CompletionResponse(const ResponseInfo& info, const std::string& text,
                        const std::vector<int32_t>& token_ids, const v1::GenerateFinal& summary) {
  json choices = json::array(
      {ChoiceJson(info.route, 0, text, FinishReasonName(summary.finish_reason()), nullptr)});
  return ResponseJson(info, std::move(choices), summary.usage(), token_ids, summary.timings());
}

json StreamChunk(const ResponseInfo& info, const std::string& text, bool first,
                 const std::string* finish_reason, int index, const json* logprobs) {
  json choice = {{"index", index},
                 {"finish_reason", finish_reason == nullptr ? json(nullptr) : json(*finish_reason)}};
  if (info.route == Route::kChatCompletions) {
    json delta = json::object();
    if (first) delta["role"] = "assistant";
    if (finish_reason == nullptr) delta["content"] = text;
    choice["delta"] = delta;
  } else {
    choice["text"] = text;
  }
  choice["logprobs"] = logprobs == nullptr ? json(nullptr) : *logprobs;
  return json{{"id", info.id},
              {"object", info.route == Route::kChatCompletions ? "chat.completion.chunk"
                                                               : "text_completion"},
              {"created", info.created},
              {"model", info.model},
              {"choices", json::array({choice})}};
}

json UsageChunk(const ResponseInfo& info, const v1::Usage& usage) {
  return json{{"id", info.id},
              {"object", info.route == Route::kChatCompletions ? "chat.completion.chunk"
                                                               : "text_completion"},
              {"created", info.created},
              {"model", info.model},
              {"choices", json::array()},
              {"usage",
               {{"prompt_tokens", usage.prompt_tokens()},
                {"completion_tokens", usage.completion_tokens()},
                {"total_tokens", usage.prompt_tokens() + usage.completion_tokens()}}}};
}

std::string Dump(const json& value) {
  return value.dump(-1, ' ', false, json::error_handler_t::replace);
}

std::string SseEvent(const json& event) { return absl::StrCat("data: ", Dump(event), "\n\n"); }

}  // namespace kvr::gateway
