#include "retrieval_node/client/grpc_retrieval_client.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <limits>

#include "grpc/health/v1/health.grpc.pb.h"
#include "common/tsan_annotations.h"
#include "grpcpp/client_context.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "grpcpp/support/channel_arguments.h"
#include "retrieval_node/wire/proto_convert.h"

namespace kvr::retrieval {
namespace {

void SetDeadline(grpc::ClientContext* context, absl::Duration timeout) {
  context->set_deadline(std::chrono::system_clock::now() + absl::ToChronoNanoseconds(timeout));
}

// Copies a reply's partials into `out`, checking every size.
absl::Status UnpackPartials(const v1::Partials& p, PartialsView out) {
  const size_t n = out.size(), d = out.dim();
  if (p.n() != static_cast<int64_t>(n) || p.dim() != static_cast<int64_t>(d) ||
      p.o().size() != n * d * sizeof(float) || p.m().size() != n * sizeof(float) ||
      p.l().size() != n * sizeof(float)) {
    return absl::InternalError(absl::StrCat(
        "Attend reply holds ", p.n(), " x ", p.dim(), " partials (o ", p.o().size(), " bytes, m ",
        p.m().size(), ", l ", p.l().size(), "), expected ", n, " x ", d));
  }
  for (size_t i = 0; i < n; ++i) {
    std::memcpy(out.o.row(i), p.o().data() + i * d * sizeof(float), d * sizeof(float));
  }
  if (n > 0) {
    std::memcpy(out.m.data(), p.m().data(), n * sizeof(float));
    std::memcpy(out.l.data(), p.l().data(), n * sizeof(float));
  }
  return absl::OkStatus();
}

// The kvr.v1 form of an Append (matrices packed).
// Copies a reply's stats into `out` (may be null).
void UnpackStats(const v1::AttendStats& s, AttendStats* out) {
  if (out == nullptr) return;
  out->shards_searched = s.shards_searched();
  out->keys_held = s.keys_held();
  out->keys_attended = s.keys_attended();
  out->distance_computations = s.distance_computations();
  out->keys_estimated = s.keys_estimated();
  out->clusters_estimated = s.clusters_estimated();
  out->keys_exact_zone = s.keys_exact_zone();
}

// One item's outcome from a batch reply's status slot.
absl::Status ItemStatusFromProto(const v1::ItemStatus& s) {
  if (s.code() < 0 || s.code() > static_cast<int32_t>(absl::StatusCode::kUnauthenticated)) {
    return absl::InternalError(absl::StrCat("batch reply item status code ", s.code(),
                                            " is not a gRPC status code"));
  }
  return absl::Status(static_cast<absl::StatusCode>(s.code()), s.message());
}

// Internal when a batch reply does not carry one item and one status per
// request item.
absl::Status CheckBatchReply(int items, int statuses, size_t want, absl::string_view what) {
  if (items == static_cast<int>(want) && statuses == static_cast<int>(want)) {
    return absl::OkStatus();
  }
  return absl::InternalError(absl::StrCat(what, " reply holds ", items, " items and ", statuses,
                                          " statuses for ", want, " request items"));
}

}  // namespace

GrpcRetrievalClient::GrpcRetrievalClient(const std::string& target,
                                         const GrpcClientOptions& options)
    : target_(target), options_(options) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(options.max_message_bytes);
  args.SetMaxSendMessageSize(options.max_message_bytes);
  args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS,
              static_cast<int>(absl::ToInt64Milliseconds(options.keepalive)));
  args.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS,
              static_cast<int>(absl::ToInt64Milliseconds(options.keepalive_timeout)));
  args.SetInt(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  args.SetInt(GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA, 0);  // no cap: pings keep going
  // Not GRPC_ARG_MIN_RECONNECT_BACKOFF_MS: gRPC reads it as the minimum
  // connect timeout, and a short one turns a peer that accepts but never
  // speaks into UNAVAILABLE instead of each call's DEADLINE_EXCEEDED.
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS,
              static_cast<int>(absl::ToInt64Milliseconds(options.initial_reconnect_backoff)));
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS,
              static_cast<int>(absl::ToInt64Milliseconds(options.max_reconnect_backoff)));
  if (!options.tls_server_name.empty()) args.SetSslTargetNameOverride(options.tls_server_name);
  channel_ = grpc::CreateCustomChannel(
      target,
      options.credentials != nullptr ? options.credentials : grpc::InsecureChannelCredentials(),
      args);
  stub_ = v1::RetrievalNode::NewStub(channel_);
}

