// kvr_loadgen: closed-loop load against a kvr.v1.Generation server (the
// gateway, or a worker) at several concurrency levels; prints a table of
// throughput and latency percentiles (or JSON).
//
//   kvr_loadgen --target 127.0.0.1:PORT --concurrency 1,4,16 --duration_seconds 20
//   kvr_loadgen --start_cluster --concurrency 1,4,16    # runs `kvr cluster` itself
//
// At each level C, C threads each run Generate streams back to back (a new
// request as soon as the previous one ended) until --duration_seconds have
// passed (requests in flight then are finished and counted) or, with
// --requests N, until N requests have run. Request i uses prompt i mod P of a
// fixed prompt set and seed i, so runs are repeatable.
//
// Measured on the client: time to first token (call start to the first
// chunk carrying tokens), inter-token latency (the gaps between token
// arrivals; a chunk of n tokens after a gap g counts as n gaps of g/n),
// end-to-end latency (call start to stream end); throughput is output tokens
// (and requests) of successful calls over the level's wall time. Failed calls
// are counted per gRPC status code and never as latency samples.
//
// A stream whose call fails waits before its next request: exponential
// backoff with jitter, --error_backoff_initial_seconds doubling per failure
// in a row up to --error_backoff_max_seconds, each wait drawn uniformly from
// [d/2, d]; a success resets it. So an unreachable target costs a few
// attempts per stream and second, not a hot loop.
#include <signal.h>
#include <sys/wait.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <map>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/subprocess.h"
#include "grpcpp/client_context.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "kvr/v1/generation.grpc.pb.h"
#include "nlohmann/json.hpp"
#include "services/infra/security/api_key.h"
#include "services/infra/security/tls_credentials.h"
#include "tools/cluster.h"

ABSL_FLAG(std::string, target, "",
          "kvr.v1.Generation server host:port (the gateway); not with --start_cluster");
ABSL_FLAG(std::string, tls_ca_file, "",
          "TLS: verify the --target server against this PEM CA (hostname check included); "
          "unset = plaintext");
ABSL_FLAG(std::string, tls_cert_file, "",
          "with --tls_key_file (and --tls_ca_file): present this PEM client certificate");
ABSL_FLAG(std::string, tls_key_file, "", "PEM private key of --tls_cert_file");
ABSL_FLAG(std::string, api_key, "",
          "gateway API key, sent on every request as metadata `authorization: Bearer KEY`");
ABSL_FLAG(bool, start_cluster, false,
          "start `kvr cluster` (found next to this binary, or --kvr), measure its gateway, stop it");
ABSL_FLAG(std::string, kvr, "", "the kvr binary for --start_cluster (default: next to this one)");
ABSL_FLAG(bool, secure, false,
          "with --start_cluster: start it with --secure (mTLS, API key) and use the TLS files "
          "and key its cluster.json names (also for --secure in --cluster_args; flags win)");
ABSL_FLAG(std::string, cluster_args, "",
          "extra `kvr cluster` flags for --start_cluster, space-separated");
ABSL_FLAG(std::string, concurrency, "1,4,16", "concurrency levels, comma-separated, each in [1, 1024]");
ABSL_FLAG(double, duration_seconds, 10.0, "per level: how long new requests are started");
ABSL_FLAG(int, requests, 0, "per level: run exactly this many requests instead (0: use duration)");
ABSL_FLAG(int, max_tokens, 64, "tokens generated per request");
ABSL_FLAG(double, temperature, 0.0, "sampling temperature (0 = greedy); seed = request index");
ABSL_FLAG(std::string, mode, "retrieval", "attention mode: retrieval | full");
ABSL_FLAG(int, warmup_requests, 2, "requests run (and not measured) before the first level");
ABSL_FLAG(double, deadline_seconds, 120.0, "per-request deadline");
ABSL_FLAG(bool, json, false, "print the results as JSON instead of a table");
ABSL_FLAG(double, error_backoff_initial_seconds, 0.05,
          "after a failed request a stream waits this long (jittered to [d/2, d]) before its "
          "next one, doubling per failure in a row; (0, 60]");
