// A bare UCP active-message client for hostile tests of a node's UCX data
// plane: it connects to "IPV4:PORT" (a node's GetEndpoints ucx_address) and
// sends whatever header and data bytes it is given under any AM id, with no
// client-side checks, then waits for the node's reply (AM kUcxAttendReplyAm,
// retrieval_node/wire/ucx_wire.h). Single-threaded: every call progresses
// the UCP worker itself. Link kvr::node_wire, ucx::ucp and ucx::ucs.
#pragma once

#include <arpa/inet.h>
#include <netinet/in.h>
#include <ucp/api/ucp.h>

#include <chrono>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "retrieval_node/wire/ucx_wire.h"

namespace kvr::test_support {

class RawUcxClient {
 public:
  // A reply as the node sent it: its header fields and data bytes.
  struct Reply {
    uint32_t version = 0;
    int32_t code = 0;
    uint64_t call_id = 0;
    std::string data;
  };

  // Connects to `address` ("IPV4:PORT"); the UCX error when UCX cannot run.
  static absl::StatusOr<std::unique_ptr<RawUcxClient>> Connect(const std::string& address) {
    auto c = std::unique_ptr<RawUcxClient>(new RawUcxClient());
    ucp_config_t* config = nullptr;
    if (ucs_status_t st = ucp_config_read(nullptr, nullptr, &config); st != UCS_OK) {
      return Error("ucp_config_read", st);
    }
    ucp_params_t params{};
    params.field_mask = UCP_PARAM_FIELD_FEATURES;
    params.features = UCP_FEATURE_AM;
    ucs_status_t st = ucp_init(&params, config, &c->context_);
    ucp_config_release(config);
    if (st != UCS_OK) return Error("ucp_init", st);
    ucp_worker_params_t wp{};
    wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
    wp.thread_mode = UCS_THREAD_MODE_SINGLE;
    if (st = ucp_worker_create(c->context_, &wp, &c->worker_); st != UCS_OK) {
      return Error("ucp_worker_create", st);
    }
    ucp_am_handler_param_t hp{};
    hp.field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_FLAGS |
                    UCP_AM_HANDLER_PARAM_FIELD_CB | UCP_AM_HANDLER_PARAM_FIELD_ARG;
    hp.id = retrieval::kUcxAttendReplyAm;
    hp.flags = UCP_AM_FLAG_WHOLE_MSG;
    hp.cb = &RawUcxClient::OnReply;
    hp.arg = c.get();
    if (st = ucp_worker_set_am_recv_handler(c->worker_, &hp); st != UCS_OK) {
      return Error("ucp_worker_set_am_recv_handler", st);
    }
    const size_t colon = address.rfind(':');
    int port = 0;
    sockaddr_in sa{};
    sa.sin_family = AF_INET;
    if (colon == std::string::npos || !absl::SimpleAtoi(address.substr(colon + 1), &port) ||
        port <= 0 || port > 65535 ||
        inet_pton(AF_INET, address.substr(0, colon).c_str(), &sa.sin_addr) != 1) {
      return absl::InvalidArgumentError(absl::StrCat("not IPV4:PORT: ", address));
    }
    sa.sin_port = htons(static_cast<uint16_t>(port));
    ucp_ep_params_t ep{};
    ep.field_mask = UCP_EP_PARAM_FIELD_FLAGS | UCP_EP_PARAM_FIELD_SOCK_ADDR |
                    UCP_EP_PARAM_FIELD_ERR_HANDLER | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE;
    ep.flags = UCP_EP_PARAMS_FLAGS_CLIENT_SERVER;
    ep.sockaddr.addr = reinterpret_cast<const sockaddr*>(&sa);
    ep.sockaddr.addrlen = sizeof(sa);
    ep.err_mode = UCP_ERR_HANDLING_MODE_PEER;
    ep.err_handler.cb = &RawUcxClient::OnEpError;
    ep.err_handler.arg = c.get();
    if (st = ucp_ep_create(c->worker_, &ep, &c->ep_); st != UCS_OK) {
      c->ep_ = nullptr;
      return Error("ucp_ep_create", st);
    }
    return c;
  }

  ~RawUcxClient() {
    if (ep_ != nullptr) {
      ucp_request_param_t param{};
      param.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
      param.flags = UCP_EP_CLOSE_FLAG_FORCE;
      void* req = ucp_ep_close_nbx(ep_, &param);
      if (req != nullptr && UCS_PTR_IS_PTR(req)) {
        const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(5);
        while (ucp_request_check_status(req) == UCS_INPROGRESS &&
               std::chrono::steady_clock::now() < give_up) {
          ucp_worker_progress(worker_);
        }
        ucp_request_free(req);
      }
    }
    if (worker_ != nullptr) ucp_worker_destroy(worker_);
    if (context_ != nullptr) ucp_cleanup(context_);
  }
  RawUcxClient(const RawUcxClient&) = delete;
  RawUcxClient& operator=(const RawUcxClient&) = delete;

