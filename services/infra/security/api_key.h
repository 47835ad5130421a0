// The client side of gateway API keys: how a client tool (kvr client,
// kvr_loadgen) checks its --api_key and sends it, as gRPC metadata
// `authorization: Bearer <key>` (the gateway's side is services/gateway).
#pragma once

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace grpc {
class ClientContext;
}  // namespace grpc

namespace kvr::security {

// Longest --api_key accepted (keys are "kvr-" + 43 base64url characters).
inline constexpr size_t kMaxApiKeyBytes = 256;

// OK for "" (no key) or a key of at most kMaxApiKeyBytes visible ASCII
// characters (0x21..0x7e: a legal metadata value); else InvalidArgument
// naming --api_key and the limit (never echoing the key).
absl::Status CheckApiKey(absl::string_view key);

// Adds `authorization: Bearer <key>` to `context` unless `key` is empty.
// `key` must have passed CheckApiKey.
void AttachApiKey(absl::string_view key, grpc::ClientContext* context);

}  // namespace kvr::security
