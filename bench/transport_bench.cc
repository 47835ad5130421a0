// transport_bench: per-layer Attend round trip, in-process vs gRPC on
// loopback, with Llama-3-8B-shaped payloads (32 query heads x d 128, 8 kv
// heads, k = 100).
//
//   transport_bench [--keys 16384] [--index graph] [--clients 1,4,16] [--tls] [--ucx]
//                   [--json out.json]
//
// Starts a real kvr_node (--kvr_node, default: the one built alongside) on
// 127.0.0.1 and an InProcessRetrievalClient in this process, with the same
// Attend thread count, and gives both the same shards: one sequence with one
// shard of --keys keys per kv head (synthetic attention data,
// tools/attention_data.h; graph indexes built from --train prefill queries).
//
// Modes:
//   excluding search  Attend on a sequence of the same shape that holds no
//                     keys: validation, the pool hop, (de)serialisation and
//                     the wire; what the transport costs.
//   including search  Attend on the loaded sequence: top-k search of every
//                     shard and the partial attention, plus the above.
//   health Check      grpc.health.v1 Check on the same channel: the floor of
//                     a gRPC unary round trip on this machine.
// Latency: one client, blocking calls back to back (p50 / p99 / mean); with
// --rounds R > 1 the transports of one mode take turns in R rounds.
// Throughput: C client threads calling back to back for --seconds; in
// "excluding search" each client has its own (empty) sequence, in "including
// search" all share the loaded one (one loaded sequence keeps the set-up to
// one index build per kv head). gRPC clients are separate GrpcRetrievalClient
// objects (gRPC may share one HTTP/2 connection among channels to the same
// target).
// UCX (--ucx, on by default): the node also listens with --ucx_listen and
// UcxRetrievalClient objects (one UCP worker each) carry Attend; transports
// from UCX_TLS (default here tcp on lo). Skipped, with the reason, when UCX
// cannot run.
// mTLS (--tls, on by default): a second kvr_node, identical but for
// --tls_cert_file/--tls_key_file/--tls_ca_file (a throwaway CA, a kvr-node
// and a kvr-worker certificate made with services/infra/security/
// cert_authority.h in a temporary directory, removed at exit), loaded with
// the same shards; its clients present the kvr-worker certificate through
// the worker's own credentials (security::MakeMtlsChannelCredentials), so
// "grpc-mtls" is the worker -> node hop of a --secure cluster. The report
// gives the TLS overhead: grpc-mtls p50 - grpc p50.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "common/subprocess.h"
#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "common/attention.h"
#include "common/tensor.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/client_context.h"
#include "retrieval_node/client/grpc_retrieval_client.h"
#include "retrieval_node/client/in_process_client.h"
#include "retrieval_node/client/ucx_retrieval_client.h"
#include "services/infra/security/cert_authority.h"
#include "services/infra/security/tls_credentials.h"
#include "tools/attention_data.h"

#ifndef KVR_NODE_BINARY
#define KVR_NODE_BINARY ""
#endif

ABSL_FLAG(std::string, kvr_node, KVR_NODE_BINARY, "path of the kvr_node binary to start");
ABSL_FLAG(int, heads, 32, "query heads per layer");
ABSL_FLAG(int, kv_heads, 8, "kv heads per layer (one shard each)");
ABSL_FLAG(int, dim, 128, "head dim d");
ABSL_FLAG(int, k, 100, "top-k per query head per shard");
ABSL_FLAG(int, keys, 16384, "keys per shard (one shard per kv head)");
ABSL_FLAG(std::string, index, "graph", "index of the shards: graph, flat or ivf");
ABSL_FLAG(int, train, 2048, "prefill queries per kv head the graph index is trained on");
ABSL_FLAG(int, train_k, 100, "exact top-k per training query");
ABSL_FLAG(int, iters, 3000, "calls per latency point, excluding search");
ABSL_FLAG(int, search_iters, 500, "calls per latency point, including search");
ABSL_FLAG(int, warmup, 200, "calls before each latency point");
ABSL_FLAG(int, rounds, 1,
          "latency points of one mode in this many interleaved rounds (each round runs its "
          "share of the calls on every transport in turn, so load that changes during the run "
          "hits all transports alike); 1: each transport's calls back to back, in turn");
ABSL_FLAG(std::string, clients, "1,4,16", "concurrent clients of the throughput points");
ABSL_FLAG(double, seconds, 2.0, "duration of each throughput point, seconds");
ABSL_FLAG(int, node_threads, 0,
          "Attend threads of both nodes (kvr_node --threads and the in-process pool); 0: all "
          "cores");
