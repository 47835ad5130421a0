#include "services/infra/server/server_main.h"

#include <cstdio>
#include <utility>

#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/flags/usage_config.h"
#include "absl/strings/match.h"

namespace kvr::server {

void ParseFlags(absl::string_view main_file, absl::string_view usage, int argc, char** argv) {
  absl::SetProgramUsageMessage(usage);
  absl::FlagsUsageConfig config;
  // The main's own flags, and the --tls_* and gRPC-bound flags the servers
  // share.
  config.contains_help_flags = [file = std::string(main_file)](absl::string_view path) {
    return absl::EndsWith(path, file) ||
           absl::EndsWith(path, "services/infra/security/tls_flags.cc") ||
           absl::EndsWith(path, "services/infra/server/serve_flags.cc");
  };
  config.contains_helpshort_flags = config.contains_help_flags;
  absl::SetFlagsUsageConfig(config);
  absl::ParseCommandLine(argc, argv);
}

int Fail(absl::string_view program, absl::string_view message) {
  std::fprintf(stderr, "%.*s: %.*s\n", static_cast<int>(program.size()), program.data(),
               static_cast<int>(message.size()), message.data());
  return kExitCannotStart;
}

absl::StatusOr<std::unique_ptr<metrics::MetricsEndpoint>> ServeMetrics(
    absl::string_view program, const std::string& listen,
    std::shared_ptr<prometheus::Collectable> collectable) {
  if (listen.empty()) return nullptr;
  absl::StatusOr<std::unique_ptr<metrics::MetricsEndpoint>> endpoint =
      metrics::MetricsEndpoint::Start(listen, std::move(collectable));
  if (!endpoint.ok()) return endpoint.status();
  std::printf("%.*s metrics on %s\n", static_cast<int>(program.size()), program.data(),
              (*endpoint)->address().c_str());
  std::fflush(stdout);
  return endpoint;
}

}  // namespace kvr::server
