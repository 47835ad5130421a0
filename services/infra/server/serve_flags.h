// The gRPC server bounds every kvr server binary shares (kvr_node,
// kvr_worker, kvr_gateway), defined once in serve_flags.cc and passed to
// rpc::ServeOptions by each main:
//   --max_concurrent_streams (256)     calls one client connection may have open
//   --grpc_memory_quota_bytes (2 GiB)  gRPC's buffer memory over all connections
//   --grpc_max_threads (256)           threads gRPC may create
// Each 0 = gRPC's own default (unbounded).
#pragma once

#include <cstdint>

#include "absl/status/statusor.h"

namespace kvr::server {

struct ServeBounds {
  int max_concurrent_streams = 0;
  int64_t memory_quota_bytes = 0;
  int max_threads = 0;
};

// Reads the three flags; a negative value is InvalidArgument naming the flag
// ("--grpc_max_threads must be >= 0"; the main exits 2).
absl::StatusOr<ServeBounds> ServeBoundsFromFlags();

}  // namespace kvr::server
