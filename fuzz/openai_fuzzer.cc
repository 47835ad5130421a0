// Fuzzes the OpenAI-compatible HTTP API's request handling
// (services/gateway/openai.h) as the gateway runs it on a body: ParseBody
// (depth bound, parse errors become a 400 naming the parser's message), ParseRequest for
// the route byte 0 picks, the error object (ApiError::ToJson, Dump) of a
// rejection, and on success the worker-side pieces: RenameWorkerFields and
// FromStatus on the body text as a worker message, Utf8Joiner / SseEvent on
// the body as generated text.
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "nlohmann/json.hpp"
#include "services/gateway/openai.h"

namespace gw = kvr::gateway;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const gw::Route route = (data[0] & 1) != 0 ? gw::Route::kChatCompletions : gw::Route::kCompletions;
  const std::string body(reinterpret_cast<const char*>(data + 1), size - 1);
  // The gateway's own body parser: nesting depth bounded before parsing, any
  // JSON error (parse_error, out_of_range) a 400.
  nlohmann::json parsed_json;
  if (std::optional<gw::ApiError> e = gw::ParseBody(body, &parsed_json)) {
    (void)gw::Dump(e->ToJson());
    return 0;
  }
  gw::ParsedRequest parsed;
  if (std::optional<gw::ApiError> e = gw::ParseRequest(route, parsed_json, &parsed)) {
    (void)gw::Dump(e->ToJson());
    return 0;
  }
  // Worker messages and generated text are the worker's, but they may echo
  // request bytes: run the body through those paths too.
  const std::string renamed = gw::RenameWorkerFields(route, body);
  const auto code = static_cast<absl::StatusCode>(data[0] % 17);
  (void)gw::Dump(gw::FromStatus(code, renamed).ToJson());
  gw::Utf8Joiner joiner;
  gw::ResponseInfo info;
  info.route = route;
  info.model = parsed.model;
  const std::string piece = joiner.Push(body);
  (void)gw::SseEvent(gw::StreamChunk(info, piece, true, nullptr));
  const std::string tail = joiner.Flush();
  (void)gw::SseEvent(gw::StreamChunk(info, tail, false, nullptr));
  return 0;
}
