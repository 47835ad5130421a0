#include "services/infra/server/serve_flags.h"

#include "absl/flags/flag.h"
#include "services/infra/server/server_main.h"

ABSL_FLAG(int, max_concurrent_streams, 256,
          "gRPC port: concurrent calls one client connection may have open; more wait for a "
          "slot (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS; 0 = gRPC's default, unbounded)");
ABSL_FLAG(int64_t, grpc_memory_quota_bytes, int64_t{2} << 30,
          "gRPC port: memory gRPC may use for its buffers over all connections "
          "(grpc::ResourceQuota; 0 = unbounded)");
ABSL_FLAG(int, grpc_max_threads, 256,
          "gRPC port: threads gRPC may create (grpc::ResourceQuota; 0 = unbounded)");

namespace kvr::server {

absl::StatusOr<ServeBounds> ServeBoundsFromFlags() {
  const ServeBounds bounds{.max_concurrent_streams = absl::GetFlag(FLAGS_max_concurrent_streams),
                           .memory_quota_bytes = absl::GetFlag(FLAGS_grpc_memory_quota_bytes),
                           .max_threads = absl::GetFlag(FLAGS_grpc_max_threads)};
  const absl::Status ok =
      FlagChecks()
          .AtLeast("max_concurrent_streams", bounds.max_concurrent_streams, 0)
          .AtLeast("grpc_memory_quota_bytes", bounds.memory_quota_bytes, int64_t{0})
          .AtLeast("grpc_max_threads", bounds.max_threads, 0)
          .status();
  if (!ok.ok()) return ok;
  return bounds;
}

}  // namespace kvr::server
