// `kvr cluster --secure` end to end, with real servers (issue 16 item 5):
//
//  * greedy generations through the secure gateway (public TLS, API key;
//    mTLS gateway -> worker -> nodes, the prompt long enough that shards go
//    to the nodes) equal the insecure cluster's token for token, both
//    through security::MakeClientChannelCredentials and through the `kvr client`
//    binary given cluster.json's ca_cert and api_key;
//  * `kvr client` without the CA (plaintext) fails UNAVAILABLE, with a CA of
//    another authority UNAVAILABLE, without the key UNAUTHENTICATED, with a
//    wrong key UNAUTHENTICATED; the worker called directly with the client
//    certificate answers PERMISSION_DENIED (only kvr-gateway may call it);
//    bad client flags exit 2 naming the flag;
//  * `kvr generate --nodes` with the kvr-worker certificate writes the
//    insecure cluster's text; with the kvr-client one the nodes answer
//    PERMISSION_DENIED; an incomplete set of --tls_* flags is exit 2;
//  * a node killed with SIGKILL comes back with its mTLS flags: the output
//    after its restart is still the insecure cluster's;
//  * kvr_loadgen --start_cluster --secure runs its requests with no error.
//
// Usage: cluster_secure_e2e_test --kvr PATH --kvr_loadgen PATH
#include <signal.h>
#include <sys/wait.h>

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "common/subprocess.h"
#include "gmock/gmock.h"
#include "grpcpp/client_context.h"
#include "grpcpp/create_channel.h"
#include "gtest/gtest.h"
#include "kvr/v1/generation.grpc.pb.h"
#include "nlohmann/json.hpp"
#include "services/infra/security/cert_authority.h"
#include "services/infra/security/tls_credentials.h"
#include "tests/support/cluster_process.h"
#include "tests/support/generate_stream.h"
#include "tests/support/temp_dir.h"

