#include "retrieval_node/client/ucx_retrieval_client.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <future>
#include <mutex>
#include <optional>
#include <random>
#include <string_view>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "grpcpp/client_context.h"
#include "kvr/v1/retrieval.grpc.pb.h"
#include "retrieval_node/wire/proto_convert.h"
#include "retrieval_node/wire/ucx_wire.h"
#include "ucp/api/ucp.h"

namespace kvr::retrieval {
namespace {

using Clock = std::chrono::steady_clock;

// A random first call id in [1, 2^62): ids count up from it without wrapping,
// and two clients' ranges practically never meet.
uint64_t RandomFirstCallId() {
  std::random_device rd;
  const uint64_t r = (uint64_t{rd()} << 32) ^ rd();
  return (r & ((uint64_t{1} << 62) - 1)) | 1;
}

absl::Status UcxError(const char* what, ucs_status_t st) {
  return absl::UnavailableError(absl::StrCat("UCX ", what, ": ", ucs_status_string(st)));
}

}  // namespace

// Owns the UCP context, worker, endpoint and progress thread.
class UcxRetrievalClient::Transport {
 public:
  struct Call {
    bool ping = false;
    bool batch = false;               // an AttendBatch (wire version 3): replies fill `items`
    std::span<AttendBatchItem> items;
    // An AppendBatch (wire version 4): replies set `append_items`' statuses.
    bool append_batch = false;
    std::span<AppendBatchItem> append_items;
    PartialsView out;
    AttendStats* stats = nullptr;
    StatusCallback done;
    Clock::time_point deadline;
    bool sent = false;
  };

  uint64_t first_call_id() const { return first_call_id_; }

  static absl::StatusOr<std::unique_ptr<Transport>> Connect(const std::string& address,
                                                            const UcxClientOptions& options) {
    auto t = std::unique_ptr<Transport>(new Transport(options));
    KVR_RETURN_IF_ERROR(ParseUcxAddress(address, &t->host_, &t->port_, "node UCX address"));
    KVR_RETURN_IF_ERROR(t->Init());
    Transport* raw = t.get();
    t->thread_ = std::thread([raw] { raw->Run(); });
    // One round trip proves the transport works end to end.
    std::promise<absl::Status> ready;
    std::future<absl::Status> ready_future = ready.get_future();
    Call ping;
    ping.ping = true;
    ping.done = [&ready](absl::Status s) { ready.set_value(std::move(s)); };
    t->Submit(std::move(ping), std::string(), options.connect_timeout);
    KVR_RETURN_IF_ERROR(ready_future.get());
    return t;
  }

  ~Transport() {
    if (thread_.joinable()) {
      stop_.store(true);
      ucp_worker_signal(worker_);
      thread_.join();
    }
    std::unordered_map<uint64_t, Call> left;
    {
      std::lock_guard<std::mutex> lock(mu_);
      left.swap(calls_);
      to_send_.clear();
    }
    for (auto& [id, call] : left) call.done(absl::CancelledError("UCX client destroyed"));
    if (worker_ != nullptr) {
      if (ep_ != nullptr) CloseEp();
      const auto deadline = Clock::now() + std::chrono::seconds(1);
      while (!closing_.empty() && Clock::now() < deadline) {
        ucp_worker_progress(worker_);
        ReapClosing();
      }
      ucp_worker_destroy(worker_);
    }
    if (context_ != nullptr) ucp_cleanup(context_);
  }

  // Queues `call` with request bytes `data`; its `done` runs on the progress
  // thread (or here, never: errors are reported from that thread too).
  // `version`: the request header's wire version (ucx_wire.h).
  void Submit(Call call, std::string data, absl::Duration timeout,
              uint32_t version = kUcxWireVersion) {
    auto out = std::make_unique<Outgoing>();
    out->header.version = version;
    out->header.flags = call.ping ? kUcxFlagPing : 0;
    out->data = std::move(data);
    call.deadline = Clock::now() + absl::ToChronoNanoseconds(timeout);
    {
      std::lock_guard<std::mutex> lock(mu_);
      out->header.call_id = next_id_++;
      calls_.emplace(out->header.call_id, std::move(call));
      to_send_.push_back(std::move(out));
    }
    ucp_worker_signal(worker_);
  }

 private:
  struct Outgoing {
    UcxRequestHeader header;
    std::string data;
  };
  struct RndvRecv {
    Transport* self;
    Call call;
    UcxReplyHeader header;
    std::string bytes;
  };

