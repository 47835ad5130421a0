// tools/cluster: the crash-loop backoff of `kvr cluster` (RestartPolicy: the
// delays, their cap, the reset after a long run, the give-up after
// max_restarts in a row) and ProgramAcceptsFlag (how it learns whether
// kvr_worker takes --replicas), on small shell scripts standing in for the
// worker's --helpfull page; PickLoopbackPorts (the fixed ports children get).
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <fstream>
#include <optional>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "tests/support/temp_dir.h"
#include "tools/cluster.h"

namespace kvr::cluster {
namespace {

using absl::Milliseconds;
using absl::Seconds;

TEST(RestartPolicyTest, DoublesFrom100msCappedAt5sThenGivesUp) {
  RestartPolicy policy(10);
  const std::vector<absl::Duration> want = {
      Milliseconds(100), Milliseconds(200), Milliseconds(400), Milliseconds(800),
      Milliseconds(1600), Milliseconds(3200), Seconds(5), Seconds(5), Seconds(5), Seconds(5)};
  for (size_t i = 0; i < want.size(); ++i) {
    const std::optional<absl::Duration> d = policy.OnExit(Seconds(1));
    ASSERT_TRUE(d.has_value()) << "restart " << i + 1;
    EXPECT_EQ(*d, want[i]) << "restart " << i + 1;
    EXPECT_EQ(policy.streak(), static_cast<int>(i) + 1);
  }
  // The 11th death in a row (each run < 30 s) is given up, and stays so.
  EXPECT_FALSE(policy.OnExit(Seconds(29)).has_value());
  EXPECT_FALSE(policy.OnExit(Milliseconds(1)).has_value());
  EXPECT_EQ(policy.streak(), 10);
}

TEST(RestartPolicyTest, ARunOf30sResetsDelayAndCount) {
  RestartPolicy policy(3);
  EXPECT_EQ(policy.OnExit(Seconds(1)), Milliseconds(100));
  EXPECT_EQ(policy.OnExit(Seconds(1)), Milliseconds(200));
  EXPECT_EQ(policy.OnExit(Seconds(1)), Milliseconds(400));
  // 29.999 s is still a short run: the streak of 3 is used up.
  EXPECT_FALSE(policy.OnExit(Seconds(30) - Milliseconds(1)).has_value());
  RestartPolicy again(3);
  EXPECT_EQ(again.OnExit(Seconds(1)), Milliseconds(100));
  EXPECT_EQ(again.OnExit(Seconds(1)), Milliseconds(200));
  EXPECT_EQ(again.OnExit(RestartPolicy::kResetAfter), Milliseconds(100));  // reset
  EXPECT_EQ(again.streak(), 1);
  EXPECT_EQ(again.OnExit(Seconds(1)), Milliseconds(200));
}

TEST(RestartPolicyTest, ZeroMaxRestartsNeverRestarts) {
  RestartPolicy policy(0);
  EXPECT_FALSE(policy.OnExit(Seconds(1)).has_value());
  EXPECT_FALSE(policy.OnExit(Seconds(3600)).has_value());
}

// An executable shell script printing `help` (as `prog --helpfull` would).
std::string HelpScript(const std::string& dir, const std::string& name, const std::string& help) {
  const std::string path = dir + "/" + name;
  std::ofstream(path) << "#!/bin/sh\ncat <<'HELP'\n" << help << "\nHELP\n";
  chmod(path.c_str(), 0755);
  return path;
}

TEST(ProgramAcceptsFlagTest, MatchesWholeFlagNamesOfTheHelpPage) {
  test_support::TempDir dir("kvr_cluster_flags");
  ASSERT_FALSE(dir.path().empty());
  const std::string with = HelpScript(dir.path(), "with",
                                      "kvr_worker: decode worker.\n"
                                      "  Flags from gpu_worker/server/main.cc:\n"
                                      "    --nodes (kvr_node retrieval nodes); default: \"\";\n"
                                      "    --replicas (copies of each shard); default: 2;\n");
  const std::string without =
      HelpScript(dir.path(), "without",
                 "  Flags from gpu_worker/server/main.cc:\n"
                 "    --replicas_per_node (something else); default: 1;\n"
                 "    --nodes (kvr_node retrieval nodes; see --replicas); default: \"\";\n");
  auto yes = ProgramAcceptsFlag(with, "replicas");
  ASSERT_TRUE(yes.ok()) << yes.status();
  EXPECT_TRUE(*yes);
  auto nodes = ProgramAcceptsFlag(with, "nodes");
  ASSERT_TRUE(nodes.ok()) << nodes.status();
  EXPECT_TRUE(*nodes);
  auto prefix = ProgramAcceptsFlag(with, "replica");
  ASSERT_TRUE(prefix.ok()) << prefix.status();
  EXPECT_FALSE(*prefix) << "a prefix of a flag is not the flag";
  // Only a longer flag, and a mention inside another flag's text.
  auto no = ProgramAcceptsFlag(without, "replicas");
  ASSERT_TRUE(no.ok()) << no.status();
  EXPECT_FALSE(*no);
}

TEST(PickLoopbackPortsTest, DistinctBindableAndBelowTheEphemeralRange) {
  const auto [first_ephemeral, last_ephemeral] = EphemeralPortRange();
  ASSERT_LE(first_ephemeral, last_ephemeral);
  auto ports = PickLoopbackPorts(24);
  ASSERT_TRUE(ports.ok()) << ports.status();
  ASSERT_EQ(ports->size(), 24u);
  std::vector<int> sorted = *ports;
  std::sort(sorted.begin(), sorted.end());
  EXPECT_EQ(std::adjacent_find(sorted.begin(), sorted.end()), sorted.end()) << "duplicates";
  for (int port : *ports) {
    EXPECT_GT(port, 0);
    EXPECT_LE(port, 65535);
    if (first_ephemeral - kMinFixedPort >= 1000) {
      EXPECT_GE(port, kMinFixedPort);
      EXPECT_LT(port, first_ephemeral) << "outside the kernel's ephemeral range";
    }
  }
  // Released again: each can be bound (and listened on) now.
  for (int port : *ports) {
    const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    ASSERT_GE(fd, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = htons(static_cast<uint16_t>(port));
    EXPECT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0) << port;
    close(fd);
  }
}

}  // namespace
}  // namespace kvr::cluster
