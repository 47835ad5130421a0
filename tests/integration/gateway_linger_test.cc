// The gateway's refusals reach a client that is still sending (session 27,
// a CI flake of cluster_attack_test): a real kvr_gateway (no worker is
// needed: every case is refused before routing) gets requests it refuses
// while the client keeps sending kBodyBytes, more than the loopback socket
// buffers hold. Each case asserts the exact status line, that the client's
// whole send went through (the gateway read and discarded the rest instead
// of resetting the connection), and that the connection then ended with a
// FIN (recv 0), not ECONNRESET: the lingering close of
// services/gateway/http_server.h. The lying Content-Length is answered 413
// at its head, well inside --http_read_timeout_seconds (30 s here; the
// gateway used to read the declared body until the client fell silent for
// that long, and a client waiting exactly that long raced the answer).
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <thread>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "tests/support/gateway_process.h"

namespace kvr {
namespace {

using Clock = std::chrono::steady_clock;

constexpr size_t kBodyBytes = size_t{16} << 20;  // > the socket buffers on both ends
constexpr int kRepeats = 3;                       // per case
constexpr int kReadTimeoutSeconds = 30;           // the gateway's --http_read_timeout_seconds
constexpr auto kAnswerWithin = std::chrono::seconds(10);  // < kReadTimeoutSeconds

// A connected TCP socket to "IPV4:PORT" that closes itself; fd() < 0 when
// the connection failed.
class Connection {
 public:
  explicit Connection(const std::string& address) {
    const size_t colon = address.rfind(':');
    int port = 0;
    if (colon == std::string::npos || !absl::SimpleAtoi(address.substr(colon + 1), &port)) return;
    sockaddr_in sa{};
    sa.sin_family = AF_INET;
    sa.sin_port = htons(static_cast<uint16_t>(port));
    if (inet_pton(AF_INET, address.substr(0, colon).c_str(), &sa.sin_addr) != 1) return;
    fd_ = socket(AF_INET, SOCK_STREAM, 0);
    if (fd_ >= 0 && connect(fd_, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) != 0) {
      close(fd_);
      fd_ = -1;
    }
  }
  ~Connection() {
    if (fd_ >= 0) close(fd_);
  }
  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;
  int fd() const { return fd_; }

 private:
  int fd_ = -1;
};

// What one refused request saw.
struct Outcome {
  std::string status_line;  // up to "\r\n", empty if none came in time
  bool sent_all = false;    // every byte of the request went out
  int send_errno = 0;       // why not
  bool ended_with_fin = false;  // after the answer, recv returned 0
  int end_errno = 0;            // recv's error instead (ECONNRESET: a reset)
  double answer_seconds = -1;   // first byte of the answer, from the start
};

// Sends `head` then `body` from a second thread while this one reads the
// answer: the status line (within kAnswerWithin), then to the end of the
// connection (within kAnswerWithin too).
Outcome Refused(const std::string& address, const std::string& head, const std::string& body) {
  Outcome out;
  Connection c(address);
  EXPECT_GE(c.fd(), 0) << "cannot connect to " << address;
  if (c.fd() < 0) return out;
  const auto start = Clock::now();
  std::atomic<bool> sender_done{false};
  std::thread sender([&] {
    absl::Cleanup mark_done = [&] { sender_done.store(true); };
    for (const std::string* part : {&head, &body}) {
      size_t done = 0;
      while (done < part->size()) {
        const ssize_t n =
            send(c.fd(), part->data() + done, part->size() - done, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) {
          out.send_errno = errno;
          return;
        }
        done += static_cast<size_t>(n);
      }
    }
    out.sent_all = true;
  });
  std::string got;
  bool ended = false;
  const auto give_up = start + 2 * kAnswerWithin;
  char buf[4096];
  while (!ended && Clock::now() < give_up) {
    const auto left =
        std::chrono::duration_cast<std::chrono::milliseconds>(give_up - Clock::now()).count();
    pollfd p{c.fd(), POLLIN, 0};
    if (poll(&p, 1, static_cast<int>(std::max<long long>(1, left))) <= 0) continue;
    const ssize_t n = recv(c.fd(), buf, sizeof(buf), 0);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      out.end_errno = errno;
      ended = true;
    } else if (n == 0) {
      out.ended_with_fin = true;
      ended = true;
    } else {
      if (got.empty()) {
        out.answer_seconds = std::chrono::duration<double>(Clock::now() - start).count();
      }
      got.append(buf, static_cast<size_t>(n));
    }
  }
  // The sender finishes (the gateway drains what it did not read), or is
  // freed by the shutdown at the deadline.
  while (!sender_done.load() && Clock::now() < give_up) std::this_thread::yield();
  shutdown(c.fd(), SHUT_RDWR);
  sender.join();
  const size_t eol = got.find("\r\n");
  if (eol != std::string::npos) out.status_line = got.substr(0, eol);
  return out;
}

class GatewayLingerTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { signal(SIGPIPE, SIG_IGN); }

