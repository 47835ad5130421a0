// A kvr_gateway process for tests: started on 127.0.0.1 with every port
// picked at run time (gRPC, HTTP, metrics), the printed addresses read back,
// stopped with SIGTERM.
#pragma once

#include <sys/wait.h>

#include <csignal>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/time/time.h"
#include "common/subprocess.h"
#include "gtest/gtest.h"

namespace kvr::test_support {

class GatewayProcess {
 public:
  // `binary` with `args` after the listen flags; nullptr after recording a
  // test failure when it does not start. `merge_stderr`: its stderr is read
  // too (OutputAfterExit).
  static std::unique_ptr<GatewayProcess> Start(const std::string& binary,
                                               const std::vector<std::string>& args,
                                               bool merge_stderr = false) {
    std::vector<std::string> argv = {binary, "--listen=127.0.0.1:0", "--http_listen=127.0.0.1:0",
                                     "--metrics_listen=127.0.0.1:0"};
    argv.insert(argv.end(), args.begin(), args.end());
    auto proc = Subprocess::Start(std::move(argv), merge_stderr);
    if (!proc.ok()) return ADD_FAILURE() << proc.status(), nullptr;
    auto g = std::unique_ptr<GatewayProcess>(new GatewayProcess());
    g->proc_ = *std::move(proc);
    // The gRPC line comes last; the others are already read by then.
    auto grpc = g->proc_->WaitForLine("kvr_gateway listening on ", absl::Seconds(60));
    if (!grpc.ok()) return ADD_FAILURE() << "kvr_gateway did not start: " << grpc.status(), nullptr;
    auto http = g->proc_->WaitForLine("kvr_gateway http on ", absl::ZeroDuration());
    auto metrics = g->proc_->WaitForLine("kvr_gateway metrics on ", absl::ZeroDuration());
    if (!http.ok() || !metrics.ok()) {
      return ADD_FAILURE() << "kvr_gateway printed no http / metrics line", nullptr;
    }
    g->grpc_ = *grpc;
    g->http_ = *http;
    g->metrics_ = *metrics;
    return g;
  }

  const std::string& grpc() const { return grpc_; }
  const std::string& http() const { return http_; }
  const std::string& metrics() const { return metrics_; }
  pid_t pid() const { return proc_->pid(); }
  // False once it has exited (its wait status is then in exit_status()).
  bool running() {
    if (!exit_status_.has_value()) exit_status_ = proc_->PollExit();
    return !exit_status_.has_value();
  }
  std::optional<int> exit_status() const { return exit_status_; }

  // After Stop: everything it wrote (stdout, and stderr when merged), read
  // to the end of its output.
  std::string OutputAfterExit() {
    (void)proc_->WaitForLine("\x01 (no such line: read to the end)", absl::Seconds(10));
    return proc_->Output();
  }

  // SIGTERM; true when it exited 0.
  bool Stop() {
    auto st = proc_->Stop(SIGTERM, absl::Seconds(30));
    return st.ok() && WIFEXITED(*st) && WEXITSTATUS(*st) == 0;
  }

 private:
  GatewayProcess() = default;
  std::unique_ptr<Subprocess> proc_;
  std::string grpc_, http_, metrics_;
  std::optional<int> exit_status_;
};

}  // namespace kvr::test_support
