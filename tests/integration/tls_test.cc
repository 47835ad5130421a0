// mTLS on every gRPC hop (issue 16 [secure], deliverable 1), with real
// kvr_node / kvr_worker / kvr_gateway / kvr_health_probe processes on
// 127.0.0.1 and certificates from services/infra/security/cert_authority:
//
//  * generation through gateway -> worker -> 2 nodes, all mTLS (and the
//    gateway's client port server-only TLS), streams exactly the tokens of
//    the same cluster run in plaintext;
//  * node -> node (SyncShards reading its source's ReadShards) works with
//    the kvr-node certificate, and is refused when the source does not
//    allow kvr-node;
//  * refused: plaintext, a TLS client without a certificate, a certificate
//    from another CA (UNAVAILABLE: the handshake fails), the wrong role
//    (kvr-gateway calling a node, kvr-node calling a worker:
//    PERMISSION_DENIED naming the peer and the method); health stays open
//    to any CA-signed peer;
//  * rotation: the node's certificate and key replaced on disk while it
//    runs; new connections see the new serial (polled with a deadline), no
//    restart;
//  * some but not all --tls_* flags: exit 2 naming the missing flag (node,
//    worker, gateway, probe); kvr_node refuses --ucx_listen under mTLS
//    unless --ucx_allow_unencrypted;
//  * kvr_health_probe speaks mTLS;
//  * the peer check itself (identities, exempt methods, list bounds).
//
// Usage: tls_test --kvr_node PATH --kvr_worker PATH --kvr_gateway PATH
//                 --kvr_health_probe PATH --kvr PATH [gtest flags]
#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <sys/wait.h>

#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/subprocess.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "gtest/gtest.h"
#include "kvr/v1/generation.grpc.pb.h"
#include "kvr/v1/retrieval.grpc.pb.h"
#include "services/infra/security/cert_authority.h"
#include "services/infra/security/peer_authorizer.h"
#include "services/infra/security/tls_credentials.h"
#include "tests/support/gateway_process.h"
#include "tests/support/server_process.h"
#include "tests/support/temp_dir.h"

namespace kvr::security {
namespace {

using test_support::GatewayProcess;
using test_support::NodeProcess;
using test_support::ServerProcess;

std::string g_worker_binary;   // --kvr_worker
std::string g_gateway_binary;  // --kvr_gateway
std::string g_probe_binary;    // --kvr_health_probe
std::string g_kvr_binary;      // --kvr (for `kvr client`)

constexpr auto kCallTimeout = std::chrono::seconds(30);
// Longer than sinks + window (20 tokens): prefill offloads shards to the nodes.
constexpr char kLongPrompt[] =
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the sun "
    "with her big red ball and her dog.";

// ---------------------------------------------------------------------------
// Certificates: one CA (kvr-ca) with a certificate per role, and a second,
// unrelated CA with a kvr-worker certificate of its own.

struct Identity {
  std::string cert;  // paths
  std::string key;
};

class Pki {
 public:
  Pki() {
    absl::StatusOr<CertAndKey> ca = MakeCa("kvr-ca");
    absl::StatusOr<CertAndKey> other_ca = MakeCa("kvr-ca");  // same name, other key
    EXPECT_TRUE(ca.ok() && other_ca.ok());
    ca_ = *ca;
    ca_file_ = dir_.path() + "/ca.pem";
    EXPECT_TRUE(WriteFileAtomically(ca_file_, ca_.cert_pem, 0644).ok());
    node_ = Issue(ca_, "kvr-node", "node");
    worker_ = Issue(ca_, "kvr-worker", "worker");
    gateway_ = Issue(ca_, "kvr-gateway", "gateway");
    client_ = Issue(ca_, "kvr-client", "client");
    rogue_worker_ = Issue(*other_ca, "kvr-worker", "rogue_worker");
  }

  // A new certificate for `role_cn` from `ca` with SANs DNS:localhost and
  // `ip_sans`, written to `name`.{pem,key}.
  Identity Issue(const CertAndKey& ca, const std::string& role_cn, const std::string& name,
                 const std::vector<std::string>& ip_sans = {"127.0.0.1"}) {
    absl::StatusOr<CertAndKey> leaf = IssueCert(ca, role_cn, {"localhost"}, ip_sans);
    EXPECT_TRUE(leaf.ok()) << leaf.status();
    Identity id{dir_.path() + "/" + name + ".pem", dir_.path() + "/" + name + ".key"};
    EXPECT_TRUE(leaf.ok() && WriteCertAndKey(*leaf, id.cert, id.key).ok());
    return id;
  }

  // The --tls_* flags of a process with identity `id`.
  std::vector<std::string> Flags(const Identity& id) const {
    return {"--tls_cert_file=" + id.cert, "--tls_key_file=" + id.key,
            "--tls_ca_file=" + ca_file_};
  }

  const CertAndKey& ca() const { return ca_; }
  const std::string& ca_file() const { return ca_file_; }
  const std::string& dir() const { return dir_.path(); }
  const Identity& node() const { return node_; }
  const Identity& worker() const { return worker_; }
  const Identity& gateway() const { return gateway_; }
  const Identity& client() const { return client_; }
  const Identity& rogue_worker() const { return rogue_worker_; }

