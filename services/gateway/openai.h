// The OpenAI-compatible HTTP API's data layer (no HTTP library types, no
// networking): JSON request bodies → kvr.v1.GenerateRequest with
// field-naming errors, responses and server-sent-event chunks in OpenAI's
// shapes, the chat prompt template, gRPC status → HTTP error mapping, and
// UTF-8-safe streaming of text pieces.
//
// Request fields (both routes): model (required), max_tokens (default 128;
// chat also max_completion_tokens), temperature, top_p, top_k (extension),
// repetition_penalty (extension), presence_penalty and frequency_penalty
// ([-2, 2]), seed, stop (string or array of at most 4), stream,
// stream_options.include_usage, n ([1, --max_n]), user (<= 256 bytes,
// accepted and not used), and the extension object `kvr`: {mode:
// "retrieval"|"full", sinks, window, k, budget} → the request's
// AttentionParams (k → top_k, budget → beam). /v1/completions takes
// `prompt` as a string, an array of token ids, or an array of up to
// --max_prompts of those (one group of n choices each), `logprobs` ([0, 5])
// and `echo`; /v1/chat/completions takes `messages` (rendered with
// ChatPrompt), `logprobs` (bool) and `top_logprobs` ([0, 20]). Unsupported
// OpenAI features (best_of > 1, suffix, tools) are refused naming the
// field; other unknown fields are ignored.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "kvr/v1/generation.pb.h"
#include "services/gateway/chat_template.h"
#include "nlohmann/json.hpp"

namespace kvr::gateway {

enum class Route : uint8_t { kCompletions, kChatCompletions };

// An error as the HTTP API returns it: status and OpenAI's error object
// {"error": {"message", "type", "param", "code"}}.
struct ApiError {
  int http_status = 400;
  std::string message;
  std::string type;   // "invalid_request_error", ...
  std::string param;  // the offending field, or empty (JSON null)
  std::string code;   // e.g. "context_length_exceeded", or empty (JSON null)
  absl::StatusCode grpc_code = absl::StatusCode::kInvalidArgument;  // for metrics

  nlohmann::json ToJson() const;
};

// 400 invalid_request_error naming `param`.
ApiError InvalidRequest(std::string param, std::string message);

// A worker / gateway status as the HTTP error it becomes: INVALID_ARGUMENT
// and OUT_OF_RANGE → 400 (OUT_OF_RANGE is code context_length_exceeded),
// NOT_FOUND → 404, RESOURCE_EXHAUSTED → 429, UNAVAILABLE → 503,
// DEADLINE_EXCEEDED → 504, CANCELLED → 499, UNIMPLEMENTED → 501, others →
// 500. `param` is the field the message starts with ("max_tokens: ...").
ApiError FromStatus(absl::StatusCode code, const std::string& message);

// Deepest nesting of arrays / objects a request body may have. No valid
// request needs more than 4 (messages[i].content[j]); the bound keeps every
// walk over a body (the parser, destruction, error formatting) shallow.
inline constexpr int kMaxJsonDepth = 64;

// Parses a request body into `out`: 400 "request body: JSON nested deeper
// than the limit of 64 levels" (checked in one pass before parsing, so no
// deep value is ever built) or "request body: invalid JSON (<parser's
// message>)".
std::optional<ApiError> ParseBody(std::string_view text, nlohmann::json* out);

// Bounds a request's fan-out (gateway flags --max_n, --max_prompts).
struct ApiLimits {
  int max_n = 16;        // choices per prompt
  int max_prompts = 16;  // prompts in one /v1/completions batch
};
inline constexpr int kMaxStopStrings = 4;         // OpenAI's limit
inline constexpr int kMaxCompletionLogprobs = 5;  // completions `logprobs` (OpenAI's)
inline constexpr int kMaxChatTopLogprobs = 20;    // chat `top_logprobs` (OpenAI's)
inline constexpr size_t kMaxUserBytes = 256;

struct ParsedRequest {
  Route route = Route::kCompletions;
  std::string model;
  // Every field but the prompt's; its prompt is prompts[0]'s.
  v1::GenerateRequest request;
  // /v1/completions: the prompts (text or tokens set, nothing else), in order.
  std::vector<v1::GenerateRequest> prompts;
  int n = 1;
  int logprobs = -1;  // alternatives per token; -1: no logprobs asked for
  bool echo = false;
  std::string user;
  bool stream = false;
  bool include_usage = false;  // stream_options.include_usage
  // /v1/chat/completions: the messages as the chat template sees them,
  // [{"role", "content"}] (content parts joined, developer → system), and
  // whether ParseRequest appended kChatStop (the plain format's stop).
  nlohmann::json messages;
  bool chat_stop_added = false;
};

// The worker requests of `parsed`'s choices, choice index order: prompt p's
// j-th choice is index p * n + j, with the prompt of prompts[p] (the chat
// route: request's) and, for j > 0, the seed (request's, default 1) + j so
// that sampled choices differ and a seeded request is reproducible; greedy
// choices are identical.
std::vector<v1::GenerateRequest> ChoiceRequests(const ParsedRequest& parsed);

// The ONE worker request of all `parsed`'s choices (issue 19: the worker
// prefills each prompt once and forks it per choice): the request with
// GenerateRequest.n = parsed.n (unset for 1) and, for a batch of more than
// one prompt, GenerateRequest.prompts; the worker's choice index p * n + j
// and its seed + j per choice match ChoiceRequests, so each choice is
// token-identical to ChoiceRequests' request of the same index.
v1::GenerateRequest WorkerRequest(const ParsedRequest& parsed);

// Validates `body` (already parsed JSON) for `route` into `out`; the error
// names the field ("temperature: expected a number, got string"). Ranges the
// worker checks (top_p, kvr.window, the prompt's length, ...) are left to it;
// RenameWorkerFields maps its field names back to the HTTP ones.
std::optional<ApiError> ParseRequest(Route route, const nlohmann::json& body, ParsedRequest* out,
                                     const ApiLimits& limits = {});

// A worker's message with its kvr.v1 field names ("sampling.top_p: ...",
// "attention.window", "text", "tokens") as the HTTP request spells them
// ("top_p", "kvr.window", "prompt" / "messages").
std::string RenameWorkerFields(Route route, std::string_view message);

// The chat template (stories260K has none of its own): each message as
// "<Role>: <content>\n" with Role one of System, User, Assistant, then
// "Assistant:" for the reply. Chat requests also stop at "\nUser:".
inline constexpr char kChatStop[] = "\nUser:";
std::string ChatPrompt(const std::vector<std::pair<std::string, std::string>>& messages);

// Renders `parsed`'s messages with the model's chat template
// (add_generation_prompt true) into its prompt text, in place of ChatPrompt's
// plain format, and drops the plain format's kChatStop (the worker stops at
// the model's end-of-turn ids instead). A leading `tmpl.bos_token()` is cut:
// the worker adds BOS to every text prompt. Errors are 400s naming
// `messages`: the template's raise_exception message ("messages: <msg>"),
// or the renderer's error with its template position or limit.
std::optional<ApiError> ApplyChatTemplate(const ChatTemplate& tmpl, ParsedRequest* parsed);

// OpenAI finish_reason of a kvr finish reason: "length" (max tokens or the
// context is full) or "stop" (stop string or end of sequence).
std::string FinishReasonName(v1::FinishReason reason);

// Passes text pieces on without ever splitting a UTF-8 character: Push
// returns the longest prefix of everything pushed so far that ends on a
// character boundary and keeps the incomplete tail (at most 3 bytes) for the
// next piece; Flush returns what is left (possibly invalid: JSON encoding
// replaces it with U+FFFD).
class Utf8Joiner {
 public:
  std::string Push(std::string_view piece);
  std::string Flush();

