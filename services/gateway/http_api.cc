#include "services/gateway/http_api.h"

#include <dirent.h>
#include <httplib.h>
#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

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
#include <unordered_map>
#include <utility>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "services/gateway/generate_call.h"
#include "services/gateway/http_server.h"
#include "services/gateway/openai.h"

namespace kvr::gateway {
namespace {

using nlohmann::json;

constexpr char kJson[] = "application/json";
// Connections the kernel completes before the server accepts them.
constexpr int kListenBacklog = 4096;
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

// The Authorization header's value; nullopt when the request has none.
std::optional<absl::string_view> Authorization(const httplib::Request& req) {
  auto it = req.headers.find("Authorization");  // httplib compares names case-insensitively
  if (it == req.headers.end()) return std::nullopt;
  return absl::string_view(it->second);
}

// The OpenAI error of an API key refusal: 401 (code invalid_api_key, or null
// for a missing key) or 429 (type "requests" / "tokens", code
// rate_limit_exceeded) with Retry-After.
ApiError KeyError(const ApiKeyDecision& d) {
  using Outcome = ApiKeyDecision::Outcome;
  ApiError e;
  e.message = d.message;
  if (d.outcome == Outcome::kMissing || d.outcome == Outcome::kInvalid) {
    e.http_status = 401;
    e.type = "invalid_request_error";
    e.code = d.outcome == Outcome::kInvalid ? "invalid_api_key" : "";
    e.grpc_code = absl::StatusCode::kUnauthenticated;
  } else {
    e.http_status = 429;
    e.type = d.outcome == Outcome::kTooManyRequests ? "requests" : "tokens";
    e.code = "rate_limit_exceeded";
    e.grpc_code = absl::StatusCode::kResourceExhausted;
  }
  return e;
}

void ReplyKeyError(httplib::Response& res, const ApiKeyDecision& d) {
  const ApiError e = KeyError(d);
  Reply(res, e.http_status, e.ToJson());
  if (e.http_status == 429) res.set_header("Retry-After", absl::StrCat(d.retry_after_seconds));
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
  // The call carries several choices (GenerateRequest.n / prompts) and is
  // read on by their demultiplexer, not by this choice's reader.
  bool shared = false;

  // Asks the worker call for its next response (unless demultiplexed).
  void RequestNext() const {
    if (!shared) call->RequestNext();
  }
};

// Splits one worker call's stream into its choices' HttpCalls by
// GenerateChunk.index / GenerateFinal.index: each choice's reader sees the
// stream of a one-choice call (its chunks, its final, then OK). The
// demultiplexer reads on by itself (the readers take the choices one after
// the other, so none may hold the stream back): at most the whole
// response (n x prompts choices of at most max_tokens each) is buffered.
// Prefill progress goes to choice 0; an index out of range is dropped. The
// last choice's reader (readers go in index order) ends only when the call
// has finished, so a client that has the whole response finds the call's
// API key slot free again (a choice ended at its final would answer first).
struct ChoiceDemux {
  std::vector<std::shared_ptr<HttpCall>> calls;  // choice index order
  std::mutex mu;
  std::vector<uint8_t> done;  // per choice: its events finished
  std::weak_ptr<GenerateCall> call;

