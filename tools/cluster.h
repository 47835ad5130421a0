// The local cluster behind `kvr cluster`: N kvr_node retrieval nodes, one or
// more kvr_workers on them and one kvr_gateway in front, all on 127.0.0.1,
// supervised by one process like a Kubernetes controller: a child that dies
// is restarted with the same command line.
//
// Every port is chosen once at startup (free ones below the kernel's
// ephemeral range, see PickLoopbackPorts, then passed explicitly:
// --listen=127.0.0.1:PORT), so a restarted child
// serves on its old addresses and the others' flags (the worker's --nodes, the
// gateway's --workers) stay true. Every child's stdout and stderr go, through
// a pipe the supervisor drains, to <run_dir>/<name>.log (node-0.log, ...,
// worker.log, gateway.log; appended to on a restart); the supervisor learns
// readiness from the lines the servers print ("kvr_node listening on
// HOST:PORT", "... metrics on ...", "kvr_gateway http on ..."). Once all
// listen it writes <run_dir>/cluster.json (ClusterInfo) and prints
//
//   kvr cluster ready: gateway grpc HOST:PORT http HOST:PORT (run dir DIR)
//
// on stdout. The children run in their own process group (a terminal's
// Ctrl-C reaches only the supervisor, which then stops them in order) and die
// with the supervisor (PR_SET_PDEATHSIG) if it is killed.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace kvr::cluster {

struct ClusterOptions {
  int nodes = 3;    // [1, 64]
  int workers = 1;  // kvr_worker processes on the same nodes, [1, 16]
  // Copies of each shard (kvr_worker --replicas), [1, nodes]; 0: 2 when
  // nodes >= 2, else 1. Passed only when the kvr_worker binary lists
  // --replicas in its --helpfull (an explicit value it lacks is an error).
  int replicas = 0;
  // A child that dies is restarted unless it has already been restarted this
  // many times in a row, each run shorter than RestartPolicy::kResetAfter;
  // then everything is stopped and RunCluster fails naming it. 0: never
  // restart (any death stops the cluster). [0, 1000].
  int max_restarts = 10;
  // Where logs, node data and cluster.json go; empty: ./run/<YYYYmmdd-HHMMSS>.
  std::string run_dir;
  // Where the server binaries are: either holding them directly (an install
  // prefix's bin/) or a build tree (retrieval_node/server/kvr_node, ...).
  // Empty: the directory of this executable, then the build tree it is in.
  std::string bin_dir;
  // Per-binary paths; each overrides bin_dir for its binary.
  std::string node_binary, worker_binary, gateway_binary;
  bool gateway = true;  // false: nodes and worker only (clients use the worker)
  // Passed to kvr_worker when set; the worker's own default otherwise (the
  // bundled stories260K).
  std::string model, tokenizer;
  // mTLS on every gRPC hop and an API key at the gateway: a throwaway CA and
  // per-role certificates in <run_dir>/tls/ (tools/cluster_secure.h), each
  // child started with --tls_cert_file/--tls_key_file/--tls_ca_file, the
  // gateway also with --public_tls_cert_file/--public_tls_key_file (its
  // client-facing gRPC over TLS) and --api_keys_file; cluster.json names the
  // client's credentials. Every binary must list those flags (--helpfull).
  bool secure = false;
  // With --secure: the limits of the cluster's API key (0 = unlimited).
  int64_t api_key_max_concurrent = 0;
  int64_t api_key_tokens_per_minute = 0;
  // Extra arguments for each kind of child, appended after the cluster's own.
  std::vector<std::string> node_args, worker_args, gateway_args;
  // How long a child may take to print its listening line.
  absl::Duration start_timeout = absl::Seconds(60);
  // After SIGTERM, how long a child may take to exit before SIGKILL.
  absl::Duration stop_timeout = absl::Seconds(30);
};