  // Sends one active message `am_id` with exactly these header and data
  // bytes (asking for a reply endpoint, as the node requires) and progresses
  // until the send completed; the send's error otherwise, or
  // DeadlineExceeded after `timeout`.
  absl::Status Send(uint16_t am_id, std::string_view header, std::string_view data,
                    std::chrono::milliseconds timeout = std::chrono::seconds(10)) {
    if (failed_) return absl::UnavailableError("the endpoint failed");
    ucp_request_param_t param{};
    param.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
    param.flags = UCP_AM_SEND_FLAG_REPLY;
    void* req =
        ucp_am_send_nbx(ep_, am_id, header.data(), header.size(), data.data(), data.size(), &param);
    if (req == nullptr) return absl::OkStatus();
    if (UCS_PTR_IS_ERR(req)) return Error("ucp_am_send_nbx", UCS_PTR_STATUS(req));
    const auto give_up = std::chrono::steady_clock::now() + timeout;
    ucs_status_t st = UCS_INPROGRESS;
    while ((st = ucp_request_check_status(req)) == UCS_INPROGRESS && !failed_ &&
           std::chrono::steady_clock::now() < give_up) {
      ucp_worker_progress(worker_);
    }
    if (st == UCS_INPROGRESS) {
      ucp_request_cancel(worker_, req);
      while (ucp_request_check_status(req) == UCS_INPROGRESS) ucp_worker_progress(worker_);
      ucp_request_free(req);
      return absl::DeadlineExceededError("send did not complete");
    }
    ucp_request_free(req);
    return st == UCS_OK ? absl::OkStatus() : Error("send", st);
  }

  // Sends `n` messages of `header` (and no data) under `am_id` as fast as
  // UCX takes them, progressing only every 1,000 sends (so replies are
  // hardly read: a client that floods and does not drain). Each send is
  // released at once (UCX completes it on its own).
  absl::Status Flood(uint16_t am_id, std::string_view header, int n) {
    for (int i = 0; i < n && !failed_; ++i) {
      ucp_request_param_t param{};
      param.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
      param.flags = UCP_AM_SEND_FLAG_REPLY;
      void* req = ucp_am_send_nbx(ep_, am_id, header.data(), header.size(), nullptr, 0, &param);
      if (UCS_PTR_IS_ERR(req)) return Error("ucp_am_send_nbx", UCS_PTR_STATUS(req));
      if (req != nullptr) ucp_request_free(req);
      if (i % 1000 == 999) ucp_worker_progress(worker_);
    }
    return absl::OkStatus();
  }

  // The reply to `call_id`, progressing up to `timeout` for it; nullopt when
  // none came (a message the node drops has no reply).
  std::optional<Reply> WaitReply(uint64_t call_id,
                                 std::chrono::milliseconds timeout = std::chrono::seconds(10)) {
    const auto give_up = std::chrono::steady_clock::now() + timeout;
    for (;;) {
      auto it = replies_.find(call_id);
      if (it != replies_.end()) {
        Reply r = std::move(it->second);
        replies_.erase(it);
        return r;
      }
      if (failed_ || std::chrono::steady_clock::now() >= give_up) return std::nullopt;
      ucp_worker_progress(worker_);
    }
  }

  // Replies received so far, any call id (progressing for `for_time` first).
  size_t CountReplies(std::chrono::milliseconds for_time) {
    const auto until = std::chrono::steady_clock::now() + for_time;
    while (!failed_ && std::chrono::steady_clock::now() < until) ucp_worker_progress(worker_);
    return replies_.size();
  }

  // True once UCX reported the endpoint failed (the node closed it).
  bool failed() const { return failed_; }

 private:
  RawUcxClient() = default;

  static absl::Status Error(const char* what, ucs_status_t st) {
    return absl::UnavailableError(absl::StrCat(what, ": ", ucs_status_string(st)));
  }

  static void OnEpError(void* arg, ucp_ep_h /*ep*/, ucs_status_t /*status*/) {
    static_cast<RawUcxClient*>(arg)->failed_ = true;
  }

  // Replies the node sends are small (an error message, or partials that
  // fit eagerly for the calls these tests make); a rendezvous one is kept
  // with no data.
  static ucs_status_t OnReply(void* arg, const void* header, size_t header_length, void* data,
                              size_t length, const ucp_am_recv_param_t* param) {
    auto* self = static_cast<RawUcxClient*>(arg);
    Reply r;
    retrieval::UcxReplyHeader h;
    if (header_length == sizeof(h)) {
      std::memcpy(&h, header, sizeof(h));
      r.version = h.version;
      r.code = h.code;
      r.call_id = h.call_id;
    }
    if ((param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) == 0 && data != nullptr) {
      r.data.assign(static_cast<const char*>(data), length);
    }
    self->replies_[r.call_id] = std::move(r);
    return UCS_OK;
  }

  ucp_context_h context_ = nullptr;
  ucp_worker_h worker_ = nullptr;
  ucp_ep_h ep_ = nullptr;
  bool failed_ = false;
  std::map<uint64_t, Reply> replies_;
};

}  // namespace kvr::test_support
