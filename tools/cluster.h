// The local cluster behind `kvr cluster`: N kvr_node retrieval nodes, one
// kvr_worker on them and one kvr_gateway in front, all on 127.0.0.1 with
// port 0, supervised by one process.
//
// Every child's stdout and stderr go, through a pipe the supervisor drains,
// to <run_dir>/<name>.log (node-0.log, ..., worker.log, gateway.log); the
// supervisor learns the bound addresses from the lines the servers print
// ("kvr_node listening on HOST:PORT", "... metrics on ...", "kvr_gateway http
// on ..."). Once all listen it writes <run_dir>/cluster.json (ClusterInfo)
// and prints
//
//   kvr cluster ready: gateway grpc HOST:PORT http HOST:PORT (run dir DIR)
//
// on stdout. The children run in their own process group (a terminal's
// Ctrl-C reaches only the supervisor, which then stops them in order) and die
// with the supervisor (PR_SET_PDEATHSIG) if it is killed.
#pragma once

#include <sys/types.h>

#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace kvr::cluster {

struct ClusterOptions {
  int nodes = 3;  // [1, 64]
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
  // Extra arguments for each kind of child, appended after the cluster's own.
  std::vector<std::string> node_args, worker_args, gateway_args;
  // How long a child may take to print its listening line.
  absl::Duration start_timeout = absl::Seconds(60);
  // After SIGTERM, how long a child may take to exit before SIGKILL.
  absl::Duration stop_timeout = absl::Seconds(30);
};

// What cluster.json holds: every address ("host:port"; empty when that
// endpoint is not served) and process id.
struct ClusterInfo {
  struct Node {
    std::string grpc, metrics;
    pid_t pid = 0;
  };
  std::string gateway_grpc, gateway_http, gateway_metrics;
  pid_t gateway_pid = 0;  // 0: no gateway
  std::string worker_grpc, worker_metrics;
  pid_t worker_pid = 0;
  std::vector<Node> nodes;
  std::string run_dir;
  pid_t pid = 0;  // the supervisor (`kvr cluster`)
};

std::string ClusterInfoToJson(const ClusterInfo& info);
// InvalidArgument naming the field on malformed JSON or a missing address.
absl::StatusOr<ClusterInfo> ParseClusterInfo(std::string_view json);
absl::StatusOr<ClusterInfo> ReadClusterInfo(const std::string& path);

// Starts the cluster, then supervises it until SIGINT or SIGTERM arrives
// (the caller blocks both in every thread first, see rpc::BlockStopSignals;
// RunCluster takes them through a signalfd), then stops the gateway, the
// worker and the nodes in that order: SIGTERM, up to stop_timeout, SIGKILL.
//
// OK when stopped by a signal with every child exiting 0. Otherwise an error
// naming the child that failed to start, died unexpectedly or did not stop
// cleanly, with the tail of its log; the other children are stopped first.
absl::Status RunCluster(const ClusterOptions& options);

// The usage text of `kvr cluster` and its flag parser (tools/kvr_main.cc).
extern const char kClusterUsage[];
absl::Status ParseClusterFlags(const std::vector<std::string>& args, ClusterOptions* options,
                               bool* help);

}  // namespace kvr::cluster