namespace kvr {
namespace {

using ::testing::HasSubstr;
using test_support::ClusterProcess;

std::string g_kvr, g_loadgen;

// Longer than sinks + window (20 tokens): prefill offloads shards to nodes.
constexpr char kPrompt[] =
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the sun "
    "with her big red ball and her dog.";
constexpr int kMaxTokens = 40;

using Generated = test_support::GenerateStream;

// What a client presents: TLS files (all empty: plaintext) and an API key.
struct ClientSecurity {
  std::string ca_file, cert_file, key_file, api_key;
};

// One greedy Generate of kPrompt on `target` with `client`.
Generated Generate(const std::string& target, const ClientSecurity& client) {
  absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> creds =
      security::MakeClientChannelCredentials(client.ca_file, client.cert_file,
                                             client.key_file);
  EXPECT_TRUE(creds.ok()) << creds.status();
  if (!creds.ok()) {
    Generated failed;
    failed.status = grpc::Status(grpc::StatusCode::INTERNAL, "no credentials");
    return failed;
  }
  auto stub = v1::Generation::NewStub(grpc::CreateChannel(target, *creds));
  v1::GenerateRequest req;
  req.set_text(kPrompt);
  req.set_max_tokens(kMaxTokens);
  req.mutable_sampling()->set_temperature(0.0f);
  std::vector<std::pair<std::string, std::string>> metadata;
  if (!client.api_key.empty()) metadata.emplace_back("authorization", "Bearer " + client.api_key);
  return test_support::ReadGenerate(stub.get(), req, std::chrono::seconds(30), metadata);
}

// Generate until it succeeds or 30 s pass (the gateway may still be
// connecting to its worker); the last attempt.
Generated GenerateOnceReady(const std::string& target, const ClientSecurity& client) {
  const absl::Time deadline = absl::Now() + absl::Seconds(30);
  Generated g;
  do {
    g = Generate(target, client);
    if (g.status.ok()) return g;
    absl::SleepFor(absl::Milliseconds(200));
  } while (absl::Now() < deadline);
  return g;
}

struct ProgramRun {
  int exit_code = -1;
  std::string text;  // stdout and stderr lines that do not start with `tag`
  std::string tagged;  // the lines that do (`kvr client: ...`)
};

// Runs `argv` to its end (at most 60 s), stdout and stderr merged.
ProgramRun RunProgram(const std::vector<std::string>& argv, const std::string& tag) {
  ProgramRun run;
  auto proc = Subprocess::Start(argv, /*merge_stderr=*/true);
  EXPECT_TRUE(proc.ok()) << proc.status();
  if (!proc.ok()) return run;
  // No line starts with "\x01": reads until the program closes its output.
  (void)(*proc)->WaitForLine("\x01", absl::Seconds(60));
  absl::StatusOr<int> status = (*proc)->Stop(0, absl::Seconds(10));
  if (!status.ok()) (void)(*proc)->Stop(SIGKILL, absl::Seconds(10));
  if (status.ok() && WIFEXITED(*status)) run.exit_code = WEXITSTATUS(*status);
  for (absl::string_view line : absl::StrSplit((*proc)->Output(), '\n')) {
    absl::StrAppend(absl::StartsWith(line, tag) ? &run.tagged : &run.text, line, "\n");
  }
  return run;
}

// `kvr generate --nodes` (the embedded worker on the cluster's nodes) of
// kPrompt, greedy.
ProgramRun RunGenerateOnNodes(const cluster::ClusterInfo& info,
                              const std::vector<std::string>& flags) {
  std::vector<std::string> nodes;
  for (const cluster::ClusterInfo::Process& n : info.nodes) nodes.push_back(n.grpc);
  std::vector<std::string> argv = {g_kvr, "generate", "--nodes", absl::StrJoin(nodes, ","),
                                   "--prompt", kPrompt, "--max_tokens",
                                   std::to_string(kMaxTokens), "--temperature", "0"};
  argv.insert(argv.end(), flags.begin(), flags.end());
  return RunProgram(argv, "kvr");
}

ProgramRun RunClient(const std::string& target, const std::vector<std::string>& flags) {
  std::vector<std::string> argv = {g_kvr,        "client",       "--target",
                                   target,       "--prompt",     kPrompt,
                                   "--max_tokens", std::to_string(kMaxTokens), "--temperature",
                                   "0",          "--deadline_seconds", "20"};
  argv.insert(argv.end(), flags.begin(), flags.end());
  return RunProgram(argv, "kvr client: ");
}

TEST(ClusterSecureE2eTest, SecureClusterGeneratesTheInsecureTokensAndRefusesTheRest) {
  // The reference: an insecure cluster.
  Generated plain_tokens;
  ProgramRun plain_client, plain_generate;
  {
    auto plain = ClusterProcess::Start(g_kvr, {"--nodes", "2"}, /*merge_stderr=*/true);
    ASSERT_NE(plain, nullptr);
    plain_tokens = GenerateOnceReady(plain->target(), {});
    ASSERT_TRUE(plain_tokens.status.ok()) << plain_tokens.status.error_message();
    plain_client = RunClient(plain->target(), {});
    ASSERT_EQ(plain_client.exit_code, 0) << plain_client.text << plain_client.tagged;
    plain_generate = RunGenerateOnNodes(plain->info, {});
    ASSERT_EQ(plain_generate.exit_code, 0) << plain_generate.text << plain_generate.tagged;
    EXPECT_TRUE(plain->Stop().has_value());
  }
  ASSERT_EQ(plain_tokens.tokens.size(), static_cast<size_t>(kMaxTokens));

  auto c = ClusterProcess::Start(g_kvr, {"--nodes", "2", "--secure"}, /*merge_stderr=*/true);
  ASSERT_NE(c, nullptr);
  const cluster::ClusterInfo& info = c->info;
  ASSERT_FALSE(info.ca_cert.empty());
  ASSERT_FALSE(info.api_key.empty());
  const ClientSecurity secure{info.ca_cert, "", "", info.api_key};

  // Same tokens, over the library and over `kvr client`.
  const Generated secure_tokens = GenerateOnceReady(c->target(), secure);
  ASSERT_TRUE(secure_tokens.status.ok()) << secure_tokens.status.error_message();
  EXPECT_EQ(secure_tokens.tokens, plain_tokens.tokens);
  const ProgramRun secure_client =
      RunClient(c->target(), {"--tls_ca_file", info.ca_cert, "--api_key", info.api_key});
  EXPECT_EQ(secure_client.exit_code, 0) << secure_client.tagged;
  EXPECT_EQ(secure_client.text, plain_client.text);
  EXPECT_THAT(secure_client.tagged, HasSubstr(absl::StrCat(kMaxTokens, " tokens in")));
  // The same through the name "localhost" (the certificate's DNS SAN).
  const std::string port = c->target().substr(c->target().rfind(':') + 1);
  const Generated by_name = Generate("localhost:" + port, secure);
  EXPECT_TRUE(by_name.status.ok()) << by_name.status.error_message();
  EXPECT_EQ(by_name.tokens, plain_tokens.tokens);

  // Plaintext to the TLS port: the handshake fails.
  ProgramRun run = RunClient(c->target(), {"--api_key", info.api_key});
  EXPECT_EQ(run.exit_code, 1);
  EXPECT_THAT(run.tagged, HasSubstr("UNAVAILABLE"));
  // A CA of another authority: the gateway's certificate does not verify.
  test_support::TempDir other("kvr_other_ca");
  absl::StatusOr<security::CertAndKey> other_ca = security::MakeCa("kvr-ca");
  ASSERT_TRUE(other_ca.ok());
  ASSERT_TRUE(security::WriteCertAndKey(*other_ca, other.path() + "/ca.crt",
                                        other.path() + "/ca.key")
                  .ok());
  run = RunClient(c->target(),
                  {"--tls_ca_file", other.path() + "/ca.crt", "--api_key", info.api_key});
  EXPECT_EQ(run.exit_code, 1);
  EXPECT_THAT(run.tagged, HasSubstr("UNAVAILABLE"));
  // TLS but no key, or a wrong one.
  run = RunClient(c->target(), {"--tls_ca_file", info.ca_cert});
  EXPECT_EQ(run.exit_code, 1);
  EXPECT_THAT(run.tagged, HasSubstr("UNAUTHENTICATED"));
  std::string wrong = info.api_key;
  wrong.back() = wrong.back() == 'A' ? 'B' : 'A';
  run = RunClient(c->target(), {"--tls_ca_file", info.ca_cert, "--api_key", wrong});
  EXPECT_EQ(run.exit_code, 1);
  EXPECT_THAT(run.tagged, HasSubstr("UNAUTHENTICATED"));
  // The worker directly, with the client certificate: mTLS passes, the role
  // does not (only kvr-gateway may call a worker).
  run = RunClient(info.worker_grpc, {"--tls_ca_file", info.ca_cert, "--tls_cert_file",
                                     info.client_cert, "--tls_key_file", info.client_key});
  EXPECT_EQ(run.exit_code, 1);
  EXPECT_THAT(run.tagged, HasSubstr("PERMISSION_DENIED"));
  EXPECT_THAT(run.tagged, HasSubstr("kvr-client"));
  // `kvr generate --nodes` as a worker: the kvr-worker certificate gives the
  // insecure cluster's text; the client's is refused by the nodes.
  const std::string tls = c->run_dir + "/tls/";
  const ProgramRun generate = RunGenerateOnNodes(
      info, {"--tls_cert_file", tls + "kvr-worker.crt", "--tls_key_file", tls + "kvr-worker.key",
             "--tls_ca_file", info.ca_cert});
  EXPECT_EQ(generate.exit_code, 0) << generate.tagged;
  EXPECT_EQ(generate.text, plain_generate.text);
  run = RunGenerateOnNodes(info, {"--tls_cert_file", info.client_cert, "--tls_key_file",
                                  info.client_key, "--tls_ca_file", info.ca_cert});
  EXPECT_EQ(run.exit_code, 1);
  EXPECT_THAT(run.tagged, HasSubstr("PERMISSION_DENIED"));
  EXPECT_THAT(run.tagged, HasSubstr("kvr-client"));  // the refusal names the peer
  run = RunGenerateOnNodes(info, {"--tls_ca_file", info.ca_cert});
  EXPECT_EQ(run.exit_code, 2);
  EXPECT_THAT(run.tagged, HasSubstr("missing --tls_cert_file, --tls_key_file"));  // names both

  // Bad flags: exit 2 naming them.
  run = RunClient(c->target(), {"--tls_cert_file", info.client_cert, "--tls_ca_file",
                                info.ca_cert});
  EXPECT_EQ(run.exit_code, 2);
  EXPECT_THAT(run.tagged + run.text, HasSubstr("missing --tls_key_file"));
  run = RunClient(c->target(), {"--tls_cert_file", info.client_cert, "--tls_key_file",
                                info.client_key});
  EXPECT_EQ(run.exit_code, 2);
  EXPECT_THAT(run.tagged + run.text, HasSubstr("needs --tls_ca_file"));
  run = RunClient(c->target(), {"--tls_ca_file", c->run_dir + "/missing.crt"});
  EXPECT_EQ(run.exit_code, 2);
  EXPECT_THAT(run.tagged, HasSubstr("--tls_ca_file"));
  EXPECT_THAT(run.tagged, HasSubstr(c->run_dir + "/missing.crt"));
  run = RunClient(c->target(), {"--tls_ca_file", info.ca_cert, "--api_key", "two words"});
  EXPECT_EQ(run.exit_code, 2);
  EXPECT_THAT(run.tagged + run.text, HasSubstr("--api_key"));
  EXPECT_THAT(run.tagged + run.text, HasSubstr("visible ASCII"));

  // A node killed is restarted with its mTLS flags (same command line): the
  // worker reconnects over mTLS and the output is still the same.
  const pid_t killed = info.nodes[0].pid;
  ASSERT_EQ(kill(killed, SIGKILL), 0);
  ASSERT_TRUE(c->WaitForInfo(
      [](const cluster::ClusterInfo& i) { return i.nodes[0].restarts == 1; }, absl::Seconds(30)))
      << "node-0 was not restarted";
  EXPECT_NE(c->info.nodes[0].pid, killed);
  const Generated after_restart = GenerateOnceReady(c->target(), secure);
  ASSERT_TRUE(after_restart.status.ok()) << after_restart.status.error_message();
  EXPECT_EQ(after_restart.tokens, plain_tokens.tokens);

  const std::optional<int> stopped = c->Stop();
  ASSERT_TRUE(stopped.has_value());
  EXPECT_TRUE(WIFEXITED(*stopped) && WEXITSTATUS(*stopped) == 0);
}

TEST(ClusterSecureE2eTest, LoadgenStartsASecureClusterAndUsesItsCredentials) {
  test_support::TempDir run_dir("kvr_loadgen_secure");
  const ProgramRun run =
      RunProgram({g_loadgen, "--start_cluster", "--secure", "--kvr", g_kvr, "--cluster_args",
           "--nodes 1 --run_dir " + run_dir.path(), "--concurrency", "2", "--requests", "4",
           "--max_tokens", "8", "--warmup_requests", "1", "--json"},
          "kvr");  // kvr_loadgen's and kvr cluster's lines: the rest is the JSON
  ASSERT_EQ(run.exit_code, 0) << run.text << run.tagged;
  const nlohmann::json j = nlohmann::json::parse(run.text, nullptr, false);
  ASSERT_FALSE(j.is_discarded()) << run.text;
  ASSERT_EQ(j["levels"].size(), 1u);
  EXPECT_EQ(j["levels"][0]["succeeded"], 4);
  EXPECT_TRUE(j["levels"][0]["errors_by_code"].empty()) << j.dump();
  // It was a secure cluster: its gateway port speaks TLS only.
  const auto info = cluster::ReadClusterInfo(run_dir.path() + "/cluster.json");
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_FALSE(info->api_key.empty());
}

}  // namespace
}  // namespace kvr

int main(int argc, char** argv) {
  testing::InitGoogleTest(&argc, argv);
  for (int i = 1; i + 1 < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--kvr") kvr::g_kvr = argv[++i];
    if (a == "--kvr_loadgen") kvr::g_loadgen = argv[++i];
  }
  if (kvr::g_kvr.empty() || kvr::g_loadgen.empty()) {
    std::fprintf(stderr, "usage: %s --kvr PATH --kvr_loadgen PATH [gtest flags]\n", argv[0]);
    return 2;
  }
  return RUN_ALL_TESTS();
}
