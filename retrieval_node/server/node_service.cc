#include "retrieval_node/server/node_service.h"

#include <malloc.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include "common/tsan_annotations.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "retrieval_node/index/index.h"
#include "retrieval_node/wire/proto_convert.h"

namespace kvr::retrieval {
namespace {

// Appended rows per Append call.
constexpr int64_t kMaxAppendRows = int64_t{1} << 20;
// Query heads per Attend.
constexpr int64_t kMaxQueryHeads = 1 << 12;

using Clock = std::chrono::steady_clock;

// Counts the finished call (kvr_node_requests_total / _duration_seconds) when
// the node has metrics. Runs before Finish, so a client that sees the reply
// also sees it counted.
void Record(NodeMetrics* metrics, NodeMethod method, Clock::time_point start,
            const absl::Status& status) {
  if (metrics == nullptr) return;
  metrics->RecordRequest(method, status.code(),
                         std::chrono::duration<double>(Clock::now() - start).count());
}

void FinishAndRecord(grpc::ServerUnaryReactor* reactor, const absl::Status& status,
                     NodeMetrics* metrics, NodeMethod method, Clock::time_point start) {
  Record(metrics, method, start, status);
  reactor->Finish(ToGrpcStatus(status));
}

grpc::ServerUnaryReactor* FinishNow(grpc::CallbackServerContext* context,
                                    const absl::Status& status, NodeMetrics* metrics,
                                    NodeMethod method, Clock::time_point start) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  FinishAndRecord(reactor, status, metrics, method, start);
  return reactor;
}

// InvalidArgument naming max_deadline_seconds when `context` has no
// deadline or one more than `max_seconds` away (0: no cap).
absl::Status CheckDeadline(const grpc::CallbackServerContext* context, double max_seconds) {
  if (max_seconds <= 0) return absl::OkStatus();
  const auto deadline = context->deadline();
  if (deadline == std::chrono::system_clock::time_point::max()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the call has no deadline; set one of at most max_deadline_seconds ", max_seconds));
  }
  const double seconds =
      std::chrono::duration<double>(deadline - std::chrono::system_clock::now()).count();
  if (seconds > max_seconds) {
    return absl::InvalidArgumentError(absl::StrCat("deadline ", seconds,
                                                   " s away exceeds max_deadline_seconds ",
                                                   max_seconds));
  }
  return absl::OkStatus();
}

// The caller's principal (tenant isolation): the Subject CN of the peer's
// certificate when the call came over TLS with one ("x509_common_name" in
// the auth context), "" otherwise (insecure: every caller is the same "").
std::string PeerPrincipal(const grpc::CallbackServerContext* context) {
  const std::shared_ptr<const grpc::AuthContext> auth = context->auth_context();
  if (auth == nullptr) return "";
  const std::vector<grpc::string_ref> cn = auth->FindPropertyValues("x509_common_name");
  if (cn.empty()) return "";
  return std::string(cn.front().data(), cn.front().size());
}

absl::Status CheckAttendRequest(const v1::AttendRequest& r) {
  if (r.queries().dtype() != v1::DTYPE_F32) {
    return absl::InvalidArgumentError(absl::StrCat("queries.dtype ", r.queries().dtype(),
                                                   " must be DTYPE_F32 (1)"));
  }
  KVR_ASSIGN_OR_RETURN(const int64_t bytes,
                       PackedBytes(r.queries().rows(), r.queries().cols(), DType::kF32,
                                   kMaxQueryHeads, static_cast<int64_t>(index::kMaxDim),
                                   "queries"));
  if (r.queries().rows() < 1) {
    return absl::InvalidArgumentError("queries rows 0: need one row per query head");
  }
  if (static_cast<int64_t>(r.queries().data().size()) != bytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "queries.data has ", r.queries().data().size(), " bytes, expected rows ",
        r.queries().rows(), " x cols ", r.queries().cols(), " x 4 (f32) = ", bytes));
  }
  if (r.k() < 1 || r.k() > index::kMaxSearchK) {
    return absl::InvalidArgumentError(
        absl::StrCat("k ", r.k(), " outside [1, ", index::kMaxSearchK, "]"));
  }
  if (r.beam() < 0 || r.beam() > NodeService::kMaxBeam) {
    return absl::InvalidArgumentError(
        absl::StrCat("beam ", r.beam(), " outside [0, ", NodeService::kMaxBeam, "]"));
  }
  if (r.nprobe() < 0 || r.nprobe() > NodeService::kMaxNprobe) {
    return absl::InvalidArgumentError(
        absl::StrCat("nprobe ", r.nprobe(), " outside [0, ", NodeService::kMaxNprobe, "]"));
  }
  if (!std::isfinite(r.scale()) || r.scale() < 0.0f) {
    return absl::InvalidArgumentError(
        absl::StrCat("scale ", r.scale(), " must be finite and >= 0"));
  }
  if (!v1::EstimateMode_IsValid(r.estimate())) {
    return absl::InvalidArgumentError(
        absl::StrCat("estimate ", static_cast<int>(r.estimate()),
                     " is not an EstimateMode (0 default, 1 off, 2 on)"));
  }
  if (r.layer() < 0) {
    return absl::InvalidArgumentError(absl::StrCat("layer ", r.layer(), " < 0"));
  }
  return absl::OkStatus();
}

// Unpacks and checks an Append's matrices into `keys` / `values` and points
// `out` at them (InvalidArgument naming the field).
absl::Status AppendFromProto(const v1::AppendRequest& request, Matrix* keys, Matrix* values,
                             AppendRequest* out) {
  KVR_RETURN_IF_ERROR(UnpackMatrix(request.keys(), kMaxAppendRows, 0, true, "keys", keys));
  KVR_RETURN_IF_ERROR(UnpackMatrix(request.values(), kMaxAppendRows,
                                   static_cast<int64_t>(keys->cols), true, "values", values));
  if (values->rows != keys->rows) {
    return absl::InvalidArgumentError(
        absl::StrCat("values.rows ", values->rows, " != keys.rows ", keys->rows));
  }
  out->sequence_id = request.sequence_id();
  out->layer = request.layer();
  out->kv_head = request.kv_head();
  out->first_position = request.first_position();
  out->capability = request.capability();
  out->keys = keys->view();
  out->values = values->view();
  return absl::OkStatus();
}

