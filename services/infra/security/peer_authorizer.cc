#include "services/infra/security/peer_authorizer.h"

#include <grpc/grpc_security_constants.h>

#include <algorithm>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace kvr::security {

absl::StatusOr<std::vector<std::string>> ParseAllowedPeers(absl::string_view list) {
  std::vector<std::string> out;
  for (absl::string_view entry : absl::StrSplit(list, ',')) {
    entry = absl::StripAsciiWhitespace(entry);
    if (entry.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("--tls_allowed_peers '", list, "': empty identity"));
    }
    if (entry.size() > kMaxPeerIdentityBytes) {
      return absl::InvalidArgumentError(absl::StrCat("--tls_allowed_peers: identity of ",
                                                     entry.size(), " bytes exceeds ",
                                                     kMaxPeerIdentityBytes));
    }
    if (out.size() == kMaxAllowedPeers) {
      return absl::InvalidArgumentError(
          absl::StrCat("--tls_allowed_peers: more than ", kMaxAllowedPeers, " identities"));
    }
    out.emplace_back(entry);
  }
  return out;
}

std::vector<std::string> PeerIdentities(const grpc::AuthContext& context) {
  std::vector<std::string> out;
  for (const char* property :
       {GRPC_X509_CN_PROPERTY_NAME, GRPC_PEER_DNS_PROPERTY_NAME, GRPC_PEER_URI_PROPERTY_NAME}) {
    for (const grpc::string_ref& value : context.FindPropertyValues(property)) {
      out.emplace_back(value.data(), value.size());
    }
  }
  return out;
}

bool IsExemptMethod(absl::string_view path) {
  return absl::StartsWith(path, "/grpc.health.v1.Health/") ||
         absl::StartsWith(path, "/grpc.reflection.");
}

PeerAuthorizer::PeerAuthorizer(std::vector<std::string> allowed, std::string server_name)
    : allowed_(std::move(allowed)),
      allow_all_(std::find(allowed_.begin(), allowed_.end(), "*") != allowed_.end()),
      server_name_(std::move(server_name)),
      allowed_text_(absl::StrJoin(allowed_, ",")) {}

grpc::Status PeerAuthorizer::Authorize(absl::string_view path,
                                       const std::vector<std::string>& identities) const {
  if (IsExemptMethod(path)) return grpc::Status::OK;
  if (!identities.empty() && allow_all_) return grpc::Status::OK;
  for (const std::string& id : identities) {
    if (std::find(allowed_.begin(), allowed_.end(), id) != allowed_.end()) {
      return grpc::Status::OK;
    }
  }
  const std::string peer = identities.empty() ? std::string("(no certificate)") : identities[0];
  return grpc::Status(grpc::StatusCode::PERMISSION_DENIED,
                      absl::StrCat("peer ", peer, " (identities: ", absl::StrJoin(identities, ", "),
                                   ") may not call ", path, " on ", server_name_,
                                   " (--tls_allowed_peers ", allowed_text_, ")"));
}

grpc::Status PeerAuthorizer::Process(const InputMetadata& auth_metadata,
                                     grpc::AuthContext* context,
                                     OutputMetadata* /*consumed_auth_metadata*/,
                                     OutputMetadata* /*response_metadata*/) {
  absl::string_view path;
  if (auto it = auth_metadata.find(":path"); it != auth_metadata.end()) {
    path = absl::string_view(it->second.data(), it->second.size());
  }
  return Authorize(path, context == nullptr ? std::vector<std::string>{}
                                            : PeerIdentities(*context));
}

}  // namespace kvr::security
