#include "gpu_worker/model/hf_config.h"

#include <charconv>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <limits>

#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"

namespace kvr::worker {
namespace {

using Json = nlohmann::json;

class Fields {
 public:
  Fields(const Json& obj, const std::string& name, std::string prefix)
      : obj_(obj), name_(name), prefix_(std::move(prefix)) {}

  const Json* Find(const char* key) const {
    auto it = obj_.find(key);
    return it == obj_.end() || it->is_null() ? nullptr : &*it;
  }

  absl::Status Missing(const char* key) const {
    return absl::InvalidArgumentError(
        absl::StrCat("HF config ", name_, ": required field ", prefix_, key, " is missing"));
  }
  absl::Status WrongType(const char* key, const char* want, const Json& v) const {
    return absl::InvalidArgumentError(absl::StrCat("HF config ", name_, ": field ", prefix_, key,
                                                   " must be ", want, ", got ", v.dump()));
  }

  // An integer in [lo, hi]; `def` when absent (nullopt: required).
  absl::StatusOr<int> Int(const char* key, std::optional<int> def, int64_t lo = 1,
                          int64_t hi = std::numeric_limits<int32_t>::max()) const {
    const Json* v = Find(key);
    if (v == nullptr) {
      if (def) return *def;
      return Missing(key);
    }
    if (!v->is_number_integer()) return WrongType(key, "an integer", *v);
    if (v->is_number_unsigned() ? v->get<uint64_t>() > static_cast<uint64_t>(hi)
                                : (v->get<int64_t>() < lo || v->get<int64_t>() > hi)) {
      return absl::InvalidArgumentError(absl::StrCat("HF config ", name_, ": field ", prefix_, key,
                                                     " = ", v->dump(), " outside [", lo, ", ", hi,
                                                     "]"));
    }
    return static_cast<int>(v->get<int64_t>());
  }

  absl::StatusOr<float> Float(const char* key, std::optional<float> def) const {
    const Json* v = Find(key);
    if (v == nullptr) {
      if (def) return *def;
      return Missing(key);
    }
    if (!v->is_number()) return WrongType(key, "a number", *v);
    const double d = v->get<double>();
    if (!std::isfinite(d) || std::abs(d) > std::numeric_limits<float>::max()) {
      return absl::InvalidArgumentError(absl::StrCat("HF config ", name_, ": field ", prefix_, key,
                                                     " = ", v->dump(), " is not a finite float"));
    }
    return static_cast<float>(d);
  }

  absl::StatusOr<bool> Bool(const char* key, bool def) const {
    const Json* v = Find(key);
    if (v == nullptr) return def;
    if (!v->is_boolean()) return WrongType(key, "true or false", *v);
    return v->get<bool>();
  }

  // The string value, or "" when absent.
  absl::StatusOr<std::string> String(const char* key) const {
    const Json* v = Find(key);
    if (v == nullptr) return std::string();
    if (!v->is_string()) return WrongType(key, "a string", *v);
    return v->get<std::string>();
  }

 private:
  const Json& obj_;
  const std::string& name_;
  std::string prefix_;
};

absl::StatusOr<RopeScaling> ParseRopeScaling(const Json& j, const std::string& name) {
  if (!j.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "HF config ", name, ": field rope_scaling must be an object or null, got ", j.dump()));
  }
  Fields f(j, name, "rope_scaling.");
  KVR_ASSIGN_OR_RETURN(std::string type, f.String("rope_type"));
  if (type.empty()) {
    KVR_ASSIGN_OR_RETURN(type, f.String("type"));
  }
  if (type != "llama3") {
    return absl::InvalidArgumentError(
        absl::StrCat("HF config ", name, ": rope_scaling type \"", type,
                     "\" is not supported (only \"llama3\", as in Llama 3.1)"));
  }
  RopeScaling s;
  KVR_ASSIGN_OR_RETURN(s.factor, f.Float("factor", std::nullopt));
  KVR_ASSIGN_OR_RETURN(s.low_freq_factor, f.Float("low_freq_factor", std::nullopt));
  KVR_ASSIGN_OR_RETURN(s.high_freq_factor, f.Float("high_freq_factor", std::nullopt));
  KVR_ASSIGN_OR_RETURN(s.original_max_position_embeddings,
                       f.Int("original_max_position_embeddings", std::nullopt));
  return s;
}

// `f` as the double with the shortest decimal form that reads back as `f`,
// so config.json says 1e-05 rather than 9.999999747378752e-06.
double ShortestDouble(float f) {
  char buf[64];
  const auto r = std::to_chars(buf, buf + sizeof(buf) - 1, f);
  *r.ptr = '\0';
  return std::strtod(buf, nullptr);
}

}  // namespace

