#include "services/gateway/gateway_service.h"

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <deque>
#include <algorithm>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <utility>
#include <vector>

#include "services/gateway/generate_call.h"

namespace kvr::gateway {
namespace {

// A unary call forwarded to one worker (no slot taken): retried once on
// another worker when the first answers UNAVAILABLE. Deletes itself once
// gRPC is done with it (the worker call always ends before Finish).
template <typename Request, typename Response>
class UnaryProxy final : public grpc::ServerUnaryReactor {
 public:
  using Forward = std::function<void(v1::Generation::Stub*, grpc::ClientContext*,
                                     const Request*, Response*, std::function<void(grpc::Status)>)>;

  UnaryProxy(WorkerPool* pool, const Request* request, Response* response, absl::Time deadline,
             Forward forward)
      : pool_(pool),
        request_(request),
        response_(response),
        deadline_(deadline),
        forward_(std::move(forward)) {}

  void Start(const std::string& exclude) {
    std::shared_ptr<WorkerChannel> worker = pool_->PickAny(exclude);
    if (worker == nullptr) {
      Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE,
                          exclude.empty() ? "no healthy worker" : "no healthy worker left to retry on"));
      return;
    }
    grpc::ClientContext* ctx;
    {
      std::lock_guard<std::mutex> lock(mu_);
      contexts_.push_back(std::make_unique<grpc::ClientContext>());
      ctx = contexts_.back().get();
      ctx->set_deadline(absl::ToChronoTime(deadline_));
      if (cancelled_) ctx->TryCancel();
      worker_ = worker;
    }
    forward_(worker->generation.get(), ctx, request_, response_,
             [this, address = worker->address](grpc::Status s) { OnUpstream(address, s); });
  }

  void OnCancel() override {
    std::lock_guard<std::mutex> lock(mu_);
    cancelled_ = true;
    if (!contexts_.empty()) contexts_.back()->TryCancel();
  }
  void OnDone() override { delete this; }

 private:
  void OnUpstream(const std::string& address, const grpc::Status& s) {
    if (s.error_code() == grpc::StatusCode::UNAVAILABLE) {
      pool_->ReportUnavailable(address);
      if (!retried_) {
        retried_ = true;
        response_->Clear();
        Start(address);
        return;
      }
    }
    Finish(s);
  }

  WorkerPool* const pool_;
  const Request* const request_;
  Response* const response_;
  const absl::Time deadline_;
  const Forward forward_;
  bool retried_ = false;  // only touched by the worker call's callback
  std::mutex mu_;
  bool cancelled_ = false;
  std::shared_ptr<WorkerChannel> worker_;
  std::vector<std::unique_ptr<grpc::ClientContext>> contexts_;
};

// Starts a UnaryProxy of one call (`forward` issues it on a worker's stub)
// and returns it to gRPC.
template <typename Request, typename Response>
grpc::ServerUnaryReactor* StartUnaryProxy(
    WorkerPool* pool, const Request* request, Response* response, absl::Time deadline,
    typename UnaryProxy<Request, Response>::Forward forward) {
  auto* r = new UnaryProxy<Request, Response>(pool, request, response, deadline,
                                              std::move(forward));
  r->Start({});
  return r;
}

// A Generate refused before it started (no valid API key, or over the
// key's limits): finishes at once, deletes itself when gRPC is done.
class RefusedGenerate final : public grpc::ServerWriteReactor<v1::GenerateResponse> {
 public:
  explicit RefusedGenerate(const grpc::Status& status) { Finish(status); }
  void OnDone() override { delete this; }
};

// A unary call refused with `status` (gRPC's default reactor).
grpc::ServerUnaryReactor* Refuse(grpc::CallbackServerContext* context,
                                 const grpc::Status& status) {
  grpc::ServerUnaryReactor* r = context->DefaultReactor();
  r->Finish(status);
  return r;
}

