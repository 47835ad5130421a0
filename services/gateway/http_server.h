// BoundedHttpServer: cpp-httplib's Server with a bound on the size of a
// request head (request line and header fields, up to the empty line).
//
// cpp-httplib 0.11 (Debian's) bounds each header line (8 KiB) but not how
// many there are, and keeps every one in memory: one client that streams
// header lines grew the gateway by 330 MB in 6 s (3 M headers, 24 MB sent),
// and --http_max_connections such clients by that many times more. Here each
// connection is served as cpp-httplib serves it (the same keep-alive count
// and timeout, read / write timeouts and server-stop check) but through a
// socket stream that refuses to hand cpp-httplib more than `max_head_bytes`
// of one request's head: the header read then fails and cpp-httplib answers
// 400 and closes the connection (a request line longer than the bound is
// closed unanswered, as cpp-httplib does with one over its URI bound). The
// body is bounded as before, by set_payload_max_length.
//
// cpp-httplib's read timeout bounds each wait for bytes, not a request: a
// client that trickles a body (or head) one byte per second, each inside the
// timeout, held a connection thread for as long as it liked. So each
// request also has a whole-request deadline, `request_timeout_seconds` from
// its first byte: reading past it is answered 408 (JSON error naming
// --http_request_timeout_seconds) and the connection is closed. It bounds
// receiving the request only; the response (a stream may run for minutes)
// is bounded by the request's own deadline.
//
// A request whose head declares a Content-Length over `max_body_bytes` (the
// limit cpp-httplib's set_payload_max_length enforces) is answered 413 as
// soon as its head has arrived, without reading the body: cpp-httplib
// alone read and discarded the declared bytes first, so a client that lied
// (Content-Length: 99999999999) waited --http_read_timeout_seconds of its
// own silence for the 413, and one that kept sending held the thread to the
// request deadline and got 408. The connection is then closed.
//
// Lingering close (session 27): every connection the server ends on an
// error answer (413, 400 for a bad or oversized head, 408) may still have
// request bytes arriving; closing a socket with unread input sends a reset
// that can destroy the answer in flight and fails the client's reads with
// ECONNRESET. So the server shuts its write side (FIN after the answer) and
// reads and discards input until the client closes, at most kLingerTime
// (2 s) and kLingerMaxBytes (64 MiB), then closes. A connection thread is
// held at most kLingerTime longer (--http_max_connections bounds them).
#pragma once

#include <httplib.h>

#include <chrono>
#include <cstddef>
#include <cstdint>

namespace kvr::gateway {

class BoundedHttpServer final : public httplib::Server {
 public:
  // Longest a closing connection keeps reading (and discarding) input after
  // an error answer, and the most bytes it reads so (lingering close).
  static constexpr std::chrono::seconds kLingerTime{2};
  static constexpr size_t kLingerMaxBytes = size_t{64} << 20;

  // `max_head_bytes` >= 1, `request_timeout_seconds` >= 1, `max_body_bytes`
  // the value given to set_payload_max_length (a declared body over it is
  // answered 413 without being read); the keep-alive settings are
  // cpp-httplib's (set_keep_alive_max_count, set_keep_alive_timeout).
  BoundedHttpServer(size_t max_head_bytes, int request_timeout_seconds, uint64_t max_body_bytes)
      : max_head_bytes_(max_head_bytes),
        request_timeout_seconds_(request_timeout_seconds),
        max_body_bytes_(max_body_bytes) {}

 private:
  // Serves `sock` (keep-alive requests, each through a head-bounded stream),
  // then shuts it down and closes it. Called by cpp-httplib on a task of its
  // task queue, one per accepted connection.
  bool process_and_close_socket(socket_t sock) override;

  const size_t max_head_bytes_;
  const int request_timeout_seconds_;
  const uint64_t max_body_bytes_;
};

}  // namespace kvr::gateway
