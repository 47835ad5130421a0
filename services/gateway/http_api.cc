#include "services/gateway/http_api.h"

#include <httplib.h>

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <filesystem>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "services/gateway/generate_call.h"
#include "services/gateway/openai.h"

namespace kvr::gateway {
namespace {

using nlohmann::json;

constexpr char kJson[] = "application/json";
// How often a waiting stream checks that its client is still connected.
constexpr auto kClientCheck = std::chrono::milliseconds(100);

void Reply(httplib::Response& res, int status, const json& body) {
  res.status = status;
  res.set_content(Dump(body), kJson);
}

void ReplyError(httplib::Response& res, const ApiError& e) {
  Reply(res, e.http_status, e.ToJson());
  if (e.http_status == 429) res.set_header("Retry-After", "1");
}

std::string RandomId(const char* prefix) {
  thread_local std::mt19937_64 rng(std::random_device{}());
  char hex[25];
  std::snprintf(hex, sizeof(hex), "%016llx%08llx", static_cast<unsigned long long>(rng()),
                static_cast<unsigned long long>(rng() & 0xffffffffu));
  return absl::StrCat(prefix, hex);
}

// The events of one GenerateCall, queued for the HTTP thread that serves
// the request (which blocks; gRPC threads never do).
class CallEvents {
 public:
  struct Event {
    std::optional<v1::GenerateResponse> response;  // else the call finished
    grpc::Status status;
  };

  void Push(v1::GenerateResponse r) {
    std::lock_guard<std::mutex> lock(mu_);
    events_.push_back({std::move(r), grpc::Status::OK});
    cv_.notify_all();
  }
  void Finish(const grpc::Status& s) {
    std::lock_guard<std::mutex> lock(mu_);
    events_.push_back({std::nullopt, s});
    cv_.notify_all();
  }
  // The next event, or nullopt after `timeout`.
  std::optional<Event> Next(std::chrono::milliseconds timeout) {
    std::unique_lock<std::mutex> lock(mu_);
    if (!cv_.wait_for(lock, timeout, [this] { return !events_.empty(); })) return std::nullopt;
    Event e = std::move(events_.front());
    events_.pop_front();
    return e;
  }
  Event Next() {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [this] { return !events_.empty(); });
    Event e = std::move(events_.front());
    events_.pop_front();
    return e;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Event> events_;
};

// One generation request served over HTTP.
struct HttpCall {
  CallEvents events;
  std::shared_ptr<GenerateCall> call;
};

bool SplitHostPort(const std::string& listen, std::string* host, int* port) {
  const size_t colon = listen.rfind(':');
  if (colon == std::string::npos || colon == 0) return false;
  *host = listen.substr(0, colon);
  if (host->size() >= 2 && host->front() == '[' && host->back() == ']') {
    *host = host->substr(1, host->size() - 2);
  }
  return absl::SimpleAtoi(listen.substr(colon + 1), port) && *port >= 0 && *port <= 65535;
}

}  // namespace

struct HttpApi::Impl {
  HttpApiOptions options;
  WorkerPool* pool = nullptr;
  GatewayMetrics* metrics = nullptr;
  httplib::Server server;
  std::string address;
  std::thread listener;
  const int64_t started = absl::ToUnixSeconds(absl::Now());

  std::mutex mu;
  std::condition_variable cv;
  bool listener_done = false;
  std::set<std::shared_ptr<HttpCall>> active;  // cancelled when the drain runs out
  // The served model, from the first worker that answered GetModelInfo.
  std::optional<v1::GetModelInfoResponse> model_info;

  // The model's id and limits, asked from a worker once.
  absl::StatusOr<v1::GetModelInfoResponse> ModelInfo() {
    {
      std::lock_guard<std::mutex> lock(mu);
      if (model_info.has_value()) return *model_info;
    }
    std::shared_ptr<WorkerChannel> worker = pool->PickAny();
    if (worker == nullptr) return absl::UnavailableError("no healthy worker");
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    v1::GetModelInfoResponse info;
    const grpc::Status s = worker->generation->GetModelInfo(&ctx, {}, &info);
    if (!s.ok()) {
      if (s.error_code() == grpc::StatusCode::UNAVAILABLE) {
        pool->ReportUnavailable(worker->address);
      }
      return absl::Status(static_cast<absl::StatusCode>(s.error_code()),
                          absl::StrCat("GetModelInfo on worker ", worker->address, ": ",
                                       s.error_message()));
    }
    std::lock_guard<std::mutex> lock(mu);
    model_info = info;
    return info;
  }

  std::string ModelName(const v1::GetModelInfoResponse& info) const {
    if (!options.model_name.empty()) return options.model_name;
    return std::filesystem::path(info.model()).stem().string();
  }

