#include "tools/cluster.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <deque>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <optional>
#include <random>
#include <sstream>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "common/status.h"
#include "common/subprocess.h"
#include "nlohmann/json.hpp"
#include "services/infra/security/cert_authority.h"
#include "tools/cli_flags.h"
#include "tools/cluster_secure.h"

namespace kvr::cluster {
namespace {

namespace fs = std::filesystem;

int RemainingMs(absl::Time deadline) {
  const int64_t ms = absl::ToInt64Milliseconds(deadline - absl::Now());
  return ms <= 0 ? 0 : static_cast<int>(std::min<int64_t>(ms, 1 << 30));
}

std::string DescribeWaitStatus(int status) {
  if (WIFEXITED(status)) return absl::StrCat("exited with status ", WEXITSTATUS(status));
  if (WIFSIGNALED(status)) {
    return absl::StrCat("was killed by signal ", WTERMSIG(status), " (",
                        strsignal(WTERMSIG(status)), ")");
  }
  return absl::StrCat("ended with wait status ", status);
}

// The last `max_lines` lines of a log file (at most its last 8 KiB).
std::string LogTail(const std::string& path, size_t max_lines = 20) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return "(no log)";
  in.seekg(0, std::ios::end);
  const std::streamoff size = in.tellg();
  const std::streamoff from = std::max<std::streamoff>(0, size - 8192);
  in.seekg(from);
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<std::string> lines = absl::StrSplit(text, '\n');
  if (from > 0 && !lines.empty()) lines.erase(lines.begin());  // cut mid-line
  while (!lines.empty() && lines.back().empty()) lines.pop_back();
  if (lines.empty()) return "(empty log)";
  if (lines.size() > max_lines) lines.erase(lines.begin(), lines.end() - max_lines);
  return absl::StrCat("    ", absl::StrJoin(lines, "\n    "));
}

// Appends one line to a child's log (between its runs: nothing else writes
// it then). Best effort: a full disk loses the line, not the cluster.
void AppendLogLine(const std::string& path, const std::string& line) {
  std::ofstream out(path, std::ios::app);
  out << line << "\n";
}

// One supervised server: the command line it is (re)started with and its
// current run, a Subprocess whose stdout and stderr share one pipe, copied to
// its log file as it arrives; of its lines only those announcing addresses
// ("<program> ... on HOST:PORT") are kept.
struct Child {
  Child(std::string name_in, std::string program_in, std::vector<std::string> argv_in,
        std::string log_path_in, int max_restarts)
      : name(std::move(name_in)),
        program(std::move(program_in)),
        argv(std::move(argv_in)),
        log_path(std::move(log_path_in)),
        policy(max_restarts) {}

  const std::string name;     // "node-0", "worker", "gateway": log file stem, messages
  const std::string program;  // "kvr_node": the prefix of its announcement lines
  const std::vector<std::string> argv;  // every run: the same flags, ports, data dir
  const std::string log_path;
  pid_t pid = -1;  // of the current (or last) run; kept once reaped, for messages
  std::unique_ptr<Subprocess> proc;
  std::optional<int> wait_status;  // set once the current run is reaped
  absl::Time started;              // of the current run
  bool stopping = false;  // its exit is expected (we signalled it)
  bool killed = false;    // it outlived stop_timeout and got SIGKILL
  int restarts = 0;       // runs after the first
  RestartPolicy policy;
  std::optional<absl::Time> restart_at;  // dead, to be restarted then
  bool death_handled = false;  // the current run's death was logged (restart or give-up)
  bool announced = false;      // the current run's listening line was logged

  bool reaped() const { return wait_status.has_value(); }

  // The rest of the current run's announcement line starting with `prefix`,
  // or "".
  std::string Announced(std::string_view prefix) const {
    if (proc == nullptr) return {};
    for (const std::string& line : proc->lines()) {
      if (std::string_view(line).substr(0, prefix.size()) == prefix) {
        return line.substr(prefix.size());
      }
    }
    return {};
  }
  std::string Listening() const { return Announced(program + " listening on "); }

  void Signal(int sig) const {
    if (proc != nullptr && !reaped()) kill(pid, sig);
  }
};

// Starts children and multiplexes their pipes, their exits and the stop
// signals in one poll loop; single-threaded.
class Supervisor {
 public:
  Supervisor(int signal_fd, int max_restarts)
      : signal_fd_(signal_fd), max_restarts_(max_restarts) {}

  // A new child, started (its log truncated).
  absl::StatusOr<Child*> Spawn(std::string name, std::string program,
                               std::vector<std::string> argv, const std::string& log_path) {
    auto child = std::make_unique<Child>(std::move(name), std::move(program), std::move(argv),
                                         log_path, max_restarts_);
    KVR_RETURN_IF_ERROR(Launch(child.get(), /*append_log=*/false));
    children_.push_back(std::move(child));
    return children_.back().get();
  }

  // Starts a run of `c` (whose previous run, if any, was reaped) with its
  // command line; its output goes to its log, appended with `append_log`.
  // On error the previous run's state is kept.
  absl::Status Launch(Child* c, bool append_log) {
    SubprocessOptions options;
    options.merge_stderr = true;
    // Dies with the supervisor; its own process group keeps a terminal's
    // Ctrl-C away from it (the supervisor stops the children in order). The
    // supervisor blocks the stop signals and ignores SIGPIPE: not the child.
    options.own_process_group = true;
    options.default_signals = true;
    options.log_path = c->log_path;
    options.append_log = append_log;
    options.keep_line = [prefix = c->program + " "](absl::string_view line) {
      return absl::StartsWith(line, prefix) && absl::StrContains(line, " on ");
    };
    KVR_ASSIGN_OR_RETURN(std::unique_ptr<Subprocess> proc, Subprocess::Start(c->argv, options));
    if (proc->exit_fd() < 0) {
      return absl::InternalError(absl::StrCat("pidfd_open ", proc->pid(), " failed"));
    }
    c->proc = std::move(proc);
    c->pid = c->proc->pid();
    c->wait_status.reset();
    c->started = absl::Now();
    c->restart_at.reset();
    c->death_handled = false;
    c->announced = false;
    return absl::OkStatus();
  }

  enum class Wake { kDone, kSignal, kChildDied, kDeadline };

