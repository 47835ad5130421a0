#include "gpu_worker/model/chat_config.h"

#include <algorithm>
#include <filesystem>
#include <system_error>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "gpu_worker/model/model_files.h"

#if KVR_HAVE_NLOHMANN_JSON
#include "nlohmann/json.hpp"
#endif

namespace kvr::worker {

bool StopTokenTokenizer::IsStopToken(int32_t id) const {
  return base_->IsStopToken(id) || std::find(stop_ids_.begin(), stop_ids_.end(), id) != stop_ids_.end();
}

#if KVR_HAVE_NLOHMANN_JSON

namespace {

using nlohmann::json;

constexpr int kMaxConfigJsonDepth = 64;

absl::StatusOr<json> ParseJson(absl::string_view text, absl::string_view what) {
  if (text.size() > kMaxChatConfigFileBytes) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": ", text.size(), " bytes, limit ",
                                                   kMaxChatConfigFileBytes));
  }
  // Configs nest a few levels; a deeper document is refused while parsing
  // (the callback stops the parse), so no deep value is ever built.
  bool too_deep = false;
  json j = json::parse(
      text.begin(), text.end(),
      [&too_deep](int depth, json::parse_event_t, json&) {
        if (depth > kMaxConfigJsonDepth) too_deep = true;
        return !too_deep;
      },
      /*allow_exceptions=*/false);
  if (too_deep) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": JSON nested deeper than ", kMaxConfigJsonDepth, " levels"));
  }
  if (j.is_discarded()) return absl::InvalidArgumentError(absl::StrCat(what, ": invalid JSON"));
  if (!j.is_object()) return absl::InvalidArgumentError(absl::StrCat(what, ": expected a JSON object"));
  return j;
}

// A special token field: a string, {"content": string, ...}, null or absent.
absl::StatusOr<std::string> TokenField(const json& j, const char* field, absl::string_view what) {
  auto it = j.find(field);
  if (it == j.end() || it->is_null()) return std::string();
  if (it->is_string()) return it->get<std::string>();
  if (it->is_object()) {
    auto c = it->find("content");
    if (c != it->end() && c->is_string()) return c->get<std::string>();
  }
  return absl::InvalidArgumentError(
      absl::StrCat(what, ": ", field, " must be a string or an object with a string \"content\""));
}

}  // namespace

absl::StatusOr<ChatConfig> ParseTokenizerConfig(absl::string_view json_text, absl::string_view what) {
  KVR_ASSIGN_OR_RETURN(const json j, ParseJson(json_text, what));
  ChatConfig c;
  auto t = j.find("chat_template");
  if (t != j.end() && !t->is_null()) {
    if (t->is_string()) {
      c.chat_template = t->get<std::string>();
    } else if (t->is_array()) {
      bool found = false;
      for (const json& named : *t) {
        if (!named.is_object() || !named.contains("name") || !named.contains("template") ||
            !named["name"].is_string() || !named["template"].is_string()) {
          return absl::InvalidArgumentError(absl::StrCat(
              what, ": chat_template: a list entry must be {\"name\": string, \"template\": string}"));
        }
        if (named["name"] == "default") {
          c.chat_template = named["template"].get<std::string>();
          found = true;
        }
      }
      if (!found) {
        return absl::InvalidArgumentError(
            absl::StrCat(what, ": chat_template: the list has no template named \"default\""));
      }
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat(what, ": chat_template must be a string or a list of named templates"));
    }
  }
  if (c.chat_template.size() > kMaxChatTemplateBytes) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": chat_template: ", c.chat_template.size(),
                                                   " bytes, limit ", kMaxChatTemplateBytes));
  }
  KVR_ASSIGN_OR_RETURN(c.bos_token, TokenField(j, "bos_token", what));
  KVR_ASSIGN_OR_RETURN(c.eos_token, TokenField(j, "eos_token", what));
  return c;
}

