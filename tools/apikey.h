// `kvr apikey`: makes a gateway API key (services/gateway/api_keys.h) and
// prints the key on line 1 and its keys-file entry (JSON, no secret) on
// line 2:
//
//   kvr apikey --id team-a [--max_concurrent 8] [--tokens_per_minute 120000]
//
// The key goes to the client; the entry goes into the gateway's
// --api_keys_file ({"keys": [entry, ...]}).
#pragma once

#include <string>
#include <vector>

namespace kvr::apikey {

// Runs the command on the arguments after "apikey"; the process exit code
// (0, or 2 with a message naming the flag on stderr).
int RunApiKey(const std::vector<std::string>& args);

}  // namespace kvr::apikey
