#include "tools/cluster_secure.h"

#include <sys/stat.h>

#include <cerrno>
#include <cstring>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "services/gateway/api_keys.h"
#include "services/infra/security/cert_authority.h"

namespace kvr::cluster {

namespace fs = std::filesystem;

std::vector<std::string> TlsFlags(const RoleFiles& role, const std::string& ca_cert) {
  return {"--tls_cert_file=" + role.cert, "--tls_key_file=" + role.key,
          "--tls_ca_file=" + ca_cert};
}

std::string WorkerCommonName(int i) { return absl::StrCat("kvr-worker-", i); }

absl::StatusOr<ClusterCredentials> MakeClusterCredentials(const std::string& run_dir,
                                                          absl::Duration validity, int workers,
                                                          const gateway::ApiKeyLimits& key_limits) {
  if (workers < 0 || workers > kMaxClusterWorkerCerts) {
    return absl::InvalidArgumentError(absl::StrCat("workers ", workers, " not in [0, ",
                                                   kMaxClusterWorkerCerts, "]"));
  }
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
  // Per worker: its own CN (the nodes' tenant principal) plus the role as a
  // DNS SAN (what --tls_allowed_peers kvr-worker matches).
  out.workers.resize(static_cast<size_t>(workers));
  for (int i = 0; i < workers; ++i) {
    const std::string cn = WorkerCommonName(i);
    absl::StatusOr<security::CertAndKey> cert =
        security::IssueCert(ca, cn, {"localhost", "kvr-worker"}, {"127.0.0.1"}, validity);
    if (!cert.ok()) {
      return absl::Status(cert.status().code(),
                          absl::StrCat("certificate ", cn, ": ", cert.status().message()));
    }
    RoleFiles& files = out.workers[static_cast<size_t>(i)];
    files.cert = (tls / absl::StrCat(cn, ".crt")).string();
    files.key = (tls / absl::StrCat(cn, ".key")).string();
    KVR_RETURN_IF_ERROR(security::WriteCertAndKey(*cert, files.cert, files.key));
  }

  KVR_ASSIGN_OR_RETURN(const gateway::MadeApiKey api_key,
                       gateway::MakeApiKey(kClusterApiKeyId, key_limits));
  out.api_key = api_key.key;
  out.api_keys_file = (root / "api_keys.json").string();
  KVR_RETURN_IF_ERROR(security::WriteFileAtomically(
      out.api_keys_file, absl::StrCat("{\"keys\": [", api_key.entry, "]}\n"), 0600));
  return out;
}

}  // namespace kvr::cluster