 private:
  test_support::TempDir dir_{"kvr_tls"};
  CertAndKey ca_;
  std::string ca_file_;
  Identity node_, worker_, gateway_, client_, rogue_worker_;
};

// ---------------------------------------------------------------------------
// Clients.

// A channel of its own (a local subchannel pool: never a connection another
// channel opened), so each one makes a new TLS handshake.
std::shared_ptr<grpc::Channel> FreshChannel(const std::string& address,
                                            std::shared_ptr<grpc::ChannelCredentials> creds) {
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  return grpc::CreateCustomChannel(address, std::move(creds), args);
}

// mTLS credentials presenting `id`, verifying servers against `ca_file`.
std::shared_ptr<grpc::ChannelCredentials> As(const Pki& pki, const Identity& id) {
  absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> c =
      MakeClientChannelCredentials(pki.ca_file(), id.cert, id.key);
  EXPECT_TRUE(c.ok()) << c.status();
  return c.ok() ? *c : nullptr;
}

void SetDeadline(grpc::ClientContext* ctx, std::chrono::milliseconds timeout = kCallTimeout) {
  ctx->set_deadline(std::chrono::system_clock::now() + timeout);
}

grpc::Status NodeStats(const std::string& address, std::shared_ptr<grpc::ChannelCredentials> c) {
  auto stub = v1::RetrievalNode::NewStub(FreshChannel(address, std::move(c)));
  grpc::ClientContext ctx;
  SetDeadline(&ctx, std::chrono::seconds(10));
  v1::StatsResponse resp;
  return stub->Stats(&ctx, v1::StatsRequest(), &resp);
}

grpc::Status WorkerInfo(const std::string& address, std::shared_ptr<grpc::ChannelCredentials> c) {
  auto stub = v1::Generation::NewStub(FreshChannel(address, std::move(c)));
  grpc::ClientContext ctx;
  SetDeadline(&ctx, std::chrono::seconds(10));
  v1::GetModelInfoResponse resp;
  return stub->GetModelInfo(&ctx, v1::GetModelInfoRequest(), &resp);
}

// grpc.health.v1 Check("") status; SERVING is checked by the caller.
grpc::Status Health(const std::string& address, std::shared_ptr<grpc::ChannelCredentials> c,
                    grpc::health::v1::HealthCheckResponse* resp) {
  auto stub = grpc::health::v1::Health::NewStub(FreshChannel(address, std::move(c)));
  grpc::ClientContext ctx;
  SetDeadline(&ctx, std::chrono::seconds(10));
  return stub->Check(&ctx, grpc::health::v1::HealthCheckRequest(), resp);
}

struct Streamed {
  std::vector<int32_t> tokens;
  std::string text;
  grpc::Status status;
};

Streamed Generate(const std::string& address, std::shared_ptr<grpc::ChannelCredentials> c) {
  auto stub = v1::Generation::NewStub(FreshChannel(address, std::move(c)));
  v1::GenerateRequest r;
  r.set_text(kLongPrompt);
  r.set_max_tokens(40);
  r.mutable_sampling()->set_temperature(0.7f);
  r.mutable_sampling()->set_seed(3);
  grpc::ClientContext ctx;
  SetDeadline(&ctx);
  Streamed out;
  auto reader = stub->Generate(&ctx, r);
  v1::GenerateResponse msg;
  while (reader->Read(&msg)) {
    if (!msg.has_chunk()) continue;
    out.text += msg.chunk().text();
    out.tokens.insert(out.tokens.end(), msg.chunk().token_ids().begin(),
                      msg.chunk().token_ids().end());
  }
  out.status = reader->Finish();
  return out;
}

// The serial (hex) of the PEM certificate `cert_pem`.
std::string SerialOf(const std::string& cert_pem) {
  BIO* bio = BIO_new_mem_buf(cert_pem.data(), static_cast<int>(cert_pem.size()));
  X509* cert = PEM_read_bio_X509(bio, nullptr, nullptr, nullptr);
  BIO_free(bio);
  if (cert == nullptr) return "";
  BIGNUM* bn = ASN1_INTEGER_to_BN(X509_get_serialNumber(cert), nullptr);
  char* hex = BN_bn2hex(bn);
  std::string out = hex;
  OPENSSL_free(hex);
  BN_free(bn);
  X509_free(cert);
  return out;
}

// The serial number (hex) of the leaf certificate a server at `address`
// presents on a new connection, or "" when the call failed.
std::string ServerSerial(const std::string& address, std::shared_ptr<grpc::ChannelCredentials> c) {
  auto stub = grpc::health::v1::Health::NewStub(FreshChannel(address, std::move(c)));
  grpc::ClientContext ctx;
  SetDeadline(&ctx, std::chrono::seconds(5));
  grpc::health::v1::HealthCheckResponse resp;
  if (!stub->Check(&ctx, grpc::health::v1::HealthCheckRequest(), &resp).ok()) return "";
  std::shared_ptr<const grpc::AuthContext> auth = ctx.auth_context();
  if (auth == nullptr) return "";
  std::vector<grpc::string_ref> pem = auth->FindPropertyValues(GRPC_X509_PEM_CERT_PROPERTY_NAME);
  if (pem.empty()) return "";
  return SerialOf(std::string(pem[0].data(), pem[0].size()));
}

// Runs `argv` to its exit (at most 60 s); its wait status and output
// (stdout and stderr).
struct Ran {
  int status = -1;
  std::string output;
};
// With `stdout_only`, stderr goes to the test's log instead.
Ran RunToExit(std::vector<std::string> argv, bool stdout_only = false) {
  Ran r;
  absl::StatusOr<std::unique_ptr<Subprocess>> p =
      Subprocess::Start(std::move(argv), /*merge_stderr=*/!stdout_only);
  if (!p.ok()) return ADD_FAILURE() << p.status(), r;
  // Reads its output to EOF (no line has this prefix), then reaps it.
  (void)(*p)->WaitForLine("\x01", absl::Seconds(60));
  absl::StatusOr<int> st = (*p)->Stop(0, absl::Seconds(10));
  EXPECT_TRUE(st.ok()) << st.status();
  if (st.ok()) r.status = *st;
  r.output = (*p)->Output();
  return r;
}

bool Exited(int status, int code) { return WIFEXITED(status) && WEXITSTATUS(status) == code; }

bool StopOk(ServerProcess* p) {
  const std::optional<int> st = p->Stop(SIGTERM);
  return st.has_value() && Exited(*st, 0);
}

class TlsTest : public ::testing::Test {
 protected:
  Pki pki_;
};

// ---------------------------------------------------------------------------
// The peer check without servers.

TEST(PeerAuthorizerTest, AllowsListedIdentitiesAndExemptMethodsOnly) {
  PeerAuthorizer authz({"kvr-worker", "kvr-node"}, "kvr_node");
  EXPECT_TRUE(authz.Authorize("/kvr.v1.RetrievalNode/Attend", {"kvr-worker", "localhost"}).ok());
  // A SAN counts as much as the CN.
  EXPECT_TRUE(authz.Authorize("/kvr.v1.RetrievalNode/Attend", {"x", "kvr-node"}).ok());
  const grpc::Status denied =
      authz.Authorize("/kvr.v1.RetrievalNode/Attend", {"kvr-gateway", "localhost"});
  EXPECT_EQ(denied.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_TRUE(absl::StrContains(denied.error_message(), "peer kvr-gateway"))
      << denied.error_message();
  EXPECT_TRUE(absl::StrContains(denied.error_message(), "/kvr.v1.RetrievalNode/Attend"));
  EXPECT_TRUE(absl::StrContains(denied.error_message(), "--tls_allowed_peers kvr-worker,kvr-node"));
  // Health and reflection: any CA-signed peer.
  EXPECT_TRUE(authz.Authorize("/grpc.health.v1.Health/Check", {"kvr-gateway"}).ok());
  EXPECT_TRUE(authz.Authorize("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                              {"kvr-gateway"})
                  .ok());
  // Look-alikes of exempt services are not exempt; no identity is nobody.
  EXPECT_FALSE(authz.Authorize("/grpc.health.v1.HealthX/Check", {"kvr-gateway"}).ok());
  EXPECT_FALSE(authz.Authorize("/kvr.v1.RetrievalNode/Stats", {}).ok());
  EXPECT_FALSE(authz.Authorize("", {"kvr-gateway"}).ok());
  // Identities match whole, case-sensitively.
  EXPECT_FALSE(authz.Authorize("/kvr.v1.RetrievalNode/Stats", {"kvr-worker2"}).ok());
  EXPECT_FALSE(authz.Authorize("/kvr.v1.RetrievalNode/Stats", {"KVR-WORKER"}).ok());

  PeerAuthorizer any({"*"}, "kvr_worker");
  EXPECT_TRUE(any.Authorize("/kvr.v1.Generation/Generate", {"whoever"}).ok());
  EXPECT_FALSE(any.Authorize("/kvr.v1.Generation/Generate", {}).ok());
}

TEST(PeerAuthorizerTest, AllowedPeersListIsBounded) {
  absl::StatusOr<std::vector<std::string>> ok = ParseAllowedPeers(" kvr-worker , kvr-node");
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ(*ok, (std::vector<std::string>{"kvr-worker", "kvr-node"}));
  for (const std::string bad : {"", "a,,b", "a, ", ","}) {
    absl::StatusOr<std::vector<std::string>> r = ParseAllowedPeers(bad);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << "'" << bad << "'";
    EXPECT_TRUE(absl::StrContains(r.status().message(), "--tls_allowed_peers"));
  }
  std::string many = "p0";
  for (size_t i = 1; i <= kMaxAllowedPeers; ++i) absl::StrAppend(&many, ",p", i);
  absl::StatusOr<std::vector<std::string>> too_many = ParseAllowedPeers(many);
  EXPECT_EQ(too_many.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(too_many.status().message(), "more than 64"));
  absl::StatusOr<std::vector<std::string>> too_long =
      ParseAllowedPeers(std::string(kMaxPeerIdentityBytes + 1, 'a'));
  EXPECT_EQ(too_long.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(too_long.status().message(), "exceeds 1024"));
}

TEST_F(TlsTest, TlsFilesAreAllOrNone) {
  absl::StatusOr<std::optional<TlsFiles>> none = CheckTlsFiles("", "", "", 10);
  ASSERT_TRUE(none.ok());
  EXPECT_FALSE(none->has_value());
  absl::StatusOr<std::optional<TlsFiles>> all =
      CheckTlsFiles(pki_.node().cert, pki_.node().key, pki_.ca_file(), 10);
  ASSERT_TRUE(all.ok()) << all.status();
  EXPECT_TRUE(all->has_value());
  absl::StatusOr<std::optional<TlsFiles>> no_ca =
      CheckTlsFiles(pki_.node().cert, pki_.node().key, "", 10);
  EXPECT_EQ(no_ca.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(no_ca.status().message(), "missing --tls_ca_file"))
      << no_ca.status();
  absl::StatusOr<std::optional<TlsFiles>> only_ca = CheckTlsFiles("", "", pki_.ca_file(), 10);
  EXPECT_TRUE(
      absl::StrContains(only_ca.status().message(), "missing --tls_cert_file, --tls_key_file"))
      << only_ca.status();
  absl::StatusOr<std::optional<TlsFiles>> absent =
      CheckTlsFiles(pki_.node().cert, pki_.dir() + "/nope.key", pki_.ca_file(), 10);
  EXPECT_TRUE(absl::StrContains(absent.status().message(), "--tls_key_file " + pki_.dir()))
      << absent.status();
  absl::StatusOr<std::optional<TlsFiles>> reload =
      CheckTlsFiles(pki_.node().cert, pki_.node().key, pki_.ca_file(), 0);
  EXPECT_TRUE(absl::StrContains(reload.status().message(), "--tls_reload_seconds 0"));
}

// ---------------------------------------------------------------------------
// Start-up rules.

TEST_F(TlsTest, PartialTlsFlagsExitTwoNamingTheMissingFlag) {
  const std::vector<std::string> partial = {"--tls_cert_file=" + pki_.node().cert,
                                            "--tls_key_file=" + pki_.node().key};
  struct Binary {
    std::string path;
    std::vector<std::string> extra;
  };
  for (const Binary& b : {Binary{test_support::NodeBinary(), {}}, Binary{g_worker_binary, {}},
                          Binary{g_gateway_binary, {"--workers=127.0.0.1:1"}}}) {
    std::vector<std::string> argv = {b.path, "--listen=127.0.0.1:0", "--metrics_listen="};
    argv.insert(argv.end(), b.extra.begin(), b.extra.end());
    argv.insert(argv.end(), partial.begin(), partial.end());
    const Ran r = RunToExit(argv);
    EXPECT_TRUE(Exited(r.status, 2)) << b.path << ": " << r.output;
    EXPECT_TRUE(absl::StrContains(r.output, "missing --tls_ca_file")) << b.path << ": " << r.output;
    EXPECT_FALSE(absl::StrContains(r.output, "listening on")) << b.path;
  }
  const Ran gw = RunToExit({g_gateway_binary, "--listen=127.0.0.1:0", "--metrics_listen=",
                      "--workers=127.0.0.1:1", "--public_tls_cert_file=" + pki_.gateway().cert});
  EXPECT_TRUE(Exited(gw.status, 2)) << gw.output;
  EXPECT_TRUE(absl::StrContains(gw.output, "missing --public_tls_key_file")) << gw.output;
}

TEST_F(TlsTest, NodeRefusesUcxUnderMtlsUnlessAllowed) {
  std::vector<std::string> argv = {test_support::NodeBinary(), "--listen=127.0.0.1:0",
                                   "--metrics_listen=", "--ucx_listen=127.0.0.1:0"};
  const std::vector<std::string> tls = pki_.Flags(pki_.node());
  argv.insert(argv.end(), tls.begin(), tls.end());
  const Ran refused = RunToExit(argv);
  EXPECT_TRUE(Exited(refused.status, 2)) << refused.output;
  EXPECT_TRUE(absl::StrContains(refused.output, "--ucx_allow_unencrypted")) << refused.output;
  EXPECT_FALSE(absl::StrContains(refused.output, "listening on"));

  std::vector<std::string> args = {"--metrics_listen=", "--ucx_listen=127.0.0.1:0",
                                   "--ucx_allow_unencrypted"};
  args.insert(args.end(), tls.begin(), tls.end());
  auto node = NodeProcess::Start(args);
  ASSERT_NE(node, nullptr);
  ASSERT_TRUE(node->listening());
  EXPECT_TRUE(NodeStats(node->address(), As(pki_, pki_.worker())).ok());
  EXPECT_TRUE(StopOk(node.get()));
}

// ---------------------------------------------------------------------------
// Who may call.

TEST_F(TlsTest, NodeRefusesPlaintextStrangersAndWrongRoles) {
  std::vector<std::string> args = {"--metrics_listen="};
  for (const std::string& f : pki_.Flags(pki_.node())) args.push_back(f);
  auto node = NodeProcess::Start(args);
  ASSERT_NE(node, nullptr);
  ASSERT_TRUE(node->listening());
  const std::string& a = node->address();

  // Allowed by default: kvr-worker and kvr-node.
  grpc::Status s = NodeStats(a, As(pki_, pki_.worker()));
  EXPECT_TRUE(s.ok()) << s.error_message();
  s = NodeStats(a, As(pki_, pki_.node()));
  EXPECT_TRUE(s.ok()) << s.error_message();

  // No TLS, TLS without a client certificate, a certificate of another CA:
  // the connection never carries a call.
  s = NodeStats(a, grpc::InsecureChannelCredentials());
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE) << s.error_message();
  absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> anonymous =
      MakeClientChannelCredentials(pki_.ca_file(), "", "");
  ASSERT_TRUE(anonymous.ok());
  s = NodeStats(a, *anonymous);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE) << s.error_message();
  s = NodeStats(a, As(pki_, pki_.rogue_worker()));
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE) << s.error_message();

