// Fuzzes every RPC handler of the retrieval node (NodeService,
// retrieval_node/server/node_service.h) as a hostile client drives it:
// CreateSequence, UploadShard (client stream), Append, Attend,
// DropSequence, ListShards, Stats, GetEndpoints, SyncShards, ReadShards
// (server stream), through the real service object registered on a gRPC
// server in this process over one NodeCore, reached over 127.0.0.1
// (fuzz_input.h Transport::kLoopback: the in-process transport leaks
// client streams the server finishes early). SyncShards reads from a
// second such node (the source; ops can be sent to it too), from the node
// itself, or from a closed port.
//
// Input: a stream of operations (fuzz_input.h NodeOp): an op byte, then the
// op's fields read by ByteReader (small values or raw extremes), tensor
// data generated to the declared shape (TensorFill, bounded per input) or
// taken raw, or whole request protos parsed from the bytes (kNodeRaw). An
// UploadShard stream may stay open across other ops (drop the sequence
// mid-upload, append while it streams, ...), so stateful orders are reached.
//
// Checks, besides "no crash, no sanitizer report": a successful reply has
// the shape its request implies (Append's last_position, Attend's partial
// sizes, UploadShard's n_keys, ReadShards' one header then header.chunks
// chunks, SyncShards' non-negative counts), Stats never reports negative
// memory, and after the input's sequences are all dropped both nodes hold
// nothing (polled, 10 s): MemoryUsedBytes() == 0, UploadMemoryUsedBytes()
// == 0, no sequence, no shard.
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "fuzz/fuzz_input.h"
#include "google/protobuf/stubs/logging.h"
#include "grpcpp/client_context.h"
#include "kvr/v1/retrieval.grpc.pb.h"
#include "retrieval_node/core/node_core.h"
#include "retrieval_node/server/node_service.h"

namespace {

using kvr::fuzz::ByteReader;
using kvr::fuzz::TensorFill;
namespace v1 = kvr::v1;
namespace retrieval = kvr::retrieval;

// Bounds that keep one input cheap (and under libFuzzer's memory limit):
// the node's own limits, set small.
constexpr int64_t kMemoryBudget = int64_t{64} << 20;
constexpr int64_t kUploadMemory = int64_t{64} << 20;
constexpr int64_t kMaxUploadBytes = int64_t{4} << 20;
constexpr size_t kFillBudget = size_t{128} << 10;  // generated tensor bytes per input
constexpr int kMaxOps = 64;
constexpr int64_t kDeadlineMs = 30000;
constexpr int kMaxKeys = 3;  // ShardKeys per SyncShards, cursors per ReadShards
// A port nothing listens on (SyncShards' source: connection refused).
constexpr char kClosedAddress[] = "127.0.0.1:1";

struct Node {
  std::unique_ptr<retrieval::NodeCore> core;
  std::unique_ptr<retrieval::NodeService> service;
  std::unique_ptr<kvr::fuzz::InProcessServer<retrieval::NodeService>> server;
  std::unique_ptr<v1::RetrievalNode::Stub> stub;

