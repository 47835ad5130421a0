// RetrievalEngine: runs any number of sequences (EngineSequence) on one
// Backend and one set of weights, each with either full attention (the
// baseline, numerically = LlamaModel) or RetrievalAttention. Decode steps of
// different sequences interleave freely; StepBatch runs one step of several
// sequences as one batch (projections, FFN and classifier over all rows at
// once; attention and node calls per sequence, the node calls of all of them
// in flight together).
//
// Retrieval mode (DESIGN §1). The worker keeps a static pattern per layer:
// S sink tokens (positions 0 .. S-1) and the W most recent tokens (the
// current one included) in a [S + W x kv_dim] cache (sinks in rows 0 .. S-1,
// position p >= S in the ring slot S + (p - S) mod W). Every other token
// lives on the retrieval node. A decode step at position `pos`, per layer:
//   1. q, k, v of the token; the token leaving the window (pos - W, when
//      >= S) is read from its ring slot and Appended to the node (per kv
//      head) before the new k, v overwrite that slot;
//   2. when the node holds tokens, AttendAsync(all query heads of the layer)
//      starts, and the local partial attention over the static cache runs
//      meanwhile; the node's top-k partials are merged in by log-sum-exp.
// So the attended set is sinks ∪ node ∪ window = [0, pos], disjoint
// (checked every step; last_coverage() exposes it to tests).
//
// Prefill runs layer by layer over the whole prompt (full causal attention,
// chunked over queries). When the prompt is longer than S + W, after each
// layer the middle tokens [S, P - W) of every kv head are uploaded as
// placement chunks (sequence sharding) of AttentionOptions::chunk_tokens
// consecutive tokens each — chunk c holds [S + c·C, S + (c+1)·C) — each with
// its training data: every prefill query's exact top-train_k keys within the
// chunk (queries of all the kv head's query heads). Which node holds a chunk
// is the client's business (MultiNodeClient places each ShardKey by
// rendezvous hashing, so one (layer, kv head) spans several nodes once it
// has several chunks). In decode, tokens leaving the window are appended to
// the last chunk until it holds C tokens; the next one opens chunk c + 1 (a
// one-token UploadShard; later appends follow it), so chunks stay bounded
// as the sequence grows. The node attends top_k keys per query head in each
// chunk and merges the chunks' partials. The hand-off is pipelined
// (DESIGN §4: index build hides behind prefill): layer l's K/V/Q are staged
// on the host and its training top-k + UploadShard (which builds the index)
// run on the engine's hand-off threads while layers l+1.. compute; Prefill
// returns the logits without waiting, and the first decode step waits for
// layer l's uploads just before layer l needs the node. Staging buffers are
// a ring of EngineOptions::handoff_depth slots (bounded host memory); the
// hand-off itself is PrefillHandOff (prefill_handoff.h).
//
// Every layer, prefill or decode, full or retrieval, runs through the one
// LlamaBlock (gpu_worker/model/llama_block.h); the engine supplies only the
// attention part.
//
// Thread-safety: every RetrievalEngine method may be called from any thread,
// so threads may each drive their own sequences. Backend calls are
// serialized on an internal mutex (the Backend takes one caller at a time);
// a prefill holds it one layer at a time, not for the whole prompt: between
// two layers it lets in a decode step (StepBatch / Step) that was already
// waiting — so a decode step waits for at most one prefill layer — and runs
// the caller's PrefillLayerCallback without it. Prefills run one at a time
// (a second StartSequence / Prefill waits for the first: they share the
// prefill activations and the hand-off staging). The accessors of an
// EngineSequence must not race with a step of that sequence, except
// Cancel(), which any thread may call at any time. Destroy the engine only
// once every call has returned.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <future>
#include <memory>
#include <mutex>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "common/attention.h"
#include "gpu_worker/backend/backend.h"
#include "gpu_worker/engine/attention_options.h"
#include "gpu_worker/engine/cancel_token.h"
#include "gpu_worker/engine/prefill_handoff.h"
#include "gpu_worker/model/device_weights.h"
#include "gpu_worker/model/llama_block.h"
#include "gpu_worker/model/weights.h"
#include "retrieval_node/client/retrieval_client.h"