  // CA-signed but the wrong role: refused per call, naming the peer.
  for (const Identity* id : {&pki_.gateway(), &pki_.client()}) {
    s = NodeStats(a, As(pki_, *id));
    EXPECT_EQ(s.error_code(), grpc::StatusCode::PERMISSION_DENIED) << s.error_message();
    const std::string cn = id == &pki_.gateway() ? "kvr-gateway" : "kvr-client";
    EXPECT_TRUE(absl::StrContains(s.error_message(), "peer " + cn)) << s.error_message();
    EXPECT_TRUE(absl::StrContains(s.error_message(), "/kvr.v1.RetrievalNode/Stats"))
        << s.error_message();
  }
  // Health stays open to any CA-signed peer, and only to those.
  grpc::health::v1::HealthCheckResponse health;
  s = Health(a, As(pki_, pki_.gateway()), &health);
  EXPECT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(health.status(), grpc::health::v1::HealthCheckResponse::SERVING);
  s = Health(a, As(pki_, pki_.rogue_worker()), &health);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE) << s.error_message();
  EXPECT_TRUE(StopOk(node.get()));

  // --tls_allowed_peers replaces the default.
  args.push_back("--tls_allowed_peers=kvr-gateway");
  auto custom = NodeProcess::Start(args);
  ASSERT_NE(custom, nullptr);
  ASSERT_TRUE(custom->listening());
  EXPECT_TRUE(NodeStats(custom->address(), As(pki_, pki_.gateway())).ok());
  s = NodeStats(custom->address(), As(pki_, pki_.worker()));
  EXPECT_EQ(s.error_code(), grpc::StatusCode::PERMISSION_DENIED) << s.error_message();
  EXPECT_TRUE(absl::StrContains(s.error_message(), "peer kvr-worker")) << s.error_message();
  EXPECT_TRUE(StopOk(custom.get()));
}