 private:
  std::string pending_;
};

// Response bodies. `id` is "cmpl-..." / "chatcmpl-...", `created` Unix seconds.
struct ResponseInfo {
  Route route = Route::kCompletions;
  std::string id;
  std::string model;
  int64_t created = 0;
};
// The `logprobs` object of a choice (or of a streamed chunk) for `tokens`:
// completions {tokens, token_logprobs, top_logprobs, text_offset} (a token
// without a logprob, the echoed prompt's first, has null there; text_offset
// counts bytes from *text_offset, which is advanced past these tokens);
// chat {content: [{token, logprob, bytes, top_logprobs: [{token, logprob,
// bytes}]}]}.
nlohmann::json LogprobsJson(Route route, const std::vector<v1::TokenLogprob>& tokens,
                            int64_t* text_offset);
// One choice of a whole response; `logprobs` null when none were asked for.
nlohmann::json ChoiceJson(Route route, int index, const std::string& text,
                          const std::string& finish_reason, nlohmann::json logprobs);
// The whole (non-streamed) response with `choices` (ChoiceJson each). The
// extension field `kvr` carries `token_ids` (choice 0's) and `timings`.
nlohmann::json ResponseJson(const ResponseInfo& info, nlohmann::json choices,
                            const v1::Usage& usage, const std::vector<int32_t>& token_ids,
                            const v1::Timings& timings);
// ResponseJson of one choice without logprobs.
nlohmann::json CompletionResponse(const ResponseInfo& info, const std::string& text,
                                  const std::vector<int32_t>& token_ids,
                                  const v1::GenerateFinal& summary);
// One streamed chunk of choice `index`: `text` (with the role on the chat's
// first chunk), or the final one with `finish_reason`; `logprobs`
// (LogprobsJson of the chunk's tokens) or null.
nlohmann::json StreamChunk(const ResponseInfo& info, const std::string& text, bool first,
                           const std::string* finish_reason, int index = 0,
                           const nlohmann::json* logprobs = nullptr);
// The last chunk when stream_options.include_usage: empty choices, usage.
nlohmann::json UsageChunk(const ResponseInfo& info, const v1::Usage& usage);
// "data: <json>\n\n" (invalid UTF-8 replaced).
std::string SseEvent(const nlohmann::json& event);
inline constexpr char kSseDone[] = "data: [DONE]\n\n";
// JSON text with invalid UTF-8 replaced by U+FFFD.
std::string Dump(const nlohmann::json& value);

}  // namespace kvr::gateway