namespace kvr::worker {

struct EngineOptions {
  // Longest sequence (prompt + generated); 0 = config.seq_len.
  int64_t max_seq_len = 0;
  // Prefill query rows per attention / FFN chunk.
  int64_t max_batch_tokens = 64;
  // Threads running the prefill hand-off (training top-k + UploadShard, i.e.
  // the node's index build) while later layers compute. 0 = synchronous:
  // each layer's uploads finish before the next layer starts (the reference
  // path for tests).
  int handoff_threads = 1;
  // Layers whose host staging (K, V, Q of the prompt and training data) may
  // be in flight at once; a layer waits for the slot it reuses. 0 = n_layers.
  int handoff_depth = 0;
  // Nice value of the hand-off threads (0 .. 19; Linux). Index building is
  // background work: when prefill compute and hand-off share CPU cores (the
  // CPU backend on a busy host), prefill — the time to first token — wins.
  int handoff_nice = 10;
  // Prefill queries (of prompt_len x query heads per kv head) whose exact
  // top-train_k trains the graph of each (layer, kv head, chunk): a
  // stratified sample of at most this many (common/train_topk.h); 0 = every
  // query (exact O(T * N) per shard). At most kMaxTrainingQueries. The
  // worker's --max_train_queries.
  int64_t max_train_queries = 16384;
  // true (default): a decode step sends the nodes ONE AttendBatch per layer
  // for every sequence of the batch (a multi-node client splits it into one
  // per node) and ONE AppendBatch per layer for the tokens leaving the
  // windows. false: one Attend per sequence per layer and one Append per
  // (sequence, layer, kv head), the pre-batching path (decode_bench
  // --attend_batching=on,off compares them). Outputs are identical.
  bool attend_batching = true;
  // How the CPU path finds those queries' top-train_k (the worker's
  // --train_topk): kApprox (default) groups the queries and scans ~1/16 of
  // a chunk's keys per group (TrainingTopKOptions' approx knobs; exact scores,
  // ~10x less CPU per 128K-key head; graph recall at the calibrated beam
  // within 0.005 of exact-trained on topical, lowrank, positional and sink,
  // docs/benchmarks.md §6b), chunks under 4096 keys stay exact; kExact scans
  // every key. A backend TopK (CUDA) is always exact.
  TrainingTopKMode train_topk = TrainingTopKMode::kApprox;
};

// Which positions one decode step attended (retrieval mode). Sinks
// [0, sink_end), node [node_begin, node_end), window [window_begin,
// window_end); a correct step has sink_end == node_begin, node_end ==
// window_begin, window_end == pos + 1 (full mode: window = [0, pos + 1)).
struct StepCoverage {
  int64_t pos = -1;
  int64_t sink_end = 0;
  int64_t node_begin = 0, node_end = 0;
  int64_t window_begin = 0, window_end = 0;
  // Attended positions counted over the three parts (== pos + 1 when each
  // position is attended exactly once).
  int64_t attended() const {
    return sink_end + (node_end - node_begin) + (window_end - window_begin);
  }
};

struct EngineStats {
  int64_t prompt_tokens = 0;
  int64_t decode_steps = 0;
  int64_t offloaded_tokens = 0;  // tokens on the node now (per layer and kv head)
  int64_t node_chunks = 0;       // chunks holding them (per layer and kv head)
  // Summed over decode steps, per query head and layer on average:
  int64_t local_tokens = 0;       // attended on the worker (sinks + window)
  int64_t node_held_tokens = 0;   // held by the node
  double retrieved_tokens = 0.0;  // attended by the node (top-k)
  int64_t attend_calls = 0;
  // Prefill until its logits are ready (= time to first token, less sampling).
  double prefill_seconds = 0.0;
  // Prefill start until the last hand-off upload finished (the node's indexes
  // are built); 0 when nothing was offloaded.
  double handoff_seconds = 0.0;
  // Decode steps blocked on pending hand-off uploads.
  double handoff_wait_seconds = 0.0;
  // (layer, kv head, chunk) training top-k lists computed by the backend's
  // TopK op during prefill (a GPU backend); the rest ran ExactTopK on the
  // hand-off threads.
  int64_t backend_topk_shards = 0;
  double decode_seconds = 0.0;
  double node_wait_seconds = 0.0;  // blocked on the node after local attention
  // Decode time computing attention on the worker, summed over steps and
  // layers: the static-pattern partial (sinks + window) and the LSE merge of
  // the node's partials (full mode: the whole-cache attention). Measured on
  // the host around the backend calls, so on an asynchronous backend it
  // counts launch time plus any synchronisation those calls need.
  double local_attention_seconds = 0.0;
};

class RetrievalEngine;

// Called by a prefill after each of its layers (layers_done = 1 .. n_layers)
// on the prefilling thread, with the engine's mutex released: it may block
// (e.g. until another thread's decode step ran) and may call StepBatch /
// Step / EndSequence / Cancel on other sequences, but not StartSequence or
// Prefill (deadlock: one prefill at a time).
using PrefillLayerCallback = std::function<void(int layers_done, int n_layers)>;

// One sequence's state: attention options, the K/V kept on the worker (the
// static pattern in retrieval mode, the whole cache in full mode), the node
// sequence id (unique per sequence), position, logits of the last step,
// coverage and stats. Created by RetrievalEngine::StartSequence; must be
// destroyed before its engine (destruction ends it: pending uploads are
// awaited and its shards dropped from the node).
class EngineSequence {
 public:
  ~EngineSequence();
  EngineSequence(const EngineSequence&) = delete;
  EngineSequence& operator=(const EngineSequence&) = delete;

