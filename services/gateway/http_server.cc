#include "services/gateway/http_server.h"

#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace kvr::gateway {
namespace {

// Milliseconds of a (seconds, microseconds) timeout, for poll().
int TimeoutMs(time_t sec, time_t usec) {
  const long long ms = static_cast<long long>(sec) * 1000 + static_cast<long long>(usec) / 1000;
  return static_cast<int>(std::clamp<long long>(ms, 0, std::numeric_limits<int>::max()));
}

// poll() for `events` on `fd`, retried on EINTR: > 0 ready, 0 timeout, < 0 error.
int PollFor(int fd, short events, int timeout_ms) {
  pollfd p{fd, events, 0};
  int r = 0;
  do {
    r = poll(&p, 1, timeout_ms);
  } while (r < 0 && errno == EINTR);
  if (r > 0 && (p.revents & POLLNVAL) != 0) return -1;
  return r;
}

void IpAndPort(const sockaddr_storage& addr, socklen_t len, std::string& ip, int& port) {
  char host[NI_MAXHOST] = "";
  if (addr.ss_family == AF_INET) {
    port = ntohs(reinterpret_cast<const sockaddr_in&>(addr).sin_port);
  } else if (addr.ss_family == AF_INET6) {
    port = ntohs(reinterpret_cast<const sockaddr_in6&>(addr).sin6_port);
  } else {
    return;
  }
  if (getnameinfo(reinterpret_cast<const sockaddr*>(&addr), len, host, sizeof(host), nullptr, 0,
                  NI_NUMERICHOST) == 0) {
    ip = host;
  }
}

// A connected socket as cpp-httplib's SocketStream reads and writes it (a
// 4 KiB read buffer, poll-based read and write timeouts, writes only to a
// live peer), plus two bounds on reading one request:
//  * the head bound: while the request's head has not ended (no empty line
//    yet), at most `head_budget` bytes are handed out; past it read() fails;
//  * the whole-request deadline: no read waits past `deadline` (the request's
//    first byte + --http_request_timeout_seconds); a read at or after it
//    answers 408 itself (cpp-httplib would answer 400 or nothing), fails,
//    and every later read or write fails, so the connection closes;
//  * the body bound: a head that declares a Content-Length over
//    `max_body_bytes` (and no Transfer-Encoding) gets no body read at all:
//    the first body read fails, so cpp-httplib answers 413 at once instead
//    of reading (skipping) the declared bytes until the client falls silent
//    for --http_read_timeout_seconds (the body is then left unread, for the
//    lingering close to discard).
// One stream serves one request, as in cpp-httplib.
class HeadBoundedStream final : public httplib::Stream {
 public:
  using Clock = std::chrono::steady_clock;

  HeadBoundedStream(int fd, size_t head_budget, uint64_t max_body_bytes, int read_timeout_ms,
                    int write_timeout_ms, Clock::time_point deadline, int request_timeout_seconds)
      : fd_(fd),
        head_left_(head_budget),
        max_body_bytes_(max_body_bytes),
        read_timeout_ms_(read_timeout_ms),
        write_timeout_ms_(write_timeout_ms),
        deadline_(deadline),
        request_timeout_seconds_(request_timeout_seconds) {}

  bool is_readable() const override { return PollFor(fd_, POLLIN, ReadWaitMs()) > 0; }

  bool is_writable() const override {
    return !timed_out_ && PollFor(fd_, POLLOUT, write_timeout_ms_) > 0 && PeerAlive();
  }

  ssize_t read(char* ptr, size_t size) override {
    if (timed_out_) return -1;
    if (Clock::now() >= deadline_) {
      RespondTimedOut();
      return -1;
    }
    if (in_head_) {
      if (head_left_ == 0) {  // the head is over its bound
        overflowed_ = true;
        return -1;
      }
      size = std::min(size, head_left_);
    } else if (BodyOverLimit()) {  // refused: cpp-httplib answers 413
      body_refused_ = true;
      return -1;
    }
    size = std::min(size, static_cast<size_t>(std::numeric_limits<ssize_t>::max()));
    ssize_t n = 0;
    if (buffer_off_ < buffer_size_) {
      n = static_cast<ssize_t>(std::min(size, buffer_size_ - buffer_off_));
      std::memcpy(ptr, buffer_.data() + buffer_off_, static_cast<size_t>(n));
      buffer_off_ += static_cast<size_t>(n);
    } else {
      if (!is_readable()) {
        if (Clock::now() >= deadline_) RespondTimedOut();
        return -1;
      }
      buffer_off_ = buffer_size_ = 0;
      if (size < buffer_.size()) {
        const ssize_t got = Recv(buffer_.data(), buffer_.size());
        if (got <= 0) return got;
        buffer_size_ = static_cast<size_t>(got);
        n = static_cast<ssize_t>(std::min(size, buffer_size_));
        std::memcpy(ptr, buffer_.data(), static_cast<size_t>(n));
        buffer_off_ = static_cast<size_t>(n);
      } else {
        n = Recv(ptr, size);
        if (n <= 0) return n;
      }
    }
    if (in_head_) CountHead(ptr, static_cast<size_t>(n));
    return n;
  }