TEST_F(TlsTest, HealthProbeSpeaksMtls) {
  std::vector<std::string> args = {"--metrics_listen="};
  for (const std::string& f : pki_.Flags(pki_.node())) args.push_back(f);
  auto node = NodeProcess::Start(args);
  ASSERT_NE(node, nullptr);
  ASSERT_TRUE(node->listening());
  const std::string addr = "--addr=" + node->address();
  // The node's own certificate, as in its container.
  const std::vector<std::string> tls = pki_.Flags(pki_.node());
  Ran r = RunToExit({g_probe_binary, addr, "--service=kvr.v1.RetrievalNode", tls[0], tls[1], tls[2]});
  EXPECT_TRUE(Exited(r.status, 0)) << r.output;
  // Plaintext against an mTLS server: not SERVING.
  r = RunToExit({g_probe_binary, addr, "--timeout_ms=3000"});
  EXPECT_TRUE(Exited(r.status, 1)) << r.output;
  // Some of the files: a bad argument naming the missing one.
  r = RunToExit({g_probe_binary, addr, tls[0], tls[2]});
  EXPECT_TRUE(Exited(r.status, 2)) << r.output;
  EXPECT_TRUE(absl::StrContains(r.output, "missing --tls_key_file")) << r.output;
  EXPECT_TRUE(StopOk(node.get()));
}

