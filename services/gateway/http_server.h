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
#pragma once

#include <httplib.h>

#include <cstddef>

namespace kvr::gateway {

class BoundedHttpServer final : public httplib::Server {
 public:
  // `max_head_bytes` >= 1; the keep-alive settings are cpp-httplib's
  // (set_keep_alive_max_count, set_keep_alive_timeout).
  explicit BoundedHttpServer(size_t max_head_bytes) : max_head_bytes_(max_head_bytes) {}

 private:
  // Serves `sock` (keep-alive requests, each through a head-bounded stream),
  // then shuts it down and closes it. Called by cpp-httplib on a task of its
  // task queue, one per accepted connection.
  bool process_and_close_socket(socket_t sock) override;

  const size_t max_head_bytes_;
};

}  // namespace kvr::gateway
