#include "retrieval_node/server/ucx_endpoint.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "ucp/api/ucp.h"

namespace kvr::retrieval {
namespace {

using Clock = std::chrono::steady_clock;

// One reply on its way out: header and data stay alive until the send completes.
// Addressed by connection id, never by endpoint handle: UCX reuses a closed
// endpoint's handle for the next connection, so a late reply addressed by
// handle could reach another client (whose call ids may well be the same).
struct Outgoing {
  uint64_t connection = 0;
  UcxReplyHeader header;
  std::string data;
  // The reply to a request counted in flight (per connection and
  // `reserved_bytes` of the total): released when the progress thread takes
  // the reply.
  bool counted = false;
  size_t reserved_bytes = 0;
  // Set while UCX sends it: the endpoint's unanswered-message counts, one of
  // which (this connection's) its send completion decrements.
  std::unordered_map<uint64_t, size_t>* unanswered = nullptr;
};

// One fewer message of `connection` waiting for its reply to be sent
// (progress thread).
void Answered(std::unordered_map<uint64_t, size_t>& unanswered, uint64_t connection) {
  if (auto it = unanswered.find(connection); it != unanswered.end() && it->second > 0) {
    --it->second;
  }
}

// What an accepted request holds of the in-flight bounds until its reply.
struct Hold {
  bool counted = false;
  size_t bytes = 0;
};

// Replies queued by handler completions (any thread) for the progress thread.
struct ReplyQueue {
  std::mutex mu;
  bool closed = false;  // set when the endpoint stops; later pushes are dropped
  ucp_worker_h worker = nullptr;
  std::vector<std::unique_ptr<Outgoing>> items;

  void Push(std::unique_ptr<Outgoing> out) {
    std::lock_guard<std::mutex> lock(mu);
    if (closed) return;
    items.push_back(std::move(out));
    ucp_worker_signal(worker);  // thread-safe per the UCP docs
  }
};

void SendDone(void* request, ucs_status_t /*status*/, void* user_data) {
  auto* out = static_cast<Outgoing*>(user_data);
  if (out->unanswered != nullptr) Answered(*out->unanswered, out->connection);
  delete out;
  ucp_request_free(request);
}

}  // namespace

struct UcxEndpoint::Impl {
  UcxEndpointOptions options;
  UcxAttendHandler handler;
  UcxAttendBatchHandler batch_handler;
  UcxAppendBatchHandler append_batch_handler;
  ucp_context_h context = nullptr;
  ucp_worker_h worker = nullptr;
  ucp_listener_h listener = nullptr;
  std::string address;
  int port = 0;
  std::shared_ptr<ReplyQueue> replies = std::make_shared<ReplyQueue>();
  // Open connections (progress thread only): each gets an id at connect
  // that is never reused, and replies name it.
  std::unordered_map<ucp_ep_h, uint64_t> connection_of;
  std::unordered_map<uint64_t, ucp_ep_h> ep_of;
  uint64_t next_connection = 1;
  std::atomic<size_t> open_connections{0};  // ep_of.size(), readable anywhere
  // Requests in flight per open connection (progress thread only; erased
  // with the connection, later releases of its requests are ignored).
  std::unordered_map<uint64_t, size_t> inflight_of;
  // Messages per open connection that will be answered and whose reply UCX
  // has not sent yet (handled, queued, or being sent): a client that does
  // not read its replies (or floods requests the node answers at once) makes
  // this grow; past 2 x max_inflight_per_connection its further messages
  // are dropped unanswered (progress thread only; erased with the
  // connection).
  std::unordered_map<uint64_t, size_t> unanswered_of;
  std::atomic<size_t> dropped_messages{0};
  // Totals over all connections, gone ones included (written by the
  // progress thread only, readable anywhere).
  std::atomic<size_t> inflight_requests{0};
  std::atomic<size_t> inflight_bytes{0};
  std::atomic<size_t> refused_connections{0};
  std::vector<void*> closing;        // ep close requests in flight
  std::atomic<bool> stop{false};
  std::thread thread;

  ~Impl() {
    if (thread.joinable()) {
      stop.store(true);
      ucp_worker_signal(worker);
      thread.join();
    }
    {
      std::lock_guard<std::mutex> lock(replies->mu);
      replies->closed = true;
      replies->items.clear();
    }
    if (listener != nullptr) ucp_listener_destroy(listener);
    if (worker != nullptr) {
      for (const auto& [ep, id] : connection_of) CloseEp(ep);
      connection_of.clear();
      ep_of.clear();
      inflight_of.clear();
      unanswered_of.clear();
      const auto deadline = Clock::now() + std::chrono::seconds(1);
      while (!closing.empty() && Clock::now() < deadline) {
        ucp_worker_progress(worker);
        ReapClosing();
      }
      ucp_worker_destroy(worker);
    }
    if (context != nullptr) ucp_cleanup(context);
  }