  explicit Transport(const UcxClientOptions& options)
      : options_(options),
        first_call_id_(options.first_call_id != 0 ? options.first_call_id : RandomFirstCallId()),
        next_id_(first_call_id_) {}

  absl::Status Init() {
    ucp_config_t* config = nullptr;
    if (ucs_status_t st = ucp_config_read(nullptr, nullptr, &config); st != UCS_OK) {
      return UcxError("ucp_config_read", st);
    }
    ucp_params_t params{};
    params.field_mask = UCP_PARAM_FIELD_FEATURES;
    params.features = UCP_FEATURE_AM | UCP_FEATURE_WAKEUP;
    ucs_status_t st = ucp_init(&params, config, &context_);
    ucp_config_release(config);
    if (st != UCS_OK) return UcxError("ucp_init", st);
    ucp_worker_params_t wp{};
    wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
    wp.thread_mode = UCS_THREAD_MODE_SINGLE;
    if (st = ucp_worker_create(context_, &wp, &worker_); st != UCS_OK) {
      return UcxError("ucp_worker_create", st);
    }
    ucp_am_handler_param_t hp{};
    hp.field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_FLAGS |
                    UCP_AM_HANDLER_PARAM_FIELD_CB | UCP_AM_HANDLER_PARAM_FIELD_ARG;
    hp.id = kUcxAttendReplyAm;
    hp.flags = UCP_AM_FLAG_WHOLE_MSG;
    hp.cb = &Transport::OnReply;
    hp.arg = this;
    if (st = ucp_worker_set_am_recv_handler(worker_, &hp); st != UCS_OK) {
      return UcxError("ucp_worker_set_am_recv_handler", st);
    }
    return absl::OkStatus();
  }

  // Progress thread only.
  absl::Status OpenEp() {
    sockaddr_in sa{};
    sa.sin_family = AF_INET;
    sa.sin_port = htons(port_);
    inet_pton(AF_INET, host_.c_str(), &sa.sin_addr);
    ucp_ep_params_t params{};
    params.field_mask = UCP_EP_PARAM_FIELD_FLAGS | UCP_EP_PARAM_FIELD_SOCK_ADDR |
                        UCP_EP_PARAM_FIELD_ERR_HANDLER | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE;
    params.flags = UCP_EP_PARAMS_FLAGS_CLIENT_SERVER;
    params.sockaddr.addr = reinterpret_cast<const sockaddr*>(&sa);
    params.sockaddr.addrlen = sizeof(sa);
    params.err_mode = UCP_ERR_HANDLING_MODE_PEER;
    params.err_handler.cb = &Transport::OnEpError;
    params.err_handler.arg = this;
    if (ucs_status_t st = ucp_ep_create(worker_, &params, &ep_); st != UCS_OK) {
      ep_ = nullptr;
      return UcxError(absl::StrCat("connect to ", host_, ":", port_).c_str(), st);
    }
    return absl::OkStatus();
  }

  void CloseEp() {
    ucp_request_param_t param{};
    param.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
    param.flags = UCP_EP_CLOSE_FLAG_FORCE;
    void* req = ucp_ep_close_nbx(ep_, &param);
    if (UCS_PTR_IS_PTR(req)) closing_.push_back(req);
    ep_ = nullptr;
  }

  void ReapClosing() {
    for (size_t i = 0; i < closing_.size();) {
      if (ucp_request_check_status(closing_[i]) != UCS_INPROGRESS) {
        ucp_request_free(closing_[i]);
        closing_[i] = closing_.back();
        closing_.pop_back();
      } else {
        ++i;
      }
    }
  }