  Node() {
    // Requests with invalid UTF-8 in string fields are refused by the parser
    // (and logged per call): keep the fuzzer's output to its own findings.
    if (std::getenv("KVR_FUZZ_TRACE") == nullptr) google::protobuf::SetLogHandler(nullptr);
    retrieval::NodeCoreOptions o;
    o.threads = 1;
    o.tail_capacity = 16;
    o.min_index_keys = 8;
    o.train_k = 8;
    o.memory_budget_bytes = kMemoryBudget;
    o.upload_memory_bytes = kUploadMemory;
    core = std::move(retrieval::NodeCore::Create(o)).value();
    retrieval::NodeServiceOptions so;
    so.control_threads = 1;
    so.upload_threads = 1;
    so.max_upload_bytes = kMaxUploadBytes;
    service = std::make_unique<retrieval::NodeService>(core.get(), so);
    service->SetUcxAddress("IPV4:127.0.0.1:1");
    server = std::make_unique<kvr::fuzz::InProcessServer<retrieval::NodeService>>(
        service.get(), kvr::fuzz::Transport::kLoopback);
    stub = v1::RetrievalNode::NewStub(server->channel());
  }
};

// The node under test, and the second node (SyncShards' source). Both live
// for the process (gRPC threads inside).
Node& TheNode() {
  static Node* node = new Node();
  return *node;
}
Node& TheSource() {
  static Node* node = new Node();
  return *node;
}

// KVR_FUZZ_TRACE=1: each call's status and the milliseconds since the
// previous trace on stderr (to check what seeds reach, and what is slow).
void Trace(const char* call, const grpc::Status& st) {
  static const bool on = std::getenv("KVR_FUZZ_TRACE") != nullptr;
  if (!on) return;
  static auto last = std::chrono::steady_clock::now();
  const auto now = std::chrono::steady_clock::now();
  std::fprintf(stderr, "%8.3f ms %s: %d %s\n",
               std::chrono::duration<double, std::milli>(now - last).count(), call,
               st.error_code(), st.error_message().c_str());
  last = now;
}

[[noreturn]] void Fail(const std::string& what) {
  std::fprintf(stderr, "node_service_fuzzer: %s\n", what.c_str());
  std::abort();
}

// One input's run: the reader, the bytes it may generate, the sequence ids
// it touched (all dropped at the end) and the upload stream it holds open.
class Session {
 public:
  Session(const uint8_t* data, size_t size)
      : in_(data, size), fill_(kFillBudget), stub_(TheNode().stub.get()) {}

  void Run() {
    bool on_source = false;
    for (int i = 0; i < kMaxOps && !in_.done(); ++i) {
      const uint8_t op = in_.Byte();
      no_deadline_ = (op & 0xC0) == 0xC0;
      stub_ = (on_source ? TheSource() : TheNode()).stub.get();
      on_source = false;
      switch ((op & 0x0F) % kvr::fuzz::kNodeOps) {
        case kvr::fuzz::kNodeCreate: Create(); break;
        case kvr::fuzz::kNodeUpload: UploadWhole(); break;
        case kvr::fuzz::kNodeUploadBegin: UploadBegin(); break;
        case kvr::fuzz::kNodeUploadPart: UploadPart(); break;
        case kvr::fuzz::kNodeUploadEnd: UploadEnd(); break;
        case kvr::fuzz::kNodeAppend: Append(); break;
        case kvr::fuzz::kNodeAttend: Attend(); break;
        case kvr::fuzz::kNodeDrop: Drop(SequenceId()); break;
        case kvr::fuzz::kNodeList: List(); break;
        case kvr::fuzz::kNodeStats: Stats(); break;
        case kvr::fuzz::kNodeEndpoints: Endpoints(); break;
        case kvr::fuzz::kNodeSync: Sync(); break;
        case kvr::fuzz::kNodeRead: Read(); break;
        case kvr::fuzz::kNodeOnSource: on_source = true; break;
        default: Raw(); break;
      }
    }
    UploadEnd();
    for (Node* node : {&TheNode(), &TheSource()}) {
      stub_ = node->stub.get();
      for (uint64_t id : ids_) Drop(id, /*deadline=*/true);
      // Sequences a parsed request created under a capability (tenant
      // isolation: only that capability may drop them).
      for (const auto& [id, capability] : capabilities_) Drop(id, /*deadline=*/true, capability);
      CheckEmpty(*node->core);
    }
  }

 private:
  // Declared sizes of the open upload and how much of each was sent.
  struct Upload {
    grpc::ClientContext context;
    v1::UploadShardResponse response;
    std::unique_ptr<grpc::ClientWriter<v1::UploadShardRequest>> writer;
    v1::ShardHeader header;
    int64_t keys = 0, values = 0, topk = 0, queries = 0;  // elements still to send
    uint8_t seed = 0;
  };

