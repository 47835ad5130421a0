#include "services/infra/security/tls_flags.h"

#include <grpcpp/security/credentials.h>
#include <grpcpp/security/server_credentials.h>

#include <cstdio>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "services/infra/security/peer_authorizer.h"

ABSL_FLAG(std::string, tls_cert_file, "",
          "PEM certificate chain this process presents on its gRPC port and on every channel "
          "it opens to another kvr server (mTLS). Set with --tls_key_file and --tls_ca_file, "
          "or none of them (plaintext, one warning line)");
ABSL_FLAG(std::string, tls_key_file, "", "PEM private key of --tls_cert_file");
ABSL_FLAG(std::string, tls_ca_file, "",
          "PEM CA bundle: peers (clients of this server, servers this process calls) must "
          "present a certificate signed by it; servers are also checked against the target "
          "host (DNS / IP SANs)");
ABSL_FLAG(int, tls_reload_seconds, 10,
          "how often the three --tls_* files are re-read; a rotated certificate, key or CA is "
          "used by new connections without a restart. In [1, 86400]");
ABSL_FLAG(std::string, tls_allowed_peers, "",
          "comma-separated identities (certificate Subject CN, DNS or URI SAN; '*' = any) "
          "allowed to call this server's kvr services over mTLS; grpc.health.v1 and "
          "reflection stay open to any CA-signed peer. Empty: the binary's default "
          "(kvr_node: kvr-worker,kvr-node; kvr_worker: kvr-gateway)");

namespace kvr::security {

absl::StatusOr<ProcessTls> ProcessTlsFromFlags(absl::string_view program,
                                               absl::string_view default_allowed_peers) {
  ProcessTls tls;
  if (const int reload = absl::GetFlag(FLAGS_tls_reload_seconds);
      reload < 1 || reload > kMaxTlsReloadSeconds) {
    return absl::InvalidArgumentError(absl::StrCat("--tls_reload_seconds ", reload,
                                                   " outside [1, ", kMaxTlsReloadSeconds, "]"));
  }
  absl::StatusOr<std::optional<TlsFiles>> files =
      CheckTlsFiles(absl::GetFlag(FLAGS_tls_cert_file), absl::GetFlag(FLAGS_tls_key_file),
                    absl::GetFlag(FLAGS_tls_ca_file), absl::GetFlag(FLAGS_tls_reload_seconds));
  if (!files.ok()) return files.status();
  tls.files = *std::move(files);
  if (!tls.enabled()) {
    std::fprintf(stderr,
                 "%.*s: mTLS off (no --tls_cert_file / --tls_key_file / --tls_ca_file): gRPC "
                 "is plaintext and any peer may call\n",
                 static_cast<int>(program.size()), program.data());
    tls.server = grpc::InsecureServerCredentials();
    tls.channel = grpc::InsecureChannelCredentials();
    return tls;
  }
  std::string peers = absl::GetFlag(FLAGS_tls_allowed_peers);
  if (peers.empty()) peers = std::string(default_allowed_peers);
  if (!peers.empty()) {
    absl::StatusOr<std::vector<std::string>> parsed = ParseAllowedPeers(peers);
    if (!parsed.ok()) return parsed.status();
    tls.allowed_peers = *std::move(parsed);
  }
  tls.server = MakeMtlsServerCredentials(*tls.files, tls.allowed_peers, std::string(program));
  tls.channel = MakeMtlsChannelCredentials(*tls.files);
  return tls;
}

}  // namespace kvr::security
