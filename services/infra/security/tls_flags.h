// The mTLS flags every kvr server binary shares (kvr_node, kvr_worker,
// kvr_gateway), defined once in tls_flags.cc:
//   --tls_cert_file, --tls_key_file, --tls_ca_file   PEM paths; all or none
//   --tls_reload_seconds (10)                        how often they are re-read
//   --tls_allowed_peers ("": the binary's default)   who may call its kvr services
// and what a main builds from them.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/flags/declare.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "services/infra/security/tls_credentials.h"

ABSL_DECLARE_FLAG(int, tls_reload_seconds);  // also the gateway's --public_tls_* period

namespace grpc {
class ChannelCredentials;
class ServerCredentials;
}  // namespace grpc

namespace kvr::security {

// One process's transport security, from its flags.
struct ProcessTls {
  std::optional<TlsFiles> files;            // nullopt: plaintext (no TLS flag set)
  std::vector<std::string> allowed_peers;   // callers of its kvr services (mTLS only)
  // The process's gRPC port: mTLS requiring a CA-signed client certificate
  // and checking allowed_peers (PeerAuthorizer), or insecure.
  std::shared_ptr<grpc::ServerCredentials> server;
  // Every channel the process opens to another kvr server: mTLS presenting
  // the same certificate, or insecure.
  std::shared_ptr<grpc::ChannelCredentials> channel;

  bool enabled() const { return files.has_value(); }
};

// Reads the --tls_* flags. No file flag set: plaintext credentials and one
// warning line on stderr ("<program>: mTLS off ..."). All three set: mTLS
// (files checked by CheckTlsFiles); allowed peers from --tls_allowed_peers,
// or `default_allowed_peers` when that flag is empty. Some set, a bad file
// or a bad list: InvalidArgument naming the flag (the main exits 2).
absl::StatusOr<ProcessTls> ProcessTlsFromFlags(absl::string_view program,
                                               absl::string_view default_allowed_peers);

}  // namespace kvr::security