  void Deadline(grpc::ClientContext* context) {
    if (!no_deadline_) kvr::fuzz::SetDeadline(context, kDeadlineMs);
  }

  // Ids 0..3 mostly (so ops meet), any uint64 sometimes; remembered for the
  // final drop.
  uint64_t SequenceId() {
    const uint64_t id = in_.Uint64(4);
    ids_.insert(id);
    return id;
  }
  int32_t HeadDim() {
    static constexpr int32_t kDims[] = {8, 4, 1, 2, 16, 3, 0, 64};
    const uint8_t b = in_.Byte();
    return b < 0xF0 ? kDims[b % 8] : static_cast<int32_t>(in_.Raw(4));
  }
  int DType() { return in_.Int32(5); }  // 0 (unspecified), f32, bf16, f16, 4 (unknown)

  // A spec from fields (CreateSequence, SyncShards).
  void Spec(v1::SequenceSpec* s) {
    s->set_sequence_id(SequenceId());
    s->set_n_layers(in_.Int32(4));
    s->set_n_heads(in_.Int32(5));
    s->set_n_kv_heads(in_.Int32(3));
    s->set_head_dim(HeadDim());
    s->set_value_dtype(static_cast<v1::DType>(DType()));
    s->set_index_type(static_cast<v1::IndexType>(in_.Int32(5)));
  }

  void Create() {
    v1::CreateSequenceRequest r;
    Spec(r.mutable_spec());
    if (in_.Byte() == 1) r.clear_spec();
    grpc::ClientContext c;
    Deadline(&c);
    v1::CreateSequenceResponse out;
    Trace("CreateSequence", stub_->CreateSequence(&c, r, &out));
  }

  // A header from fields; the element counts it declares go to `u`.
  void Header(Upload* u) {
    v1::ShardHeader& h = u->header;
    v1::ShardKey* k = h.mutable_key();
    k->set_sequence_id(SequenceId());
    k->set_layer(in_.Int32(3));
    k->set_kv_head(in_.Int32(3));
    k->set_chunk(in_.Int32(4));
    h.set_first_position(in_.Int64(200));
    h.set_n_keys(in_.Int64(200));
    h.set_head_dim(HeadDim());
    h.set_key_dtype(static_cast<v1::DType>(DType()));
    h.set_value_dtype(static_cast<v1::DType>(DType()));
    switch (in_.Byte() % 4) {
      case 1:
        h.set_train_topk_rows(in_.Int64(64));
        h.set_train_topk_width(in_.Int32(16));
        break;
      case 2:
        h.set_train_query_rows(in_.Int64(64));
        break;
      case 3:  // both (refused)
        h.set_train_topk_rows(in_.Int64(64));
        h.set_train_topk_width(in_.Int32(16));
        h.set_train_query_rows(in_.Int64(64));
        break;
      default:
        break;
    }
    h.set_train_k(in_.Int32(40));
    const int64_t dim = h.head_dim();
    // Element counts; a declared shape that overflows is sent as empty data.
    auto product = [](int64_t a, int64_t b) {
      int64_t p = 0;
      return a > 0 && b > 0 && !__builtin_mul_overflow(a, b, &p) ? p : 0;
    };
    u->keys = product(h.n_keys(), dim);
    u->values = u->keys;
    u->topk = product(h.train_topk_rows(), h.train_topk_width());
    u->queries = product(h.train_query_rows(), dim);
    u->seed = in_.Byte();
  }

