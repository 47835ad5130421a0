#include "tools/cluster.h"

#include <poll.h>
#include <signal.h>
#include <sys/signalfd.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <optional>
#include <sstream>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "common/status.h"
#include "common/subprocess.h"
#include "nlohmann/json.hpp"
#include "tools/cli_flags.h"

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

// One supervised server process: a Subprocess whose stdout and stderr share
// one pipe, copied to its log file as it arrives; of its lines only those
// announcing addresses ("<program> ... on HOST:PORT") are kept.
struct Child {
  std::string name;     // "node-0", "worker", "gateway": log file stem, messages
  std::string program;  // "kvr_node": the prefix of its announcement lines
  std::string log_path;
  pid_t pid = -1;  // kept once reaped, for messages
  std::unique_ptr<Subprocess> proc;
  std::optional<int> wait_status;  // set once reaped
  bool stopping = false;  // its exit is expected (we signalled it)
  bool killed = false;    // it outlived stop_timeout and got SIGKILL

  bool reaped() const { return wait_status.has_value(); }

  // The rest of the announcement line starting with `prefix`, or "".
  std::string Announced(std::string_view prefix) const {
    for (const std::string& line : proc->lines()) {
      if (std::string_view(line).substr(0, prefix.size()) == prefix) {
        return line.substr(prefix.size());
      }
    }
    return {};
  }

  void Signal(int sig) const {
    if (!reaped()) kill(pid, sig);
  }
};

// Starts children and multiplexes their pipes, their exits and the stop
// signals in one poll loop; single-threaded.
class Supervisor {
 public:
  explicit Supervisor(int signal_fd) : signal_fd_(signal_fd) {}

  absl::StatusOr<Child*> Spawn(std::string name, std::string program,
                               std::vector<std::string> argv, const std::string& log_path) {
    auto child = std::make_unique<Child>();
    child->name = std::move(name);
    child->program = std::move(program);
    child->log_path = log_path;
    SubprocessOptions options;
    options.merge_stderr = true;
    // Dies with the supervisor; its own process group keeps a terminal's
    // Ctrl-C away from it (the supervisor stops the children in order). The
    // supervisor blocks the stop signals and ignores SIGPIPE: not the child.
    options.own_process_group = true;
    options.default_signals = true;
    options.log_path = log_path;
    options.keep_line = [prefix = child->program + " "](absl::string_view line) {
      return absl::StartsWith(line, prefix) && absl::StrContains(line, " on ");
    };
    KVR_ASSIGN_OR_RETURN(child->proc, Subprocess::Start(std::move(argv), options));
    child->pid = child->proc->pid();
    if (child->proc->exit_fd() < 0) {
      return absl::InternalError(absl::StrCat("pidfd_open ", child->pid, " failed"));
    }
    children_.push_back(std::move(child));
    return children_.back().get();
  }

  enum class Wake { kDone, kSignal, kChildDied, kDeadline };

