// UcxEndpoint: the node side of the UCX data plane for Attend.
//
// A UCP context + worker (whatever transports UCX_TLS allows: tcp, shm,
// rdma) with a listener on a host:port (port 0 picks a free one). Clients
// (UcxRetrievalClient) connect with a socket address and send Attend calls
// as UCP active messages carrying the same bytes as the gRPC call:
//
//   request  AM id kUcxAttendRequestAm  header UcxRequestHeader   data: serialized kvr.v1.AttendRequest
//   reply    AM id kUcxAttendReplyAm    header UcxReplyHeader     data: serialized kvr.v1.AttendResponse
//                                                                  (code == 0) or the error message
//
// The constants and headers are in retrieval_node/wire/ucx_wire.h (shared
// with the client). Requests are sent with UCP_AM_SEND_FLAG_REPLY; the reply goes back on the
// connection the request came from: each accepted connection gets an id that
// is never reused, and a reply names that id, not the UCP endpoint handle
// (UCX hands a closed endpoint's handle to the next connection), so a late
// reply of a client that left is dropped rather than delivered to another
// client. `call_id` is the client's and is echoed.
// Large messages use UCP rendezvous transparently (the receiver pulls the
// bytes with ucp_am_recv_data_nbx).
//
// Threads: one progress thread owns the worker (UCS_THREAD_MODE_SINGLE) and
// blocks on the worker's event fd when idle. A parsed request is handed to
// the handler (NodeService::HandleAttend: the same validation and the same
// core thread pool as the gRPC Attend); the handler's completion may run on
// any thread and queues the reply for the progress thread. No UCX call runs
// outside the progress thread.
//
// Bounds (UcxEndpointOptions; flags of kvr_node): request size, open
// connections, requests in flight per connection and request bytes in flight
// over all connections. A request past a bound is answered at once with
// RESOURCE_EXHAUSTED naming the bound; its data is neither received (for
// rendezvous) nor copied or parsed.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "common/status.h"
#include "kvr/v1/retrieval.pb.h"
#include "retrieval_node/wire/ucx_wire.h"

namespace kvr::retrieval {

// Serves one Attend: fills `response` and then calls `done` exactly once (on
// any thread). `request` and `response` stay valid until `done` runs.
using UcxAttendHandler = std::function<void(const v1::AttendRequest& request,
                                            v1::AttendResponse* response,
                                            std::function<void(absl::Status)> done)>;

// Serves one AttendBatch (wire version 3) likewise.
using UcxAttendBatchHandler = std::function<void(const v1::AttendBatchRequest& request,
                                                 v1::AttendBatchResponse* response,
                                                 std::function<void(absl::Status)> done)>;

// Serves one AppendBatch (wire version 4) likewise.
using UcxAppendBatchHandler = std::function<void(const v1::AppendBatchRequest& request,
                                                 v1::AppendBatchResponse* response,
                                                 std::function<void(absl::Status)> done)>;

struct UcxEndpointOptions {
  // "host:port" to listen on; port 0 picks a free port.
  std::string listen = "127.0.0.1:0";
  // Largest request accepted; larger → RESOURCE_EXHAUSTED reply.
  size_t max_message_bytes = size_t{64} << 20;
  // After activity, keep polling the worker this long before blocking on its
  // event fd (lower latency, one core busy meanwhile). 0: block at once.
  int64_t busy_poll_us = 0;
  // Client connections open at once; a further connection request is
  // rejected (the client sees its connection fail and falls back to gRPC).
  // 0: unbounded.
  size_t max_connections = 256;
  // Attend requests one connection may have in flight (from arrival until
  // its reply is queued); a further one is answered RESOURCE_EXHAUSTED naming
  // ucx_max_inflight_per_connection at once, before its data is received or
  // parsed. Pings are not counted. Also: a connection with twice this many
  // messages whose replies are not sent yet (in flight, queued, or still
  // being sent by UCX: a client that floods or does not read its replies)
  // has further messages dropped unanswered. 0: unbounded (both).
  size_t max_inflight_per_connection = 64;
  // Request payload bytes in flight over all connections; a request that
  // would pass it is answered RESOURCE_EXHAUSTED naming ucx_max_inflight_bytes
  // at once, before its data is received. 0: unbounded.
  size_t max_inflight_bytes = size_t{2} << 30;
};

class UcxEndpoint {
 public:
  // Creates the UCP context, worker and listener and starts the progress
  // thread. Unavailable with the UCX error when UCX cannot start (no usable
  // transport, address in use, ...); InvalidArgument for a bad `listen`.
  // `batch_handler` serves wire-version-3 requests (null: they are answered
  // FailedPrecondition naming the wire version); `append_batch_handler`
  // wire-version-4 requests likewise.
  static absl::StatusOr<std::unique_ptr<UcxEndpoint>> Start(
      const UcxEndpointOptions& options, UcxAttendHandler handler,
      UcxAttendBatchHandler batch_handler = nullptr,
      UcxAppendBatchHandler append_batch_handler = nullptr);
  // Stops the progress thread, closes every connection and the listener.
  // Replies whose handler completes later are dropped (safely: completions
  // hold a shared reply queue, not this object).
  ~UcxEndpoint();

  UcxEndpoint(const UcxEndpoint&) = delete;
  UcxEndpoint& operator=(const UcxEndpoint&) = delete;

  // The bound address, "host:port" (port resolved when 0 was asked).
  const std::string& address() const;
  int port() const;
  // Client connections open now (any thread; a connection counts from its
  // connect until the node sees it close or fail).
  size_t connections() const;
  // Connection requests rejected by max_connections so far (any thread).
  size_t refused_connections() const;
  // Attend requests in flight now and their payload bytes (any thread).
  size_t inflight_requests() const;
  size_t inflight_bytes() const;
  // Messages dropped unanswered so far because their connection had
  // 2 x max_inflight_per_connection answers not yet sent (any thread).
  size_t dropped_messages() const;

 private:
  struct Impl;
  explicit UcxEndpoint(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvr::retrieval