  // Sends `fraction`/4 of what is left (4: all) of each declared tensor,
  // generated, as one data message; `tweak` then breaks it in one way.
  bool SendPart(Upload* u, int fraction, uint8_t tweak) {
    auto take = [fraction](int64_t* left) {
      // Divided first: declared sizes go up to 2^62, so *left * fraction overflows.
      const int64_t n = fraction >= 4 ? *left : *left / 4 * fraction;
      *left -= n;
      return n;
    };
    const v1::ShardHeader& h = u->header;
    v1::UploadShardRequest m;
    v1::ShardData* d = m.mutable_data();
    const int64_t nan_at = tweak == 5 ? 0 : -1;
    d->set_keys(fill_.Values(take(&u->keys), h.key_dtype(), u->seed, nan_at));
    d->set_values(fill_.Values(take(&u->values), h.value_dtype(), u->seed + 1));
    d->set_train_topk(fill_.Ids(take(&u->topk), h.n_keys(), u->seed));
    d->set_train_queries(fill_.Values(take(&u->queries), h.key_dtype(), u->seed + 2));
    switch (tweak) {
      case 1: if (!d->keys().empty()) d->mutable_keys()->pop_back(); break;
      case 2: d->mutable_values()->push_back('\x01'); break;
      case 3: *m.mutable_header() = h; break;  // a second header
      case 4: m.clear_part(); break;           // neither header nor data
      case 6: d->set_train_topk(in_.Blob()); break;
      default: break;
    }
    return u->writer->Write(m);
  }

  // Opens the stream and sends the header; false when the stream broke.
  bool Begin(Upload* u) {
    Header(u);
    Deadline(&u->context);
    u->writer = stub_->UploadShard(&u->context, &u->response);
    const uint8_t how = in_.Byte();
    if (how == 1) return true;  // no header: data first
    v1::UploadShardRequest m;
    *m.mutable_header() = u->header;
    return u->writer->Write(m);
  }

  void Finish(Upload* u) {
    u->writer->WritesDone();
    const grpc::Status st = u->writer->Finish();
    Trace("UploadShard", st);
    if (st.ok() && u->response.shard().n_keys() != u->header.n_keys()) {
      Fail("UploadShard OK with shard.n_keys " + std::to_string(u->response.shard().n_keys()) +
           " != header.n_keys " + std::to_string(u->header.n_keys()));
    }
  }

  void UploadWhole() {
    Upload u;
    if (Begin(&u)) {
      const int parts = 1 + in_.Byte() % 3;
      const uint8_t tweak = in_.Byte();
      for (int p = 0; p < parts; ++p) {
        const int fraction = p + 1 == parts ? 4 : 2;
        if (!SendPart(&u, fraction, p + 1 == parts ? tweak % 8 : 0)) break;
      }
    }
    Finish(&u);
  }

  void UploadBegin() {
    UploadEnd();
    open_ = std::make_unique<Upload>();
    (void)Begin(open_.get());
  }
  void UploadPart() {
    const uint8_t b = in_.Byte();
    if (open_ != nullptr) (void)SendPart(open_.get(), 1 + (b & 3), (b >> 2) % 8);
  }
  void UploadEnd() {
    if (open_ == nullptr) return;
    Finish(open_.get());
    open_.reset();
  }

  // A matrix of `rows` x `cols` (dtype from the input) whose data is the
  // generated exact size, or that +- a byte, or raw bytes.
  void Matrix(v1::Matrix* m, int64_t rows, int32_t cols, uint8_t seed) {
    const int dtype = in_.Byte() < 0xE0 ? 1 : DType();
    m->set_dtype(static_cast<v1::DType>(dtype));
    m->set_rows(rows);
    m->set_cols(cols);
    const uint8_t mode = in_.Byte();
    int64_t n = 0;
    if (rows > 0 && cols > 0 && __builtin_mul_overflow(rows, int64_t{cols}, &n)) n = 0;
    switch (mode % 8) {
      case 5: m->set_data(in_.Blob()); break;
      case 6: m->set_data(fill_.Values(n, dtype, seed, 0)); break;  // a NaN
      case 7: {
        std::string d = fill_.Values(n, dtype, seed);
        if (!d.empty()) d.pop_back();
        m->set_data(d);
        break;
      }
      default: m->set_data(fill_.Values(n, dtype, seed)); break;
    }
  }

