// `kvr cluster` as a child process of an e2e test: started with a run dir in
// a fresh temp directory, ready once it printed its ready line and its
// cluster.json was read; SIGKILLed (its children die with it) and its run dir
// removed when the object dies. Shared by tests/e2e/cluster_test.cc and
// tests/e2e/cluster_ops_test.cc.
#pragma once

#include <signal.h>

#include <cerrno>
#include <functional>
#include <memory>
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
    if (c->dir_.path().empty()) return ADD_FAILURE() << "mkdtemp failed", nullptr;
    c->run_dir = c->dir_.path();
    std::vector<std::string> argv = {kvr, "cluster", "--run_dir", c->run_dir};
    argv.insert(argv.end(), flags.begin(), flags.end());
    auto proc = Subprocess::Start(argv, merge_stderr);
    if (!proc.ok()) return ADD_FAILURE() << proc.status(), nullptr;
    c->proc = *std::move(proc);
    auto ready = c->proc->WaitForLine("kvr cluster ready: ", timeout);
    if (!ready.ok()) {
      return ADD_FAILURE() << "kvr cluster: " << ready.status() << "\n" << c->proc->Output(),
             nullptr;
    }
    c->ready_line = *ready;
    if (!c->Reload()) return nullptr;
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
  ClusterProcess() : dir_("kvr_cluster_test") {}
  TempDir dir_;  // removed after ~ClusterProcess stopped the cluster
};

}  // namespace kvr::test_support