ABSL_FLAG(bool, node_metrics, true, "kvr_node serves /metrics, as deployed (false: disabled)");
ABSL_FLAG(bool, ucx, true,
          "also measure Attend over UCX (kvr_node --ucx_listen; UCX_TLS from the environment, "
          "default tcp on lo)");
ABSL_FLAG(int64_t, ucx_busy_poll_us, 0,
          "UCX progress threads (node and clients) poll this long after activity before "
          "sleeping");
ABSL_FLAG(bool, tls, true,
          "also measure Attend over gRPC with mTLS: a second kvr_node with --tls_* flags "
          "(throwaway CA and certificates in a temporary directory)");
ABSL_FLAG(std::string, json, "", "also write the results to this JSON file");

namespace kvr::retrieval {
namespace {

using Clock = std::chrono::steady_clock;

constexpr uint64_t kLoadedSequence = 1;
constexpr uint64_t kEmptySequenceBase = 1000;  // + client index

// The TempDir that Die removes (std::exit skips the destructors of locals;
// the child nodes die with this process through PR_SET_PDEATHSIG).
const std::string* g_temp_dir = nullptr;

[[noreturn]] void Die(const std::string& message) {
  std::fprintf(stderr, "transport_bench: %s\n", message.c_str());
  if (g_temp_dir != nullptr) {
    std::error_code ec;
    std::filesystem::remove_all(*g_temp_dir, ec);
  }
  std::exit(1);
}

void CheckOk(const absl::Status& status, const std::string& what) {
  if (!status.ok()) Die(what + ": " + status.ToString());
}

// --- the kvr_node child --------------------------------------------------------------

class NodeProcess {
 public:
  // Starts `binary --listen=127.0.0.1:0 args...`; returns once it listens.
  NodeProcess(const std::string& binary, const std::vector<std::string>& args) {
    std::vector<std::string> argv = {binary, "--listen=127.0.0.1:0"};
    argv.insert(argv.end(), args.begin(), args.end());
    auto proc = Subprocess::Start(std::move(argv));
    if (!proc.ok()) Die(std::string(proc.status().message()));
    proc_ = std::move(*proc);
    auto address = proc_->WaitForLine("kvr_node listening on ", absl::Seconds(30));
    if (!address.ok()) Die(binary + ": " + std::string(address.status().message()));
    address_ = *address;
  }

  ~NodeProcess() { (void)proc_->Stop(SIGTERM, absl::Seconds(30)); }

  const std::string& address() const { return address_; }