  // Copies output and reaps exits until `done()` holds, a stop signal
  // arrives (when `wake_on_signal`; otherwise it is counted and ignored),
  // children whose exit was not expected exit (TakeDeath() names each once),
  // or `deadline`.
  Wake Pump(absl::Time deadline, const std::function<bool()>& done, bool wake_on_signal = true) {
    for (;;) {
      if (done()) return Wake::kDone;
      // Checked before polling too: a child writing without pause must not
      // hold off a due restart.
      if (absl::Now() >= deadline) return Wake::kDeadline;
      std::vector<pollfd> fds;
      std::vector<std::pair<Child*, bool>> owners;  // (child, is its pidfd)
      fds.push_back({signal_fd_, POLLIN, 0});
      owners.emplace_back(nullptr, false);
      for (auto& c : children_) {
        if (c->proc == nullptr) continue;
        if (c->proc->output_fd() >= 0) {
          fds.push_back({c->proc->output_fd(), POLLIN, 0});
          owners.emplace_back(c.get(), false);
        }
        if (!c->reaped()) {
          fds.push_back({c->proc->exit_fd(), POLLIN, 0});
          owners.emplace_back(c.get(), true);
        }
      }
      const int left = RemainingMs(deadline);
      const int n = poll(fds.data(), fds.size(), left);
      if (n < 0 && errno != EINTR) return Wake::kDeadline;
      if (n <= 0) {
        if (left == 0) return Wake::kDeadline;
        continue;
      }
      bool signalled = false;
      bool died = false;
      for (size_t i = 0; i < fds.size(); ++i) {
        if (fds[i].revents == 0) continue;
        Child* c = owners[i].first;
        if (c == nullptr) {
          signalfd_siginfo info;
          if (read(signal_fd_, &info, sizeof(info)) == sizeof(info)) {
            ++signals_;
            last_signal_ = static_cast<int>(info.ssi_signo);
            signalled = true;
          }
        } else if (!owners[i].second) {
          c->proc->ReadOutput();
        } else if (!c->reaped()) {
          c->wait_status = c->proc->PollExit();
          if (c->reaped() && !c->stopping) {
            deaths_.push_back(c);
            died = true;
          }
        }
      }
      if (died) return Wake::kChildDied;
      if (signalled && wake_on_signal) return Wake::kSignal;
    }
  }

  // The oldest unexpected death not taken yet; nullptr when none.
  Child* TakeDeath() {
    if (deaths_.empty()) return nullptr;
    Child* c = deaths_.front();
    deaths_.pop_front();
    return c;
  }
  int last_signal() const { return last_signal_; }

 private:
  int signal_fd_;
  int max_restarts_;
  std::vector<std::unique_ptr<Child>> children_;
  std::deque<Child*> deaths_;
  int signals_ = 0;
  int last_signal_ = 0;
};

std::string Loopback(int port) { return absl::StrCat("127.0.0.1:", port); }

// "kvr_node" as found under `bin_dir` (directly or at its build-tree path).
absl::StatusOr<std::string> FindBinary(const std::string& override_path,
                                       const std::string& bin_dir, const std::string& name,
                                       const std::string& build_path, const std::string& flag) {
  std::error_code ec;
  if (!override_path.empty()) {
    if (access(override_path.c_str(), X_OK) != 0) {
      return absl::NotFoundError(
          absl::StrCat("--", flag, " ", override_path, " is not an executable file"));
    }
    return fs::absolute(override_path, ec).string();
  }
  std::vector<fs::path> candidates;
  if (!bin_dir.empty()) {
    candidates = {fs::path(bin_dir) / name, fs::path(bin_dir) / build_path};
  } else {
    // Next to this executable (an install prefix's bin/), or in the build
    // tree holding it (<build>/tools/kvr).
    const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
    if (!ec) {
      candidates = {exe.parent_path() / name, exe.parent_path().parent_path() / build_path};
    }
  }
  for (const fs::path& p : candidates) {
    if (access(p.c_str(), X_OK) == 0) return fs::weakly_canonical(p, ec).string();
  }
  std::vector<std::string> tried;
  for (const fs::path& p : candidates) tried.push_back(p.string());
  return absl::NotFoundError(absl::StrCat(
      "no ", name, " binary (tried ", absl::StrJoin(tried, ", "), "): build it (cmake --build ",
      "<build> --target ", name, "), or pass --bin_dir or --", flag));
}

class Cluster {
 public:
  Cluster(const ClusterOptions& options, int signal_fd)
      : options_(options), sup_(signal_fd, options.max_restarts) {}