// ResourceExhausted naming max_batch_items when a batch carries more items.
absl::Status CheckBatchSize(int items, size_t limit, absl::string_view what) {
  if (static_cast<size_t>(items) <= limit) return absl::OkStatus();
  return absl::ResourceExhaustedError(
      absl::StrCat(what, ": ", items, " items exceed max_batch_items ", limit));
}

// Adds n empty items and n statuses to a batch response (AttendBatch /
// AppendBatch) before any item starts, so items fill distinct slots, even
// concurrently.
template <typename BatchResponse>
void AddBatchSlots(BatchResponse* response, int n) {
  response->mutable_items()->Reserve(n);
  response->mutable_statuses()->Reserve(n);
  for (int i = 0; i < n; ++i) {
    response->add_items();
    response->add_statuses();
  }
}

// Joins a batch's items: sets statuses[i] as each finishes, then runs
// `done` (OK) after the last.
struct BatchJoin {
  std::atomic<size_t> left;
  std::function<void(absl::Status)> done;
  BatchJoin(size_t n, std::function<void(absl::Status)> d) : left(n), done(std::move(d)) {}
  void Finish(v1::ItemStatus* slot, const absl::Status& status) {
    slot->set_code(static_cast<int32_t>(status.code()));
    slot->set_message(std::string(status.message()));
    if (left.fetch_sub(1, std::memory_order_acq_rel) == 1) done(absl::OkStatus());
  }
};

// A SyncSource over the ReadShards stream of the kvr_node at `address`:
// one channel per sync (a destination syncs from a source rarely), the
// deadline of the SyncShards call, messages up to `max_message_bytes`.
class GrpcSyncSource final : public SyncSource {
 public:
  GrpcSyncSource(std::string address, std::chrono::system_clock::time_point deadline,
                 int max_message_bytes,
                 const std::shared_ptr<grpc::ChannelCredentials>& credentials)
      : address_(std::move(address)), deadline_(deadline) {
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(max_message_bytes);
    args.SetMaxSendMessageSize(max_message_bytes);
    stub_ = v1::RetrievalNode::NewStub(
        grpc::CreateCustomChannel(
            address_, credentials != nullptr ? credentials : grpc::InsecureChannelCredentials(),
            args));
  }

  absl::Status Read(const ReadShardsQuery& query,
                    const std::function<absl::Status(const SyncHeader&)>& on_header,
                    const std::function<absl::Status(SyncChunkData)>& on_chunk) override {
    grpc::ClientContext context;
    context.set_deadline(deadline_);
    v1::ReadShardsRequest request;
    ReadShardsQueryToProto(query, &request);
    std::unique_ptr<grpc::ClientReader<v1::ReadShardsResponse>> reader =
        stub_->ReadShards(&context, request);
    v1::ReadShardsResponse message;
    absl::Status mine;
    bool header = false;
    while (mine.ok() && reader->Read(&message)) {
      if (message.has_header() && !header) {
        header = true;
        absl::StatusOr<SyncHeader> h = SyncHeaderFromProto(message.header());
        mine = h.ok() ? on_header(*h) : h.status();
      } else if (message.has_chunk() && header) {
        absl::StatusOr<SyncChunkData> c = SyncChunkFromProto(message.chunk());
        mine = c.ok() ? on_chunk(std::move(c).value()) : c.status();
      } else {
        mine = absl::DataLossError(
            absl::StrCat("ReadShards from ", address_, ": message out of order"));
      }
    }
    if (!mine.ok()) context.TryCancel();
    const grpc::Status finished = reader->Finish();
    if (!mine.ok()) return mine;
    const absl::Status st = FromGrpcStatus(finished);
    if (st.ok()) return st;
    return absl::Status(st.code(), absl::StrCat("ReadShards from ", address_, ": ", st.message()));
  }

 private:
  std::string address_;
  std::chrono::system_clock::time_point deadline_;
  std::unique_ptr<v1::RetrievalNode::Stub> stub_;
};

}  // namespace

NodeService::NodeService(NodeCore* core, const NodeServiceOptions& options)
    : core_(core),
      options_(options),
      control_(std::make_unique<ThreadPool>(std::max<size_t>(1, options.control_threads))),
      upload_(std::make_unique<ThreadPool>(std::max<size_t>(1, options.upload_threads))),
      sync_(std::make_unique<ThreadPool>(std::max<size_t>(1, options.sync_threads))),
      read_(std::make_unique<ThreadPool>(std::max<size_t>(1, options.sync_threads))) {}

NodeService::~NodeService() {
  sync_.reset();
  read_.reset();
  upload_.reset();  // runs what is queued, then joins
  control_.reset();
}

// --- CreateSequence ------------------------------------------------------------

grpc::ServerUnaryReactor* NodeService::CreateSequence(grpc::CallbackServerContext* context,
                                                      const v1::CreateSequenceRequest* request,
                                                      v1::CreateSequenceResponse* response) {
  const Clock::time_point start = Clock::now();
  NodeMetrics* const metrics = options_.metrics;
  constexpr NodeMethod kMethod = NodeMethod::kCreateSequence;
  if (absl::Status st = CheckDeadline(context, options_.max_deadline_seconds); !st.ok()) {
    return FinishNow(context, st, metrics, kMethod, start);
  }
  if (!request->has_spec()) {
    return FinishNow(context, absl::InvalidArgumentError("spec missing"), metrics, kMethod, start);
  }
  absl::StatusOr<SequenceSpec> spec = SequenceSpecFromProto(request->spec());
  if (!spec.ok()) return FinishNow(context, spec.status(), metrics, kMethod, start);
  const SequenceAccess access{request->capability(), request->lease_owner(),
                              PeerPrincipal(context)};
  return FinishNow(context, core_->CreateSequence(*spec, access), metrics, kMethod, start);
}

// --- UploadShard -----------------------------------------------------------------