 private:
  std::unique_ptr<Subprocess> proc_;
  std::string address_;
};

// --- mTLS material --------------------------------------------------------------------

// A private temporary directory (mode 0700, under $TMPDIR or /tmp), removed
// with everything in it on destruction or by Die. At most one at a time.
class TempDir {
 public:
  TempDir() {
    const char* tmp = std::getenv("TMPDIR");
    std::string pattern = absl::StrCat((tmp != nullptr && *tmp != '\0') ? tmp : "/tmp",
                                       "/transport_bench.XXXXXX");
    if (mkdtemp(pattern.data()) == nullptr) Die("mkdtemp " + pattern + ": " + strerror(errno));
    path_ = pattern;
    g_temp_dir = &path_;
  }
  ~TempDir() {
    g_temp_dir = nullptr;
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// The PEM files of a throwaway mTLS set-up: a CA (CN kvr-ca), the node's
// certificate (CN kvr-node) and the client's (CN kvr-worker, which kvr_node
// allows by default), both with SANs DNS:localhost and IP:127.0.0.1, as
// `kvr cluster --secure` makes them. Written under `dir`.
struct TlsMaterial {
  std::string ca_cert;
  security::TlsFiles node;    // for kvr_node's --tls_* flags
  security::TlsFiles client;  // for the clients' channel credentials
};

TlsMaterial MakeTlsMaterial(const std::string& dir) {
  absl::StatusOr<security::CertAndKey> ca = security::MakeCa("kvr-ca");
  CheckOk(ca.status(), "MakeCa");
  TlsMaterial m;
  m.ca_cert = dir + "/ca.crt";
  CheckOk(security::WriteCertAndKey(*ca, m.ca_cert, dir + "/ca.key"), "write CA");
  auto issue = [&](const std::string& cn, security::TlsFiles& files) {
    absl::StatusOr<security::CertAndKey> cert =
        security::IssueCert(*ca, cn, {"localhost"}, {"127.0.0.1"});
    CheckOk(cert.status(), "IssueCert " + cn);
    files.cert_file = absl::StrCat(dir, "/", cn, ".crt");
    files.key_file = absl::StrCat(dir, "/", cn, ".key");
    files.ca_file = m.ca_cert;
    CheckOk(security::WriteCertAndKey(*cert, files.cert_file, files.key_file), "write " + cn);
  };
  issue("kvr-node", m.node);
  issue("kvr-worker", m.client);
  return m;
}

// --- data ----------------------------------------------------------------------------

struct Workload {
  SequenceSpec spec;
  std::vector<AttentionData> heads;  // one data set per kv head
  std::vector<Matrix> queries;       // Attend query sets, heads x dim each
};

Workload MakeWorkload(IndexType index_type) {
  Workload w;
  w.spec.sequence_id = kLoadedSequence;
  w.spec.n_layers = 1;
  w.spec.n_heads = absl::GetFlag(FLAGS_heads);
  w.spec.n_kv_heads = absl::GetFlag(FLAGS_kv_heads);
  w.spec.head_dim = absl::GetFlag(FLAGS_dim);
  w.spec.index_type = index_type;
  if (w.spec.n_kv_heads < 1 || w.spec.n_heads % w.spec.n_kv_heads != 0) {
    Die("--heads must be a multiple of --kv_heads");
  }
  const size_t group = static_cast<size_t>(w.spec.n_heads / w.spec.n_kv_heads);
  constexpr size_t kQuerySets = 64;
  for (int g = 0; g < w.spec.n_kv_heads; ++g) {
    AttentionDataOptions o;
    o.n_keys = static_cast<size_t>(absl::GetFlag(FLAGS_keys));
    o.n_train = std::min<size_t>(o.n_keys, static_cast<size_t>(absl::GetFlag(FLAGS_train)));
    o.n_test = group * kQuerySets;
    o.dim = static_cast<size_t>(w.spec.head_dim);
    o.seed = 1 + static_cast<uint64_t>(g);
    absl::StatusOr<AttentionData> data = GenerateAttentionData(o);
    CheckOk(data.status(), "GenerateAttentionData");
    w.heads.push_back(*std::move(data));
  }
  const size_t d = static_cast<size_t>(w.spec.head_dim);
  for (size_t s = 0; s < kQuerySets; ++s) {
    Matrix q(static_cast<size_t>(w.spec.n_heads), d);
    for (size_t h = 0; h < q.rows; ++h) {
      const Matrix& test = w.heads[h / group].test_queries;
      std::copy_n(test.row(s * group + h % group), d, q.row(h));
    }
    w.queries.push_back(std::move(q));
  }
  return w;
}

// Creates the loaded sequence (uploading every shard) and `empty` empty ones;
// returns the upload + build seconds.
double Load(RetrievalClient& client, const Workload& w, int empty) {
  CheckOk(client.CreateSequence(w.spec), "CreateSequence");
  const auto start = Clock::now();
  for (int g = 0; g < w.spec.n_kv_heads; ++g) {
    const AttentionData& data = w.heads[static_cast<size_t>(g)];
    ShardUpload u;
    u.key = {kLoadedSequence, 0, g, 0};
    u.first_position = 0;
    u.keys = data.keys.view();
    u.values = data.values.view();
    if (w.spec.index_type != IndexType::kFlat) {
      u.train_queries = data.train_queries.view();
      u.train_k = absl::GetFlag(FLAGS_train_k);
    }
    CheckOk(client.UploadShard(u), "UploadShard");
  }
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  for (int i = 0; i < empty; ++i) {
    SequenceSpec spec = w.spec;
    spec.sequence_id = kEmptySequenceBase + static_cast<uint64_t>(i);
    CheckOk(client.CreateSequence(spec), "CreateSequence (empty)");
  }
  return seconds;
}

// --- measurement ---------------------------------------------------------------------

struct Summary {
  int64_t calls = 0;
  double p50_us = 0, p99_us = 0, mean_us = 0;
  double calls_per_second = 0;
};

Summary Summarize(std::vector<double>& us, double seconds) {
  Summary s;
  s.calls = static_cast<int64_t>(us.size());
  if (us.empty()) return s;
  std::sort(us.begin(), us.end());
  s.p50_us = us[us.size() / 2];
  s.p99_us = us[std::min(us.size() - 1, static_cast<size_t>(us.size() * 0.99))];
  double sum = 0;
  for (double v : us) sum += v;
  s.mean_us = sum / static_cast<double>(us.size());
  s.calls_per_second = seconds > 0 ? static_cast<double>(us.size()) / seconds : 0;
  return s;
}

// Up to `max_calls` blocking Attends back to back from one thread, stopping
// after the call that ends at or past `until`; round-trip microseconds of each.
std::vector<double> RunCalls(RetrievalClient& client, const Workload& w, uint64_t sequence,
                             int64_t max_calls, Clock::time_point until, size_t query_offset) {
  const size_t n = static_cast<size_t>(w.spec.n_heads);
  const size_t d = static_cast<size_t>(w.spec.head_dim);
  Partials out(n, d);
  AttendRequest a;
  a.sequence_id = sequence;
  a.layer = 0;
  a.k = absl::GetFlag(FLAGS_k);
  std::vector<double> us;
  us.reserve(static_cast<size_t>(std::min<int64_t>(max_calls, 1 << 20)));
  for (int64_t i = 0; i < max_calls; ++i) {
    a.queries = w.queries[(query_offset + static_cast<size_t>(i)) % w.queries.size()].view();
    const auto t0 = Clock::now();
    const absl::Status st = client.Attend(a, out.view());
    const auto t1 = Clock::now();
    CheckOk(st, "Attend");
    us.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
    if (t1 >= until) break;
  }
  return us;
}

// The floor of a gRPC unary round trip on this machine: grpc.health.v1 Check
// (tiny messages, answered by gRPC itself) on the same channel.
Summary HealthCheckLatency(const std::shared_ptr<grpc::Channel>& channel, int iters) {
  auto stub = grpc::health::v1::Health::NewStub(channel);
  grpc::health::v1::HealthCheckRequest request;
  request.set_service("kvr.v1.RetrievalNode");
  auto once = [&]() {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
    grpc::health::v1::HealthCheckResponse response;
    const grpc::Status st = stub->Check(&context, request, &response);
    if (!st.ok()) Die("health Check: " + st.error_message());
  };
  for (int i = 0; i < absl::GetFlag(FLAGS_warmup); ++i) once();
  std::vector<double> us;
  us.reserve(static_cast<size_t>(iters));
  const auto start = Clock::now();
  for (int i = 0; i < iters; ++i) {
    const auto t0 = Clock::now();
    once();
    us.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
  }
  return Summarize(us, std::chrono::duration<double>(Clock::now() - start).count());
}

Summary Latency(RetrievalClient& client, const Workload& w, uint64_t sequence, int iters) {
  RunCalls(client, w, sequence, absl::GetFlag(FLAGS_warmup), Clock::time_point::max(), 0);
  const auto start = Clock::now();
  std::vector<double> us = RunCalls(client, w, sequence, iters, Clock::time_point::max(), 0);
  return Summarize(us, std::chrono::duration<double>(Clock::now() - start).count());
}

// The latency of each client in `clients` (one per transport) in `rounds`
// interleaved rounds: every client's warm-up first, then round r makes its
// share of the `iters` calls on each client in turn. Each Summary's
// calls/s counts only that client's own calls and time.
std::vector<Summary> InterleavedLatency(const std::vector<RetrievalClient*>& clients,
                                        const Workload& w, uint64_t sequence, int iters,
                                        int rounds) {
  for (RetrievalClient* client : clients) {
    RunCalls(*client, w, sequence, absl::GetFlag(FLAGS_warmup), Clock::time_point::max(), 0);
  }
  std::vector<std::vector<double>> us(clients.size());
  std::vector<double> seconds(clients.size(), 0.0);
  for (int r = 0; r < rounds; ++r) {
    const int64_t first = int64_t{iters} * r / rounds;
    const int64_t calls = int64_t{iters} * (r + 1) / rounds - first;
    for (size_t i = 0; i < clients.size(); ++i) {
      const auto start = Clock::now();
      std::vector<double> part = RunCalls(*clients[i], w, sequence, calls,
                                          Clock::time_point::max(), static_cast<size_t>(first));
      seconds[i] += std::chrono::duration<double>(Clock::now() - start).count();
      us[i].insert(us[i].end(), part.begin(), part.end());
    }
  }
  std::vector<Summary> out;
  for (size_t i = 0; i < clients.size(); ++i) out.push_back(Summarize(us[i], seconds[i]));
  return out;
}

// `clients` threads, client i using clients_of(i) and sequence seq_of(i).
template <typename ClientOf, typename SeqOf>
Summary Throughput(int clients, const Workload& w, ClientOf clients_of, SeqOf seq_of) {
  const double seconds = absl::GetFlag(FLAGS_seconds);
  std::vector<std::vector<double>> per(static_cast<size_t>(clients));
  std::vector<std::thread> threads;
  std::atomic<int> ready{0};
  std::atomic<bool> go{false};
  Clock::time_point until;
  for (int c = 0; c < clients; ++c) {
    threads.emplace_back([&, c] {
      RetrievalClient& client = clients_of(c);
      // Short warm-up, then wait for everyone.
      RunCalls(client, w, seq_of(c), 20, Clock::time_point::max(), static_cast<size_t>(c));
      ready.fetch_add(1);
      while (!go.load()) std::this_thread::yield();
      per[static_cast<size_t>(c)] = RunCalls(client, w, seq_of(c), INT64_MAX, until,
                                             static_cast<size_t>(c) * 7);
    });
  }
  while (ready.load() < clients) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  const auto start = Clock::now();
  until = start + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
  go.store(true);
  for (std::thread& t : threads) t.join();
  const double elapsed = std::chrono::duration<double>(Clock::now() - start).count();
  std::vector<double> all;
  for (auto& v : per) all.insert(all.end(), v.begin(), v.end());
  return Summarize(all, elapsed);
}

struct Row {
  std::string kind;  // "latency" or "throughput"
  std::string mode;  // "excluding search" / "including search"
  std::string transport;
  int clients = 1;
  Summary s;
};

std::string MachineLine() {
  utsname u{};
  uname(&u);
  std::string cpu;
  std::ifstream info("/proc/cpuinfo");
  for (std::string line; std::getline(info, line);) {
    if (line.rfind("model name", 0) == 0) {
      cpu = line.substr(line.find(':') + 2);
      break;
    }
  }
  return absl::StrFormat("%s, %u hardware threads, %s %s", cpu,
                         std::thread::hardware_concurrency(), u.sysname, u.release);
}

int Main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "per-layer Attend round trip, in-process vs gRPC (plaintext and mTLS) vs UCX on loopback\n"
      "(Llama-3-8B shapes).\n"
      "  transport_bench [--keys 16384] [--index graph] [--clients 1,4,16] [--tls] [--ucx]\n"
      "                  [--json out.json]");
  absl::ParseCommandLine(argc, argv);
  const std::string binary = absl::GetFlag(FLAGS_kvr_node);
  if (binary.empty() || access(binary.c_str(), X_OK) != 0) {
    Die("--kvr_node '" + binary + "' is not an executable");
  }
  absl::StatusOr<IndexType> index_type = ParseIndexType(absl::GetFlag(FLAGS_index));
  CheckOk(index_type.status(), "--index");
  std::vector<int> client_counts;
  for (absl::string_view part : absl::StrSplit(absl::GetFlag(FLAGS_clients), ',')) {
    int c = 0;
    if (!absl::SimpleAtoi(part, &c) || c < 1 || c > 1024) Die("bad --clients entry");
    client_counts.push_back(c);
  }
  const int max_clients = *std::max_element(client_counts.begin(), client_counts.end());
  const int rounds = absl::GetFlag(FLAGS_rounds);
  if (rounds < 1 || rounds > 10000) Die("--rounds must be in [1, 10000]");
  const int threads_flag = absl::GetFlag(FLAGS_node_threads);
  const size_t node_threads = threads_flag > 0
                                  ? static_cast<size_t>(threads_flag)
                                  : std::max<size_t>(1, std::thread::hardware_concurrency());