  void RecordRefused(const ApiError& e) {
    metrics->RecordRequest(Api::kHttp, e.grpc_code, 0.0, /*reached_worker=*/false);
  }

  void Generate(Route route, const httplib::Request& req, httplib::Response& res) {
    const absl::Time received = absl::Now();
    const std::string content_type = req.get_header_value("Content-Type");
    if (!absl::StartsWithIgnoreCase(content_type, kJson)) {
      ApiError e = InvalidRequest(
          "", absl::StrCat("Content-Type: expected application/json, got \"", content_type, "\""));
      e.http_status = 415;
      e.code = "unsupported_media_type";
      RecordRefused(e);
      return ReplyError(res, e);
    }
    json body;
    try {
      body = json::parse(req.body);
    } catch (const json::exception& err) {
      // parse_error, and also out_of_range (a number such as 1e999 that
      // overflows a double): both the client's fault, so 400, not 500.
      const ApiError e = InvalidRequest(
          "", absl::StrCat("request body: invalid JSON (", err.what(), ")"));
      RecordRefused(e);
      return ReplyError(res, e);
    }
    ParsedRequest parsed;
    if (std::optional<ApiError> e = ParseRequest(route, body, &parsed)) {
      RecordRefused(*e);
      return ReplyError(res, *e);
    }
    absl::StatusOr<v1::GetModelInfoResponse> info = ModelInfo();
    if (!info.ok()) {
      const ApiError e = FromStatus(info.status().code(), std::string(info.status().message()));
      RecordRefused(e);
      return ReplyError(res, e);
    }
    const std::string model = ModelName(*info);
    if (parsed.model != model && parsed.model != info->model()) {
      ApiError e = FromStatus(absl::StatusCode::kNotFound,
                              absl::StrCat("model: \"", parsed.model,
                                           "\" does not exist; this gateway serves \"", model,
                                           "\""));
      e.param = "model";
      e.code = "model_not_found";
      RecordRefused(e);
      return ReplyError(res, e);
    }
    ResponseInfo ri;
    ri.route = route;
    ri.id = RandomId(route == Route::kChatCompletions ? "chatcmpl-" : "cmpl-");
    ri.model = model;
    ri.created = absl::ToUnixSeconds(received);
    parsed.request.set_request_id(ri.id);

    auto call = std::make_shared<HttpCall>();
    call->call = GenerateCall::Create(
        pool, metrics, Api::kHttp, std::move(parsed.request), received,
        received + options.default_timeout,
        [call](v1::GenerateResponse r) { call->events.Push(std::move(r)); },
        [call](const grpc::Status& s) { call->events.Finish(s); });
    {
      std::lock_guard<std::mutex> lock(mu);
      active.insert(call);
    }
    call->call->Start();
    if (parsed.stream) {
      Stream(route, call, std::move(ri), parsed.include_usage, res);
    } else {
      Complete(route, *call, ri, res);
      Forget(call);
    }
  }

  void Forget(const std::shared_ptr<HttpCall>& call) {
    std::lock_guard<std::mutex> lock(mu);
    active.erase(call);
    cv.notify_all();
  }

  static ApiError CallError(Route route, const grpc::Status& s) {
    return FromStatus(static_cast<absl::StatusCode>(s.error_code()),
                      RenameWorkerFields(route, s.error_message()));
  }

  // The whole response at once.
  void Complete(Route route, HttpCall& call, const ResponseInfo& ri, httplib::Response& res) {
    std::string text;
    std::vector<int32_t> tokens;
    std::optional<v1::GenerateFinal> summary;
    for (;;) {
      CallEvents::Event e = call.events.Next();
      if (!e.response.has_value()) {
        if (!e.status.ok()) return ReplyError(res, CallError(route, e.status));
        if (!summary.has_value()) {
          return ReplyError(res, FromStatus(absl::StatusCode::kInternal,
                                            "the worker's stream ended without a summary"));
        }
        return Reply(res, 200, CompletionResponse(ri, text, tokens, *summary));
      }
      if (e.response->has_chunk()) {
        text += e.response->chunk().text();
        tokens.insert(tokens.end(), e.response->chunk().token_ids().begin(),
                      e.response->chunk().token_ids().end());
      } else if (e.response->has_summary()) {
        summary = e.response->summary();
      }
      call.call->RequestNext();
    }
  }

