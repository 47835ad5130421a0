// WorkerService: the kvr.v1.Generation gRPC service of a decode worker
// (callback API), a thin layer over GenerationScheduler (the core, which
// holds no gRPC types).
//
// Handlers validate every request field against the limits below and the
// model (InvalidArgument / OutOfRange naming the field and the limit),
// convert it to a GenerationWork and hand it to the scheduler; nothing
// blocks a gRPC thread on a decode step:
//   * Generate: a ServerWriteReactor fed by the scheduler threads: prefill
//     progress, then token chunks, then the summary. Tokens produced while a
//     write is in flight are coalesced into the next chunk (one write at a
//     time, so a slow reader never blocks the engine). Client
//     cancellation or deadline cancels the request's CancelToken: the
//     sequence stops at its next step and its shards are dropped.
//   * Tokenize: encoded on the service's own kTokenizeThreads threads (a
//     1 MiB text is ~0.3 s of CPU), at most kMaxTokenizeWaiting calls
//     waiting (more: RESOURCE_EXHAUSTED); a call cancelled or past its
//     deadline while waiting is answered without encoding.
//   * Detokenize: inline (bounded size, linear).
//   * GetModelInfo: inline, or — with wait_finished_requests — answered from
//     the scheduler once that many requests have ended.
//   * Generate and a waiting GetModelInfo end at the latest
//     max_deadline_seconds after they arrive, whatever deadline the client
//     set (a grpc::Alarm per call; DEADLINE_EXCEEDED naming the flag).
//
// Thread-safety: gRPC calls the handlers concurrently. Lifetime: `scheduler`,
// `tokenizer` and `node` must outlive the service; shut the server down
// (Server::Shutdown + Wait) and then destroy the scheduler (which ends every
// stream still open) before destroying the service.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "gpu_worker/model/chat_config.h"
#include "gpu_worker/model/tokenizer.h"
#include "gpu_worker/server/generation_scheduler.h"
#include "kvr/v1/generation.grpc.pb.h"
#include "retrieval_node/client/retrieval_client.h"

namespace kvr::worker {

struct WorkerServiceOptions {
  std::string model_name;  // reported by GetModelInfo
  std::string backend;     // likewise: the engine's Backend::Describe()
  // The model's chat template, bos/eos strings and end-of-turn ids
  // (gpu_worker/model/chat_config.h), reported by GetModelInfo.
  ChatConfig chat;
  // Called once per Generate call with the status it finishes with, just
  // before the status goes out (metrics). May be empty; thread-safe.
  std::function<void(absl::StatusCode)> on_generate_finished;
  // Longest a Generate or a waiting GetModelInfo may run, seconds (0: no
  // cap): one whose deadline is later (or that has none) is served, but cut
  // this long after it arrived: its request cancelled (shards dropped), its
  // status DEADLINE_EXCEEDED naming --max_deadline_seconds.
  double max_deadline_seconds = 0.0;
  // GenerateRequest.n at most this (kvr_worker --max_n) and prompts at most
  // max_prompts (--max_prompts); each >= 1.
  int max_n = 16;
  int max_prompts = 16;
  // Size caps on requests.
  static constexpr size_t kMaxPromptBytes = 1 << 20;
  static constexpr int kMaxPromptTokens = 1 << 20;
  static constexpr int kMaxStopStrings = 4;  // OpenAI's limit
  static constexpr size_t kMaxStopBytes = 256;
  static constexpr size_t kMaxRequestIdBytes = 128;
  static constexpr int kMaxDetokenizeIds = 1 << 20;
  // Tokenize: threads that encode, and calls that may wait for them.
  static constexpr int kTokenizeThreads = 2;
  static constexpr size_t kMaxTokenizeWaiting = 64;
};

// `text` with every byte that does not start a valid UTF-8 sequence (bad
// leads, stray continuation bytes, overlongs, surrogates, > U+10FFFF, a
// truncated tail) replaced by U+FFFD. Streamed and detokenized text goes
// through it: tokens are byte pieces, so sampled text may be malformed, and
// proto3 `string` fields that are not valid UTF-8 fail to parse in the client.
std::string ValidUtf8(std::string_view text);

class WorkerService final : public v1::Generation::CallbackService {
 public:
  // `node` (may be null: no node stats) is the engine's retrieval client.
  WorkerService(GenerationScheduler* scheduler, const Tokenizer* tokenizer,
                retrieval::RetrievalClient* node, const LlamaConfig& config,
                int64_t max_context_tokens, WorkerServiceOptions options);
  // Joins the Tokenize threads after they finished every call still waiting.
  ~WorkerService() override;

  grpc::ServerWriteReactor<v1::GenerateResponse>* Generate(
      grpc::CallbackServerContext* context, const v1::GenerateRequest* request) override;
  grpc::ServerUnaryReactor* Tokenize(grpc::CallbackServerContext* context,
                                     const v1::TokenizeRequest* request,
                                     v1::TokenizeResponse* response) override;
  grpc::ServerUnaryReactor* Detokenize(grpc::CallbackServerContext* context,
                                       const v1::DetokenizeRequest* request,
                                       v1::DetokenizeResponse* response) override;
  grpc::ServerUnaryReactor* GetModelInfo(grpc::CallbackServerContext* context,
                                         const v1::GetModelInfoRequest* request,
                                         v1::GetModelInfoResponse* response) override;

  // Converts and validates `request` (no gRPC types involved past here):
  // one GenerationWork per prompt (the `prompt` oneof, or each of
  // `prompts`), each with its n - 1 other choices in `forks`; choice j of a
  // prompt samples with seed + j (mod 2^64). InvalidArgument naming n /
  // prompts and the flag limit when over --max_n / --max_prompts.
  absl::StatusOr<std::vector<GenerationWork>> ToWorks(const v1::GenerateRequest& request) const;
  // ToWorks for a request of one prompt (the first group when it has more).
  absl::StatusOr<GenerationWork> ToWork(const v1::GenerateRequest& request) const;

 private:
  class GenerateReactor;
  class InfoReactor;
  void FillInfo(v1::GetModelInfoResponse* response) const;
  // A prompt's token ids: `text` encoded, with BOS first when `add_bos`
  // (refused before encoding when it cannot fit the context), or `tokens`
  // as is; `field` names it in errors.
  absl::StatusOr<std::vector<int32_t>> PromptIds(bool is_text, const std::string& text,
                                                 const v1::TokenIds& tokens,
                                                 std::string_view field, bool add_bos) const;
  // A Tokenize thread: runs tokenize_jobs_ until tokenize_stop_ and empty.
  void TokenizeLoop();

  GenerationScheduler* const scheduler_;
  const Tokenizer* const tokenizer_;
  retrieval::RetrievalClient* const node_;
  const LlamaConfig config_;
  const int64_t max_context_tokens_;
  const WorkerServiceOptions options_;

  std::mutex tokenize_mu_;
  std::condition_variable tokenize_cv_;
  std::deque<std::function<void()>> tokenize_jobs_;
  bool tokenize_stop_ = false;
  std::vector<std::thread> tokenize_threads_;  // last: started in the constructor
};

}  // namespace kvr::worker