  // Node sequence id (unique per sequence; registered on the node only in
  // retrieval mode).
  uint64_t id() const { return id_; }
  // Tokens in the sequence (the next step's position).
  int64_t position() const { return position_; }
  // True between a successful prefill and the end (EndSequence, Cancel, an
  // error in a step, or destruction).
  bool active() const { return state_ == State::kActive; }
  bool cancelled() const { return state_ == State::kCancelled || cancel_.cancelled(); }
  const AttentionOptions& attention() const { return attention_; }
  const StepCoverage& last_coverage() const { return coverage_; }
  const EngineStats& stats() const { return stats_; }
  // Logits [vocab] of the last prefill / step.
  std::span<const float> logits() const { return logits_; }

  // Thread-safe, from any thread: the sequence stops at its next step (or
  // the next prefill layer), which returns Cancelled after dropping its
  // shards from the node. RetrievalEngine::Cancel also drops them at once.
  void Cancel() const { cancel_.Cancel(); }
  const CancelToken& cancel_token() const { return cancel_; }

 private:
  friend class RetrievalEngine;
  enum class State : uint8_t { kIdle, kActive, kEnded, kCancelled, kFailed };
  struct Cache {
    Tensor k, v;  // retrieval: [S + W x kv_dim] static pattern; full: [max_seq_len x kv_dim]
    // Retrieval mode: host copies of k and v (same rows), so a token leaving
    // the window goes to the node without a device round trip; row_on_host
    // says which rows are current. Rows arrive with the query download the
    // node needs anyway (one wait per layer for all of them).
    std::vector<float> k_host, v_host;
    std::vector<uint8_t> row_on_host;
  };

  explicit EngineSequence(RetrievalEngine* engine) : engine_(engine) {}
  // Cache row of position `pos` (retrieval mode: sinks, then the window ring).
  int64_t Slot(int64_t pos) const;
  bool HasPending() const;

  RetrievalEngine* engine_;  // null once the engine is gone
  CancelToken cancel_;
  State state_ = State::kIdle;
  AttentionOptions attention_;
  uint64_t id_ = 0;
  std::string capability_;  // presented with every node request for id_
  bool on_node_ = false;  // id_ registered on the node
  int64_t position_ = 0;
  int64_t node_end_ = 0;  // node holds [sinks, node_end_)
  // The last chunk of every (layer, kv head) on the node (-1: none yet) and
  // the tokens it holds (all layers and kv heads offload the same positions).
  int32_t last_chunk_ = -1;
  int64_t last_chunk_tokens_ = 0;
  int64_t cache_rows_ = 0;
  AttentionMode cache_mode_ = AttentionMode::kRetrieval;
  std::vector<Cache> caches_;  // per layer
  // Per layer: the hand-off uploads of that layer (invalid when none pending).
  std::vector<std::shared_future<absl::Status>> pending_;
  std::chrono::steady_clock::time_point prefill_start_;
  std::shared_ptr<std::atomic<int64_t>> handoff_done_ns_;  // latest upload finish
  StepCoverage coverage_;
  EngineStats stats_;
  std::vector<float> logits_;
};

class RetrievalEngine {
 public:
  // `backend` (and `client`, may be null: full mode only) must outlive the
  // engine.
  static absl::StatusOr<std::unique_ptr<RetrievalEngine>> Create(
      Backend* backend, std::shared_ptr<const LlamaWeights> weights,
      retrieval::RetrievalClient* client, const EngineOptions& options = {});
  ~RetrievalEngine();