  void OnResponse(v1::GenerateResponse r) {
    int64_t index = 0;
    bool final = false;
    if (r.has_chunk()) {
      index = r.chunk().index();
    } else if (r.has_summary()) {
      index = r.summary().index();
      final = true;
    }
    {
      std::lock_guard<std::mutex> lock(mu);
      if (index >= 0 && index < static_cast<int64_t>(calls.size()) &&
          done[static_cast<size_t>(index)] == 0) {
        HttpCall& c = *calls[static_cast<size_t>(index)];
        c.events.Push(std::move(r));
        if (final && index + 1 < static_cast<int64_t>(calls.size())) {
          done[static_cast<size_t>(index)] = 1;
          c.events.Finish(grpc::Status::OK);
        }
      }
    }
    if (std::shared_ptr<GenerateCall> c = call.lock()) c->RequestNext();
  }
  void OnFinish(const grpc::Status& status) {
    std::lock_guard<std::mutex> lock(mu);
    for (size_t i = 0; i < calls.size(); ++i) {
      if (done[i] == 0) calls[i]->events.Finish(status);
      done[i] = 1;
    }
    calls.clear();  // breaks the cycle call -> demux -> HttpCall -> call
  }
};

// The HTTP server's connections, one thread each (cpp-httplib serves a
// connection on one task from accept to close, including reading its
// header). `ready` threads are kept; more start on demand up to
// `max_connections` and exit after kIdleExit without work; beyond that,
// accepted connections wait in FIFO order. So a crowd of slow clients below
// the cap (each held at most read_timeout per idle read) cannot keep a new
// client, e.g. a health check, from being served at once; before this a
// fixed pool of `ready` threads served them in turn.
class ConnectionPool final : public httplib::TaskQueue {
 public:
  ConnectionPool(int ready, int max_connections)
      : ready_(ready), max_connections_(max_connections) {
    std::lock_guard<std::mutex> lock(mu_);
    for (int i = 0; i < ready_; ++i) StartThreadLocked();
  }
  ~ConnectionPool() override { shutdown(); }

  void enqueue(std::function<void()> fn) override {
    std::vector<std::thread> exited;
    {
      std::lock_guard<std::mutex> lock(mu_);
      jobs_.push_back(std::move(fn));
      if (idle_ < jobs_.size() && static_cast<int>(threads_.size()) < max_connections_) {
        StartThreadLocked();
      }
      exited = TakeExitedLocked();
    }
    cv_.notify_one();
    for (std::thread& t : exited) t.join();
  }

  // Runs the connections already accepted, then joins every thread.
  void shutdown() override {
    std::vector<std::thread> all;
    {
      std::lock_guard<std::mutex> lock(mu_);
      shutdown_ = true;
    }
    cv_.notify_all();
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      for (std::thread& t : TakeExitedLocked()) all.push_back(std::move(t));
      if (threads_.empty()) break;
      exit_cv_.wait(lock);
    }
    lock.unlock();
    for (std::thread& t : all) t.join();
  }

 private:
  static constexpr auto kIdleExit = std::chrono::seconds(10);

  void StartThreadLocked() {
    std::thread t([this] { Run(); });
    const std::thread::id id = t.get_id();
    threads_.emplace(id, std::move(t));
  }

  // Threads that returned from Run, to be joined outside the lock.
  std::vector<std::thread> TakeExitedLocked() {
    std::vector<std::thread> out;
    for (const std::thread::id id : exited_) {
      auto node = threads_.extract(id);
      if (!node.empty()) out.push_back(std::move(node.mapped()));
    }
    exited_.clear();
    return out;
  }

  void Run() {
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      ++idle_;
      const bool woke = cv_.wait_for(lock, kIdleExit, [this] { return !jobs_.empty() || shutdown_; });
      --idle_;
      if (jobs_.empty()) {
        // Shut down, or idle for kIdleExit while more than `ready` run.
        if (shutdown_ || (!woke && static_cast<int>(threads_.size() - exited_.size()) > ready_)) {
          break;
        }
        continue;
      }
      std::function<void()> job = std::move(jobs_.front());
      jobs_.pop_front();
      lock.unlock();
      job();
      job = nullptr;
      lock.lock();
    }
    exited_.push_back(std::this_thread::get_id());
    exit_cv_.notify_all();
  }

  const int ready_;
  const int max_connections_;
  std::mutex mu_;
  std::condition_variable cv_;       // a job or shutdown
  std::condition_variable exit_cv_;  // a thread returned
  std::deque<std::function<void()>> jobs_;
  size_t idle_ = 0;  // threads waiting for a job
  bool shutdown_ = false;
  std::unordered_map<std::thread::id, std::thread> threads_;  // started, not joined
  std::vector<std::thread::id> exited_;                        // returned from Run
};