  std::fprintf(stderr, "transport_bench: generating data (%d kv heads x %d keys x d %d)...\n",
               absl::GetFlag(FLAGS_kv_heads), absl::GetFlag(FLAGS_keys), absl::GetFlag(FLAGS_dim));
  const Workload w = MakeWorkload(*index_type);

  std::vector<std::string> node_args = {absl::StrCat("--threads=", node_threads)};
  if (!absl::GetFlag(FLAGS_node_metrics)) node_args.push_back("--metrics_listen=");
  const bool want_ucx = absl::GetFlag(FLAGS_ucx);
  const int64_t busy_poll_us = absl::GetFlag(FLAGS_ucx_busy_poll_us);
  if (want_ucx) {
    setenv("UCX_TLS", "tcp", /*overwrite=*/0);  // the node inherits these
    setenv("UCX_NET_DEVICES", "lo", 0);
    setenv("UCX_WARN_UNUSED_ENV_VARS", "n", 0);
    node_args.push_back("--ucx_listen=127.0.0.1:0");
    node_args.push_back(absl::StrCat("--ucx_busy_poll_us=", busy_poll_us));
  }
  NodeProcess node(binary, node_args);
  // `max_clients` connected gRPC clients of the node at `address`.
  auto connect_all = [&](const std::string& address, const GrpcClientOptions& options) {
    std::vector<std::unique_ptr<GrpcRetrievalClient>> clients;
    for (int c = 0; c < max_clients; ++c) {
      absl::StatusOr<std::unique_ptr<GrpcRetrievalClient>> client =
          GrpcRetrievalClient::Create(address, options);
      CheckOk(client.status(), "GrpcRetrievalClient");
      CheckOk((*client)->WaitForReady(absl::Seconds(10)), "connect");
      clients.push_back(*std::move(client));
    }
    return clients;
  };
  std::vector<std::unique_ptr<GrpcRetrievalClient>> grpc = connect_all(node.address(), {});