  void SetUp() override {
    const char* bin = std::getenv("KVR_GATEWAY_BIN");
    ASSERT_NE(bin, nullptr) << "KVR_GATEWAY_BIN is not set";
    // No worker listens at port 1: the refusals come before any routing.
    gateway_ = test_support::GatewayProcess::Start(
        bin, {"--workers=127.0.0.1:1", "--health_check_seconds=1000",
              absl::StrCat("--http_read_timeout_seconds=", kReadTimeoutSeconds)});
    ASSERT_NE(gateway_, nullptr);
  }

  void TearDown() override {
    if (gateway_ != nullptr) {
      EXPECT_TRUE(gateway_->Stop()) << "kvr_gateway did not exit 0";
    }
  }

  // Runs the case kRepeats times, each on a fresh connection.
  void ExpectRefused(const std::string& head, const std::string& body,
                     const std::string& want_status) {
    for (int i = 0; i < kRepeats; ++i) {
      SCOPED_TRACE(absl::StrCat("try ", i + 1, " of ", kRepeats));
      const Outcome o = Refused(gateway_->http(), head, body);
      EXPECT_EQ(o.status_line, want_status);
      EXPECT_GE(o.answer_seconds, 0.0);
      EXPECT_LT(o.answer_seconds, std::chrono::duration<double>(kAnswerWithin).count());
      EXPECT_TRUE(o.sent_all) << "the request's send failed: " << std::strerror(o.send_errno)
                              << " (the gateway reset the connection)";
      EXPECT_TRUE(o.ended_with_fin)
          << "the connection did not end with a FIN: "
          << (o.end_errno != 0 ? std::strerror(o.end_errno) : "no end seen");
    }
  }

  std::unique_ptr<test_support::GatewayProcess> gateway_;
};

// Content-Length far over --max_request_bytes (4 MiB), the body still
// coming: 413 at the head, the rest read and discarded.
TEST_F(GatewayLingerTest, LyingContentLengthGets413WhileTheBodyIsStillSent) {
  ExpectRefused(
      "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
      "Content-Length: 99999999999\r\n\r\n",
      std::string(kBodyBytes, 'x'), "HTTP/1.1 413 Payload Too Large");
}

// "-1" is read as 2^64 - 1, as cpp-httplib reads it.
TEST_F(GatewayLingerTest, NegativeContentLengthGets413) {
  ExpectRefused(
      "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
      std::string(kBodyBytes, 'x'), "HTTP/1.1 413 Payload Too Large");
}

// A head over --http_max_header_bytes (64 KiB by default): 400, while the
// client is still sending header lines.
TEST_F(GatewayLingerTest, OversizedHeadGets400WhileStillSent) {
  std::string lines;
  while (lines.size() < kBodyBytes) lines += absl::StrCat("X-Pad: ", std::string(1000, 'p'), "\r\n");
  ExpectRefused("GET /v1/models HTTP/1.1\r\nHost: x\r\n", lines + "\r\n",
                "HTTP/1.1 400 Bad Request");
}

// A malformed request line followed by more bytes: 400.
TEST_F(GatewayLingerTest, MalformedRequestGets400WhileStillSent) {
  ExpectRefused("HELLO\r\n\r\n", std::string(kBodyBytes, 'y'), "HTTP/1.1 400 Bad Request");
}

}  // namespace
}  // namespace kvr