// ---------------------------------------------------------------------------
// Rotation.

TEST_F(TlsTest, RotatedCertificateIsServedWithoutRestart) {
  std::vector<std::string> args = {"--metrics_listen=", "--tls_reload_seconds=1"};
  for (const std::string& f : pki_.Flags(pki_.node())) args.push_back(f);
  auto node = NodeProcess::Start(args);
  ASSERT_NE(node, nullptr);
  ASSERT_TRUE(node->listening());
  const std::string old_serial = ServerSerial(node->address(), As(pki_, pki_.worker()));
  ASSERT_FALSE(old_serial.empty());

  absl::StatusOr<CertAndKey> next = IssueCert(pki_.ca(), "kvr-node", {"localhost"}, {"127.0.0.1"});
  ASSERT_TRUE(next.ok()) << next.status();
  const std::string new_serial = SerialOf(next->cert_pem);
  ASSERT_NE(new_serial, old_serial);
  ASSERT_TRUE(WriteCertAndKey(*next, pki_.node().cert, pki_.node().key).ok());

  // New connections present the new certificate within a few reload periods.
  std::string seen = old_serial;
  const absl::Time deadline = absl::Now() + absl::Seconds(30);
  while (seen != new_serial && absl::Now() < deadline) {
    const std::string s = ServerSerial(node->address(), As(pki_, pki_.worker()));
    if (!s.empty()) seen = s;
    if (seen != new_serial) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  EXPECT_EQ(seen, new_serial);
  // The same process: calls keep working with the new identity.
  EXPECT_TRUE(NodeStats(node->address(), As(pki_, pki_.worker())).ok());
  EXPECT_TRUE(StopOk(node.get()));
}

// ---------------------------------------------------------------------------
// End to end.

// The cluster: 2 nodes, a worker on both, a gateway on the worker, each
// with its role's certificate when `secure` (and the gateway's client port
// with server-only TLS); else all plaintext.
struct Cluster {
  std::unique_ptr<NodeProcess> nodes[2];
  std::unique_ptr<ServerProcess> worker;
  std::unique_ptr<GatewayProcess> gateway;

  bool Start(const Pki& pki, bool secure) {
    for (auto& n : nodes) {
      std::vector<std::string> args = {"--metrics_listen="};
      if (secure) {
        for (const std::string& f : pki.Flags(pki.node())) args.push_back(f);
      }
      n = NodeProcess::Start(args);
      if (n == nullptr || !n->listening()) return false;
    }
    std::vector<std::string> wargs = {
        "--metrics_listen=", "--replicas=2",
        "--nodes=" + nodes[0]->address() + "," + nodes[1]->address()};
    if (secure) {
      for (const std::string& f : pki.Flags(pki.worker())) wargs.push_back(f);
    }
    worker = ServerProcess::Start(g_worker_binary, "kvr_worker", wargs);
    if (worker == nullptr || !worker->listening()) return false;
    std::vector<std::string> gargs = {"--workers=" + worker->address()};
    if (secure) {
      for (const std::string& f : pki.Flags(pki.gateway())) gargs.push_back(f);
      gargs.push_back("--public_tls_cert_file=" + pki.gateway().cert);
      gargs.push_back("--public_tls_key_file=" + pki.gateway().key);
    }
    gateway = GatewayProcess::Start(g_gateway_binary, gargs);
    return gateway != nullptr;
  }

  bool Stop() {
    bool ok = gateway == nullptr || gateway->Stop();
    if (worker != nullptr) ok = StopOk(worker.get()) && ok;
    for (auto& n : nodes) {
      if (n != nullptr) ok = StopOk(n.get()) && ok;
    }
    return ok;
  }
};

TEST_F(TlsTest, GenerationOverMtlsEqualsPlaintext) {
  Cluster plain;
  ASSERT_TRUE(plain.Start(pki_, /*secure=*/false));
  const Streamed want = Generate(plain.gateway->grpc(), grpc::InsecureChannelCredentials());
  ASSERT_TRUE(want.status.ok()) << want.status.error_message();
  ASSERT_EQ(want.tokens.size(), 40u);
  EXPECT_TRUE(plain.Stop());

  Cluster secure;
  ASSERT_TRUE(secure.Start(pki_, /*secure=*/true));
  // The gateway's client port: server-only TLS, any client that trusts the CA.
  absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> client =
      MakeClientChannelCredentials(pki_.ca_file(), "", "");
  ASSERT_TRUE(client.ok());
  const Streamed got = Generate(secure.gateway->grpc(), *client);
  ASSERT_TRUE(got.status.ok()) << got.status.error_message();
  EXPECT_EQ(got.tokens, want.tokens);
  EXPECT_EQ(got.text, want.text);
  // ... and plaintext to it is refused.
  EXPECT_EQ(Generate(secure.gateway->grpc(), grpc::InsecureChannelCredentials()).status.error_code(),
            grpc::StatusCode::UNAVAILABLE);

  // `kvr client` over the gateway's server-only TLS (CA only) streams the
  // same text; without --tls_ca_file it cannot connect.
  const std::vector<std::string> cli_args = {
      g_kvr_binary,   "client",          "--target", secure.gateway->grpc(), "--prompt",
      kLongPrompt,    "--max_tokens=40", "--temperature=0.7", "--seed=3", "--echo=false",
      "--deadline_seconds=30"};
  std::vector<std::string> with_ca = cli_args;
  with_ca.push_back("--tls_ca_file=" + pki_.ca_file());
  Ran cli = RunToExit(with_ca, /*stdout_only=*/true);
  EXPECT_TRUE(Exited(cli.status, 0));
  EXPECT_EQ(cli.output, want.text + "\n");  // kvr client ends the text with a newline
  cli = RunToExit(cli_args);
  EXPECT_TRUE(Exited(cli.status, 1)) << cli.output;
  // Straight to the worker: a kvr-client certificate is the wrong role.
  std::vector<std::string> to_worker = {g_kvr_binary, "client", "--target",
                                        secure.worker->address(), "--max_tokens=4",
                                        "--tls_ca_file=" + pki_.ca_file(),
                                        "--tls_cert_file=" + pki_.client().cert,
                                        "--tls_key_file=" + pki_.client().key};
  cli = RunToExit(to_worker);
  EXPECT_TRUE(Exited(cli.status, 1)) << cli.output;
  EXPECT_TRUE(absl::StrContains(cli.output, "peer kvr-client")) << cli.output;
  // A client certificate without a CA, or an API key no header can carry:
  // bad flags.
  cli = RunToExit({g_kvr_binary, "client", "--target", secure.worker->address(),
                   "--tls_cert_file=" + pki_.client().cert,
                   "--tls_key_file=" + pki_.client().key});
  EXPECT_TRUE(Exited(cli.status, 2)) << cli.output;
  EXPECT_TRUE(absl::StrContains(cli.output, "needs --tls_ca_file")) << cli.output;
  cli = RunToExit({g_kvr_binary, "client", "--target", secure.worker->address(),
                   "--api_key=kvr-abc def"});
  EXPECT_TRUE(Exited(cli.status, 2)) << cli.output;
  EXPECT_TRUE(absl::StrContains(cli.output, "--api_key")) << cli.output;
  EXPECT_FALSE(absl::StrContains(cli.output, "kvr-abc")) << "the key is never echoed";

  // The worker takes calls from kvr-gateway only.
  grpc::Status s = WorkerInfo(secure.worker->address(), As(pki_, pki_.gateway()));
  EXPECT_TRUE(s.ok()) << s.error_message();
  s = WorkerInfo(secure.worker->address(), As(pki_, pki_.node()));
  EXPECT_EQ(s.error_code(), grpc::StatusCode::PERMISSION_DENIED) << s.error_message();
  EXPECT_TRUE(absl::StrContains(s.error_message(), "peer kvr-node")) << s.error_message();
  EXPECT_TRUE(absl::StrContains(s.error_message(), "/kvr.v1.Generation/GetModelInfo"));
  s = WorkerInfo(secure.worker->address(), grpc::InsecureChannelCredentials());
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE) << s.error_message();
  EXPECT_TRUE(secure.Stop());
}