  void Append() {
    v1::AppendRequest r;
    r.set_sequence_id(SequenceId());
    r.set_layer(in_.Int32(3));
    r.set_kv_head(in_.Int32(3));
    r.set_first_position(in_.Int64(250));
    const int64_t rows = in_.Int64(40);
    const int32_t cols = HeadDim();
    const uint8_t seed = in_.Byte();
    Matrix(r.mutable_keys(), rows, cols, seed);
    const uint8_t shape = in_.Byte();
    Matrix(r.mutable_values(), shape == 1 ? rows + 1 : rows, shape == 2 ? cols + 1 : cols,
           seed + 3);
    grpc::ClientContext c;
    Deadline(&c);
    v1::AppendResponse out;
    const grpc::Status st = stub_->Append(&c, r, &out);
    Trace("Append", st);
    if (!st.ok()) return;
    const int64_t want = r.keys().rows() > 0 ? r.first_position() + r.keys().rows() - 1 : -1;
    if (out.last_position() != want) {
      Fail("Append OK with last_position " + std::to_string(out.last_position()) +
           ", expected " + std::to_string(want));
    }
  }

  void Attend() {
    v1::AttendRequest r;
    r.set_sequence_id(SequenceId());
    r.set_layer(in_.Int32(3));
    const int64_t rows = in_.Int64(5);  // in this order (argument order is unspecified)
    const int32_t cols = HeadDim();
    const uint8_t seed = in_.Byte();
    Matrix(r.mutable_queries(), rows, cols, seed);
    r.set_k(in_.Int32(20));
    r.set_beam(in_.Int32(20));
    r.set_nprobe(in_.Int32(8));
    r.set_scale(in_.Float());
    r.set_debug(in_.Byte() == 1);
    grpc::ClientContext c;
    Deadline(&c);
    v1::AttendResponse out;
    const grpc::Status st = stub_->Attend(&c, r, &out);
    Trace("Attend", st);
    if (!st.ok()) return;
    const int64_t n = r.queries().rows(), d = r.queries().cols();
    const v1::Partials& p = out.partials();
    if (p.n() != n || p.dim() != d || static_cast<int64_t>(p.o().size()) != n * d * 4 ||
        static_cast<int64_t>(p.m().size()) != n * 4 ||
        static_cast<int64_t>(p.l().size()) != n * 4) {
      Fail("Attend OK with partials of the wrong shape");
    }
  }

  // Remembers `id` (and `capability`, when set) for the cleanup's drops.
  void Touch(uint64_t id, const std::string& capability) {
    ids_.insert(id);
    if (!capability.empty()) capabilities_.emplace(id, capability);  // at most kMaxOps
  }

  void Drop(uint64_t id, bool deadline = false, const std::string& capability = "") {
    v1::DropSequenceRequest r;
    r.set_sequence_id(id);
    r.set_capability(capability);
    grpc::ClientContext c;
    if (deadline || !no_deadline_) kvr::fuzz::SetDeadline(&c, kDeadlineMs);
    v1::DropSequenceResponse out;
    Trace("DropSequence", stub_->DropSequence(&c, r, &out));
  }

  void List() {
    v1::ListShardsRequest r;
    if (in_.Byte() % 2 == 0) r.set_sequence_id(SequenceId());
    grpc::ClientContext c;
    Deadline(&c);
    v1::ListShardsResponse out;
    Trace("ListShards", stub_->ListShards(&c, r, &out));
  }

  void Stats() {
    grpc::ClientContext c;
    Deadline(&c);
    v1::StatsResponse out;
    const grpc::Status st = stub_->Stats(&c, {}, &out);
    Trace("Stats", st);
    if (!st.ok()) return;
    if (out.memory_used_bytes() < 0 || out.upload_memory_used_bytes() < 0 ||
        out.memory_bytes() < 0) {
      Fail("Stats reports negative memory");
    }
  }

  // Where a SyncShards reads from: mostly the source node, sometimes the
  // node it is sent to, or a closed port.
  std::string SourceAddress() {
    switch (in_.Byte() % 8) {
      case 6: return TheNode().server->address();
      case 7: return kClosedAddress;
      default: return TheSource().server->address();
    }
  }

