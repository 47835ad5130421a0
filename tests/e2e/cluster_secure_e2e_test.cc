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
//  * kvr_loadgen --start_cluster --secure runs its requests with no error;
//  * over `kvr cluster --secure --workers 2` (each worker its own
//    certificate, CN kvr-worker-<i>): plaintext gRPC to every node, worker
//    and the gateway is refused (UNAVAILABLE); the kvr-gateway and
//    kvr-client certificates at a node are PERMISSION_DENIED naming the
//    peer; HTTP /v1/completions without a key or with a wrong one is 401 in
//    OpenAI's shape, with the key 200; while a generation runs, a second
//    worker identity (CN kvr-worker-x, SAN kvr-worker, issued here from the
//    run dir's CA) sees none of the cluster's sequences in ListShards(all)
//    (the cluster's worker identity does), and with a sequence id it learned
//    it cannot Attend / Append / Drop / ListShards it (PERMISSION_DENIED);
//    random ids give NOT_FOUND (or PERMISSION_DENIED) only; every
//    generation meanwhile equals the insecure cluster's token for token.
// Leases and certificate rotation: tests/integration/tenant_test.cc
// (AnUnrenewedLeaseExpiresAndARenewedOneSurvives) and tls_test.cc
// (RotatedCertificateIsServedWithoutRestart).
//
// Usage: cluster_secure_e2e_test --kvr PATH --kvr_loadgen PATH
#include <signal.h>
#include <sys/wait.h>

#include <httplib.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
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
#include "kvr/v1/retrieval.grpc.pb.h"
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

// One greedy Generate of kPrompt (`max_tokens` tokens) on `target` with
// `client`.
Generated Generate(const std::string& target, const ClientSecurity& client,
                   int max_tokens = kMaxTokens) {
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
  req.set_max_tokens(max_tokens);
  req.mutable_sampling()->set_temperature(0.0f);
  std::vector<std::pair<std::string, std::string>> metadata;
  if (!client.api_key.empty()) metadata.emplace_back("authorization", "Bearer " + client.api_key);
  return test_support::ReadGenerate(stub.get(), req, std::chrono::seconds(30), metadata);
}

