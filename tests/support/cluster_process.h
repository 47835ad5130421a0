// `kvr cluster` as a child process of an e2e test: started with a run dir in
// a fresh temp directory (Start; removed when the object dies) or on a given
// one (StartIn: a fresh one, or one a stopped cluster left, whose node data
// dirs are then reused), ready once it printed its ready line and its
// cluster.json was read; SIGKILLed (its children die with it) when the
// object dies. Also what a test asks of any process: alive, resident memory.
// Shared by tests/e2e/cluster_test.cc, tests/e2e/cluster_ops_test.cc and
// tests/hostile/cluster_attack_test.cc.
#pragma once

#include <signal.h>

#include <sys/types.h>

#include <cerrno>
#include <cstdint>
#include <fstream>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/subprocess.h"
#include "gtest/gtest.h"
#include "tests/support/temp_dir.h"
#include "tools/cluster.h"

namespace kvr::test_support {

// True once no process `pid` exists (it was reaped by its parent).
inline bool ProcessGone(pid_t pid) { return kill(pid, 0) != 0 && errno == ESRCH; }

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
  if (ProcessGone(pid)) return false;
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  std::getline(stat, line);
  const size_t paren = line.rfind(')');
  if (paren == std::string::npos || paren + 2 >= line.size()) return false;
  return line[paren + 2] != 'Z' && line[paren + 2] != 'X';
}

class ClusterProcess {
 public:
  // `kvr cluster --run_dir <temp> <flags>`; nullptr after recording a test
  // failure when it does not print its ready line within `timeout`. With
  // `merge_stderr` its stderr (the supervisor's log) is read too.
  static std::unique_ptr<ClusterProcess> Start(const std::string& kvr,
                                               const std::vector<std::string>& flags,
                                               bool merge_stderr,
                                               absl::Duration timeout = absl::Seconds(60)) {
    auto c = std::unique_ptr<ClusterProcess>(new ClusterProcess());
    c->dir_.emplace("kvr_cluster_test");
    if (c->dir_->path().empty()) return ADD_FAILURE() << "mkdtemp failed", nullptr;
    if (!c->Launch(kvr, c->dir_->path(), flags, merge_stderr, timeout)) return nullptr;
    return c;
  }

  // Same on `run_dir` (kept when the object dies), stderr merged.
  static std::unique_ptr<ClusterProcess> StartIn(const std::string& kvr, const std::string& run_dir,
                                                 const std::vector<std::string>& flags,
                                                 absl::Duration timeout = absl::Seconds(90)) {
    auto c = std::unique_ptr<ClusterProcess>(new ClusterProcess());
    if (!c->Launch(kvr, run_dir, flags, /*merge_stderr=*/true, timeout)) return nullptr;
    return c;
  }

  ~ClusterProcess() {
    if (proc != nullptr && proc->running()) (void)proc->Stop(SIGKILL, absl::Seconds(10));
  }

  // Re-reads cluster.json into `info`; false (a test failure) when it cannot.
  bool Reload() {
    auto read = cluster::ReadClusterInfo(run_dir + "/cluster.json");
    if (!read.ok()) return ADD_FAILURE() << read.status(), false;
    info = *read;
    return true;
  }

  // Re-reads cluster.json (every 50 ms) until `done(info)` holds: true; false
  // (no failure recorded) when `timeout` passes first.
  bool WaitForInfo(const std::function<bool(const cluster::ClusterInfo&)>& done,
                   absl::Duration timeout) {
    const absl::Time deadline = absl::Now() + timeout;
    for (;;) {
      auto read = cluster::ReadClusterInfo(run_dir + "/cluster.json");
      if (read.ok()) {
        info = *read;
        if (done(info)) return true;
      }
      if (absl::Now() >= deadline) return false;
      absl::SleepFor(absl::Milliseconds(50));
    }
  }

  // Sends `sig` and waits up to `timeout`; the supervisor's wait status, or
  // nullopt when it did not exit in time (the destructor SIGKILLs it).
  std::optional<int> Stop(int sig = SIGTERM, absl::Duration timeout = absl::Seconds(90)) {
    absl::StatusOr<int> st = proc->Stop(sig, timeout);
    if (!st.ok()) return std::nullopt;
    return *st;
  }

  // The gateway's gRPC address, else the first worker's.
  std::string target() const {
    return info.gateway_grpc.empty() ? info.worker_grpc : info.gateway_grpc;
  }

  // Every child's current pid (as of the last read of cluster.json).
  std::vector<pid_t> ChildPids() const {
    std::vector<pid_t> pids;
    if (info.gateway_pid > 0) pids.push_back(info.gateway_pid);
    for (const cluster::ClusterInfo::Process& w : info.workers) pids.push_back(w.pid);
    for (const cluster::ClusterInfo::Process& n : info.nodes) pids.push_back(n.pid);
    return pids;
  }

  std::unique_ptr<Subprocess> proc;
  std::string run_dir, ready_line;
  cluster::ClusterInfo info;

 private:
  ClusterProcess() = default;

  // Starts `kvr cluster --run_dir run_dir flags` and waits for it to be
  // ready; false after recording a test failure.
  bool Launch(const std::string& kvr, const std::string& dir, const std::vector<std::string>& flags,
              bool merge_stderr, absl::Duration timeout) {
    run_dir = dir;
    std::vector<std::string> argv = {kvr, "cluster", "--run_dir", run_dir};
    argv.insert(argv.end(), flags.begin(), flags.end());
    auto started = Subprocess::Start(argv, merge_stderr);
    if (!started.ok()) return ADD_FAILURE() << started.status(), false;
    proc = *std::move(started);
    auto ready = proc->WaitForLine("kvr cluster ready: ", timeout);
    if (!ready.ok()) {
      return ADD_FAILURE() << "kvr cluster: " << ready.status() << "\n" << proc->Output(), false;
    }
    ready_line = *ready;
    return Reload();
  }

  std::optional<TempDir> dir_;  // Start's; removed after ~ClusterProcess stopped the cluster
};

}  // namespace kvr::test_support