// The value of the call's "authorization" metadata; nullopt without one.
std::optional<absl::string_view> Authorization(const grpc::CallbackServerContext* context) {
  const auto& md = context->client_metadata();
  auto it = md.find("authorization");
  if (it == md.end()) return std::nullopt;
  return absl::string_view(it->second.data(), it->second.size());
}

// The gRPC status of an API key refusal (never names the key).
grpc::Status KeyStatus(const ApiKeyDecision& d) {
  using Outcome = ApiKeyDecision::Outcome;
  if (d.outcome == Outcome::kMissing) {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                        "no API key: send metadata \"authorization: Bearer <key>\"");
  }
  if (d.outcome == Outcome::kInvalid) {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED, d.message);
  }
  return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED, d.message);
}

}  // namespace

// One Generate stream: a GenerateCall whose responses are written as they
// come. Deleted once both gRPC (OnDone) and the call (on_finish) are done.
class GatewayService::GenerateReactor final
    : public grpc::ServerWriteReactor<v1::GenerateResponse> {
 public:
  // `key`: the API key the call was admitted for (null without keys).
  void Start(WorkerPool* pool, GatewayMetrics* metrics, const v1::GenerateRequest& request,
             absl::Time received, absl::Time deadline, std::shared_ptr<ApiKeyGrant> key) {
    std::shared_ptr<GenerateCall> call = GenerateCall::Create(
        pool, metrics, Api::kGrpc, request, received, deadline,
        [this](v1::GenerateResponse r) { OnResponse(std::move(r)); },
        [this](const grpc::Status& s) { OnCallFinished(s); });
    if (key != nullptr) call->SetApiKey(std::move(key));
    {
      std::lock_guard<std::mutex> lock(mu_);
      call_ = call;
    }
    call->Start();
  }

  void OnWriteDone(bool ok) override {
    std::shared_ptr<GenerateCall> call;
    {
      std::lock_guard<std::mutex> lock(mu_);
      writing_ = false;
      call = call_;
      Pump();
    }
    // Never call into the GenerateCall with mu_ held: it calls back.
    if (call == nullptr) return;
    if (ok) {
      call->RequestNext();  // the next response, once the worker sends it
    } else {
      call->Cancel();  // the stream is gone
    }
  }

  void OnCancel() override {
    std::shared_ptr<GenerateCall> call;
    {
      std::lock_guard<std::mutex> lock(mu_);
      call = call_;
    }
    if (call != nullptr) call->Cancel();
  }

  void OnDone() override {
    bool last;
    {
      std::lock_guard<std::mutex> lock(mu_);
      grpc_done_ = true;
      last = call_done_;
    }
    if (last) delete this;
  }

 private:
  void OnResponse(v1::GenerateResponse r) {
    std::lock_guard<std::mutex> lock(mu_);
    in_flight_ = std::move(r);
    writing_ = true;
    StartWrite(&in_flight_);
  }

  void OnCallFinished(const grpc::Status& s) {
    bool last;
    {
      std::lock_guard<std::mutex> lock(mu_);
      call_done_ = true;
      call_.reset();
      status_ = s;
      Pump();
      last = grpc_done_;
    }
    if (last) delete this;
  }

  // Finishes once no write is in flight. Holds mu_.
  void Pump() {
    if (writing_ || finished_ || !status_.has_value()) return;
    finished_ = true;
    Finish(*status_);
  }

  std::mutex mu_;
  std::shared_ptr<GenerateCall> call_;
  v1::GenerateResponse in_flight_;
  bool writing_ = false;
  bool finished_ = false;
  bool call_done_ = false;
  bool grpc_done_ = false;
  std::optional<grpc::Status> status_;  // the call's outcome, once known
};

GatewayService::GatewayService(WorkerPool* pool, GatewayMetrics* metrics,
                               GatewayServiceOptions options)
    : pool_(pool), metrics_(metrics), options_(options) {}