  void CloseEp(ucp_ep_h ep) {
    ucp_request_param_t param{};
    param.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
    param.flags = UCP_EP_CLOSE_FLAG_FORCE;
    void* req = ucp_ep_close_nbx(ep, &param);
    if (UCS_PTR_IS_PTR(req)) closing.push_back(req);
  }

  void ReapClosing() {
    for (size_t i = 0; i < closing.size();) {
      if (ucp_request_check_status(closing[i]) != UCS_INPROGRESS) {
        ucp_request_free(closing[i]);
        closing[i] = closing.back();
        closing.pop_back();
      } else {
        ++i;
      }
    }
  }

  static void OnEpError(void* arg, ucp_ep_h ep, ucs_status_t /*status*/) {
    auto* self = static_cast<Impl*>(arg);
    auto it = self->connection_of.find(ep);
    if (it == self->connection_of.end()) return;
    self->ep_of.erase(it->second);
    self->inflight_of.erase(it->second);
    self->unanswered_of.erase(it->second);
    self->connection_of.erase(it);
    self->CloseEp(ep);
    self->open_connections.store(self->ep_of.size());
  }

  static void OnConnRequest(ucp_conn_request_h conn_request, void* arg) {
    auto* self = static_cast<Impl*>(arg);
    if (self->options.max_connections != 0 && self->ep_of.size() >= self->options.max_connections) {
      // ucx_max_connections: refuse (the client's connection fails).
      ucp_listener_reject(self->listener, conn_request);
      self->refused_connections.fetch_add(1);
      return;
    }
    ucp_ep_params_t params{};
    params.field_mask = UCP_EP_PARAM_FIELD_CONN_REQUEST | UCP_EP_PARAM_FIELD_ERR_HANDLER |
                        UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE;
    params.conn_request = conn_request;
    params.err_mode = UCP_ERR_HANDLING_MODE_PEER;
    params.err_handler.cb = &Impl::OnEpError;
    params.err_handler.arg = self;
    ucp_ep_h ep = nullptr;
    if (ucp_ep_create(self->worker, &params, &ep) != UCS_OK) return;
    const uint64_t id = self->next_connection++;
    self->connection_of[ep] = id;
    self->ep_of[id] = ep;
    self->inflight_of[id] = 0;
    self->unanswered_of[id] = 0;
    self->open_connections.store(self->ep_of.size());
  }

  // Queues a reply with no data: an error, or OK for a ping (any thread).
  // `hold`: what the request held of the in-flight bounds (released when the
  // reply is taken).
  void ReplyError(uint64_t connection, uint64_t call_id, const absl::Status& status,
                  Hold hold = {}) {
    auto out = std::make_unique<Outgoing>();
    out->connection = connection;
    out->counted = hold.counted;
    out->reserved_bytes = hold.bytes;
    out->header.call_id = call_id;
    out->header.code = static_cast<int32_t>(status.code());
    out->data = std::string(status.message());
    replies->Push(std::move(out));
  }

  // A whole request is here: parse it and hand it to the handler.
  // `hold`: what it holds of the in-flight bounds, passed on to its reply.
  // `version`: the request's wire version (3: an AttendBatch).
  void Dispatch(uint64_t connection, uint64_t call_id, uint32_t version, std::string bytes,
                Hold hold) {
    if (version == kUcxWireVersionBatch) {
      DispatchMessage<v1::AttendBatchRequest, v1::AttendBatchResponse>(
          connection, call_id, std::move(bytes), hold, batch_handler, version, "AttendBatch",
          &ParseUcxAttendBatchRequest);
      return;
    }
    if (version == kUcxWireVersionAppendBatch) {
      DispatchMessage<v1::AppendBatchRequest, v1::AppendBatchResponse>(
          connection, call_id, std::move(bytes), hold, append_batch_handler, version,
          "AppendBatch", &ParseUcxAppendBatchRequest);
      return;
    }
    struct Call {
      v1::AttendRequest request;
      v1::AttendResponse response;
    };
    auto call = std::make_shared<Call>();
    if (absl::Status st = ParseUcxAttendRequest(bytes, &call->request); !st.ok()) {
      ReplyError(connection, call_id, st, hold);
      return;
    }
    bytes = std::string();  // parsed: the payload copy is no longer needed
    handler(call->request, &call->response, ReplyWhenDone(call, &call->response, connection,
                                                          call_id, hold));
  }