  // Resolves binaries and the run directory, picks every port, starts every
  // child and waits for their listening lines. Cancelled when a stop signal
  // came first.
  absl::Status Start() {
    KVR_ASSIGN_OR_RETURN(const std::string node_bin,
                         FindBinary(options_.node_binary, options_.bin_dir, "kvr_node",
                                    "retrieval_node/server/kvr_node", "node_binary"));
    KVR_ASSIGN_OR_RETURN(const std::string worker_bin,
                         FindBinary(options_.worker_binary, options_.bin_dir, "kvr_worker",
                                    "gpu_worker/server/kvr_worker", "worker_binary"));
    std::string gateway_bin;
    if (options_.gateway) {
      absl::StatusOr<std::string> g =
          FindBinary(options_.gateway_binary, options_.bin_dir, "kvr_gateway",
                     "services/gateway/kvr_gateway", "gateway_binary");
      if (!g.ok()) {
        return absl::Status(g.status().code(),
                            absl::StrCat(g.status().message(), "; or run without it: --gateway=false"));
      }
      gateway_bin = *g;
    }
    KVR_ASSIGN_OR_RETURN(const int replicas, Replicas(worker_bin));
    if (options_.secure) KVR_RETURN_IF_ERROR(CheckSecureFlags(node_bin, worker_bin, gateway_bin));
    KVR_RETURN_IF_ERROR(MakeRunDir());
    info_.run_dir = run_dir_;
    info_.pid = getpid();
    info_.replicas = replicas;
    std::fprintf(stderr, "kvr cluster: run dir %s\n", run_dir_.c_str());
    std::optional<ClusterCredentials> creds;
    if (options_.secure) {
      KVR_ASSIGN_OR_RETURN(creds,
                           MakeClusterCredentials(
                               run_dir_, absl::Hours(24), options_.workers,
                               gateway::ApiKeyLimits{
                                   .max_concurrent = options_.api_key_max_concurrent,
                                   .tokens_per_minute = options_.api_key_tokens_per_minute}));
      info_.ca_cert = creds->ca_cert;
      info_.client_cert = creds->client.cert;
      info_.client_key = creds->client.key;
      info_.api_key = creds->api_key;
      std::fprintf(stderr,
                   "kvr cluster: --secure: mTLS certificates (CA kvr-ca) in %s/tls, API key "
                   "\"%s\" in %s (the key itself: cluster.json api_key)\n",
                   run_dir_.c_str(), kClusterApiKeyId, creds->api_keys_file.c_str());
    }
    // The TLS flags of a child of `role` (none without --secure).
    auto tls_flags = [&](const RoleFiles ClusterCredentials::*role) {
      return creds ? TlsFlags((*creds).*role, creds->ca_cert) : std::vector<std::string>{};
    };

    // Every port, once: 2 per node and worker (gRPC, metrics), 3 for the
    // gateway (gRPC, HTTP, metrics).
    KVR_ASSIGN_OR_RETURN(const std::vector<int> ports,
                         PickLoopbackPorts(2 * options_.nodes + 2 * options_.workers + 3));
    size_t next_port = 0;
    auto port = [&] { return Loopback(ports[next_port++]); };

    // Retrieval nodes, started together.
    std::vector<std::string> node_list;
    for (int i = 0; i < options_.nodes; ++i) {
      const std::string name = absl::StrCat("node-", i);
      const std::string data_dir = (fs::path(run_dir_) / name).string();
      std::error_code ec;
      fs::create_directories(data_dir, ec);
      if (ec) return absl::InternalError(absl::StrCat("mkdir ", data_dir, ": ", ec.message()));
      const std::string grpc = port();
      std::vector<std::string> argv = {node_bin, "--listen=" + grpc, "--metrics_listen=" + port(),
                                       "--data_dir=" + data_dir};
      for (std::string& f : tls_flags(&ClusterCredentials::node)) argv.push_back(std::move(f));
      argv.insert(argv.end(), options_.node_args.begin(), options_.node_args.end());
      KVR_ASSIGN_OR_RETURN(Child * c, Spawn(name, "kvr_node", std::move(argv)));
      nodes_.push_back(c);
      node_list.push_back(absl::StrCat(name, "=", grpc));
    }
    KVR_RETURN_IF_ERROR(WaitListening(nodes_));

    // The decode workers on those nodes (placement hashes the stable ids).
    std::vector<std::string> worker_list;
    for (int i = 0; i < options_.workers; ++i) {
      const std::string grpc = port();
      std::vector<std::string> argv = {worker_bin, "--listen=" + grpc,
                                       "--metrics_listen=" + port(),
                                       "--nodes=" + absl::StrJoin(node_list, ",")};
      if (replicas > 0) argv.push_back(absl::StrCat("--replicas=", replicas));
      if (!options_.model.empty()) argv.push_back("--model=" + options_.model);
      if (!options_.tokenizer.empty()) argv.push_back("--tokenizer=" + options_.tokenizer);
      // Its own certificate (CN kvr-worker-<i>): the nodes keep its sequences
      // under that principal, apart from the other workers'.
      if (creds) {
        for (std::string& f : TlsFlags(creds->workers[static_cast<size_t>(i)], creds->ca_cert)) {
          argv.push_back(std::move(f));
        }
      }
      // Without a gateway, clients call the worker: let the client identity in.
      if (creds && !options_.gateway) argv.push_back("--tls_allowed_peers=kvr-gateway,kvr-client");
      argv.insert(argv.end(), options_.worker_args.begin(), options_.worker_args.end());
      const std::string name = options_.workers == 1 ? "worker" : absl::StrCat("worker-", i);
      KVR_ASSIGN_OR_RETURN(Child * c, Spawn(name, "kvr_worker", std::move(argv)));
      workers_.push_back(c);
      worker_list.push_back(grpc);
    }
    KVR_RETURN_IF_ERROR(WaitListening(workers_));

    if (options_.gateway) {
      std::vector<std::string> argv = {gateway_bin, "--listen=" + port(),
                                       "--http_listen=" + port(), "--metrics_listen=" + port(),
                                       "--workers=" + absl::StrJoin(worker_list, ",")};
      if (creds) {
        for (std::string& f : tls_flags(&ClusterCredentials::gateway)) argv.push_back(std::move(f));
        // Its client-facing gRPC: server TLS with the same certificate.
        argv.push_back("--public_tls_cert_file=" + creds->gateway.cert);
        argv.push_back("--public_tls_key_file=" + creds->gateway.key);
        argv.push_back("--api_keys_file=" + creds->api_keys_file);
      }
      argv.insert(argv.end(), options_.gateway_args.begin(), options_.gateway_args.end());
      KVR_ASSIGN_OR_RETURN(gateway_, Spawn("gateway", "kvr_gateway", std::move(argv)));
      KVR_RETURN_IF_ERROR(WaitListening({gateway_}));
    }

    // The addresses as the servers announced them (the flags they were
    // given, unless --*_args overrode them); the same after every restart.
    for (Child* c : nodes_) {
      info_.nodes.push_back({c->Listening(), c->Announced("kvr_node metrics on "), c->pid, 0});
    }
    for (Child* c : workers_) {
      info_.workers.push_back({c->Listening(), c->Announced("kvr_worker metrics on "), c->pid, 0});
    }
    if (gateway_ != nullptr) {
      info_.gateway_grpc = gateway_->Listening();
      info_.gateway_http = gateway_->Announced("kvr_gateway http on ");
      info_.gateway_metrics = gateway_->Announced("kvr_gateway metrics on ");
    }
    for (Child* c : all_) c->announced = true;
    SyncInfo();
    return WriteInfo();
  }

  const ClusterInfo& info() const { return info_; }

  // Supervises until a stop signal (OK) or a child that keeps dying past
  // --max_restarts (its error): restarts the others when their delay is up.
  absl::Status Run() {
    auto newly_listening = [&] {
      for (Child* c : all_) {
        if (!c->announced && !c->Listening().empty()) return true;
      }
      return false;
    };
    for (;;) {
      absl::Time next_restart = absl::InfiniteFuture();
      for (Child* c : all_) {
        if (c->restart_at.has_value()) next_restart = std::min(next_restart, *c->restart_at);
      }
      switch (sup_.Pump(next_restart, newly_listening)) {
        case Supervisor::Wake::kSignal:
          std::fprintf(stderr, "kvr cluster: %s, stopping\n", strsignal(sup_.last_signal()));
          return absl::OkStatus();
        case Supervisor::Wake::kDone:
          for (Child* c : all_) {
            if (c->announced || c->Listening().empty()) continue;
            c->announced = true;
            std::fprintf(stderr, "kvr cluster: %s (pid %d, restart %d) listening again on %s\n",
                         c->name.c_str(), static_cast<int>(c->pid), c->restarts,
                         c->Listening().c_str());
          }
          break;
        case Supervisor::Wake::kChildDied:
          while (Child* c = sup_.TakeDeath()) {
            KVR_RETURN_IF_ERROR(OnDeath(c, DescribeWaitStatus(c->wait_status.value_or(0))));
          }
          break;
        case Supervisor::Wake::kDeadline:
          KVR_RETURN_IF_ERROR(RestartDue());
          break;
      }
    }
  }