GrpcRetrievalClient::~GrpcRetrievalClient() {
  {
    std::lock_guard<std::mutex> lock(health_mu_);
    health_stop_ = true;
    if (health_context_ != nullptr) health_context_->TryCancel();
  }
  health_cv_.notify_all();
  if (health_thread_.joinable()) health_thread_.join();
  {
    std::lock_guard<std::mutex> lock(lease_mu_);
    lease_stop_ = true;
  }
  lease_cv_.notify_all();
  if (lease_thread_.joinable()) lease_thread_.join();
}

absl::StatusOr<RenewLeasesResult> GrpcRetrievalClient::RenewLeases() {
  grpc::ClientContext context;
  SetDeadline(&context, options_.control_timeout);
  v1::RenewLeasesRequest request;
  request.set_lease_owner(ProcessLeaseOwner());
  v1::RenewLeasesResponse response;
  KVR_RETURN_IF_ERROR(FromGrpcStatus(stub_->RenewLeases(&context, request, &response)));
  return RenewLeasesResult{response.sequences(), response.lease_seconds()};
}

void GrpcRetrievalClient::StartLeaseRenewal() {
  std::lock_guard<std::mutex> lock(lease_mu_);
  if (lease_thread_.joinable() || lease_stop_) return;
  lease_thread_ = std::thread([this] { LeaseLoop(); });
}

void GrpcRetrievalClient::LeaseLoop() {
  // Renew a third of the node's lease period after the last renewal (at
  // least every 20 s, at most every 50 ms); after a failure (node down or
  // restarting) try again within a second.
  absl::Duration wait = absl::Milliseconds(50);
  std::unique_lock<std::mutex> lock(lease_mu_);
  for (;;) {
    lease_cv_.wait_for(lock, absl::ToChronoNanoseconds(wait), [&] { return lease_stop_; });
    if (lease_stop_) return;
    lock.unlock();
    absl::StatusOr<RenewLeasesResult> renewed = RenewLeases();
    lock.lock();
    if (!renewed.ok()) {
      wait = std::min(wait, absl::Seconds(1));
      continue;
    }
    wait = renewed->lease_seconds > 0
               ? std::clamp(absl::Seconds(renewed->lease_seconds / 3), absl::Milliseconds(50),
                            absl::Seconds(20))
               : absl::Seconds(20);
  }
}

void GrpcRetrievalClient::WatchHealth(std::function<void(bool serving)> on_change,
                                      absl::Duration retry) {
  KVR_CHECK(!health_thread_.joinable());
  health_thread_ = std::thread([this, on_change = std::move(on_change), retry] {
    HealthLoop(on_change, retry);
  });
}

void GrpcRetrievalClient::HealthLoop(const std::function<void(bool)>& on_change,
                                     absl::Duration retry) {
  auto health = grpc::health::v1::Health::NewStub(channel_);
  std::optional<bool> reported;
  auto report = [&](bool serving) {
    if (reported != serving) on_change(serving);
    reported = serving;
  };
  for (;;) {
    grpc::ClientContext context;
    // The stream lives until the node goes (or this client does); the
    // deadline only bounds a watch that would otherwise never end, and its
    // expiry while SERVING just re-opens it.
    SetDeadline(&context, absl::Minutes(10));
    context.set_wait_for_ready(false);
    {
      std::lock_guard<std::mutex> lock(health_mu_);
      if (health_stop_) return;
      health_context_ = &context;
    }
    grpc::health::v1::HealthCheckRequest request;  // "": the whole server
    std::unique_ptr<grpc::ClientReader<grpc::health::v1::HealthCheckResponse>> reader =
        health->Watch(&context, request);
    grpc::health::v1::HealthCheckResponse response;
    while (reader->Read(&response)) {
      report(response.status() == grpc::health::v1::HealthCheckResponse::SERVING);
    }
    const grpc::Status status = reader->Finish();
    {
      std::unique_lock<std::mutex> lock(health_mu_);
      health_context_ = nullptr;
      if (health_stop_) return;
      if (status.error_code() != grpc::StatusCode::DEADLINE_EXCEEDED) {
        lock.unlock();
        report(false);
        lock.lock();
      }
      // Then re-open after `retry`; while the node is away the attempt
      // fails fast (no wait_for_ready) and the channel's capped backoff
      // decides when a connection is tried again.
      health_cv_.wait_for(lock, absl::ToChronoNanoseconds(retry), [&] { return health_stop_; });
      if (health_stop_) return;
    }
  }
}