  // The mTLS node: the same flags minus UCX (kvr_node refuses --ucx_listen
  // with mTLS unless --ucx_allow_unencrypted), plus the --tls_* files.
  // Declared in this order so the node stops before its files go.
  const bool want_tls = absl::GetFlag(FLAGS_tls);
  std::optional<TempDir> tls_dir;
  std::optional<NodeProcess> tls_node;
  std::vector<std::unique_ptr<GrpcRetrievalClient>> grpc_tls;
  if (want_tls) {
    tls_dir.emplace();
    const TlsMaterial tls = MakeTlsMaterial(tls_dir->path());
    std::vector<std::string> tls_args = {absl::StrCat("--threads=", node_threads),
                                         "--tls_cert_file=" + tls.node.cert_file,
                                         "--tls_key_file=" + tls.node.key_file,
                                         "--tls_ca_file=" + tls.node.ca_file};
    if (!absl::GetFlag(FLAGS_node_metrics)) tls_args.push_back("--metrics_listen=");
    tls_node.emplace(binary, tls_args);
    GrpcClientOptions tls_options;
    tls_options.credentials = security::MakeMtlsChannelCredentials(tls.client);
    grpc_tls = connect_all(tls_node->address(), tls_options);
  }
  std::vector<std::unique_ptr<UcxRetrievalClient>> ucx;
  for (int c = 0; want_ucx && c < max_clients; ++c) {
    absl::StatusOr<std::unique_ptr<GrpcRetrievalClient>> inner =
        GrpcRetrievalClient::Create(node.address());
    CheckOk(inner.status(), "GrpcRetrievalClient");
    UcxClientOptions ucx_options;
    ucx_options.busy_poll_us = busy_poll_us;
    absl::StatusOr<std::unique_ptr<UcxRetrievalClient>> client =
        UcxRetrievalClient::Create(*std::move(inner), ucx_options);
    CheckOk(client.status(), "UcxRetrievalClient");
    if (!(*client)->using_ucx()) {
      std::fprintf(stderr, "transport_bench: UCX skipped: %s\n",
                   (*client)->fallback_reason().ToString().c_str());
      ucx.clear();
      break;
    }
    ucx.push_back(*std::move(client));
  }
  NodeCoreOptions in_options;
  in_options.threads = node_threads;
  absl::StatusOr<std::unique_ptr<InProcessRetrievalClient>> in_process =
      InProcessRetrievalClient::Create(in_options);
  CheckOk(in_process.status(), "InProcessRetrievalClient");