// Generate until it succeeds or 30 s pass (the gateway may still be
// connecting to its worker); the last attempt.
Generated GenerateOnceReady(const std::string& target, const ClientSecurity& client,
                            int max_tokens = kMaxTokens) {
  const absl::Time deadline = absl::Now() + absl::Seconds(30);
  Generated g;
  do {
    g = Generate(target, client, max_tokens);
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

// A RetrievalNode stub on `node` presenting `cert`/`key` (verified against
// `ca`); all three empty: plaintext.
std::unique_ptr<v1::RetrievalNode::Stub> NodeStub(const std::string& node, const std::string& ca,
                                                  const std::string& cert,
                                                  const std::string& key) {
  absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> creds =
      security::MakeClientChannelCredentials(ca, cert, key);
  EXPECT_TRUE(creds.ok()) << creds.status();
  if (!creds.ok()) return nullptr;
  return v1::RetrievalNode::NewStub(grpc::CreateChannel(node, *creds));
}

// A deadline of `seconds` on a fresh context.
std::unique_ptr<grpc::ClientContext> Deadline(int seconds = 5) {
  auto ctx = std::make_unique<grpc::ClientContext>();
  ctx->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(seconds));
  return ctx;
}

// ListShards on `stub`: every shard of the caller's sequences (no `id`), or
// of sequence `id` presenting `capability`.
grpc::Status ListShards(v1::RetrievalNode::Stub* stub, std::optional<uint64_t> id,
                        const std::string& capability, v1::ListShardsResponse* out) {
  v1::ListShardsRequest req;
  if (id.has_value()) req.set_sequence_id(*id);
  req.set_capability(capability);
  return stub->ListShards(Deadline().get(), req, out);
}

// The sequence ids in a ListShards reply.
std::set<uint64_t> SequenceIds(const v1::ListShardsResponse& r) {
  std::set<uint64_t> ids;
  for (const v1::ShardInfo& s : r.shards()) ids.insert(s.key().sequence_id());
  return ids;
}

// Attend, Append, DropSequence and ListShards(id) on sequence `id` of
// `stub`'s node presenting `capability`: the four statuses, in that order.
// The requests are well formed (one f32 query / key row), so a refusal is
// the node's access check, not validation.
std::vector<grpc::Status> TouchSequence(v1::RetrievalNode::Stub* stub, uint64_t id,
                                        const std::string& capability) {
  std::vector<grpc::Status> out;
  const std::string one_float(sizeof(float), '\0');
  auto matrix = [&](v1::Matrix* m) {
    m->set_dtype(v1::DTYPE_F32);
    m->set_rows(1);
    m->set_cols(1);
    m->set_data(one_float);
  };
  v1::AttendRequest attend;
  attend.set_sequence_id(id);
  attend.set_layer(0);
  matrix(attend.mutable_queries());
  attend.set_k(1);
  attend.set_capability(capability);
  v1::AttendResponse attend_reply;
  out.push_back(stub->Attend(Deadline().get(), attend, &attend_reply));
  v1::AppendRequest append;
  append.set_sequence_id(id);
  append.set_first_position(1 << 20);
  matrix(append.mutable_keys());
  matrix(append.mutable_values());
  append.set_capability(capability);
  v1::AppendResponse append_reply;
  out.push_back(stub->Append(Deadline().get(), append, &append_reply));
  v1::DropSequenceRequest drop;
  drop.set_sequence_id(id);
  drop.set_capability(capability);
  v1::DropSequenceResponse drop_reply;
  out.push_back(stub->DropSequence(Deadline().get(), drop, &drop_reply));
  v1::ListShardsResponse list;
  out.push_back(ListShards(stub, id, capability, &list));
  return out;
}

// POST /v1/completions (greedy, 4 tokens) on the gateway's HTTP address with
// `authorization` (none when empty).
httplib::Result PostCompletion(const std::string& http, const std::string& authorization) {
  httplib::Client client("http://" + http);
  client.set_connection_timeout(5);
  client.set_read_timeout(30);
  httplib::Headers headers;
  if (!authorization.empty()) headers.emplace("Authorization", authorization);
  // The cluster's bundled model (kvr cluster's default --model).
  const nlohmann::json body = {{"model", "stories260K"}, {"prompt", "Once upon a time"},
                               {"max_tokens", 4}, {"temperature", 0}};
  return client.Post("/v1/completions", headers, body.dump(), "application/json");
}

TEST(ClusterSecureE2eTest, TwoWorkersAreTenantsAndEveryServerRefusesStrangers) {
  // Long enough that the sequence lives on the nodes while the test probes.
  constexpr int kLongTokens = 200;
  Generated plain_tokens;
  {
    auto plain = ClusterProcess::Start(g_kvr, {"--nodes", "2", "--workers", "2"},
                                       /*merge_stderr=*/true);
    ASSERT_NE(plain, nullptr);
    plain_tokens = GenerateOnceReady(plain->target(), {}, kLongTokens);
    ASSERT_TRUE(plain_tokens.status.ok()) << plain_tokens.status.error_message();
    EXPECT_TRUE(plain->Stop().has_value());
  }
  ASSERT_EQ(plain_tokens.tokens.size(), static_cast<size_t>(kLongTokens));

  auto c = ClusterProcess::Start(g_kvr, {"--nodes", "2", "--workers", "2", "--secure"},
                                 /*merge_stderr=*/true);
  ASSERT_NE(c, nullptr);
  const cluster::ClusterInfo& info = c->info;
  ASSERT_EQ(info.nodes.size(), 2u);
  ASSERT_EQ(info.workers.size(), 2u);
  const std::string tls = c->run_dir + "/tls/";
  const ClientSecurity secure{info.ca_cert, "", "", info.api_key};
  ASSERT_TRUE(GenerateOnceReady(c->target(), secure).status.ok());

  // Plaintext to every gRPC server: the TLS handshake fails.
  for (const cluster::ClusterInfo::Process& n : info.nodes) {
    SCOPED_TRACE("plaintext to node " + n.grpc);
    auto stub = NodeStub(n.grpc, "", "", "");
    ASSERT_NE(stub, nullptr);
    v1::StatsResponse stats;
    EXPECT_EQ(stub->Stats(Deadline().get(), v1::StatsRequest(), &stats).error_code(),
              grpc::StatusCode::UNAVAILABLE);
  }
  std::vector<std::string> generation_servers = {info.gateway_grpc};
  for (const cluster::ClusterInfo::Process& w : info.workers) generation_servers.push_back(w.grpc);
  for (const std::string& target : generation_servers) {
    SCOPED_TRACE("plaintext to " + target);
    EXPECT_EQ(Generate(target, {"", "", "", info.api_key}).status.error_code(),
              grpc::StatusCode::UNAVAILABLE);
  }

  // A CA-signed certificate of the wrong role at a node: refused, naming it.
  for (const char* role : {"kvr-gateway", "kvr-client"}) {
    SCOPED_TRACE(role);
    auto stub = NodeStub(info.nodes[0].grpc, info.ca_cert, tls + role + ".crt",
                         tls + role + ".key");
    ASSERT_NE(stub, nullptr);
    v1::ListShardsResponse list;
    const grpc::Status st = ListShards(stub.get(), std::nullopt, "", &list);
    EXPECT_EQ(st.error_code(), grpc::StatusCode::PERMISSION_DENIED) << st.error_message();
    EXPECT_THAT(st.error_message(), HasSubstr(absl::StrCat("peer ", role)));
  }

  // HTTP: no key or a wrong key is OpenAI's 401; the key is 200.
  {
    httplib::Result r = PostCompletion(info.gateway_http, "");
    ASSERT_TRUE(r) << httplib::to_string(r.error());
    EXPECT_EQ(r->status, 401);
    nlohmann::json j = nlohmann::json::parse(r->body, nullptr, false);
    ASSERT_TRUE(j.contains("error")) << r->body;
    EXPECT_EQ(j["error"]["type"], "invalid_request_error");
    EXPECT_TRUE(j["error"]["code"].is_null()) << r->body;
    EXPECT_TRUE(j["error"]["param"].is_null()) << r->body;
    EXPECT_TRUE(j["error"]["message"].is_string()) << r->body;
    std::string wrong = info.api_key;
    wrong.back() = wrong.back() == 'A' ? 'B' : 'A';
    r = PostCompletion(info.gateway_http, "Bearer " + wrong);
    ASSERT_TRUE(r) << httplib::to_string(r.error());
    EXPECT_EQ(r->status, 401);
    j = nlohmann::json::parse(r->body, nullptr, false);
    ASSERT_TRUE(j.contains("error")) << r->body;
    EXPECT_EQ(j["error"]["type"], "invalid_request_error");
    EXPECT_EQ(j["error"]["code"], "invalid_api_key");
    r = PostCompletion(info.gateway_http, "Bearer " + info.api_key);
    ASSERT_TRUE(r) << httplib::to_string(r.error());
    EXPECT_EQ(r->status, 200) << r->body;
    j = nlohmann::json::parse(r->body, nullptr, false);
    EXPECT_EQ(j["usage"]["completion_tokens"], 4) << r->body;
  }

  // A second worker identity, issued here from the cluster's CA: it passes
  // the nodes' role check (SAN kvr-worker) but is another principal.
  test_support::TempDir stranger_dir("kvr_stranger");
  {
    absl::StatusOr<std::string> ca_pem = security::ReadSmallFile(tls + "ca.crt");
    absl::StatusOr<std::string> ca_key = security::ReadSmallFile(tls + "ca.key");
    ASSERT_TRUE(ca_pem.ok() && ca_key.ok());
    absl::StatusOr<security::CertAndKey> cert = security::IssueCert(
        security::CertAndKey{*ca_pem, *ca_key}, "kvr-worker-x", {"kvr-worker"}, {"127.0.0.1"});
    ASSERT_TRUE(cert.ok()) << cert.status();
    ASSERT_TRUE(security::WriteCertAndKey(*cert, stranger_dir.path() + "/s.crt",
                                          stranger_dir.path() + "/s.key")
                    .ok());
  }
  std::vector<std::unique_ptr<v1::RetrievalNode::Stub>> stranger, owners;
  for (const cluster::ClusterInfo::Process& n : info.nodes) {
    stranger.push_back(NodeStub(n.grpc, info.ca_cert, stranger_dir.path() + "/s.crt",
                                stranger_dir.path() + "/s.key"));
    for (int w = 0; w < 2; ++w) {
      const std::string name = tls + absl::StrCat("kvr-worker-", w);
      owners.push_back(NodeStub(n.grpc, info.ca_cert, name + ".crt", name + ".key"));
    }
  }
  for (const auto& s : stranger) ASSERT_NE(s, nullptr);
  for (const auto& s : owners) ASSERT_NE(s, nullptr);

  // Generations run back to back until the probes below are done.
  std::atomic<bool> probing{true};
  std::vector<Generated> outputs;
  std::thread generator([&] {
    while (probing.load()) outputs.push_back(Generate(c->target(), secure, kLongTokens));
  });
  struct StopGenerator {
    std::atomic<bool>* flag;
    std::thread* t;
    ~StopGenerator() {
      flag->store(false);
      if (t->joinable()) t->join();
    }
  } stop_generator{&probing, &generator};

  // Until a probe lands while its target sequence is alive (the owner lists
  // it before and after the attempts), at most 60 s.
  bool probed = false;
  const absl::Time deadline = absl::Now() + absl::Seconds(60);
  while (!probed && absl::Now() < deadline) {
    for (size_t n = 0; n < info.nodes.size() && !probed; ++n) {
      std::set<uint64_t> owned;
      for (size_t w = 0; w < 2; ++w) {
        v1::ListShardsResponse list;
        if (ListShards(owners[2 * n + w].get(), std::nullopt, "", &list).ok()) {
          for (uint64_t id : SequenceIds(list)) owned.insert(id);
        }
      }
      if (owned.empty()) {
        absl::SleepFor(absl::Milliseconds(5));  // polling, with the deadline above
        continue;
      }
      v1::ListShardsResponse theirs;
      const grpc::Status listed = ListShards(stranger[n].get(), std::nullopt, "", &theirs);
      const uint64_t id = *owned.begin();
      const std::vector<grpc::Status> none = TouchSequence(stranger[n].get(), id, "");
      const std::vector<grpc::Status> guessed =
          TouchSequence(stranger[n].get(), id, std::string(16, 'g'));
      // Still alive (and so the refusals were about it, not a finished one)?
      bool alive = false;
      for (size_t w = 0; w < 2; ++w) {
        v1::ListShardsResponse list;
        if (ListShards(owners[2 * n + w].get(), std::nullopt, "", &list).ok() &&
            SequenceIds(list).count(id) > 0) {
          alive = true;
        }
      }
      if (!alive) continue;
      probed = true;
      std::printf("probed sequence %llu on node %zu (%zu of the workers' sequences there)\n",
                  static_cast<unsigned long long>(id), n, owned.size());
      SCOPED_TRACE(absl::StrCat("node ", n, " sequence ", id));
      EXPECT_TRUE(listed.ok()) << listed.error_message();
      EXPECT_EQ(theirs.shards_size(), 0) << "the stranger sees another worker's shards";
      const char* rpcs[] = {"Attend", "Append", "DropSequence", "ListShards(id)"};
      for (size_t i = 0; i < none.size(); ++i) {
        EXPECT_EQ(none[i].error_code(), grpc::StatusCode::PERMISSION_DENIED)
            << rpcs[i] << " without a capability: " << none[i].error_message();
        EXPECT_EQ(guessed[i].error_code(), grpc::StatusCode::PERMISSION_DENIED)
            << rpcs[i] << " with a guessed capability: " << guessed[i].error_message();
      }
    }
  }
  EXPECT_TRUE(probed) << "no sequence of the cluster's workers was seen on a node in 60 s";

  // Guessing handles: random ids are unknown (NOT_FOUND), or - should one
  // hit - refused; nothing else.
  std::mt19937_64 rng(std::random_device{}());
  for (int i = 0; i < 16; ++i) {
    const uint64_t id = rng();
    for (const grpc::Status& st : TouchSequence(stranger[0].get(), id, "")) {
      EXPECT_TRUE(st.error_code() == grpc::StatusCode::NOT_FOUND ||
                  st.error_code() == grpc::StatusCode::PERMISSION_DENIED)
          << "id " << id << ": " << st.error_code() << " " << st.error_message();
    }
  }

  // The generations that ran meanwhile are the insecure cluster's.
  probing.store(false);
  generator.join();
  ASSERT_FALSE(outputs.empty());
  std::printf("%zu generations of %d tokens ran during the probes\n", outputs.size(),
              kLongTokens);
  for (const Generated& g : outputs) {
    ASSERT_TRUE(g.status.ok()) << g.status.error_message();
    EXPECT_EQ(g.tokens, plain_tokens.tokens);
  }

  const std::optional<int> stopped = c->Stop();
  ASSERT_TRUE(stopped.has_value());
  EXPECT_TRUE(WIFEXITED(*stopped) && WEXITSTATUS(*stopped) == 0);
}

// The cluster's key with a tokens-per-minute limit (kvr cluster
// --api_key_tokens_per_minute): greedy completions are admitted while the
// key's token bucket is above zero and each debits its prompt + completion
// tokens; the next is OpenAI's 429 (type "tokens", Retry-After) over HTTP
// and RESOURCE_EXHAUSTED over gRPC.
TEST(ClusterSecureE2eTest, KeyOverItsTokensPerMinuteIs429) {
  constexpr int kTokensPerMinute = 30;  // refills 0.5 token/s
  auto c = ClusterProcess::Start(
      g_kvr,
      {"--nodes", "1", "--secure", "--api_key_tokens_per_minute", std::to_string(kTokensPerMinute)},
      /*merge_stderr=*/true);
  ASSERT_NE(c, nullptr);
  const std::string bearer = "Bearer " + c->info.api_key;
  int64_t debited = 0, debited_before_last = 0;
  const absl::Time start = absl::Now();
  std::optional<httplib::Response> refused;
  for (int i = 0; i < 16 && !refused; ++i) {
    httplib::Result r = PostCompletion(c->info.gateway_http, bearer);
    ASSERT_TRUE(r) << httplib::to_string(r.error());
    if (r->status == 429) {
      refused = *r;
      break;
    }
    ASSERT_EQ(r->status, 200) << r->body;
    const nlohmann::json j = nlohmann::json::parse(r->body, nullptr, false);
    ASSERT_TRUE(j.contains("usage")) << r->body;
    debited_before_last = debited;
    debited += j["usage"]["total_tokens"].get<int64_t>();
  }
  ASSERT_TRUE(refused) << "no 429 after " << debited << " tokens";
  // Admitted only while the bucket was above zero (plus what it refilled).
  const double refilled = absl::ToDoubleSeconds(absl::Now() - start) * kTokensPerMinute / 60.0;
  EXPECT_LT(debited_before_last, kTokensPerMinute + refilled);
  EXPECT_GE(debited + refilled, kTokensPerMinute);
  const nlohmann::json j = nlohmann::json::parse(refused->body, nullptr, false);
  ASSERT_TRUE(j.contains("error")) << refused->body;
  EXPECT_EQ(j["error"]["type"], "tokens") << refused->body;
  EXPECT_EQ(j["error"]["code"], "rate_limit_exceeded") << refused->body;
  int retry_after = 0;
  ASSERT_TRUE(absl::SimpleAtoi(refused->get_header_value("Retry-After"), &retry_after))
      << refused->body;
  EXPECT_GE(retry_after, 1);
  EXPECT_LE(retry_after, 60);
  // The same key over gRPC: RESOURCE_EXHAUSTED.
  const ClientSecurity secure{c->info.ca_cert, "", "", c->info.api_key};
  EXPECT_EQ(Generate(c->target(), secure).status.error_code(),
            grpc::StatusCode::RESOURCE_EXHAUSTED);
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
