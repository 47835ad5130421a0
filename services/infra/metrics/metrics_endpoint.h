// The Prometheus /metrics endpoint every kvr server shares (kvr_node,
// kvr_worker, kvr_gateway): a prometheus-cpp Exposer on one serving thread,
// bound to "host:port" (port 0 picks a free one).
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"

namespace prometheus {
class Collectable;
class Exposer;
}  // namespace prometheus

namespace kvr::metrics {

class MetricsEndpoint {
 public:
  // Serves `collectable` (typically a prometheus::Registry) on `listen`.
  // InvalidArgument when `listen` is not host:port, Unavailable when it
  // cannot bind.
  static absl::StatusOr<std::unique_ptr<MetricsEndpoint>> Start(
      const std::string& listen, std::shared_ptr<prometheus::Collectable> collectable);
  ~MetricsEndpoint();

  int port() const { return port_; }
  // "host:port" as bound, e.g. "127.0.0.1:43125".
  const std::string& address() const { return address_; }

 private:
  MetricsEndpoint() = default;
  std::unique_ptr<prometheus::Exposer> exposer_;
  int port_ = 0;
  std::string address_;
};

}  // namespace kvr::metrics