absl::Time GatewayService::Deadline(const grpc::CallbackServerContext* context) const {
  const auto client = context->deadline();
  const absl::Time now = absl::Now();
  if (client >= std::chrono::system_clock::time_point::max() - std::chrono::hours(24 * 365)) {
    return now + options_.default_timeout;  // the client set none
  }
  return std::min(absl::FromChrono(client), now + options_.max_timeout);
}

grpc::ServerWriteReactor<v1::GenerateResponse>* GatewayService::Generate(
    grpc::CallbackServerContext* context, const v1::GenerateRequest* request) {
  const absl::Time received = absl::Now();
  std::shared_ptr<ApiKeyGrant> key;
  if (options_.api_keys != nullptr) {
    ApiKeyDecision d = options_.api_keys->Admit(Authorization(context));
    using Outcome = ApiKeyDecision::Outcome;
    if (d.outcome != Outcome::kOk) {
      const grpc::Status status = KeyStatus(d);
      const auto code = static_cast<absl::StatusCode>(status.error_code());
      if (d.outcome == Outcome::kMissing || d.outcome == Outcome::kInvalid) {
        metrics_->RecordUnauthenticated(d.outcome == Outcome::kMissing);
      } else {
        metrics_->RecordKeyRequest(d.metric_label, code);
      }
      metrics_->RecordRequest(Api::kGrpc, code, 0.0, /*reached_worker=*/false);
      return new RefusedGenerate(status);
    }
    key = std::move(d.grant);
  }
  auto* reactor = new GenerateReactor();
  reactor->Start(pool_, metrics_, *request, received, Deadline(context), std::move(key));
  return reactor;
}

grpc::Status GatewayService::Authenticate(const grpc::CallbackServerContext* context) const {
  if (options_.api_keys == nullptr) return grpc::Status::OK;
  const ApiKeyDecision d = options_.api_keys->Authenticate(Authorization(context));
  if (d.outcome == ApiKeyDecision::Outcome::kOk) return grpc::Status::OK;
  metrics_->RecordUnauthenticated(d.outcome == ApiKeyDecision::Outcome::kMissing);
  return KeyStatus(d);
}

grpc::ServerUnaryReactor* GatewayService::Tokenize(grpc::CallbackServerContext* context,
                                                   const v1::TokenizeRequest* request,
                                                   v1::TokenizeResponse* response) {
  if (grpc::Status s = Authenticate(context); !s.ok()) return Refuse(context, s);
  return StartUnaryProxy(pool_, request, response, Deadline(context),
                         [](auto* stub, auto* ctx, auto* req, auto* resp, auto done) {
                           stub->async()->Tokenize(ctx, req, resp, std::move(done));
                         });
}

grpc::ServerUnaryReactor* GatewayService::Detokenize(grpc::CallbackServerContext* context,
                                                     const v1::DetokenizeRequest* request,
                                                     v1::DetokenizeResponse* response) {
  if (grpc::Status s = Authenticate(context); !s.ok()) return Refuse(context, s);
  return StartUnaryProxy(pool_, request, response, Deadline(context),
                         [](auto* stub, auto* ctx, auto* req, auto* resp, auto done) {
                           stub->async()->Detokenize(ctx, req, resp, std::move(done));
                         });
}

grpc::ServerUnaryReactor* GatewayService::GetModelInfo(grpc::CallbackServerContext* context,
                                                       const v1::GetModelInfoRequest* request,
                                                       v1::GetModelInfoResponse* response) {
  if (grpc::Status s = Authenticate(context); !s.ok()) return Refuse(context, s);
  return StartUnaryProxy(pool_, request, response, Deadline(context),
                         [](auto* stub, auto* ctx, auto* req, auto* resp, auto done) {
                           stub->async()->GetModelInfo(ctx, req, resp, std::move(done));
                         });
}

}  // namespace kvr::gateway