namespace {

// An upload's working memory (wire buffers, their fp32 copies, the index
// build's scratch; the reservation counts ~3x the payload) is freed when
// its build ends, but glibc keeps freed memory in its heaps (the main one
// and one arena per thread that allocated) rather than giving it back: a
// node held ~175 MiB above its shards after 8 uploads of 32K keys, two at a
// time (node_memory_test; docs/benchmarks.md §10 "Node memory over gRPC").
// Streams of at least this many payload bytes hand the free pages of every
// heap back to the OS (malloc_trim) once their buffers are freed, on the
// upload pool thread, before the reply. Smaller ones skip it: with 4 MiB
// buffers glibc reused the freed memory (~5% above the shards).
constexpr int64_t kTrimAfterUploadBytes = int64_t{8} << 20;

// Returns freed heap pages to the OS (glibc's malloc_trim: the top of each
// heap, and madvise(MADV_DONTNEED) on free pages inside them). Thread-safe;
// locks one arena at a time. A no-op on other C libraries.
void ReturnFreedMemory() {
#if defined(__GLIBC__)
  malloc_trim(0);
#endif
}

}  // namespace

class NodeService::UploadReactor final : public grpc::ServerReadReactor<v1::UploadShardRequest> {
 public:
  UploadReactor(NodeService* service, grpc::CallbackServerContext* context,
                v1::UploadShardResponse* response)
      : service_(service), context_(context), response_(response), start_(Clock::now()) {
    if (absl::Status st = CheckDeadline(context, service->options_.max_deadline_seconds);
        !st.ok()) {
      Done(st);
      return;
    }
    KVR_TSAN_RELEASE(this);  // gRPC orders StartRead before OnReadDone
    StartRead(&message_);
  }

  void OnReadDone(bool ok) override {
    KVR_TSAN_ACQUIRE(this);
    if (!ok) {  // the client half-closed, or the call is over
      if (context_->IsCancelled()) {
        Done(absl::CancelledError("UploadShard cancelled"));
        return;
      }
      service_->upload_->Schedule([this] {
        const absl::Status status = Build();
        ReleaseBuffers();
        if (payload_bytes_ >= kTrimAfterUploadBytes) ReturnFreedMemory();
        Done(status);
      });
      return;
    }
    absl::Status status;
    switch (message_.part_case()) {
      case v1::UploadShardRequest::kHeader:
        status = OnHeader(message_.header());
        break;
      case v1::UploadShardRequest::kData:
        status = OnData(message_.data());
        break;
      default:
        status = absl::InvalidArgumentError("UploadShard message sets neither header nor data");
    }
    if (!status.ok()) {
      Done(status);
      return;
    }
    message_.Clear();
    KVR_TSAN_RELEASE(this);
    StartRead(&message_);
  }

  void OnDone() override {
    KVR_TSAN_ACQUIRE(this);  // Done() may have run on the upload pool
    delete this;
  }

 private:
  void Done(const absl::Status& status) {
    // Before Finish: a client that has the reply sees the memory returned.
    admission_.shard.Release();
    admission_.working.Release();
    Record(service_->options_.metrics, NodeMethod::kUploadShard, start_, status);
    KVR_TSAN_RELEASE(this);  // gRPC orders Finish before OnDone
    Finish(ToGrpcStatus(status));
  }

  absl::Status OnHeader(const v1::ShardHeader& h) {
    if (have_header_) {
      return absl::FailedPreconditionError("UploadShard: a second header (send it once, first)");
    }
    have_header_ = true;
    header_ = h;
    const int64_t max_keys = static_cast<int64_t>(index::kMaxKeys);
    const int64_t max_dim = static_cast<int64_t>(index::kMaxDim);
    if (h.n_keys() < 1 || h.n_keys() > max_keys) {
      return absl::InvalidArgumentError(
          absl::StrCat("header.n_keys ", h.n_keys(), " outside [1, ", max_keys, "]"));
    }
    KVR_ASSIGN_OR_RETURN(key_dtype_, DTypeFromProto(h.key_dtype(), "header.key_dtype"));
    KVR_ASSIGN_OR_RETURN(value_dtype_, DTypeFromProto(h.value_dtype(), "header.value_dtype"));
    KVR_ASSIGN_OR_RETURN(keys_bytes_, PackedBytes(h.n_keys(), h.head_dim(), key_dtype_, max_keys,
                                                  max_dim, "header keys (n_keys x head_dim)"));
    KVR_ASSIGN_OR_RETURN(values_bytes_,
                         PackedBytes(h.n_keys(), h.head_dim(), value_dtype_, max_keys, max_dim,
                                     "header values (n_keys x head_dim)"));
    if (h.train_topk_rows() > 0 && h.train_query_rows() > 0) {
      return absl::InvalidArgumentError(
          "header sets both train_topk_rows and train_query_rows (at most one)");
    }
    topk_bytes_ = 0;
    if (h.train_topk_rows() != 0) {
      KVR_ASSIGN_OR_RETURN(topk_bytes_,
                           PackedBytes(h.train_topk_rows(), h.train_topk_width(), DType::kF32,
                                       max_keys, index::kMaxSearchK,
                                       "header train_topk (train_topk_rows x train_topk_width)"));
    }
    queries_bytes_ = 0;
    if (h.train_query_rows() != 0) {
      KVR_ASSIGN_OR_RETURN(queries_bytes_,
                           PackedBytes(h.train_query_rows(), h.head_dim(), key_dtype_, max_keys,
                                       max_dim, "header train_queries (train_query_rows x head_dim)"));
    }
    // Held-back queries for self-calibration (index/calibrate.h).
    const int64_t max_holdout = static_cast<int64_t>(index::kMaxHoldoutQueries);
    holdout_queries_bytes_ = holdout_topk_bytes_ = 0;
    if (h.holdout_query_rows() != 0) {
      KVR_ASSIGN_OR_RETURN(holdout_queries_bytes_,
                           PackedBytes(h.holdout_query_rows(), h.head_dim(), key_dtype_,
                                       max_holdout, max_dim,
                                       "header holdout_queries (holdout_query_rows x head_dim)"));
      KVR_ASSIGN_OR_RETURN(
          holdout_topk_bytes_,
          PackedBytes(h.holdout_query_rows(), h.holdout_topk_width(), DType::kF32, max_holdout,
                      index::kMaxSearchK,
                      "header holdout_topk (holdout_query_rows x holdout_topk_width)"));
    }
    if (h.train_k() < 0 || h.train_k() > index::kMaxSearchK) {
      return absl::InvalidArgumentError(
          absl::StrCat("header.train_k ", h.train_k(), " outside [0, ", index::kMaxSearchK, "]"));
    }
    const int64_t total = keys_bytes_ + values_bytes_ + topk_bytes_ + queries_bytes_ +
                          holdout_queries_bytes_ + holdout_topk_bytes_;
    payload_bytes_ = total;
    if (total > service_->options_.max_upload_bytes) {
      return absl::ResourceExhaustedError(
          absl::StrCat("UploadShard payload of ", total, " bytes exceeds max_upload_bytes ",
                       service_->options_.max_upload_bytes));
    }
    // Everything this stream will hold besides the shard itself, reserved
    // (upload_memory_bytes) before any of it is allocated and released when
    // the call ends (OnDone), plus the shard (memory_budget_bytes): the wire
    // buffers (`total`), their fp32 copies (keys, values, training queries),
    // the training ids as int64 and the persistence copy of the keys and
    // values (index blob + value segment). An upper estimate: buffers are
    // freed as the build goes, the reservation only at the end.
    const int64_t f32_row = int64_t{h.head_dim()} * int64_t{sizeof(float)};
    const int64_t working = total + 2 * h.n_keys() * f32_row + h.train_query_rows() * f32_row +
                            topk_bytes_ / int64_t{sizeof(int32_t)} * int64_t{sizeof(int64_t)} +
                            h.holdout_query_rows() * f32_row + holdout_topk_bytes_ * 2 +
                            2 * h.n_keys() * f32_row;
    KVR_ASSIGN_OR_RETURN(admission_,
                         service_->core_->ReserveUpload(h.key().sequence_id(),
                                                        static_cast<size_t>(h.n_keys()), working,
                                                        h.capability()));
    keys_.reserve(static_cast<size_t>(keys_bytes_));
    values_.reserve(static_cast<size_t>(values_bytes_));
    topk_.reserve(static_cast<size_t>(topk_bytes_));
    queries_.reserve(static_cast<size_t>(queries_bytes_));
    holdout_queries_.reserve(static_cast<size_t>(holdout_queries_bytes_));
    holdout_topk_.reserve(static_cast<size_t>(holdout_topk_bytes_));
    return absl::OkStatus();
  }