absl::StatusOr<std::unique_ptr<GrpcRetrievalClient>> GrpcRetrievalClient::Create(
    const std::string& target, const GrpcClientOptions& options) {
  if (target.empty()) return absl::InvalidArgumentError("gRPC target is empty");
  if (options.upload_chunk_bytes < 4096 ||
      options.upload_chunk_bytes + 4096 > static_cast<size_t>(options.max_message_bytes)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "upload_chunk_bytes ", options.upload_chunk_bytes, " outside [4096, max_message_bytes ",
        options.max_message_bytes, " - 4096]"));
  }
  for (absl::Duration t : {options.keepalive, options.keepalive_timeout,
                           options.initial_reconnect_backoff, options.max_reconnect_backoff}) {
    if (t < absl::Milliseconds(1) || t > absl::Hours(1)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "keepalive / reconnect backoff ", absl::FormatDuration(t), " outside [1ms, 1h]"));
    }
  }
  if (options.initial_reconnect_backoff > options.max_reconnect_backoff) {
    return absl::InvalidArgumentError("initial_reconnect_backoff > max_reconnect_backoff");
  }
  for (absl::Duration t : {options.attend_timeout, options.upload_timeout,
                           options.control_timeout, options.sync_timeout}) {
    if (t <= absl::ZeroDuration()) {
      return absl::InvalidArgumentError(
          absl::StrCat("timeouts must be > 0, got ", absl::FormatDuration(t)));
    }
  }
  return std::unique_ptr<GrpcRetrievalClient>(new GrpcRetrievalClient(target, options));
}

absl::Status GrpcRetrievalClient::WaitForReady(absl::Duration timeout) {
  const auto deadline = std::chrono::system_clock::now() + absl::ToChronoNanoseconds(timeout);
  if (!channel_->WaitForConnected(deadline)) {
    return absl::DeadlineExceededError(absl::StrCat("no connection to ", target_, " within ",
                                                    absl::FormatDuration(timeout)));
  }
  return absl::OkStatus();
}

absl::Status GrpcRetrievalClient::CreateSequence(const SequenceSpec& spec) {
  grpc::ClientContext context;
  SetDeadline(&context, options_.control_timeout);
  v1::CreateSequenceRequest request;
  SequenceSpecToProto(spec, request.mutable_spec());
  v1::CreateSequenceResponse response;
  return FromGrpcStatus(stub_->CreateSequence(&context, request, &response));
}

absl::Status GrpcRetrievalClient::CreateSequence(const SequenceSpec& spec,
                                                 std::string_view capability) {
  grpc::ClientContext context;
  SetDeadline(&context, options_.control_timeout);
  v1::CreateSequenceRequest request;
  SequenceSpecToProto(spec, request.mutable_spec());
  request.set_capability(std::string(capability));
  request.set_lease_owner(ProcessLeaseOwner());
  v1::CreateSequenceResponse response;
  KVR_RETURN_IF_ERROR(FromGrpcStatus(stub_->CreateSequence(&context, request, &response)));
  StartLeaseRenewal();
  return absl::OkStatus();
}

