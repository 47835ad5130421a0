// `kvr eval`: accuracy of a served model through the OpenAI HTTP API
// (issue 19 item 4), full attention vs retrieval in one command:
//
//   kvr eval --url http://127.0.0.1:PORT [--api_key KEY] [--tasks FILE]
//
// Tasks (JSON lines, tools/eval_tasks.jsonl is the bundled set):
//   {"type": "choice", "context": C, "choices": [A, B, ...], "answer": i}
//       loglikelihood multiple choice: each choice is scored by
//       /v1/completions with echo + max_tokens 0 + logprobs 0 over C + choice,
//       summing the log-probabilities of the tokens at byte offsets >= |C|
//       (lm-evaluation-harness's loglikelihood); the prediction is the best
//       sum (lowest index on ties).
//   {"type": "passkey", "context": C, "answer": S}
//       needle retrieval: greedy generation of --passkey_tokens tokens from C;
//       correct when the text, leading spaces dropped, starts with S.
// Each task runs once per attention mode of --modes (default full,retrieval:
// the request's `kvr.mode`), and a table of correct / total / accuracy per
// (task, mode) is printed. Note: echo scores a prompt with a full-attention
// pass in every mode (a prefill is full attention), so choice accuracy is
// the same in both modes; passkey decodes with the mode's attention.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace kvr::eval {

struct EvalItem {
  enum class Kind : uint8_t { kChoice, kPasskey };
  Kind kind = Kind::kChoice;
  std::string context;
  std::vector<std::string> choices;  // kChoice
  int answer = 0;                    // kChoice: index into choices
  std::string expected;              // kPasskey
};

// Bounds of a tasks file (each violation is an InvalidArgument naming the
// line and the limit).
inline constexpr int64_t kMaxTasksFileBytes = 16 << 20;
inline constexpr size_t kMaxItems = 10000;
inline constexpr size_t kMaxChoices = 16;
inline constexpr size_t kMaxFieldBytes = 1 << 20;

// Parses JSON-lines `text` (blank lines skipped) into items.
absl::StatusOr<std::vector<EvalItem>> ParseTasks(const std::string& text);

struct EvalScore {
  std::string task;  // "choice" or "passkey"
  std::string mode;  // "full" or "retrieval"
  int correct = 0;
  int total = 0;
};

// The prediction of one choice item from each choice's summed
// continuation log-probability: the best (lowest index on ties).
int BestChoice(const std::vector<double>& sums);

// Runs the command on the arguments after "eval"; the process exit code (0;
// 1 when a request failed; 2 for bad flags or tasks, naming them).
int RunEval(const std::vector<std::string>& args);

}  // namespace kvr::eval