  ssize_t write(const char* ptr, size_t size) override {
    if (timed_out_ || !is_writable()) return -1;
    ssize_t n = 0;
    do {
      n = send(fd_, ptr, size, MSG_NOSIGNAL);
    } while (n < 0 && errno == EINTR);
    return n;
  }

  void get_remote_ip_and_port(std::string& ip, int& port) const override {
    sockaddr_storage addr{};
    socklen_t len = sizeof(addr);
    if (getpeername(fd_, reinterpret_cast<sockaddr*>(&addr), &len) == 0) {
      IpAndPort(addr, len, ip, port);
    }
  }

  void get_local_ip_and_port(std::string& ip, int& port) const override {
    sockaddr_storage addr{};
    socklen_t len = sizeof(addr);
    if (getsockname(fd_, reinterpret_cast<sockaddr*>(&addr), &len) == 0) {
      IpAndPort(addr, len, ip, port);
    }
  }

  socket_t socket() const override { return fd_; }

  // True once a read was refused for the head's bound.
  bool head_overflowed() const { return overflowed_; }
  // True once the request ran past its deadline (and was answered 408).
  bool timed_out() const { return timed_out_; }
  // True once a body read was refused for a declared length over the limit.
  bool body_refused() const { return body_refused_; }

 private:
  // How long a read may wait: the read timeout, cut at the deadline
  // (rounded up, so a wait never ends just before it).
  int ReadWaitMs() const {
    const auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline_ - Clock::now());
    return static_cast<int>(std::clamp<long long>(left.count(), 0, read_timeout_ms_));
  }

  // Answers 408 (an OpenAI-style JSON error naming the limit), once, and
  // fails every later read and write.
  void RespondTimedOut() {
    if (timed_out_) return;
    timed_out_ = true;
    const std::string body = absl::StrCat(
        "{\"error\":{\"message\":\"request not received in time: its head and body took "
        "longer than the limit ",
        request_timeout_seconds_,
        " s (--http_request_timeout_seconds)\",\"type\":\"invalid_request_error\","
        "\"param\":null,\"code\":\"request_timeout\"}}");
    const std::string reply = absl::StrCat(
        "HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Type: "
        "application/json\r\nContent-Length: ",
        body.size(), "\r\n\r\n", body);
    if (PollFor(fd_, POLLOUT, write_timeout_ms_) > 0) {
      ssize_t n = 0;
      do {
        n = send(fd_, reply.data(), reply.size(), MSG_NOSIGNAL);
      } while (n < 0 && errno == EINTR);
    }
  }

  ssize_t Recv(char* ptr, size_t size) {
    ssize_t n = 0;
    do {
      n = recv(fd_, ptr, size, 0);
    } while (n < 0 && errno == EINTR);
    return n;
  }

  // As cpp-httplib's is_socket_alive: nothing to read, or a byte to peek.
  bool PeerAlive() const {
    const int r = PollFor(fd_, POLLIN, 0);
    if (r == 0) return true;
    if (r < 0) return false;
    char byte = 0;
    return recv(fd_, &byte, 1, MSG_PEEK) > 0;
  }

  // Counts `n` bytes handed out of the head and watches for its end: an
  // empty line ("\r\n\r\n", or "\n\n" from a lax client). Each line's
  // first kTrackedLineBytes are kept to read Content-Length and
  // Transfer-Encoding.
  void CountHead(const char* p, size_t n) {
    for (size_t i = 0; i < n && in_head_; ++i) {
      --head_left_;
      const char c = p[i];
      if (c == '\n') {
        if (line_empty_) in_head_ = false;
        line_empty_ = true;
        EndHeaderLine();
      } else if (c != '\r') {
        line_empty_ = false;
        if (line_.size() < kTrackedLineBytes) {
          line_.push_back(c);
        } else {
          line_truncated_ = true;
        }
      }
    }
  }

