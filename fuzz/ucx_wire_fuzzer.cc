// Fuzzes the UCX Attend data plane as a hostile peer sees it
// (retrieval_node/wire/ucx_wire.h). Input: byte 0 picks the header length
// (0..19; 16 is the real one) and the reply shape; then the header bytes;
// the rest is the message data.
//  * Node side: DecodeUcxRequestHeader → CheckUcxRequest → ParseUcxAttendRequest
//    → NodeService::HandleAttend (the handler the endpoint calls) over an
//    in-process node holding one small sequence; its reply is then decoded
//    by the client's DecodeUcxAttendReply into partials of the request's
//    shape and must decode (same bytes, same shape).
//  * Client side: DecodeUcxReplyHeader → DecodeUcxAttendReply /
//    DecodeUcxPingReply / DecodeUcxAttendBatchReply (1..4 items) on the same
//    bytes, as a reply from a hostile node; ParseUcxAttendBatchRequest too;
//    DecodeUcxAppendBatchReply / ParseUcxAppendBatchRequest likewise.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <future>
#include <memory>
#include <span>
#include <string_view>

#include "common/attention.h"
#include "common/tensor.h"
#include "retrieval_node/client/in_process_client.h"
#include "retrieval_node/server/node_service.h"
#include "retrieval_node/wire/ucx_wire.h"

namespace {

using kvr::Matrix;
using kvr::Partials;
using namespace kvr::retrieval;  // NOLINT(build/namespaces): harness-local

constexpr uint64_t kSequence = 7;
constexpr int kDim = 8;
constexpr size_t kMaxMessageBytes = size_t{1} << 20;

// The node the harness talks to: sequence 7 (1 layer, 2 heads over 1 kv
// head of dim 8, graph index) with one chunk of 40 keys and a few appended.
struct Node {
  std::unique_ptr<InProcessRetrievalClient> client;
  std::unique_ptr<NodeService> service;

  Node() {
    NodeCoreOptions o;
    o.threads = 1;
    o.tail_capacity = 16;
    o.train_k = 8;
    client = std::move(InProcessRetrievalClient::Create(o)).value();
    SequenceSpec spec;
    spec.sequence_id = kSequence;
    spec.n_layers = 1;
    spec.n_heads = 2;
    spec.n_kv_heads = 1;
    spec.head_dim = kDim;
    spec.index_type = kvr::index::IndexType::kGraph;
    if (!client->CreateSequence(spec).ok()) std::abort();
    Matrix keys(40, kDim), values(40, kDim);
    for (size_t i = 0; i < keys.data.size(); ++i) {
      keys.data[i] = static_cast<float>((i * 37) % 17) / 8.0f - 1.0f;
      values.data[i] = static_cast<float>((i * 11) % 13) / 6.0f - 1.0f;
    }
    ShardUpload up;
    up.key = ShardKey{kSequence, 0, 0, 0};
    up.first_position = 0;
    up.keys = keys.view();
    up.values = values.view();
    if (!client->UploadShard(up).ok()) std::abort();
    AppendRequest a;
    a.sequence_id = kSequence;
    a.first_position = 40;
    a.keys = keys.view().rows_slice(0, 5);
    a.values = values.view().rows_slice(0, 5);
    if (!client->Append(a).ok()) std::abort();
    service = std::make_unique<NodeService>(&client->core(), NodeServiceOptions{});
  }
};

Node& TheNode() {
  static Node* node = new Node();  // lives for the process (threads inside)
  return *node;
}

void NodeSide(const void* header, size_t header_length, std::string_view data) {
  absl::StatusOr<UcxRequestHeader> h = DecodeUcxRequestHeader(header, header_length);
  if (!h.ok()) return;
  if (!CheckUcxRequest(*h, data.size(), kMaxMessageBytes).ok()) return;
  if ((h->flags & kUcxFlagPing) != 0) return;
  kvr::v1::AttendRequest request;
  if (!ParseUcxAttendRequest(data, &request).ok()) return;
  kvr::v1::AttendResponse response;
  std::promise<absl::Status> done;
  TheNode().service->HandleAttend(request, &response,
                                  [&done](absl::Status s) { done.set_value(std::move(s)); });
  const absl::Status status = done.get_future().get();
  // The reply as the endpoint frames it, decoded as the client does.
  UcxReplyHeader reply;
  reply.call_id = h->call_id;
  reply.code = static_cast<int32_t>(status.code());
  std::string bytes = status.ok() ? response.SerializeAsString() : std::string(status.message());
  if (!status.ok()) {
    const absl::Status back = DecodeUcxAttendReply(reply, bytes, kMaxMessageBytes, {}, nullptr);
    if (back.code() != status.code()) std::abort();  // the client must see the node's code
    return;
  }
  // OK: the request had rows x cols f32 queries (checked by the handler).
  Partials out(static_cast<size_t>(request.queries().rows()),
               static_cast<size_t>(request.queries().cols()));
  AttendStats stats;
  if (!DecodeUcxAttendReply(reply, bytes, kMaxMessageBytes, out.view(), &stats).ok()) {
    std::abort();  // a reply the node produced must decode into its shape
  }
}

void ClientSide(uint8_t shape, const void* header, size_t header_length, std::string_view data) {
  absl::StatusOr<UcxReplyHeader> h = DecodeUcxReplyHeader(header, header_length);
  if (!h.ok()) return;
  (void)DecodeUcxPingReply(*h, data);
  Partials out(1 + (shape & 3), 1 + ((shape >> 2) & 7));
  AttendStats stats;
  (void)DecodeUcxAttendReply(*h, data, kMaxMessageBytes, out.view(), &stats);
  // The same bytes as the reply to a 1..4-item AttendBatch.
  Partials outs[4] = {Partials(out.m.size(), out.o.cols), Partials(out.m.size(), out.o.cols),
                      Partials(out.m.size(), out.o.cols), Partials(out.m.size(), out.o.cols)};
  AttendStats batch_stats[4];
  AttendBatchItem items[4];
  for (int i = 0; i < 4; ++i) {
    items[i].out = outs[i].view();
    items[i].stats = &batch_stats[i];
  }
  const size_t n_items = 1 + ((shape >> 5) & 3);
  (void)DecodeUcxAttendBatchReply(*h, data, kMaxMessageBytes, std::span(items, n_items));
  kvr::v1::AttendBatchRequest batch_request;
  (void)ParseUcxAttendBatchRequest(data, &batch_request);
  // And as the reply to a 1..4-item AppendBatch (wire version 4).
  AppendBatchItem appends[4];
  (void)DecodeUcxAppendBatchReply(*h, data, kMaxMessageBytes, std::span(appends, n_items));
  kvr::v1::AppendBatchRequest append_request;
  (void)ParseUcxAppendBatchRequest(data, &append_request);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const size_t header_length = std::min<size_t>(data[0] % 20, size - 1);
  const uint8_t* header = data + 1;
  const std::string_view body(reinterpret_cast<const char*>(header + header_length),
                              size - 1 - header_length);
  NodeSide(header, header_length, body);
  ClientSide(data[0], header, header_length, body);
  return 0;
}
