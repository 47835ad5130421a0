// A child process whose stdout the parent reads line by line: how tests,
// benchmarks and the local-cluster tooling start kvr servers and learn the
// ports they bound ("kvr_node listening on 127.0.0.1:PORT").
//
// The child dies with the parent (PR_SET_PDEATHSIG), so a crashed test leaves
// nothing running; the destructor SIGKILLs and reaps a child still alive.
// A supervisor driving several children from its own poll loop (`kvr
// cluster`) polls output_fd() and exit_fd() and calls ReadOutput() and
// PollExit(); everyone else uses the blocking WaitForLine() and Stop().
// Not thread-safe: one owner drives a Subprocess.
#pragma once

#include <sys/types.h>

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "common/status.h"

namespace kvr {

struct SubprocessOptions {
  // stdout is piped to the parent; stderr too when set, inherited otherwise.
  bool merge_stderr = false;
  // The child leads a process group of its own, so a terminal's Ctrl-C (sent
  // to the foreground group) reaches only the parent, which stops it.
  bool own_process_group = false;
  // The child starts with no blocked signals and SIGPIPE at its default
  // (exec keeps the mask and ignored signals: a parent that blocks SIGTERM
  // or ignores SIGPIPE must not pass that on to a server).
  bool default_signals = false;
  // When set: everything read from the pipe is also written to this file
  // (created or truncated at Start). A full disk loses log bytes, not the
  // child.
  std::string log_path;
  // With log_path: append to an existing file instead of truncating it (a
  // supervisor restarting a child keeps the earlier runs' output).
  bool append_log = false;
  // When set: only the complete lines it accepts are kept (WaitForLine,
  // Output, lines()); the others are dropped once read (they are in the log),
  // so a long-running chatty child does not grow the parent.
  std::function<bool(absl::string_view line)> keep_line;
};

class Subprocess {
 public:
  // Starts argv[0] (a path) with the given arguments. A child that cannot
  // exec writes "exec <path>: <error>" to its stderr and exits 127.
  static absl::StatusOr<std::unique_ptr<Subprocess>> Start(std::vector<std::string> argv,
                                                           const SubprocessOptions& options);
  // Start with merge_stderr alone.
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

  // For a caller's own poll loop. output_fd() turns readable when output
  // arrives or at EOF (-1 once EOF was read); exit_fd() turns readable once
  // the child has exited (-1 once reaped).
  int output_fd() const { return out_fd_; }
  int exit_fd() const { return pid_ > 0 ? pidfd_ : -1; }
  // One read of what the pipe holds (call when output_fd() is readable;
  // it blocks otherwise): copied to the log, split into lines. Returns false
  // at EOF (the pipe is then closed).
  bool ReadOutput();
  // Never blocks: once the child has exited, reaps it, reads the rest of its
  // output (what its pipe still holds) and returns its wait status; nullopt
  // while it runs, and after it was reaped.
  std::optional<int> PollExit();

  // Everything kept from the pipe so far, newlines included.
  std::string Output() const;
  // The complete lines kept so far.
  const std::vector<std::string>& lines() const { return lines_; }

  // The child's pid; -1 once it has been reaped (by Stop or PollExit).
  pid_t pid() const { return pid_; }
  bool running() const { return pid_ > 0; }

 private:
  Subprocess(pid_t pid, int out_fd, int log_fd, std::function<bool(absl::string_view)> keep_line);

  pid_t pid_;
  int out_fd_;
  int pidfd_;
  int log_fd_;                                              // -1: no log
  const std::function<bool(absl::string_view)> keep_line_;  // empty: keep all
  std::string partial_;             // bytes after the last newline
  std::vector<std::string> lines_;  // complete lines kept so far
};

}  // namespace kvr