  static absl::Status AppendPart(const std::string& part, int64_t declared,
                                 absl::string_view field, std::string* buffer) {
    if (static_cast<int64_t>(buffer->size() + part.size()) > declared) {
      return absl::InvalidArgumentError(
          absl::StrCat("data.", field, ": more than the ", declared, " bytes the header declares"));
    }
    buffer->append(part);
    return absl::OkStatus();
  }

  absl::Status OnData(const v1::ShardData& d) {
    if (!have_header_) {
      return absl::FailedPreconditionError("UploadShard: data before the header");
    }
    KVR_RETURN_IF_ERROR(AppendPart(d.keys(), keys_bytes_, "keys", &keys_));
    KVR_RETURN_IF_ERROR(AppendPart(d.values(), values_bytes_, "values", &values_));
    KVR_RETURN_IF_ERROR(AppendPart(d.train_topk(), topk_bytes_, "train_topk", &topk_));
    KVR_RETURN_IF_ERROR(AppendPart(d.train_queries(), queries_bytes_, "train_queries", &queries_));
    KVR_RETURN_IF_ERROR(AppendPart(d.holdout_queries(), holdout_queries_bytes_, "holdout_queries",
                                   &holdout_queries_));
    return AppendPart(d.holdout_topk(), holdout_topk_bytes_, "holdout_topk", &holdout_topk_);
  }

  static absl::Status CheckComplete(const std::string& buffer, int64_t declared,
                                    absl::string_view field) {
    if (static_cast<int64_t>(buffer.size()) != declared) {
      return absl::InvalidArgumentError(absl::StrCat("data.", field, ": received ",
                                                     buffer.size(), " bytes, the header declares ",
                                                     declared));
    }
    return absl::OkStatus();
  }

  static std::span<const uint8_t> Bytes(const std::string& s) {
    return {reinterpret_cast<const uint8_t*>(s.data()), s.size()};
  }

  // Frees every buffer the stream still holds (the wire copies Build did not
  // consume, the last message read), before the memory is returned to the
  // OS. The stream reads nothing more once the client half-closed.
  void ReleaseBuffers() {
    for (std::string* b : {&keys_, &values_, &topk_, &queries_, &holdout_queries_,
                           &holdout_topk_}) {
      std::string().swap(*b);
    }
    v1::UploadShardRequest().Swap(&message_);
  }

