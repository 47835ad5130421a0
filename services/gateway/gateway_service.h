// GatewayService: kvr.v1.Generation served by the gateway (callback API), a
// thin layer over GenerateCall / WorkerPool that holds no generation logic:
//
//   * Generate: a ServerWriteReactor fed by a GenerateCall (admission,
//     routing, resumption on another worker when the worker is lost with
//     UNAVAILABLE, even mid-stream); worker responses are written
//     unchanged, one at a time. Client cancellation → the worker call is
//     cancelled. The client's deadline (or --request_timeout_seconds when it
//     has none), cut to --max_request_timeout_seconds, bounds queueing and
//     the worker call.
//   * Tokenize / Detokenize / GetModelInfo: forwarded to the least-loaded
//     healthy worker (no slot taken; UNAVAILABLE retried once elsewhere).
//     GetModelInfo's load fields are that one worker's.
//
// Thread-safety: gRPC calls the handlers concurrently. Lifetime: `pool` and
// `metrics` must outlive the service and every call it started (shut the
// server down, then WorkerPool::WaitForCalls).
#pragma once

#include "absl/time/time.h"
#include "kvr/v1/generation.grpc.pb.h"
#include "services/gateway/api_keys.h"
#include "services/gateway/gateway_metrics.h"
#include "services/gateway/worker_pool.h"

namespace kvr::gateway {

struct GatewayServiceOptions {
  // Deadline of a request that came without one.
  absl::Duration default_timeout = absl::Seconds(300);
  // Longest deadline accepted: a client's later deadline is cut to
  // now + max_timeout (so a year-long deadline cannot pin a worker slot).
  absl::Duration max_timeout = absl::Seconds(3600);
  // API keys (not owned; outlives the service); null: no authentication.
  // Set: every method needs metadata "authorization: Bearer <key>"
  // (UNAUTHENTICATED without a valid one), and Generate is admitted by the
  // key's limits (RESOURCE_EXHAUSTED naming the limit and when to retry).
  ApiKeyStore* api_keys = nullptr;
};

class GatewayService final : public v1::Generation::CallbackService {
 public:
  GatewayService(WorkerPool* pool, GatewayMetrics* metrics, GatewayServiceOptions options);

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

 private:
  class GenerateReactor;
  absl::Time Deadline(const grpc::CallbackServerContext* context) const;
  // With API keys: the error status of a call without a valid key (OK when
  // it has one, or keys are off). For the methods that take no slot.
  grpc::Status Authenticate(const grpc::CallbackServerContext* context) const;

  WorkerPool* const pool_;
  GatewayMetrics* const metrics_;
  const GatewayServiceOptions options_;
};

}  // namespace kvr::gateway
