// The UCX data plane's wire format, shared by the node's endpoint
// (retrieval_node/server/ucx_endpoint.h) and UcxRetrievalClient
// (retrieval_node/client/): Attend travels as UCP active messages
//
//   request  AM id kUcxAttendRequestAm  header UcxRequestHeader   data: serialized kvr.v1.AttendRequest
//   reply    AM id kUcxAttendReplyAm    header UcxReplyHeader     data: serialized kvr.v1.AttendResponse
//                                                                  (code == 0) or the error message
//
// `call_id` is the client's and is echoed. No UCX types here.
#pragma once

#include <cstdint>
#include <string>

#include "common/status.h"

namespace kvr::retrieval {

inline constexpr uint16_t kUcxAttendRequestAm = 1;
inline constexpr uint16_t kUcxAttendReplyAm = 2;
inline constexpr uint32_t kUcxWireVersion = 1;
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

// Splits "host:port" (IPv4 literal host) into host and port; InvalidArgument
// naming `field` otherwise.
absl::Status ParseUcxAddress(const std::string& address, std::string* host, uint16_t* port,
                             const char* field);

}  // namespace kvr::retrieval