  // Runs on the upload pool once the stream is complete.
  absl::Status Build() {
    if (!have_header_) return absl::InvalidArgumentError("UploadShard: stream without a header");
    KVR_RETURN_IF_ERROR(CheckComplete(keys_, keys_bytes_, "keys"));
    KVR_RETURN_IF_ERROR(CheckComplete(values_, values_bytes_, "values"));
    KVR_RETURN_IF_ERROR(CheckComplete(topk_, topk_bytes_, "train_topk"));
    KVR_RETURN_IF_ERROR(CheckComplete(queries_, queries_bytes_, "train_queries"));
    KVR_RETURN_IF_ERROR(
        CheckComplete(holdout_queries_, holdout_queries_bytes_, "holdout_queries"));
    KVR_RETURN_IF_ERROR(CheckComplete(holdout_topk_, holdout_topk_bytes_, "holdout_topk"));
    const auto n = static_cast<size_t>(header_.n_keys());
    const auto d = static_cast<size_t>(header_.head_dim());

    Matrix keys(0, d), values(0, d), queries(0, d);
    KVR_RETURN_IF_ERROR(UnpackFloats(Bytes(keys_), key_dtype_, "data.keys", &keys.data));
    keys.rows = n;
    std::string().swap(keys_);
    KVR_RETURN_IF_ERROR(CheckFinite(keys.data, "keys"));
    KVR_RETURN_IF_ERROR(UnpackFloats(Bytes(values_), value_dtype_, "data.values", &values.data));
    values.rows = n;
    std::string().swap(values_);
    KVR_RETURN_IF_ERROR(CheckFinite(values.data, "values"));
    std::vector<int64_t> topk(topk_.size() / sizeof(int32_t));
    for (size_t i = 0; i < topk.size(); ++i) {
      int32_t id;
      std::memcpy(&id, topk_.data() + i * sizeof(int32_t), sizeof(int32_t));
      topk[i] = id;
    }
    if (!queries_.empty()) {
      KVR_RETURN_IF_ERROR(
          UnpackFloats(Bytes(queries_), key_dtype_, "data.train_queries", &queries.data));
      queries.rows = static_cast<size_t>(header_.train_query_rows());
      KVR_RETURN_IF_ERROR(CheckFinite(queries.data, "train_queries"));
    }

    Matrix holdout(0, d);
    std::vector<int64_t> holdout_topk(holdout_topk_.size() / sizeof(int32_t));
    if (!holdout_queries_.empty()) {
      KVR_RETURN_IF_ERROR(UnpackFloats(Bytes(holdout_queries_), key_dtype_,
                                       "data.holdout_queries", &holdout.data));
      holdout.rows = static_cast<size_t>(header_.holdout_query_rows());
      KVR_RETURN_IF_ERROR(CheckFinite(holdout.data, "holdout_queries"));
      for (size_t i = 0; i < holdout_topk.size(); ++i) {
        int32_t id;
        std::memcpy(&id, holdout_topk_.data() + i * sizeof(int32_t), sizeof(int32_t));
        holdout_topk[i] = id;
      }
    }

    ShardUpload upload;
    upload.key = ShardKeyFromProto(header_.key());
    upload.capability = header_.capability();
    upload.first_position = header_.first_position();
    upload.keys = keys.view();
    upload.values = values.view();
    upload.train_topk = topk;
    upload.train_topk_width = topk.empty() ? 0 : static_cast<size_t>(header_.train_topk_width());
    upload.train_queries = queries.view();
    if (header_.train_k() > 0) upload.train_k = header_.train_k();
    upload.holdout_queries = holdout.view();
    upload.holdout_topk = holdout_topk;
    upload.holdout_topk_width =
        holdout_topk.empty() ? 0 : static_cast<size_t>(header_.holdout_topk_width());

    const auto start = std::chrono::steady_clock::now();
    // UploadShard reserves the shard's own bytes; the working part stays
    // reserved until the call ends.
    admission_.shard.Release();
    KVR_RETURN_IF_ERROR(service_->core_->UploadShard(upload));
    const double build_seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    response_->set_build_seconds(build_seconds);

    // Describe the new shard (best effort: the sequence may be gone already).
    v1::ShardInfo* info = response_->mutable_shard();
    *info->mutable_key() = header_.key();
    info->set_n_keys(header_.n_keys());
    info->set_first_position(header_.first_position());
    info->set_last_position(header_.first_position() + (header_.n_keys() - 1));
    absl::StatusOr<std::vector<ShardInfo>> shards =
        service_->core_->ListShards(upload.key.sequence_id, upload.capability);
    if (shards.ok()) {
      for (const ShardInfo& s : *shards) {
        if (s.key != upload.key) continue;
        ShardInfoToProto(s, info);
        // A deferred build is recorded when it installs (on_index_built).
        if (service_->options_.metrics != nullptr && !s.index_pending) {
          service_->options_.metrics->RecordIndexBuild(s.index_type, build_seconds);
          service_->options_.metrics->RecordIndexCalibration(s.index_type, s.measured_search_us,
                                                             s.expected_recall);
        }
      }
    }
    return absl::OkStatus();
  }

  NodeService* const service_;
  grpc::CallbackServerContext* const context_;
  v1::UploadShardResponse* const response_;
  v1::UploadShardRequest message_;
  const Clock::time_point start_;

  bool have_header_ = false;
  v1::ShardHeader header_;
  DType key_dtype_ = DType::kF32;
  DType value_dtype_ = DType::kF32;
  int64_t keys_bytes_ = 0, values_bytes_ = 0, topk_bytes_ = 0, queries_bytes_ = 0;
  int64_t holdout_queries_bytes_ = 0, holdout_topk_bytes_ = 0;
  int64_t payload_bytes_ = 0;  // all parts, as the header declares them
  std::string keys_, values_, topk_, queries_, holdout_queries_, holdout_topk_;
  NodeCore::UploadAdmission admission_;  // released in Done, before the reply
};

grpc::ServerReadReactor<v1::UploadShardRequest>* NodeService::UploadShard(
    grpc::CallbackServerContext* context, v1::UploadShardResponse* response) {
  return new UploadReactor(this, context, response);
}

// --- Append ------------------------------------------------------------------------

grpc::ServerUnaryReactor* NodeService::Append(grpc::CallbackServerContext* context,
                                              const v1::AppendRequest* request,
                                              v1::AppendResponse* response) {
  const Clock::time_point start = Clock::now();
  if (absl::Status st = CheckDeadline(context, options_.max_deadline_seconds); !st.ok()) {
    return FinishNow(context, st, options_.metrics, NodeMethod::kAppend, start);
  }
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  // The control thread applies the append in memory and queues its commit;
  // the reply goes out from the commit's completion once it is durable, so
  // no thread here waits on a sync and concurrent appends share one.
  control_->Schedule([this, reactor, request, response, start] {
    NodeMetrics* const metrics = options_.metrics;
    Matrix keys, values;
    AppendRequest a;
    if (absl::Status status = AppendFromProto(*request, &keys, &values, &a); !status.ok()) {
      FinishAndRecord(reactor, status, metrics, NodeMethod::kAppend, start);
      return;
    }
    const auto rows = static_cast<int64_t>(keys.rows);
    const int64_t first = a.first_position;
    core_->AppendAsync(a, [reactor, response, metrics, start, rows, first](absl::Status st) {
      if (st.ok()) {
        if (metrics != nullptr) metrics->RecordAppendedTokens(rows);
        // The core accepted the rows, so first + rows - 1 fits int64.
        response->set_last_position(rows > 0 ? first + (rows - 1) : -1);
      }
      FinishAndRecord(reactor, st, metrics, NodeMethod::kAppend, start);
    });
  });
  return reactor;
}

// --- Attend ------------------------------------------------------------------------

grpc::ServerUnaryReactor* NodeService::Attend(grpc::CallbackServerContext* context,
                                              const v1::AttendRequest* request,
                                              v1::AttendResponse* response) {
  if (absl::Status st = CheckDeadline(context, options_.max_deadline_seconds); !st.ok()) {
    return FinishNow(context, st, options_.metrics, NodeMethod::kAttend, Clock::now());
  }
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  HandleAttend(*request, response,
               [reactor](absl::Status status) { reactor->Finish(ToGrpcStatus(status)); });
  return reactor;
}