  std::fprintf(stderr, "transport_bench: uploading and building (%s)...\n",
               absl::GetFlag(FLAGS_index).c_str());
  const double grpc_build = Load(*grpc[0], w, max_clients);
  const double in_build = Load(**in_process, w, max_clients);
  const double tls_build = want_tls ? Load(*grpc_tls[0], w, max_clients) : 0.0;
  std::fprintf(stderr, "transport_bench: upload + build %.2f s (gRPC), %.2f s (in-process)",
               grpc_build, in_build);
  if (want_tls) std::fprintf(stderr, ", %.2f s (gRPC mTLS)", tls_build);
  std::fprintf(stderr, "\n");

  struct Transport {
    std::string name;
    std::function<RetrievalClient&(int)> client;
  };
  std::vector<Transport> transports = {
      {"in-process", [&](int) -> RetrievalClient& { return **in_process; }},
      {"grpc", [&](int c) -> RetrievalClient& { return *grpc[static_cast<size_t>(c)]; }},
  };
  if (want_tls) {
    transports.push_back({"grpc-mtls", [&](int c) -> RetrievalClient& {
                            return *grpc_tls[static_cast<size_t>(c)];
                          }});
  }
  if (!ucx.empty()) {
    transports.push_back(
        {"ucx", [&](int c) -> RetrievalClient& { return *ucx[static_cast<size_t>(c)]; }});
  }
  struct Mode {
    std::string name;
    int iters;
    std::function<uint64_t(int)> sequence;
  };
  const std::vector<Mode> modes = {
      {"excluding search", absl::GetFlag(FLAGS_iters),
       [](int c) { return kEmptySequenceBase + static_cast<uint64_t>(c); }},
      {"including search", absl::GetFlag(FLAGS_search_iters),
       [](int) { return kLoadedSequence; }},
  };