  void Sync() {
    v1::SyncShardsRequest r;
    Spec(r.mutable_spec());
    r.set_source_address(SourceAddress());
    if (in_.Byte() == 1) r.clear_spec();
    const int n = in_.Byte() % (kMaxKeys + 1);
    for (int i = 0; i < n; ++i) {
      v1::ShardKey* k = r.add_shards();
      k->set_sequence_id(in_.Uint64(4));
      k->set_layer(in_.Int32(3));
      k->set_kv_head(in_.Int32(3));
      k->set_chunk(in_.Int32(4));
    }
    grpc::ClientContext c;
    Deadline(&c);
    v1::SyncShardsResponse out;
    const grpc::Status st = stub_->SyncShards(&c, r, &out);
    Trace("SyncShards", st);
    if (st.ok() && (out.keys_copied() < 0 || out.bytes_copied() < 0)) {
      Fail("SyncShards OK with keys_copied " + std::to_string(out.keys_copied()) +
           ", bytes_copied " + std::to_string(out.bytes_copied()));
    }
  }

  // Reads a ReadShards stream to its end (or cancels it after the first
  // message when `cancel`); an OK stream must be one header, then exactly
  // header.chunks chunks.
  void ReadStream(const v1::ReadShardsRequest& r, bool cancel) {
    grpc::ClientContext c;
    Deadline(&c);
    std::unique_ptr<grpc::ClientReader<v1::ReadShardsResponse>> reader = stub_->ReadShards(&c, r);
    v1::ReadShardsResponse m;
    bool header = false, ordered = true;
    int64_t chunks = 0, declared = -1;
    while (reader->Read(&m)) {
      if (cancel) {
        c.TryCancel();
        continue;  // read what is left until the stream ends
      }
      if (m.has_header() && !header) {
        header = true;
        declared = m.header().chunks();
      } else if (m.has_chunk() && header) {
        ++chunks;
      } else {
        ordered = false;
      }
    }
    const grpc::Status st = reader->Finish();
    Trace("ReadShards", st);
    if (st.ok() && !cancel && (!ordered || !header || chunks != declared)) {
      Fail("ReadShards OK with " + std::string(ordered ? "" : "messages out of order, ") +
           (header ? "" : "no header, ") + std::to_string(chunks) + " chunks for " +
           std::to_string(declared) + " declared");
    }
  }

  void Read() {
    v1::ReadShardsRequest r;
    r.set_sequence_id(SequenceId());
    r.set_all(in_.Byte() % 2 == 0);
    const int n = in_.Byte() % (kMaxKeys + 1);
    for (int i = 0; i < n; ++i) {
      v1::SyncCursor* k = r.add_cursors();
      k->set_layer(in_.Int32(3));
      k->set_kv_head(in_.Int32(3));
      k->set_chunk(in_.Int32(4));
      k->set_after_position(in_.Int64(64));
      k->set_known_index_rows(in_.Int64(64));
    }
    ReadStream(r, in_.Byte() == 1);
  }

  void Endpoints() {
    grpc::ClientContext c;
    Deadline(&c);
    v1::GetEndpointsResponse out;
    const grpc::Status st = stub_->GetEndpoints(&c, {}, &out);
    if (st.ok() && out.ucx_address() != "IPV4:127.0.0.1:1") Fail("GetEndpoints: wrong address");
  }

  // Request protos parsed from the input: whatever a client may serialize.
  template <typename Request>
  bool Parse(Request* r) {
    const std::string blob = in_.Blob();
    return r->ParseFromString(blob);
  }

