// kvr_gateway: the public entry point of a kvr cluster. Serves
// kvr.v1.Generation over gRPC (with grpc.health.v1 and reflection) and an
// OpenAI-compatible HTTP API, both proxied to the decode workers of
// --workers (least outstanding requests, bounded admission queue, health
// checks, streams resumed on another worker when theirs fails with
// UNAVAILABLE), and Prometheus metrics kvr_gateway_*.
//
//   kvr_gateway --workers 127.0.0.1:50051,127.0.0.1:50052 --listen 127.0.0.1:0
//       --http_listen 127.0.0.1:0 --metrics_listen 127.0.0.1:0
//
// Prints, in this order, "kvr_gateway http on HOST:PORT", "kvr_gateway
// metrics on HOST:PORT" (each unless disabled) and last "kvr_gateway
// listening on HOST:PORT" once serving. SIGTERM / SIGINT: both front ends
// stop accepting, calls in flight drain (up to --drain_seconds, then they
// are cancelled, and with them their worker calls), exit 0.
#include <pthread.h>
#include <signal.h>
#include <sys/resource.h>

#include <atomic>
#include <cstdio>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "services/gateway/api_keys.h"
#include "services/gateway/gateway_metrics.h"
#include "services/gateway/gateway_service.h"
#include "services/gateway/http_api.h"
#include "services/gateway/worker_pool.h"
#include "services/infra/membership/membership.h"
#include "services/infra/metrics/metrics_endpoint.h"
#include "services/infra/rpc/grpc_server.h"
#include "services/infra/security/tls_credentials.h"
#include "services/infra/security/tls_flags.h"
#include "services/infra/server/serve_flags.h"
#include "services/infra/server/server_main.h"

ABSL_FLAG(std::string, listen, "127.0.0.1:0",
          "host:port of the gRPC API; port 0 picks a free port (printed on stdout as "
          "\"kvr_gateway listening on HOST:PORT\")");
ABSL_FLAG(std::string, http_listen, "127.0.0.1:0",
          "host:port of the OpenAI-compatible HTTP API (printed as \"kvr_gateway http on "
          "HOST:PORT\"); empty disables it");
ABSL_FLAG(std::string, metrics_listen, "127.0.0.1:0",
          "host:port serving Prometheus metrics at GET /metrics (printed as \"kvr_gateway "
          "metrics on HOST:PORT\"); empty disables them");
ABSL_FLAG(std::string, workers, "",
          "decode workers (kvr_worker gRPC addresses): \"host:port,host:port\", or "
          "\"dns:///name:port\" (every address of name, re-resolved every "
          "--workers_refresh_seconds; a Kubernetes headless service)");
ABSL_FLAG(double, workers_refresh_seconds, 10.0, "DNS worker lists: re-resolution period");
ABSL_FLAG(int, max_outstanding_per_worker, 8,
          "requests one worker serves at once (keep <= its --max_concurrent + --max_queue); "
          "more wait in the gateway's queue");
ABSL_FLAG(int, max_queue, 64,
          "requests waiting for a worker slot (FIFO, each until its deadline); more get "
          "RESOURCE_EXHAUSTED / HTTP 429");
ABSL_FLAG(double, request_timeout_seconds, 300.0,
          "deadline of a request that carries none (all HTTP requests; gRPC calls without a "
          "deadline): queueing plus generation");
ABSL_FLAG(int, max_request_bytes, 4 << 20,
          "largest request accepted, bytes (gRPC message, HTTP body; HTTP answers 413)");
ABSL_FLAG(int, http_threads, 64,
          "HTTP connection threads kept ready (each open connection, streaming or queued, "
          "holds one)");
ABSL_FLAG(int, http_max_connections, 2048,
          "HTTP connections served at once (a thread each, started on demand; at least "
          "--http_threads); more wait in FIFO order");
ABSL_FLAG(int, http_read_timeout_seconds, 10,
          "an HTTP connection whose client sends nothing for this long while the gateway "
          "reads (request header, body, next keep-alive request) is closed");
ABSL_FLAG(int, http_max_header_bytes, 64 << 10,
          "largest HTTP request head (request line and header fields) read, bytes; a longer "
          "one is answered 400 and its connection closed (each header field is kept in memory "
          "while the request is served)");