  // Stops gateway, workers, nodes in that order. An error names every child
  // that exited non-zero, died (and was not restarted), or needed SIGKILL.
  absl::Status Stop() {
    std::vector<Child*> gateway;
    if (gateway_ != nullptr) gateway.push_back(gateway_);
    std::vector<std::string> problems;
    for (const std::vector<Child*>* group : {&gateway, &workers_, &nodes_}) StopGroup(*group);
    for (Child* c : all_) {
      if (c == reported_) continue;  // already reported as the cause
      if (c->death_handled) continue;  // died, logged, its restart was pending
      if (c->proc == nullptr) continue;  // never started
      if (!c->stopping) {
        problems.push_back(absl::StrCat(c->name, " (pid ", c->pid, ") ",
                                        DescribeWaitStatus(c->wait_status.value_or(0)),
                                        " unexpectedly; last lines of ", c->log_path, ":\n",
                                        LogTail(c->log_path)));
      } else if (c->killed) {
        problems.push_back(absl::StrCat(c->name, " (pid ", c->pid, ") did not exit within ",
                                        absl::FormatDuration(options_.stop_timeout),
                                        " of SIGTERM and was killed; last lines of ", c->log_path,
                                        ":\n", LogTail(c->log_path)));
      } else if (!WIFEXITED(c->wait_status.value_or(0)) || WEXITSTATUS(c->wait_status.value_or(0)) != 0) {
        problems.push_back(absl::StrCat(c->name, " (pid ", c->pid, ") ",
                                        DescribeWaitStatus(c->wait_status.value_or(0)),
                                        " after SIGTERM; last lines of ", c->log_path, ":\n",
                                        LogTail(c->log_path)));
      }
    }
    if (problems.empty()) return absl::OkStatus();
    return absl::InternalError(absl::StrJoin(problems, "\n"));
  }

 private:
  absl::StatusOr<Child*> Spawn(const std::string& name, const std::string& program,
                               std::vector<std::string> argv) {
    const std::string log = (fs::path(run_dir_) / (name + ".log")).string();
    KVR_ASSIGN_OR_RETURN(Child * c, sup_.Spawn(name, program, std::move(argv), log));
    all_.push_back(c);
    return c;
  }

