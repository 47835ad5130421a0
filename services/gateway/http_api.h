// HttpApi: the OpenAI-compatible HTTP front end of the gateway, on
// cpp-httplib (Debian's libcpp-httplib; no hand-written HTTP parsing).
//
//   POST /v1/completions        prompt (string or token ids) → text
//   POST /v1/chat/completions   messages (see openai.h's chat template)
//   GET  /v1/models             the served model
//   GET  /healthz               200 while a worker is healthy, else 503
//
// Both POST routes stream server-sent events with "stream": true
// ("data: {...}\n\n" chunks, then "data: [DONE]\n\n"); text is never split
// inside a UTF-8 character. Generation goes through GenerateCall, as for
// gRPC: the same admission queue, routing, retries and metrics (api="http").
// Errors are OpenAI error objects with the HTTP status of openai.h's
// FromStatus, plus 404 for unknown routes and models, 413 for bodies over
// max_request_bytes and 415 for a Content-Type other than application/json.
// A client that disconnects has its worker call cancelled (checked every
// 100 ms while waiting for tokens, and on every write of a stream).
//
// Thread-safety: each connection is served on a thread of its own (`threads`
// kept ready, up to `max_connections` at once; see docs/security.md). Lifetime: `pool` and
// `metrics` must outlive the HttpApi.
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "services/gateway/api_keys.h"
#include "services/gateway/gateway_metrics.h"
#include "services/gateway/openai.h"
#include "services/gateway/worker_pool.h"

namespace kvr::gateway {

struct HttpApiOptions {
  std::string listen = "127.0.0.1:0";  // host:port; port 0 picks a free one
  int threads = 64;                    // connection threads kept ready
  // Connections served at once (one thread each, started on demand); more
  // wait in FIFO order. At least `threads`.
  int max_connections = 2048;
  // A connection whose client sends nothing for this long while the server
  // reads (header, body, or the next keep-alive request) is closed.
  int read_timeout_seconds = 10;
  // Largest request head (request line and header fields) read; a longer
  // one is answered 400 and its connection closed (BoundedHttpServer).
  int64_t max_header_bytes = 64 << 10;
  // Longest time one request (head and body) may take to arrive, from its
  // first byte; a slower one is answered 408 and its connection closed
  // (BoundedHttpServer). [1, 3600].
  int request_timeout_seconds = 60;
  int64_t max_request_bytes = 4 << 20;
  absl::Duration default_timeout = absl::Seconds(300);  // deadline of every request
  // The model id clients name ("model"); empty: the stem of the checkpoint
  // file the workers report (stories260K.bin → "stories260K").
  std::string model_name;
  // API keys (not owned; outlives the HttpApi); null: no authentication.
  // Set: /v1/* needs "Authorization: Bearer <key>" (401 without a valid
  // one); the POST routes are admitted by the key's limits (429 with
  // Retry-After, type "requests" or "tokens"). /healthz stays open.
  ApiKeyStore* api_keys = nullptr;
  // Fan-out bounds: `n` in [1, limits.max_n] (max_n in [1, 128]); a
  // /v1/completions prompt batch of at most limits.max_prompts ([1, 1024]).
  // A request's choices run as n * prompts worker requests, each admitted
  // (API key slot and quota, worker queue) like a request of its own.
  ApiLimits limits;
};

class HttpApi {
 public:
  // Binds `options.listen` and starts serving. InvalidArgument for a
  // malformed address or options, Unavailable when it cannot bind.
  static absl::StatusOr<std::unique_ptr<HttpApi>> Start(const HttpApiOptions& options,
                                                        WorkerPool* pool, GatewayMetrics* metrics);
  // StopAccepting, then Drain(now).
  ~HttpApi();
  HttpApi(const HttpApi&) = delete;
  HttpApi& operator=(const HttpApi&) = delete;

  // "host:port" as bound.
  const std::string& address() const;

  // Closes the listening socket; requests in flight go on.
  void StopAccepting();
  // Waits for requests in flight until `deadline`, cancels those still
  // running (their worker calls too), and returns once all have ended.
  void Drain(absl::Time deadline);

 private:
  struct Impl;
  explicit HttpApi(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvr::gateway