ABSL_FLAG(int, http_request_timeout_seconds, 60,
          "longest time one HTTP request (its head and body) may take to arrive, counted from "
          "its first byte; a slower one is answered 408 and its connection closed, however "
          "steadily it trickles ([1, 3600]; a 4 MiB body at 100 KB/s takes ~40 s)");
ABSL_FLAG(double, max_request_timeout_seconds, 3600.0,
          "longest deadline a request may have: later gRPC deadlines are cut to it (at least "
          "--request_timeout_seconds)");
ABSL_FLAG(int, max_n, 16,
          "HTTP API: most choices (`n`) per prompt, [1, 128]; each choice is one worker "
          "request (admitted, queued and counted against API-key quotas as one)");
ABSL_FLAG(int, max_prompts, 16,
          "HTTP API: most prompts in one /v1/completions batch (`prompt` as an array), "
          "[1, 1024]");
ABSL_FLAG(std::string, model_name, "",
          "model id of the HTTP API; empty: the stem of the workers' checkpoint file (e.g. "
          "stories260K)");
ABSL_FLAG(double, health_check_seconds, 2.0,
          "period of the workers' grpc.health.v1 checks (a failing worker leaves rotation "
          "until it passes again)");
ABSL_FLAG(double, drain_seconds, 10.0,
          "on SIGTERM / SIGINT, how long calls in flight may run before they are cancelled");
ABSL_FLAG(int, max_resumes, 2,
          "a Generate whose worker fails with UNAVAILABLE (dies, drops the connection, shuts "
          "down) before the stream finished is resumed on another worker at most this many "
          "times, replaying the tokens already sent ([0, 16]; 0 = never)");
ABSL_FLAG(double, resume_backoff_seconds, 0.05,
          "wait before the n-th resume of a request: this * 2^(n-1) seconds ([0, 10])");
ABSL_FLAG(std::string, api_keys_file, "",
          "JSON file of API keys as salted hashes with per-key limits ({\"keys\": [{\"id\", "
          "\"salt\", \"sha256\", \"max_concurrent\", \"tokens_per_minute\"}]}, made by `kvr "
          "apikey`); /v1/* and the gRPC Generation service then need \"Authorization: Bearer "
          "<key>\". Empty: no authentication (a warning)");
ABSL_FLAG(double, api_keys_reload_seconds, 5.0,
          "how often --api_keys_file is checked for changes (mtime, size, inode) and re-read "
          "([0.05, 3600]); a bad file keeps the previous keys");
ABSL_FLAG(std::string, public_tls_cert_file, "",
          "PEM certificate chain of the client-facing gRPC port (--listen): server-only TLS, "
          "no client certificate asked (set with --public_tls_key_file; both empty: "
          "plaintext). Re-read every --tls_reload_seconds. The HTTP API stays plaintext (TLS "
          "terminates at the ingress)");
ABSL_FLAG(std::string, public_tls_key_file, "", "PEM private key of --public_tls_cert_file");