  // Fails every call already sent (their replies cannot come any more).
  void FailSent(const absl::Status& status) {
    std::vector<Call> failed;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto it = calls_.begin(); it != calls_.end();) {
        if (it->second.sent) {
          failed.push_back(std::move(it->second));
          it = calls_.erase(it);
        } else {
          ++it;
        }
      }
    }
    for (Call& c : failed) c.done(status);
  }

  static void OnEpError(void* arg, ucp_ep_h ep, ucs_status_t st) {
    auto* self = static_cast<Transport*>(arg);
    if (ep != self->ep_) return;
    self->CloseEp();
    self->FailSent(UcxError("connection to the node failed", st));
  }

  static void SendDone(void* request, ucs_status_t /*status*/, void* user_data) {
    delete static_cast<Outgoing*>(user_data);
    ucp_request_free(request);
  }

  std::optional<Call> TakeCall(uint64_t id) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = calls_.find(id);
    if (it == calls_.end()) return std::nullopt;
    Call c = std::move(it->second);
    calls_.erase(it);
    return c;
  }
  // TakeCall for a reply: only a call already sent can have one.
  std::optional<Call> TakeSentCall(uint64_t id) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = calls_.find(id);
    if (it == calls_.end() || !it->second.sent) return std::nullopt;
    Call c = std::move(it->second);
    calls_.erase(it);
    return c;
  }

  void SendQueued() {
    std::vector<std::unique_ptr<Outgoing>> items;
    {
      std::lock_guard<std::mutex> lock(mu_);
      items.swap(to_send_);
      for (auto& out : items) {
        if (auto it = calls_.find(out->header.call_id); it != calls_.end()) it->second.sent = true;
      }
    }
    for (std::unique_ptr<Outgoing>& out : items) {
      absl::Status st;
      if (ep_ == nullptr) st = OpenEp();
      if (st.ok()) {
        ucp_request_param_t param{};
        param.op_attr_mask =
            UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_FLAGS;
        param.flags = UCP_AM_SEND_FLAG_REPLY;
        param.cb.send = &Transport::SendDone;
        Outgoing* raw = out.get();
        param.user_data = raw;
        void* req = ucp_am_send_nbx(ep_, kUcxAttendRequestAm, &raw->header, sizeof(raw->header),
                                    raw->data.data(), raw->data.size(), &param);
        if (UCS_PTR_IS_PTR(req)) {
          out.release();  // SendDone deletes it
          continue;
        }
        if (UCS_PTR_IS_ERR(req)) st = UcxError("send", UCS_PTR_STATUS(req));
      }
      if (!st.ok()) {
        if (std::optional<Call> c = TakeCall(out->header.call_id)) c->done(st);
      }
    }
  }

  // Fails expired calls; returns the time to the next deadline.
  Clock::duration ExpireCalls() {
    const Clock::time_point now = Clock::now();
    Clock::duration next = std::chrono::milliseconds(100);
    std::vector<Call> expired;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto it = calls_.begin(); it != calls_.end();) {
        if (it->second.deadline <= now) {
          expired.push_back(std::move(it->second));
          it = calls_.erase(it);
        } else {
          next = std::min(next, it->second.deadline - now);
          ++it;
        }
      }
    }
    for (Call& c : expired) {
      c.done(absl::DeadlineExceededError(absl::StrCat(
          "UCX ", c.ping ? "connection check" : c.append_batch ? "AppendBatch" : "Attend", " to ",
          host_, ":", port_,
          " got no reply within its deadline")));
    }
    return next;
  }

  void Complete(Call& call, const UcxReplyHeader& header, std::string_view data) const {
    absl::Status status =
        call.ping           ? DecodeUcxPingReply(header, data)
        : call.batch        ? DecodeUcxAttendBatchReply(header, data, options_.max_message_bytes,
                                                        call.items)
        : call.append_batch ? DecodeUcxAppendBatchReply(header, data, options_.max_message_bytes,
                                                        call.append_items)
                            : DecodeUcxAttendReply(header, data, options_.max_message_bytes,
                                                   call.out, call.stats);
    StatusCallback done = std::move(call.done);
    done(std::move(status));
  }

  static void RndvDone(void* request, ucs_status_t st, size_t /*length*/, void* user_data) {
    std::unique_ptr<RndvRecv> r(static_cast<RndvRecv*>(user_data));
    if (st == UCS_OK) {
      r->self->Complete(r->call, r->header, r->bytes);
    } else {
      r->call.done(UcxError("receive of the Attend reply", st));
    }
    ucp_request_free(request);
  }

  static ucs_status_t OnReply(void* arg, const void* header, size_t header_length, void* data,
                              size_t length, const ucp_am_recv_param_t* param) {
    auto* self = static_cast<Transport*>(arg);
    absl::StatusOr<UcxReplyHeader> header_or = DecodeUcxReplyHeader(header, header_length);
    if (!header_or.ok()) return UCS_OK;  // not our protocol: drop
    const UcxReplyHeader h = *header_or;
    // Only a call this client sent and still waits for takes the reply; any
    // other (expired, never issued) is dropped.
    std::optional<Call> call = self->TakeSentCall(h.call_id);
    if (!call.has_value()) return UCS_OK;
    if (length > self->options_.max_message_bytes) {  // before receiving it
      call->done(absl::ResourceExhaustedError(
          absl::StrCat("UCX Attend reply of ", length, " bytes exceeds max_message_bytes ",
                       self->options_.max_message_bytes)));
      return UCS_OK;
    }
    if ((param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) == 0) {
      self->Complete(*call, h, std::string_view(static_cast<const char*>(data), length));
      return UCS_OK;
    }
    auto r = std::make_unique<RndvRecv>();
    r->self = self;
    r->call = std::move(*call);
    r->header = h;
    r->bytes.resize(length);
    ucp_request_param_t rp{};
    rp.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
    rp.cb.recv_am = &Transport::RndvDone;
    RndvRecv* raw = r.get();
    rp.user_data = raw;
    void* req = ucp_am_recv_data_nbx(self->worker_, data, raw->bytes.data(), length, &rp);
    if (req == nullptr) {
      self->Complete(raw->call, h, raw->bytes);
    } else if (UCS_PTR_IS_ERR(req)) {
      raw->call.done(UcxError("receive of the Attend reply", UCS_PTR_STATUS(req)));
    } else {
      r.release();  // RndvDone owns it
    }
    return UCS_INPROGRESS;
  }

  void Run() {
    const auto busy = std::chrono::microseconds(options_.busy_poll_us);
    int efd = -1;
    ucp_worker_get_efd(worker_, &efd);
    Clock::time_point last_activity = Clock::now();
    while (!stop_.load(std::memory_order_relaxed)) {
      bool active = false;
      while (ucp_worker_progress(worker_) != 0) active = true;
      SendQueued();
      ReapClosing();
      const Clock::duration next = ExpireCalls();
      if (active) last_activity = Clock::now();
      if (busy.count() > 0 && Clock::now() - last_activity < busy) continue;
      if (ucp_worker_arm(worker_) == UCS_ERR_BUSY) continue;
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (!to_send_.empty()) continue;
      }
      const auto ms = std::chrono::ceil<std::chrono::milliseconds>(next).count();
      pollfd pfd{efd, POLLIN, 0};
      poll(&pfd, 1, static_cast<int>(std::max<int64_t>(1, ms)));
    }
  }

  const UcxClientOptions options_;
  const uint64_t first_call_id_;
  std::string host_;
  uint16_t port_ = 0;
  ucp_context_h context_ = nullptr;
  ucp_worker_h worker_ = nullptr;
  ucp_ep_h ep_ = nullptr;          // progress thread only
  std::vector<void*> closing_;     // progress thread only
  std::atomic<bool> stop_{false};
  std::thread thread_;

  std::mutex mu_;
  uint64_t next_id_;
  std::unordered_map<uint64_t, Call> calls_;
  std::vector<std::unique_ptr<Outgoing>> to_send_;
};

