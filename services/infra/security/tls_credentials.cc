#include "services/infra/security/tls_credentials.h"

#include <grpcpp/security/credentials.h>
#include <grpcpp/security/server_credentials.h>
#include <grpcpp/security/tls_certificate_provider.h>
#include <grpcpp/security/tls_certificate_verifier.h>
#include <grpcpp/security/tls_credentials_options.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <iterator>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "services/infra/security/peer_authorizer.h"

namespace kvr::security {
namespace {

using grpc::experimental::FileWatcherCertificateProvider;

unsigned int Interval(int reload_seconds) {
  return static_cast<unsigned int>(std::clamp(reload_seconds, 1, kMaxTlsReloadSeconds));
}

}  // namespace

absl::Status CheckPemFile(absl::string_view flag, const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", flag, " ", path, ": cannot read: ", std::strerror(errno)));
  }
  std::string text;
  text.resize(static_cast<size_t>(kMaxPemFileBytes) + 1);
  in.read(text.data(), static_cast<std::streamsize>(text.size()));
  const auto got = static_cast<size_t>(in.gcount());
  if (got > static_cast<size_t>(kMaxPemFileBytes)) {
    return absl::InvalidArgumentError(absl::StrCat("--", flag, " ", path, ": larger than ",
                                                   kMaxPemFileBytes, " bytes"));
  }
  text.resize(got);
  if (text.find("-----BEGIN ") == std::string::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", flag, " ", path, ": not a PEM file (no -----BEGIN line)"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::optional<TlsFiles>> CheckTlsFiles(const std::string& cert_file,
                                                      const std::string& key_file,
                                                      const std::string& ca_file,
                                                      int reload_seconds) {
  std::vector<std::string> missing;
  if (cert_file.empty()) missing.push_back("--tls_cert_file");
  if (key_file.empty()) missing.push_back("--tls_key_file");
  if (ca_file.empty()) missing.push_back("--tls_ca_file");
  if (missing.size() == 3) return std::optional<TlsFiles>();
  if (!missing.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "mTLS needs --tls_cert_file, --tls_key_file and --tls_ca_file together; missing ",
        absl::StrJoin(missing, ", ")));
  }
  if (reload_seconds < 1 || reload_seconds > kMaxTlsReloadSeconds) {
    return absl::InvalidArgumentError(absl::StrCat("--tls_reload_seconds ", reload_seconds,
                                                   " outside [1, ", kMaxTlsReloadSeconds, "]"));
  }
  for (const auto& [flag, path] : {std::pair<const char*, const std::string&>{"tls_cert_file",
                                                                               cert_file},
                                   {"tls_key_file", key_file},
                                   {"tls_ca_file", ca_file}}) {
    if (absl::Status st = CheckPemFile(flag, path); !st.ok()) return st;
  }
  return std::optional<TlsFiles>(TlsFiles{cert_file, key_file, ca_file, reload_seconds});
}

std::shared_ptr<grpc::ServerCredentials> MakeMtlsServerCredentials(
    const TlsFiles& files, std::vector<std::string> allowed_peers,
    const std::string& server_name) {
  auto provider = std::make_shared<FileWatcherCertificateProvider>(
      files.key_file, files.cert_file, files.ca_file, Interval(files.reload_seconds));
  grpc::experimental::TlsServerCredentialsOptions options(provider);
  options.watch_root_certs();
  options.watch_identity_key_cert_pairs();
  options.set_cert_request_type(GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  std::shared_ptr<grpc::ServerCredentials> credentials =
      grpc::experimental::TlsServerCredentials(options);
  credentials->SetAuthMetadataProcessor(
      std::make_shared<PeerAuthorizer>(std::move(allowed_peers), server_name));
  return credentials;
}

std::shared_ptr<grpc::ServerCredentials> MakeServerTlsCredentials(const std::string& cert_file,
                                                                  const std::string& key_file,
                                                                  int reload_seconds) {
  auto provider = std::make_shared<FileWatcherCertificateProvider>(key_file, cert_file,
                                                                   Interval(reload_seconds));
  grpc::experimental::TlsServerCredentialsOptions options(provider);
  options.watch_identity_key_cert_pairs();
  options.set_cert_request_type(GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
  return grpc::experimental::TlsServerCredentials(options);
}

namespace {

// Channel credentials over `provider`: roots always verified, with the
// hostname check; the identity pair presented when `identity`.
std::shared_ptr<grpc::ChannelCredentials> ChannelCredentials(
    std::shared_ptr<grpc::experimental::CertificateProviderInterface> provider, bool identity) {
  grpc::experimental::TlsChannelCredentialsOptions options;
  options.set_certificate_provider(std::move(provider));
  options.watch_root_certs();
  if (identity) options.watch_identity_key_cert_pairs();
  options.set_verify_server_certs(true);
  options.set_certificate_verifier(
      std::make_shared<grpc::experimental::HostNameCertificateVerifier>());
  return grpc::experimental::TlsCredentials(options);
}

}  // namespace

std::shared_ptr<grpc::ChannelCredentials> MakeMtlsChannelCredentials(const TlsFiles& files) {
  return ChannelCredentials(
      std::make_shared<FileWatcherCertificateProvider>(files.key_file, files.cert_file,
                                                       files.ca_file,
                                                       Interval(files.reload_seconds)),
      /*identity=*/true);
}

absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> MakeClientChannelCredentials(
    const std::string& ca_file, const std::string& cert_file, const std::string& key_file) {
  if (ca_file.empty()) {
    if (cert_file.empty() && key_file.empty()) return grpc::InsecureChannelCredentials();
    return absl::InvalidArgumentError(
        "a client certificate (--tls_cert_file, --tls_key_file) needs --tls_ca_file");
  }
  if (absl::Status st = CheckPemFile("tls_ca_file", ca_file); !st.ok()) return st;
  if (cert_file.empty() != key_file.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "a client certificate needs --tls_cert_file and --tls_key_file together; missing ",
        cert_file.empty() ? "--tls_cert_file" : "--tls_key_file"));
  }
  constexpr unsigned int kClientReloadSeconds = 10;
  if (cert_file.empty()) {
    return ChannelCredentials(
        std::make_shared<FileWatcherCertificateProvider>(ca_file, kClientReloadSeconds),
        /*identity=*/false);
  }
  if (absl::Status st = CheckPemFile("tls_cert_file", cert_file); !st.ok()) return st;
  if (absl::Status st = CheckPemFile("tls_key_file", key_file); !st.ok()) return st;
  return ChannelCredentials(std::make_shared<FileWatcherCertificateProvider>(
                                key_file, cert_file, ca_file, kClientReloadSeconds),
                            /*identity=*/true);
}

}  // namespace kvr::security
