// Prometheus /metrics pages in integration tests: an HTTP/1.0 GET over a
// plain socket, the text format parsed into samples keyed by series, and
// `promtool check metrics` on a page. Shared by the node and worker metrics
// tests; the gateway tests fetch their page through cpp-httplib and parse it here.
#pragma once

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <optional>
#include <sstream>
#include <string>

#include "gtest/gtest.h"

namespace kvr::test_support {

// GET http://HOST:PORT/metrics over a plain socket; the body, or a failure.
inline std::optional<std::string> HttpGetMetrics(const std::string& host_port) {
  const size_t colon = host_port.rfind(':');
  if (colon == std::string::npos) {
    ADD_FAILURE() << "bad metrics address " << host_port;
    return std::nullopt;
  }
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(std::stoi(host_port.substr(colon + 1))));
  if (inet_pton(AF_INET, host_port.substr(0, colon).c_str(), &addr.sin_addr) != 1) {
    ADD_FAILURE() << "bad metrics host " << host_port;
    return std::nullopt;
  }
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    ADD_FAILURE() << "socket: " << std::strerror(errno);
    return std::nullopt;
  }
  std::string response;
  bool ok = connect(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) == 0;
  if (!ok) ADD_FAILURE() << "connect " << host_port << ": " << std::strerror(errno);
  const std::string request =
      "GET /metrics HTTP/1.0\r\nHost: " + host_port + "\r\nConnection: close\r\n\r\n";
  if (ok && send(fd, request.data(), request.size(), MSG_NOSIGNAL) !=
                static_cast<ssize_t>(request.size())) {
    ADD_FAILURE() << "send: " << std::strerror(errno);
    ok = false;
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (ok) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    pollfd pfd{fd, POLLIN, 0};
    if (left.count() <= 0 || poll(&pfd, 1, static_cast<int>(left.count())) <= 0) {
      ADD_FAILURE() << "no complete /metrics response within 10 s";
      ok = false;
      break;
    }
    char chunk[16384];
    const ssize_t n = recv(fd, chunk, sizeof(chunk), 0);
    if (n < 0) {
      ADD_FAILURE() << "recv: " << std::strerror(errno);
      ok = false;
    }
    if (n <= 0) break;
    response.append(chunk, static_cast<size_t>(n));
  }
  close(fd);
  if (!ok) return std::nullopt;
  const size_t body = response.find("\r\n\r\n");
  if (response.rfind("HTTP/1.", 0) != 0 || response.find(" 200 ") == std::string::npos ||
      body == std::string::npos || response.find(" 200 ") > body) {
    ADD_FAILURE() << "bad /metrics response: " << response.substr(0, 200);
    return std::nullopt;
  }
  const std::string headers = response.substr(0, body);
  if (headers.find("chunked") != std::string::npos) {
    ADD_FAILURE() << "unexpected chunked response to HTTP/1.0";
    return std::nullopt;
  }
  return response.substr(body + 4);
}

// Samples of one exposition, keyed by `name{l1="v1",l2="v2"}` with labels
// sorted by name (how the helpers below spell them).
using Samples = std::map<std::string, double>;

inline std::string SeriesKey(const std::string& name,
                             std::map<std::string, std::string> labels) {
  std::string key = name;
  if (labels.empty()) return key;
  key += '{';
  bool first = true;
  for (const auto& [k, v] : labels) {
    if (!first) key += ',';
    first = false;
    key += k + "=\"" + v + "\"";
  }
  return key + '}';
}

// Parses the text format (no escapes in kvr's label values).
inline Samples ParseExposition(const std::string& text) {
  Samples out;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#') continue;
    const size_t space = line.rfind(' ');
    if (space == std::string::npos) {
      ADD_FAILURE() << "bad sample line: " << line;
      continue;
    }
    const std::string series = line.substr(0, space);
    const std::string value = line.substr(space + 1);
    std::map<std::string, std::string> labels;
    std::string name = series;
    if (const size_t open = series.find('{'); open != std::string::npos) {
      name = series.substr(0, open);
      std::string rest = series.substr(open + 1, series.size() - open - 2);
      while (!rest.empty()) {
        const size_t eq = rest.find("=\"");
        const size_t end = rest.find('"', eq + 2);
        if (eq == std::string::npos || end == std::string::npos) {
          ADD_FAILURE() << "bad labels: " << line;
          break;
        }
        labels[rest.substr(0, eq)] = rest.substr(eq + 2, end - eq - 2);
        rest.erase(0, end + 1);
        if (!rest.empty() && rest[0] == ',') rest.erase(0, 1);
      }
    }
    out[SeriesKey(name, labels)] = std::strtod(value.c_str(), nullptr);
  }
  return out;
}

inline double Get(const Samples& s, const std::string& name,
           const std::map<std::string, std::string>& labels = {}) {
  auto it = s.find(SeriesKey(name, labels));
  return it == s.end() ? 0.0 : it->second;
}

inline bool Has(const Samples& s, const std::string& name,
         const std::map<std::string, std::string>& labels = {}) {
  return s.count(SeriesKey(name, labels)) > 0;
}

// Path of `name` on $PATH, or empty.
inline std::string FindOnPath(const std::string& name) {
  const char* path = std::getenv("PATH");
  std::istringstream dirs(path != nullptr ? path : "/usr/bin:/bin");
  std::string dir;
  while (std::getline(dirs, dir, ':')) {
    const std::string candidate = (dir.empty() ? "." : dir) + "/" + name;
    if (access(candidate.c_str(), X_OK) == 0) return candidate;
  }
  return "";
}

// Runs `promtool check metrics` (from $PATH; callers skip first when
// FindOnPath("promtool") is empty) on `page`; a non-zero exit is a test
// failure showing promtool's output and the page. `name` names the temporary
// file.
inline void ExpectPromtoolAccepts(const std::string& page, const std::string& name) {
  const std::string promtool = FindOnPath("promtool");
  ASSERT_FALSE(promtool.empty()) << "promtool not found on PATH";
  const std::string file = testing::TempDir() + name + "_" + std::to_string(getpid()) + ".txt";
  {
    std::ofstream out(file);
    out << page;
  }
  const std::string command = promtool + " check metrics < " + file + " 2>&1";
  FILE* pipe = popen(command.c_str(), "r");
  ASSERT_NE(pipe, nullptr) << command;
  std::string output;
  char buffer[512];
  while (size_t n = fread(buffer, 1, sizeof(buffer), pipe)) output.append(buffer, n);
  const int status = pclose(pipe);
  std::remove(file.c_str());
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0)
      << "promtool check metrics failed:\n" << output << "\n--- page ---\n" << page;
}

}  // namespace kvr::test_support