  // A batch (wire version 3: AttendBatch, 4: AppendBatch): parsed with
  // `parse`, handed to `serve` (null: FailedPrecondition naming the wire
  // version), answered as Dispatch.
  template <typename Request, typename Response, typename Handler>
  void DispatchMessage(uint64_t connection, uint64_t call_id, std::string bytes, Hold hold,
                       const Handler& serve, uint32_t version, absl::string_view what,
                       absl::Status (*parse)(std::string_view, Request*)) {
    if (serve == nullptr) {
      ReplyError(connection, call_id,
                 absl::FailedPreconditionError(absl::StrCat("UCX wire version ", version, " (",
                                                            what, ") not served here")),
                 hold);
      return;
    }
    struct Call {
      Request request;
      Response response;
    };
    auto call = std::make_shared<Call>();
    if (absl::Status st = parse(bytes, &call->request); !st.ok()) {
      ReplyError(connection, call_id, st, hold);
      return;
    }
    bytes = std::string();
    serve(call->request, &call->response,
          ReplyWhenDone(call, &call->response, connection, call_id, hold));
  }

  // The completion of a handler: queues the reply (`response` serialized on
  // OK, else the status message); `keep` owns `response` until then.
  std::function<void(absl::Status)> ReplyWhenDone(std::shared_ptr<void> keep,
                                                  const google::protobuf::Message* response,
                                                  uint64_t connection, uint64_t call_id,
                                                  Hold hold) {
    std::shared_ptr<ReplyQueue> queue = replies;
    return [queue, keep = std::move(keep), response, connection, call_id,
            hold](absl::Status status) {
      auto out = std::make_unique<Outgoing>();
      out->connection = connection;
      out->counted = hold.counted;
      out->reserved_bytes = hold.bytes;
      out->header.call_id = call_id;
      out->header.code = static_cast<int32_t>(status.code());
      if (status.ok()) {
        response->SerializeToString(&out->data);
      } else {
        out->data = std::string(status.message());
      }
      queue->Push(std::move(out));
    };
  }

  struct RndvRecv {
    Impl* self;
    uint64_t connection;
    uint64_t call_id;
    uint32_t version;
    Hold hold;
    std::string bytes;
  };

  static void RndvDone(void* request, ucs_status_t status, size_t /*length*/, void* user_data) {
    std::unique_ptr<RndvRecv> r(static_cast<RndvRecv*>(user_data));
    if (status == UCS_OK) {
      r->self->Dispatch(r->connection, r->call_id, r->version, std::move(r->bytes), r->hold);
    } else {
      r->self->ReplyError(r->connection, r->call_id,
                          absl::UnavailableError(absl::StrCat("UCX receive of the request failed: ",
                                                              ucs_status_string(status))),
                          r->hold);
    }
    ucp_request_free(request);
  }

  static ucs_status_t OnRequest(void* arg, const void* header, size_t header_length, void* data,
                                size_t length, const ucp_am_recv_param_t* param) {
    auto* self = static_cast<Impl*>(arg);
    if ((param->recv_attr & UCP_AM_RECV_ATTR_FIELD_REPLY_EP) == 0 || param->reply_ep == nullptr) {
      return UCS_OK;  // nowhere to answer: drop
    }
    auto conn = self->connection_of.find(param->reply_ep);
    if (conn == self->connection_of.end()) return UCS_OK;  // not a connection we accepted
    const uint64_t connection = conn->second;
    absl::StatusOr<UcxRequestHeader> header_or = DecodeUcxRequestHeader(header, header_length);
    if (!header_or.ok()) return UCS_OK;  // not our protocol, no call id to answer: drop
    const UcxRequestHeader h = *header_or;
    // Every message past this point is answered exactly once; a connection
    // with too many answers not yet sent gets none (its replies would only
    // pile up in this process).
    size_t& unanswered = self->unanswered_of[connection];
    if (const size_t cap = 2 * self->options.max_inflight_per_connection;
        cap != 0 && unanswered >= cap) {
      self->dropped_messages.fetch_add(1);
      return UCS_OK;
    }
    ++unanswered;
    if (absl::Status st = CheckUcxRequest(h, length, self->options.max_message_bytes);
        !st.ok() || (h.flags & kUcxFlagPing) != 0) {
      self->ReplyError(connection, h.call_id, st);  // OK for a ping
      return UCS_OK;
    }
    // In-flight bounds: a request past one is answered now; returning UCS_OK
    // drops its data (eager: what UCX already delivered; rendezvous: never
    // fetched).
    if (absl::Status st = self->Admit(connection, length); !st.ok()) {
      self->ReplyError(connection, h.call_id, st);
      return UCS_OK;
    }
    const Hold hold{true, length};
    if ((param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) == 0) {
      self->Dispatch(connection, h.call_id, h.version,
                     std::string(static_cast<const char*>(data), length), hold);
      return UCS_OK;
    }
    auto r = std::make_unique<RndvRecv>();
    r->self = self;
    r->connection = connection;
    r->call_id = h.call_id;
    r->version = h.version;
    r->hold = hold;
    r->bytes.resize(length);
    ucp_request_param_t rp{};
    rp.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
    rp.cb.recv_am = &Impl::RndvDone;
    RndvRecv* raw = r.get();
    rp.user_data = raw;
    void* req = ucp_am_recv_data_nbx(self->worker, data, raw->bytes.data(), length, &rp);
    if (req == nullptr) {
      self->Dispatch(connection, h.call_id, h.version, std::move(raw->bytes), hold);
    } else if (UCS_PTR_IS_ERR(req)) {
      self->ReplyError(connection, h.call_id,
                       absl::UnavailableError(absl::StrCat("UCX receive of the request failed: ",
                                                           ucs_status_string(UCS_PTR_STATUS(req)))),
                       hold);
    } else {
      r.release();  // RndvDone owns it
    }
    return UCS_INPROGRESS;
  }