  // The --replicas each worker gets (0: none): the option, or 2 with at
  // least 2 nodes, else 1; only when the worker binary accepts the flag.
  absl::StatusOr<int> Replicas(const std::string& worker_bin) {
    const int want = options_.replicas > 0 ? options_.replicas : std::min(options_.nodes, 2);
    if (want > options_.nodes) {
      return absl::InvalidArgumentError(absl::StrCat("--replicas ", want, " exceeds --nodes ",
                                                     options_.nodes));
    }
    KVR_ASSIGN_OR_RETURN(const bool accepted, ProgramAcceptsFlag(worker_bin, "replicas"));
    if (accepted) return want;
    if (options_.replicas > 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--replicas ", options_.replicas, ": ", worker_bin,
          " has no --replicas flag (its --helpfull does not list it); leave --replicas out"));
    }
    std::fprintf(stderr,
                 "kvr cluster: %s has no --replicas flag; its shards are not replicated\n",
                 worker_bin.c_str());
    return 0;
  }

  // --secure needs binaries that take the TLS (and, for the gateway, API
  // key) flags: FailedPrecondition naming the binary and the flag otherwise.
  absl::Status CheckSecureFlags(const std::string& node_bin, const std::string& worker_bin,
                                const std::string& gateway_bin) {
    std::vector<std::pair<const std::string*, const char*>> needed = {
        {&node_bin, "tls_cert_file"}, {&worker_bin, "tls_cert_file"}};
    if (!options_.gateway) needed.emplace_back(&worker_bin, "tls_allowed_peers");
    if (!gateway_bin.empty()) {
      for (const char* flag : {"tls_cert_file", "public_tls_cert_file", "api_keys_file"}) {
        needed.emplace_back(&gateway_bin, flag);
      }
    }
    for (const auto& [bin, flag] : needed) {
      KVR_ASSIGN_OR_RETURN(const bool accepted, ProgramAcceptsFlag(*bin, flag));
      if (!accepted) {
        return absl::FailedPreconditionError(absl::StrCat(
            "--secure: ", *bin, " has no --", flag,
            " flag (its --helpfull does not list it): build it with mTLS and API key support"));
      }
    }
    return absl::OkStatus();
  }

  // `c` died (`how`): schedules its restart, logging it on stderr and in its
  // log, or fails naming it when it is to be given up.
  absl::Status OnDeath(Child* c, const std::string& how) {
    const absl::Duration uptime = absl::Now() - c->started;
    const std::optional<absl::Duration> delay = c->policy.OnExit(uptime);
    if (!delay.has_value()) {
      reported_ = c;
      const std::string why =
          options_.max_restarts == 0
              ? std::string("--max_restarts 0: not restarted")
              : absl::StrCat("restarted ", options_.max_restarts,
                             " times in a row (--max_restarts ", options_.max_restarts,
                             "), each run shorter than ",
                             absl::FormatDuration(RestartPolicy::kResetAfter), ": giving up");
      AppendLogLine(c->log_path, absl::StrCat("kvr cluster: ", c->name, " (pid ", c->pid, ") ",
                                              how, "; ", why));
      return absl::AbortedError(absl::StrCat(c->name, " (pid ", c->pid, ") ", how,
                                             " unexpectedly; ", why, "; last lines of ",
                                             c->log_path, ":\n", LogTail(c->log_path)));
    }
    c->death_handled = true;
    c->restart_at = absl::Now() + *delay;
    const std::string line = absl::StrCat(
        "kvr cluster: ", c->name, " (pid ", c->pid, ") ", how, " after ",
        absl::FormatDuration(absl::Trunc(uptime, absl::Milliseconds(1))), " up; restart ",
        c->restarts + 1, " in ", absl::FormatDuration(*delay));
    std::fprintf(stderr, "%s\n", line.c_str());
    AppendLogLine(c->log_path, line);
    return absl::OkStatus();
  }

  // Restarts every child whose delay is up with its command line; cluster.json
  // names the new pids. A child that cannot be started counts as dying.
  absl::Status RestartDue() {
    const absl::Time now = absl::Now();
    bool restarted = false;
    for (Child* c : all_) {
      if (!c->restart_at.has_value() || *c->restart_at > now) continue;
      const pid_t old_pid = c->pid;
      AppendLogLine(c->log_path, absl::StrCat("kvr cluster: restarting ", c->name, " (restart ",
                                              c->restarts + 1, "): ", absl::StrJoin(c->argv, " ")));
      const absl::Status st = sup_.Launch(c, /*append_log=*/true);
      if (!st.ok()) {
        c->started = absl::Now();  // a run of length zero
        KVR_RETURN_IF_ERROR(OnDeath(c, absl::StrCat("could not be restarted: ", st.message())));
        continue;
      }
      ++c->restarts;
      restarted = true;
      std::fprintf(stderr, "kvr cluster: restarted %s (pid %d -> %d, restart %d), log %s\n",
                   c->name.c_str(), static_cast<int>(old_pid), static_cast<int>(c->pid),
                   c->restarts, c->log_path.c_str());
    }
    if (!restarted) return absl::OkStatus();
    SyncInfo();
    if (absl::Status st = WriteInfo(); !st.ok()) {
      std::fprintf(stderr, "kvr cluster: cluster.json not updated: %s\n",
                   std::string(st.message()).c_str());
    }
    return absl::OkStatus();
  }

  // info_'s pids and restart counts from the children.
  void SyncInfo() {
    for (size_t i = 0; i < nodes_.size(); ++i) {
      info_.nodes[i].pid = nodes_[i]->pid;
      info_.nodes[i].restarts = nodes_[i]->restarts;
    }
    for (size_t i = 0; i < workers_.size(); ++i) {
      info_.workers[i].pid = workers_[i]->pid;
      info_.workers[i].restarts = workers_[i]->restarts;
    }
    if (gateway_ != nullptr) {
      info_.gateway_pid = gateway_->pid;
      info_.gateway_restarts = gateway_->restarts;
    }
    if (!info_.workers.empty()) {
      info_.worker_grpc = info_.workers[0].grpc;
      info_.worker_metrics = info_.workers[0].metrics;
      info_.worker_pid = info_.workers[0].pid;
    }
  }

  absl::Status MakeRunDir() {
    std::error_code ec;
    if (!options_.run_dir.empty()) {
      fs::create_directories(options_.run_dir, ec);
      if (ec) {
        return absl::InvalidArgumentError(
            absl::StrCat("--run_dir ", options_.run_dir, ": ", ec.message()));
      }
      run_dir_ = fs::weakly_canonical(options_.run_dir, ec).string();
      return absl::OkStatus();
    }
    const std::string stamp =
        absl::FormatTime("%Y%m%d-%H%M%S", absl::Now(), absl::LocalTimeZone());
    for (int attempt = 1; attempt < 100; ++attempt) {
      fs::path dir = fs::path("run") / (attempt == 1 ? stamp : absl::StrCat(stamp, "-", attempt));
      fs::create_directories(dir.parent_path(), ec);
      // create_directory is false when it already exists: another cluster
      // started in the same second.
      if (fs::create_directory(dir, ec)) {
        run_dir_ = fs::weakly_canonical(dir, ec).string();
        return absl::OkStatus();
      }
      if (ec) return absl::InternalError(absl::StrCat("mkdir ", dir.string(), ": ", ec.message()));
    }
    return absl::InternalError("could not create a fresh directory under ./run");
  }

  // Waits for "<program> listening on " from each of `children`.
  absl::Status WaitListening(const std::vector<Child*>& children) {
    const absl::Time deadline = absl::Now() + options_.start_timeout;
    auto all_listening = [&] {
      for (Child* c : children) {
        if (c->Announced(c->program + " listening on ").empty()) return false;
      }
      return true;
    };
    switch (sup_.Pump(deadline, all_listening)) {
      case Supervisor::Wake::kDone:
        for (Child* c : children) {
          std::fprintf(stderr, "kvr cluster: %s (pid %d) listening on %s, log %s\n",
                       c->name.c_str(), static_cast<int>(c->pid),
                       c->Announced(c->program + " listening on ").c_str(), c->log_path.c_str());
        }
        return absl::OkStatus();
      case Supervisor::Wake::kSignal:
        return absl::CancelledError(
            absl::StrCat("stopped by ", strsignal(sup_.last_signal()), " while starting"));
      case Supervisor::Wake::kChildDied:
        return DiedError(sup_.TakeDeath());
      case Supervisor::Wake::kDeadline:
        break;
    }
    for (Child* c : children) {
      if (c->Announced(c->program + " listening on ").empty()) {
        reported_ = c;
        return absl::DeadlineExceededError(absl::StrCat(
            c->name, " (pid ", c->pid, ") printed no '", c->program, " listening on' line within ",
            absl::FormatDuration(options_.start_timeout), "; last lines of ", c->log_path, ":\n",
            LogTail(c->log_path)));
      }
    }
    return absl::OkStatus();
  }

  absl::Status DiedError(Child* c) {
    reported_ = c;
    return absl::AbortedError(absl::StrCat(c->name, " (pid ", c->pid, ") ",
                                           DescribeWaitStatus(c->wait_status.value_or(0)),
                                           " unexpectedly; last lines of ", c->log_path, ":\n",
                                           LogTail(c->log_path)));
  }

  // SIGTERM, wait up to stop_timeout, SIGKILL what is left.
  void StopGroup(const std::vector<Child*>& group) {
    std::vector<Child*> live;
    for (Child* c : group) {
      if (c->reaped()) continue;
      c->stopping = true;
      c->Signal(SIGTERM);
      live.push_back(c);
    }
    if (live.empty()) return;
    auto all_reaped = [&] {
      for (Child* c : live) {
        if (!c->reaped()) return false;
      }
      return true;
    };
    // Another child dying meanwhile is reported by Stop(); keep waiting.
    const absl::Time start = absl::Now();
    const absl::Time deadline = start + options_.stop_timeout;
    while (sup_.Pump(deadline, all_reaped, /*wake_on_signal=*/false) ==
           Supervisor::Wake::kChildDied) {
    }
    if (all_reaped()) {
      for (Child* c : live) {
        std::fprintf(stderr, "kvr cluster: %s %s (%.1f s after SIGTERM)\n", c->name.c_str(),
                     DescribeWaitStatus(c->wait_status.value_or(0)).c_str(),
                     absl::ToDoubleSeconds(absl::Now() - start));
      }
      return;
    }
    for (Child* c : live) {
      if (c->reaped()) continue;
      std::fprintf(stderr, "kvr cluster: %s (pid %d) still running %s after SIGTERM; SIGKILL\n",
                   c->name.c_str(), static_cast<int>(c->pid),
                   absl::FormatDuration(options_.stop_timeout).c_str());
      c->killed = true;
      c->Signal(SIGKILL);
    }
    const absl::Time kill_deadline = absl::Now() + absl::Seconds(10);
    while (sup_.Pump(kill_deadline, all_reaped, false) == Supervisor::Wake::kChildDied) {
    }
  }

  // cluster.json, written whole (temp file + rename) so readers never see half.
  // With --secure it holds the API key: mode 0600.
  absl::Status WriteInfo() {
    const fs::path path = fs::path(run_dir_) / "cluster.json";
    return security::WriteFileAtomically(path.string(), ClusterInfoToJson(info_) + "\n",
                                         options_.secure ? 0600 : 0644);
  }

  const ClusterOptions options_;
  Supervisor sup_;
  std::string run_dir_;
  ClusterInfo info_;
  std::vector<Child*> all_;      // every child started
  std::vector<Child*> nodes_;    // the nodes among them, in order
  std::vector<Child*> workers_;  // the workers among them, in order
  Child* gateway_ = nullptr;
  Child* reported_ = nullptr;  // the child an earlier error already described
};

}  // namespace