absl::Status GrpcRetrievalClient::ForkSequence(uint64_t source_id,
                                               std::string_view source_capability,
                                               uint64_t fork_id, std::string_view fork_capability) {
  grpc::ClientContext context;
  SetDeadline(&context, options_.control_timeout);
  v1::ForkSequenceRequest request;
  request.set_source_sequence_id(source_id);
  request.set_source_capability(std::string(source_capability));
  request.set_sequence_id(fork_id);
  request.set_capability(std::string(fork_capability));
  request.set_lease_owner(ProcessLeaseOwner());
  v1::ForkSequenceResponse response;
  KVR_RETURN_IF_ERROR(FromGrpcStatus(stub_->ForkSequence(&context, request, &response)));
  StartLeaseRenewal();
  return absl::OkStatus();
}

absl::Status GrpcRetrievalClient::UploadShard(const ShardUpload& upload) {
  const size_t n = upload.keys.rows(), d = upload.keys.cols();
  if (upload.values.rows() != n || upload.values.cols() != d) {
    return absl::InvalidArgumentError(absl::StrCat("values ", upload.values.rows(), " x ",
                                                   upload.values.cols(), " != keys ", n, " x ", d));
  }
  if (upload.train_queries.rows() > 0 && upload.train_queries.cols() != d) {
    return absl::InvalidArgumentError(absl::StrCat("train_queries dim ",
                                                   upload.train_queries.cols(), " != ", d));
  }
  size_t topk_rows = 0;
  if (!upload.train_topk.empty()) {
    const size_t w = upload.train_topk_width;
    if (w == 0 || upload.train_topk.size() % w != 0) {
      return absl::InvalidArgumentError(absl::StrCat("train_topk size ", upload.train_topk.size(),
                                                     " is not a multiple of train_topk_width ",
                                                     w));
    }
    topk_rows = upload.train_topk.size() / w;
  }
  const size_t holdout_rows = upload.holdout_queries.rows();
  if (holdout_rows > 0 &&
      (upload.holdout_queries.cols() != d ||
       upload.holdout_topk.size() != holdout_rows * upload.holdout_topk_width)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "holdout_queries ", holdout_rows, " x ", upload.holdout_queries.cols(), " with ",
        upload.holdout_topk.size(), " holdout_topk ids do not match head_dim ", d,
        " x holdout_topk_width ", upload.holdout_topk_width));
  }

  grpc::ClientContext context;
  SetDeadline(&context, options_.upload_timeout);
  v1::UploadShardResponse response;
  std::unique_ptr<grpc::ClientWriter<v1::UploadShardRequest>> writer =
      stub_->UploadShard(&context, &response);

  v1::UploadShardRequest message;
  v1::ShardHeader* h = message.mutable_header();
  ShardKeyToProto(upload.key, h->mutable_key());
  h->set_first_position(upload.first_position);
  h->set_capability(upload.capability);
  h->set_n_keys(static_cast<int64_t>(n));
  h->set_head_dim(static_cast<int32_t>(d));
  h->set_key_dtype(v1::DTYPE_F32);
  h->set_value_dtype(v1::DTYPE_F32);
  h->set_train_topk_rows(static_cast<int64_t>(topk_rows));
  h->set_train_topk_width(topk_rows > 0 ? static_cast<int32_t>(upload.train_topk_width) : 0);
  h->set_train_query_rows(static_cast<int64_t>(upload.train_queries.rows()));
  h->set_train_k(upload.train_queries.rows() > 0 ? upload.train_k : 0);
  h->set_holdout_query_rows(static_cast<int64_t>(holdout_rows));
  h->set_holdout_topk_width(holdout_rows > 0 ? static_cast<int32_t>(upload.holdout_topk_width)
                                             : 0);

  // Header first, then each tensor in row batches of about upload_chunk_bytes.
  bool open = writer->Write(message);
  auto send_rows = [&](ConstMatrixView m, std::string* (v1::ShardData::*field)()) {
    if (m.rows() == 0 || m.cols() == 0 || !open) return;
    const size_t rows_per = std::max<size_t>(1, options_.upload_chunk_bytes / (m.cols() * 4));
    for (size_t b = 0; b < m.rows() && open; b += rows_per) {
      message.Clear();
      AppendRows(m, b, std::min(m.rows(), b + rows_per), (message.mutable_data()->*field)());
      open = writer->Write(message);
    }
  };
  send_rows(upload.keys, &v1::ShardData::mutable_keys);
  send_rows(upload.values, &v1::ShardData::mutable_values);
  // Ids as packed int32; out-of-range ids become an id the node rejects
  // with a clear message.
  auto send_ids = [&](std::span<const int64_t> ids, std::string* (v1::ShardData::*field)()) {
    const size_t per = std::max<size_t>(1, options_.upload_chunk_bytes / sizeof(int32_t));
    for (size_t b = 0; b < ids.size() && open; b += per) {
      message.Clear();
      std::string* out = (message.mutable_data()->*field)();
      const size_t e = std::min(ids.size(), b + per);
      out->resize((e - b) * sizeof(int32_t));
      for (size_t i = b; i < e; ++i) {
        const int64_t id = ids[i];
        const int32_t v = id < -1 || id > std::numeric_limits<int32_t>::max()
                              ? std::numeric_limits<int32_t>::min()
                              : static_cast<int32_t>(id);
        std::memcpy(out->data() + (i - b) * sizeof(int32_t), &v, sizeof(int32_t));
      }
      open = writer->Write(message);
    }
  };
  if (topk_rows > 0) send_ids(upload.train_topk, &v1::ShardData::mutable_train_topk);
  send_rows(upload.train_queries, &v1::ShardData::mutable_train_queries);
  if (holdout_rows > 0) {
    send_rows(upload.holdout_queries, &v1::ShardData::mutable_holdout_queries);
    send_ids(upload.holdout_topk, &v1::ShardData::mutable_holdout_topk);
  }
  if (open) writer->WritesDone();
  return FromGrpcStatus(writer->Finish());
}