  // One header line ended (in line_): notes the first Content-Length value
  // as cpp-httplib reads it (strtoull of the trimmed value: "-1" is 2^64 - 1)
  // and whether a Transfer-Encoding was sent.
  void EndHeaderLine() {
    const std::string ended = std::exchange(line_, std::string());
    const absl::string_view line(ended);
    const bool truncated = std::exchange(line_truncated_, false);
    if (absl::StartsWithIgnoreCase(line, "transfer-encoding:")) {
      transfer_encoding_ = true;
      return;
    }
    constexpr absl::string_view kLength = "content-length:";
    if (truncated || have_length_ || !absl::StartsWithIgnoreCase(line, kLength)) return;
    have_length_ = true;
    const std::string value(absl::StripAsciiWhitespace(line.substr(kLength.size())));
    declared_length_ = std::strtoull(value.c_str(), nullptr, 10);
  }

  bool BodyOverLimit() const {
    return have_length_ && !transfer_encoding_ && declared_length_ > max_body_bytes_;
  }

  // Longest prefix of a header line kept (a longer Content-Length line is
  // left to cpp-httplib's own check, which reads the body first).
  static constexpr size_t kTrackedLineBytes = 128;

  const int fd_;
  bool in_head_ = true;
  bool line_empty_ = false;  // no byte but '\r' since the last '\n'
  bool overflowed_ = false;
  size_t head_left_;
  const uint64_t max_body_bytes_;
  std::string line_;  // the head line being read, its first kTrackedLineBytes
  bool line_truncated_ = false;
  bool have_length_ = false, transfer_encoding_ = false, body_refused_ = false;
  uint64_t declared_length_ = 0;
  const int read_timeout_ms_;
  const int write_timeout_ms_;
  const Clock::time_point deadline_;
  const int request_timeout_seconds_;
  bool timed_out_ = false;
  std::array<char, 4096> buffer_{};
  size_t buffer_off_ = 0, buffer_size_ = 0;
};

// Ends a connection without losing the last response: closing a socket
// whose receive queue still holds bytes makes the kernel send a reset
// (RST) instead of a FIN and drop whatever of the response it has not
// delivered, and the client's next read fails with ECONNRESET. So the
// write side is shut first (the response, then FIN, go out) and, when the
// connection ended on a refusal (`linger`: the client may still be sending
// the rest of a request) or input is already waiting, the input is read and
// discarded until the client closes, for at most kLingerTime and
// kLingerMaxBytes (whichever comes first; HTTP/1.1's "lingering close").
void LingeringClose(int fd, bool linger) {
  shutdown(fd, SHUT_WR);
  if (linger || PollFor(fd, POLLIN, 0) > 0) {
    const auto give_up = std::chrono::steady_clock::now() + BoundedHttpServer::kLingerTime;
    std::array<char, 16384> sink;
    size_t drained = 0;
    while (drained < BoundedHttpServer::kLingerMaxBytes) {
      const auto left = std::chrono::ceil<std::chrono::milliseconds>(
          give_up - std::chrono::steady_clock::now());
      if (left.count() <= 0 || PollFor(fd, POLLIN, static_cast<int>(left.count())) <= 0) break;
      ssize_t n = 0;
      do {
        n = recv(fd, sink.data(), sink.size(), 0);
      } while (n < 0 && errno == EINTR);
      if (n <= 0) break;  // the client closed (or reset) its side
      drained += static_cast<size_t>(n);
    }
  }
  close(fd);
}

}  // namespace

bool BoundedHttpServer::process_and_close_socket(socket_t sock) {
  const int read_ms = TimeoutMs(read_timeout_sec_, read_timeout_usec_);
  const int write_ms = TimeoutMs(write_timeout_sec_, write_timeout_usec_);
  const auto keep_alive = std::chrono::seconds(keep_alive_timeout_sec_);
  bool ok = false;
  bool refused = false;  // the connection ends on an error answer: linger
  for (size_t left = keep_alive_max_count_; left > 0 && svr_sock_ != INVALID_SOCKET; --left) {
    // Wait for the next request (as cpp-httplib: in 10 ms polls, so a
    // server stop is seen).
    const auto give_up = std::chrono::steady_clock::now() + keep_alive;
    int ready = 0;
    while ((ready = PollFor(sock, POLLIN, 10)) == 0 && svr_sock_ != INVALID_SOCKET &&
           std::chrono::steady_clock::now() < give_up) {
    }
    if (ready <= 0) break;
    // The request's first byte is here: it has request_timeout_seconds_ to
    // arrive in full.
    HeadBoundedStream strm(sock, max_head_bytes_, max_body_bytes_, read_ms, write_ms,
                           std::chrono::steady_clock::now() +
                               std::chrono::seconds(request_timeout_seconds_),
                           request_timeout_seconds_);
    bool connection_closed = false;
    ok = process_request(strm, /*close_connection=*/left == 1, connection_closed, nullptr);
    refused = !ok || strm.head_overflowed() || strm.timed_out() || strm.body_refused();
    if (refused || connection_closed) break;
  }
  LingeringClose(sock, refused);
  return ok;
}

}  // namespace kvr::gateway