absl::StatusOr<std::vector<int32_t>> ParseGenerationConfigEos(absl::string_view json_text,
                                                              absl::string_view what) {
  KVR_ASSIGN_OR_RETURN(const json j, ParseJson(json_text, what));
  std::vector<int32_t> ids;
  auto e = j.find("eos_token_id");
  if (e == j.end() || e->is_null()) return ids;
  const json list = e->is_array() ? *e : json::array({*e});
  if (list.size() > kMaxStopTokenIds) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": eos_token_id: ", list.size(),
                                                   " ids, limit ", kMaxStopTokenIds));
  }
  for (const json& id : list) {
    if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() > INT32_MAX) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, ": eos_token_id: expected non-negative int32 ids"));
    }
    ids.push_back(static_cast<int32_t>(id.get<int64_t>()));
  }
  return ids;
}

#else

absl::StatusOr<ChatConfig> ParseTokenizerConfig(absl::string_view, absl::string_view what) {
  return absl::UnimplementedError(absl::StrCat(what, ": built without nlohmann-json"));
}
absl::StatusOr<std::vector<int32_t>> ParseGenerationConfigEos(absl::string_view, absl::string_view what) {
  return absl::UnimplementedError(absl::StrCat(what, ": built without nlohmann-json"));
}

#endif

absl::StatusOr<ChatConfig> ReadChatConfig(const std::string& model_dir,
                                          const std::string& override_file,
                                          const Tokenizer& tokenizer) {
  namespace fs = std::filesystem;
  std::error_code ec;
  ChatConfig c;
  std::vector<int32_t> ids;
  if (!model_dir.empty() && fs::is_directory(model_dir, ec)) {
    const std::string tc = (fs::path(model_dir) / "tokenizer_config.json").string();
    if (fs::exists(tc, ec)) {
      KVR_ASSIGN_OR_RETURN(const std::string text, ReadText(tc));
      KVR_ASSIGN_OR_RETURN(c, ParseTokenizerConfig(text, tc));
    }
    const std::string gc = (fs::path(model_dir) / "generation_config.json").string();
    if (fs::exists(gc, ec)) {
      KVR_ASSIGN_OR_RETURN(const std::string text, ReadText(gc));
      KVR_ASSIGN_OR_RETURN(ids, ParseGenerationConfigEos(text, gc));
    }
  }
  if (!override_file.empty()) {
    const std::string what = absl::StrCat("--chat_template ", override_file);
    if (fs::file_size(override_file, ec) > kMaxChatConfigFileBytes && !ec) {
      return absl::InvalidArgumentError(absl::StrCat(what, ": larger than ", kMaxChatConfigFileBytes, " bytes"));
    }
    absl::StatusOr<std::string> text = ReadText(override_file);
    if (!text.ok()) return absl::Status(text.status().code(), absl::StrCat(what, ": ", text.status().message()));
    if (absl::EndsWith(override_file, ".json")) {
      KVR_ASSIGN_OR_RETURN(ChatConfig o, ParseTokenizerConfig(*text, what));
      c.chat_template = std::move(o.chat_template);
      if (!o.bos_token.empty()) c.bos_token = std::move(o.bos_token);
      if (!o.eos_token.empty()) c.eos_token = std::move(o.eos_token);
    } else {
      if (text->size() > kMaxChatTemplateBytes) {
        return absl::InvalidArgumentError(absl::StrCat(what, ": ", text->size(), " bytes, limit ",
                                                       kMaxChatTemplateBytes));
      }
      c.chat_template = *std::move(text);
    }
  }
  if (!c.eos_token.empty()) {
    absl::StatusOr<std::vector<int32_t>> e = tokenizer.Encode(c.eos_token, false, false);
    if (e.ok() && e->size() == 1) ids.push_back((*e)[0]);
  }
  for (const int32_t id : ids) {
    if (id == tokenizer.eos_id() || id < 0 || id >= tokenizer.vocab_size()) continue;
    if (std::find(c.stop_token_ids.begin(), c.stop_token_ids.end(), id) != c.stop_token_ids.end()) continue;
    c.stop_token_ids.push_back(id);
  }
  return c;
}

}  // namespace kvr::worker
