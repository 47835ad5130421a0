#include "tools/eval.h"

#include <cstdio>
#include <fstream>
#include <sstream>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "httplib.h"
#include "nlohmann/json.hpp"
#include "tools/cli_flags.h"

namespace kvr::eval {
namespace {

using json = nlohmann::json;

constexpr char kUsage[] = R"(Usage: kvr eval --url http://HOST:PORT [flags]

Accuracy of the served model through the OpenAI HTTP API, per task and
attention mode: loglikelihood multiple choice (echo + logprobs) and passkey
retrieval (greedy generation). Prints one line per (task, mode):
  task      mode       correct  total  accuracy

  --url URL               the gateway's HTTP API (http://HOST:PORT or HOST:PORT)
  --api_key KEY           sent as "Authorization: Bearer KEY" (default none)
  --model NAME            the model id (default: the first of /v1/models)
  --tasks FILE            JSON-lines tasks (default tools/eval_tasks.jsonl)
  --modes LIST            attention modes, comma-separated (default full,retrieval)
  --passkey_tokens N      tokens generated per passkey item, [1, 256] (default 8)
  --timeout_seconds S     per HTTP request, [1, 3600] (default 120)
)";

struct Options {
  std::string url;
  std::string api_key;
  std::string model;
  std::string tasks = "tools/eval_tasks.jsonl";
  std::string modes = "full,retrieval";
  int passkey_tokens = 8;
  double timeout_seconds = 120;
};

absl::StatusOr<std::string> Field(const json& line, const char* name, size_t line_no) {
  if (!line.contains(name) || !line.at(name).is_string()) {
    return absl::InvalidArgumentError(
        absl::StrCat("tasks line ", line_no, ": \"", name, "\" must be a string"));
  }
  std::string s = line.at(name).get<std::string>();
  if (s.size() > kMaxFieldBytes) {
    return absl::InvalidArgumentError(absl::StrCat("tasks line ", line_no, ": \"", name, "\" of ",
                                                   s.size(), " bytes, limit ", kMaxFieldBytes));
  }
  return s;
}

// One HTTP client per gateway.
class Api {
 public:
  Api(const std::string& host, int port, const Options& o) : client_(host, port), options_(o) {
    const auto secs = static_cast<time_t>(o.timeout_seconds);
    client_.set_read_timeout(secs, 0);
    client_.set_write_timeout(secs, 0);
    client_.set_connection_timeout(secs, 0);
  }

  absl::StatusOr<json> Get(const std::string& path) { return Check(path, client_.Get(path, Headers())); }

  absl::StatusOr<json> Post(const std::string& path, const json& body) {
    return Check(path, client_.Post(path, Headers(), body.dump(), "application/json"));
  }

 private:
  httplib::Headers Headers() const {
    httplib::Headers h;
    if (!options_.api_key.empty()) h.emplace("Authorization", "Bearer " + options_.api_key);
    return h;
  }

  static absl::StatusOr<json> Check(const std::string& path, const httplib::Result& r) {
    if (!r) {
      return absl::UnavailableError(
          absl::StrCat(path, ": ", httplib::to_string(r.error())));
    }
    json body = json::parse(r->body, nullptr, /*allow_exceptions=*/false);
    if (r->status != 200) {
      return absl::UnknownError(absl::StrCat(path, ": HTTP ", r->status, ": ", r->body));
    }
    if (body.is_discarded()) return absl::UnknownError(absl::StrCat(path, ": invalid JSON"));
    return body;
  }

  httplib::Client client_;
  const Options& options_;
};

// Sum of the log-probabilities of the tokens of `context + choice` that
// start at byte offset >= |context|.
absl::StatusOr<double> ScoreChoice(Api& api, const Options& o, const std::string& mode,
                                   const std::string& context, const std::string& choice) {
  json body = {{"model", o.model},       {"prompt", context + choice}, {"max_tokens", 0},
               {"echo", true},           {"logprobs", 0},              {"temperature", 0},
               {"kvr", {{"mode", mode}}}};
  absl::StatusOr<json> r = api.Post("/v1/completions", body);
  if (!r.ok()) return r.status();
  try {
    const json& lp = r->at("choices").at(0).at("logprobs");
    const json& offsets = lp.at("text_offset");
    const json& values = lp.at("token_logprobs");
    double sum = 0.0;
    for (size_t i = 0; i < offsets.size() && i < values.size(); ++i) {
      if (offsets[i].get<int64_t>() < static_cast<int64_t>(context.size())) continue;
      if (!values[i].is_null()) sum += values[i].get<double>();
    }
    return sum;
  } catch (const json::exception& e) {
    return absl::UnknownError(absl::StrCat("/v1/completions: unexpected response: ", e.what()));
  }
}

absl::StatusOr<bool> Passkey(Api& api, const Options& o, const std::string& mode,
                             const EvalItem& item) {
  json body = {{"model", o.model},       {"prompt", item.context}, {"max_tokens", o.passkey_tokens},
               {"temperature", 0},       {"kvr", {{"mode", mode}}}};
  absl::StatusOr<json> r = api.Post("/v1/completions", body);
  if (!r.ok()) return r.status();
  try {
    std::string text = r->at("choices").at(0).at("text").get<std::string>();
    text.erase(0, text.find_first_not_of(' '));
    return text.rfind(item.expected, 0) == 0;
  } catch (const json::exception& e) {
    return absl::UnknownError(absl::StrCat("/v1/completions: unexpected response: ", e.what()));
  }
}

}  // namespace