// What cluster.json holds: every address ("host:port"; empty when that
// endpoint is not served), process id and restart count. Rewritten (temp file
// + rename) whenever a child is restarted, so it names the current pids.
struct ClusterInfo {
  // One supervised server: its addresses (the same across restarts), the pid
  // of its current run and how often it was restarted.
  struct Process {
    std::string grpc, metrics;
    pid_t pid = 0;
    int restarts = 0;
  };
  using Node = Process;
  std::string gateway_grpc, gateway_http, gateway_metrics;
  pid_t gateway_pid = 0;  // 0: no gateway
  int gateway_restarts = 0;
  // workers[0], kept for readers of the single-worker format.
  std::string worker_grpc, worker_metrics;
  pid_t worker_pid = 0;
  std::vector<Process> workers;  // every kvr_worker (the gateway's --workers)
  int replicas = 0;              // --replicas given to each worker; 0: none
  std::vector<Process> nodes;
  std::string run_dir;
  pid_t pid = 0;  // the supervisor (`kvr cluster`)
  // --secure only (absent from the JSON otherwise): the CA certificate, the
  // kvr-client certificate and key (absolute paths), and the gateway API key
  // itself. cluster.json is then written with mode 0600.
  std::string ca_cert, client_cert, client_key, api_key;
};

// Crash-loop backoff of one supervised child, a kubelet's with shorter
// times: the first restart waits kInitialDelay, each one after doubles it up
// to kMaxDelay; a run of at least kResetAfter starts over (delay and count).
// Not thread-safe; one per child.
class RestartPolicy {
 public:
  static constexpr absl::Duration kInitialDelay = absl::Milliseconds(100);
  static constexpr absl::Duration kMaxDelay = absl::Seconds(5);
  static constexpr absl::Duration kResetAfter = absl::Seconds(30);

  explicit RestartPolicy(int max_restarts) : max_restarts_(max_restarts) {}

  // The child exited unexpectedly after running for `uptime`: how long to
  // wait before restarting it, or nullopt when it was already restarted
  // max_restarts times in a row (each run shorter than kResetAfter) and is to
  // be given up.
  std::optional<absl::Duration> OnExit(absl::Duration uptime);

  // Restarts in the current streak (runs shorter than kResetAfter).
  int streak() const { return streak_; }

 private:
  int max_restarts_;
  int streak_ = 0;
  absl::Duration next_delay_ = kInitialDelay;
};

std::string ClusterInfoToJson(const ClusterInfo& info);
// InvalidArgument naming the field on malformed JSON or a missing address.
absl::StatusOr<ClusterInfo> ParseClusterInfo(std::string_view json);
absl::StatusOr<ClusterInfo> ReadClusterInfo(const std::string& path);

// Ports below this are never picked for children (privileged or well known).
inline constexpr int kMinFixedPort = 10000;

// The kernel's ephemeral port range [first, last] (Linux
// ip_local_port_range); 32768-60999 when it cannot be read.
std::pair<int, int> EphemeralPortRange();

// `n` distinct TCP ports free on 127.0.0.1 now, for children started with
// fixed ports. Taken from [kMinFixedPort, first ephemeral port) when that
// span holds at least 1000 ports, from a random start: the kernel never hands
// those out for port-0 binds or outgoing connections, so a port stays free
// while its child is down between restarts. Otherwise (or when they are
// taken) the kernel's choice. Each was bound once and released: another
// process may still take one before its child binds it.
absl::StatusOr<std::vector<int>> PickLoopbackPorts(int n);

// Whether `binary --helpfull` (an abseil program's full flag list) names
// --<flag>: how `kvr cluster` learns that the kvr_worker it runs accepts a
// flag newer than itself. Runs the program once (at most 30 s).
absl::StatusOr<bool> ProgramAcceptsFlag(const std::string& binary, std::string_view flag);

// Starts the cluster, then supervises it until SIGINT or SIGTERM arrives
// (the caller blocks both in every thread first, see rpc::BlockStopSignals;
// RunCluster takes them through a signalfd), then stops the gateway, the
// workers and the nodes in that order: SIGTERM, up to stop_timeout, SIGKILL.
// A child that dies meanwhile is restarted (same command line, ports and
// data dir) after its RestartPolicy delay; each death and restart is logged
// on stderr and appended to the child's log.
//
// OK when stopped by a signal with every running child exiting 0. Otherwise
// an error naming the child that failed to start, kept dying past
// max_restarts, or did not stop cleanly, with the tail of its log; the other
// children are stopped first.
absl::Status RunCluster(const ClusterOptions& options);

// The usage text of `kvr cluster` and its flag parser (tools/kvr_main.cc).
extern const char kClusterUsage[];
absl::Status ParseClusterFlags(const std::vector<std::string>& args, ClusterOptions* options,
                               bool* help);

}  // namespace kvr::cluster
