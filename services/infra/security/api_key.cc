#include "services/infra/security/api_key.h"

#include <grpcpp/client_context.h>

#include <string>

#include "absl/strings/str_cat.h"

namespace kvr::security {

absl::Status CheckApiKey(absl::string_view key) {
  if (key.size() > kMaxApiKeyBytes) {
    return absl::InvalidArgumentError(absl::StrCat("--api_key: ", key.size(),
                                                   " bytes exceeds ", kMaxApiKeyBytes));
  }
  for (const char c : key) {
    if (c < 0x21 || c > 0x7e) {
      return absl::InvalidArgumentError(
          "--api_key: only visible ASCII characters (no spaces or control characters)");
    }
  }
  return absl::OkStatus();
}

void AttachApiKey(absl::string_view key, grpc::ClientContext* context) {
  if (key.empty()) return;
  context->AddMetadata("authorization", absl::StrCat("Bearer ", key));
}

}  // namespace kvr::security