// Node -> node: SyncShards on one node reads its source's ReadShards over
// mTLS with the kvr-node certificate; a source that does not allow kvr-node
// refuses it.
TEST_F(TlsTest, NodeToNodeSyncUsesTheNodeCertificate) {
  std::vector<std::string> args = {"--metrics_listen="};
  for (const std::string& f : pki_.Flags(pki_.node())) args.push_back(f);
  auto source = NodeProcess::Start(args);
  auto dest = NodeProcess::Start(args);
  std::vector<std::string> strict_args = args;
  strict_args.push_back("--tls_allowed_peers=kvr-worker");
  auto strict = NodeProcess::Start(strict_args);
  ASSERT_TRUE(source != nullptr && dest != nullptr && strict != nullptr);
  ASSERT_TRUE(source->listening() && dest->listening() && strict->listening());

  v1::SequenceSpec spec;
  spec.set_sequence_id(0x5eed);
  spec.set_n_layers(1);
  spec.set_n_heads(1);
  spec.set_n_kv_heads(1);
  spec.set_head_dim(8);
  spec.set_value_dtype(v1::DTYPE_F32);
  spec.set_index_type(v1::INDEX_TYPE_FLAT);
  auto sync_from = [&](const std::string& from) {
    auto src = v1::RetrievalNode::NewStub(FreshChannel(from, As(pki_, pki_.worker())));
    grpc::ClientContext c1;
    SetDeadline(&c1);
    v1::CreateSequenceRequest create;
    *create.mutable_spec() = spec;
    v1::CreateSequenceResponse created;
    const grpc::Status made = src->CreateSequence(&c1, create, &created);
    EXPECT_TRUE(made.ok()) << made.error_message();
    auto dst = v1::RetrievalNode::NewStub(FreshChannel(dest->address(), As(pki_, pki_.worker())));
    grpc::ClientContext c2;
    SetDeadline(&c2);
    v1::SyncShardsRequest sync;
    *sync.mutable_spec() = spec;
    sync.set_source_address(from);
    v1::SyncShardsResponse synced;
    return dst->SyncShards(&c2, sync, &synced);
  };
  const grpc::Status ok = sync_from(source->address());
  EXPECT_TRUE(ok.ok()) << ok.error_message();
  const grpc::Status refused = sync_from(strict->address());
  EXPECT_FALSE(refused.ok());
  EXPECT_TRUE(absl::StrContains(refused.error_message(), "peer kvr-node"))
      << refused.error_message();
  EXPECT_TRUE(StopOk(source.get()));
  EXPECT_TRUE(StopOk(dest.get()));
  EXPECT_TRUE(StopOk(strict.get()));
}

