// The client side of a secured kvr cluster, shared by `kvr client` and
// kvr_loadgen: TLS channel credentials from PEM files (--tls_ca_file,
// optional --tls_cert_file / --tls_key_file for mTLS) and the gateway API key
// sent as gRPC metadata `authorization: Bearer <key>` (--api_key).
#pragma once

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "grpcpp/client_context.h"
#include "grpcpp/security/credentials.h"

namespace kvr::client {

// What a client presents. All empty: plaintext, no key (an insecure cluster).
struct ClientSecurity {
  std::string tls_ca_file;    // PEM CA certificate(s) the server must chain to
  std::string tls_cert_file;  // PEM client certificate (mTLS), with tls_key_file
  std::string tls_key_file;
  std::string api_key;  // sent as `authorization: Bearer <api_key>`
};

// Longest --api_key accepted (the contract's keys are 47 bytes).
inline constexpr size_t kMaxApiKeyBytes = 1024;

// InvalidArgument naming the flag when the combination cannot work: a client
// certificate without its key (or the reverse), a client certificate without
// --tls_ca_file (the server could not be verified), or a set API key that
// ValidateApiKey refuses.
absl::Status ValidateClientSecurity(const ClientSecurity& security);

// An API key must be a legal HTTP/2 header value token: 1..kMaxApiKeyBytes
// bytes of visible ASCII (0x21-0x7e). InvalidArgument naming --api_key and
// the limit otherwise (the key itself is never echoed).
absl::Status ValidateApiKey(absl::string_view key);

// Channel credentials for `security`: insecure when tls_ca_file is empty;
// otherwise security::MakeClientChannelCredentials: TLS verifying the server
// against the CA (host name checked against the target's host: DNS or IP
// SANs), presenting the client certificate when given; the files are checked
// (readable PEM, at most security::kMaxPemFileBytes) and re-read when they
// change. Errors name the flag and the file.
absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> MakeChannelCredentials(
    const ClientSecurity& security);

// Adds `authorization: Bearer <api_key>` to `context` when a key is set.
void AddApiKey(const ClientSecurity& security, grpc::ClientContext* context);

}  // namespace kvr::client