// The socket of the connection `req` came on, found among this process's
// descriptors by its two ends (cpp-httplib does not expose it); -1 when
// none matches. The descriptor stays this connection's while its handler
// runs (the server closes it only after the handler returned).
int ConnectionFd(const httplib::Request& req) {
  DIR* dir = opendir("/proc/self/fd");
  if (dir == nullptr) return -1;
  int found = -1;
  while (dirent* entry = readdir(dir)) {
    int fd = 0;
    if (!absl::SimpleAtoi(entry->d_name, &fd) || fd == dirfd(dir)) continue;
    sockaddr_storage local{}, peer{};
    socklen_t local_len = sizeof(local), peer_len = sizeof(peer);
    if (getsockname(fd, reinterpret_cast<sockaddr*>(&local), &local_len) != 0 ||
        getpeername(fd, reinterpret_cast<sockaddr*>(&peer), &peer_len) != 0) {
      continue;  // not a connected socket
    }
    char local_port[NI_MAXSERV], peer_host[NI_MAXHOST], peer_port[NI_MAXSERV];
    if (getnameinfo(reinterpret_cast<sockaddr*>(&local), local_len, nullptr, 0, local_port,
                    sizeof(local_port), NI_NUMERICSERV) != 0 ||
        getnameinfo(reinterpret_cast<sockaddr*>(&peer), peer_len, peer_host, sizeof(peer_host),
                    peer_port, sizeof(peer_port), NI_NUMERICHOST | NI_NUMERICSERV) != 0) {
      continue;
    }
    if (absl::StrCat(req.local_port) == local_port && absl::StrCat(req.remote_port) == peer_port &&
        req.remote_addr == peer_host) {
      found = fd;
      break;
    }
  }
  closedir(dir);
  return found;
}

