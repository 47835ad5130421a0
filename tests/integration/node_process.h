// kvr_node child processes for integration tests: started on 127.0.0.1 with
// port 0, the bound addresses read from the lines the node prints, stopped
// by signal; a node still running when its NodeProcess dies is SIGKILLed.
// Test binaries get the node's path from --kvr_node (ParseNodeBinaryFlag).
#pragma once

#include <gtest/gtest.h>
#include <signal.h>

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

class NodeProcess {
 public:
  // Starts `kvr_node --listen=127.0.0.1:0 <args>` and waits for its
  // "kvr_node listening on" line. With `expect_failure`, a node that exits
  // first is not a test failure: exit_status() then holds its wait status.
  static std::unique_ptr<NodeProcess> Start(const std::vector<std::string>& args,
                                            bool expect_failure = false,
                                            absl::Duration timeout = absl::Seconds(60)) {
    std::vector<std::string> argv = {NodeBinary(), "--listen=127.0.0.1:0"};
    argv.insert(argv.end(), args.begin(), args.end());
    auto proc = Subprocess::Start(std::move(argv));
    if (!proc.ok()) {
      ADD_FAILURE() << proc.status();
      return nullptr;
    }
    auto node = std::unique_ptr<NodeProcess>(new NodeProcess(std::move(*proc)));
    auto address = node->proc_->WaitForLine("kvr_node listening on ", timeout);
    if (address.ok()) {
      node->address_ = *address;
      // Printed before the listening line when enabled.
      if (auto m = node->proc_->WaitForLine("kvr_node metrics on ", absl::ZeroDuration()); m.ok()) {
        node->metrics_address_ = *m;
      }
      return node;
    }
    if (!expect_failure) ADD_FAILURE() << "kvr_node did not start: " << address.status();
    if (auto st = node->proc_->Stop(0, absl::Seconds(30)); st.ok()) node->exit_status_ = *st;
    return node;
  }

  bool listening() const { return !address_.empty(); }
  const std::string& address() const { return address_; }
  // "host:port" of /metrics, empty when the node printed none.
  const std::string& metrics_address() const { return metrics_address_; }
  // Wait status of a node that exited before listening.
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

 private:
  explicit NodeProcess(std::unique_ptr<Subprocess> proc) : proc_(std::move(proc)) {}

  std::unique_ptr<Subprocess> proc_;
  std::string address_;
  std::string metrics_address_;
  std::optional<int> exit_status_;
};

}  // namespace kvr::test_support