  // Server-sent events. The status line goes out with the first event:
  // errors before any token (bad field, prompt too long, overload) are
  // still plain HTTP errors.
  void Stream(Route route, std::shared_ptr<HttpCall> call, ResponseInfo ri, bool include_usage,
              httplib::Response& res) {
    CallEvents::Event first = call->events.Next();
    if (!first.response.has_value() && !first.status.ok()) {
      Forget(call);
      return ReplyError(res, CallError(route, first.status));
    }
    struct State {
      ResponseInfo info;
      bool include_usage;
      std::optional<CallEvents::Event> peeked;
      Utf8Joiner utf8;
      bool sent_role = false;
      std::optional<v1::GenerateFinal> summary;
    };
    auto st = std::make_shared<State>(State{std::move(ri), include_usage, std::move(first), {},
                                            false, std::nullopt});
    res.set_header("Cache-Control", "no-cache");
    res.set_chunked_content_provider(
        "text/event-stream",
        [this, route, call, st](size_t, httplib::DataSink& sink) {
          auto write = [&](const std::string& data) {
            if (sink.write(data.data(), data.size())) return true;
            call->call->Cancel();  // the client is gone
            return false;
          };
          if (route == Route::kChatCompletions && !st->sent_role) {
            st->sent_role = true;
            if (!write(SseEvent(StreamChunk(st->info, "", /*first=*/true, nullptr)))) return false;
          }
          for (;;) {
            std::optional<CallEvents::Event> e;
            if (st->peeked.has_value()) {
              e = std::move(st->peeked);
              st->peeked.reset();
            } else {
              e = call->events.Next(kClientCheck);
            }
            if (!e.has_value()) {
              if (sink.is_writable()) continue;
              call->call->Cancel();  // the client went away while waiting
              return false;
            }
            if (e->response.has_value()) {
              if (e->response->has_summary()) st->summary = e->response->summary();
              std::string text;
              if (e->response->has_chunk()) text = st->utf8.Push(e->response->chunk().text());
              call->call->RequestNext();
              if (text.empty()) continue;
              return write(SseEvent(StreamChunk(st->info, text, /*first=*/false, nullptr)));
            }
            // Finished.
            std::string out;
            if (!e->status.ok()) {
              out = SseEvent(CallError(route, e->status).ToJson());
            } else {
              if (std::string rest = st->utf8.Flush(); !rest.empty()) {
                out += SseEvent(StreamChunk(st->info, rest, false, nullptr));
              }
              const std::string finish = FinishReasonName(
                  st->summary.has_value() ? st->summary->finish_reason()
                                          : v1::FINISH_REASON_UNSPECIFIED);
              out += SseEvent(StreamChunk(st->info, "", false, &finish));
              if (st->include_usage && st->summary.has_value()) {
                out += SseEvent(UsageChunk(st->info, st->summary->usage()));
              }
              out += kSseDone;
            }
            if (!write(out)) return false;
            sink.done();
            return true;
          }
        },
        [this, call](bool success) {
          if (!success) call->call->Cancel();
          Forget(call);
        });
  }

  void Models(httplib::Response& res) {
    absl::StatusOr<v1::GetModelInfoResponse> info = ModelInfo();
    if (!info.ok()) return ReplyError(res, FromStatus(info.status().code(), std::string(info.status().message())));
    Reply(res, 200,
          json{{"object", "list"},
               {"data", json::array({json{{"id", ModelName(*info)},
                                          {"object", "model"},
                                          {"created", started},
                                          {"owned_by", "kvr"},
                                          {"max_model_len", info->max_context_tokens()}}})}});
  }

  void Healthz(httplib::Response& res) {
    int healthy = 0, total = 0;
    for (const WorkerLoad& w : pool->balancer().Workers()) {
      if (!w.member) continue;
      ++total;
      healthy += w.healthy ? 1 : 0;
    }
    if (healthy == 0) {
      return ReplyError(res, FromStatus(absl::StatusCode::kUnavailable,
                                        absl::StrCat("no healthy worker (", total, " known)")));
    }
    Reply(res, 200, json{{"status", "ok"}, {"healthy_workers", healthy}, {"workers", total}});
  }