  std::vector<Row> rows;
  std::fprintf(stderr, "transport_bench: latency, grpc health Check\n");
  rows.push_back({"latency", "health Check", "grpc", 1,
                  HealthCheckLatency(grpc[0]->channel(), absl::GetFlag(FLAGS_iters))});
  if (want_tls) {
    std::fprintf(stderr, "transport_bench: latency, grpc-mtls health Check\n");
    rows.push_back({"latency", "health Check", "grpc-mtls", 1,
                    HealthCheckLatency(grpc_tls[0]->channel(), absl::GetFlag(FLAGS_iters))});
  }
  for (const Mode& mode : modes) {
    if (rounds > 1) {
      std::fprintf(stderr, "transport_bench: latency, %s, every transport in %d rounds\n",
                   mode.name.c_str(), rounds);
      std::vector<RetrievalClient*> clients;
      for (const Transport& t : transports) clients.push_back(&t.client(0));
      const std::vector<Summary> summaries =
          InterleavedLatency(clients, w, mode.sequence(0), mode.iters, rounds);
      for (size_t i = 0; i < transports.size(); ++i) {
        rows.push_back({"latency", mode.name, transports[i].name, 1, summaries[i]});
      }
      continue;
    }
    for (const Transport& t : transports) {
      std::fprintf(stderr, "transport_bench: latency, %s, %s\n", mode.name.c_str(),
                   t.name.c_str());
      rows.push_back({"latency", mode.name, t.name, 1,
                      Latency(t.client(0), w, mode.sequence(0), mode.iters)});
    }
  }
  for (const Mode& mode : modes) {
    for (const Transport& t : transports) {
      for (int c : client_counts) {
        std::fprintf(stderr, "transport_bench: throughput, %s, %s, %d clients\n",
                     mode.name.c_str(), t.name.c_str(), c);
        rows.push_back({"throughput", mode.name, t.name, c,
                        Throughput(c, w, t.client, mode.sequence)});
      }
    }
  }

  // --- report ------------------------------------------------------------------------
  const std::string machine = MachineLine();
  std::printf("transport_bench: %d query heads x d %d, %d kv heads x %d keys (%s index), k %d, "
              "node threads %zu\n",
              w.spec.n_heads, w.spec.head_dim, w.spec.n_kv_heads, absl::GetFlag(FLAGS_keys),
              absl::GetFlag(FLAGS_index).c_str(), absl::GetFlag(FLAGS_k), node_threads);
  std::printf("machine: %s\n", machine.c_str());
  std::printf("upload + build: %.2f s over gRPC, %.2f s in-process", grpc_build, in_build);
  if (want_tls) std::printf(", %.2f s over gRPC mTLS", tls_build);
  std::printf("\n\n");
  std::printf("%-10s %-17s %-10s %7s %9s %9s %9s %10s\n", "", "mode", "transport", "clients",
              "p50 us", "p99 us", "mean us", "calls/s");
  for (const Row& r : rows) {
    std::printf("%-10s %-17s %-10s %7d %9.1f %9.1f %9.1f %10.0f\n", r.kind.c_str(),
                r.mode.c_str(), r.transport.c_str(), r.clients, r.s.p50_us, r.s.p99_us,
                r.s.mean_us, r.s.calls_per_second);
  }
  auto p50 = [&](const std::string& mode, const std::string& transport) {
    for (const Row& r : rows) {
      if (r.kind == "latency" && r.mode == mode && r.transport == transport) return r.s.p50_us;
    }
    return 0.0;
  };
  const double overhead = p50("excluding search", "grpc");
  std::printf("\ngRPC transport overhead (p50, excluding search): %.1f us (target <= 80 us): %s\n",
              overhead, overhead <= 80.0 ? "met" : "NOT met");
  std::printf("gRPC - in-process p50: %.1f us excluding search, %.1f us including search\n",
              overhead - p50("excluding search", "in-process"),
              p50("including search", "grpc") - p50("including search", "in-process"));
  if (!ucx.empty()) {
    const double ucx_overhead = p50("excluding search", "ucx");
    std::printf("UCX transport overhead (p50, excluding search): %.1f us (target <= 25 us): %s\n",
                ucx_overhead, ucx_overhead <= 25.0 ? "met" : "NOT met");
    std::printf("UCX - in-process p50: %.1f us excluding search, %.1f us including search\n",
                ucx_overhead - p50("excluding search", "in-process"),
                p50("including search", "ucx") - p50("including search", "in-process"));
  }
  double tls_overhead = 0;
  if (want_tls) {
    tls_overhead = p50("excluding search", "grpc-mtls") - overhead;
    std::printf("mTLS overhead (grpc-mtls - grpc p50): %.1f us excluding search, %.1f us "
                "including search, %.1f us health Check\n",
                tls_overhead,
                p50("including search", "grpc-mtls") - p50("including search", "grpc"),
                p50("health Check", "grpc-mtls") - p50("health Check", "grpc"));
  }
  std::printf("gRPC Attend (excluding search) - health Check p50: %.1f us (kvr's share of the "
              "overhead: payload copies, validation, pool hops)\n",
              overhead - p50("health Check", "grpc"));