  // ---- Many sequences ------------------------------------------------------
  // Starts a sequence: runs `tokens` at positions 0 .. n-1; its logits are
  // then in logits(). In retrieval mode the hand-off uploads may still be
  // running when this returns (see the file comment). `cancel` (optional)
  // is the sequence's token: cancelling it stops the sequence. `on_layer`
  // (optional) is called after each prefill layer (see PrefillLayerCallback);
  // decode steps of other sequences run between layers whether or not it is
  // given. The sequence's prefill_seconds include those interleaved steps.
  // InvalidArgument for an empty or too long prompt, bad options or tokens;
  // FailedPrecondition for retrieval mode without a client; Cancelled when
  // cancelled during prefill; node errors pass through.
  absl::StatusOr<std::unique_ptr<EngineSequence>> StartSequence(
      std::span<const int32_t> tokens, const AttentionOptions& options,
      const CancelToken& cancel = CancelToken(), const PrefillLayerCallback& on_layer = nullptr);

  // Forks `src` (active) into a new sequence at the same position with the
  // same attention options, logits, coverage and stats: n choices of one
  // prompt share one prefill (issue 19). The worker-side K/V (full mode:
  // rows [0, position); retrieval mode: sinks + window ring and its host
  // copies) is copied; in retrieval mode `src`'s pending hand-off uploads
  // are awaited, then the nodes fork its node sequence
  // (RetrievalClient::ForkSequence: sealed indexes shared, nothing
  // re-uploaded or rebuilt) under a new random id and capability. Steps of
  // either sequence afterwards are independent and give what they would
  // have given on `src` (bit-identical logits for the same tokens).
  // `src` must not step, end or be forked on another thread meanwhile.
  // `cancel` is the fork's token. FailedPrecondition when `src` is not
  // active; InvalidArgument for a foreign sequence; the client's errors
  // pass through (Unimplemented / FailedPrecondition: the client or a node
  // cannot fork; the caller may prefill the prompt again instead).
  absl::StatusOr<std::unique_ptr<EngineSequence>> ForkSequence(
      EngineSequence& src, const CancelToken& cancel = CancelToken());

  // Successful prefills (StartSequence / Prefill) and forks since the
  // engine was created. Thread-safe.
  int64_t prefills() const { return prefills_.load(std::memory_order_relaxed); }
  int64_t forks() const { return forks_.load(std::memory_order_relaxed); }

  // One decode step of `seq` (token at position seq.position()); returns its
  // logits (valid until its next step). FailedPrecondition when the sequence
  // is not active (never started, ended, failed); Cancelled when it was
  // cancelled (its shards are dropped first); OutOfRange when full. After any
  // other error the sequence has failed (its node state may be partial).
  absl::StatusOr<std::span<const float>> Step(EngineSequence& seq, int32_t token);

  // One decode step for each of `seqs` (distinct sequences of this engine)
  // with input tokens[i], as one batch; the logits of seqs[i] are then in
  // seqs[i]->logits(). Per-sequence outcomes (as for Step) go to
  // statuses[i]; a sequence's failure does not affect the others. Returns
  // InvalidArgument when the spans' sizes differ, a sequence appears twice or
  // belongs to another engine; a backend error in a batched op fails every
  // sequence in the batch and is returned. Results equal Step's bit for bit
  // on a backend whose matmul rows are independent (the CPU backend with its
  // own kernels; with OpenBLAS, batches of >= 16 sequences equal to float
  // rounding).
  absl::Status StepBatch(std::span<EngineSequence* const> seqs, std::span<const int32_t> tokens,
                         std::span<absl::Status> statuses);