absl::Status GrpcRetrievalClient::Append(const AppendRequest& request) {
  grpc::ClientContext context;
  SetDeadline(&context, options_.control_timeout);
  v1::AppendRequest message;
  AppendRequestToProto(request, &message);
  v1::AppendResponse response;
  return FromGrpcStatus(stub_->Append(&context, message, &response));
}

struct GrpcRetrievalClient::AppendCall {
  HeadId head;
  grpc::ClientContext context;
  v1::AppendRequest request;
  v1::AppendResponse response;
  StatusCallback done;
};

void GrpcRetrievalClient::AppendAsync(const AppendRequest& request, StatusCallback done) {
  auto call = std::make_unique<AppendCall>();
  call->head = HeadId{request.sequence_id, request.layer, request.kv_head};
  SetDeadline(&call->context, options_.control_timeout);
  AppendRequestToProto(request, &call->request);
  call->done = std::move(done);
  AppendCall* raw = call.get();
  bool send_now = false;
  {
    std::lock_guard<std::mutex> lock(append_mu_);
    std::deque<std::unique_ptr<AppendCall>>& queue = append_queues_[raw->head];
    queue.push_back(std::move(call));
    send_now = queue.size() == 1;
  }
  if (send_now) SendAppend(raw);
}

void GrpcRetrievalClient::SendAppend(AppendCall* call) {
  // The callback may run on a gRPC thread: it sees what was done to `call`
  // before the call started (TSan cannot see gRPC's own ordering).
  KVR_TSAN_RELEASE(call);
  stub_->async()->Append(&call->context, &call->request, &call->response,
                         [this, call](grpc::Status status) {
                           KVR_TSAN_ACQUIRE(call);
                           OnAppendDone(call, FromGrpcStatus(status));
                         });
}

void GrpcRetrievalClient::OnAppendDone(AppendCall* call, absl::Status status) {
  std::unique_ptr<AppendCall> owned;
  AppendCall* next = nullptr;
  {
    std::lock_guard<std::mutex> lock(append_mu_);
    auto it = append_queues_.find(call->head);
    KVR_CHECK(it != append_queues_.end() && it->second.front().get() == call);
    owned = std::move(it->second.front());
    it->second.pop_front();
    if (it->second.empty()) {
      append_queues_.erase(it);
    } else {
      next = it->second.front().get();
    }
  }
  if (next != nullptr) SendAppend(next);
  StatusCallback done = std::move(owned->done);
  owned.reset();
  done(std::move(status));
}