// Whether the client of socket `fd` has closed or reset its connection
// (a client that only half-closes its sending side counts as gone too).
bool PeerGone(int fd) {
  pollfd p{fd, POLLRDHUP, 0};
  if (poll(&p, 1, 0) <= 0) return false;
  return (p.revents & (POLLRDHUP | POLLHUP | POLLERR)) != 0;
}

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
  Impl(size_t max_header_bytes, int request_timeout_seconds, uint64_t max_body_bytes)
      : server(max_header_bytes, request_timeout_seconds, max_body_bytes) {}
  BoundedHttpServer server;
  std::string address;
  std::thread listener;
  const int64_t started = absl::ToUnixSeconds(absl::Now());

  std::mutex mu;
  std::condition_variable cv;
  bool listener_done = false;
  std::set<std::shared_ptr<HttpCall>> active;  // cancelled when the drain runs out
  // The served model, from the first worker that answered GetModelInfo.
  std::optional<v1::GetModelInfoResponse> model_info;
  std::shared_ptr<const ChatTemplate> chat_template;  // with model_info
  absl::Status chat_template_error;

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
    if (!model_info.has_value() && !info.chat_template().empty()) {
      absl::StatusOr<ChatTemplate> t =
          ChatTemplate::Create(info.chat_template(), info.bos_token(), info.eos_token());
      if (t.ok()) {
        chat_template = std::make_shared<const ChatTemplate>(*std::move(t));
      } else {
        chat_template_error = t.status();
      }
    }
    model_info = info;
    return info;
  }

  // The model's chat template (parsed once, with model_info); null when the
  // model has none. Internal when it does not parse.
  absl::StatusOr<std::shared_ptr<const ChatTemplate>> Template() {
    std::lock_guard<std::mutex> lock(mu);
    if (!chat_template_error.ok()) {
      return absl::InternalError(absl::StrCat("the model's chat template does not parse: ",
                                              chat_template_error.message()));
    }
    return chat_template;
  }

  std::string ModelName(const v1::GetModelInfoResponse& info) const {
    if (!options.model_name.empty()) return options.model_name;
    return std::filesystem::path(info.model()).stem().string();
  }

  // A generation request refused before it reached a GenerateCall (`key`:
  // the API key it was admitted for, if any).
  void RecordRefused(const ApiError& e, const std::shared_ptr<ApiKeyGrant>& key = nullptr) {
    metrics->RecordRequest(Api::kHttp, e.grpc_code, 0.0, /*reached_worker=*/false);
    if (key != nullptr) metrics->RecordKeyRequest(key->metric_label(), e.grpc_code);
  }

  // With API keys: whether `req` carries a valid one (else answered 401).
  bool Authenticated(const httplib::Request& req, httplib::Response& res) {
    if (options.api_keys == nullptr) return true;
    const ApiKeyDecision d = options.api_keys->Authenticate(Authorization(req));
    if (d.outcome == ApiKeyDecision::Outcome::kOk) return true;
    metrics->RecordUnauthenticated(d.outcome == ApiKeyDecision::Outcome::kMissing);
    ReplyKeyError(res, d);
    return false;
  }

  void Generate(Route route, const httplib::Request& req, httplib::Response& res) {
    const absl::Time received = absl::Now();
    // The key first: nothing of the request is looked at for a caller
    // without one. Admitted: `key` holds one of its max_concurrent slots
    // until the request ends (GenerateCall releases it), or until this
    // returns on an error before that.
    std::shared_ptr<ApiKeyGrant> key;
    if (options.api_keys != nullptr) {
      ApiKeyDecision d = options.api_keys->Admit(Authorization(req));
      using Outcome = ApiKeyDecision::Outcome;
      if (d.outcome != Outcome::kOk) {
        const ApiError e = KeyError(d);
        if (d.outcome == Outcome::kMissing || d.outcome == Outcome::kInvalid) {
          metrics->RecordUnauthenticated(d.outcome == Outcome::kMissing);
        } else {
          metrics->RecordKeyRequest(d.metric_label, e.grpc_code);
        }
        metrics->RecordRequest(Api::kHttp, e.grpc_code, 0.0, /*reached_worker=*/false);
        return ReplyKeyError(res, d);
      }
      key = std::move(d.grant);
    }
    const std::string content_type = req.get_header_value("Content-Type");
    if (!absl::StartsWithIgnoreCase(content_type, kJson)) {
      ApiError e = InvalidRequest(
          "", absl::StrCat("Content-Type: expected application/json, got \"", content_type, "\""));
      e.http_status = 415;
      e.code = "unsupported_media_type";
      RecordRefused(e, key);
      return ReplyError(res, e);
    }
    json body;
    if (std::optional<ApiError> e = ParseBody(req.body, &body)) {
      RecordRefused(*e, key);
      return ReplyError(res, *e);
    }
    ParsedRequest parsed;
    if (std::optional<ApiError> e = ParseRequest(route, body, &parsed, options.limits)) {
      RecordRefused(*e, key);
      return ReplyError(res, *e);
    }
    absl::StatusOr<v1::GetModelInfoResponse> info = ModelInfo();
    if (!info.ok()) {
      const ApiError e = FromStatus(info.status().code(), std::string(info.status().message()));
      RecordRefused(e, key);
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
      RecordRefused(e, key);
      return ReplyError(res, e);
    }
    // max_tokens can never exceed the model's context (the prompt takes at
    // least one position of it): refused here, where the context is known
    // from GetModelInfo, instead of admitting a request for more than the
    // model can produce. The prompt's own length is the worker's to check.
    if (parsed.request.has_max_tokens() && info->max_context_tokens() > 0 &&
        parsed.request.max_tokens() > info->max_context_tokens()) {
      const char* field = route == Route::kChatCompletions && body.contains("max_completion_tokens")
                              ? "max_completion_tokens"
                              : "max_tokens";
      ApiError e = InvalidRequest(
          field, absl::StrCat(field, ": ", parsed.request.max_tokens(),
                              " is over the model's context of ", info->max_context_tokens(),
                              " tokens"));
      e.code = "context_length_exceeded";
      RecordRefused(e, key);
      return ReplyError(res, e);
    }
    if (route == Route::kChatCompletions) {
      absl::StatusOr<std::shared_ptr<const ChatTemplate>> tmpl = Template();
      if (!tmpl.ok()) {
        const ApiError e = FromStatus(tmpl.status().code(), std::string(tmpl.status().message()));
        RecordRefused(e, key);
        return ReplyError(res, e);
      }
      if (*tmpl != nullptr) {
        if (std::optional<ApiError> e = ApplyChatTemplate(**tmpl, &parsed)) {
          RecordRefused(*e, key);
          return ReplyError(res, *e);
        }
      }
    }
    if (parsed.echo && parsed.stream) {
      const ApiError e = InvalidRequest("echo", "echo: not supported with stream: true");
      RecordRefused(e, key);
      return ReplyError(res, e);
    }
    ResponseInfo ri;
    ri.route = route;
    ri.id = RandomId(route == Route::kChatCompletions ? "chatcmpl-" : "cmpl-");
    ri.model = model;
    ri.created = absl::ToUnixSeconds(received);
    parsed.request.set_request_id(ri.id);
    // One worker request for every choice (the worker prefills each prompt
    // once and forks it per choice); ChoiceRequests only for the echo text.
    std::vector<v1::GenerateRequest> requests = ChoiceRequests(parsed);
    // Every choice is admitted by the key (a slot and its quotas) like a
    // request of its own, as when each was a worker request; the slots are
    // held until the one worker call finishes.
    std::vector<std::shared_ptr<ApiKeyGrant>> grants(requests.size());
    grants[0] = std::move(key);
    if (options.api_keys != nullptr) {
      for (size_t i = 1; i < requests.size(); ++i) {
        ApiKeyDecision d = options.api_keys->Admit(Authorization(req));
        if (d.outcome != ApiKeyDecision::Outcome::kOk) {
          const ApiError e = KeyError(d);
          metrics->RecordKeyRequest(d.metric_label, e.grpc_code);
          metrics->RecordRequest(Api::kHttp, e.grpc_code, 0.0, /*reached_worker=*/false);
          return ReplyKeyError(res, d);
        }
        grants[i] = std::move(d.grant);
      }
    }
    Choices choices;
    choices.route = route;
    choices.parsed_logprobs = parsed.logprobs;
    choices.echo = parsed.echo;
    choices.n = parsed.n;
    choices.bos_id = info->bos_id();
    auto demux = std::make_shared<ChoiceDemux>();
    demux->done.assign(requests.size(), 0);
    for (size_t i = 0; i < requests.size(); ++i) {
      choices.echo_text.push_back(requests[i].has_text() ? requests[i].text() : std::string());
      auto call = std::make_shared<HttpCall>();
      call->shared = true;
      demux->calls.push_back(call);
      choices.calls.push_back(std::move(call));
    }
    // The extra choices' key slots, released with the call.
    auto extra_grants = std::make_shared<std::vector<std::shared_ptr<ApiKeyGrant>>>();
    for (size_t i = 1; i < grants.size(); ++i) {
      if (grants[i] != nullptr) extra_grants->push_back(std::move(grants[i]));
    }
    std::shared_ptr<GenerateCall> worker_call = GenerateCall::Create(
        pool, metrics, Api::kHttp, WorkerRequest(parsed), received,
        received + options.default_timeout,
        [demux](v1::GenerateResponse r) { demux->OnResponse(std::move(r)); },
        [demux, extra_grants](const grpc::Status& st) {
          extra_grants->clear();
          demux->OnFinish(st);
        });
    demux->call = worker_call;
    if (grants[0] != nullptr) worker_call->SetApiKey(std::move(grants[0]));
    {
      std::lock_guard<std::mutex> lock(mu);
      for (const std::shared_ptr<HttpCall>& c : choices.calls) {
        c->call = worker_call;
        active.insert(c);
      }
    }
    worker_call->Start();
    if (parsed.stream) {
      Stream(std::move(choices), std::move(ri), parsed.include_usage, res);
    } else {
      Complete(req, choices, ri, res);
      for (const std::shared_ptr<HttpCall>& c : choices.calls) Forget(c);
    }
  }

  // The calls of one HTTP request's choices (index order) and what their
  // responses need.
  struct Choices {
    Route route = Route::kCompletions;
    std::vector<std::shared_ptr<HttpCall>> calls;
    std::vector<std::string> echo_text;  // per choice: its text prompt (echo)
    int parsed_logprobs = -1;            // -1: no logprobs in the response
    bool echo = false;
    int n = 1;
    int32_t bos_id = -1;

    void CancelAll() const {
      for (const std::shared_ptr<HttpCall>& c : calls) c->call->Cancel();
    }
    // The echoed prompt's logprobs of `summary`, without a leading BOS (the
    // text prompt never shows it; a token prompt's text is its pieces).
    std::vector<v1::TokenLogprob> PromptLogprobs(const v1::GenerateFinal& summary) const {
      std::vector<v1::TokenLogprob> out(summary.prompt_logprobs().begin(),
                                        summary.prompt_logprobs().end());
      if (!out.empty() && out[0].token_id() == bos_id) out.erase(out.begin());
      return out;
    }
  };

  void Forget(const std::shared_ptr<HttpCall>& call) {
    std::lock_guard<std::mutex> lock(mu);
    active.erase(call);
    cv.notify_all();
  }

  static ApiError CallError(Route route, const grpc::Status& s) {
    return FromStatus(static_cast<absl::StatusCode>(s.error_code()),
                      RenameWorkerFields(route, s.error_message()));
  }

  // The whole response at once. A client that disconnects while it waits
  // has its calls cancelled (checked every kClientCheck; the socket is
  // looked up only once a call has run that long). Choices are collected in
  // order (they all run at once); the first failing one fails the request.
  void Complete(const httplib::Request& req, const Choices& choices, const ResponseInfo& ri,
                httplib::Response& res) {
    const Route route = choices.route;
    std::optional<int> fd;  // the client's socket, once looked up (-1: not found)
    json out = json::array();
    v1::Usage usage;
    std::vector<int32_t> first_tokens;
    v1::Timings first_timings;
    for (size_t i = 0; i < choices.calls.size(); ++i) {
      HttpCall& call = *choices.calls[i];
      std::string text;
      std::vector<int32_t> tokens;
      std::vector<v1::TokenLogprob> logprobs;
      std::optional<v1::GenerateFinal> summary;
      for (;;) {
        std::optional<CallEvents::Event> next = call.events.Next(kClientCheck);
        if (!next.has_value()) {
          if (!fd.has_value()) fd = ConnectionFd(req);
          if (*fd >= 0 && PeerGone(*fd)) choices.CancelAll();  // idempotent
          continue;
        }
        CallEvents::Event& e = *next;
        if (!e.response.has_value()) {
          if (!e.status.ok()) {
            choices.CancelAll();
            return ReplyError(res, CallError(route, e.status));
          }
          break;
        }
        if (e.response->has_chunk()) {
          const v1::GenerateChunk& c = e.response->chunk();
          text += c.text();
          tokens.insert(tokens.end(), c.token_ids().begin(), c.token_ids().end());
          logprobs.insert(logprobs.end(), c.logprobs().begin(), c.logprobs().end());
        } else if (e.response->has_summary()) {
          summary = e.response->summary();
        }
        call.RequestNext();
      }
      if (!summary.has_value()) {
        choices.CancelAll();
        return ReplyError(res, FromStatus(absl::StatusCode::kInternal,
                                          "the worker's stream ended without a summary"));
      }
      std::vector<v1::TokenLogprob> all;
      if (choices.echo) {
        all = choices.PromptLogprobs(*summary);
        std::string prompt = choices.echo_text[i];
        if (prompt.empty()) {  // a token prompt: its pieces
          for (const v1::TokenLogprob& t : all) prompt += t.text();
        }
        text = prompt + text;
      }
      all.insert(all.end(), logprobs.begin(), logprobs.end());
      int64_t offset = 0;
      json lp = choices.parsed_logprobs >= 0 ? LogprobsJson(route, all, &offset) : json(nullptr);
      out.push_back(ChoiceJson(route, static_cast<int>(i), text,
                               FinishReasonName(summary->finish_reason()), std::move(lp)));
      // A prompt counts once for its n choices.
      if (i % static_cast<size_t>(std::max(1, choices.n)) == 0) {
        usage.set_prompt_tokens(usage.prompt_tokens() + summary->usage().prompt_tokens());
      }
      usage.set_completion_tokens(usage.completion_tokens() +
                                  summary->usage().completion_tokens());
      if (i == 0) {
        first_tokens = std::move(tokens);
        first_timings = summary->timings();
      }
    }
    Reply(res, 200, ResponseJson(ri, std::move(out), usage, first_tokens, first_timings));
  }

  // Server-sent events, the choices one after the other (all run at once;
  // a later one's tokens wait in its call). The status line goes out with
  // the first event: errors before the first choice's first token (bad
  // field, prompt too long, overload) are still plain HTTP errors.
  void Stream(Choices choices_in, ResponseInfo ri, bool include_usage, httplib::Response& res) {
    auto choices = std::make_shared<Choices>(std::move(choices_in));
    const Route route = choices->route;
    CallEvents::Event first = choices->calls[0]->events.Next();
    if (!first.response.has_value() && !first.status.ok()) {
      choices->CancelAll();
      for (const std::shared_ptr<HttpCall>& c : choices->calls) Forget(c);
      return ReplyError(res, CallError(route, first.status));
    }
    struct State {
      ResponseInfo info;
      bool include_usage;
      std::optional<CallEvents::Event> peeked;
      size_t current = 0;  // the choice being streamed
      Utf8Joiner utf8;
      bool sent_role = false;
      std::vector<v1::TokenLogprob> pending;  // logprobs not yet sent with text
      int64_t text_offset = 0;
      std::optional<v1::GenerateFinal> summary;
      v1::Usage usage;
    };
    auto st = std::make_shared<State>();
    st->info = std::move(ri);
    st->include_usage = include_usage;
    st->peeked = std::move(first);
    res.set_header("Cache-Control", "no-cache");
    res.set_chunked_content_provider(
        "text/event-stream",
        [route, choices, st](size_t, httplib::DataSink& sink) {
          auto write = [&](const std::string& data) {
            if (sink.write(data.data(), data.size())) return true;
            choices->CancelAll();  // the client is gone
            return false;
          };
          // A chunk of the current choice with the pending logprobs.
          auto chunk = [&](const std::string& text, const std::string* finish) {
            const int index = static_cast<int>(st->current);
            if (choices->parsed_logprobs < 0 || (st->pending.empty() && finish != nullptr)) {
              return SseEvent(StreamChunk(st->info, text, false, finish, index));
            }
            const json lp = LogprobsJson(route, st->pending, &st->text_offset);
            st->pending.clear();
            return SseEvent(StreamChunk(st->info, text, false, finish, index, &lp));
          };
          for (;;) {
            if (route == Route::kChatCompletions && !st->sent_role) {
              st->sent_role = true;
              if (!write(SseEvent(StreamChunk(st->info, "", /*first=*/true, nullptr,
                                              static_cast<int>(st->current))))) {
                return false;
              }
            }
            HttpCall& call = *choices->calls[st->current];
            std::optional<CallEvents::Event> e;
            if (st->peeked.has_value()) {
              e = std::move(st->peeked);
              st->peeked.reset();
            } else {
              e = call.events.Next(kClientCheck);
            }
            if (!e.has_value()) {
              if (sink.is_writable()) continue;
              choices->CancelAll();  // the client went away while waiting
              return false;
            }
            if (e->response.has_value()) {
              if (e->response->has_summary()) st->summary = e->response->summary();
              std::string text;
              if (e->response->has_chunk()) {
                const v1::GenerateChunk& c = e->response->chunk();
                text = st->utf8.Push(c.text());
                st->pending.insert(st->pending.end(), c.logprobs().begin(), c.logprobs().end());
              }
              call.RequestNext();
              if (text.empty()) continue;
              return write(chunk(text, nullptr));
            }
            // This choice finished.
            std::string out;
            if (!e->status.ok()) {
              choices->CancelAll();
              out = SseEvent(CallError(route, e->status).ToJson());
              if (!write(out)) return false;
              sink.done();
              return true;
            }
            if (std::string rest = st->utf8.Flush(); !rest.empty() || !st->pending.empty()) {
              out += chunk(rest, nullptr);
            }
            const std::string finish = FinishReasonName(
                st->summary.has_value() ? st->summary->finish_reason()
                                        : v1::FINISH_REASON_UNSPECIFIED);
            out += chunk("", &finish);
            if (st->summary.has_value()) {
              const v1::Usage& u = st->summary->usage();
              if (st->current % static_cast<size_t>(std::max(1, choices->n)) == 0) {
                st->usage.set_prompt_tokens(st->usage.prompt_tokens() + u.prompt_tokens());
              }
              st->usage.set_completion_tokens(st->usage.completion_tokens() +
                                              u.completion_tokens());
            }
            if (st->current + 1 < choices->calls.size()) {
              ++st->current;
              st->sent_role = false;
              st->text_offset = 0;
              st->summary.reset();
              st->utf8 = Utf8Joiner();
              if (!write(out)) return false;
              continue;
            }
            if (st->include_usage) out += SseEvent(UsageChunk(st->info, st->usage));
            out += kSseDone;
            if (!write(out)) return false;
            sink.done();
            return true;
          }
        },
        [this, choices](bool success) {
          if (!success) choices->CancelAll();
          for (const std::shared_ptr<HttpCall>& c : choices->calls) Forget(c);
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
  if (options.max_connections < options.threads || options.max_connections > 65536) {
    return absl::InvalidArgumentError(absl::StrCat("http max connections: ",
                                                   options.max_connections, " outside [",
                                                   options.threads, " (http threads), 65536]"));
  }
  if (options.read_timeout_seconds < 1 || options.read_timeout_seconds > 3600) {
    return absl::InvalidArgumentError(absl::StrCat("http read timeout: ",
                                                   options.read_timeout_seconds,
                                                   " s outside [1, 3600]"));
  }
  if (options.limits.max_n < 1 || options.limits.max_n > 128) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_n: ", options.limits.max_n, " outside [1, 128]"));
  }
  if (options.limits.max_prompts < 1 || options.limits.max_prompts > 1024) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_prompts: ", options.limits.max_prompts, " outside [1, 1024]"));
  }
  if (options.max_request_bytes < 1024) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_request_bytes: ", options.max_request_bytes, " below 1024"));
  }
  if (options.max_header_bytes < 1024 || options.max_header_bytes > (int64_t{64} << 20)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "http max header bytes: ", options.max_header_bytes, " outside [1024, 67108864]"));
  }
  if (options.request_timeout_seconds < 1 || options.request_timeout_seconds > 3600) {
    return absl::InvalidArgumentError(absl::StrCat("http_request_timeout_seconds: ",
                                                   options.request_timeout_seconds,
                                                   " s outside [1, 3600]"));
  }
  auto impl = std::make_unique<Impl>(static_cast<size_t>(options.max_header_bytes),
                                     options.request_timeout_seconds,
                                     static_cast<uint64_t>(options.max_request_bytes));
  impl->options = options;
  impl->pool = pool;
  impl->metrics = metrics;
  Impl* p = impl.get();
  httplib::Server& s = impl->server;
  const int threads = options.threads;
  const int max_connections = options.max_connections;
  s.new_task_queue = [threads, max_connections] {
    return new ConnectionPool(threads, max_connections);
  };
  s.set_payload_max_length(static_cast<size_t>(options.max_request_bytes));
  s.set_keep_alive_timeout(2);
  s.set_read_timeout(static_cast<time_t>(options.read_timeout_seconds));
  s.set_write_timeout(30);
  s.Post("/v1/completions", [p](const httplib::Request& req, httplib::Response& res) {
    p->Generate(Route::kCompletions, req, res);
  });
  s.Post("/v1/chat/completions", [p](const httplib::Request& req, httplib::Response& res) {
    p->Generate(Route::kChatCompletions, req, res);
  });
  s.Get("/v1/models", [p](const httplib::Request& req, httplib::Response& res) {
    if (p->Authenticated(req, res)) p->Models(res);
  });
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

  // cpp-httplib listens with a backlog of 5: a burst of connections (a
  // crowd of clients, or an attack) then waits on SYN retransmissions
  // (1 s, 2 s, ...) before the server even sees it. The listening socket is
  // taken here (the options hook sees only it) and listen() is called again
  // with kListenBacklog once bound, which Linux applies to the socket.
  int listen_fd = -1;
  s.set_socket_options([&listen_fd](socket_t sock) {
    int yes = 1;
    setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof(yes));  // as cpp-httplib does
    listen_fd = sock;
  });
  if (port == 0) {
    port = s.bind_to_any_port(host);
    if (port <= 0) return absl::UnavailableError(absl::StrCat("cannot listen on ", options.listen));
  } else if (!s.bind_to_port(host, port)) {
    return absl::UnavailableError(absl::StrCat("cannot listen on ", options.listen));
  }
  if (listen_fd >= 0) ::listen(listen_fd, kListenBacklog);
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