absl::StatusOr<std::vector<EvalItem>> ParseTasks(const std::string& text) {
  std::vector<EvalItem> items;
  size_t line_no = 0;
  for (absl::string_view raw : absl::StrSplit(text, '\n')) {
    ++line_no;
    if (raw.find_first_not_of(" \t\r") == absl::string_view::npos) continue;
    if (items.size() == kMaxItems) {
      return absl::InvalidArgumentError(absl::StrCat("tasks: more than ", kMaxItems, " items"));
    }
    json line = json::parse(raw.begin(), raw.end(), nullptr, /*allow_exceptions=*/false);
    if (line.is_discarded() || !line.is_object()) {
      return absl::InvalidArgumentError(absl::StrCat("tasks line ", line_no, ": not a JSON object"));
    }
    EvalItem item;
    absl::StatusOr<std::string> type = Field(line, "type", line_no);
    if (!type.ok()) return type.status();
    absl::StatusOr<std::string> context = Field(line, "context", line_no);
    if (!context.ok()) return context.status();
    item.context = *std::move(context);
    if (*type == "choice") {
      item.kind = EvalItem::Kind::kChoice;
      const json& c = line.contains("choices") ? line.at("choices") : json();
      if (!c.is_array() || c.size() < 2 || c.size() > kMaxChoices) {
        return absl::InvalidArgumentError(absl::StrCat(
            "tasks line ", line_no, ": \"choices\" must be an array of 2 to ", kMaxChoices,
            " strings"));
      }
      for (const json& s : c) {
        if (!s.is_string() || s.get_ref<const std::string&>().size() > kMaxFieldBytes) {
          return absl::InvalidArgumentError(absl::StrCat(
              "tasks line ", line_no, ": a choice is not a string of at most ", kMaxFieldBytes,
              " bytes"));
        }
        item.choices.push_back(s.get<std::string>());
      }
      if (!line.contains("answer") || !line.at("answer").is_number_integer() ||
          line.at("answer").get<int64_t>() < 0 ||
          line.at("answer").get<int64_t>() >= static_cast<int64_t>(item.choices.size())) {
        return absl::InvalidArgumentError(absl::StrCat(
            "tasks line ", line_no, ": \"answer\" must be an index in [0, ",
            item.choices.size(), ")"));
      }
      item.answer = line.at("answer").get<int>();
    } else if (*type == "passkey") {
      item.kind = EvalItem::Kind::kPasskey;
      absl::StatusOr<std::string> answer = Field(line, "answer", line_no);
      if (!answer.ok()) return answer.status();
      if (answer->empty()) {
        return absl::InvalidArgumentError(absl::StrCat("tasks line ", line_no, ": empty answer"));
      }
      item.expected = *std::move(answer);
    } else {
      return absl::InvalidArgumentError(absl::StrCat(
          "tasks line ", line_no, ": unknown type \"", *type, "\" (choice or passkey)"));
    }
    items.push_back(std::move(item));
  }
  if (items.empty()) return absl::InvalidArgumentError("tasks: no items");
  return items;
}

int BestChoice(const std::vector<double>& sums) {
  int best = 0;
  for (size_t i = 1; i < sums.size(); ++i) {
    if (sums[i] > sums[static_cast<size_t>(best)]) best = static_cast<int>(i);
  }
  return best;
}

