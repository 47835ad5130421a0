// `kvr client`: streams one generation from a kvr.v1.Generation server (the
// gateway or a worker) to the terminal: the text to stdout as it arrives; on
// stderr a progress bar while the prompt is prefilled (when stderr is a
// terminal and the server reports prefill progress) and a one-line summary
// (tokens, time to first token, tok/s, finish reason).
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"

namespace kvr::client {

// The request as given on the command line; unset optionals keep the
// server's defaults.
struct ClientOptions {
  std::string target;  // host:port
  std::string prompt = "Once upon a time";
  std::optional<int> max_tokens;
  std::optional<float> temperature, top_p, repetition_penalty;
  std::optional<int> top_k;  // sampling
  std::optional<uint64_t> seed;
  std::vector<std::string> stop;
  std::string mode;  // "" = server default (retrieval)
  std::optional<int> sinks, window, k, beam;
  std::string request_id;
  double deadline_seconds = 300;
  bool echo = true;  // print the prompt before the continuation (as kvr generate)
  // Transport security (services/infra/security): all empty = plaintext.
  std::string tls_ca_file, tls_cert_file, tls_key_file;
  std::string api_key;  // sent as `authorization: Bearer <key>`; "" = none
};

extern const char kClientUsage[];
absl::Status ParseClientFlags(const std::vector<std::string>& args, ClientOptions* options,
                              bool* help);

// Runs the call. Exit code: 0 done, 1 the call failed (its gRPC status is
// printed), 130 cancelled by SIGINT/SIGTERM (the call is cancelled, so the
// server stops the sequence). Handles SIGINT and SIGTERM while it runs.
int RunClient(const ClientOptions& options);

}  // namespace kvr::client
