#include "tools/cluster_secure.h"

#include <sys/stat.h>

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/rand.h>

#include <cerrno>
#include <cstring>
#include <filesystem>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "nlohmann/json.hpp"
#include "services/infra/security/cert_authority.h"

namespace kvr::cluster {
namespace {

namespace fs = std::filesystem;

absl::StatusOr<std::string> RandomBytes(size_t n) {
  std::string out(n, '\0');
  if (RAND_bytes(reinterpret_cast<unsigned char*>(out.data()), static_cast<int>(n)) != 1) {
    char buf[256];
    ERR_error_string_n(ERR_get_error(), buf, sizeof(buf));
    return absl::InternalError(absl::StrCat("RAND_bytes: ", buf));
  }
  return out;
}

absl::StatusOr<std::string> Sha256(absl::string_view data) {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int size = 0;
  if (EVP_Digest(data.data(), data.size(), digest, &size, EVP_sha256(), nullptr) != 1) {
    char buf[256];
    ERR_error_string_n(ERR_get_error(), buf, sizeof(buf));
    return absl::InternalError(absl::StrCat("SHA-256: ", buf));
  }
  return std::string(reinterpret_cast<const char*>(digest), size);
}

}  // namespace

absl::StatusOr<ApiKeyAndEntry> MakeClusterApiKey(const std::string& id) {
  KVR_ASSIGN_OR_RETURN(const std::string secret, RandomBytes(32));
  KVR_ASSIGN_OR_RETURN(const std::string salt, RandomBytes(16));
  ApiKeyAndEntry out;
  out.key = absl::StrCat("kvr-", absl::WebSafeBase64Escape(secret));  // 43 chars, no padding
  KVR_ASSIGN_OR_RETURN(const std::string hash, Sha256(absl::StrCat(salt, out.key)));
  nlohmann::ordered_json entry;
  entry["id"] = id;
  entry["salt"] = absl::BytesToHexString(salt);
  entry["sha256"] = absl::BytesToHexString(hash);
  entry["max_concurrent"] = 0;
  entry["tokens_per_minute"] = 0;
  out.entry_json = entry.dump();
  return out;
}

std::vector<std::string> TlsFlags(const RoleFiles& role, const std::string& ca_cert) {
  return {"--tls_cert_file=" + role.cert, "--tls_key_file=" + role.key,
          "--tls_ca_file=" + ca_cert};
}

absl::StatusOr<ClusterCredentials> MakeClusterCredentials(const std::string& run_dir,
                                                          absl::Duration validity) {
  std::error_code ec;
  const fs::path root = fs::absolute(run_dir, ec);
  if (ec) return absl::InternalError(absl::StrCat("run dir ", run_dir, ": ", ec.message()));
  const fs::path tls = root / "tls";
  if (mkdir(tls.c_str(), 0700) != 0 && errno != EEXIST) {
    return absl::InternalError(absl::StrCat("mkdir ", tls.string(), ": ", std::strerror(errno)));
  }
  // An existing tls/ (an earlier run) may have other bits: make it private.
  if (chmod(tls.c_str(), 0700) != 0) {
    return absl::InternalError(absl::StrCat("chmod ", tls.string(), ": ", std::strerror(errno)));
  }

  ClusterCredentials out;
  KVR_ASSIGN_OR_RETURN(const security::CertAndKey ca, security::MakeCa("kvr-ca", validity));
  out.ca_cert = (tls / "ca.crt").string();
  out.ca_key = (tls / "ca.key").string();
  KVR_RETURN_IF_ERROR(security::WriteCertAndKey(ca, out.ca_cert, out.ca_key));
  const std::pair<const char*, RoleFiles*> roles[] = {{"kvr-node", &out.node},
                                                      {"kvr-worker", &out.worker},
                                                      {"kvr-gateway", &out.gateway},
                                                      {"kvr-client", &out.client}};
  for (const auto& [cn, files] : roles) {
    absl::StatusOr<security::CertAndKey> cert =
        security::IssueCert(ca, cn, {"localhost"}, {"127.0.0.1"}, validity);
    if (!cert.ok()) {
      return absl::Status(cert.status().code(),
                          absl::StrCat("certificate ", cn, ": ", cert.status().message()));
    }
    files->cert = (tls / absl::StrCat(cn, ".crt")).string();
    files->key = (tls / absl::StrCat(cn, ".key")).string();
    KVR_RETURN_IF_ERROR(security::WriteCertAndKey(*cert, files->cert, files->key));
  }

  KVR_ASSIGN_OR_RETURN(const ApiKeyAndEntry api_key, MakeClusterApiKey(kClusterApiKeyId));
  out.api_key = api_key.key;
  out.api_keys_file = (root / "api_keys.json").string();
  KVR_RETURN_IF_ERROR(security::WriteFileAtomically(
      out.api_keys_file, absl::StrCat("{\"keys\": [", api_key.entry_json, "]}\n"), 0600));
  return out;
}

}  // namespace kvr::cluster