namespace kvr::gateway {
namespace {

constexpr char kProgram[] = "kvr_gateway";
constexpr char kServiceName[] = "kvr.v1.Generation";

int Fail(absl::string_view message) { return server::Fail(kProgram, message); }

// Raises the soft limit on open descriptors to the hard one, so that
// `http_connections` client connections fit beside the gateway's own
// (cpp-httplib polls, so descriptors above 1024 are fine); warns when even
// the hard limit is too low (connections beyond it wait in the kernel's
// backlog until a descriptor frees).
void RaiseDescriptorLimit(int http_connections) {
  rlimit lim{};
  if (getrlimit(RLIMIT_NOFILE, &lim) != 0) return;
  if (lim.rlim_cur < lim.rlim_max) {
    lim.rlim_cur = lim.rlim_max;
    setrlimit(RLIMIT_NOFILE, &lim);
    getrlimit(RLIMIT_NOFILE, &lim);
  }
  constexpr rlim_t kOwnDescriptors = 256;  // gRPC, workers, metrics, files
  if (lim.rlim_cur != RLIM_INFINITY &&
      lim.rlim_cur < static_cast<rlim_t>(http_connections) + kOwnDescriptors) {
    std::fprintf(stderr,
                 "kvr_gateway: open-file limit %llu is below --http_max_connections %d + %llu\n",
                 static_cast<unsigned long long>(lim.rlim_cur), http_connections,
                 static_cast<unsigned long long>(kOwnDescriptors));
  }
}

int Main(int argc, char** argv) {
  server::ParseFlags(
      "services/gateway/main.cc",
      "gateway: kvr.v1.Generation over gRPC and an OpenAI-compatible HTTP API, proxied to "
      "decode workers.\n"
      "  kvr_gateway --workers host:port,... [--listen H:P] [--http_listen H:P] "
      "[--metrics_listen H:P]",
      argc, argv);

  // SIGTERM / SIGINT are taken by a watcher thread, which stops the HTTP
  // front end and then wakes the gRPC serving loop with SIGUSR1, so both
  // drain at once. Blocked here, before any thread starts.
  const sigset_t stop_signals = rpc::BlockStopSignals();
  sigset_t wake_grpc;
  sigemptyset(&wake_grpc);
  sigaddset(&wake_grpc, SIGUSR1);
  pthread_sigmask(SIG_BLOCK, &wake_grpc, nullptr);

  const std::string workers = absl::GetFlag(FLAGS_workers);
  if (workers.empty()) return Fail("--workers is required (host:port,... or dns:///name:port)");
  const double refresh = absl::GetFlag(FLAGS_workers_refresh_seconds);
  const double timeout = absl::GetFlag(FLAGS_request_timeout_seconds);
  const double health = absl::GetFlag(FLAGS_health_check_seconds);
  const double drain = absl::GetFlag(FLAGS_drain_seconds);
  const int max_request_bytes = absl::GetFlag(FLAGS_max_request_bytes);
  const double max_timeout = absl::GetFlag(FLAGS_max_request_timeout_seconds);
  const absl::Status flags_ok = server::FlagChecks()
                                    .Above("workers_refresh_seconds", refresh, 0.0)
                                    .Above("request_timeout_seconds", timeout, 0.0)
                                    .InRange("max_request_timeout_seconds", max_timeout,
                                             0.001, 365.0 * 86400.0)
                                    .InRange("http_read_timeout_seconds",
                                             absl::GetFlag(FLAGS_http_read_timeout_seconds), 1,
                                             3600)
                                    .InRange("http_request_timeout_seconds",
                                             absl::GetFlag(FLAGS_http_request_timeout_seconds),
                                             1, 3600)
                                    .InRange("http_max_header_bytes",
                                             absl::GetFlag(FLAGS_http_max_header_bytes), 1024,
                                             64 << 20)
                                    .InRange("http_max_connections",
                                             absl::GetFlag(FLAGS_http_max_connections),
                                             absl::GetFlag(FLAGS_http_threads), 65536)
                                    .AtLeast("health_check_seconds", health, 0.01)
                                    .AtLeast("drain_seconds", drain, 0.0)
                                    .AtLeast("max_request_bytes", max_request_bytes, 1 << 16)
                                    .InRange("max_resumes", absl::GetFlag(FLAGS_max_resumes), 0,
                                             16)
                                    .InRange("resume_backoff_seconds",
                                             absl::GetFlag(FLAGS_resume_backoff_seconds), 0.0,
                                             10.0)
                                    .InRange("api_keys_reload_seconds",
                                             absl::GetFlag(FLAGS_api_keys_reload_seconds), 0.05,
                                             3600.0)
                                    .status();
  if (!flags_ok.ok()) return Fail(flags_ok.message());
  const absl::StatusOr<server::ServeBounds> bounds = server::ServeBoundsFromFlags();
  if (!bounds.ok()) return Fail(bounds.status().message());
  if (!absl::GetFlag(FLAGS_http_listen).empty()) {
    RaiseDescriptorLimit(absl::GetFlag(FLAGS_http_max_connections));
  }
  if (timeout > max_timeout) {
    return Fail(absl::StrCat("--request_timeout_seconds ", timeout,
                             " is over --max_request_timeout_seconds ", max_timeout));
  }

  // --tls_*: the gateway's certificate towards the workers (it serves no
  // mTLS port itself: its --listen is client-facing, --public_tls_*).
  absl::StatusOr<security::ProcessTls> tls = security::ProcessTlsFromFlags(kProgram, "");
  if (!tls.ok()) return Fail(tls.status().message());
  std::shared_ptr<grpc::ServerCredentials> public_credentials;
  {
    const std::string cert = absl::GetFlag(FLAGS_public_tls_cert_file);
    const std::string key = absl::GetFlag(FLAGS_public_tls_key_file);
    if (cert.empty() != key.empty()) {
      return Fail(absl::StrCat("server TLS needs --public_tls_cert_file and "
                               "--public_tls_key_file together; missing ",
                               cert.empty() ? "--public_tls_cert_file" : "--public_tls_key_file"));
    }
    if (!cert.empty()) {
      for (const auto& [flag, path] :
           {std::pair<const char*, const std::string&>{"public_tls_cert_file", cert},
            {"public_tls_key_file", key}}) {
        if (absl::Status st = security::CheckPemFile(flag, path); !st.ok()) {
          return Fail(st.message());
        }
      }
      public_credentials = security::MakeServerTlsCredentials(
          cert, key, absl::GetFlag(FLAGS_tls_reload_seconds));
    }
  }

  membership::MembershipOptions mo;
  mo.spec = workers;
  mo.refresh = absl::Seconds(refresh);
  absl::StatusOr<std::unique_ptr<membership::Membership>> members =
      membership::Membership::Create(mo);
  if (!members.ok()) return Fail(absl::StrCat("--workers: ", members.status().message()));

  WorkerPoolOptions po;
  po.credentials = tls->channel;
  if ((*members)->is_dns()) po.tls_server_name = (*members)->dns_host();
  po.balancer.max_outstanding_per_worker = absl::GetFlag(FLAGS_max_outstanding_per_worker);
  po.balancer.max_queue = absl::GetFlag(FLAGS_max_queue);
  po.health_interval = absl::Seconds(health);
  po.health_timeout = std::min(absl::Seconds(1), absl::Seconds(health));
  po.max_message_bytes = max_request_bytes;
  po.max_resumes = absl::GetFlag(FLAGS_max_resumes);
  po.resume_backoff = absl::Seconds(absl::GetFlag(FLAGS_resume_backoff_seconds));
  absl::StatusOr<std::unique_ptr<WorkerPool>> pool = WorkerPool::Create(po);
  if (!pool.ok()) return Fail(absl::StrCat("--", pool.status().message()));

  WorkerPool* pool_ptr = pool->get();
  (*members)->Subscribe(
      [pool_ptr](const std::vector<std::string>& addresses) { pool_ptr->SetWorkers(addresses); });
  // Serve only once dead workers are known to be out of rotation.
  (*pool)->CheckHealthNow();

  auto metrics = std::make_unique<GatewayMetrics>();
  // API keys: loaded before anything listens, so a bad file exits 2 at once.
  std::unique_ptr<ApiKeyStore> api_keys;
  if (const std::string path = absl::GetFlag(FLAGS_api_keys_file); !path.empty()) {
    ApiKeyStoreOptions ko;
    ko.path = path;
    ko.reload = absl::Seconds(absl::GetFlag(FLAGS_api_keys_reload_seconds));
    GatewayMetrics* m = metrics.get();
    ko.on_reload = [m](bool ok, size_t keys, const absl::Status&) {
      m->RecordKeysLoaded(ok, keys, /*initial=*/false);
    };
    absl::StatusOr<std::unique_ptr<ApiKeyStore>> store = ApiKeyStore::Open(std::move(ko));
    if (!store.ok()) return Fail(absl::StrCat("--api_keys_file: ", store.status().message()));
    api_keys = *std::move(store);
    metrics->RecordKeysLoaded(true, api_keys->size(), /*initial=*/true);
  } else {
    std::fprintf(stderr,
                 "kvr_gateway: warning: no --api_keys_file: anyone who reaches the gateway may "
                 "use it\n");
  }
  metrics->SetLoadSource([pool_ptr] {
    GatewayLoad l;
    l.running = pool_ptr->balancer().running();
    l.waiting = pool_ptr->balancer().waiting();
    for (const WorkerLoad& w : pool_ptr->balancer().Workers()) {
      if (!w.member) continue;
      (w.healthy ? l.healthy_workers : l.unhealthy_workers) += 1;
    }
    return l;
  });

  const absl::Duration default_timeout = absl::Seconds(timeout);
  std::unique_ptr<HttpApi> http;
  if (const std::string listen = absl::GetFlag(FLAGS_http_listen); !listen.empty()) {
    HttpApiOptions ho;
    ho.listen = listen;
    ho.threads = absl::GetFlag(FLAGS_http_threads);
    ho.max_connections = absl::GetFlag(FLAGS_http_max_connections);
    ho.read_timeout_seconds = absl::GetFlag(FLAGS_http_read_timeout_seconds);
    ho.max_header_bytes = absl::GetFlag(FLAGS_http_max_header_bytes);
    ho.request_timeout_seconds = absl::GetFlag(FLAGS_http_request_timeout_seconds);
    ho.max_request_bytes = max_request_bytes;
    ho.default_timeout = default_timeout;
    ho.model_name = absl::GetFlag(FLAGS_model_name);
    ho.limits.max_n = absl::GetFlag(FLAGS_max_n);
    ho.limits.max_prompts = absl::GetFlag(FLAGS_max_prompts);
    ho.api_keys = api_keys.get();
    absl::StatusOr<std::unique_ptr<HttpApi>> h = HttpApi::Start(ho, pool_ptr, metrics.get());
    if (!h.ok()) return Fail(absl::StrCat("--http_listen: ", h.status().message()));
    http = *std::move(h);
    std::printf("kvr_gateway http on %s\n", http->address().c_str());
    std::fflush(stdout);
  }
  absl::StatusOr<std::unique_ptr<metrics::MetricsEndpoint>> endpoint =
      server::ServeMetrics(kProgram, absl::GetFlag(FLAGS_metrics_listen), metrics->collectable());
  if (!endpoint.ok()) return Fail(absl::StrCat("--metrics_listen: ", endpoint.status().message()));

  GatewayServiceOptions so;
  so.default_timeout = default_timeout;
  so.max_timeout = absl::Seconds(max_timeout);
  so.api_keys = api_keys.get();
  auto service = std::make_unique<GatewayService>(pool_ptr, metrics.get(), so);

  std::atomic<bool> serving_failed{false};
  absl::Time drain_deadline = absl::InfiniteFuture();
  const pthread_t main_thread = pthread_self();
  std::thread watcher([&] {
    int signal = 0;
    sigwait(&stop_signals, &signal);
    if (serving_failed.load()) return;  // woken by main to exit
    drain_deadline = absl::Now() + absl::Seconds(drain);
    std::fprintf(stderr, "kvr_gateway: signal %d, draining (HTTP and gRPC)\n", signal);
    if (http != nullptr) http->StopAccepting();
    pthread_kill(main_thread, SIGUSR1);
  });

  const absl::Status served = rpc::ServeUntilSignal(
      {service.get()},
      {.name = kProgram,
       .listen = absl::GetFlag(FLAGS_listen),
       .max_message_bytes = max_request_bytes,
       .health_services = {kServiceName},
       .drain_seconds = drain,
       .max_concurrent_streams = bounds->max_concurrent_streams,
       .memory_quota_bytes = bounds->memory_quota_bytes,
       .max_threads = bounds->max_threads,
       .credentials = public_credentials},
      wake_grpc);
  if (!served.ok()) {
    serving_failed = true;
    pthread_kill(watcher.native_handle(), SIGTERM);
    watcher.join();
    return Fail(served.message());
  }
  watcher.join();  // it sent the wake-up: done
  if (http != nullptr) http->Drain(drain_deadline);
  // Cancelled calls finish promptly; wait for them before freeing what they use.
  if (!pool_ptr->WaitForCalls(absl::Seconds(10))) {
    std::fprintf(stderr, "kvr_gateway: calls still open after the drain\n");
  }
  http.reset();
  endpoint->reset();
  service.reset();
  members->reset();
  pool->reset();
  api_keys.reset();
  std::fprintf(stderr, "kvr_gateway: stopped\n");
  return 0;
}

}  // namespace
}  // namespace kvr::gateway

int main(int argc, char** argv) { return kvr::gateway::Main(argc, argv); }
