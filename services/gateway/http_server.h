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
#pragma once

#include <httplib.h>

#include <cstddef>

namespace kvr::gateway {

class BoundedHttpServer final : public httplib::Server {
 public:
  // `max_head_bytes` >= 1, `request_timeout_seconds` >= 1; the keep-alive
  // settings are cpp-httplib's (set_keep_alive_max_count,
  // set_keep_alive_timeout).
  BoundedHttpServer(size_t max_head_bytes, int request_timeout_seconds)
      : max_head_bytes_(max_head_bytes), request_timeout_seconds_(request_timeout_seconds) {}

 private:
  // Serves `sock` (keep-alive requests, each through a head-bounded stream),
  // then shuts it down and closes it. Called by cpp-httplib on a task of its
  // task queue, one per accepted connection.
  bool process_and_close_socket(socket_t sock) override;

  const size_t max_head_bytes_;
  const int request_timeout_seconds_;
};

}  // namespace kvr::gateway