  const std::string json_path = absl::GetFlag(FLAGS_json);
  if (!json_path.empty()) {
    std::ofstream out(json_path);
    out << "{\n  \"benchmark\": \"transport_bench\",\n";
    out << absl::StrFormat("  \"machine\": \"%s\",\n", machine);
    out << absl::StrFormat(
        "  \"config\": {\"heads\": %d, \"kv_heads\": %d, \"dim\": %d, \"k\": %d, \"keys\": %d, "
        "\"index\": \"%s\", \"node_threads\": %zu, \"node_metrics\": %s},\n",
        w.spec.n_heads, w.spec.n_kv_heads, w.spec.head_dim, absl::GetFlag(FLAGS_k),
        absl::GetFlag(FLAGS_keys), absl::GetFlag(FLAGS_index), node_threads,
        absl::GetFlag(FLAGS_node_metrics) ? "true" : "false");
    out << absl::StrFormat("  \"build_seconds\": {\"grpc\": %.3f, \"in_process\": %.3f},\n",
                           grpc_build, in_build);
    out << absl::StrFormat("  \"grpc_transport_overhead_p50_us\": %.2f,\n", overhead);
    if (want_tls) {
      out << absl::StrFormat("  \"build_seconds_grpc_mtls\": %.3f,\n", tls_build);
      out << absl::StrFormat("  \"mtls_overhead_p50_us\": %.2f,\n", tls_overhead);
    }
    out << "  \"results\": [\n";
    for (size_t i = 0; i < rows.size(); ++i) {
      const Row& r = rows[i];
      out << absl::StrFormat(
          "    {\"kind\": \"%s\", \"mode\": \"%s\", \"transport\": \"%s\", \"clients\": %d, "
          "\"calls\": %d, \"p50_us\": %.2f, \"p99_us\": %.2f, \"mean_us\": %.2f, "
          "\"calls_per_second\": %.1f}%s\n",
          r.kind, r.mode, r.transport, r.clients, r.s.calls, r.s.p50_us, r.s.p99_us,
          r.s.mean_us, r.s.calls_per_second, i + 1 < rows.size() ? "," : "");
    }
    out << "  ]\n}\n";
    if (!out) Die("cannot write " + json_path);
  }
  // Drop the sequences before the nodes go (also exercises DropSequence).
  for (int c = 0; c < max_clients; ++c) {
    grpc[0]->DropSequence(kEmptySequenceBase + static_cast<uint64_t>(c)).IgnoreError();
  }
  grpc[0]->DropSequence(kLoadedSequence).IgnoreError();
  if (want_tls) {
    for (int c = 0; c < max_clients; ++c) {
      grpc_tls[0]->DropSequence(kEmptySequenceBase + static_cast<uint64_t>(c)).IgnoreError();
    }
    grpc_tls[0]->DropSequence(kLoadedSequence).IgnoreError();
  }
  return 0;
}

}  // namespace
}  // namespace kvr::retrieval

int main(int argc, char** argv) { return kvr::retrieval::Main(argc, argv); }
