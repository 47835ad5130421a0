// `kvr cluster --secure` (tools/cluster_secure.h, tools/cluster.cc) without
// real TLS servers:
//
//  * MakeClusterCredentials: a CA (kvr-ca) and kvr-node / kvr-worker /
//    kvr-gateway / kvr-client certificates that X509_verify_cert accepts for
//    TLS server and client use, with SANs localhost and 127.0.0.1, plus one
//    per worker (CN kvr-worker-<i>, DNS SAN kvr-worker); keys and
//    api_keys.json at mode 0600, tls/ at 0700; the API key has the contract's
//    form and api_keys.json holds SHA-256(salt || key), not the key;
//  * the cluster itself, its three kinds of children replaced by a fake
//    server (tests/integration/fake_kvr_server.sh) that logs its argv:
//    every child gets its role's --tls_cert_file / --tls_key_file (a worker
//    its own kvr-worker-<i> one) and the
//    CA, the gateway --public_tls_* and --api_keys_file, cluster.json (mode
//    0600) names ca_cert, client_cert, client_key and api_key; without a
//    gateway the worker lets kvr-client in; binaries lacking the flags make
//    --secure fail naming the binary and the flag; without --secure nothing
//    of this appears.
//
// Usage: cluster_secure_test --kvr PATH --fake_server PATH
#include <openssl/evp.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include <filesystem>
#include <fstream>
#include <memory>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/subprocess.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "services/gateway/api_keys.h"
#include "services/infra/security/cert_authority.h"
#include "tests/support/cluster_process.h"
#include "tests/support/temp_dir.h"
#include "tests/support/x509_check.h"
#include "tools/cluster.h"
#include "tools/cluster_secure.h"

