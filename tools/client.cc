#include "tools/client.h"

#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <thread>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/status.h"
#include "grpcpp/client_context.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "kvr/v1/generation.grpc.pb.h"
#include "services/infra/security/api_key.h"
#include "services/infra/security/tls_credentials.h"
#include "tools/cli_flags.h"

namespace kvr::client {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

// "FINISH_REASON_LENGTH" -> "length".
std::string FinishName(v1::FinishReason r) {
  std::string name = v1::FinishReason_Name(r);
  constexpr std::string_view kPrefix = "FINISH_REASON_";
  if (name.rfind(kPrefix, 0) == 0) name.erase(0, kPrefix.size());
  return absl::AsciiStrToLower(name);
}

v1::GenerateRequest ToRequest(const ClientOptions& o) {
  v1::GenerateRequest r;
  r.set_text(o.prompt);
  if (o.max_tokens) r.set_max_tokens(*o.max_tokens);
  for (const std::string& s : o.stop) r.add_stop(s);
  v1::SamplingParams* s = r.mutable_sampling();
  if (o.temperature) s->set_temperature(*o.temperature);
  if (o.top_k) s->set_top_k(*o.top_k);
  if (o.top_p) s->set_top_p(*o.top_p);
  if (o.repetition_penalty) s->set_repetition_penalty(*o.repetition_penalty);
  if (o.seed) s->set_seed(*o.seed);
  v1::AttentionParams* a = r.mutable_attention();
  a->set_mode(o.mode);
  if (o.sinks) a->set_sinks(*o.sinks);
  if (o.window) a->set_window(*o.window);
  if (o.k) a->set_top_k(*o.k);
  if (o.beam) a->set_beam(*o.beam);
  r.set_request_id(o.request_id);
  return r;
}

// A one-line bar redrawn in place on a terminal's stderr.
class ProgressBar {
 public:
  ProgressBar() : enabled_(isatty(STDERR_FILENO) == 1) {}
  void Draw(const v1::PrefillProgress& p) {
    if (!enabled_ || p.prompt_tokens_total() <= 0) return;
    constexpr int kWidth = 30;
    const double frac = std::clamp(
        static_cast<double>(p.prompt_tokens_done()) / p.prompt_tokens_total(), 0.0, 1.0);
    const int filled = static_cast<int>(std::lround(frac * kWidth));
    std::fprintf(stderr, "\r[%s%s] %3d%% prefill %lld/%lld prompt tokens",
                 std::string(filled, '#').c_str(), std::string(kWidth - filled, '.').c_str(),
                 static_cast<int>(frac * 100), static_cast<long long>(p.prompt_tokens_done()),
                 static_cast<long long>(p.prompt_tokens_total()));
    std::fflush(stderr);
    shown_ = true;
  }
  void Clear() {
    if (!shown_) return;
    std::fputs("\r\033[K", stderr);
    std::fflush(stderr);
    shown_ = false;
  }

 private:
  bool enabled_;
  bool shown_ = false;
};

}  // namespace

const char kClientUsage[] = R"(Usage: kvr client --target HOST:PORT [flags]

Streams one generation from a kvr.v1.Generation server (kvr_gateway or
kvr_worker): the prompt and its continuation to stdout as they arrive; on
stderr a prefill progress bar (terminals only) and a summary line. Ctrl-C
cancels the call (the server stops the sequence). Exit status: 0 done, 1 the
call failed (its gRPC status is printed), 2 bad flags, 130 cancelled.

  --target HOST:PORT      server address (required; e.g. the gateway grpc
                          address `kvr cluster` prints)
  --prompt TEXT           prompt (default "Once upon a time")
  --max_tokens N          tokens to generate, >= 0 (server default 128)
  --stop TEXT             stop string (repeatable)
  --temperature T         0 = greedy (server default 0)
  --top_p P               nucleus mass in (0, 1]
  --top_k N               sample among the N most likely tokens, 0 = all
  --repetition_penalty R  > 0, 1 = off
  --seed N                sampling seed (server default 1)
  --mode retrieval|full   attention mode (server default retrieval)
  --sinks N               attention-sink tokens kept on the worker
  --window N              recent tokens kept on the worker
  --k N                   keys retrieved per query head
  --beam N                graph search beam, 0 = index default
  --request_id ID         echoed in the server's final message
  --deadline_seconds S    call deadline (default 300)
  --echo=false            print only the continuation, not the prompt
  --tls_ca_file PEM       TLS: verify the server against this CA (with a
                          hostname check); unset = plaintext
  --tls_cert_file PEM     with --tls_key_file: present this client
  --tls_key_file PEM      certificate (mTLS; needs --tls_ca_file)
  --api_key KEY           sent as metadata `authorization: Bearer KEY`
)";

