#include "tools/apikey.h"

#include <cstdint>
#include <cstdio>

#include "services/gateway/api_keys.h"
#include "tools/cli_flags.h"

namespace kvr::apikey {
namespace {

constexpr char kUsage[] = R"(Usage: kvr apikey --id ID [flags]

Makes a gateway API key: prints the key (kvr-...) on line 1 and its entry for
kvr_gateway --api_keys_file on line 2 ({"keys": [entry, ...]}; the entry holds
a salted SHA-256 of the key, never the key).

  --id ID                   key id, [A-Za-z0-9._-]{1,64} (in logs and metrics)
  --max_concurrent N        requests in flight at once (default 0 = unlimited)
  --tokens_per_minute N     prompt + completion tokens per minute (default 0 =
                            unlimited)
)";

}  // namespace

int RunApiKey(const std::vector<std::string>& args) {
  std::string id;
  gateway::ApiKeyLimits limits;
  bool help = false;
  const cli::FlagTable flags = {
      {"id", cli::StringFlag(&id)},
      {"max_concurrent", cli::IntFlag(0, gateway::kMaxApiKeyConcurrent, &limits.max_concurrent)},
      {"tokens_per_minute",
       cli::IntFlag(0, gateway::kMaxApiKeyTokensPerMinute, &limits.tokens_per_minute)},
  };
  if (absl::Status s = cli::ParseFlags(args, flags, "apikey", &help); !s.ok()) {
    std::fprintf(stderr, "kvr apikey: %s\n", std::string(s.message()).c_str());
    return 2;
  }
  if (help) {
    std::fputs(kUsage, stdout);
    return 0;
  }
  if (id.empty()) {
    std::fprintf(stderr, "kvr apikey: --id is required\n%s", kUsage);
    return 2;
  }
  absl::StatusOr<gateway::MadeApiKey> made = gateway::MakeApiKey(id, limits);
  if (!made.ok()) {
    std::fprintf(stderr, "kvr apikey: --%s\n", std::string(made.status().message()).c_str());
    return 2;
  }
  std::printf("%s\n%s\n", made->key.c_str(), made->entry.c_str());
  return std::fflush(stdout) == 0 ? 0 : 1;
}

}  // namespace kvr::apikey