void NodeService::HandleAttend(const v1::AttendRequest& request, v1::AttendResponse* response,
                               std::function<void(absl::Status)> done, bool batch_item) {
  const Clock::time_point start = Clock::now();
  NodeMetrics* const metrics = options_.metrics;
  constexpr NodeMethod kMethod = NodeMethod::kAttend;
  auto finish = [metrics, start](const std::function<void(absl::Status)>& reply,
                                 absl::Status status) {
    Record(metrics, kMethod, start, status);
    reply(std::move(status));
  };
  if (absl::Status s = CheckAttendRequest(request); !s.ok()) {
    finish(done, std::move(s));
    return;
  }
  const auto n = static_cast<size_t>(request.queries().rows());
  const auto d = static_cast<size_t>(request.queries().cols());

  // Per-call buffers; the partials are copied into the reply at completion
  // (n x d floats: a few µs at Llama-3 shapes, and no alignment assumptions
  // about protobuf's string storage).
  struct Call {
    Matrix queries;
    Partials out;
    AttendStats stats;
    std::vector<HeadChunkRef> shards;
  };
  auto call = std::make_shared<Call>();
  if (absl::Status s = AttendShardsFromProto(request, kMaxAttendShards, &call->shards); !s.ok()) {
    finish(done, std::move(s));
    return;
  }
  const std::string& qbytes = request.queries().data();
  call->queries = Matrix(n, d);
  std::memcpy(call->queries.data.data(), qbytes.data(), qbytes.size());
  if (absl::Status s = CheckFinite(call->queries.data, "queries"); !s.ok()) {
    finish(done, std::move(s));
    return;
  }
  call->out = Partials(n, d);

  AttendRequest a;
  a.sequence_id = request.sequence_id();
  a.layer = request.layer();
  a.queries = call->queries.view();
  a.k = request.k();
  a.beam = request.beam();
  a.nprobe = request.nprobe();
  a.scale = request.scale();
  a.shards = call->shards;
  a.capability = request.capability();
  a.estimate = static_cast<EstimateMode>(static_cast<int32_t>(request.estimate()));

  auto complete = [response, call, n, d, metrics, finish,
                   done = std::move(done)](absl::Status status) {
                       if (status.ok()) {
                         v1::Partials* p = response->mutable_partials();
                         p->set_n(static_cast<int32_t>(n));
                         p->set_dim(static_cast<int32_t>(d));
                         p->set_o(call->out.o.data.data(), n * d * sizeof(float));
                         p->set_m(call->out.m.data(), n * sizeof(float));
                         p->set_l(call->out.l.data(), n * sizeof(float));
                         v1::AttendStats* st = response->mutable_stats();
                         st->set_shards_searched(call->stats.shards_searched);
                         st->set_keys_held(call->stats.keys_held);
                         st->set_keys_attended(call->stats.keys_attended);
                         st->set_distance_computations(call->stats.distance_computations);
                         st->set_keys_estimated(call->stats.keys_estimated);
                         st->set_clusters_estimated(call->stats.clusters_estimated);
                         st->set_keys_exact_zone(call->stats.keys_exact_zone);
                         if (metrics != nullptr) {
                           metrics->RecordAttendScan(static_cast<int64_t>(n),
                                                     call->stats.distance_computations);
                         }
                       }
                       finish(done, std::move(status));
  };
  if (batch_item) {
    core_->AttendBatchItemAsync(a, call->out.view(), &call->stats, std::move(complete));
  } else {
    core_->AttendAsync(a, call->out.view(), &call->stats, std::move(complete));
  }
}

// --- Batches -----------------------------------------------------------------------

grpc::ServerUnaryReactor* NodeService::AttendBatch(grpc::CallbackServerContext* context,
                                                   const v1::AttendBatchRequest* request,
                                                   v1::AttendBatchResponse* response) {
  const Clock::time_point start = Clock::now();
  if (absl::Status st = CheckDeadline(context, options_.max_deadline_seconds); !st.ok()) {
    return FinishNow(context, st, options_.metrics, NodeMethod::kAttendBatch, start);
  }
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  HandleAttendBatch(*request, response, [reactor, metrics = options_.metrics,
                                         start](absl::Status status) {
    FinishAndRecord(reactor, status, metrics, NodeMethod::kAttendBatch, start);
  });
  return reactor;
}

void NodeService::HandleAttendBatch(const v1::AttendBatchRequest& request,
                                    v1::AttendBatchResponse* response,
                                    std::function<void(absl::Status)> done) {
  const int n = request.items_size();
  if (absl::Status st = CheckBatchSize(n, options_.max_batch_items, "AttendBatch"); !st.ok()) {
    done(std::move(st));
    return;
  }
  if (options_.metrics != nullptr) options_.metrics->RecordAttendBatchItems(n);
  if (n == 0) {
    done(absl::OkStatus());
    return;
  }
  AddBatchSlots(response, n);
  auto join = std::make_shared<BatchJoin>(static_cast<size_t>(n), std::move(done));
  for (int i = 0; i < n; ++i) {
    v1::ItemStatus* slot = response->mutable_statuses(i);
    v1::AttendResponse* item = response->mutable_items(i);
    HandleAttend(
        request.items(i), item,
        [join, slot, item](absl::Status st) {
          if (!st.ok()) item->Clear();
          join->Finish(slot, st);
        },
        /*batch_item=*/true);
  }
}

grpc::ServerUnaryReactor* NodeService::AppendBatch(grpc::CallbackServerContext* context,
                                                   const v1::AppendBatchRequest* request,
                                                   v1::AppendBatchResponse* response) {
  const Clock::time_point start = Clock::now();
  if (absl::Status st = CheckDeadline(context, options_.max_deadline_seconds); !st.ok()) {
    return FinishNow(context, st, options_.metrics, NodeMethod::kAppendBatch, start);
  }
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  HandleAppendBatch(*request, response, [reactor, metrics = options_.metrics,
                                         start](absl::Status status) {
    FinishAndRecord(reactor, status, metrics, NodeMethod::kAppendBatch, start);
  });
  return reactor;
}