UcxRetrievalClient::UcxRetrievalClient(std::unique_ptr<GrpcRetrievalClient> grpc,
                                       const UcxClientOptions& options)
    : grpc_(std::move(grpc)), options_(options) {}

UcxRetrievalClient::~UcxRetrievalClient() = default;

uint64_t UcxRetrievalClient::first_call_id() const {
  return transport_ == nullptr ? 0 : transport_->first_call_id();
}

absl::StatusOr<std::unique_ptr<UcxRetrievalClient>> UcxRetrievalClient::Create(
    std::unique_ptr<GrpcRetrievalClient> grpc, const UcxClientOptions& options) {
  if (grpc == nullptr) return absl::InvalidArgumentError("UCX client needs a gRPC client");
  if (options.attend_timeout <= absl::ZeroDuration() ||
      options.connect_timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError(
        absl::StrCat("timeouts must be > 0, got attend ", absl::FormatDuration(options.attend_timeout),
                     ", connect ", absl::FormatDuration(options.connect_timeout)));
  }
  auto client =
      std::unique_ptr<UcxRetrievalClient>(new UcxRetrievalClient(std::move(grpc), options));
  if (!options.enable_ucx) {
    client->fallback_reason_ = absl::FailedPreconditionError("UCX disabled by options");
    return client;
  }
  auto stub = v1::RetrievalNode::NewStub(client->grpc_->channel());
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() +
                       absl::ToChronoNanoseconds(options.connect_timeout));
  v1::GetEndpointsResponse endpoints;
  absl::Status st =
      FromGrpcStatus(stub->GetEndpoints(&context, v1::GetEndpointsRequest(), &endpoints));
  if (!st.ok()) {
    client->fallback_reason_ = st;
    return client;
  }
  if (endpoints.ucx_address().empty()) {
    client->fallback_reason_ = absl::FailedPreconditionError(
        absl::StrCat("node ", client->grpc_->target(), " advertises no UCX address"));
    return client;
  }
  absl::StatusOr<std::unique_ptr<Transport>> transport =
      Transport::Connect(endpoints.ucx_address(), options);
  if (!transport.ok()) {
    client->fallback_reason_ = transport.status();
    return client;
  }
  client->transport_ = std::move(transport).value();
  client->ucx_address_ = endpoints.ucx_address();
  return client;
}