namespace {

// Whether `help` (an abseil --helpfull page) lists --<flag> ("  --name (...)").
bool ListsFlag(const std::string& help, std::string_view flag) {
  const std::string want = absl::StrCat("--", absl::string_view(flag.data(), flag.size()));
  for (absl::string_view line : absl::StrSplit(help, '\n')) {
    line = absl::StripLeadingAsciiWhitespace(line);
    if (!absl::StartsWith(line, want)) continue;
    const absl::string_view rest = line.substr(want.size());
    if (rest.empty() || rest[0] == ' ' || rest[0] == '=') return true;
  }
  return false;
}

}  // namespace

std::pair<int, int> EphemeralPortRange() {
  std::ifstream in("/proc/sys/net/ipv4/ip_local_port_range");
  int lo = 0, hi = 0;
  if (in >> lo >> hi && 0 < lo && lo <= hi && hi <= 65535) return {lo, hi};
  return {32768, 60999};
}

absl::StatusOr<std::vector<int>> PickLoopbackPorts(int n) {
  std::vector<int> fds, ports;
  auto close_all = [&fds] {
    for (int fd : fds) close(fd);
  };
  // Binds 127.0.0.1:`port` (0: the kernel picks); the bound port, or -1.
  auto bind_port = [&fds](int port) -> absl::StatusOr<int> {
    const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return absl::InternalError(absl::StrCat("socket: ", std::strerror(errno)));
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = htons(static_cast<uint16_t>(port));
    socklen_t len = sizeof(addr);
    if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
        getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
      close(fd);
      return -1;
    }
    fds.push_back(fd);  // held until every port is picked: all distinct
    return static_cast<int>(ntohs(addr.sin_port));
  };
  // Below the ephemeral range, from a random start.
  const auto [eph_lo, eph_hi] = EphemeralPortRange();
  const int span = eph_lo - kMinFixedPort;
  if (span >= 1000) {
    std::random_device seed;
    const int start = static_cast<int>(seed() % static_cast<unsigned>(span));
    for (int k = 0; k < span && static_cast<int>(ports.size()) < n; ++k) {
      absl::StatusOr<int> p = bind_port(kMinFixedPort + (start + k) % span);
      if (!p.ok()) {
        close_all();
        return p.status();
      }
      if (*p > 0) ports.push_back(*p);
    }
  }
  // Otherwise (or when those are taken) the kernel's choice.
  while (static_cast<int>(ports.size()) < n) {
    absl::StatusOr<int> p = bind_port(0);
    if (!p.ok() || *p <= 0) {
      close_all();
      return p.ok() ? absl::InternalError("no free port on 127.0.0.1") : p.status();
    }
    ports.push_back(*p);
  }
  close_all();
  return ports;
}

absl::StatusOr<bool> ProgramAcceptsFlag(const std::string& binary, std::string_view flag) {
  KVR_ASSIGN_OR_RETURN(std::unique_ptr<Subprocess> proc,
                       Subprocess::Start({binary, "--helpfull"}, /*merge_stderr=*/true));
  // No line starts with "\x01": this reads until the program closes stdout.
  const absl::StatusOr<std::string> none = proc->WaitForLine("\x01", absl::Seconds(30));
  if (!absl::IsFailedPrecondition(none.status())) {
    (void)proc->Stop(SIGKILL, absl::Seconds(10));
    return absl::DeadlineExceededError(
        absl::StrCat(binary, " --helpfull did not finish within 30 s"));
  }
  (void)proc->Stop(0, absl::Seconds(10));
  return ListsFlag(proc->Output(), flag);
}


std::optional<absl::Duration> RestartPolicy::OnExit(absl::Duration uptime) {
  if (uptime >= kResetAfter) {
    streak_ = 0;
    next_delay_ = kInitialDelay;
  }
  if (streak_ >= max_restarts_) return std::nullopt;
  ++streak_;
  const absl::Duration delay = next_delay_;
  next_delay_ = std::min(next_delay_ * 2, kMaxDelay);
  return delay;
}

std::string ClusterInfoToJson(const ClusterInfo& info) {
  auto processes = [](const std::vector<ClusterInfo::Process>& list) {
    nlohmann::ordered_json a = nlohmann::ordered_json::array();
    for (const ClusterInfo::Process& p : list) {
      a.push_back(
          {{"grpc", p.grpc}, {"metrics", p.metrics}, {"pid", p.pid}, {"restarts", p.restarts}});
    }
    return a;
  };
  nlohmann::ordered_json j;
  j["gateway_grpc"] = info.gateway_grpc;
  j["gateway_http"] = info.gateway_http;
  j["gateway_metrics"] = info.gateway_metrics;
  j["gateway_pid"] = info.gateway_pid;
  j["gateway_restarts"] = info.gateway_restarts;
  j["worker_grpc"] = info.worker_grpc;
  j["worker_metrics"] = info.worker_metrics;
  j["worker_pid"] = info.worker_pid;
  // A ClusterInfo with only worker_* set has that one worker.
  j["workers"] = info.workers.empty() && !info.worker_grpc.empty()
                     ? processes({{info.worker_grpc, info.worker_metrics, info.worker_pid, 0}})
                     : processes(info.workers);
  j["replicas"] = info.replicas;
  j["nodes"] = processes(info.nodes);
  j["run_dir"] = info.run_dir;
  j["pid"] = info.pid;
  if (!info.ca_cert.empty()) {
    j["ca_cert"] = info.ca_cert;
    j["client_cert"] = info.client_cert;
    j["client_key"] = info.client_key;
    j["api_key"] = info.api_key;
  }
  return j.dump(2);
}