  // Copies output and reaps exits until `done()` holds, a stop signal
  // arrives (when `wake_on_signal`; otherwise it is counted and ignored), a
  // child whose exit was not expected exits (died() names it), or `deadline`.
  Wake Pump(absl::Time deadline, const std::function<bool()>& done, bool wake_on_signal = true) {
    for (;;) {
      if (done()) return Wake::kDone;
      std::vector<pollfd> fds;
      std::vector<std::pair<Child*, bool>> owners;  // (child, is its pidfd)
      fds.push_back({signal_fd_, POLLIN, 0});
      owners.emplace_back(nullptr, false);
      for (auto& c : children_) {
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
      Child* died = nullptr;
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
          if (c->reaped() && !c->stopping && died == nullptr) died = c;
        }
      }
      if (died != nullptr) {
        died_ = died;
        return Wake::kChildDied;
      }
      if (signalled && wake_on_signal) return Wake::kSignal;
    }
  }

  Child* died() const { return died_; }
  int last_signal() const { return last_signal_; }

 private:
  int signal_fd_;
  std::vector<std::unique_ptr<Child>> children_;
  Child* died_ = nullptr;
  int signals_ = 0;
  int last_signal_ = 0;
};

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
      : options_(options), sup_(signal_fd) {}

  // Resolves binaries and the run directory, starts every child and waits
  // for their listening lines. Cancelled when a stop signal came first.
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
    KVR_RETURN_IF_ERROR(MakeRunDir());
    info_.run_dir = run_dir_;
    info_.pid = getpid();
    std::fprintf(stderr, "kvr cluster: run dir %s\n", run_dir_.c_str());

    // Retrieval nodes, started together.
    std::vector<Child*> nodes;
    for (int i = 0; i < options_.nodes; ++i) {
      const std::string name = absl::StrCat("node-", i);
      const std::string data_dir = (fs::path(run_dir_) / name).string();
      std::error_code ec;
      fs::create_directories(data_dir, ec);
      if (ec) return absl::InternalError(absl::StrCat("mkdir ", data_dir, ": ", ec.message()));
      std::vector<std::string> argv = {node_bin, "--listen=127.0.0.1:0",
                                       "--metrics_listen=127.0.0.1:0", "--data_dir=" + data_dir};
      argv.insert(argv.end(), options_.node_args.begin(), options_.node_args.end());
      KVR_ASSIGN_OR_RETURN(Child * c, Spawn(name, "kvr_node", std::move(argv)));
      nodes.push_back(c);
    }
    KVR_RETURN_IF_ERROR(WaitListening(nodes));
    std::vector<std::string> node_list;
    for (Child* c : nodes) {
      ClusterInfo::Node n;
      n.grpc = c->Announced("kvr_node listening on ");
      n.metrics = c->Announced("kvr_node metrics on ");
      n.pid = c->pid;
      info_.nodes.push_back(n);
      node_list.push_back(absl::StrCat(c->name, "=", n.grpc));
    }

    // The decode worker on those nodes (placement hashes the stable ids).
    {
      std::vector<std::string> argv = {worker_bin, "--listen=127.0.0.1:0",
                                       "--metrics_listen=127.0.0.1:0",
                                       "--nodes=" + absl::StrJoin(node_list, ",")};
      if (!options_.model.empty()) argv.push_back("--model=" + options_.model);
      if (!options_.tokenizer.empty()) argv.push_back("--tokenizer=" + options_.tokenizer);
      argv.insert(argv.end(), options_.worker_args.begin(), options_.worker_args.end());
      KVR_ASSIGN_OR_RETURN(worker_, Spawn("worker", "kvr_worker", std::move(argv)));
      KVR_RETURN_IF_ERROR(WaitListening({worker_}));
      info_.worker_grpc = worker_->Announced("kvr_worker listening on ");
      info_.worker_metrics = worker_->Announced("kvr_worker metrics on ");
      info_.worker_pid = worker_->pid;
    }

    if (options_.gateway) {
      std::vector<std::string> argv = {gateway_bin, "--listen=127.0.0.1:0",
                                       "--http_listen=127.0.0.1:0",
                                       "--metrics_listen=127.0.0.1:0",
                                       "--workers=" + info_.worker_grpc};
      argv.insert(argv.end(), options_.gateway_args.begin(), options_.gateway_args.end());
      KVR_ASSIGN_OR_RETURN(gateway_, Spawn("gateway", "kvr_gateway", std::move(argv)));
      KVR_RETURN_IF_ERROR(WaitListening({gateway_}));
      info_.gateway_grpc = gateway_->Announced("kvr_gateway listening on ");
      info_.gateway_http = gateway_->Announced("kvr_gateway http on ");
      info_.gateway_metrics = gateway_->Announced("kvr_gateway metrics on ");
      info_.gateway_pid = gateway_->pid;
    }
    return WriteInfo();
  }

  const ClusterInfo& info() const { return info_; }

  // Supervises until a stop signal (OK) or a child's death (its error).
  absl::Status Run() {
    switch (sup_.Pump(absl::InfiniteFuture(), [] { return false; })) {
      case Supervisor::Wake::kChildDied:
        return DiedError(sup_.died());
      default:
        std::fprintf(stderr, "kvr cluster: %s, stopping\n", strsignal(sup_.last_signal()));
        return absl::OkStatus();
    }
  }

  // Stops gateway, worker, nodes in that order. An error names every child
  // that exited non-zero, died, or needed SIGKILL.
  absl::Status Stop() {
    std::vector<Child*> gateway, worker;
    if (gateway_ != nullptr) gateway.push_back(gateway_);
    if (worker_ != nullptr) worker.push_back(worker_);
    std::vector<std::string> problems;
    for (const std::vector<Child*>* group : {&gateway, &worker, &nodes_}) StopGroup(*group);
    for (Child* c : all_) {
      if (c == reported_) continue;  // already reported as the cause
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
    if (program == "kvr_node") nodes_.push_back(c);
    return c;
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
        return DiedError(sup_.died());
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
  absl::Status WriteInfo() {
    const fs::path path = fs::path(run_dir_) / "cluster.json";
    const fs::path tmp = fs::path(run_dir_) / "cluster.json.tmp";
    {
      std::ofstream out(tmp, std::ios::trunc);
      out << ClusterInfoToJson(info_) << "\n";
      if (!out.flush()) return absl::InternalError(absl::StrCat("write ", tmp.string()));
    }
    std::error_code ec;
    fs::rename(tmp, path, ec);
    if (ec) return absl::InternalError(absl::StrCat("rename to ", path.string(), ": ", ec.message()));
    return absl::OkStatus();
  }

  const ClusterOptions options_;
  Supervisor sup_;
  std::string run_dir_;
  ClusterInfo info_;
  std::vector<Child*> all_, nodes_;  // every child started; the nodes among them
  Child* worker_ = nullptr;
  Child* gateway_ = nullptr;
  Child* reported_ = nullptr;  // the child an earlier error already described
};

}  // namespace

