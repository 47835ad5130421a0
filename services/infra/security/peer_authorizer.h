// Who may call a kvr gRPC server over mTLS. A peer's identities are its
// certificate's Subject CN and each of its DNS and URI SANs (gRPC's
// x509_common_name, peer_dns and peer_uri auth properties). A call to a
// method outside the exempt services (grpc.health.v1 and server reflection,
// open to any peer whose certificate chains to the CA) is allowed only when
// one of the peer's identities is in the allowed list; otherwise it fails
// with PERMISSION_DENIED naming the peer, the method and the allowed list.
#pragma once

#include <string>
#include <vector>

#include <grpcpp/security/auth_context.h>
#include <grpcpp/security/auth_metadata_processor.h>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace kvr::security {

// At most this many entries in an allowed-peers list, each at most
// kMaxPeerIdentityBytes long (a DNS name is at most 253 bytes; URI SANs such
// as SPIFFE ids fit too).
inline constexpr size_t kMaxAllowedPeers = 64;
inline constexpr size_t kMaxPeerIdentityBytes = 1024;

// Parses a comma-separated identity list ("kvr-worker,kvr-node"; blanks
// around entries are ignored; "*" = any CA-signed peer). InvalidArgument
// naming --tls_allowed_peers for an empty list or entry, more than
// kMaxAllowedPeers entries or an entry longer than kMaxPeerIdentityBytes.
absl::StatusOr<std::vector<std::string>> ParseAllowedPeers(absl::string_view list);

// The identities of the peer of `context`: its CN first, then its DNS SANs,
// then its URI SANs. Empty for a peer without a certificate.
std::vector<std::string> PeerIdentities(const grpc::AuthContext& context);

// True for methods any CA-signed peer may call: grpc.health.v1.Health/* and
// grpc.reflection.*/* (`path` is the HTTP/2 :path, "/package.Service/Method").
bool IsExemptMethod(absl::string_view path);

// The AuthMetadataProcessor MakeMtlsServerCredentials installs: runs once
// per call on gRPC's thread (non-blocking, no I/O), after the TLS handshake
// verified the client's certificate against the CA. Thread-safe (immutable).
class PeerAuthorizer final : public grpc::AuthMetadataProcessor {
 public:
  // `allowed`: identities allowed to call non-exempt methods ("*": all).
  // `server_name` appears in refusals.
  PeerAuthorizer(std::vector<std::string> allowed, std::string server_name);

  bool IsBlocking() const override { return false; }

  // OK, or PERMISSION_DENIED: "peer kvr-gateway (identities: kvr-gateway,
  // localhost) may not call /kvr.v1.RetrievalNode/Attend on kvr_node
  // (--tls_allowed_peers kvr-worker,kvr-node)".
  grpc::Status Process(const InputMetadata& auth_metadata, grpc::AuthContext* context,
                       OutputMetadata* consumed_auth_metadata,
                       OutputMetadata* response_metadata) override;

  // The decision of Process for a call to `path` from a peer with
  // `identities` (exposed for unit tests).
  grpc::Status Authorize(absl::string_view path, const std::vector<std::string>& identities) const;

 private:
  const std::vector<std::string> allowed_;
  const bool allow_all_;
  const std::string server_name_;
  const std::string allowed_text_;
};

}  // namespace kvr::security
