// The serving loop every kvr gRPC binary shares (kvr_node, kvr_worker,
// kvr_gateway):
// health + reflection, message-size caps, per-connection stream and
// server-wide memory / thread bounds, the "<name> listening on
// HOST:PORT" line tests and scripts wait for, and a drain on SIGTERM/SIGINT.
#pragma once

#include <signal.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"

namespace grpc {
class Service;
class ServerCredentials;
}  // namespace grpc

namespace kvr::rpc {

struct ServeOptions {
  std::string name;    // printed: "<name> listening on HOST:PORT"
  std::string listen;  // "host:port"; port 0 picks a free one
  int max_message_bytes = 64 << 20;
  // Services reported SERVING through grpc.health.v1 (plus the overall "").
  std::vector<std::string> health_services;
  double drain_seconds = 10.0;  // in-flight calls get this long after a stop signal
  // Server-wide bounds (each 0 = gRPC's own default, which is unbounded):
  // concurrent streams (calls) one client connection may open; a client
  // past it waits for a slot (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS).
  int max_concurrent_streams = 256;
  // grpc::ResourceQuota: memory gRPC may use for its buffers across all
  // connections (beyond it gRPC sheds load: new calls / reads are refused
  // with RESOURCE_EXHAUSTED rather than the process growing), and threads
  // it may create. 2 GiB = 32 messages of the default 64 MiB cap.
  int64_t memory_quota_bytes = int64_t{2} << 30;
  int max_threads = 256;
  // The listening port's credentials (services/infra/security: mTLS with
  // peer authorization, or server-only TLS); null = plaintext.
  std::shared_ptr<grpc::ServerCredentials> credentials;
};

// Blocks SIGTERM and SIGINT in the calling thread and every thread it starts
// afterwards (call it first thing in main), and returns them as the set
// ServeUntilSignal waits on.
sigset_t BlockStopSignals();

// Builds and starts a server for `services` (without SO_REUSEPORT: an address
// in use is an error), prints the listening line, then
// blocks until one of `stop_signals` (already blocked in every thread)
// arrives; marks every health service NOT_SERVING, stops accepting calls and
// waits for in-flight ones (cancelling those still running after
// drain_seconds). Returns OK once the server is fully stopped, or an error
// naming the address when it cannot listen.
absl::Status ServeUntilSignal(const std::vector<grpc::Service*>& services,
                              const ServeOptions& options, const sigset_t& stop_signals);

}  // namespace kvr::rpc