void GrpcRetrievalClient::AttendAsync(const AttendRequest& request, PartialsView out,
                                      AttendStats* stats, StatusCallback done) {
  struct Call {
    grpc::ClientContext context;
    v1::AttendRequest request;
    v1::AttendResponse response;
    PartialsView out;
    AttendStats* stats = nullptr;
    StatusCallback done;
  };
  auto call = std::make_unique<Call>();
  SetDeadline(&call->context, options_.attend_timeout);
  AttendRequestToProto(request, &call->request);
  call->out = out;
  call->stats = stats;
  call->done = std::move(done);
  Call* raw = call.release();
  KVR_TSAN_RELEASE(raw);  // as in SendAppend
  stub_->async()->Attend(&raw->context, &raw->request, &raw->response,
                         [raw](grpc::Status grpc_status) {
                           KVR_TSAN_ACQUIRE(raw);
                           std::unique_ptr<Call> owned(raw);
                           absl::Status status = FromGrpcStatus(grpc_status);
                           if (status.ok()) {
                             status = UnpackPartials(owned->response.partials(), owned->out);
                           }
                           if (status.ok()) UnpackStats(owned->response.stats(), owned->stats);
                           StatusCallback callback = std::move(owned->done);
                           owned.reset();
                           callback(std::move(status));
                         });
}

void GrpcRetrievalClient::AttendBatchAsync(std::span<AttendBatchItem> items,
                                           StatusCallback done) {
  if (items.empty()) {
    done(absl::OkStatus());
    return;
  }
  struct Call {
    grpc::ClientContext context;
    v1::AttendBatchRequest request;
    v1::AttendBatchResponse response;
    std::span<AttendBatchItem> items;
    StatusCallback done;
  };
  auto call = std::make_unique<Call>();
  SetDeadline(&call->context, options_.attend_timeout);
  call->request.mutable_items()->Reserve(static_cast<int>(items.size()));
  for (const AttendBatchItem& item : items) {
    AttendRequestToProto(item.request, call->request.add_items());
  }
  call->items = items;
  call->done = std::move(done);
  Call* raw = call.release();
  KVR_TSAN_RELEASE(raw);  // as in SendAppend
  stub_->async()->AttendBatch(
      &raw->context, &raw->request, &raw->response, [raw](grpc::Status grpc_status) {
        KVR_TSAN_ACQUIRE(raw);
        std::unique_ptr<Call> owned(raw);
        const v1::AttendBatchResponse& r = owned->response;
        absl::Status status = FromGrpcStatus(grpc_status);
        if (status.ok()) {
          status = CheckBatchReply(r.items_size(), r.statuses_size(), owned->items.size(),
                                   "AttendBatch");
        }
        for (size_t i = 0; i < owned->items.size(); ++i) {
          AttendBatchItem& item = owned->items[i];
          if (!status.ok()) {
            item.status = status;
            continue;
          }
          const int slot = static_cast<int>(i);
          item.status = ItemStatusFromProto(r.statuses(slot));
          if (item.status.ok()) item.status = UnpackPartials(r.items(slot).partials(), item.out);
          if (item.status.ok()) UnpackStats(r.items(slot).stats(), item.stats);
        }
        StatusCallback callback = std::move(owned->done);
        owned.reset();
        callback(std::move(status));
      });
}