absl::Status UcxRetrievalClient::CreateSequence(const SequenceSpec& spec) {
  return grpc_->CreateSequence(spec);
}

absl::Status UcxRetrievalClient::CreateSequence(const SequenceSpec& spec,
                                                std::string_view capability) {
  return grpc_->CreateSequence(spec, capability);
}
absl::Status UcxRetrievalClient::UploadShard(const ShardUpload& upload) {
  return grpc_->UploadShard(upload);
}
absl::Status UcxRetrievalClient::Append(const AppendRequest& request) {
  return grpc_->Append(request);
}

void UcxRetrievalClient::AppendAsync(const AppendRequest& request, StatusCallback done) {
  grpc_->AppendAsync(request, std::move(done));
}
absl::Status UcxRetrievalClient::DropSequence(uint64_t sequence_id) {
  return grpc_->DropSequence(sequence_id);
}

absl::Status UcxRetrievalClient::DropSequence(uint64_t sequence_id,
                                              std::string_view capability) {
  return grpc_->DropSequence(sequence_id, capability);
}
absl::Status UcxRetrievalClient::ForkSequence(uint64_t source_id,
                                              std::string_view source_capability,
                                              uint64_t fork_id, std::string_view fork_capability) {
  return grpc_->ForkSequence(source_id, source_capability, fork_id, fork_capability);
}
absl::StatusOr<NodeStats> UcxRetrievalClient::Stats() { return grpc_->Stats(); }
absl::StatusOr<SyncResult> UcxRetrievalClient::SyncShards(const SyncRequest& request) {
  return grpc_->SyncShards(request);
}

void UcxRetrievalClient::AttendAsync(const AttendRequest& request, PartialsView out,
                                     AttendStats* stats, StatusCallback done) {
  if (transport_ == nullptr) {
    grpc_->AttendAsync(request, out, stats, std::move(done));
    return;
  }
  v1::AttendRequest message;
  AttendRequestToProto(request, &message);
  Transport::Call call;
  call.out = out;
  call.stats = stats;
  call.done = std::move(done);
  transport_->Submit(std::move(call), message.SerializeAsString(), options_.attend_timeout,
                     request.shards.empty() ? kUcxWireVersion : kUcxWireVersionShards);
}

void UcxRetrievalClient::AttendBatchAsync(std::span<AttendBatchItem> items, StatusCallback done) {
  if (transport_ == nullptr) {
    grpc_->AttendBatchAsync(items, std::move(done));
    return;
  }
  if (items.empty()) {
    done(absl::OkStatus());
    return;
  }
  v1::AttendBatchRequest message;
  message.mutable_items()->Reserve(static_cast<int>(items.size()));
  for (const AttendBatchItem& item : items) AttendRequestToProto(item.request, message.add_items());
  Transport::Call call;
  call.batch = true;
  call.items = items;
  // A batch-level error (transport, deadline, the node's refusal) is every
  // item's status too.
  call.done = [items, done = std::move(done)](absl::Status status) {
    if (!status.ok()) {
      for (AttendBatchItem& item : items) item.status = status;
    }
    done(std::move(status));
  };
  transport_->Submit(std::move(call), message.SerializeAsString(), options_.attend_timeout,
                     kUcxWireVersionBatch);
}

void UcxRetrievalClient::AppendBatchAsync(std::span<AppendBatchItem> items, StatusCallback done) {
  if (transport_ == nullptr) {
    grpc_->AppendBatchAsync(items, std::move(done));
    return;
  }
  if (items.empty()) {
    done(absl::OkStatus());
    return;
  }
  // Serialized here: the items' matrices are read only before this returns.
  v1::AppendBatchRequest message;
  message.mutable_items()->Reserve(static_cast<int>(items.size()));
  for (const AppendBatchItem& item : items) {
    AppendRequestToProto(item.request, message.add_items());
  }
  Transport::Call call;
  call.append_batch = true;
  call.append_items = items;
  // A batch-level error (transport, deadline, the node's refusal) is every
  // item's status too, as over gRPC.
  call.done = [items, done = std::move(done)](absl::Status status) {
    if (!status.ok()) {
      for (AppendBatchItem& item : items) item.status = status;
    }
    done(std::move(status));
  };
  transport_->Submit(std::move(call), message.SerializeAsString(), options_.attend_timeout,
                     kUcxWireVersionAppendBatch);
}

}  // namespace kvr::retrieval