absl::StatusOr<ClusterInfo> ParseClusterInfo(std::string_view text) {
  const nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InvalidArgumentError("cluster.json: not a JSON object");
  }
  auto str = [&](const nlohmann::json& obj, const char* key, std::string* out) -> absl::Status {
    auto it = obj.find(key);
    if (it == obj.end()) return absl::OkStatus();
    if (!it->is_string()) {
      return absl::InvalidArgumentError(absl::StrCat("cluster.json: \"", key, "\" is not a string"));
    }
    *out = it->get<std::string>();
    return absl::OkStatus();
  };
  // A non-negative integer up to 2^30 (`what` names it in the error).
  auto small_int = [&](const nlohmann::json& obj, const char* key, const char* what,
                       int* out) -> absl::Status {
    auto it = obj.find(key);
    if (it == obj.end()) return absl::OkStatus();
    if (!it->is_number_integer() || it->get<int64_t>() < 0 || it->get<int64_t>() > (1 << 30)) {
      return absl::InvalidArgumentError(
          absl::StrCat("cluster.json: \"", key, "\" is not ", what));
    }
    *out = static_cast<int>(it->get<int64_t>());
    return absl::OkStatus();
  };
  auto pid = [&](const nlohmann::json& obj, const char* key, pid_t* out) {
    return small_int(obj, key, "a process id", out);
  };
  auto count = [&](const nlohmann::json& obj, const char* key, int* out) {
    return small_int(obj, key, "a count in [0, 2^30]", out);
  };
  auto processes = [&](const char* key, std::vector<ClusterInfo::Process>* out) -> absl::Status {
    auto it = j.find(key);
    if (it == j.end()) return absl::OkStatus();
    if (!it->is_array()) {
      return absl::InvalidArgumentError(absl::StrCat("cluster.json: \"", key, "\" is not an array"));
    }
    if (it->size() > 1024) {
      return absl::InvalidArgumentError(
          absl::StrCat("cluster.json: \"", key, "\" has ", it->size(), " entries (at most 1024)"));
    }
    for (const nlohmann::json& n : *it) {
      if (!n.is_object()) {
        return absl::InvalidArgumentError(
            absl::StrCat("cluster.json: a \"", key, "\" entry is not an object"));
      }
      ClusterInfo::Process p;
      KVR_RETURN_IF_ERROR(str(n, "grpc", &p.grpc));
      KVR_RETURN_IF_ERROR(str(n, "metrics", &p.metrics));
      KVR_RETURN_IF_ERROR(pid(n, "pid", &p.pid));
      KVR_RETURN_IF_ERROR(count(n, "restarts", &p.restarts));
      out->push_back(p);
    }
    return absl::OkStatus();
  };
  ClusterInfo info;
  KVR_RETURN_IF_ERROR(str(j, "gateway_grpc", &info.gateway_grpc));
  KVR_RETURN_IF_ERROR(str(j, "gateway_http", &info.gateway_http));
  KVR_RETURN_IF_ERROR(str(j, "gateway_metrics", &info.gateway_metrics));
  KVR_RETURN_IF_ERROR(pid(j, "gateway_pid", &info.gateway_pid));
  KVR_RETURN_IF_ERROR(count(j, "gateway_restarts", &info.gateway_restarts));
  KVR_RETURN_IF_ERROR(str(j, "worker_grpc", &info.worker_grpc));
  KVR_RETURN_IF_ERROR(str(j, "worker_metrics", &info.worker_metrics));
  KVR_RETURN_IF_ERROR(pid(j, "worker_pid", &info.worker_pid));
  KVR_RETURN_IF_ERROR(processes("workers", &info.workers));
  KVR_RETURN_IF_ERROR(count(j, "replicas", &info.replicas));
  KVR_RETURN_IF_ERROR(processes("nodes", &info.nodes));
  KVR_RETURN_IF_ERROR(str(j, "run_dir", &info.run_dir));
  KVR_RETURN_IF_ERROR(pid(j, "pid", &info.pid));
  KVR_RETURN_IF_ERROR(str(j, "ca_cert", &info.ca_cert));
  KVR_RETURN_IF_ERROR(str(j, "client_cert", &info.client_cert));
  KVR_RETURN_IF_ERROR(str(j, "client_key", &info.client_key));
  KVR_RETURN_IF_ERROR(str(j, "api_key", &info.api_key));
  if (info.workers.empty() && !info.worker_grpc.empty()) {
    // The single-worker format of older `kvr cluster`s.
    info.workers.push_back({info.worker_grpc, info.worker_metrics, info.worker_pid, 0});
  }
  if (info.worker_grpc.empty()) {
    return absl::InvalidArgumentError("cluster.json: no \"worker_grpc\" address");
  }
  return info;
}

absl::StatusOr<ClusterInfo> ReadClusterInfo(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", path));
  std::stringstream ss;
  ss << in.rdbuf();
  absl::StatusOr<ClusterInfo> info = ParseClusterInfo(ss.str());
  if (!info.ok()) {
    return absl::Status(info.status().code(), absl::StrCat(path, ": ", info.status().message()));
  }
  return info;
}

absl::Status RunCluster(const ClusterOptions& options) {
  if (options.nodes < 1 || options.nodes > 64) {
    return absl::InvalidArgumentError(absl::StrCat("--nodes: ", options.nodes, " outside [1, 64]"));
  }
  if (options.workers < 1 || options.workers > 16) {
    return absl::InvalidArgumentError(
        absl::StrCat("--workers: ", options.workers, " outside [1, 16]"));
  }
  if (options.replicas < 0 || options.replicas > options.nodes) {
    return absl::InvalidArgumentError(absl::StrCat("--replicas: ", options.replicas,
                                                   " outside [1, --nodes ", options.nodes, "]"));
  }
  if (options.max_restarts < 0 || options.max_restarts > 1000) {
    return absl::InvalidArgumentError(
        absl::StrCat("--max_restarts: ", options.max_restarts, " outside [0, 1000]"));
  }
  sigset_t stop;
  sigemptyset(&stop);
  sigaddset(&stop, SIGINT);
  sigaddset(&stop, SIGTERM);
  sigprocmask(SIG_BLOCK, &stop, nullptr);
  signal(SIGPIPE, SIG_IGN);  // a closed stdout must not kill the supervisor
  const int signal_fd = signalfd(-1, &stop, SFD_CLOEXEC);
  if (signal_fd < 0) return absl::InternalError(absl::StrCat("signalfd: ", std::strerror(errno)));

  absl::Status result;
  {
    Cluster cluster(options, signal_fd);
    absl::Status started = cluster.Start();
    if (started.ok()) {
      const ClusterInfo& info = cluster.info();
      if (options.gateway) {
        std::printf("kvr cluster ready: gateway grpc %s http %s (run dir %s)\n",
                    info.gateway_grpc.c_str(), info.gateway_http.c_str(), info.run_dir.c_str());
      } else {
        std::printf("kvr cluster ready: worker grpc %s (no gateway) (run dir %s)\n",
                    info.worker_grpc.c_str(), info.run_dir.c_str());
      }
      std::fflush(stdout);
      result = cluster.Run();
    } else if (!absl::IsCancelled(started)) {
      result = started;  // a signal while starting is a normal stop
    }
    absl::Status stopped = cluster.Stop();
    if (result.ok()) {
      result = stopped;
    } else if (!stopped.ok()) {
      result = absl::Status(result.code(), absl::StrCat(result.message(), "\n", stopped.message()));
    }
    if (result.ok()) std::fprintf(stderr, "kvr cluster: stopped\n");
  }
  close(signal_fd);
  return result;
}