  // Ends `seq`: waits for its pending uploads and drops it from the node.
  // No-op when it holds nothing.
  absl::Status EndSequence(EngineSequence& seq);
  // Cancels `seq` (its token too) and drops it from the node now.
  absl::Status Cancel(EngineSequence& seq);

  // ---- One sequence (the engine's own; kept for single-stream callers) -----
  // Starts the engine's own sequence (ending the previous one): see
  // StartSequence. The span stays valid until the next call.
  absl::StatusOr<std::span<const float>> Prefill(std::span<const int32_t> tokens,
                                                 const AttentionOptions& options,
                                                 const CancelToken& cancel = CancelToken());
  // Runs `token` at position position() of the engine's own sequence: see Step.
  absl::StatusOr<std::span<const float>> DecodeStep(int32_t token);
  // Ends the engine's own sequence (no-op when none).
  absl::Status EndSequence();

  const LlamaConfig& config() const { return weights_->config; }
  int64_t max_seq_len() const { return max_seq_len_; }
  // K/V rows per layer a sequence with `options` keeps on the worker:
  // max_seq_len() in full mode, min(sinks + window, max_seq_len()) else.
  int64_t CacheRows(const AttentionOptions& options) const;
  // Worker memory one sequence with `options` holds while it runs (its K/V
  // caches, host copies, logits, token history), in bytes, saturating at
  // INT64_MAX. The engine's shared buffers (prefill activations, hand-off
  // staging) are not per sequence and not counted. Thread-safe.
  int64_t SequenceBytes(const AttentionOptions& options) const;
  // The part of SequenceBytes(options) held in the backend's tensors (the
  // K/V caches): device memory on a device backend, host memory on the CPU
  // one. The rest is always host memory. Saturates likewise. Thread-safe.
  int64_t SequenceBackendBytes(const AttentionOptions& options) const;
  // The engine's own sequence:
  int64_t position() const { return own_->position(); }
  uint64_t sequence_id() const { return own_->id(); }
  const AttentionOptions& attention() const { return own_->attention(); }
  const StepCoverage& last_coverage() const { return own_->last_coverage(); }
  const EngineStats& stats() const { return own_->stats(); }
  EngineSequence& own_sequence() { return *own_; }

 private:
  friend class EngineSequence;
  // Per-sequence scratch of a batched step.
  struct StepSlot {
    Partials partials;
    retrieval::AttendStats attend_stats;
    std::unique_ptr<retrieval::StatusWaiter> waiter;
    // Batched step (EngineOptions::attend_batching): this slot's Attend was
    // an item of the layer's AttendBatch, whose outcome is batch_status.
    bool batched = false;
    absl::Status batch_status;
  };

  RetrievalEngine() = default;
  absl::Status Init(Backend* backend, std::shared_ptr<const LlamaWeights> weights,
                    retrieval::RetrievalClient* client, const EngineOptions& options);
  // Both hold prefill_mu_ and `lock` (on mu_), which they release between
  // prefill layers.
  absl::Status StartLocked(std::unique_lock<std::mutex>& lock, EngineSequence& seq,
                           std::span<const int32_t> tokens, const AttentionOptions& options,
                           const CancelToken& cancel, const PrefillLayerCallback& on_layer);
  absl::Status PrefillLocked(std::unique_lock<std::mutex>& lock, EngineSequence& seq,
                             std::span<const int32_t> tokens,
                             const PrefillLayerCallback& on_layer);
  // Between two prefill layers: releases `lock`, waits for the staging slot
  // the next layer uses (retrieval mode), runs `on_layer`, re-locks and lets
  // the decode steps that were waiting run first.
  void BetweenPrefillLayers(std::unique_lock<std::mutex>& lock, bool staging,
                            const PrefillLayerCallback& on_layer, int layers_done);
  absl::Status PrepareCaches(EngineSequence& seq);
  absl::Status EnsurePrefillCapacity(int64_t n);
  absl::Status EnsureBatchCapacity(int64_t n);
  // Retrieval-mode prefill, after layer `layer`'s attention: brings its K, V
  // (and Q) [prompt_len x ...] to the host, writes the sinks and window into
  // the static cache and starts the hand-off of the middle to the node.
  absl::Status HandOffLayer(EngineSequence& seq, int layer, const Tensor& q, const Tensor& k,
                            const Tensor& v, int64_t prompt_len);
  // Waits for `seq`'s pending uploads of `layer` (all layers when < 0).
  absl::Status WaitHandOff(EngineSequence& seq, int layer);
  // Ends `seq` (mu_ held). Its node registration is not dropped here: the
  // id joins drops_ and the caller runs FlushDrops() once it released mu_,
  // so a node that hangs never blocks the engine-wide lock.
  absl::Status EndLocked(EngineSequence& seq, EngineSequence::State state);
  // Drops every sequence in drops_ on the node, outside mu_ (which it takes
  // only to take the list). The first error. Call without mu_ held.
  absl::Status FlushDrops();
  // Checks that `seq` can step; ends it when cancelled.
  absl::Status CheckStep(EngineSequence& seq);
  absl::Status StepBatchLocked(std::span<EngineSequence* const> seqs,
                               std::span<const int32_t> tokens, std::span<absl::Status> statuses);

