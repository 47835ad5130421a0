// A child process whose stdout the parent reads line by line: how tests,
// benchmarks and the local-cluster tooling start kvr servers and learn the
// ports they bound ("kvr_node listening on 127.0.0.1:PORT").
//
// The child dies with the parent (PR_SET_PDEATHSIG), so a crashed test leaves
// nothing running; the destructor SIGKILLs and reaps a child still alive.
// Not thread-safe: one owner drives a Subprocess.
#pragma once

#include <sys/types.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "common/status.h"

namespace kvr {

class Subprocess {
 public:
  // Starts argv[0] (a path) with the given arguments; stdout (and stderr
  // too when `merge_stderr`) is piped to the parent, stderr otherwise inherited.
  static absl::StatusOr<std::unique_ptr<Subprocess>> Start(std::vector<std::string> argv,
                                                           bool merge_stderr = false);
  ~Subprocess();
  Subprocess(const Subprocess&) = delete;
  Subprocess& operator=(const Subprocess&) = delete;

  // Returns the rest of the first stdout line that starts with `prefix`
  // (earlier lines are kept, so several prefixes can be waited for in any
  // order). DeadlineExceeded after `timeout`; FailedPrecondition when stdout
  // closes first (the child exited).
  absl::StatusOr<std::string> WaitForLine(absl::string_view prefix, absl::Duration timeout);

  // Sends `sig` (0: none) and waits up to `timeout` for the child to exit;
  // returns its wait status (see waitpid). DeadlineExceeded on timeout.
  absl::StatusOr<int> Stop(int sig, absl::Duration timeout);

  // Everything read from the pipe so far, newlines included.
  std::string Output() const;

  pid_t pid() const { return pid_; }
  bool running() const { return pid_ > 0; }

 private:
  Subprocess(pid_t pid, int out_fd);

  pid_t pid_;
  int out_fd_;
  int pidfd_;
  std::string partial_;             // bytes after the last newline
  std::vector<std::string> lines_;  // complete lines read so far
};

}  // namespace kvr
