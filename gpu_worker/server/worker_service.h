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
//   * Tokenize / Detokenize: inline (bounded sizes).
//   * GetModelInfo: inline, or — with wait_finished_requests — answered from
//     the scheduler once that many requests have ended.
//
// Thread-safety: gRPC calls the handlers concurrently. Lifetime: `scheduler`,
// `tokenizer` and `node` must outlive the service; shut the server down
// (Server::Shutdown + Wait) and then destroy the scheduler (which ends every
// stream still open) before destroying the service.
#pragma once

#include <cstdint>
#include <functional>
#include <string>

#include "gpu_worker/model/tokenizer.h"
#include "gpu_worker/server/generation_scheduler.h"
#include "kvr/v1/generation.grpc.pb.h"
#include "retrieval_node/client/retrieval_client.h"

namespace kvr::worker {

struct WorkerServiceOptions {
  std::string model_name;  // reported by GetModelInfo
  std::string backend;     // likewise: the engine's Backend::Describe()
  // Called once per Generate call with the status it finishes with, just
  // before the status goes out (metrics). May be empty; thread-safe.
  std::function<void(absl::StatusCode)> on_generate_finished;
  // Size caps on requests.
  static constexpr size_t kMaxPromptBytes = 1 << 20;
  static constexpr int kMaxPromptTokens = 1 << 20;
  static constexpr int kMaxStopStrings = 16;
  static constexpr size_t kMaxStopBytes = 256;
  static constexpr size_t kMaxRequestIdBytes = 128;
  static constexpr int kMaxDetokenizeIds = 1 << 20;
};

class WorkerService final : public v1::Generation::CallbackService {
 public:
  // `node` (may be null: no node stats) is the engine's retrieval client.
  WorkerService(GenerationScheduler* scheduler, const Tokenizer* tokenizer,
                retrieval::RetrievalClient* node, const LlamaConfig& config,
                int64_t max_context_tokens, WorkerServiceOptions options);

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

  // Converts and validates `request` (no gRPC types involved past here).
  absl::StatusOr<GenerationWork> ToWork(const v1::GenerateRequest& request) const;

 private:
  class GenerateReactor;
  class InfoReactor;
  void FillInfo(v1::GetModelInfoResponse* response) const;

  GenerationScheduler* const scheduler_;
  const Tokenizer* const tokenizer_;
  retrieval::RetrievalClient* const node_;
  const LlamaConfig config_;
  const int64_t max_context_tokens_;
  const WorkerServiceOptions options_;
};

}  // namespace kvr::worker
