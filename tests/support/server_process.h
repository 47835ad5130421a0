// Server child processes for integration and e2e tests: started on 127.0.0.1
// with port 0, the bound addresses read from the lines the server prints,
// stopped by signal; one still running when its object dies is SIGKILLed.
// Test binaries get kvr_node's path from --kvr_node (ParseNodeBinaryFlag).
#pragma once

#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <thread>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "common/subprocess.h"

namespace kvr::test_support {

// The kvr_node executable under test.
inline std::string& NodeBinary() {
  static std::string path;
  return path;
}

// Reads --kvr_node PATH / --kvr_node=PATH; prints usage and returns false
// when it is missing. Call after InitGoogleTest.
inline bool ParseNodeBinaryFlag(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--kvr_node" && i + 1 < argc) {
      NodeBinary() = argv[++i];
    } else if (a.rfind("--kvr_node=", 0) == 0) {
      NodeBinary() = a.substr(11);
    }
  }
  if (NodeBinary().empty()) {
    std::fprintf(stderr, "usage: %s --kvr_node PATH [gtest flags]\n", argv[0]);
    return false;
  }
  return true;
}

// A server child process (kvr_node, kvr_worker) started with
// --listen=127.0.0.1:0; it reports its bound address on stdout as
// "<name> listening on HOST:PORT".
class ServerProcess {
 public:
  // Starts `binary --listen=127.0.0.1:0 <args>` and waits for its listening
  // line. With `expect_failure`, a server that exits first is not a test
  // failure: exit_status() then holds its wait status. Null only when the
  // process could not be started at all.
  static std::unique_ptr<ServerProcess> Start(const std::string& binary, const std::string& name,
                                              const std::vector<std::string>& args,
                                              bool expect_failure = false,
                                              absl::Duration timeout = absl::Seconds(60)) {
    auto p = std::unique_ptr<ServerProcess>(new ServerProcess());
    if (!p->Launch(binary, name, args, expect_failure, timeout)) return nullptr;
    return p;
  }
  virtual ~ServerProcess() = default;

  bool listening() const { return !address_.empty(); }
  const std::string& address() const { return address_; }
  // "host:port" of /metrics, empty when the server printed none.
  const std::string& metrics_address() const { return metrics_address_; }
  // Wait status of a server that exited before listening.
  std::optional<int> exit_status() const { return exit_status_; }
  pid_t pid() const { return proc_->pid(); }

  // Sends `sig` and waits for the exit; its wait status (nullopt on timeout,
  // after which the destructor SIGKILLs it).
  std::optional<int> Stop(int sig = SIGTERM, absl::Duration timeout = absl::Seconds(30)) {
    if (!proc_->running()) return std::nullopt;
    auto st = proc_->Stop(sig, timeout);
    if (!st.ok()) return std::nullopt;
    return *st;
  }

 protected:
  ServerProcess() = default;

  bool Launch(const std::string& binary, const std::string& name,
              const std::vector<std::string>& args, bool expect_failure, absl::Duration timeout) {
    std::vector<std::string> argv = {binary, "--listen=127.0.0.1:0"};
    argv.insert(argv.end(), args.begin(), args.end());
    auto proc = Subprocess::Start(std::move(argv));
    if (!proc.ok()) {
      ADD_FAILURE() << proc.status();
      return false;
    }
    proc_ = std::move(*proc);
    auto address = proc_->WaitForLine(name + " listening on ", timeout);
    if (address.ok()) {
      address_ = *address;
      // Printed before the listening line when enabled.
      if (auto m = proc_->WaitForLine(name + " metrics on ", absl::ZeroDuration()); m.ok()) {
        metrics_address_ = *m;
      }
      return true;
    }
    if (!expect_failure) ADD_FAILURE() << name << " did not start: " << address.status();
    if (auto st = proc_->Stop(0, absl::Seconds(30)); st.ok()) exit_status_ = *st;
    return true;
  }

 private:
  std::unique_ptr<Subprocess> proc_;
  std::string address_;
  std::string metrics_address_;
  std::optional<int> exit_status_;
};

// A kvr_node (NodeBinary()) child process.
class NodeProcess : public ServerProcess {
 public:
  static std::unique_ptr<NodeProcess> Start(const std::vector<std::string>& args,
                                            bool expect_failure = false,
                                            absl::Duration timeout = absl::Seconds(60)) {
    auto p = std::unique_ptr<NodeProcess>(new NodeProcess());
    if (!p->Launch(NodeBinary(), "kvr_node", args, expect_failure, timeout)) return nullptr;
    return p;
  }
};

// Starts kvr_node with `args` expecting it to refuse to start; a gtest
// assertion result: success when it exited with status 2 (the flag-check
// exit) before serving, a failure naming what happened otherwise.
inline ::testing::AssertionResult NodeRefusesToStart(const std::vector<std::string>& args) {
  std::string what;
  for (const std::string& a : args) what += (what.empty() ? "" : " ") + a;
  auto node = NodeProcess::Start(args, /*expect_failure=*/true);
  if (node == nullptr) return ::testing::AssertionFailure() << what << ": could not launch";
  if (!node->exit_status().has_value()) {
    return ::testing::AssertionFailure() << what << ": kvr_node started";
  }
  const int st = *node->exit_status();
  if (!WIFEXITED(st) || WEXITSTATUS(st) != 2) {
    return ::testing::AssertionFailure() << what << ": wait status " << st << ", want exit 2";
  }
  return ::testing::AssertionSuccess();
}

// SIGSTOPs `pid` and waits until every thread of it has stopped (state T in
// /proc/PID/task/*/stat): kill() returns before a group stop completes, and
// a thread still running could answer one more request. False when it did
// not stop within `timeout`.
inline bool StopProcess(pid_t pid, std::chrono::milliseconds timeout = std::chrono::seconds(5)) {
  if (kill(pid, SIGSTOP) != 0) return false;
  const std::string tasks = "/proc/" + std::to_string(pid) + "/task";
  const auto give_up = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < give_up) {
    bool all_stopped = true;
    std::error_code ec;
    for (const auto& task : std::filesystem::directory_iterator(tasks, ec)) {
      std::ifstream stat(task.path() / "stat");
      std::string line;
      std::getline(stat, line);
      const size_t paren = line.rfind(')');
      // A thread that exited meanwhile reads empty: not one that can answer.
      if (paren != std::string::npos && paren + 2 < line.size() && line[paren + 2] != 'T' &&
          line[paren + 2] != 't') {
        all_stopped = false;
        break;
      }
    }
    if (!ec && all_stopped) return true;
    std::this_thread::yield();
  }
  return false;
}

}  // namespace kvr::test_support