int RunEval(const std::vector<std::string>& args) {
  Options o;
  bool help = false;
  const cli::FlagTable flags = {
      {"url", cli::StringFlag(&o.url)},
      {"api_key", cli::StringFlag(&o.api_key)},
      {"model", cli::StringFlag(&o.model)},
      {"tasks", cli::StringFlag(&o.tasks)},
      {"modes", cli::StringFlag(&o.modes)},
      {"passkey_tokens", cli::IntFlag(1, 256, &o.passkey_tokens)},
      {"timeout_seconds",
       {[&o](std::string_view name, const std::string& v) {
          return cli::ParseDouble(name, v, 1, 3600, &o.timeout_seconds);
        }}},
  };
  if (absl::Status s = cli::ParseFlags(args, flags, "eval", &help); !s.ok()) {
    std::fprintf(stderr, "kvr eval: %s\n", std::string(s.message()).c_str());
    return 2;
  }
  if (help) {
    std::fputs(kUsage, stdout);
    return 0;
  }
  std::string hostport = o.url;
  if (hostport.rfind("http://", 0) == 0) hostport.erase(0, 7);
  while (!hostport.empty() && hostport.back() == '/') hostport.pop_back();
  const size_t colon = hostport.rfind(':');
  int port = 0;
  if (colon == std::string::npos || !absl::SimpleAtoi(hostport.substr(colon + 1), &port) ||
      port < 1 || port > 65535) {
    std::fprintf(stderr, "kvr eval: --url: expected http://HOST:PORT, got \"%s\"\n",
                 o.url.c_str());
    return 2;
  }
  std::vector<std::string> modes = absl::StrSplit(o.modes, ',', absl::SkipEmpty());
  if (modes.empty() || modes.size() > 2) {
    std::fprintf(stderr, "kvr eval: --modes: 1 or 2 of full,retrieval\n");
    return 2;
  }
  for (const std::string& m : modes) {
    if (m != "full" && m != "retrieval") {
      std::fprintf(stderr, "kvr eval: --modes: unknown mode \"%s\" (full or retrieval)\n",
                   m.c_str());
      return 2;
    }
  }
  std::ifstream in(o.tasks, std::ios::binary);
  if (!in) {
    std::fprintf(stderr, "kvr eval: --tasks: cannot open %s\n", o.tasks.c_str());
    return 2;
  }
  std::string text;
  text.resize(static_cast<size_t>(kMaxTasksFileBytes) + 1);
  in.read(text.data(), static_cast<std::streamsize>(text.size()));
  text.resize(static_cast<size_t>(in.gcount()));
  if (text.size() > static_cast<size_t>(kMaxTasksFileBytes)) {
    std::fprintf(stderr, "kvr eval: --tasks: %s is over %lld bytes\n", o.tasks.c_str(),
                 static_cast<long long>(kMaxTasksFileBytes));
    return 2;
  }
  absl::StatusOr<std::vector<EvalItem>> items = ParseTasks(text);
  if (!items.ok()) {
    std::fprintf(stderr, "kvr eval: %s: %s\n", o.tasks.c_str(),
                 std::string(items.status().message()).c_str());
    return 2;
  }
  Api api(hostport.substr(0, colon), port, o);
  if (o.model.empty()) {
    absl::StatusOr<json> models = api.Get("/v1/models");
    if (!models.ok() || !models->contains("data") || models->at("data").empty()) {
      std::fprintf(stderr, "kvr eval: /v1/models: %s\n",
                   models.ok() ? "no model" : std::string(models.status().message()).c_str());
      return 1;
    }
    o.model = models->at("data").at(0).value("id", "");
  }
  std::printf("%-8s  %-9s  %7s  %5s  %8s\n", "task", "mode", "correct", "total", "accuracy");
  for (const char* task : {"choice", "passkey"}) {
    const EvalItem::Kind kind =
        std::string(task) == "choice" ? EvalItem::Kind::kChoice : EvalItem::Kind::kPasskey;
    for (const std::string& mode : modes) {
      EvalScore score{task, mode, 0, 0};
      for (const EvalItem& item : *items) {
        if (item.kind != kind) continue;
        bool correct = false;
        if (kind == EvalItem::Kind::kChoice) {
          std::vector<double> sums;
          for (const std::string& choice : item.choices) {
            absl::StatusOr<double> s = ScoreChoice(api, o, mode, item.context, choice);
            if (!s.ok()) {
              std::fprintf(stderr, "kvr eval: %s\n", std::string(s.status().message()).c_str());
              return 1;
            }
            sums.push_back(*s);
          }
          correct = BestChoice(sums) == item.answer;
        } else {
          absl::StatusOr<bool> ok = Passkey(api, o, mode, item);
          if (!ok.ok()) {
            std::fprintf(stderr, "kvr eval: %s\n", std::string(ok.status().message()).c_str());
            return 1;
          }
          correct = *ok;
        }
        score.correct += correct ? 1 : 0;
        ++score.total;
      }
      if (score.total == 0) continue;
      std::printf("%-8s  %-9s  %7d  %5d  %8.4f\n", task, mode.c_str(), score.correct, score.total,
                  static_cast<double>(score.correct) / score.total);
    }
  }
  std::fflush(stdout);
  return 0;
}

}  // namespace kvr::eval