  // Counts a request of `length` payload bytes on `connection` in flight, or
  // ResourceExhausted naming the bound it would pass (progress thread).
  absl::Status Admit(uint64_t connection, size_t length) {
    size_t& on_connection = inflight_of[connection];
    if (options.max_inflight_per_connection != 0 &&
        on_connection >= options.max_inflight_per_connection) {
      return absl::ResourceExhaustedError(
          absl::StrCat("UCX Attend: ", on_connection,
                       " requests already in flight on this connection; "
                       "ucx_max_inflight_per_connection is ",
                       options.max_inflight_per_connection));
    }
    const size_t total = inflight_bytes.load();
    if (options.max_inflight_bytes != 0 &&
        (total > options.max_inflight_bytes || length > options.max_inflight_bytes - total)) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "UCX Attend: request of ", length, " bytes with ", total,
          " bytes of requests in flight; ucx_max_inflight_bytes is ", options.max_inflight_bytes));
    }
    ++on_connection;
    inflight_requests.fetch_add(1);
    inflight_bytes.fetch_add(length);
    return absl::OkStatus();
  }

  // Releases what the request `out` answers held of the in-flight bounds
  // (progress thread).
  void Release(const Outgoing& out) {
    if (!out.counted) return;
    inflight_requests.fetch_sub(1);
    inflight_bytes.fetch_sub(out.reserved_bytes);
    if (auto it = inflight_of.find(out.connection); it != inflight_of.end() && it->second > 0) {
      --it->second;
    }
  }

  void SendReplies() {
    std::vector<std::unique_ptr<Outgoing>> items;
    {
      std::lock_guard<std::mutex> lock(replies->mu);
      items.swap(replies->items);
    }
    for (std::unique_ptr<Outgoing>& out : items) {
      Release(*out);
      auto ep = ep_of.find(out->connection);
      if (ep == ep_of.end()) continue;  // that connection is gone: drop the reply
      ucp_request_param_t param{};
      param.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
      param.cb.send = &SendDone;
      Outgoing* raw = out.get();
      param.user_data = raw;
      raw->unanswered = &unanswered_of;
      void* req = ucp_am_send_nbx(ep->second, kUcxAttendReplyAm, &raw->header, sizeof(raw->header),
                                  raw->data.data(), raw->data.size(), &param);
      if (UCS_PTR_IS_PTR(req)) {
        out.release();  // SendDone deletes it
      } else {
        Answered(unanswered_of, raw->connection);  // sent at once, or failed
      }
    }
  }

  void Run() {
    const auto busy = std::chrono::microseconds(options.busy_poll_us);
    int efd = -1;
    ucp_worker_get_efd(worker, &efd);
    Clock::time_point last_activity = Clock::now();
    while (!stop.load(std::memory_order_relaxed)) {
      bool active = false;
      while (ucp_worker_progress(worker) != 0) active = true;
      SendReplies();
      ReapClosing();
      if (active) last_activity = Clock::now();
      if (busy.count() > 0 && Clock::now() - last_activity < busy) continue;
      if (ucp_worker_arm(worker) == UCS_ERR_BUSY) continue;
      {
        std::lock_guard<std::mutex> lock(replies->mu);
        if (!replies->items.empty()) continue;
      }
      pollfd pfd{efd, POLLIN, 0};
      poll(&pfd, 1, 100);
    }
  }
};

