// common/Subprocess: the pipe, the log file and kept-line filter, the
// process group and signal set-up a supervisor asks for, the non-blocking
// PollExit, and the message of a failed exec.
#include "common/subprocess.h"

#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace kvr {
namespace {

namespace fs = std::filesystem;

// Drives `p` as a supervisor's poll loop would, until it has exited and its
// output ended; returns its wait status.
int PumpUntilExit(Subprocess& p) {
  for (int rounds = 0; rounds < 1000; ++rounds) {
    std::vector<pollfd> fds;
    if (p.output_fd() >= 0) fds.push_back({p.output_fd(), POLLIN, 0});
    if (p.exit_fd() >= 0) fds.push_back({p.exit_fd(), POLLIN, 0});
    if (fds.empty()) break;
    if (poll(fds.data(), fds.size(), 10000) <= 0) break;
    for (const pollfd& f : fds) {
      if (f.revents == 0) continue;
      if (f.fd == p.output_fd()) {
        p.ReadOutput();
      } else if (std::optional<int> status = p.PollExit(); status.has_value()) {
        EXPECT_EQ(p.output_fd(), -1) << "PollExit reads the output to its end";
        return *status;
      }
    }
  }
  ADD_FAILURE() << "the child did not exit";
  return -1;
}

std::string ReadFile(const fs::path& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

TEST(Subprocess, LogFileGetsEverythingAndOnlyKeptLinesStay) {
  const fs::path log = fs::path(testing::TempDir()) / "subprocess_test.log";
  SubprocessOptions o;
  o.merge_stderr = true;
  o.log_path = log.string();
  o.keep_line = [](absl::string_view line) { return line.substr(0, 5) == "keep "; };
  auto p = Subprocess::Start({"/bin/sh", "-c", "echo a; echo keep b; echo err >&2; printf tail"},
                             o);
  ASSERT_TRUE(p.ok()) << p.status();
  const int status = PumpUntilExit(**p);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status;
  EXPECT_EQ((*p)->lines(), std::vector<std::string>{"keep b"});
  EXPECT_EQ(ReadFile(log), "a\nkeep b\nerr\ntail");
  EXPECT_EQ((*p)->pid(), -1);
  EXPECT_FALSE((*p)->PollExit().has_value()) << "reaped once";
  EXPECT_FALSE((*p)->Stop(0, absl::Seconds(1)).ok());
}

TEST(Subprocess, PollExitReportsTheStatusWithoutBlocking) {
  auto p = Subprocess::Start({"/bin/sh", "-c", "exec sleep 60"});
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_FALSE((*p)->PollExit().has_value()) << "still running";
  kill((*p)->pid(), SIGTERM);
  const int status = PumpUntilExit(**p);
  EXPECT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGTERM) << status;
}

TEST(Subprocess, OwnProcessGroup) {
  for (bool own : {false, true}) {
    SubprocessOptions o;
    o.own_process_group = own;
    // Field 5 of /proc/PID/stat is the process group.
    auto p = Subprocess::Start({"/bin/sh", "-c", "echo pgrp $(cut -d' ' -f5 /proc/$$/stat)"}, o);
    ASSERT_TRUE(p.ok()) << p.status();
    const pid_t pid = (*p)->pid();
    auto pgrp = (*p)->WaitForLine("pgrp ", absl::Seconds(30));
    ASSERT_TRUE(pgrp.ok()) << pgrp.status();
    if (own) {
      EXPECT_EQ(*pgrp, std::to_string(pid));
    } else {
      EXPECT_EQ(*pgrp, std::to_string(getpgrp()));
    }
  }
}

TEST(Subprocess, DefaultSignalsClearsTheInheritedMask) {
  sigset_t term, old;
  sigemptyset(&term);
  sigaddset(&term, SIGTERM);
  ASSERT_EQ(sigprocmask(SIG_BLOCK, &term, &old), 0);
  for (bool defaults : {false, true}) {
    SubprocessOptions o;
    o.default_signals = defaults;
    auto p = Subprocess::Start({"/bin/grep", "SigBlk", "/proc/self/status"}, o);
    ASSERT_TRUE(p.ok()) << p.status();
    auto blocked = (*p)->WaitForLine("SigBlk:", absl::Seconds(30));
    ASSERT_TRUE(blocked.ok()) << blocked.status();
    // SIGTERM (15) is bit 14 of the mask: 0x4000.
    if (defaults) {
      EXPECT_EQ(*blocked, "\t0000000000000000");
    } else {
      EXPECT_EQ(*blocked, "\t0000000000004000");
    }
  }
  sigprocmask(SIG_SETMASK, &old, nullptr);
}

TEST(Subprocess, FailedExecSaysWhy) {
  auto p = Subprocess::Start({"/nonexistent/kvr_binary"}, /*merge_stderr=*/true);
  ASSERT_TRUE(p.ok()) << p.status();
  auto why = (*p)->WaitForLine("exec /nonexistent/kvr_binary: ", absl::Seconds(30));
  ASSERT_TRUE(why.ok()) << why.status();
  EXPECT_EQ(*why, "No such file or directory");
  auto status = (*p)->Stop(0, absl::Seconds(30));
  ASSERT_TRUE(status.ok()) << status.status();
  EXPECT_TRUE(WIFEXITED(*status) && WEXITSTATUS(*status) == 127) << *status;
}

}  // namespace
}  // namespace kvr