ABSL_FLAG(double, error_backoff_max_seconds, 2.0,
          "the longest wait after failures in a row; [--error_backoff_initial_seconds, 600]");

namespace kvr::loadgen {
namespace {

using Clock = std::chrono::steady_clock;

// A fixed prompt set of different lengths (stories260K tokens: ~5 to ~90).
const std::vector<std::string>& Prompts() {
  static const std::vector<std::string> prompts = {
      "Once upon a time",
      "One day, a little girl named Lily found a needle in her room.",
      "Tom and his dog went to the park. They saw a big red ball near the tree. Tom wanted to "
      "play with it, but the ball was stuck.",
      "There was a small bird who lived in a tall tree. Every morning the bird sang a happy song "
      "for all the animals in the forest. One day a strong wind came and the bird's nest fell "
      "down. The bird was very sad. Then a kind rabbit came by and said",
      "The sun was shining and the children ran to the beach.",
      "Sara had a red ball. She liked to bounce it high in the sky. One day the ball went over "
      "the fence into the garden of an old man.",
  };
  return prompts;
}

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

// Nearest-rank percentile (0 <= q <= 1) of sorted values; 0 when empty.
double Percentile(const std::vector<double>& sorted, double q) {
  if (sorted.empty()) return 0;
  const size_t rank = static_cast<size_t>(std::ceil(q * sorted.size()));
  return sorted[std::min(sorted.size() - 1, rank == 0 ? 0 : rank - 1)];
}

// Distinct error messages kept per level (the rest count under their code
// only): a server's messages must not grow the client without bound.
constexpr size_t kMaxErrorMessages = 16;

struct Samples {
  std::vector<double> ttft, itl, e2e;  // successful calls only
  int64_t ok = 0, output_tokens = 0;
  std::map<std::string, int64_t> errors_by_code;  // "UNAVAILABLE" -> count
  std::map<std::string, int64_t> errors;          // "CODE: message" -> count (bounded)

  // Counts one failed call under its code (and message, while fewer than
  // kMaxErrorMessages distinct ones are kept).
  void AddError(const std::string& code, const std::string& message) {
    ++errors_by_code[code];
    AddMessage(absl::StrCat(code, ": ", message), 1);
  }
  // `n` more calls failed with "CODE: message" `key` (kept while fewer than
  // kMaxErrorMessages distinct ones are).
  void AddMessage(const std::string& key, int64_t n) {
    if (auto it = errors.find(key); it != errors.end()) {
      it->second += n;
    } else if (errors.size() < kMaxErrorMessages) {
      errors.emplace(key, n);
    }
  }
};

struct LevelResult {
  int concurrency = 0;
  double wall_seconds = 0;
  Samples s;
  int64_t Errors() const {
    int64_t n = 0;
    for (const auto& [k, v] : s.errors_by_code) n += v;
    return n;
  }
};

// Waits after failed calls of one stream: exponential backoff with jitter
// (see the file comment). Not thread-safe; one per stream.
class ErrorBackoff {
 public:
  ErrorBackoff(double initial_seconds, double max_seconds, uint64_t seed)
      : initial_(initial_seconds), max_(max_seconds), rng_(seed) {}

  // The wait before the next request after one more failure in a row.
  Clock::duration Next() {
    const double d = std::min(max_, initial_ * std::ldexp(1.0, std::min(failures_, 30)));
    ++failures_;
    std::uniform_real_distribution<double> jitter(d / 2, d);
    return std::chrono::duration_cast<Clock::duration>(
        std::chrono::duration<double>(jitter(rng_)));
  }
  void Reset() { failures_ = 0; }