absl::StatusOr<LlamaConfig> ParseHfConfig(std::string_view json_text, const std::string& name) {
  Json j;
  try {
    j = Json::parse(json_text);
  } catch (const Json::exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat("HF config ", name, " is not valid JSON: ", e.what()));
  }
  if (!j.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat("HF config ", name, ": top level must be a JSON object"));
  }
  Fields f(j, name, "");
  KVR_ASSIGN_OR_RETURN(const std::string model_type, f.String("model_type"));
  if (!model_type.empty() && model_type != "llama") {
    return absl::InvalidArgumentError(absl::StrCat(
        "HF config ", name, ": model_type \"", model_type, "\" is not supported (only \"llama\")"));
  }
  KVR_ASSIGN_OR_RETURN(const std::string act, f.String("hidden_act"));
  if (!act.empty() && act != "silu") {
    return absl::InvalidArgumentError(absl::StrCat("HF config ", name, ": hidden_act \"", act,
                                                   "\" is not supported (only \"silu\")"));
  }
  for (const char* bias : {"attention_bias", "mlp_bias"}) {
    KVR_ASSIGN_OR_RETURN(const bool b, f.Bool(bias, false));
    if (b) {
      return absl::InvalidArgumentError(
          absl::StrCat("HF config ", name, ": ", bias, " = true is not supported"));
    }
  }

  LlamaConfig c;
  KVR_ASSIGN_OR_RETURN(c.dim, f.Int("hidden_size", std::nullopt));
  KVR_ASSIGN_OR_RETURN(c.hidden_dim, f.Int("intermediate_size", std::nullopt));
  KVR_ASSIGN_OR_RETURN(c.n_layers, f.Int("num_hidden_layers", std::nullopt));
  KVR_ASSIGN_OR_RETURN(c.n_heads, f.Int("num_attention_heads", std::nullopt));
  KVR_ASSIGN_OR_RETURN(c.n_kv_heads, f.Int("num_key_value_heads", c.n_heads));
  // Before dividing by it (head_dim's default is hidden_size / heads).
  if (c.n_heads < 1) {
    return absl::InvalidArgumentError(absl::StrCat("HF config ", name, ": num_attention_heads = ",
                                                   c.n_heads, " must be >= 1"));
  }
  if (f.Find("head_dim") == nullptr && c.dim % c.n_heads != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("HF config ", name, ": num_attention_heads = ", c.n_heads,
                     " does not divide hidden_size = ", c.dim, " and head_dim is not given"));
  }
  KVR_ASSIGN_OR_RETURN(c.head_dim, f.Int("head_dim", c.dim / c.n_heads));
  KVR_ASSIGN_OR_RETURN(c.vocab_size, f.Int("vocab_size", std::nullopt));
  KVR_ASSIGN_OR_RETURN(c.seq_len, f.Int("max_position_embeddings", std::nullopt));
  KVR_ASSIGN_OR_RETURN(c.rope_theta, f.Float("rope_theta", 10000.0f));
  KVR_ASSIGN_OR_RETURN(c.rms_eps, f.Float("rms_norm_eps", 1e-6f));
  KVR_ASSIGN_OR_RETURN(c.tied_embeddings, f.Bool("tie_word_embeddings", false));
  c.rope_style = RopeStyle::kHalfSplit;
  if (const Json* rs = f.Find("rope_scaling"); rs != nullptr) {
    KVR_ASSIGN_OR_RETURN(c.rope_scaling, ParseRopeScaling(*rs, name));
  }
  if (absl::Status s = c.Validate(); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("HF config ", name, ": ", s.message()));
  }
  return c;
}

absl::StatusOr<LlamaConfig> LoadHfConfig(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open HF config ", path));
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) return absl::DataLossError(absl::StrCat("error reading HF config ", path));
  return ParseHfConfig(text, path);
}

std::string HfConfigJson(const LlamaConfig& c, std::string_view torch_dtype) {
  Json j = {
      {"architectures", {"LlamaForCausalLM"}},
      {"model_type", "llama"},
      {"hidden_act", "silu"},
      {"hidden_size", c.dim},
      {"intermediate_size", c.hidden_dim},
      {"num_hidden_layers", c.n_layers},
      {"num_attention_heads", c.n_heads},
      {"num_key_value_heads", c.n_kv_heads},
      {"head_dim", c.head_dim},
      {"vocab_size", c.vocab_size},
      {"max_position_embeddings", c.seq_len},
      {"rope_theta", ShortestDouble(c.rope_theta)},
      {"rms_norm_eps", ShortestDouble(c.rms_eps)},
      {"tie_word_embeddings", c.tied_embeddings},
      {"attention_bias", false},
      {"mlp_bias", false},
      {"torch_dtype", std::string(torch_dtype)},
  };
  if (c.rope_scaling) {
    j["rope_scaling"] = {
        {"rope_type", "llama3"},
        {"factor", ShortestDouble(c.rope_scaling->factor)},
        {"low_freq_factor", ShortestDouble(c.rope_scaling->low_freq_factor)},
        {"high_freq_factor", ShortestDouble(c.rope_scaling->high_freq_factor)},
        {"original_max_position_embeddings", c.rope_scaling->original_max_position_embeddings},
    };
  } else {
    j["rope_scaling"] = nullptr;
  }
  return j.dump(2) + "\n";
}

}  // namespace kvr::worker