  void Raw() {
    const uint8_t which = in_.Byte() % 10;
    grpc::ClientContext c;
    Deadline(&c);
    switch (which) {
      case 0: {
        v1::CreateSequenceRequest r;
        if (!Parse(&r)) return;
        Touch(r.spec().sequence_id(), r.capability());
        v1::CreateSequenceResponse out;
        (void)stub_->CreateSequence(&c, r, &out);
        return;
      }
      case 1: {
        v1::UploadShardResponse out;
        auto writer = stub_->UploadShard(&c, &out);
        const int n = in_.Byte() % 5;
        for (int i = 0; i < n; ++i) {
          v1::UploadShardRequest m;
          if (!Parse(&m)) continue;
          if (m.has_header()) Touch(m.header().key().sequence_id(), m.header().capability());
          if (!writer->Write(m)) break;
        }
        writer->WritesDone();
        (void)writer->Finish();
        return;
      }
      case 2: {
        v1::AppendRequest r;
        if (!Parse(&r)) return;
        v1::AppendResponse out;
        (void)stub_->Append(&c, r, &out);
        return;
      }
      case 3: {
        v1::AttendRequest r;
        if (!Parse(&r)) return;
        v1::AttendResponse out;
        (void)stub_->Attend(&c, r, &out);
        return;
      }
      case 4: {
        v1::DropSequenceRequest r;
        if (!Parse(&r)) return;
        v1::DropSequenceResponse out;
        (void)stub_->DropSequence(&c, r, &out);
        return;
      }
      case 5: {
        v1::ListShardsRequest r;
        if (!Parse(&r)) return;
        v1::ListShardsResponse out;
        (void)stub_->ListShards(&c, r, &out);
        return;
      }
      case 6: {
        v1::StatsRequest r;
        if (!Parse(&r)) return;
        v1::StatsResponse out;
        (void)stub_->Stats(&c, r, &out);
        return;
      }
      case 8: {
        v1::SyncShardsRequest r;
        if (!Parse(&r)) return;
        Touch(r.spec().sequence_id(), r.capability());
        r.set_source_address(SourceAddress());  // never dial what the bytes name
        v1::SyncShardsResponse out;
        Trace("SyncShards (parsed)", stub_->SyncShards(&c, r, &out));
        return;
      }
      case 9: {
        v1::ReadShardsRequest r;
        if (!Parse(&r)) return;
        ReadStream(r, /*cancel=*/false);
        return;
      }
      default: {
        v1::GetEndpointsRequest r;
        if (!Parse(&r)) return;
        v1::GetEndpointsResponse out;
        (void)stub_->GetEndpoints(&c, r, &out);
        return;
      }
    }
  }

  // Everything dropped: `core` must hold no sequence, no shard and no
  // accounted byte, within 10 s (polled): a ReadShards the client
  // cancelled ends on the client at once, while the node's read thread
  // returns the stream's snapshot reservation (upload memory) when its
  // next write fails, a moment later.
  void CheckEmpty(retrieval::NodeCore& core) {
    const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (true) {
      const int64_t used = core.MemoryUsedBytes();
      const int64_t upload = core.UploadMemoryUsedBytes();
      absl::StatusOr<retrieval::NodeStats> stats = core.Stats();
      absl::StatusOr<std::vector<retrieval::ShardInfo>> shards = core.ListShards(std::nullopt);
      if (used == 0 && upload == 0 && stats.ok() && stats->sequences == 0 && shards.ok() &&
          shards->empty()) {
        return;
      }
      if (std::chrono::steady_clock::now() > give_up) {
        Fail("10 s after dropping every sequence: MemoryUsedBytes " + std::to_string(used) +
             ", UploadMemoryUsedBytes " + std::to_string(upload) + ", sequences " +
             (stats.ok() ? std::to_string(stats->sequences) : "?") + ", shards " +
             (shards.ok() ? std::to_string(shards->size()) : "?"));
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(1));  // poll interval
    }
  }

  ByteReader in_;
  TensorFill fill_;
  v1::RetrievalNode::Stub* stub_;  // the node this op goes to
  bool no_deadline_ = false;
  std::set<uint64_t> ids_;
  // (id, capability) of every parsed request that may create a sequence
  // with a capability (CreateSequence, an UploadShard header, SyncShards).
  std::set<std::pair<uint64_t, std::string>> capabilities_;
  std::unique_ptr<Upload> open_;
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  Session(data, size).Run();
  return 0;
}
