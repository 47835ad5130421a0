// LlamaBlock: the one Llama decoder layer of the worker, on the Backend op
// interface, with the attention part supplied by the caller (AttentionHook).
//
// Per layer l over a batch of n rows (tokens of one sequence, or one token of
// each of n sequences), with x the residual stream:
//   xb = RmsNorm(x, attn_norm)
//   K, V rows = xb · wk, xb · wv, RoPE on K      (written where the hook says)
//   q = RoPE(xb · wq)
//   att = hook.Attend(q)                           (the hook's attention)
//   x += att · wo
//   x += w2 · (silu(xb' · w1) * (xb' · w3)),  xb' = RmsNorm(x, ffn_norm)
// The full-attention model (full causal attention over its cache), the
// retrieval engine's prefill (full attention, then the hand-off to the
// nodes) and decode step (sinks + window locally, merged with the nodes'
// partials) and gpu_decode_bench all run their layers through it, so the
// Llama math is written once; only the attention differs.
//
// A LlamaBlock is a view: it holds the backend, config and imported weights
// by pointer (the caller keeps them alive) and no activations. Not
// thread-safe beyond the Backend's rule (one caller at a time).
#pragma once

#include <cstdint>
#include <span>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "gpu_worker/backend/backend.h"
#include "gpu_worker/model/device_weights.h"
#include "gpu_worker/model/model_config.h"

namespace kvr::worker {

// Where batch rows [row, row + rows) of a layer's new keys and values go:
// k and v are [rows x kv_dim] tensors (a KV cache's rows, a staging buffer).
struct KvRun {
  int64_t row = 0;
  int64_t rows = 0;
  Tensor k, v;
  // Null: an op error on this run fails the whole Forward. Otherwise the
  // error goes here (when it still holds OK), the rest of this run is
  // skipped and Forward goes on (per-sequence failure in a batch).
  absl::Status* status = nullptr;
};

// The attention part of a layer, supplied by the caller of Forward.
class AttentionHook {
 public:
  virtual ~AttentionHook() = default;

  // Where layer `layer`'s new K/V rows go: runs of disjoint batch rows (rows
  // in no run get no K/V). Called once per layer before the block writes
  // them, so the hook may first read what the destinations hold (e.g. a
  // token leaving a window ring). The span stays valid until Attend
  // returns. An error fails the Forward.
  virtual absl::StatusOr<std::span<const KvRun>> KvRuns(int layer) = 0;

  // Layer `layer`'s attention: q [n x q_cols] holds the batch's rotated
  // queries, the K/V runs are written (ops may still be in flight on an
  // asynchronous backend). Writes att [n x q_cols] (the rows the output
  // projection reads). An error fails the Forward.
  virtual absl::Status Attend(int layer, const Tensor& q, const Tensor& att) = 0;
};

// An AttentionHook from two callables with KvRuns' and Attend's signatures
// (lambdas of the caller, which keep its access to its own state).
template <typename KvRunsFn, typename AttendFn>
class AttentionHookFns final : public AttentionHook {
 public:
  AttentionHookFns(KvRunsFn kv_runs, AttendFn attend)
      : kv_runs_(std::move(kv_runs)), attend_(std::move(attend)) {}
  absl::StatusOr<std::span<const KvRun>> KvRuns(int layer) override { return kv_runs_(layer); }
  absl::Status Attend(int layer, const Tensor& q, const Tensor& att) override {
    return attend_(layer, q, att);
  }

 private:
  KvRunsFn kv_runs_;
  AttendFn attend_;
};

// Activations of a Forward over n rows. x is the residual stream (read and
// updated in place); the others are scratch. hb, hb2 [r x hidden_dim] with
// r >= 1: the FFN runs in chunks of min(r, n) rows (bounds prefill memory).
struct BlockActivations {
  Tensor x, xb, xb2;  // [n x dim]
  Tensor q, att;      // [n x q_dim]
  Tensor hb, hb2;     // [r x hidden_dim]

  // Allocates them on `backend` for n = rows and r = ffn_rows.
  static absl::StatusOr<BlockActivations> Allocate(Backend& backend, const LlamaConfig& config,
                                                   int64_t rows, int64_t ffn_rows);
  // Views of the first n rows of x, xb, xb2, q and att; hb and hb2 as they
  // are (FFN chunk scratch of any row count).
  BlockActivations Rows(int64_t n) const;
};

class LlamaBlock {
 public:
  LlamaBlock() = default;
  // `backend`, `config` and `weights` must outlive the block.
  LlamaBlock(Backend* backend, const LlamaConfig* config, const DeviceWeights* weights)
      : backend_(backend), config_(config), weights_(weights) {}

  // x [tokens.size() x dim] = the token embeddings (tokens: host memory).
  absl::Status Embed(std::span<const int32_t> tokens, const Tensor& x) const;

  // Runs layer `layer` (0 <= layer < n_layers) over a.x's n rows; row i is at
  // position positions[i] (host memory, size n). See the file comment; hook
  // errors and batch op errors are returned (a.x is then unspecified).
  absl::Status Forward(int layer, std::span<const int32_t> positions, const BlockActivations& a,
                       AttentionHook& hook) const;

  // logits [n x vocab] of x [n x dim] after the final norm (normed [n x dim]
  // is scratch). Does not wait for the backend.
  absl::Status Logits(const Tensor& x, const Tensor& normed, const Tensor& logits) const;

  const LlamaConfig& config() const { return *config_; }
  const DeviceWeights& weights() const { return *weights_; }

 private:
  Backend* backend_ = nullptr;
  const LlamaConfig* config_ = nullptr;
  const DeviceWeights* weights_ = nullptr;
};

}  // namespace kvr::worker
