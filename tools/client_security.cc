#include "tools/client_security.h"

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "services/infra/security/cert_authority.h"

namespace kvr::client {
namespace {

// The contents of PEM file `path` given as --`flag`.
absl::StatusOr<std::string> ReadPem(absl::string_view flag, const std::string& path) {
  absl::StatusOr<std::string> text = security::ReadSmallFile(path, kMaxPemFileBytes);
  if (!text.ok()) {
    return absl::Status(text.status().code(),
                        absl::StrCat("--", flag, ": ", text.status().message()));
  }
  if (text->find("-----BEGIN ") == std::string::npos) {
    return absl::InvalidArgumentError(absl::StrCat("--", flag, ": ", path, " holds no PEM block"));
  }
  return text;
}

}  // namespace

absl::Status ValidateApiKey(absl::string_view key) {
  if (key.empty()) return absl::InvalidArgumentError("--api_key is empty");
  if (key.size() > kMaxApiKeyBytes) {
    return absl::InvalidArgumentError(absl::StrCat("--api_key has ", key.size(),
                                                   " bytes, more than the limit of ",
                                                   kMaxApiKeyBytes));
  }
  for (char c : key) {
    if (c < 0x21 || c > 0x7e) {
      return absl::InvalidArgumentError(
          "--api_key may hold only visible ASCII characters (no spaces or control bytes)");
    }
  }
  return absl::OkStatus();
}

absl::Status ValidateClientSecurity(const ClientSecurity& s) {
  if (!s.tls_cert_file.empty() && s.tls_key_file.empty()) {
    return absl::InvalidArgumentError("--tls_cert_file needs --tls_key_file");
  }
  if (s.tls_cert_file.empty() && !s.tls_key_file.empty()) {
    return absl::InvalidArgumentError("--tls_key_file needs --tls_cert_file");
  }
  if (!s.tls_cert_file.empty() && s.tls_ca_file.empty()) {
    return absl::InvalidArgumentError(
        "--tls_cert_file needs --tls_ca_file (the CA that signed the server's certificate)");
  }
  if (!s.api_key.empty()) KVR_RETURN_IF_ERROR(ValidateApiKey(s.api_key));
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> MakeChannelCredentials(
    const ClientSecurity& s) {
  KVR_RETURN_IF_ERROR(ValidateClientSecurity(s));
  if (s.tls_ca_file.empty()) return grpc::InsecureChannelCredentials();
  grpc::SslCredentialsOptions options;
  KVR_ASSIGN_OR_RETURN(options.pem_root_certs, ReadPem("tls_ca_file", s.tls_ca_file));
  if (!s.tls_cert_file.empty()) {
    KVR_ASSIGN_OR_RETURN(options.pem_cert_chain, ReadPem("tls_cert_file", s.tls_cert_file));
    KVR_ASSIGN_OR_RETURN(options.pem_private_key, ReadPem("tls_key_file", s.tls_key_file));
  }
  return grpc::SslCredentials(options);
}

void AddApiKey(const ClientSecurity& s, grpc::ClientContext* context) {
  if (!s.api_key.empty()) context->AddMetadata("authorization", absl::StrCat("Bearer ", s.api_key));
}

}  // namespace kvr::client
