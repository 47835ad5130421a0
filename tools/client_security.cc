#include "tools/client_security.h"

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "services/infra/security/tls_credentials.h"

namespace kvr::client {

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
  return security::MakeClientChannelCredentials(s.tls_ca_file, s.tls_cert_file, s.tls_key_file);
}

void AddApiKey(const ClientSecurity& s, grpc::ClientContext* context) {
  if (!s.api_key.empty()) context->AddMetadata("authorization", absl::StrCat("Bearer ", s.api_key));
}

}  // namespace kvr::client