// `kvr generate --nodes` under mTLS (a kvr-worker certificate) prints
// exactly what the embedded run prints; without the flags the node refuses
// it.
TEST_F(TlsTest, KvrGenerateReachesMtlsNodes) {
  std::vector<std::string> args = {"--metrics_listen="};
  for (const std::string& f : pki_.Flags(pki_.node())) args.push_back(f);
  auto node = NodeProcess::Start(args);
  ASSERT_NE(node, nullptr);
  ASSERT_TRUE(node->listening());
  const std::vector<std::string> generate = {g_kvr_binary, "generate", "--prompt", kLongPrompt,
                                             "--max_tokens=24", "--temperature=0.7", "--seed=3"};
  const Ran embedded = RunToExit(generate, /*stdout_only=*/true);
  ASSERT_TRUE(Exited(embedded.status, 0));
  std::vector<std::string> remote = generate;
  remote.push_back("--nodes=" + node->address());
  for (const std::string& f : pki_.Flags(pki_.worker())) remote.push_back(f);
  const Ran secured = RunToExit(remote, /*stdout_only=*/true);
  EXPECT_TRUE(Exited(secured.status, 0));
  EXPECT_EQ(secured.output, embedded.output);
  std::vector<std::string> plain = generate;
  plain.push_back("--nodes=" + node->address());
  const Ran refused = RunToExit(plain, /*stdout_only=*/true);
  EXPECT_TRUE(Exited(refused.status, 1));
  EXPECT_TRUE(StopOk(node.get()));
}