void NodeService::HandleAppendBatch(const v1::AppendBatchRequest& request,
                                    v1::AppendBatchResponse* response,
                                    std::function<void(absl::Status)> done) {
  const int n = request.items_size();
  if (absl::Status st = CheckBatchSize(n, options_.max_batch_items, "AppendBatch"); !st.ok()) {
    done(std::move(st));
    return;
  }
  if (n == 0) {
    done(absl::OkStatus());
    return;
  }
  AddBatchSlots(response, n);
  // As Append: the control thread applies every item in order and queues
  // its commit; each item's slot is filled from its commit's completion.
  control_->Schedule([this, &request, response, n, done = std::move(done)]() mutable {
    NodeMetrics* const metrics = options_.metrics;
    auto join = std::make_shared<BatchJoin>(static_cast<size_t>(n), std::move(done));
    for (int i = 0; i < n; ++i) {
      v1::ItemStatus* slot = response->mutable_statuses(i);
      Matrix keys, values;
      AppendRequest a;
      if (absl::Status st = AppendFromProto(request.items(i), &keys, &values, &a); !st.ok()) {
        join->Finish(slot, st);
        continue;
      }
      const auto rows = static_cast<int64_t>(keys.rows);
      const int64_t first = a.first_position;
      v1::AppendResponse* item = response->mutable_items(i);
      core_->AppendAsync(a, [join, slot, item, metrics, rows, first](absl::Status st) {
        if (st.ok()) {
          if (metrics != nullptr) metrics->RecordAppendedTokens(rows);
          item->set_last_position(rows > 0 ? first + (rows - 1) : -1);
        }
        join->Finish(slot, st);
      });
    }
  });
}

// --- Admin -------------------------------------------------------------------------

grpc::ServerUnaryReactor* NodeService::DropSequence(grpc::CallbackServerContext* context,
                                                    const v1::DropSequenceRequest* request,
                                                    v1::DropSequenceResponse* response) {
  const Clock::time_point start = Clock::now();
  if (absl::Status st = CheckDeadline(context, options_.max_deadline_seconds); !st.ok()) {
    return FinishNow(context, st, options_.metrics, NodeMethod::kDropSequence, start);
  }
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  control_->Schedule([this, reactor, request, start] {
    FinishAndRecord(reactor, core_->DropSequence(request->sequence_id(), request->capability()),
                    options_.metrics, NodeMethod::kDropSequence, start);
  });
  return reactor;
}

grpc::ServerUnaryReactor* NodeService::ForkSequence(grpc::CallbackServerContext* context,
                                                    const v1::ForkSequenceRequest* request,
                                                    v1::ForkSequenceResponse* response) {
  const Clock::time_point start = Clock::now();
  if (absl::Status st = CheckDeadline(context, options_.max_deadline_seconds); !st.ok()) {
    return FinishNow(context, st, options_.metrics, NodeMethod::kForkSequence, start);
  }
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  control_->Schedule([this, reactor, request, start, principal = PeerPrincipal(context)] {
    const SequenceAccess access{request->capability(), request->lease_owner(), principal};
    FinishAndRecord(reactor,
                    core_->ForkSequence(request->source_sequence_id(),
                                        request->source_capability(), request->sequence_id(),
                                        access),
                    options_.metrics, NodeMethod::kForkSequence, start);
  });
  return reactor;
}

grpc::ServerUnaryReactor* NodeService::ListShards(grpc::CallbackServerContext* context,
                                                  const v1::ListShardsRequest* request,
                                                  v1::ListShardsResponse* response) {
  const Clock::time_point start = Clock::now();
  if (absl::Status st = CheckDeadline(context, options_.max_deadline_seconds); !st.ok()) {
    return FinishNow(context, st, options_.metrics, NodeMethod::kListShards, start);
  }
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  control_->Schedule([this, reactor, request, response, start,
                      principal = PeerPrincipal(context)] {
    std::optional<uint64_t> id;
    if (request->has_sequence_id()) id = request->sequence_id();
    absl::StatusOr<std::vector<ShardInfo>> shards =
        core_->ListShards(id, request->capability(), principal);
    if (shards.ok()) {
      for (const ShardInfo& s : *shards) ShardInfoToProto(s, response->add_shards());
    }
    FinishAndRecord(reactor, shards.status(), options_.metrics, NodeMethod::kListShards, start);
  });
  return reactor;
}

grpc::ServerUnaryReactor* NodeService::Stats(grpc::CallbackServerContext* context,
                                             const v1::StatsRequest* request,
                                             v1::StatsResponse* response) {
  const Clock::time_point start = Clock::now();
  if (absl::Status st = CheckDeadline(context, options_.max_deadline_seconds); !st.ok()) {
    return FinishNow(context, st, options_.metrics, NodeMethod::kStats, start);
  }
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  control_->Schedule([this, reactor, response, start, principal = PeerPrincipal(context)] {
    absl::StatusOr<NodeStats> st = core_->Stats(principal);
    if (st.ok()) {
      response->set_sequences(st->sequences);
      response->set_shards(st->shards);
      response->set_indexed_keys(st->indexed_keys);
      response->set_tail_keys(st->tail_keys);
      response->set_seals(st->seals);
      response->set_memory_bytes(st->memory_bytes);
      response->set_memory_budget_bytes(core_->options().memory_budget_bytes);
      response->set_quarantined_sequences(st->quarantined_sequences);
      response->set_memory_used_bytes(core_->MemoryUsedBytes());
      response->set_upload_memory_used_bytes(core_->UploadMemoryUsedBytes());
      response->set_upload_memory_bytes(core_->options().upload_memory_bytes);
      response->set_shard_uploads(st->shard_uploads);
      response->set_forks(st->forks);
    }
    FinishAndRecord(reactor, st.status(), options_.metrics, NodeMethod::kStats, start);
  });
  return reactor;
}

grpc::ServerUnaryReactor* NodeService::RenewLeases(grpc::CallbackServerContext* context,
                                                   const v1::RenewLeasesRequest* request,
                                                   v1::RenewLeasesResponse* response) {
  const Clock::time_point start = Clock::now();
  constexpr NodeMethod kMethod = NodeMethod::kRenewLeases;
  if (absl::Status st = CheckDeadline(context, options_.max_deadline_seconds); !st.ok()) {
    return FinishNow(context, st, options_.metrics, kMethod, start);
  }
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  control_->Schedule([this, reactor, request, response, start] {
    absl::StatusOr<int64_t> renewed = core_->RenewLeases(request->lease_owner());
    if (renewed.ok()) {
      response->set_sequences(*renewed);
      response->set_lease_seconds(core_->options().lease_seconds);
    }
    FinishAndRecord(reactor, renewed.status(), options_.metrics, kMethod, start);
  });
  return reactor;
}

