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
#include <utility>

namespace kvr {
namespace {

int RemainingMs(absl::Time deadline) {
  const int64_t ms = absl::ToInt64Milliseconds(deadline - absl::Now());
  return ms <= 0 ? 0 : static_cast<int>(std::min<int64_t>(ms, 1 << 30));
}

// Bytes after the last newline kept at most while lines are filtered (a
// child printing endless output without newlines must not grow the parent).
constexpr size_t kMaxFilteredPartial = 65536;

void WriteAll(int fd, const char* data, size_t size) {
  for (size_t done = 0; done < size;) {
    const ssize_t w = write(fd, data + done, size - done);
    if (w < 0) {
      if (errno == EINTR) continue;
      return;  // a full disk loses log bytes, not the child
    }
    done += static_cast<size_t>(w);
  }
}

}  // namespace

absl::StatusOr<std::unique_ptr<Subprocess>> Subprocess::Start(std::vector<std::string> argv,
                                                             bool merge_stderr) {
  SubprocessOptions options;
  options.merge_stderr = merge_stderr;
  return Start(std::move(argv), options);
}

absl::StatusOr<std::unique_ptr<Subprocess>> Subprocess::Start(std::vector<std::string> argv_s,
                                                             const SubprocessOptions& options) {
  if (argv_s.empty()) return absl::InvalidArgumentError("Subprocess::Start: empty argv");
  std::vector<char*> argv;
  for (std::string& a : argv_s) argv.push_back(a.data());
  argv.push_back(nullptr);
  int log_fd = -1;
  if (!options.log_path.empty()) {
    const int mode = options.append_log ? O_APPEND : O_TRUNC;
    log_fd = open(options.log_path.c_str(), O_WRONLY | O_CREAT | mode | O_CLOEXEC, 0644);
    if (log_fd < 0) {
      return absl::InternalError(
          absl::StrCat("open ", options.log_path, ": ", std::strerror(errno)));
    }
  }
  int fds[2];
  if (pipe2(fds, O_CLOEXEC) != 0) {
    const int err = errno;
    if (log_fd >= 0) close(log_fd);
    return absl::InternalError(absl::StrCat("pipe2: ", std::strerror(err)));
  }
  const pid_t parent = getpid();
  const pid_t pid = fork();
  if (pid < 0) {
    const int err = errno;
    close(fds[0]);
    close(fds[1]);
    if (log_fd >= 0) close(log_fd);
    return absl::InternalError(absl::StrCat("fork: ", std::strerror(err)));
  }
  if (pid == 0) {
    // Child: async-signal-safe calls only.
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent) _exit(127);
    if (options.own_process_group) setpgid(0, 0);
    dup2(fds[1], STDOUT_FILENO);
    if (options.merge_stderr) dup2(fds[1], STDERR_FILENO);
    if (options.default_signals) {
      sigset_t none;
      sigemptyset(&none);
      sigprocmask(SIG_SETMASK, &none, nullptr);
      signal(SIGPIPE, SIG_DFL);
    }
    execv(argv[0], argv.data());
    const char* err = strerror(errno);
    const char prefix[] = "exec ";
    (void)!write(STDERR_FILENO, prefix, sizeof(prefix) - 1);
    (void)!write(STDERR_FILENO, argv[0], strlen(argv[0]));
    (void)!write(STDERR_FILENO, ": ", 2);
    (void)!write(STDERR_FILENO, err, strlen(err));
    (void)!write(STDERR_FILENO, "\n", 1);
    _exit(127);
  }
  close(fds[1]);
  return std::unique_ptr<Subprocess>(new Subprocess(pid, fds[0], log_fd, options.keep_line));
}

Subprocess::Subprocess(pid_t pid, int out_fd, int log_fd,
                       std::function<bool(absl::string_view)> keep_line)
    : pid_(pid),
      out_fd_(out_fd),
      pidfd_(static_cast<int>(syscall(SYS_pidfd_open, pid, 0))),
      log_fd_(log_fd),
      keep_line_(std::move(keep_line)) {}

Subprocess::~Subprocess() {
  if (pid_ > 0) {
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
  }
  for (int fd : {pidfd_, out_fd_, log_fd_}) {
    if (fd >= 0) close(fd);
  }
}

bool Subprocess::ReadOutput() {
  if (out_fd_ < 0) return false;
  char chunk[16384];
  const ssize_t n = read(out_fd_, chunk, sizeof(chunk));
  if (n <= 0) {
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) return true;
    close(out_fd_);
    out_fd_ = -1;
    return false;
  }
  if (log_fd_ >= 0) WriteAll(log_fd_, chunk, static_cast<size_t>(n));
  partial_.append(chunk, static_cast<size_t>(n));
  for (size_t nl; (nl = partial_.find('\n')) != std::string::npos;) {
    if (!keep_line_ || keep_line_(absl::string_view(partial_).substr(0, nl))) {
      lines_.push_back(partial_.substr(0, nl));
    }
    partial_.erase(0, nl + 1);
  }
  if (keep_line_ && partial_.size() > kMaxFilteredPartial) partial_.clear();
  return true;
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
    ReadOutput();
  }
}

std::string Subprocess::Output() const {
  std::string out;
  for (const std::string& line : lines_) absl::StrAppend(&out, line, "\n");
  return out + partial_;
}

std::optional<int> Subprocess::PollExit() {
  if (pid_ <= 0) return std::nullopt;
  int status = 0;
  if (waitpid(pid_, &status, WNOHANG) != pid_) return std::nullopt;
  pid_ = -1;
  while (out_fd_ >= 0) {
    pollfd p{out_fd_, POLLIN, 0};
    // Its writers are gone: the pipe ends within what it already holds.
    if (poll(&p, 1, 1000) <= 0 || !ReadOutput()) break;
  }
  return status;
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
