// A `kvr cluster` child process for e2e tests: started on a given run
// directory (a fresh one, or one a stopped cluster left, whose node data
// dirs are then reused), ready once it printed its ready line and its
// cluster.json was read; stopped by signal. One still running when the
// object dies is SIGKILLed (its children die with it: PR_SET_PDEATHSIG).
// Also what a test asks of any process: alive, resident memory.
#pragma once

#include <signal.h>
#include <sys/types.h>

#include <cerrno>
#include <cstdint>
#include <fstream>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/time/time.h"
#include "common/subprocess.h"
#include "gtest/gtest.h"
#include "tools/cluster.h"

namespace kvr::test_support {

// Resident set of `pid` in bytes (VmRSS of /proc/PID/status), or -1 when the
// process is gone.
inline int64_t RssBytes(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("VmRSS:", 0) == 0) return std::stoll(line.substr(6)) * 1024;
  }
  return -1;
}

// True while `pid` exists and is not a zombie (state Z/X in /proc/PID/stat).
inline bool ProcessAlive(pid_t pid) {
  if (kill(pid, 0) != 0 && errno == ESRCH) return false;
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  std::getline(stat, line);
  const size_t paren = line.rfind(')');
  if (paren == std::string::npos || paren + 2 >= line.size()) return false;
  return line[paren + 2] != 'Z' && line[paren + 2] != 'X';
}

class ClusterProcess {
 public:
  // Starts `kvr cluster --run_dir run_dir <args>` (`kvr` is the CLI's path)
  // and waits up to `timeout` for "kvr cluster ready: " and cluster.json.
  // nullptr after recording a test failure (with the cluster's output) when
  // it does not get ready.
  static std::unique_ptr<ClusterProcess> Start(const std::string& kvr, const std::string& run_dir,
                                               const std::vector<std::string>& args,
                                               absl::Duration timeout = absl::Seconds(90)) {
    std::vector<std::string> argv = {kvr, "cluster", "--run_dir", run_dir};
    argv.insert(argv.end(), args.begin(), args.end());
    auto proc = Subprocess::Start(std::move(argv), /*merge_stderr=*/true);
    if (!proc.ok()) return ADD_FAILURE() << proc.status(), nullptr;
    auto c = std::unique_ptr<ClusterProcess>(new ClusterProcess());
    c->proc_ = *std::move(proc);
    auto ready = c->proc_->WaitForLine("kvr cluster ready: ", timeout);
    if (!ready.ok()) {
      return ADD_FAILURE() << "kvr cluster: " << ready.status() << "\n"
                           << c->proc_->Output(),
             nullptr;
    }
    auto info = cluster::ReadClusterInfo(run_dir + "/cluster.json");
    if (!info.ok()) return ADD_FAILURE() << info.status(), nullptr;
    c->info_ = *std::move(info);
    return c;
  }

  ~ClusterProcess() {
    if (proc_ != nullptr && proc_->running()) (void)proc_->Stop(SIGKILL, absl::Seconds(10));
  }
  ClusterProcess(const ClusterProcess&) = delete;
  ClusterProcess& operator=(const ClusterProcess&) = delete;

  const cluster::ClusterInfo& info() const { return info_; }
  pid_t pid() const { return proc_->pid(); }
  bool running() const { return proc_->running(); }
  // What the supervisor printed (stdout and stderr) so far.
  std::string Output() const { return proc_->Output(); }

  // Every server it started: the worker, the gateway (when there is one) and
  // the nodes, in that order.
  std::vector<pid_t> ChildPids() const {
    std::vector<pid_t> pids = {info_.worker_pid};
    if (info_.gateway_pid > 0) pids.push_back(info_.gateway_pid);
    for (const cluster::ClusterInfo::Node& n : info_.nodes) pids.push_back(n.pid);
    return pids;
  }

  // Sends `sig` and waits up to `timeout`; the supervisor's wait status, or
  // nullopt when it did not exit in time (the destructor SIGKILLs it).
  std::optional<int> Stop(int sig = SIGTERM, absl::Duration timeout = absl::Seconds(90)) {
    absl::StatusOr<int> st = proc_->Stop(sig, timeout);
    if (!st.ok()) return std::nullopt;
    return *st;
  }

 private:
  ClusterProcess() = default;
  std::unique_ptr<Subprocess> proc_;
  cluster::ClusterInfo info_;
};

}  // namespace kvr::test_support