grpc::ServerUnaryReactor* NodeService::GetEndpoints(grpc::CallbackServerContext* context,
                                                    const v1::GetEndpointsRequest* /*request*/,
                                                    v1::GetEndpointsResponse* response) {
  {
    std::lock_guard<std::mutex> lock(endpoints_mu_);
    response->set_ucx_address(ucx_address_);
  }
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

void NodeService::SetUcxAddress(const std::string& address) {
  std::lock_guard<std::mutex> lock(endpoints_mu_);
  ucx_address_ = address;
}

// --- Node-to-node copy -----------------------------------------------------------

grpc::ServerUnaryReactor* NodeService::SyncShards(grpc::CallbackServerContext* context,
                                                  const v1::SyncShardsRequest* request,
                                                  v1::SyncShardsResponse* response) {
  const Clock::time_point start = Clock::now();
  constexpr NodeMethod kMethod = NodeMethod::kSyncShards;
  if (absl::Status st = CheckDeadline(context, options_.max_deadline_seconds); !st.ok()) {
    return FinishNow(context, st, options_.metrics, kMethod, start);
  }
  absl::StatusOr<SyncRequest> sync = SyncRequestFromProto(*request, NodeCore::kMaxSyncCursors);
  if (!sync.ok()) return FinishNow(context, sync.status(), options_.metrics, kMethod, start);
  sync->principal = PeerPrincipal(context);
  // The source is read under this call's deadline (capped above); without
  // one (no cap configured) under kDefaultSyncSeconds.
  constexpr int kDefaultSyncSeconds = 600;
  auto deadline = context->deadline();
  if (deadline == std::chrono::system_clock::time_point::max()) {
    deadline = std::chrono::system_clock::now() + std::chrono::seconds(kDefaultSyncSeconds);
  }
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  sync_->Schedule([this, reactor, response, start, deadline, sync = std::move(sync).value()] {
    GrpcSyncSource source(sync.source_address, deadline, options_.max_message_bytes,
                          options_.peer_credentials);
    absl::StatusOr<SyncResult> result = core_->SyncShards(sync, &source);
    if (result.ok()) {
      SyncResultToProto(*result, response);
      if (options_.metrics != nullptr) {
        options_.metrics->RecordSyncReceived(result->keys_copied, result->bytes_copied);
      }
    }
    FinishAndRecord(reactor, result.status(), options_.metrics, kMethod, start);
  });
  return reactor;
}

// Streams one ReadShards answer: the sync thread produces the messages
// (NodeCore::ReadShards' callbacks) and waits for each write to complete
// before producing the next, so at most one message is buffered.
class NodeService::ReadReactor final : public grpc::ServerWriteReactor<v1::ReadShardsResponse> {
 public:
  ReadReactor(NodeService* service, Clock::time_point start) : service_(service), start_(start) {}

  // On the sync pool: reads and writes everything, then finishes.
  void Run(const ReadShardsQuery& query) {
    const int64_t max_bytes = service_->options_.max_message_bytes;
    int64_t keys = 0, bytes = 0;
    const auto on_header = [&](const SyncHeader& header) {
      message_.Clear();
      SyncHeaderToProto(header, message_.mutable_header());
      return Send();
    };
    const auto on_chunk = [&](SyncChunkData chunk) -> absl::Status {
      message_.Clear();
      SyncChunkToProto(chunk, message_.mutable_chunk());
      const size_t size = message_.ByteSizeLong();
      if (size > static_cast<size_t>(max_bytes)) {
        return absl::ResourceExhaustedError(absl::StrCat(
            "ReadShards: chunk ",
            ShardKey{query.sequence_id, chunk.layer, chunk.kv_head, chunk.chunk}.DebugString(),
            " is a message of ", size, " bytes > max_message_bytes ", max_bytes));
      }
      KVR_RETURN_IF_ERROR(Send());
      keys += static_cast<int64_t>(chunk.positions.size()) - chunk.first_sent_row;
      bytes += chunk.PayloadBytes();
      return absl::OkStatus();
    };
    const absl::Status status = service_->core_->ReadShards(query, on_header, on_chunk);
    NodeMetrics* const metrics = service_->options_.metrics;
    if (metrics != nullptr) metrics->RecordSyncSent(keys, bytes);
    Record(metrics, NodeMethod::kReadShards, start_, status);
    KVR_TSAN_RELEASE(this);  // gRPC orders Finish before OnDone
    Finish(ToGrpcStatus(status));
  }

  void OnWriteDone(bool ok) override {
    KVR_TSAN_ACQUIRE(this);
    std::lock_guard<std::mutex> lock(mu_);
    writing_ = false;
    write_ok_ = ok;
    cv_.notify_all();
  }
  void OnDone() override {
    KVR_TSAN_ACQUIRE(this);  // Run() finished on the sync pool
    delete this;
  }

 private:
  // Writes message_ and waits for its completion (gRPC completes every
  // started write, with ok = false when the call is cancelled or past its
  // deadline).
  absl::Status Send() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      writing_ = true;
    }
    KVR_TSAN_RELEASE(this);  // gRPC orders StartWrite before OnWriteDone
    StartWrite(&message_);
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return !writing_; });
    if (!write_ok_) return absl::CancelledError("ReadShards: the reader went away");
    return absl::OkStatus();
  }

  NodeService* const service_;
  const Clock::time_point start_;
  v1::ReadShardsResponse message_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool writing_ = false;
  bool write_ok_ = true;
};

grpc::ServerWriteReactor<v1::ReadShardsResponse>* NodeService::ReadShards(
    grpc::CallbackServerContext* context, const v1::ReadShardsRequest* request) {
  const Clock::time_point start = Clock::now();
  auto* reactor = new ReadReactor(this, start);
  absl::Status st = CheckDeadline(context, options_.max_deadline_seconds);
  absl::StatusOr<ReadShardsQuery> query =
      st.ok() ? ReadShardsQueryFromProto(*request, NodeCore::kMaxSyncCursors)
              : absl::StatusOr<ReadShardsQuery>(st);
  if (!query.ok()) {
    Record(options_.metrics, NodeMethod::kReadShards, start, query.status());
    reactor->Finish(ToGrpcStatus(query.status()));
    return reactor;
  }
  read_->Schedule([reactor, query = std::move(query).value()] { reactor->Run(query); });
  return reactor;
}

}  // namespace kvr::retrieval