// dns:/// member sets dial the records' IPs; their certificates carry the
// name (here DNS:localhost only, no IP SAN), and that name is what the
// worker (--nodes) and the gateway (--workers) check. Dialled by IP the same
// certificate fails the hostname check.
TEST_F(TlsTest, DnsMembersAreCheckedAgainstTheirName) {
  const Identity node_id = pki_.Issue(pki_.ca(), "kvr-node", "dns_node", {});
  const Identity worker_id = pki_.Issue(pki_.ca(), "kvr-worker", "dns_worker", {});
  std::vector<std::string> nargs = {"--metrics_listen="};
  for (const std::string& f : pki_.Flags(node_id)) nargs.push_back(f);
  auto node = NodeProcess::Start(nargs);
  ASSERT_NE(node, nullptr);
  ASSERT_TRUE(node->listening());
  const std::string node_port = node->address().substr(node->address().rfind(':') + 1);

  // By IP: the node's certificate does not name 127.0.0.1, the worker
  // cannot reach it and does not start.
  std::vector<std::string> by_ip = {g_worker_binary, "--listen=127.0.0.1:0", "--metrics_listen=",
                                    "--nodes=" + node->address()};
  for (const std::string& f : pki_.Flags(worker_id)) by_ip.push_back(f);
  const Ran refused = RunToExit(by_ip);
  EXPECT_TRUE(Exited(refused.status, 2)) << refused.output;
  EXPECT_FALSE(absl::StrContains(refused.output, "listening on"));

  std::vector<std::string> wargs = {"--metrics_listen=", "--nodes=dns:///localhost:" + node_port};
  for (const std::string& f : pki_.Flags(worker_id)) wargs.push_back(f);
  auto worker = ServerProcess::Start(g_worker_binary, "kvr_worker", wargs);
  ASSERT_NE(worker, nullptr);
  ASSERT_TRUE(worker->listening());
  const std::string worker_port = worker->address().substr(worker->address().rfind(':') + 1);
  std::vector<std::string> gargs = {"--workers=dns:///localhost:" + worker_port};
  for (const std::string& f : pki_.Flags(pki_.gateway())) gargs.push_back(f);
  auto gateway = GatewayProcess::Start(g_gateway_binary, gargs);
  ASSERT_NE(gateway, nullptr);
  // gateway -> worker -> node, each hop checked against "localhost".
  const Streamed got = Generate(gateway->grpc(), grpc::InsecureChannelCredentials());
  EXPECT_TRUE(got.status.ok()) << got.status.error_message();
  EXPECT_EQ(got.tokens.size(), 40u);
  EXPECT_TRUE(gateway->Stop());
  EXPECT_TRUE(StopOk(worker.get()));
  EXPECT_TRUE(StopOk(node.get()));
}

}  // namespace
}  // namespace kvr::security

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  if (!kvr::test_support::ParseNodeBinaryFlag(argc, argv)) return 2;
  for (int i = 1; i + 1 < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--kvr_worker") kvr::security::g_worker_binary = argv[i + 1];
    if (a == "--kvr_gateway") kvr::security::g_gateway_binary = argv[i + 1];
    if (a == "--kvr_health_probe") kvr::security::g_probe_binary = argv[i + 1];
    if (a == "--kvr") kvr::security::g_kvr_binary = argv[i + 1];
  }
  if (kvr::security::g_kvr_binary.empty() || kvr::security::g_worker_binary.empty() || kvr::security::g_gateway_binary.empty() ||
      kvr::security::g_probe_binary.empty()) {
    std::fprintf(stderr, "usage: %s --kvr_node P --kvr_worker P --kvr_gateway P "
                 "--kvr_health_probe P --kvr P\n", argv[0]);
    return 2;
  }
  return RUN_ALL_TESTS();
}
