// What every kvr server's main() shares (kvr_node, kvr_worker, kvr_gateway):
// flag parsing with a usage line and a --help that lists the main's own
// flags, the "<program>: <message>" error exit, flag checks with uniform
// messages, and the /metrics endpoint with its "<program> metrics on
// HOST:PORT" line. The gRPC serving loop itself is services/infra/rpc.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "services/infra/metrics/metrics_endpoint.h"

namespace prometheus {
class Collectable;
}  // namespace prometheus

namespace kvr::server {

// The exit status of a server that could not start (bad flags, a port or a
// file it cannot use).
inline constexpr int kExitCannotStart = 2;

// Sets `usage` as the program usage message, makes --help / --helpshort
// list the flags of files whose path ends in `main_file` (absl looks for
// files named after the binary, and every server's is main.cc) and parses
// the command line (absl exits on an unknown or malformed flag). Call it
// first thing in main, before any thread starts.
void ParseFlags(absl::string_view main_file, absl::string_view usage, int argc, char** argv);

// Prints "<program>: <message>" on stderr; returns kExitCannotStart.
int Fail(absl::string_view program, absl::string_view message);

// Serves `collectable` at GET /metrics on `listen` ("host:port"; port 0
// picks a free one) and prints "<program> metrics on HOST:PORT" on stdout.
// nullptr when `listen` is empty (metrics off). Errors are
// MetricsEndpoint::Start's. Destroy the endpoint before what the collectable
// reads.
absl::StatusOr<std::unique_ptr<metrics::MetricsEndpoint>> ServeMetrics(
    absl::string_view program, const std::string& listen,
    std::shared_ptr<prometheus::Collectable> collectable);

// Flag values checked in order; the first failure is kept (later checks
// are skipped) and status() reports it as InvalidArgument. Messages name the
// flag: "--threads outside [0, 256]", "--max_message_bytes must be >= 65536",
// "--drain_seconds must be >= 0", "--request_timeout_seconds must be > 0".
// NaN fails every check.
class FlagChecks {
 public:
  // lo <= value <= hi.
  template <typename T>
  FlagChecks& InRange(absl::string_view flag, T value, T lo, T hi) {
    if (ok() && !(value >= lo && value <= hi)) {
      Failed(absl::StrCat("--", flag, " outside [", lo, ", ", hi, "]"));
    }
    return *this;
  }
  // value >= min.
  template <typename T>
  FlagChecks& AtLeast(absl::string_view flag, T value, T min) {
    if (ok() && !(value >= min)) Failed(absl::StrCat("--", flag, " must be >= ", min));
    return *this;
  }
  // value > min.
  template <typename T>
  FlagChecks& Above(absl::string_view flag, T value, T min) {
    if (ok() && !(value > min)) Failed(absl::StrCat("--", flag, " must be > ", min));
    return *this;
  }
  bool ok() const { return message_.empty(); }
  absl::Status status() const {
    return ok() ? absl::OkStatus() : absl::InvalidArgumentError(message_);
  }

 private:
  void Failed(std::string message) { message_ = std::move(message); }
  std::string message_;
};

}  // namespace kvr::server