void GrpcRetrievalClient::AppendBatchAsync(std::span<AppendBatchItem> items,
                                           StatusCallback done) {
  if (items.empty()) {
    done(absl::OkStatus());
    return;
  }
  struct Call {
    grpc::ClientContext context;
    v1::AppendBatchRequest request;
    v1::AppendBatchResponse response;
    std::span<AppendBatchItem> items;
    StatusCallback done;
  };
  auto call = std::make_unique<Call>();
  SetDeadline(&call->context, options_.control_timeout);
  call->request.mutable_items()->Reserve(static_cast<int>(items.size()));
  for (const AppendBatchItem& item : items) AppendRequestToProto(item.request, call->request.add_items());
  call->items = items;
  call->done = std::move(done);
  Call* raw = call.release();
  KVR_TSAN_RELEASE(raw);  // as in SendAppend
  stub_->async()->AppendBatch(
      &raw->context, &raw->request, &raw->response, [raw](grpc::Status grpc_status) {
        KVR_TSAN_ACQUIRE(raw);
        std::unique_ptr<Call> owned(raw);
        const v1::AppendBatchResponse& r = owned->response;
        absl::Status status = FromGrpcStatus(grpc_status);
        if (status.ok()) {
          status = CheckBatchReply(r.items_size(), r.statuses_size(), owned->items.size(),
                                   "AppendBatch");
        }
        for (size_t i = 0; i < owned->items.size(); ++i) {
          owned->items[i].status =
              status.ok() ? ItemStatusFromProto(r.statuses(static_cast<int>(i))) : status;
        }
        StatusCallback callback = std::move(owned->done);
        owned.reset();
        callback(std::move(status));
      });
}

absl::StatusOr<SyncResult> GrpcRetrievalClient::SyncShards(const SyncRequest& request) {
  grpc::ClientContext context;
  SetDeadline(&context, options_.sync_timeout);
  v1::SyncShardsRequest message;
  SyncRequestToProto(request, &message);
  // A sequence the sync creates is leased to this process (unless the
  // caller named another owner).
  const bool leased = request.lease_owner.empty() && !request.capability.empty();
  if (leased) message.set_lease_owner(ProcessLeaseOwner());
  v1::SyncShardsResponse response;
  KVR_RETURN_IF_ERROR(FromGrpcStatus(stub_->SyncShards(&context, message, &response)));
  if (leased) StartLeaseRenewal();
  return SyncResultFromProto(response);
}

absl::Status GrpcRetrievalClient::DropSequence(uint64_t sequence_id) {
  return DropSequence(sequence_id, "");
}

absl::Status GrpcRetrievalClient::DropSequence(uint64_t sequence_id,
                                               std::string_view capability) {
  grpc::ClientContext context;
  SetDeadline(&context, options_.control_timeout);
  v1::DropSequenceRequest request;
  request.set_sequence_id(sequence_id);
  request.set_capability(std::string(capability));
  v1::DropSequenceResponse response;
  return FromGrpcStatus(stub_->DropSequence(&context, request, &response));
}

absl::StatusOr<NodeStats> GrpcRetrievalClient::Stats() {
  grpc::ClientContext context;
  SetDeadline(&context, options_.control_timeout);
  v1::StatsResponse response;
  KVR_RETURN_IF_ERROR(FromGrpcStatus(stub_->Stats(&context, v1::StatsRequest(), &response)));
  NodeStats st;
  st.sequences = response.sequences();
  st.shards = response.shards();
  st.indexed_keys = response.indexed_keys();
  st.tail_keys = response.tail_keys();
  st.seals = response.seals();
  st.memory_bytes = response.memory_bytes();
  st.quarantined_sequences = response.quarantined_sequences();
  st.shard_uploads = response.shard_uploads();
  st.forks = response.forks();
  return st;
}

absl::StatusOr<std::vector<ShardInfo>> GrpcRetrievalClient::ListShards(
    std::optional<uint64_t> sequence_id, std::string_view capability) {
  grpc::ClientContext context;
  SetDeadline(&context, options_.control_timeout);
  v1::ListShardsRequest request;
  if (sequence_id.has_value()) request.set_sequence_id(*sequence_id);
  request.set_capability(std::string(capability));
  v1::ListShardsResponse response;
  KVR_RETURN_IF_ERROR(FromGrpcStatus(stub_->ListShards(&context, request, &response)));
  std::vector<ShardInfo> out;
  out.reserve(static_cast<size_t>(response.shards_size()));
  for (const v1::ShardInfo& s : response.shards()) {
    KVR_ASSIGN_OR_RETURN(ShardInfo info, ShardInfoFromProto(s));
    out.push_back(info);
  }
  return out;
}

}  // namespace kvr::retrieval