absl::Status ParseClientFlags(const std::vector<std::string>& args, ClientOptions* o, bool* help) {
  auto opt_int = [](int64_t lo, int64_t hi, std::optional<int>* field) {
    return cli::FlagSpec{[=](std::string_view name, const std::string& v) -> absl::Status {
      int64_t x = 0;
      KVR_RETURN_IF_ERROR(cli::ParseInt(name, v, lo, hi, &x));
      *field = static_cast<int>(x);
      return absl::OkStatus();
    }};
  };
  // Range checks of floats are the server's (its message names the limit).
  auto opt_float = [](std::optional<float>* field) {
    return cli::FlagSpec{[=](std::string_view name, const std::string& v) -> absl::Status {
      float x = 0;
      KVR_RETURN_IF_ERROR(cli::ParseFloat(name, v, &x));
      *field = x;
      return absl::OkStatus();
    }};
  };
  constexpr int64_t kInt32Max = (int64_t{1} << 31) - 1;
  const cli::FlagTable flags = {
      {"target", cli::StringFlag(&o->target)},
      {"prompt", cli::StringFlag(&o->prompt)},
      {"max_tokens", opt_int(0, kInt32Max, &o->max_tokens)},
      {"stop",
       {[o](std::string_view, const std::string& v) -> absl::Status {
         if (v.empty()) return absl::InvalidArgumentError("--stop: empty stop string");
         o->stop.push_back(v);
         return absl::OkStatus();
       }}},
      {"temperature", opt_float(&o->temperature)},
      {"top_p", opt_float(&o->top_p)},
      {"top_k", opt_int(0, kInt32Max, &o->top_k)},
      {"repetition_penalty", opt_float(&o->repetition_penalty)},
      {"seed",
       {[o](std::string_view, const std::string& v) -> absl::Status {
         uint64_t s = 0;
         if (!absl::SimpleAtoi(v, &s)) {
           return absl::InvalidArgumentError(
               absl::StrCat("--seed: \"", v, "\" is not an unsigned integer"));
         }
         o->seed = s;
         return absl::OkStatus();
       }}},
      {"mode",
       {[o](std::string_view, const std::string& v) -> absl::Status {
         if (v != "retrieval" && v != "full") {
           return absl::InvalidArgumentError(
               absl::StrCat("--mode: \"", v, "\" is not retrieval or full"));
         }
         o->mode = v;
         return absl::OkStatus();
       }}},
      {"sinks", opt_int(0, kInt32Max, &o->sinks)},
      {"window", opt_int(1, kInt32Max, &o->window)},
      {"k", opt_int(1, 4096, &o->k)},
      {"beam", opt_int(0, 65536, &o->beam)},
      {"request_id", cli::StringFlag(&o->request_id)},
      {"deadline_seconds",
       {[o](std::string_view name, const std::string& v) {
         return cli::ParseDouble(name, v, 0.001, 86400, &o->deadline_seconds);
       }}},
      {"echo", cli::BoolFlag(&o->echo)},
      {"tls_ca_file", cli::StringFlag(&o->tls_ca_file)},
      {"tls_cert_file", cli::StringFlag(&o->tls_cert_file)},
      {"tls_key_file", cli::StringFlag(&o->tls_key_file)},
      {"api_key", cli::StringFlag(&o->api_key)},
  };
  KVR_RETURN_IF_ERROR(cli::ParseFlags(args, flags, "client", help));
  if (!*help && o->target.empty()) {
    return absl::InvalidArgumentError("--target HOST:PORT is required");
  }
  return security::CheckApiKey(o->api_key);
}

// Written by the SIGINT / SIGTERM handler; read by the watcher thread.
int g_signal_pipe[2] = {-1, -1};

void OnStopSignal(int) {
  const char byte = 'S';
  (void)!write(g_signal_pipe[1], &byte, 1);
}

