#include "retrieval_node/wire/ucx_wire.h"

#include <arpa/inet.h>
#include <netinet/in.h>

#include <cstring>
#include <limits>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "google/protobuf/message_lite.h"

namespace kvr::retrieval {
namespace {

template <typename Header>
absl::StatusOr<Header> DecodeHeader(const void* header, size_t length, const char* what) {
  if (header == nullptr || length != sizeof(Header)) {
    return absl::InvalidArgumentError(absl::StrCat("UCX ", what, " header of ", length,
                                                   " bytes, expected ", sizeof(Header)));
  }
  Header h;
  std::memcpy(&h, header, sizeof(h));
  return h;
}

// The reply's status as the node sent it (code != 0).
absl::Status ReplyStatus(int32_t code, std::string_view data) {
  constexpr int32_t kMaxCode = static_cast<int32_t>(absl::StatusCode::kUnauthenticated);
  if (code <= 0 || code > kMaxCode) {
    return absl::UnknownError(
        absl::StrCat("UCX reply with status code ", code, ": ", absl::string_view(data.data(), data.size())));
  }
  return absl::Status(static_cast<absl::StatusCode>(code), absl::string_view(data.data(), data.size()));
}

// Copies one AttendResponse's partials into `out` (Internal unless exactly
// out.size() x out.dim()) and its counters into `*stats` (when not null).
absl::Status CopyReply(const v1::AttendResponse& response, PartialsView out, AttendStats* stats) {
  const v1::Partials& p = response.partials();
  const size_t n = out.size(), d = out.dim();
  // n * d * sizeof(float) cannot overflow: `out` holds that many floats.
  if (p.n() < 0 || p.dim() < 0 || static_cast<uint64_t>(p.n()) != n ||
      static_cast<uint64_t>(p.dim()) != d || p.o().size() != n * d * sizeof(float) ||
      p.m().size() != n * sizeof(float) || p.l().size() != n * sizeof(float)) {
    return absl::InternalError(absl::StrCat(
        "UCX Attend reply holds ", p.n(), " x ", p.dim(), " partials (o ", p.o().size(),
        " bytes, m ", p.m().size(), ", l ", p.l().size(), "), expected ", n, " x ", d));
  }
  for (size_t i = 0; i < n; ++i) {
    std::memcpy(out.o.row(i), p.o().data() + i * d * sizeof(float), d * sizeof(float));
  }
  if (n > 0) {
    std::memcpy(out.m.data(), p.m().data(), n * sizeof(float));
    std::memcpy(out.l.data(), p.l().data(), n * sizeof(float));
  }
  if (stats != nullptr) {
    const v1::AttendStats& s = response.stats();
    stats->shards_searched = s.shards_searched();
    stats->keys_held = s.keys_held();
    stats->keys_attended = s.keys_attended();
    stats->distance_computations = s.distance_computations();
    stats->keys_estimated = s.keys_estimated();
    stats->clusters_estimated = s.clusters_estimated();
    stats->keys_exact_zone = s.keys_exact_zone();
  }
  return absl::OkStatus();
}

// Parses all of `data` as `message`: false when it is not one, or larger
// than the int sizes protobuf takes.
bool ParseMessage(std::string_view data, google::protobuf::MessageLite* message) {
  return data.size() <= static_cast<size_t>(std::numeric_limits<int>::max()) &&
         message->ParseFromArray(data.data(), static_cast<int>(data.size()));
}

// A request message of the call `what`: InvalidArgument naming the call and
// the message type when `data` is not one.
absl::Status ParseRequest(std::string_view data, google::protobuf::MessageLite* out,
                          absl::string_view what) {
  if (ParseMessage(data, out)) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat("UCX ", what, " request is not a ", out->GetTypeName()));
}

// The checks every batch reply passes before its items are read: wire
// version, size (ResourceExhausted naming max_message_bytes), the node's
// error, a `Response` (named `type`) that parses, and exactly `n` items and
// `n` statuses (Internal otherwise). `what` names the call.
template <typename Response>
absl::Status ParseBatchReply(const UcxReplyHeader& header, std::string_view data,
                             size_t max_message_bytes, size_t n, absl::string_view what,
                             absl::string_view type, Response* response) {
  if (header.version != kUcxWireVersion) {
    return absl::InternalError(absl::StrCat("UCX reply wire version ", header.version));
  }
  if (data.size() > max_message_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat("UCX ", what, " reply of ", data.size(),
                                                     " bytes exceeds max_message_bytes ",
                                                     max_message_bytes));
  }
  if (header.code != 0) return ReplyStatus(header.code, data);
  if (!ParseMessage(data, response)) {
    return absl::InternalError(absl::StrCat("UCX ", what, " reply is not a ", type));
  }
  if (static_cast<size_t>(response->items_size()) != n ||
      static_cast<size_t>(response->statuses_size()) != n) {
    return absl::InternalError(absl::StrCat("UCX ", what, " reply holds ", response->items_size(),
                                            " items and ", response->statuses_size(),
                                            " statuses for ", n, " request items"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<UcxRequestHeader> DecodeUcxRequestHeader(const void* header, size_t length) {
  return DecodeHeader<UcxRequestHeader>(header, length, "request");
}

absl::StatusOr<UcxReplyHeader> DecodeUcxReplyHeader(const void* header, size_t length) {
  return DecodeHeader<UcxReplyHeader>(header, length, "reply");
}

absl::Status CheckUcxRequest(const UcxRequestHeader& header, size_t data_length,
                             size_t max_message_bytes) {
  if (header.version != kUcxWireVersion && header.version != kUcxWireVersionShards &&
      header.version != kUcxWireVersionBatch && header.version != kUcxWireVersionAppendBatch) {
    return absl::FailedPreconditionError(absl::StrCat(
        "UCX wire version ", header.version, " not one of the node's ", kUcxWireVersion, ", ",
        kUcxWireVersionShards, ", ", kUcxWireVersionBatch, ", ", kUcxWireVersionAppendBatch));
  }
  if ((header.flags & kUcxFlagPing) != 0) return absl::OkStatus();
  if (data_length > max_message_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat("UCX Attend request of ", data_length,
                                                     " bytes exceeds max_message_bytes ",
                                                     max_message_bytes));
  }
  return absl::OkStatus();
}

absl::Status ParseUcxAttendRequest(std::string_view data, v1::AttendRequest* out) {
  return ParseRequest(data, out, "Attend");
}

absl::Status DecodeUcxPingReply(const UcxReplyHeader& header, std::string_view data) {
  if (header.version != kUcxWireVersion) {
    return absl::InternalError(absl::StrCat("UCX reply wire version ", header.version));
  }
  return header.code == 0 ? absl::OkStatus() : ReplyStatus(header.code, data);
}

absl::Status DecodeUcxAttendReply(const UcxReplyHeader& header, std::string_view data,
                                  size_t max_message_bytes, PartialsView out, AttendStats* stats) {
  if (header.version != kUcxWireVersion) {
    return absl::InternalError(absl::StrCat("UCX reply wire version ", header.version));
  }
  if (data.size() > max_message_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat("UCX Attend reply of ", data.size(),
                                                     " bytes exceeds max_message_bytes ",
                                                     max_message_bytes));
  }
  if (header.code != 0) return ReplyStatus(header.code, data);
  v1::AttendResponse response;
  if (!ParseMessage(data, &response)) {
    return absl::InternalError("UCX Attend reply is not a kvr.v1.AttendResponse");
  }
  return CopyReply(response, out, stats);
}

absl::Status ParseUcxAttendBatchRequest(std::string_view data, v1::AttendBatchRequest* out) {
  return ParseRequest(data, out, "AttendBatch");
}

absl::Status DecodeUcxAttendBatchReply(const UcxReplyHeader& header, std::string_view data,
                                       size_t max_message_bytes,
                                       std::span<AttendBatchItem> items) {
  v1::AttendBatchResponse response;
  KVR_RETURN_IF_ERROR(ParseBatchReply(header, data, max_message_bytes, items.size(),
                                      "AttendBatch", "kvr.v1.AttendBatchResponse", &response));
  for (size_t i = 0; i < items.size(); ++i) {
    const int slot = static_cast<int>(i);
    const int32_t code = response.statuses(slot).code();
    AttendBatchItem& item = items[i];
    if (code != 0) {
      item.status = ReplyStatus(code, response.statuses(slot).message());
      continue;
    }
    item.status = CopyReply(response.items(slot), item.out, item.stats);
  }
  return absl::OkStatus();
}

absl::Status ParseUcxAppendBatchRequest(std::string_view data, v1::AppendBatchRequest* out) {
  return ParseRequest(data, out, "AppendBatch");
}

absl::Status DecodeUcxAppendBatchReply(const UcxReplyHeader& header, std::string_view data,
                                       size_t max_message_bytes,
                                       std::span<AppendBatchItem> items) {
  v1::AppendBatchResponse response;
  KVR_RETURN_IF_ERROR(ParseBatchReply(header, data, max_message_bytes, items.size(),
                                      "AppendBatch", "kvr.v1.AppendBatchResponse", &response));
  for (size_t i = 0; i < items.size(); ++i) {
    const v1::ItemStatus& s = response.statuses(static_cast<int>(i));
    items[i].status = s.code() == 0 ? absl::OkStatus() : ReplyStatus(s.code(), s.message());
  }
  return absl::OkStatus();
}

absl::Status ParseUcxAddress(const std::string& address, std::string* host, uint16_t* port,
                             const char* field) {
  const size_t colon = address.rfind(':');
  uint32_t p = 0;
  in_addr a{};
  if (colon == std::string::npos || !absl::SimpleAtoi(address.substr(colon + 1), &p) ||
      p > 65535 || inet_pton(AF_INET, address.substr(0, colon).c_str(), &a) != 1) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, " \"", address, "\" is not IPV4:PORT (e.g. 127.0.0.1:0)"));
  }
  *host = address.substr(0, colon);
  *port = static_cast<uint16_t>(p);
  return absl::OkStatus();
}

}  // namespace kvr::retrieval