const char kClusterUsage[] = R"(Usage: kvr cluster [flags]

Starts a local cluster on 127.0.0.1: --nodes kvr_node retrieval nodes,
--workers kvr_workers on them and one kvr_gateway in front, each on ports
picked once at startup. Logs go to <run dir>/<name>.log (node-0.log, ...,
worker.log or worker-0.log, ..., gateway.log), the addresses, pids and restart
counts to <run dir>/cluster.json; then it prints

  kvr cluster ready: gateway grpc HOST:PORT http HOST:PORT (run dir DIR)

and runs until SIGINT (Ctrl-C) or SIGTERM, then stops the gateway, the
workers and the nodes in that order (SIGTERM, then SIGKILL after
--stop_timeout) and exits 0.

A child that dies is restarted with the same command line (same ports, same
--data_dir), like a Kubernetes controller would: after 100 ms, doubling for
each restart in a row up to 5 s; a run of 30 s or more resets the delay and
the count. Deaths and restarts are logged on stderr and appended to the
child's log; cluster.json is rewritten with the new pid. A child restarted
--max_restarts times in a row that dies again is given up: the others are
stopped, it is named with the tail of its log, and kvr cluster exits 1.

  --nodes N               retrieval nodes, [1, 64] (default 3)
  --workers N             kvr_workers on those nodes, all behind the gateway,
                          [1, 16] (default 1)
  --replicas R            copies of each shard, passed as kvr_worker
                          --replicas, [1, nodes] (default 2 with 2 or more
                          nodes, else 1); left out when that kvr_worker has
                          no --replicas flag (an explicit R is then an error)
  --max_restarts N        restarts in a row of one child before giving up,
                          [0, 1000] (default 10; 0: a dead child stops all)
  --run_dir DIR           logs, node data, cluster.json (default: a new
                          directory ./run/YYYYmmdd-HHMMSS)
  --bin_dir DIR           where kvr_node, kvr_worker and kvr_gateway are: the
                          directory holding them, or a build tree (default:
                          next to this kvr, then the build tree it is in)
  --node_binary PATH      kvr_node (overrides --bin_dir); likewise
  --worker_binary PATH    kvr_worker and
  --gateway_binary PATH   kvr_gateway
  --gateway=false         no gateway: clients use the worker's address
  --secure                mTLS on every gRPC hop and an API key at the gateway:
                          a throwaway CA (kvr-ca, 1 day) and certificates
                          for kvr-node, kvr-worker, kvr-gateway and kvr-client
                          in <run dir>/tls/ (each worker runs with its own,
                          CN kvr-worker-<i>, SAN kvr-worker: the nodes keep
                          every worker's sequences apart), the key's hash in <run
                          dir>/api_keys.json; cluster.json (mode 0600) names
                          ca_cert, client_cert, client_key and api_key (use
                          them with kvr client / kvr_loadgen --tls_ca_file
                          ... --api_key)
  --api_key_max_concurrent N     with --secure: the key's concurrent requests
  --api_key_tokens_per_minute N  and tokens per minute (0 = unlimited, the
                          default; the gateway answers 429 beyond them)
  --model PATH            kvr_worker --model (default: bundled stories260K)
  --tokenizer PATH        kvr_worker --tokenizer
  --node_args "ARGS"      extra kvr_node flags, space-separated (repeatable);
  --worker_args "ARGS"    likewise for kvr_worker (e.g. "--max_concurrent=16")
  --gateway_args "ARGS"   and kvr_gateway
  --start_timeout_seconds S  per child, to print its listening line (default 60)
  --stop_timeout_seconds S   per child, after SIGTERM, before SIGKILL (default 30)
)";

absl::Status ParseClusterFlags(const std::vector<std::string>& args, ClusterOptions* o,
                               bool* help) {
  auto list_flag = [](std::vector<std::string>* field) {
    return cli::FlagSpec{[=](std::string_view, const std::string& v) {
      for (absl::string_view a : absl::StrSplit(v, ' ', absl::SkipWhitespace())) {
        field->emplace_back(a);
      }
      return absl::OkStatus();
    }};
  };
  auto seconds_flag = [](absl::Duration* field) {
    return cli::FlagSpec{[=](std::string_view name, const std::string& v) -> absl::Status {
      double s = 0;
      KVR_RETURN_IF_ERROR(cli::ParseDouble(name, v, 0.1, 3600, &s));
      *field = absl::Seconds(s);
      return absl::OkStatus();
    }};
  };
  const cli::FlagTable flags = {
      {"nodes", cli::IntFlag(1, 64, &o->nodes)},
      {"workers", cli::IntFlag(1, 16, &o->workers)},
      {"replicas", cli::IntFlag(1, 64, &o->replicas)},
      {"max_restarts", cli::IntFlag(0, 1000, &o->max_restarts)},
      {"run_dir", cli::StringFlag(&o->run_dir)},
      {"bin_dir", cli::StringFlag(&o->bin_dir)},
      {"node_binary", cli::StringFlag(&o->node_binary)},
      {"worker_binary", cli::StringFlag(&o->worker_binary)},
      {"gateway_binary", cli::StringFlag(&o->gateway_binary)},
      {"gateway", cli::BoolFlag(&o->gateway)},
      {"secure", cli::BoolFlag(&o->secure)},
      {"api_key_max_concurrent", cli::IntFlag(0, 1000000, &o->api_key_max_concurrent)},
      {"api_key_tokens_per_minute", cli::IntFlag(0, int64_t{1} << 40, &o->api_key_tokens_per_minute)},
      {"model", cli::StringFlag(&o->model)},
      {"tokenizer", cli::StringFlag(&o->tokenizer)},
      {"node_args", list_flag(&o->node_args)},
      {"worker_args", list_flag(&o->worker_args)},
      {"gateway_args", list_flag(&o->gateway_args)},
      {"start_timeout_seconds", seconds_flag(&o->start_timeout)},
      {"stop_timeout_seconds", seconds_flag(&o->stop_timeout)},
  };
  return cli::ParseFlags(args, flags, "cluster", help);
}

}  // namespace kvr::cluster