int RunClient(const ClientOptions& o) {
  // Ctrl-C / SIGTERM cancel the call: the handler only writes to a pipe
  // (TryCancel is not async-signal-safe); a watcher thread reads it. A
  // handler rather than sigwait because libraries may have started threads
  // before this runs, and any of them may take the signal.
  if (pipe2(g_signal_pipe, O_CLOEXEC) != 0) {
    std::fprintf(stderr, "kvr client: pipe2: %s\n", std::strerror(errno));
    return 1;
  }
  struct sigaction sa = {};
  sa.sa_handler = OnStopSignal;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);

  absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> credentials =
      security::MakeClientChannelCredentials(o.tls_ca_file, o.tls_cert_file, o.tls_key_file);
  if (!credentials.ok()) {
    std::fprintf(stderr, "kvr client: %s\n", std::string(credentials.status().message()).c_str());
    return 2;
  }
  grpc::ChannelArguments channel_args;
  channel_args.SetMaxReceiveMessageSize(16 << 20);
  auto stub = v1::Generation::NewStub(
      grpc::CreateCustomChannel(o.target, *credentials, channel_args));
  grpc::ClientContext ctx;
  security::AttachApiKey(o.api_key, &ctx);
  ctx.set_deadline(std::chrono::system_clock::now() +
                   std::chrono::microseconds(static_cast<int64_t>(o.deadline_seconds * 1e6)));
  std::atomic<bool> interrupted{false};
  std::thread watcher([&] {
    char byte = 0;
    while (read(g_signal_pipe[0], &byte, 1) < 0 && errno == EINTR) {
    }
    if (byte == 'S') {  // 'D': the call is over
      interrupted.store(true);
      ctx.TryCancel();
    }
  });

  // The prompt is echoed once the server answers, so a rejected call prints
  // only its error.
  bool printed = false;
  auto print = [&](const std::string& text) {
    if (!printed && o.echo) std::fwrite(o.prompt.data(), 1, o.prompt.size(), stdout);
    printed = true;
    std::fwrite(text.data(), 1, text.size(), stdout);
    std::fflush(stdout);
  };
  ProgressBar bar;
  const Clock::time_point start = Clock::now();
  std::optional<Clock::time_point> first_token;
  Clock::time_point last_token;
  int64_t tokens = 0;
  std::optional<v1::GenerateFinal> summary;
  std::unique_ptr<grpc::ClientReader<v1::GenerateResponse>> reader =
      stub->Generate(&ctx, ToRequest(o));
  v1::GenerateResponse msg;
  while (reader->Read(&msg)) {
    if (msg.has_chunk()) {
      bar.Clear();
      if (msg.chunk().token_ids_size() > 0) {
        last_token = Clock::now();
        if (!first_token) first_token = last_token;
      }
      tokens += msg.chunk().token_ids_size();
      print(msg.chunk().text());
    } else if (msg.has_summary()) {
      summary = msg.summary();
    } else if (msg.has_prefill_progress()) {
      bar.Draw(msg.prefill_progress());
    }
  }
  const grpc::Status status = reader->Finish();
  const double total = Seconds(Clock::now() - start);
  const char done = 'D';
  (void)!write(g_signal_pipe[1], &done, 1);
  watcher.join();
  signal(SIGINT, SIG_DFL);
  signal(SIGTERM, SIG_DFL);
  close(g_signal_pipe[0]);
  close(g_signal_pipe[1]);
  bar.Clear();
  if (status.ok() && !printed) print("");
  if (printed) std::fputc('\n', stdout);
  std::fflush(stdout);

  if (interrupted.load() && !status.ok()) {
    std::fprintf(stderr, "kvr client: cancelled after %lld tokens (%.3f s)\n",
                 static_cast<long long>(tokens), total);
    return 130;
  }
  if (!status.ok()) {
    std::fprintf(stderr, "kvr client: %s: %s\n",
                 absl::StatusCodeToString(static_cast<absl::StatusCode>(status.error_code())).c_str(),
                 status.error_message().c_str());
    return 1;
  }
  const double ttft = first_token ? Seconds(*first_token - start) : 0.0;
  // Decode rate: tokens after the first over the time after it.
  const double decode = first_token && tokens > 1
                            ? (tokens - 1) / std::max(1e-9, Seconds(last_token - *first_token))
                            : 0.0;
  std::string line = absl::StrFormat("kvr client: %d tokens in %.3f s, TTFT %.1f ms, %.1f tok/s",
                                     tokens, total, ttft * 1e3, decode);
  if (summary) {
    absl::StrAppendFormat(&line, ", prompt %d tokens, finish %s", summary->usage().prompt_tokens(),
                          FinishName(summary->finish_reason()));
  } else {
    absl::StrAppend(&line, ", no final message");
  }
  std::fprintf(stderr, "%s\n", line.c_str());
  return 0;
}

}  // namespace kvr::client
