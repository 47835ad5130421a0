// gRPC transport credentials from PEM files: mutual TLS between kvr
// processes (every gRPC hop: gateway -> worker -> node, node -> node),
// server-only TLS for the gateway's client-facing port, and the client side
// of both. Every credential built here watches its files through gRPC's
// FileWatcherCertificateProvider: a rotated certificate, key or CA bundle is
// picked up within `reload_seconds` by new connections, without a restart.
// Who may call a server is decided by the peer_authorizer.h processor that
// MakeMtlsServerCredentials installs.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace grpc {
class ChannelCredentials;
class ServerCredentials;
}  // namespace grpc

namespace kvr::security {

// Longest interval between two reads of the watched files, seconds.
inline constexpr int kMaxTlsReloadSeconds = 86400;
// Largest PEM file accepted at start (a certificate chain or a CA bundle of
// a few hundred certificates fits many times over).
inline constexpr int64_t kMaxPemFileBytes = int64_t{1} << 20;

// The three files of one process's mTLS identity and trust, and how often
// they are re-read.
struct TlsFiles {
  std::string cert_file;  // PEM certificate chain, leaf first
  std::string key_file;   // PEM private key of the leaf
  std::string ca_file;    // PEM CA bundle peers' certificates must chain to
  int reload_seconds = 10;
};

// Checks the all-or-none rule of --tls_cert_file / --tls_key_file /
// --tls_ca_file: all three empty -> nullopt (insecure); all three set ->
// the files, each checked to be a readable PEM file of at most
// kMaxPemFileBytes; some but not all set -> InvalidArgument naming the
// missing flag(s). --tls_reload_seconds must be in [1, kMaxTlsReloadSeconds].
absl::StatusOr<std::optional<TlsFiles>> CheckTlsFiles(const std::string& cert_file,
                                                      const std::string& key_file,
                                                      const std::string& ca_file,
                                                      int reload_seconds);

// OK when `path` is a readable file of at most kMaxPemFileBytes holding a
// "-----BEGIN " block; else InvalidArgument naming `flag` and the path.
absl::Status CheckPemFile(absl::string_view flag, const std::string& path);

// Server credentials for mTLS: presents cert_file/key_file, requires every
// client to present a certificate that chains to ca_file, and refuses calls
// to non-exempt methods from peers none of whose identities is in
// `allowed_peers` (PeerAuthorizer; "*" allows every CA-signed peer).
// `server_name` names the server in refusals ("kvr_node").
std::shared_ptr<grpc::ServerCredentials> MakeMtlsServerCredentials(
    const TlsFiles& files, std::vector<std::string> allowed_peers,
    const std::string& server_name);

// Server credentials for server-only TLS (the gateway's client-facing
// port): presents cert_file/key_file, asks clients for no certificate.
std::shared_ptr<grpc::ServerCredentials> MakeServerTlsCredentials(const std::string& cert_file,
                                                                  const std::string& key_file,
                                                                  int reload_seconds);

// Channel credentials for mTLS: presents cert_file/key_file and verifies the
// server's certificate against ca_file, including the usual hostname check
// (the target's host against the certificate's DNS / IP SANs). One object
// serves every channel of a process.
std::shared_ptr<grpc::ChannelCredentials> MakeMtlsChannelCredentials(const TlsFiles& files);

// Channel credentials of a client tool (--tls_ca_file, --tls_cert_file,
// --tls_key_file): all empty -> plaintext; ca_file set -> TLS verifying the
// server against it (hostname check included), presenting cert_file/key_file
// when both are set. InvalidArgument naming the flag for one of cert/key
// without the other, either without ca_file, or a file that is not a
// readable PEM file.
absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> MakeClientChannelCredentials(
    const std::string& ca_file, const std::string& cert_file, const std::string& key_file);

}  // namespace kvr::security