 private:
  double initial_, max_;
  int failures_ = 0;
  std::mt19937_64 rng_;
};

// The API key every call sends (--api_key, or a secure cluster's); set by
// Main before any call, read-only after.
std::string g_api_key;

// One Generate stream; appends its measurements to `out`. False when the
// call failed (counted in out's errors).
bool RunOne(v1::Generation::Stub* stub, int64_t index, Samples* out) {
  const std::vector<std::string>& prompts = Prompts();
  v1::GenerateRequest req;
  req.set_text(prompts[static_cast<size_t>(index) % prompts.size()]);
  req.set_max_tokens(absl::GetFlag(FLAGS_max_tokens));
  req.mutable_sampling()->set_temperature(static_cast<float>(absl::GetFlag(FLAGS_temperature)));
  req.mutable_sampling()->set_seed(static_cast<uint64_t>(index) + 1);
  req.mutable_attention()->set_mode(absl::GetFlag(FLAGS_mode));
  req.set_request_id(absl::StrCat("loadgen-", index));

  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() +
                   std::chrono::milliseconds(
                       static_cast<int64_t>(absl::GetFlag(FLAGS_deadline_seconds) * 1e3)));
  kvr::security::AttachApiKey(g_api_key, &ctx);
  const Clock::time_point start = Clock::now();
  Clock::time_point last;
  bool first = true;
  int64_t tokens = 0;
  std::vector<double> itl;
  double ttft = 0;
  auto reader = stub->Generate(&ctx, req);
  v1::GenerateResponse msg;
  while (reader->Read(&msg)) {
    if (!msg.has_chunk() || msg.chunk().token_ids_size() == 0) continue;
    const Clock::time_point now = Clock::now();
    const int n = msg.chunk().token_ids_size();
    if (first) {
      ttft = Seconds(now - start);
      first = false;
    } else {
      const double gap = Seconds(now - last) / n;
      for (int i = 0; i < n; ++i) itl.push_back(gap);
    }
    last = now;
    tokens += n;
  }
  const grpc::Status status = reader->Finish();
  const double e2e = Seconds(Clock::now() - start);
  if (!status.ok()) {
    out->AddError(absl::StatusCodeToString(static_cast<absl::StatusCode>(status.error_code())),
                  status.error_message());
    return false;
  }
  ++out->ok;
  out->output_tokens += tokens;
  if (!first) out->ttft.push_back(ttft);
  out->itl.insert(out->itl.end(), itl.begin(), itl.end());
  out->e2e.push_back(e2e);
  return true;
}

LevelResult RunLevel(v1::Generation::Stub* stub, int concurrency, int64_t* next_index) {
  const int requests = absl::GetFlag(FLAGS_requests);
  const Clock::time_point start = Clock::now();
  const Clock::time_point end =
      start + std::chrono::milliseconds(
                  static_cast<int64_t>(absl::GetFlag(FLAGS_duration_seconds) * 1e3));
  std::atomic<int64_t> started{0};
  const int64_t base = *next_index;
  std::vector<Samples> per_thread(static_cast<size_t>(concurrency));
  std::vector<std::thread> threads;
  for (int t = 0; t < concurrency; ++t) {
    threads.emplace_back([&, t] {
      ErrorBackoff backoff(absl::GetFlag(FLAGS_error_backoff_initial_seconds),
                           absl::GetFlag(FLAGS_error_backoff_max_seconds),
                           static_cast<uint64_t>(base) * 1024 + static_cast<uint64_t>(t));
      for (;;) {
        if (requests <= 0 && Clock::now() >= end) return;
        const int64_t i = started.fetch_add(1);
        if (requests > 0 && i >= requests) return;
        if (RunOne(stub, base + i, &per_thread[static_cast<size_t>(t)])) {
          backoff.Reset();
          continue;
        }
        Clock::time_point until = Clock::now() + backoff.Next();
        if (requests <= 0) until = std::min(until, end);  // the level ends meanwhile
        std::this_thread::sleep_until(until);
      }
    });
  }
  for (std::thread& t : threads) t.join();
  LevelResult r;
  r.concurrency = concurrency;
  r.wall_seconds = Seconds(Clock::now() - start);
  *next_index = base + started.load();
  for (Samples& s : per_thread) {
    r.s.ok += s.ok;
    r.s.output_tokens += s.output_tokens;
    r.s.ttft.insert(r.s.ttft.end(), s.ttft.begin(), s.ttft.end());
    r.s.itl.insert(r.s.itl.end(), s.itl.begin(), s.itl.end());
    r.s.e2e.insert(r.s.e2e.end(), s.e2e.begin(), s.e2e.end());
    for (const auto& [k, v] : s.errors_by_code) r.s.errors_by_code[k] += v;
    for (const auto& [k, v] : s.errors) r.s.AddMessage(k, v);
  }
  std::sort(r.s.ttft.begin(), r.s.ttft.end());
  std::sort(r.s.itl.begin(), r.s.itl.end());
  std::sort(r.s.e2e.begin(), r.s.e2e.end());
  return r;
}

void PrintTable(const std::string& target, const std::vector<LevelResult>& results) {
  std::printf("kvr_loadgen: target %s, max_tokens %d, temperature %g, mode %s, %s per level\n\n",
              target.c_str(), absl::GetFlag(FLAGS_max_tokens), absl::GetFlag(FLAGS_temperature),
              absl::GetFlag(FLAGS_mode).c_str(),
              absl::GetFlag(FLAGS_requests) > 0
                  ? absl::StrCat(absl::GetFlag(FLAGS_requests), " requests").c_str()
                  : absl::StrFormat("%.0f s", absl::GetFlag(FLAGS_duration_seconds)).c_str());
  std::printf("%11s %8s %6s %9s %7s | %-26s | %-26s | %-17s\n", "", "", "", "output", "",
              "TTFT ms", "inter-token ms", "end-to-end ms");
  std::printf("%11s %8s %6s %9s %7s | %8s %8s %8s | %8s %8s %8s | %8s %8s\n", "concurrency",
              "requests", "errors", "tok/s", "req/s", "p50", "p90", "p99", "p50", "p90", "p99",
              "p50", "p99");
  for (const LevelResult& r : results) {
    const Samples& s = r.s;
    const double wall = std::max(r.wall_seconds, 1e-9);
    std::printf(
        "%11d %8lld %6lld %9.1f %7.2f | %8.1f %8.1f %8.1f | %8.2f %8.2f %8.2f | %8.1f %8.1f\n",
        r.concurrency, static_cast<long long>(s.ok + r.Errors()), static_cast<long long>(r.Errors()),
        s.output_tokens / wall, s.ok / wall, Percentile(s.ttft, 0.5) * 1e3,
        Percentile(s.ttft, 0.9) * 1e3, Percentile(s.ttft, 0.99) * 1e3,
        Percentile(s.itl, 0.5) * 1e3, Percentile(s.itl, 0.9) * 1e3, Percentile(s.itl, 0.99) * 1e3,
        Percentile(s.e2e, 0.5) * 1e3, Percentile(s.e2e, 0.99) * 1e3);
  }
  for (const LevelResult& r : results) {
    if (r.s.errors_by_code.empty()) continue;
    std::vector<std::string> codes;
    for (const auto& [code, n] : r.s.errors_by_code) codes.push_back(absl::StrCat(code, " ", n));
    std::printf("  concurrency %d errors by code: %s\n", r.concurrency,
                absl::StrJoin(codes, ", ").c_str());
    for (const auto& [what, n] : r.s.errors) {
      std::printf("  concurrency %d: %lld x %s\n", r.concurrency, static_cast<long long>(n),
                  what.c_str());
    }
  }
}

void PrintJson(const std::string& target, const std::vector<LevelResult>& results) {
  nlohmann::ordered_json j;
  j["target"] = target;
  j["max_tokens"] = absl::GetFlag(FLAGS_max_tokens);
  j["temperature"] = absl::GetFlag(FLAGS_temperature);
  j["mode"] = absl::GetFlag(FLAGS_mode);
  j["levels"] = nlohmann::ordered_json::array();
  for (const LevelResult& r : results) {
    const Samples& s = r.s;
    const double wall = std::max(r.wall_seconds, 1e-9);
    auto pct = [](const std::vector<double>& v) {
      return nlohmann::ordered_json{{"p50", Percentile(v, 0.5)},
                                    {"p90", Percentile(v, 0.9)},
                                    {"p99", Percentile(v, 0.99)}};
    };
    nlohmann::ordered_json level = {{"concurrency", r.concurrency},
                                    {"requests", s.ok + r.Errors()},
                                    {"succeeded", s.ok},
                                    {"errors", r.Errors()},
                                    {"wall_seconds", r.wall_seconds},
                                    {"output_tokens", s.output_tokens},
                                    {"output_tokens_per_second", s.output_tokens / wall},
                                    {"requests_per_second", s.ok / wall},
                                    {"ttft_seconds", pct(s.ttft)},
                                    {"inter_token_seconds", pct(s.itl)},
                                    {"end_to_end_seconds", pct(s.e2e)}};
    level["errors_by_code"] = nlohmann::ordered_json::object();
    for (const auto& [code, n] : s.errors_by_code) level["errors_by_code"][code] = n;
    level["error_messages"] = nlohmann::ordered_json::object();
    for (const auto& [what, n] : s.errors) level["error_messages"][what] = n;
    j["levels"].push_back(std::move(level));
  }
  std::printf("%s\n", j.dump(2).c_str());
}

int Fail(const std::string& message) {
  std::fprintf(stderr, "kvr_loadgen: %s\n", message.c_str());
  return 2;
}

int Main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "closed-loop load generator for kvr.v1.Generation.\n"
      "  kvr_loadgen --target HOST:PORT [--concurrency 1,4,16] [--duration_seconds S]\n"
      "  kvr_loadgen --start_cluster [--cluster_args \"...\"]");
  absl::ParseCommandLine(argc, argv);
  signal(SIGPIPE, SIG_IGN);

  std::vector<int> levels;
  for (absl::string_view part : absl::StrSplit(absl::GetFlag(FLAGS_concurrency), ',')) {
    int c = 0;
    if (!absl::SimpleAtoi(part, &c) || c < 1 || c > 1024) {
      return Fail(absl::StrCat("--concurrency: \"", std::string(part.data(), part.size()),
                               "\" is not an integer in [1, 1024]"));
    }
    levels.push_back(c);
  }
  if (absl::GetFlag(FLAGS_max_tokens) < 1) return Fail("--max_tokens must be >= 1");
  if (absl::GetFlag(FLAGS_requests) < 0) return Fail("--requests must be >= 0");
  if (absl::GetFlag(FLAGS_requests) == 0 && !(absl::GetFlag(FLAGS_duration_seconds) > 0)) {
    return Fail("--duration_seconds must be > 0 (or give --requests)");
  }
  const double backoff_initial = absl::GetFlag(FLAGS_error_backoff_initial_seconds);
  const double backoff_max = absl::GetFlag(FLAGS_error_backoff_max_seconds);
  if (!(backoff_initial > 0 && backoff_initial <= 60)) {
    return Fail("--error_backoff_initial_seconds must be in (0, 60]");
  }
  if (!(backoff_max >= backoff_initial && backoff_max <= 600)) {
    return Fail("--error_backoff_max_seconds must be in [--error_backoff_initial_seconds, 600]");
  }
  if (absl::GetFlag(FLAGS_mode) != "retrieval" && absl::GetFlag(FLAGS_mode) != "full") {
    return Fail("--mode must be retrieval or full");
  }

  std::string target = absl::GetFlag(FLAGS_target);
  std::unique_ptr<Subprocess> cluster;
  std::string tls_ca_file = absl::GetFlag(FLAGS_tls_ca_file);
  std::string tls_cert_file = absl::GetFlag(FLAGS_tls_cert_file);
  std::string tls_key_file = absl::GetFlag(FLAGS_tls_key_file);
  g_api_key = absl::GetFlag(FLAGS_api_key);
  if (absl::GetFlag(FLAGS_secure) && !absl::GetFlag(FLAGS_start_cluster)) {
    return Fail("--secure needs --start_cluster (for another server give --tls_ca_file ...)");
  }
  if (absl::GetFlag(FLAGS_start_cluster)) {
    if (!target.empty()) return Fail("--target and --start_cluster exclude each other");
    std::string kvr = absl::GetFlag(FLAGS_kvr);
    if (kvr.empty()) {
      std::error_code ec;
      kvr = (std::filesystem::read_symlink("/proc/self/exe", ec).parent_path() / "kvr").string();
    }
    std::vector<std::string> cluster_argv = {kvr, "cluster"};
    if (absl::GetFlag(FLAGS_secure)) cluster_argv.push_back("--secure");
    for (absl::string_view a :
         absl::StrSplit(absl::GetFlag(FLAGS_cluster_args), ' ', absl::SkipWhitespace())) {
      cluster_argv.emplace_back(a);
    }
    absl::StatusOr<std::unique_ptr<Subprocess>> started = Subprocess::Start(cluster_argv);
    if (!started.ok()) return Fail(started.status().ToString());
    cluster = *std::move(started);
    absl::StatusOr<std::string> ready = cluster->WaitForLine("kvr cluster ready: ", absl::Minutes(3));
    if (!ready.ok()) return Fail(absl::StrCat("kvr cluster did not start: ", ready.status().message()));
    // "... (run dir DIR)"
    const size_t at = ready->rfind("(run dir ");
    if (at == std::string::npos || ready->back() != ')') {
      return Fail(absl::StrCat("unexpected ready line: ", *ready));
    }
    const std::string run_dir = ready->substr(at + 9, ready->size() - at - 10);
    absl::StatusOr<cluster::ClusterInfo> info =
        cluster::ReadClusterInfo(run_dir + "/cluster.json");
    if (!info.ok()) return Fail(info.status().ToString());
    target = info->gateway_grpc.empty() ? info->worker_grpc : info->gateway_grpc;
    // A secure cluster: its client credentials where no flag gave them.
    if (!info->ca_cert.empty()) {
      auto fill = [](std::string* field, const std::string& value) {
        if (field->empty()) *field = value;
      };
      fill(&tls_ca_file, info->ca_cert);
      fill(&tls_cert_file, info->client_cert);
      fill(&tls_key_file, info->client_key);
      fill(&g_api_key, info->api_key);
    }
  }
  if (target.empty()) return Fail("give --target HOST:PORT or --start_cluster");

  if (absl::Status st = kvr::security::CheckApiKey(g_api_key); !st.ok()) {
    return Fail(std::string(st.message()));
  }
  absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> credentials =
      kvr::security::MakeClientChannelCredentials(tls_ca_file, tls_cert_file, tls_key_file);
  if (!credentials.ok()) return Fail(std::string(credentials.status().message()));
  grpc::ChannelArguments channel_args;
  channel_args.SetMaxReceiveMessageSize(16 << 20);
  auto stub = v1::Generation::NewStub(
      grpc::CreateCustomChannel(target, *credentials, channel_args));
  int64_t next_index = 0;
  {
    Samples warmup;
    for (int i = 0; i < absl::GetFlag(FLAGS_warmup_requests); ++i) RunOne(stub.get(), i, &warmup);
    if (!warmup.errors_by_code.empty()) {
      return Fail(absl::StrCat("warm-up request failed: ",
                               warmup.errors.empty() ? warmup.errors_by_code.begin()->first
                                                     : warmup.errors.begin()->first));
    }
  }
  std::vector<LevelResult> results;
  for (int c : levels) {
    std::fprintf(stderr, "kvr_loadgen: concurrency %d...\n", c);
    results.push_back(RunLevel(stub.get(), c, &next_index));
  }
  if (absl::GetFlag(FLAGS_json)) {
    PrintJson(target, results);
  } else {
    PrintTable(target, results);
  }
  std::fflush(stdout);

  int rc = 0;
  if (cluster != nullptr) {
    absl::StatusOr<int> st = cluster->Stop(SIGTERM, absl::Seconds(120));
    if (!st.ok() || !WIFEXITED(*st) || WEXITSTATUS(*st) != 0) {
      std::fprintf(stderr, "kvr_loadgen: kvr cluster did not stop cleanly\n");
      rc = 1;
    }
  }
  for (const LevelResult& r : results) {
    if (r.Errors() > 0) rc = 1;
  }
  return rc;
}

}  // namespace
}  // namespace kvr::loadgen

int main(int argc, char** argv) { return kvr::loadgen::Main(argc, argv); }