std::string ClusterInfoToJson(const ClusterInfo& info) {
  nlohmann::ordered_json j;
  j["gateway_grpc"] = info.gateway_grpc;
  j["gateway_http"] = info.gateway_http;
  j["gateway_metrics"] = info.gateway_metrics;
  j["gateway_pid"] = info.gateway_pid;
  j["worker_grpc"] = info.worker_grpc;
  j["worker_metrics"] = info.worker_metrics;
  j["worker_pid"] = info.worker_pid;
  j["nodes"] = nlohmann::ordered_json::array();
  for (const ClusterInfo::Node& n : info.nodes) {
    j["nodes"].push_back({{"grpc", n.grpc}, {"metrics", n.metrics}, {"pid", n.pid}});
  }
  j["run_dir"] = info.run_dir;
  j["pid"] = info.pid;
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
  auto pid = [&](const nlohmann::json& obj, const char* key, pid_t* out) -> absl::Status {
    auto it = obj.find(key);
    if (it == obj.end()) return absl::OkStatus();
    if (!it->is_number_integer() || it->get<int64_t>() < 0 || it->get<int64_t>() > (1 << 30)) {
      return absl::InvalidArgumentError(
          absl::StrCat("cluster.json: \"", key, "\" is not a process id"));
    }
    *out = static_cast<pid_t>(it->get<int64_t>());
    return absl::OkStatus();
  };
  ClusterInfo info;
  KVR_RETURN_IF_ERROR(str(j, "gateway_grpc", &info.gateway_grpc));
  KVR_RETURN_IF_ERROR(str(j, "gateway_http", &info.gateway_http));
  KVR_RETURN_IF_ERROR(str(j, "gateway_metrics", &info.gateway_metrics));
  KVR_RETURN_IF_ERROR(pid(j, "gateway_pid", &info.gateway_pid));
  KVR_RETURN_IF_ERROR(str(j, "worker_grpc", &info.worker_grpc));
  KVR_RETURN_IF_ERROR(str(j, "worker_metrics", &info.worker_metrics));
  KVR_RETURN_IF_ERROR(pid(j, "worker_pid", &info.worker_pid));
  KVR_RETURN_IF_ERROR(str(j, "run_dir", &info.run_dir));
  KVR_RETURN_IF_ERROR(pid(j, "pid", &info.pid));
  if (auto it = j.find("nodes"); it != j.end()) {
    if (!it->is_array()) return absl::InvalidArgumentError("cluster.json: \"nodes\" is not an array");
    for (const nlohmann::json& n : *it) {
      if (!n.is_object()) {
        return absl::InvalidArgumentError("cluster.json: a \"nodes\" entry is not an object");
      }
      ClusterInfo::Node node;
      KVR_RETURN_IF_ERROR(str(n, "grpc", &node.grpc));
      KVR_RETURN_IF_ERROR(str(n, "metrics", &node.metrics));
      KVR_RETURN_IF_ERROR(pid(n, "pid", &node.pid));
      info.nodes.push_back(node);
    }
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

Starts a local cluster on 127.0.0.1 (port 0 everywhere): --nodes kvr_node
retrieval nodes, one kvr_worker on them and one kvr_gateway in front. Logs go
to <run dir>/<name>.log (node-0.log, ..., worker.log, gateway.log), the
addresses and pids to <run dir>/cluster.json; then it prints

  kvr cluster ready: gateway grpc HOST:PORT http HOST:PORT (run dir DIR)

and runs until SIGINT (Ctrl-C) or SIGTERM, then stops the gateway, the worker
and the nodes in that order (SIGTERM, then SIGKILL after --stop_timeout) and
exits 0. If a child dies, the others are stopped, the dead one and the tail of
its log are printed, and it exits 1.

  --nodes N               retrieval nodes, [1, 64] (default 3)
  --run_dir DIR           logs, node data, cluster.json (default: a new
                          directory ./run/YYYYmmdd-HHMMSS)
  --bin_dir DIR           where kvr_node, kvr_worker and kvr_gateway are: the
                          directory holding them, or a build tree (default:
                          next to this kvr, then the build tree it is in)
  --node_binary PATH      kvr_node (overrides --bin_dir); likewise
  --worker_binary PATH    kvr_worker and
  --gateway_binary PATH   kvr_gateway
  --gateway=false         no gateway: clients use the worker's address
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
      {"run_dir", cli::StringFlag(&o->run_dir)},
      {"bin_dir", cli::StringFlag(&o->bin_dir)},
      {"node_binary", cli::StringFlag(&o->node_binary)},
      {"worker_binary", cli::StringFlag(&o->worker_binary)},
      {"gateway_binary", cli::StringFlag(&o->gateway_binary)},
      {"gateway", cli::BoolFlag(&o->gateway)},
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