UcxEndpoint::UcxEndpoint(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
UcxEndpoint::~UcxEndpoint() = default;

const std::string& UcxEndpoint::address() const { return impl_->address; }
int UcxEndpoint::port() const { return impl_->port; }
size_t UcxEndpoint::connections() const { return impl_->open_connections.load(); }
size_t UcxEndpoint::refused_connections() const { return impl_->refused_connections.load(); }
size_t UcxEndpoint::inflight_requests() const { return impl_->inflight_requests.load(); }
size_t UcxEndpoint::inflight_bytes() const { return impl_->inflight_bytes.load(); }
size_t UcxEndpoint::dropped_messages() const { return impl_->dropped_messages.load(); }

absl::StatusOr<std::unique_ptr<UcxEndpoint>> UcxEndpoint::Start(
    const UcxEndpointOptions& options, UcxAttendHandler handler,
    UcxAttendBatchHandler batch_handler, UcxAppendBatchHandler append_batch_handler) {
  std::string host;
  uint16_t port = 0;
  KVR_RETURN_IF_ERROR(ParseUcxAddress(options.listen, &host, &port, "UCX listen address"));
  auto impl = std::make_unique<Impl>();
  impl->options = options;
  impl->handler = std::move(handler);
  impl->batch_handler = std::move(batch_handler);
  impl->append_batch_handler = std::move(append_batch_handler);
  auto fail = [](const char* what, ucs_status_t st) {
    return absl::UnavailableError(absl::StrCat("UCX ", what, ": ", ucs_status_string(st)));
  };

  ucp_config_t* config = nullptr;
  if (ucs_status_t st = ucp_config_read(nullptr, nullptr, &config); st != UCS_OK) {
    return fail("ucp_config_read", st);
  }
  ucp_params_t params{};
  params.field_mask = UCP_PARAM_FIELD_FEATURES;
  params.features = UCP_FEATURE_AM | UCP_FEATURE_WAKEUP;
  ucs_status_t st = ucp_init(&params, config, &impl->context);
  ucp_config_release(config);
  if (st != UCS_OK) return fail("ucp_init", st);

  ucp_worker_params_t wp{};
  wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
  wp.thread_mode = UCS_THREAD_MODE_SINGLE;
  if (st = ucp_worker_create(impl->context, &wp, &impl->worker); st != UCS_OK) {
    return fail("ucp_worker_create", st);
  }
  impl->replies->worker = impl->worker;

  ucp_am_handler_param_t hp{};
  hp.field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_FLAGS |
                  UCP_AM_HANDLER_PARAM_FIELD_CB | UCP_AM_HANDLER_PARAM_FIELD_ARG;
  hp.id = kUcxAttendRequestAm;
  hp.flags = UCP_AM_FLAG_WHOLE_MSG;
  hp.cb = &Impl::OnRequest;
  hp.arg = impl.get();
  if (st = ucp_worker_set_am_recv_handler(impl->worker, &hp); st != UCS_OK) {
    return fail("ucp_worker_set_am_recv_handler", st);
  }

  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_port = htons(port);
  inet_pton(AF_INET, host.c_str(), &sa.sin_addr);
  ucp_listener_params_t lp{};
  lp.field_mask = UCP_LISTENER_PARAM_FIELD_SOCK_ADDR | UCP_LISTENER_PARAM_FIELD_CONN_HANDLER;
  lp.sockaddr.addr = reinterpret_cast<const sockaddr*>(&sa);
  lp.sockaddr.addrlen = sizeof(sa);
  lp.conn_handler.cb = &Impl::OnConnRequest;
  lp.conn_handler.arg = impl.get();
  if (st = ucp_listener_create(impl->worker, &lp, &impl->listener); st != UCS_OK) {
    return fail(absl::StrCat("listen on ", options.listen).c_str(), st);
  }
  ucp_listener_attr_t la{};
  la.field_mask = UCP_LISTENER_ATTR_FIELD_SOCKADDR;
  if (st = ucp_listener_query(impl->listener, &la); st != UCS_OK) {
    return fail("ucp_listener_query", st);
  }
  impl->port = ntohs(reinterpret_cast<const sockaddr_in*>(&la.sockaddr)->sin_port);
  impl->address = absl::StrCat(host, ":", impl->port);

  Impl* raw = impl.get();
  impl->thread = std::thread([raw] { raw->Run(); });
  return std::unique_ptr<UcxEndpoint>(new UcxEndpoint(std::move(impl)));
}

}  // namespace kvr::retrieval
