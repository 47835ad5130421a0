// `kvr capture`: real per-layer, per-head attention data from a loaded model,
// as .npy files that bench/index_bench reads unchanged (--keys --values
// --train --queries).
//
//   kvr capture --model M [--tokenizer T] (--prompt P | --prompt_file F)
//       [--generate N] --out DIR [--layers all|0,2,...]
//
// runs the prompt through the model on the CPU backend (the same LlamaBlock
// layers, RoPE and Backend::Attention as `kvr generate --mode full`), then N
// greedy decode steps (argmax, lowest id on ties; stops early at BOS / EOS,
// like the engine's generation), and writes, for every captured layer l and
// kv head h:
//   DIR/L<l>_H<h>_keys.npy     [T x head_dim]  keys after RoPE, as cached
//   DIR/L<l>_H<h>_values.npy   [T x head_dim]
//   DIR/L<l>_H<h>_train.npy    [P * group x head_dim]  every prefill query
//                              of the kv head's query heads (rotated); row
//                              p * group + j = query head h * group + j at
//                              prompt position p
//   DIR/L<l>_H<h>_queries.npy  [G * group x head_dim]  the decode queries of
//                              the G generated tokens, rows ordered the same
// where P = prompt tokens (BOS included), G = generated tokens (<= N; each
// one was run as a decode step), T = P + G, group = n_heads / n_kv_heads.
// float32, C order, 2-D. The decode query of position P + i attends keys
// 0 .. P + i with scale 1 / sqrt(head_dim). DIR/manifest.json (written last)
// names the model, its shape, the token ids, the generated text and every
// file with its rows.
//
// Bounds (docs/security.md, "kvr capture"): P + N <= the model's seq_len
// (OutOfRange naming --prompt or --generate and the limit); --prompt_file at
// most kMaxPromptFileBytes; the bytes of all files (computed before anything
// runs, overflow-checked) at most --max_output_bytes (the host memory the
// capture holds is the same size); --layers: distinct layers of the model.
// A non-empty DIR is refused unless --force. Every file is written to a
// temporary name and renamed into place.
//
// Thread-compatible: one capture per Backend at a time.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "gpu_worker/backend/backend.h"
#include "gpu_worker/model/tokenizer.h"
#include "gpu_worker/model/weights.h"

namespace kvr::capture {

// The most bytes --prompt_file may hold (64 MiB).
inline constexpr int64_t kMaxPromptFileBytes = int64_t{64} << 20;
// --max_output_bytes' default (4 GiB).
inline constexpr int64_t kDefaultMaxOutputBytes = int64_t{4} << 30;
// --generate's default.
inline constexpr int64_t kDefaultGenerate = 64;

struct CaptureOptions {
  // llama2.c checkpoint (.bin) or a Hugging Face checkpoint directory
  // (config.json + safetensors); empty = the bundled stories260K.
  std::string model;
  // llama2.c tokenizer (.bin), tokenizer.json or a SentencePiece .model;
  // empty = tok512.bin for the bundled model, else the checkpoint
  // directory's tokenizer.json, then tokenizer.model.
  std::string tokenizer;
  std::string prompt;       // exactly one of prompt / prompt_file is non-empty
  std::string prompt_file;
  int64_t generate = kDefaultGenerate;  // decode steps, >= 0
  std::string out;                      // output directory, required
  std::string layers = "all";           // "all" or a comma list of layer indices
  bool force = false;                   // overwrite a non-empty `out`
  int64_t max_output_bytes = kDefaultMaxOutputBytes;
  int64_t threads = 1;  // CPU backend threads, 0 = all cores
};

// The flags' help text (`kvr capture --help`).
extern const char kCaptureUsage[];

// Fills *options from `args` (the words after `kvr capture`); InvalidArgument
// naming the flag and its limit. Sets *help (and returns OK) on --help.
absl::Status ParseCaptureFlags(const std::vector<std::string>& args, CaptureOptions* options,
                               bool* help);

// What a capture wrote.
struct CaptureResult {
  std::vector<int32_t> prompt_tokens;     // as run (BOS first)
  std::vector<int32_t> generated_tokens;  // each one ran as a decode step
  std::string generated_text;
  std::vector<int> layers;  // captured layers, ascending
  int n_kv_heads = 0;
  int head_dim = 0;
  int group = 0;  // query heads per kv head
  std::vector<std::string> files;  // paths written, manifest.json last
  int64_t bytes_written = 0;       // all files, manifest included
  // Per model layer (every layer, captured or not): the backend's attention
  // output [n_heads * head_dim] of the last query that ran (the last decode
  // step; the last prompt token when nothing was generated).
  std::vector<std::vector<float>> last_attention;
};

// The capture on an already loaded model: `options.model`, `tokenizer` and
// `threads` are only recorded in the manifest; `options.prompt_file` is read
// here when set. `backend` runs every op (it should be a CPU backend: the
// capture downloads every layer's queries).
absl::StatusOr<CaptureResult> Capture(worker::Backend& backend,
                                      std::shared_ptr<const worker::LlamaWeights> weights,
                                      const worker::Tokenizer& tokenizer,
                                      const CaptureOptions& options);

// Loads the model and tokenizer named by `options`, makes a CPU backend and
// runs Capture.
absl::StatusOr<CaptureResult> RunCapture(const CaptureOptions& options);

// `kvr capture ARGS`: the process exit status (0 done, 1 failed, 2 bad flags).
int MainCapture(const std::vector<std::string>& args);

}  // namespace kvr::capture
