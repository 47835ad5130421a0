#include "common/subprocess.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace kvr {
namespace {

int RemainingMs(absl::Time deadline) {
  const int64_t ms = absl::ToInt64Milliseconds(deadline - absl::Now());
  return ms <= 0 ? 0 : static_cast<int>(std::min<int64_t>(ms, 1 << 30));
}

}  // namespace

absl::StatusOr<std::unique_ptr<Subprocess>> Subprocess::Start(std::vector<std::string> argv_s,
                                                             bool merge_stderr) {
  if (argv_s.empty()) return absl::InvalidArgumentError("Subprocess::Start: empty argv");
  std::vector<char*> argv;
  for (std::string& a : argv_s) argv.push_back(a.data());
  argv.push_back(nullptr);
  int fds[2];
  if (pipe2(fds, O_CLOEXEC) != 0) {
    return absl::InternalError(absl::StrCat("pipe2: ", std::strerror(errno)));
  }
  const pid_t parent = getpid();
  const pid_t pid = fork();
  if (pid < 0) {
    close(fds[0]);
    close(fds[1]);
    return absl::InternalError(absl::StrCat("fork: ", std::strerror(errno)));
  }
  if (pid == 0) {
    // Child: async-signal-safe calls only.
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent) _exit(127);
    dup2(fds[1], STDOUT_FILENO);
    if (merge_stderr) dup2(fds[1], STDERR_FILENO);
    execv(argv[0], argv.data());
    _exit(127);
  }
  close(fds[1]);
  return std::unique_ptr<Subprocess>(new Subprocess(pid, fds[0]));
}

Subprocess::Subprocess(pid_t pid, int out_fd)
    : pid_(pid), out_fd_(out_fd), pidfd_(static_cast<int>(syscall(SYS_pidfd_open, pid, 0))) {}

Subprocess::~Subprocess() {
  if (pid_ > 0) {
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
  }
  if (pidfd_ >= 0) close(pidfd_);
  if (out_fd_ >= 0) close(out_fd_);
}

absl::StatusOr<std::string> Subprocess::WaitForLine(absl::string_view prefix,
                                                    absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  size_t checked = 0;
  for (;;) {
    for (; checked < lines_.size(); ++checked) {
      if (absl::string_view(lines_[checked]).substr(0, prefix.size()) == prefix) {
        return lines_[checked].substr(prefix.size());
      }
    }
    if (out_fd_ < 0) {
      return absl::FailedPreconditionError(
          absl::StrCat("process ", pid_, " closed stdout before printing '", prefix, "'"));
    }
    const int left = RemainingMs(deadline);
    if (left == 0) {
      return absl::DeadlineExceededError(absl::StrCat("process ", pid_, " printed no '", prefix,
                                                      "' line within ",
                                                      absl::FormatDuration(timeout)));
    }
    pollfd pfd{out_fd_, POLLIN, 0};
    if (poll(&pfd, 1, left) <= 0) continue;
    char chunk[512];
    const ssize_t n = read(out_fd_, chunk, sizeof(chunk));
    if (n <= 0) {
      close(out_fd_);
      out_fd_ = -1;
      continue;
    }
    partial_.append(chunk, static_cast<size_t>(n));
    for (size_t nl; (nl = partial_.find('\n')) != std::string::npos;) {
      lines_.push_back(partial_.substr(0, nl));
      partial_.erase(0, nl + 1);
    }
  }
}

std::string Subprocess::Output() const {
  std::string out;
  for (const std::string& line : lines_) absl::StrAppend(&out, line, "\n");
  return out + partial_;
}

absl::StatusOr<int> Subprocess::Stop(int sig, absl::Duration timeout) {
  if (pid_ <= 0) return absl::FailedPreconditionError("process already reaped");
  if (sig != 0) kill(pid_, sig);
  pollfd pfd{pidfd_, POLLIN, 0};
  if (poll(&pfd, 1, RemainingMs(absl::Now() + timeout)) != 1) {
    return absl::DeadlineExceededError(absl::StrCat("process ", pid_, " did not exit within ",
                                                    absl::FormatDuration(timeout)));
  }
  int status = 0;
  if (waitpid(pid_, &status, 0) != pid_) {
    return absl::InternalError(absl::StrCat("waitpid: ", std::strerror(errno)));
  }
  pid_ = -1;
  return status;
}

}  // namespace kvr