  // Fills the bodies httplib leaves empty (unknown route, oversized body).
  void DefaultError(const httplib::Request& req, httplib::Response& res) {
    if (!res.body.empty()) return;
    ApiError e;
    if (res.status == 413) {
      e = InvalidRequest("", absl::StrCat("request body: over the limit of ",
                                          options.max_request_bytes, " bytes"));
      e.http_status = 413;
      e.code = "request_too_large";
      if (req.path == "/v1/completions" || req.path == "/v1/chat/completions") RecordRefused(e);
    } else if (res.status == 404) {
      e = FromStatus(absl::StatusCode::kNotFound,
                     absl::StrCat("no route for ", req.method, " ", req.path,
                                  " (POST /v1/completions, POST /v1/chat/completions, GET "
                                  "/v1/models, GET /healthz)"));
    } else {
      e = FromStatus(res.status < 500 ? absl::StatusCode::kInvalidArgument
                                      : absl::StatusCode::kInternal,
                     absl::StrCat("HTTP ", res.status));
      e.http_status = res.status;
    }
    ReplyError(res, e);
  }
};

absl::StatusOr<std::unique_ptr<HttpApi>> HttpApi::Start(const HttpApiOptions& options,
                                                        WorkerPool* pool,
                                                        GatewayMetrics* metrics) {
  std::string host;
  int port = 0;
  if (!SplitHostPort(options.listen, &host, &port)) {
    return absl::InvalidArgumentError(
        absl::StrCat("http listen address \"", options.listen, "\": expected host:port"));
  }
  if (options.threads < 1 || options.threads > 4096) {
    return absl::InvalidArgumentError(
        absl::StrCat("http threads: ", options.threads, " outside [1, 4096]"));
  }
  if (options.max_request_bytes < 1024) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_request_bytes: ", options.max_request_bytes, " below 1024"));
  }
  auto impl = std::make_unique<Impl>();
  impl->options = options;
  impl->pool = pool;
  impl->metrics = metrics;
  Impl* p = impl.get();
  httplib::Server& s = impl->server;
  const int threads = options.threads;
  s.new_task_queue = [threads] { return new httplib::ThreadPool(threads); };
  s.set_payload_max_length(static_cast<size_t>(options.max_request_bytes));
  s.set_keep_alive_timeout(2);
  s.set_read_timeout(30);
  s.set_write_timeout(30);
  s.Post("/v1/completions", [p](const httplib::Request& req, httplib::Response& res) {
    p->Generate(Route::kCompletions, req, res);
  });
  s.Post("/v1/chat/completions", [p](const httplib::Request& req, httplib::Response& res) {
    p->Generate(Route::kChatCompletions, req, res);
  });
  s.Get("/v1/models", [p](const httplib::Request&, httplib::Response& res) { p->Models(res); });
  s.Get("/healthz", [p](const httplib::Request&, httplib::Response& res) { p->Healthz(res); });
  s.set_error_handler(
      [p](const httplib::Request& req, httplib::Response& res) { p->DefaultError(req, res); });
  s.set_exception_handler(
      [](const httplib::Request&, httplib::Response& res, std::exception_ptr ep) {
        std::string what = "unknown exception";
        try {
          std::rethrow_exception(ep);
        } catch (const std::exception& e) {
          what = e.what();
        } catch (...) {
        }
        ReplyError(res, FromStatus(absl::StatusCode::kInternal, absl::StrCat("internal error: ", what)));
      });

  if (port == 0) {
    port = s.bind_to_any_port(host);
    if (port <= 0) return absl::UnavailableError(absl::StrCat("cannot listen on ", options.listen));
  } else if (!s.bind_to_port(host, port)) {
    return absl::UnavailableError(absl::StrCat("cannot listen on ", options.listen));
  }
  impl->address = absl::StrCat(host.find(':') != std::string::npos ? "[" + host + "]" : host, ":",
                               port);
  // Learn the model's id now when a worker answers (else on first use).
  if (absl::StatusOr<v1::GetModelInfoResponse> info = p->ModelInfo(); !info.ok()) {
    std::fprintf(stderr, "kvr_gateway: model info not known yet: %s\n",
                 std::string(info.status().message()).c_str());
  }
  impl->listener = std::thread([p] {
    p->server.listen_after_bind();
    std::lock_guard<std::mutex> lock(p->mu);
    p->listener_done = true;
    p->cv.notify_all();
  });
  return std::unique_ptr<HttpApi>(new HttpApi(std::move(impl)));
}

HttpApi::HttpApi(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

HttpApi::~HttpApi() {
  StopAccepting();
  Drain(absl::Now());
}

const std::string& HttpApi::address() const { return impl_->address; }

void HttpApi::StopAccepting() {
  // stop() only works once the listener runs (it sets is_running): wait for
  // it, briefly, in the rare case of a stop right after Start.
  std::unique_lock<std::mutex> lock(impl_->mu);
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(2);
  while (!impl_->server.is_running() && !impl_->listener_done &&
         std::chrono::steady_clock::now() < give_up) {
    impl_->cv.wait_for(lock, std::chrono::milliseconds(5));
  }
  lock.unlock();
  impl_->server.stop();
}

void HttpApi::Drain(absl::Time deadline) {
  std::unique_lock<std::mutex> lock(impl_->mu);
  impl_->cv.wait_until(lock, absl::ToChronoTime(deadline), [this] {
    return impl_->listener_done && impl_->active.empty();
  });
  // Still running at the deadline: cancel them (their streams then end).
  std::vector<std::shared_ptr<HttpCall>> rest(impl_->active.begin(), impl_->active.end());
  lock.unlock();
  for (const std::shared_ptr<HttpCall>& c : rest) c->call->Cancel();
  if (impl_->listener.joinable()) impl_->listener.join();
}

}  // namespace kvr::gateway
