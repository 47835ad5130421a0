// The UCX data plane's wire format, shared by the node's endpoint
// (retrieval_node/server/ucx_endpoint.h) and UcxRetrievalClient
// (retrieval_node/client/): Attend travels as UCP active messages
//
//   request  AM id kUcxAttendRequestAm  header UcxRequestHeader   data: serialized kvr.v1.AttendRequest
//   reply    AM id kUcxAttendReplyAm    header UcxReplyHeader     data: serialized kvr.v1.AttendResponse
//                                                                  (code == 0) or the error message
//
// `call_id` is the client's and is echoed; the node addresses each reply by
// the connection its request came on (an id it never reuses), so a reply
// reaches only the client that issued the call. No UCX types here.
//
// Decoding (both ends use these; fuzz/ucx_wire_fuzzer.cc drives them with
// arbitrary bytes): every header, length and status code from the wire is
// checked before use.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>

#include "common/attention.h"
#include "common/status.h"
#include "kvr/v1/retrieval.pb.h"
#include "retrieval_node/core/node_types.h"

namespace kvr::retrieval {

inline constexpr uint16_t kUcxAttendRequestAm = 1;
inline constexpr uint16_t kUcxAttendReplyAm = 2;
// Request versions: 1 = an AttendRequest searching every shard the node
// holds; 2 = one that may list AttendRequest.shards. A client sends 2 only
// when it lists shards, so a node that predates the selection refuses the
// call (FailedPrecondition: wire version) instead of searching every shard
// and counting the other replicas' shards twice; nodes accept both. Replies
// are version 1. The selection itself is bounded by max_message_bytes (each
// entry is >= 2 bytes of the frame) and by the node (NodeService::
// kMaxAttendShards, then n_kv_heads x held chunks).
// The sequence's capability (tenant isolation) is AttendRequest field 10
// inside the data, so it needed no new version: a node that predates it
// ignores the field, and a current node refuses a request without the
// sequence's capability (PERMISSION_DENIED) whatever the version.
inline constexpr uint32_t kUcxWireVersion = 1;
inline constexpr uint32_t kUcxWireVersionShards = 2;
// Version 3: the data is a kvr.v1.AttendBatchRequest (same AM ids) and an
// OK reply's data a kvr.v1.AttendBatchResponse (item i answers request item
// i; statuses[i] its outcome). A node that predates it refuses the call
// (FailedPrecondition: wire version).
inline constexpr uint32_t kUcxWireVersionBatch = 3;
// Version 4 (session 26): the data is a kvr.v1.AppendBatchRequest (same AM
// ids) and an OK reply's data a kvr.v1.AppendBatchResponse (statuses[i]
// answers request item i, as gRPC's AppendBatch). A node that predates it
// refuses the call (FailedPrecondition: wire version) before applying any
// item.
inline constexpr uint32_t kUcxWireVersionAppendBatch = 4;
// UcxRequestHeader::flags bit: a connection check; the node replies OK with
// no data and calls no handler.
inline constexpr uint32_t kUcxFlagPing = 1;

struct UcxRequestHeader {
  uint32_t version = kUcxWireVersion;
  uint32_t flags = 0;
  uint64_t call_id = 0;
};
struct UcxReplyHeader {
  uint32_t version = kUcxWireVersion;
  int32_t code = 0;  // absl::StatusCode; 0 (OK): data is an AttendResponse, else the message
  uint64_t call_id = 0;
};
static_assert(sizeof(UcxRequestHeader) == 16 && sizeof(UcxReplyHeader) == 16);

// Reads an active message's header; InvalidArgument when `length` is not the
// header's size (another protocol: the receiver drops the message).
absl::StatusOr<UcxRequestHeader> DecodeUcxRequestHeader(const void* header, size_t length);
absl::StatusOr<UcxReplyHeader> DecodeUcxReplyHeader(const void* header, size_t length);

// What the node answers a request before reading its `data_length` bytes:
// FailedPrecondition for a wire version other than 1 to 4, ResourceExhausted naming
// max_message_bytes for a larger request, OK otherwise (a ping is then
// answered OK with no data).
absl::Status CheckUcxRequest(const UcxRequestHeader& header, size_t data_length,
                             size_t max_message_bytes);

// Parses a request's data into `out`; InvalidArgument when it is not a
// kvr.v1.AttendRequest.
absl::Status ParseUcxAttendRequest(std::string_view data, v1::AttendRequest* out);

// Parses a version-3 request's data; InvalidArgument when it is not a
// kvr.v1.AttendBatchRequest.
absl::Status ParseUcxAttendBatchRequest(std::string_view data, v1::AttendBatchRequest* out);

// Parses a version-4 request's data; InvalidArgument when it is not a
// kvr.v1.AppendBatchRequest.
absl::Status ParseUcxAppendBatchRequest(std::string_view data, v1::AppendBatchRequest* out);

// What the client makes of the reply to a version-4 call: the batch's status
// (the node's error, wire version, max_message_bytes, Internal for data that
// is not an AppendBatchResponse with one status per request item). On OK
// every item's status is set (its own, from statuses[i]); on an error no
// item is touched.
absl::Status DecodeUcxAppendBatchReply(const UcxReplyHeader& header, std::string_view data,
                                       size_t max_message_bytes,
                                       std::span<AppendBatchItem> items);

// What the client makes of the reply to a version-3 call: the batch's status
// (as DecodeUcxAttendReply: the node's error, wire version, size, Internal
// for data that is not an AttendBatchResponse with one item and one status
// per request item). On OK every item's status is set: its own (an OK item
// with partials of the wrong shape is Internal) with its partials and stats
// copied in; on an error no item is touched.
absl::Status DecodeUcxAttendBatchReply(const UcxReplyHeader& header, std::string_view data,
                                       size_t max_message_bytes,
                                       std::span<AttendBatchItem> items);

// What the client makes of a reply to a non-ping call: the node's error when
// `header.code` != 0 (its message is `data`; a code outside absl's range is
// UNKNOWN), Internal for another wire version, ResourceExhausted naming
// max_message_bytes for a larger reply, Internal when `data` is not an
// AttendResponse or its partials do not have exactly out.size() x out.dim()
// floats; otherwise OK with the partials copied into `out` and the counters
// into `*stats` (when not null). `out` is written only on OK.
absl::Status DecodeUcxAttendReply(const UcxReplyHeader& header, std::string_view data,
                                  size_t max_message_bytes, PartialsView out, AttendStats* stats);
// The same for a ping's reply: the node's status (data is its message).
absl::Status DecodeUcxPingReply(const UcxReplyHeader& header, std::string_view data);

// Splits "host:port" (IPv4 literal host) into host and port; InvalidArgument
// naming `field` otherwise.
absl::Status ParseUcxAddress(const std::string& address, std::string* host, uint16_t* port,
                             const char* field);

}  // namespace kvr::retrieval