  // Lock order: prefill_mu_, then mu_. prefill_mu_ is held for a whole
  // prefill and guards what only prefills use, across the gaps between
  // layers: the prefill activations (prefill_act_, pk_, pv_,
  // prefill_capacity_), positions_ and handoff_'s staging. mu_ guards the
  // Backend (every call on it, prefill tensors included) and everything else.
  std::mutex prefill_mu_;
  std::mutex mu_;
  // Decode steps that wait for mu_, and steps run (under mu_): a prefill
  // resuming after a layer waits until the steps then waiting have run.
  std::atomic<int> steps_waiting_{0};
  std::atomic<int64_t> prefills_{0};
  std::atomic<int64_t> forks_{0};
  uint64_t steps_done_ = 0;
  std::condition_variable step_cv_;
  Backend* backend_ = nullptr;
  retrieval::RetrievalClient* client_ = nullptr;
  std::shared_ptr<const LlamaWeights> weights_;
  int64_t max_seq_len_ = 0;
  int64_t max_batch_ = 0;
  bool attend_batching_ = true;
  std::set<EngineSequence*> live_;
  // Sequence ids ended under mu_ whose node registration is not dropped yet
  // (FlushDrops).
  std::vector<std::pair<uint64_t, std::string>> drops_;  // (id, capability)
  std::unique_ptr<EngineSequence> own_;

  DeviceWeights device_weights_;
  LlamaBlock block_;  // over device_weights_
  // Batched decode activations, sized for batch_capacity_ rows: the block's,
  // the local partial (o = step_act_.att, m1_, l1_) and the node's (o2_ ..).
  int64_t batch_capacity_ = 0;
  BlockActivations step_act_;
  Tensor m1_, l1_, o2_, m2_, l2_, logits_;
  std::vector<float> logits_host_;  // [batch x vocab]
  std::vector<float> q_host_;       // [batch x q_dim]
  std::vector<float> k_row_host_, v_row_host_;  // kv_dim
  // A batched step's leaving rows fetched from the device ([batch x 2 x
  // kv_dim]: k then v), kept until the layer's AppendBatch is sent.
  std::vector<float> spill_rows_host_;
  std::vector<Backend::DownloadItem> downloads_;  // a layer's q + new k/v rows
  std::vector<StepSlot> step_slots_;
  std::vector<int32_t> step_positions_;
  std::vector<KvRun> step_kv_runs_;  // a layer's new k / v rows, one per sequence
  // Prefill activations, sized for prefill_capacity_ rows (the FFN's for
  // max_batch_), and the retrieval-mode K / V before the hand-off.
  int64_t prefill_capacity_ = 0;
  BlockActivations prefill_act_;
  Tensor pk_, pv_;
  std::vector<int32_t> positions_;
  // Declared last: destroyed first, running every queued upload.
  std::unique_ptr<PrefillHandOff> handoff_;
};

}  // namespace kvr::worker
