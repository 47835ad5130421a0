// The credentials of `kvr cluster --secure`: a throwaway CA (CN kvr-ca), one
// certificate per role (kvr-node, kvr-worker, kvr-gateway, kvr-client;
// SANs DNS:localhost and IP:127.0.0.1; serverAuth + clientAuth) and one per
// decode worker (CN kvr-worker-<i>, DNS SANs localhost and kvr-worker, so
// the nodes' role check admits it while their tenant principal, the CN,
// tells the workers apart), made with
// services/infra/security/cert_authority under <run dir>/tls/, and one
// gateway API key (services/gateway/api_keys.h MakeApiKey, no limits) with
// its salted hash in <run dir>/api_keys.json (the gateway's --api_keys_file).
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "services/gateway/api_keys.h"

namespace kvr::cluster {

// One role's PEM files (absolute paths).
struct RoleFiles {
  std::string cert, key;
};

struct ClusterCredentials {
  std::string ca_cert, ca_key;  // tls/ca.crt, tls/ca.key (kept: more certs can be issued)
  RoleFiles node, worker, gateway, client;  // tls/<CN>.crt, tls/<CN>.key
  std::vector<RoleFiles> workers;  // tls/kvr-worker-<i>.{crt,key}, one per worker
  std::string api_keys_file;  // api_keys.json: {"keys": [{"id": "kvr-cluster", ...}]}
  std::string api_key;        // the key itself: kvr- + 43 base64url characters
};

// The id of the cluster's API key in api_keys.json.
inline constexpr char kClusterApiKeyId[] = "kvr-cluster";

// Makes a fresh CA, the four role certificates, `workers` per-worker
// certificates (each valid for `validity`; `workers` in [0,
// kMaxClusterWorkerCerts], InvalidArgument naming it otherwise) and an API
// key, and writes them under `run_dir` (which must exist): tls/
// (mode 0700) with keys at mode 0600, certificates 0644, api_keys.json 0600;
// every file replaced atomically, so a run dir of an earlier cluster gets new
// ones. Errors name the file or the certificate.
// `key_limits` are the API key's (gateway::ApiKeyLimits; default none: the
// cluster's one key is for its owner).
absl::StatusOr<ClusterCredentials> MakeClusterCredentials(
    const std::string& run_dir, absl::Duration validity = absl::Hours(24), int workers = 0,
    const gateway::ApiKeyLimits& key_limits = {});

// The most per-worker certificates MakeClusterCredentials issues.
inline constexpr int kMaxClusterWorkerCerts = 1024;

// The Subject CN of worker `i`'s certificate: "kvr-worker-<i>".
std::string WorkerCommonName(int i);

// --tls_cert_file=, --tls_key_file=, --tls_ca_file= for a child of `role`.
std::vector<std::string> TlsFlags(const RoleFiles& role, const std::string& ca_cert);

}  // namespace kvr::cluster