namespace kvr {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using ::testing::Not;

std::string g_kvr, g_fake_server;

std::string ReadAll(const std::string& path) {
  absl::StatusOr<std::string> text = security::ReadSmallFile(path);
  EXPECT_TRUE(text.ok()) << text.status();
  return text.ok() ? *text : "";
}

unsigned Mode(const std::string& path) {
  struct stat st {};
  EXPECT_EQ(stat(path.c_str(), &st), 0) << path;
  return st.st_mode & 0777;
}

std::string Sha256Hex(const std::string& data) {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int size = 0;
  EXPECT_EQ(EVP_Digest(data.data(), data.size(), digest, &size, EVP_sha256(), nullptr), 1);
  return absl::BytesToHexString(
      absl::string_view(reinterpret_cast<const char*>(digest), size));
}

// A directory of fake kvr_node / kvr_worker / kvr_gateway (copies of the
// fake server: `kvr cluster` resolves links, and the name says the role); `with_tls_flags` false: their --helpfull lists no TLS flag.
std::unique_ptr<test_support::TempDir> FakeBinDir(bool with_tls_flags) {
  auto dir = std::make_unique<test_support::TempDir>("kvr_fake_bin");
  for (const char* name : {"kvr_node", "kvr_worker", "kvr_gateway"}) {
    fs::copy_file(g_fake_server, fs::path(dir->path()) / name);
  }
  if (!with_tls_flags) std::ofstream(fs::path(dir->path()) / "no_tls_flags") << "\n";
  return dir;
}

// The "argv: ..." line a fake child logged.
std::string LoggedArgv(const std::string& log) {
  std::istringstream in(ReadAll(log));
  std::string line;
  while (std::getline(in, line)) {
    if (absl::StartsWith(line, "argv: ")) return line.substr(6);
  }
  ADD_FAILURE() << log << " has no argv line";
  return "";
}

TEST(ClusterCredentialsTest, RoleCertificatesVerifyAndSecretsArePrivate) {
  test_support::TempDir run("kvr_secure_run");
  absl::StatusOr<cluster::ClusterCredentials> creds =
      cluster::MakeClusterCredentials(run.path(), absl::Hours(24), /*workers=*/2);
  ASSERT_TRUE(creds.ok()) << creds.status();
  EXPECT_EQ(Mode(run.path() + "/tls"), 0700u);
  EXPECT_EQ(creds->ca_cert, run.path() + "/tls/ca.crt");
  EXPECT_EQ(Mode(creds->ca_cert), 0644u);
  EXPECT_EQ(Mode(creds->ca_key), 0600u);

  test_support::X509Ptr ca = test_support::ParsePemCert(ReadAll(creds->ca_cert));
  ASSERT_NE(ca, nullptr);
  EXPECT_EQ(test_support::CommonName(X509_get_subject_name(ca.get())), "kvr-ca");
  const std::pair<const char*, const cluster::RoleFiles*> roles[] = {
      {"kvr-node", &creds->node},
      {"kvr-worker", &creds->worker},
      {"kvr-gateway", &creds->gateway},
      {"kvr-client", &creds->client}};
  for (const auto& [cn, files] : roles) {
    SCOPED_TRACE(cn);
    EXPECT_EQ(files->cert, run.path() + "/tls/" + cn + ".crt");
    EXPECT_EQ(files->key, run.path() + "/tls/" + cn + ".key");
    EXPECT_EQ(Mode(files->cert), 0644u);
    EXPECT_EQ(Mode(files->key), 0600u);
    test_support::X509Ptr leaf = test_support::ParsePemCert(ReadAll(files->cert));
    ASSERT_NE(leaf, nullptr);
    EXPECT_EQ(test_support::CommonName(X509_get_subject_name(leaf.get())), cn);
    EXPECT_EQ(test_support::VerifyWithCa(leaf.get(), ca.get(), X509_PURPOSE_SSL_SERVER),
              X509_V_OK);
    EXPECT_EQ(test_support::VerifyWithCa(leaf.get(), ca.get(), X509_PURPOSE_SSL_CLIENT),
              X509_V_OK);
    EXPECT_EQ(X509_check_host(leaf.get(), "localhost", 0, 0, nullptr), 1);
    EXPECT_EQ(X509_check_ip_asc(leaf.get(), "127.0.0.1", 0), 1);
  }
  // One certificate per worker: its own CN (the nodes' tenant principal)
  // and the role as a DNS SAN (what the nodes' --tls_allowed_peers admit).
  ASSERT_EQ(creds->workers.size(), 2u);
  for (int i = 0; i < 2; ++i) {
    const std::string cn = absl::StrCat("kvr-worker-", i);
    SCOPED_TRACE(cn);
    const cluster::RoleFiles& files = creds->workers[static_cast<size_t>(i)];
    EXPECT_EQ(files.cert, run.path() + "/tls/" + cn + ".crt");
    EXPECT_EQ(Mode(files.key), 0600u);
    test_support::X509Ptr leaf = test_support::ParsePemCert(ReadAll(files.cert));
    ASSERT_NE(leaf, nullptr);
    EXPECT_EQ(test_support::CommonName(X509_get_subject_name(leaf.get())), cn);
    EXPECT_EQ(test_support::VerifyWithCa(leaf.get(), ca.get(), X509_PURPOSE_SSL_CLIENT),
              X509_V_OK);
    EXPECT_EQ(X509_check_host(leaf.get(), "kvr-worker", 0, 0, nullptr), 1);
    EXPECT_EQ(X509_check_host(leaf.get(), "localhost", 0, 0, nullptr), 1);
  }
  EXPECT_EQ(cluster::MakeClusterCredentials(run.path(), absl::Hours(24), -1).status().code(),
            absl::StatusCode::kInvalidArgument);

  // The API key: kvr- + 43 base64url characters; the file has its salted
  // hash only.
  EXPECT_TRUE(std::regex_match(creds->api_key, std::regex("kvr-[A-Za-z0-9_-]{43}")))
      << creds->api_key;
  EXPECT_EQ(creds->api_keys_file, run.path() + "/api_keys.json");
  EXPECT_EQ(Mode(creds->api_keys_file), 0600u);
  const std::string keys_text = ReadAll(creds->api_keys_file);
  EXPECT_THAT(keys_text, Not(HasSubstr(creds->api_key)));
  const nlohmann::json keys = nlohmann::json::parse(keys_text);
  ASSERT_EQ(keys["keys"].size(), 1u);
  const nlohmann::json& entry = keys["keys"][0];
  EXPECT_EQ(entry["id"], cluster::kClusterApiKeyId);
  EXPECT_EQ(entry["max_concurrent"], 0);
  EXPECT_EQ(entry["tokens_per_minute"], 0);
  const std::string salt_hex = entry["salt"];
  ASSERT_EQ(salt_hex.size(), 32u);  // 16 bytes
  EXPECT_EQ(entry["sha256"], Sha256Hex(absl::HexStringToBytes(salt_hex) + creds->api_key));
  // The gateway's own parser takes the file, and the key finds its entry.
  EXPECT_TRUE(gateway::IsApiKeyFormat(creds->api_key));
  absl::StatusOr<std::vector<gateway::ApiKeyEntry>> parsed = gateway::ParseApiKeys(keys_text);
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  ASSERT_EQ(parsed->size(), 1u);
  EXPECT_EQ((*parsed)[0].salt, gateway::ApiKeySalt(creds->api_key));

  // A second cluster in the same run dir: new CA, new key (files replaced).
  absl::StatusOr<cluster::ClusterCredentials> again =
      cluster::MakeClusterCredentials(run.path());
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_NE(again->api_key, creds->api_key);
  test_support::X509Ptr new_ca = test_support::ParsePemCert(ReadAll(again->ca_cert));
  test_support::X509Ptr new_node = test_support::ParsePemCert(ReadAll(again->node.cert));
  EXPECT_EQ(test_support::VerifyWithCa(new_node.get(), new_ca.get(), X509_PURPOSE_SSL_SERVER),
            X509_V_OK);
  EXPECT_NE(test_support::VerifyWithCa(new_node.get(), ca.get(), X509_PURPOSE_SSL_SERVER),
            X509_V_OK);
}

TEST(ClusterSecureTest, EveryChildGetsItsRoleCredentialsAndClusterJsonNamesTheClients) {
  auto bin = FakeBinDir(/*with_tls_flags=*/true);
  auto c = test_support::ClusterProcess::Start(
      g_kvr, {"--secure", "--nodes", "2", "--bin_dir", bin->path()}, /*merge_stderr=*/true,
      absl::Seconds(30));
  ASSERT_NE(c, nullptr);
  const std::string tls = c->run_dir + "/tls/";
  const cluster::ClusterInfo& info = c->info;
  EXPECT_EQ(info.ca_cert, tls + "ca.crt");
  EXPECT_EQ(info.client_cert, tls + "kvr-client.crt");
  EXPECT_EQ(info.client_key, tls + "kvr-client.key");
  EXPECT_TRUE(std::regex_match(info.api_key, std::regex("kvr-[A-Za-z0-9_-]{43}")));
  EXPECT_EQ(Mode(c->run_dir + "/cluster.json"), 0600u);  // it holds the key
  // The key in cluster.json is the one api_keys.json hashes.
  const nlohmann::json keys = nlohmann::json::parse(ReadAll(c->run_dir + "/api_keys.json"));
  const std::string salt = absl::HexStringToBytes(keys["keys"][0]["salt"].get<std::string>());
  EXPECT_EQ(keys["keys"][0]["sha256"], Sha256Hex(salt + info.api_key));

  auto ca_flag = " --tls_ca_file=" + tls + "ca.crt";
  for (const char* node : {"node-0", "node-1"}) {
    const std::string argv = LoggedArgv(c->run_dir + "/" + node + ".log");
    EXPECT_THAT(argv, HasSubstr("--tls_cert_file=" + tls + "kvr-node.crt --tls_key_file=" + tls +
                                "kvr-node.key" + ca_flag));
  }
  const std::string worker = LoggedArgv(c->run_dir + "/worker.log");
  // Its own certificate (CN kvr-worker-0), not the shared kvr-worker one.
  EXPECT_THAT(worker, HasSubstr("--tls_cert_file=" + tls + "kvr-worker-0.crt --tls_key_file=" +
                                tls + "kvr-worker-0.key" + ca_flag));
  EXPECT_THAT(worker, Not(HasSubstr("--tls_allowed_peers")));  // its default: kvr-gateway
  const std::string gateway = LoggedArgv(c->run_dir + "/gateway.log");
  EXPECT_THAT(gateway, HasSubstr("--tls_cert_file=" + tls + "kvr-gateway.crt --tls_key_file=" +
                                 tls + "kvr-gateway.key" + ca_flag));
  EXPECT_THAT(gateway, HasSubstr("--public_tls_cert_file=" + tls + "kvr-gateway.crt"));
  EXPECT_THAT(gateway, HasSubstr("--public_tls_key_file=" + tls + "kvr-gateway.key"));
  EXPECT_THAT(gateway, HasSubstr("--api_keys_file=" + c->run_dir + "/api_keys.json"));
  const std::optional<int> status = c->Stop(SIGTERM, absl::Seconds(30));
  ASSERT_TRUE(status.has_value());
  EXPECT_TRUE(WIFEXITED(*status) && WEXITSTATUS(*status) == 0) << c->proc->Output();
}

TEST(ClusterSecureTest, WithoutAGatewayTheWorkerLetsTheClientIn) {
  auto bin = FakeBinDir(/*with_tls_flags=*/true);
  auto c = test_support::ClusterProcess::Start(
      g_kvr, {"--secure", "--nodes", "1", "--gateway=false", "--bin_dir", bin->path()},
      /*merge_stderr=*/true, absl::Seconds(30));
  ASSERT_NE(c, nullptr);
  EXPECT_THAT(LoggedArgv(c->run_dir + "/worker.log"),
              HasSubstr("--tls_allowed_peers=kvr-gateway,kvr-client"));
  EXPECT_FALSE(c->info.api_key.empty());
}

TEST(ClusterSecureTest, InsecureClusterHasNoCredentials) {
  auto bin = FakeBinDir(/*with_tls_flags=*/true);
  auto c = test_support::ClusterProcess::Start(g_kvr, {"--nodes", "1", "--bin_dir", bin->path()},
                                               /*merge_stderr=*/true, absl::Seconds(30));
  ASSERT_NE(c, nullptr);
  EXPECT_TRUE(c->info.ca_cert.empty() && c->info.api_key.empty());
  EXPECT_THAT(ReadAll(c->run_dir + "/cluster.json"), Not(HasSubstr("api_key")));
  EXPECT_FALSE(fs::exists(c->run_dir + "/tls"));
  EXPECT_THAT(LoggedArgv(c->run_dir + "/gateway.log"), Not(HasSubstr("--tls_")));
  EXPECT_THAT(LoggedArgv(c->run_dir + "/node-0.log"), Not(HasSubstr("--tls_")));
}

TEST(ClusterSecureTest, BinariesWithoutTheTlsFlagsAreRefusedByName) {
  auto bin = FakeBinDir(/*with_tls_flags=*/false);
  test_support::TempDir run("kvr_secure_run");
  auto proc = Subprocess::Start({g_kvr, "cluster", "--secure", "--run_dir", run.path(),
                                 "--bin_dir", bin->path()},
                                /*merge_stderr=*/true);
  ASSERT_TRUE(proc.ok()) << proc.status();
  // No line starts with "\x01": reads everything until the program exits.
  EXPECT_TRUE(absl::IsFailedPrecondition((*proc)->WaitForLine("\x01", absl::Seconds(30)).status()));
  absl::StatusOr<int> status = (*proc)->Stop(0, absl::Seconds(30));
  ASSERT_TRUE(status.ok()) << status.status();
  EXPECT_TRUE(WIFEXITED(*status) && WEXITSTATUS(*status) == 1) << (*proc)->Output();
  EXPECT_THAT((*proc)->Output(), HasSubstr("kvr_node has no --tls_cert_file flag"));
  EXPECT_FALSE(fs::exists(run.path() + "/cluster.json"));
  EXPECT_FALSE(fs::exists(run.path() + "/tls"));  // checked before anything is made
}

}  // namespace
}  // namespace kvr

int main(int argc, char** argv) {
  testing::InitGoogleTest(&argc, argv);
  for (int i = 1; i + 1 < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--kvr") kvr::g_kvr = argv[++i];
    if (a == "--fake_server") kvr::g_fake_server = argv[++i];
  }
  if (kvr::g_kvr.empty() || kvr::g_fake_server.empty()) {
    std::fprintf(stderr, "usage: %s --kvr PATH --fake_server PATH [gtest flags]\n", argv[0]);
    return 2;
  }
  return RUN_ALL_TESTS();
}
