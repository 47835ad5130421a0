#include "gpu_worker/engine/retrieval_engine.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <limits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/train_topk.h"

namespace kvr::worker {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point since) {
  return std::chrono::duration<double>(Clock::now() - since).count();
}

}  // namespace

// ---- EngineSequence ----------------------------------------------------------

EngineSequence::~EngineSequence() {
  if (engine_ == nullptr) return;
  RetrievalEngine* engine = engine_;
  {
    std::lock_guard<std::mutex> lock(engine->mu_);
    engine->EndLocked(*this, State::kEnded).IgnoreError();
    engine->live_.erase(this);
  }
  engine->FlushDrops().IgnoreError();
}

int64_t EngineSequence::Slot(int64_t pos) const {
  if (attention_.mode == AttentionMode::kFull) return pos;
  const int64_t s = attention_.sinks;
  return pos < s ? pos : s + (pos - s) % attention_.window;
}

bool EngineSequence::HasPending() const {
  for (const auto& f : pending_) {
    if (f.valid()) return true;
  }
  return false;
}

// ---- RetrievalEngine -------------------------------------------------------

absl::StatusOr<std::unique_ptr<RetrievalEngine>> RetrievalEngine::Create(
    Backend* backend, std::shared_ptr<const LlamaWeights> weights,
    retrieval::RetrievalClient* client, const EngineOptions& options) {
  if (backend == nullptr || weights == nullptr) {
    return absl::InvalidArgumentError("RetrievalEngine: null backend or weights");
  }
  std::unique_ptr<RetrievalEngine> e(new RetrievalEngine);
  KVR_RETURN_IF_ERROR(e->Init(backend, std::move(weights), client, options));
  return e;
}

RetrievalEngine::~RetrievalEngine() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (EngineSequence* seq : live_) {
      EndLocked(*seq, EngineSequence::State::kEnded).IgnoreError();
      seq->engine_ = nullptr;
    }
    live_.clear();
  }
  FlushDrops().IgnoreError();
}

absl::Status RetrievalEngine::FlushDrops() {
  std::vector<std::pair<uint64_t, std::string>> ids;
  {
    std::lock_guard<std::mutex> lock(mu_);
    ids.swap(drops_);
  }
  absl::Status first;
  for (const auto& [id, capability] : ids) {
    absl::Status st = client_->DropSequence(id, capability);
    if (first.ok() && !st.ok()) first = std::move(st);
  }
  return first;
}

absl::Status RetrievalEngine::Init(Backend* backend, std::shared_ptr<const LlamaWeights> weights,
                                   retrieval::RetrievalClient* client,
                                   const EngineOptions& options) {
  KVR_RETURN_IF_ERROR(weights->Validate());
  backend_ = backend;
  client_ = client;
  weights_ = std::move(weights);
  const LlamaConfig& c = weights_->config;
  max_seq_len_ = options.max_seq_len > 0 ? options.max_seq_len : c.seq_len;
  attend_batching_ = options.attend_batching;
  if (max_seq_len_ > LlamaConfig::kMaxSeqLen) {
    return absl::InvalidArgumentError(absl::StrCat("max_seq_len ", max_seq_len_, " > ",
                                                   LlamaConfig::kMaxSeqLen));
  }
  if (options.max_batch_tokens <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_batch_tokens ", options.max_batch_tokens, " must be > 0"));
  }
  if (options.handoff_threads < 0 || options.handoff_threads > 256) {
    return absl::InvalidArgumentError(
        absl::StrCat("handoff_threads ", options.handoff_threads, " outside [0, 256]"));
  }
  if (options.handoff_depth < 0 || options.handoff_depth > 4096) {
    return absl::InvalidArgumentError(
        absl::StrCat("handoff_depth ", options.handoff_depth, " outside [0, 4096]"));
  }
  if (options.handoff_nice < 0 || options.handoff_nice > 19) {
    return absl::InvalidArgumentError(
        absl::StrCat("handoff_nice ", options.handoff_nice, " outside [0, 19]"));
  }
  if (options.max_train_queries < 0 ||
      static_cast<uint64_t>(options.max_train_queries) > kMaxTrainingQueries) {
    return absl::InvalidArgumentError(absl::StrCat("max_train_queries ",
                                                   options.max_train_queries, " outside [0, ",
                                                   kMaxTrainingQueries, "] (0 = every query)"));
  }
  if (options.train_topk != TrainingTopKMode::kExact &&
      options.train_topk != TrainingTopKMode::kApprox) {
    return absl::InvalidArgumentError(absl::StrCat(
        "train_topk ", static_cast<int>(options.train_topk), " is not exact or approx"));
  }
  max_batch_ = std::min(options.max_batch_tokens, max_seq_len_);

  KVR_ASSIGN_OR_RETURN(device_weights_, DeviceWeights::Import(backend_, *weights_));
  block_ = LlamaBlock(backend_, &weights_->config, &device_weights_);
  KVR_RETURN_IF_ERROR(EnsureBatchCapacity(1));
  k_row_host_.resize(static_cast<size_t>(c.kv_dim()));
  v_row_host_.resize(static_cast<size_t>(c.kv_dim()));

  const int depth = options.handoff_depth > 0 ? options.handoff_depth : c.n_layers;
  TrainingTopKOptions train_options;
  train_options.max_queries = static_cast<size_t>(options.max_train_queries);
  train_options.mode = options.train_topk;
  handoff_ = std::make_unique<PrefillHandOff>(options.handoff_threads, depth,
                                              options.handoff_nice, train_options);
  own_.reset(new EngineSequence(this));
  live_.insert(own_.get());
  return absl::OkStatus();
}

absl::Status RetrievalEngine::EnsureBatchCapacity(int64_t n) {
  if (n <= batch_capacity_) return absl::OkStatus();
  const LlamaConfig& c = weights_->config;
  auto rows = [&](int64_t cols) { return backend_->Allocate(DType::kF32, n, cols); };
  KVR_ASSIGN_OR_RETURN(step_act_, BlockActivations::Allocate(*backend_, c, n, n));
  KVR_ASSIGN_OR_RETURN(o2_, rows(c.q_dim()));
  KVR_ASSIGN_OR_RETURN(m1_, rows(c.n_heads));
  KVR_ASSIGN_OR_RETURN(l1_, rows(c.n_heads));
  KVR_ASSIGN_OR_RETURN(m2_, rows(c.n_heads));
  KVR_ASSIGN_OR_RETURN(l2_, rows(c.n_heads));
  KVR_ASSIGN_OR_RETURN(logits_, rows(c.vocab_size));
  logits_host_.resize(static_cast<size_t>(n * c.vocab_size));
  q_host_.resize(static_cast<size_t>(n * c.q_dim()));
  step_slots_.resize(static_cast<size_t>(n));
  for (StepSlot& slot : step_slots_) {
    if (slot.partials.m.empty()) {
      slot.partials = Partials(static_cast<size_t>(c.n_heads), static_cast<size_t>(c.head_dim));
    }
  }
  step_positions_.resize(static_cast<size_t>(n));
  step_kv_runs_.reserve(static_cast<size_t>(n));
  batch_capacity_ = n;
  return absl::OkStatus();
}

absl::Status RetrievalEngine::EnsurePrefillCapacity(int64_t n) {
  if (n <= prefill_capacity_) return absl::OkStatus();
  const LlamaConfig& c = weights_->config;
  KVR_ASSIGN_OR_RETURN(prefill_act_, BlockActivations::Allocate(*backend_, c, n, max_batch_));
  KVR_ASSIGN_OR_RETURN(pk_, backend_->Allocate(DType::kF32, n, c.kv_dim()));
  KVR_ASSIGN_OR_RETURN(pv_, backend_->Allocate(DType::kF32, n, c.kv_dim()));
  prefill_capacity_ = n;
  return absl::OkStatus();
}

int64_t RetrievalEngine::CacheRows(const AttentionOptions& options) const {
  // Positions stay below max_seq_len_, so a ring slot (Slot()) never reaches
  // past min(sinks + window, max_seq_len_): a longer window never wraps.
  if (options.mode == AttentionMode::kFull) return max_seq_len_;
  return std::min(int64_t{options.sinks} + options.window, max_seq_len_);
}

int64_t RetrievalEngine::SequenceBytes(const AttentionOptions& options) const {
  const LlamaConfig& c = weights_->config;
  const int64_t rows = CacheRows(options);
  // K and V on the backend; in retrieval mode also their host copies and the
  // per-row flags; then the logits and the request's token history.
  // Saturates at INT64_MAX (LlamaConfig's limits alone allow ~2^72).
  const int64_t copies = options.mode == AttentionMode::kRetrieval ? 2 : 1;
  const int64_t per_row = 2 * c.kv_dim() * 4 * copies + (copies - 1);
  int64_t bytes = 0;
  if (__builtin_mul_overflow(int64_t{c.n_layers} * rows, per_row, &bytes) ||
      __builtin_add_overflow(bytes, int64_t{c.vocab_size} * 4 + max_seq_len_ * 4, &bytes)) {
    return std::numeric_limits<int64_t>::max();
  }
  return bytes;
}

int64_t RetrievalEngine::SequenceBackendBytes(const AttentionOptions& options) const {
  const LlamaConfig& c = weights_->config;
  // K and V, f32, per layer: what PrepareCaches allocates on the backend.
  int64_t bytes = 0;
  if (__builtin_mul_overflow(int64_t{c.n_layers} * CacheRows(options), int64_t{2} * c.kv_dim() * 4,
                             &bytes)) {
    return std::numeric_limits<int64_t>::max();
  }
  return bytes;
}

absl::Status RetrievalEngine::PrepareCaches(EngineSequence& seq) {
  const AttentionMode mode = seq.attention_.mode;
  const int64_t rows = CacheRows(seq.attention_);
  const LlamaConfig& c = weights_->config;
  if (rows == seq.cache_rows_ && mode == seq.cache_mode_ &&
      seq.caches_.size() == static_cast<size_t>(c.n_layers)) {
    return absl::OkStatus();
  }
  seq.caches_.clear();
  seq.cache_rows_ = 0;
  seq.caches_.resize(static_cast<size_t>(c.n_layers));
  for (EngineSequence::Cache& cache : seq.caches_) {
    KVR_ASSIGN_OR_RETURN(cache.k, backend_->Allocate(DType::kF32, rows, c.kv_dim()));
    KVR_ASSIGN_OR_RETURN(cache.v, backend_->Allocate(DType::kF32, rows, c.kv_dim()));
    if (mode == AttentionMode::kRetrieval) {
      cache.k_host.assign(static_cast<size_t>(rows * c.kv_dim()), 0.0f);
      cache.v_host.assign(static_cast<size_t>(rows * c.kv_dim()), 0.0f);
      cache.row_on_host.assign(static_cast<size_t>(rows), 0);
    }
  }
  seq.cache_rows_ = rows;
  seq.cache_mode_ = mode;
  return absl::OkStatus();
}

absl::Status RetrievalEngine::EndLocked(EngineSequence& seq, EngineSequence::State state) {
  if (seq.state_ == EngineSequence::State::kActive || state != EngineSequence::State::kEnded) {
    seq.state_ = state;
  }
  // Uploads in flight read the engine's staging and write to the node.
  for (auto& f : seq.pending_) {
    if (f.valid()) f.wait();
    f = {};
  }
  if (!seq.on_node_) return absl::OkStatus();
  seq.on_node_ = false;
  drops_.emplace_back(seq.id_, seq.capability_);  // dropped by FlushDrops, outside mu_
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<EngineSequence>> RetrievalEngine::StartSequence(
    std::span<const int32_t> tokens, const AttentionOptions& options, const CancelToken& cancel,
    const PrefillLayerCallback& on_layer) {
  std::unique_ptr<EngineSequence> seq;
  absl::Status st;
  {
    std::lock_guard<std::mutex> prefill(prefill_mu_);
    if (options.mode == AttentionMode::kRetrieval) handoff_->WaitSlot();
    std::unique_lock<std::mutex> lock(mu_);
    seq.reset(new EngineSequence(this));
    live_.insert(seq.get());
    st = StartLocked(lock, *seq, tokens, options, cancel, on_layer);
  }
  // A failed prefill's registration (or a reused sequence's) is dropped here.
  FlushDrops().IgnoreError();
  if (!st.ok()) return st;  // `seq` ends itself outside the locks
  return seq;
}

absl::StatusOr<std::span<const float>> RetrievalEngine::Prefill(std::span<const int32_t> tokens,
                                                                const AttentionOptions& options,
                                                                const CancelToken& cancel) {
  absl::Status st;
  {
    std::lock_guard<std::mutex> prefill(prefill_mu_);
    if (options.mode == AttentionMode::kRetrieval) handoff_->WaitSlot();
    std::unique_lock<std::mutex> lock(mu_);
    st = StartLocked(lock, *own_, tokens, options, cancel, nullptr);
  }
  FlushDrops().IgnoreError();
  KVR_RETURN_IF_ERROR(st);
  return own_->logits();
}

void RetrievalEngine::BetweenPrefillLayers(std::unique_lock<std::mutex>& lock, bool staging,
                                           const PrefillLayerCallback& on_layer,
                                           int layers_done) {
  lock.unlock();
  // Decode steps may run from here on: the prefill's own state (activations,
  // staging, the new sequence) is out of their reach.
  if (staging) handoff_->WaitSlot();
  if (on_layer) on_layer(layers_done, weights_->config.n_layers);
  lock.lock();
  // std::mutex is not fair: without this, a prefill re-locking at once could
  // hold off a waiting decode step for many layers. Steps arriving later
  // wait for the next layer.
  const uint64_t target = steps_done_ + static_cast<uint64_t>(steps_waiting_.load());
  step_cv_.wait(lock, [&] { return steps_done_ >= target; });
}

absl::Status RetrievalEngine::StartLocked(std::unique_lock<std::mutex>& lock,
                                          EngineSequence& seq, std::span<const int32_t> tokens,
                                          const AttentionOptions& options,
                                          const CancelToken& cancel,
                                          const PrefillLayerCallback& on_layer) {
  KVR_RETURN_IF_ERROR(ValidateAttentionOptions(options, max_seq_len_));
  if (tokens.empty()) return absl::InvalidArgumentError("Prefill: empty prompt");
  if (static_cast<int64_t>(tokens.size()) > max_seq_len_) {
    return absl::InvalidArgumentError(absl::StrCat("Prefill: ", tokens.size(),
                                                   " tokens exceed max_seq_len ", max_seq_len_));
  }
  if (options.mode == AttentionMode::kRetrieval && client_ == nullptr) {
    return absl::FailedPreconditionError("Prefill: retrieval mode needs a RetrievalClient");
  }
  KVR_RETURN_IF_ERROR(EndLocked(seq, EngineSequence::State::kEnded));
  seq.state_ = EngineSequence::State::kIdle;
  seq.attention_ = options;
  seq.cancel_ = cancel;
  seq.stats_ = EngineStats{};
  seq.coverage_ = StepCoverage{};
  seq.position_ = 0;
  seq.stats_.prompt_tokens = static_cast<int64_t>(tokens.size());
  seq.prefill_start_ = Clock::now();
  seq.handoff_done_ns_ = std::make_shared<std::atomic<int64_t>>(0);
  const absl::Status st = PrefillLocked(lock, seq, tokens, on_layer);
  if (!st.ok()) {
    EndLocked(seq, absl::IsCancelled(st) ? EngineSequence::State::kCancelled
                                         : EngineSequence::State::kFailed)
        .IgnoreError();
    return st;
  }
  seq.position_ = static_cast<int64_t>(tokens.size());
  seq.state_ = EngineSequence::State::kActive;
  seq.stats_.prefill_seconds = Seconds(seq.prefill_start_);
  prefills_.fetch_add(1, std::memory_order_relaxed);
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<EngineSequence>> RetrievalEngine::ForkSequence(
    EngineSequence& src, const CancelToken& cancel) {
  std::vector<std::shared_future<absl::Status>> pending;
  uint64_t src_id = 0;
  std::string src_capability;
  bool on_node = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (src.engine_ != this) return absl::InvalidArgumentError("ForkSequence: foreign sequence");
    if (src.state_ != EngineSequence::State::kActive) {
      return absl::FailedPreconditionError(
          absl::StrCat("ForkSequence: sequence ", src.id_, " is not active"));
    }
    pending = src.pending_;
    src_id = src.id_;
    src_capability = src.capability_;
    on_node = src.on_node_;
  }
  // The node must hold every shard of the prefill before it can share them.
  // Waited without mu_: decode steps of other sequences go on.
  for (const std::shared_future<absl::Status>& f : pending) {
    if (f.valid()) KVR_RETURN_IF_ERROR(f.get());
  }
  retrieval::SequenceHandle handle;
  if (on_node) {
    // Ids are random; one already taken on a node (by chance) is drawn again.
    for (int attempt = 0;; ++attempt) {
      KVR_ASSIGN_OR_RETURN(handle, retrieval::NewSequenceHandle());
      const absl::Status st =
          client_->ForkSequence(src_id, src_capability, handle.id, handle.capability);
      if (st.ok()) break;
      if (!absl::IsAlreadyExists(st) || attempt == 15) return st;
    }
  } else {
    KVR_ASSIGN_OR_RETURN(handle, retrieval::NewSequenceHandle());
  }
  auto seq = std::unique_ptr<EngineSequence>(new EngineSequence(this));
  absl::Status st = [&]() -> absl::Status {
    std::lock_guard<std::mutex> lock(mu_);
    live_.insert(seq.get());
    seq->id_ = handle.id;
    seq->capability_ = std::move(handle.capability);
    seq->on_node_ = on_node;
    if (src.state_ != EngineSequence::State::kActive) {
      return absl::FailedPreconditionError(
          absl::StrCat("ForkSequence: sequence ", src_id, " ended during the fork"));
    }
    seq->attention_ = src.attention_;
    seq->cancel_ = cancel;
    seq->position_ = src.position_;
    seq->node_end_ = src.node_end_;
    seq->last_chunk_ = src.last_chunk_;
    seq->last_chunk_tokens_ = src.last_chunk_tokens_;
    seq->prefill_start_ = src.prefill_start_;
    seq->handoff_done_ns_ = std::make_shared<std::atomic<int64_t>>(
        src.handoff_done_ns_ ? src.handoff_done_ns_->load(std::memory_order_relaxed) : 0);
    seq->coverage_ = src.coverage_;
    seq->stats_ = src.stats_;
    seq->logits_ = src.logits_;
    seq->pending_.assign(src.pending_.size(), {});
    KVR_RETURN_IF_ERROR(PrepareCaches(*seq));
    // Full mode holds rows [0, position); retrieval mode a ring of
    // CacheRows whose every slot may be live.
    const int64_t rows = seq->attention_.mode == AttentionMode::kFull ? src.position_
                                                                       : seq->cache_rows_;
    const size_t kv_dim = static_cast<size_t>(weights_->config.kv_dim());
    std::vector<float> host(static_cast<size_t>(rows) * kv_dim);
    for (size_t l = 0; l < seq->caches_.size(); ++l) {
      const EngineSequence::Cache& from = src.caches_[l];
      EngineSequence::Cache& to = seq->caches_[l];
      if (rows > 0) {
        KVR_RETURN_IF_ERROR(backend_->DownloadF32(from.k.Rows(0, rows), host));
        KVR_RETURN_IF_ERROR(backend_->Upload(std::as_bytes(std::span<const float>(host)),
                                             to.k.Rows(0, rows)));
        KVR_RETURN_IF_ERROR(backend_->DownloadF32(from.v.Rows(0, rows), host));
        KVR_RETURN_IF_ERROR(backend_->Upload(std::as_bytes(std::span<const float>(host)),
                                             to.v.Rows(0, rows)));
      }
      to.k_host = from.k_host;
      to.v_host = from.v_host;
      to.row_on_host = from.row_on_host;
    }
    seq->state_ = EngineSequence::State::kActive;
    return absl::OkStatus();
  }();
  if (!st.ok()) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      EndLocked(*seq, EngineSequence::State::kFailed).IgnoreError();  // drops the node fork
    }
    FlushDrops().IgnoreError();
    return st;
  }
  forks_.fetch_add(1, std::memory_order_relaxed);
  return seq;
}

absl::Status RetrievalEngine::PrefillLocked(std::unique_lock<std::mutex>& lock,
                                            EngineSequence& seq, std::span<const int32_t> tokens,
                                            const PrefillLayerCallback& on_layer) {
  const LlamaConfig& c = weights_->config;
  Backend& b = *backend_;
  const int64_t n = static_cast<int64_t>(tokens.size());
  const bool full = seq.attention_.mode == AttentionMode::kFull;
  const int64_t s = seq.attention_.sinks, w = seq.attention_.window;
  KVR_RETURN_IF_ERROR(PrepareCaches(seq));
  for (EngineSequence::Cache& cache : seq.caches_) {
    std::fill(cache.row_on_host.begin(), cache.row_on_host.end(), 0);
  }
  KVR_RETURN_IF_ERROR(EnsurePrefillCapacity(n));
  seq.logits_.resize(static_cast<size_t>(c.vocab_size));
  seq.pending_.assign(static_cast<size_t>(c.n_layers), {});

  // A random id and capability (tenant isolation: another worker sharing
  // the nodes neither collides with nor can guess them).
  KVR_ASSIGN_OR_RETURN(retrieval::SequenceHandle handle, retrieval::NewSequenceHandle());
  seq.id_ = handle.id;
  seq.capability_ = std::move(handle.capability);
  seq.last_chunk_ = -1;
  seq.last_chunk_tokens_ = 0;
  if (!full) {
    retrieval::SequenceSpec spec;
    spec.n_layers = c.n_layers;
    spec.n_heads = c.n_heads;
    spec.n_kv_heads = c.n_kv_heads;
    spec.head_dim = c.head_dim;
    spec.value_dtype = seq.attention_.value_dtype;
    spec.index_type = seq.attention_.index;
    // Ids are random; one already taken on a node (by chance) is drawn again.
    for (int attempt = 0;; ++attempt) {
      spec.sequence_id = seq.id_;
      // Not under mu_ (a hung node must not stop other sequences' steps);
      // prefill_mu_ stays held and keeps this prefill's state to itself.
      lock.unlock();
      const absl::Status st = client_->CreateSequence(spec, seq.capability_);
      lock.lock();
      if (st.ok()) break;
      if (!absl::IsAlreadyExists(st) || attempt == 15) return st;
      KVR_ASSIGN_OR_RETURN(handle, retrieval::NewSequenceHandle());
      seq.id_ = handle.id;
    }
    seq.on_node_ = true;
    seq.node_end_ = s;
  }

  positions_.resize(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) positions_[i] = static_cast<int32_t>(i);
  const AttentionShape shape = c.attention_shape();
  const BlockActivations a = prefill_act_.Rows(n);
  const bool offload = !full && n > s + w;

  // Full mode computes K/V straight into the sequence's cache; retrieval
  // mode into pk_ / pv_, from where HandOffLayer distributes them.
  KvRun kv;
  auto attention = AttentionHookFns(
      [&](int l) -> absl::StatusOr<std::span<const KvRun>> {
        const EngineSequence::Cache& cache = seq.caches_[l];
        kv = {0, n, full ? cache.k.Rows(0, n) : pk_.Rows(0, n),
              full ? cache.v.Rows(0, n) : pv_.Rows(0, n), nullptr};
        return std::span<const KvRun>(&kv, 1);
      },
      [&](int l, const Tensor& q, const Tensor& att) -> absl::Status {
        // Full causal attention, in chunks of queries.
        for (int64_t begin = 0; begin < n; begin += max_batch_) {
          const int64_t rows = std::min(max_batch_, n - begin);
          KVR_RETURN_IF_ERROR(b.Attention(q.Rows(begin, rows), kv.k, kv.v, shape, begin,
                                          att.Rows(begin, rows)));
        }
        if (full) return absl::OkStatus();
        // Hand-off: sinks and window to the static cache, the middle to the node.
        return HandOffLayer(seq, l, q, kv.k, kv.v, n);
      });

  KVR_RETURN_IF_ERROR(block_.Embed(tokens, a.x));
  for (int l = 0; l < c.n_layers; ++l) {
    if (seq.cancel_.cancelled()) {
      return absl::CancelledError(absl::StrCat("sequence ", seq.id_, " cancelled in prefill"));
    }
    KVR_RETURN_IF_ERROR(block_.Forward(l, positions_, a, attention));
    // x (the residual stream) carries over to the next layer; nothing else.
    // (The last layer waits for no staging slot: uploads may outlast the prefill.)
    BetweenPrefillLayers(lock, /*staging=*/!full && l + 1 < c.n_layers, on_layer, l + 1);
  }
  if (seq.cancel_.cancelled()) {  // e.g. Cancel() during the last gap dropped the shards
    return absl::CancelledError(absl::StrCat("sequence ", seq.id_, " cancelled in prefill"));
  }
  if (offload) {
    seq.node_end_ = n - w;
    const int64_t mid = n - w - s, ct = seq.attention_.chunk_tokens;
    seq.last_chunk_ = static_cast<int32_t>((mid - 1) / ct);
    seq.last_chunk_tokens_ = mid - int64_t{seq.last_chunk_} * ct;
  }
  seq.stats_.offloaded_tokens = full ? 0 : seq.node_end_ - s;
  seq.stats_.node_chunks = seq.last_chunk_ + 1;
  const Tensor logits = logits_.Rows(0, 1);
  KVR_RETURN_IF_ERROR(block_.Logits(a.x.Rows(n - 1, 1), a.xb.Rows(0, 1), logits));
  return b.DownloadF32(logits, seq.logits_);
}

absl::Status RetrievalEngine::HandOffLayer(EngineSequence& seq, int layer, const Tensor& q,
                                           const Tensor& k, const Tensor& v,
                                           int64_t prompt_len) {
  const LlamaConfig& c = weights_->config;
  Backend& b = *backend_;
  const int64_t n = prompt_len, s = seq.attention_.sinks, w = seq.attention_.window;
  const bool offload = n > s + w;
  const size_t kv = static_cast<size_t>(c.kv_dim());
  EngineSequence::Cache& cache = seq.caches_[layer];
  HandOffStaging* staging = handoff_->NextSlot();
  // K and V (and Q for the training data) to the host in one wait.
  staging->k.resize(static_cast<size_t>(n) * kv);
  staging->v.resize(static_cast<size_t>(n) * kv);
  if (offload) staging->q.resize(static_cast<size_t>(n * c.q_dim()));
  downloads_.clear();
  downloads_.push_back({k, std::as_writable_bytes(std::span<float>(staging->k))});
  downloads_.push_back({v, std::as_writable_bytes(std::span<float>(staging->v))});
  if (offload) {
    downloads_.push_back({q, std::as_writable_bytes(std::span<float>(staging->q))});
  }
  KVR_RETURN_IF_ERROR(b.DownloadMany(downloads_));
  // Sinks and window into the static cache (and its host copy), a run of
  // consecutive slots per upload: at most the sinks and two pieces of the
  // window ring.
  const auto kept = [&](int64_t p) { return p < s || p >= n - w; };
  for (int64_t p = 0; p < n;) {
    if (!kept(p)) {
      ++p;
      continue;
    }
    const int64_t slot = seq.Slot(p);
    int64_t run = 1;
    while (p + run < n && kept(p + run) && seq.Slot(p + run) == slot + run) ++run;
    const size_t from = static_cast<size_t>(p) * kv, count = static_cast<size_t>(run) * kv;
    const Tensor k_rows = cache.k.Rows(slot, run), v_rows = cache.v.Rows(slot, run);
    KVR_RETURN_IF_ERROR(b.UploadF32({staging->k.data() + from, count}, k_rows));
    KVR_RETURN_IF_ERROR(b.UploadF32({staging->v.data() + from, count}, v_rows));
    std::copy_n(staging->k.data() + from, count, cache.k_host.data() + slot * kv);
    std::copy_n(staging->v.data() + from, count, cache.v_host.data() + slot * kv);
    std::fill_n(cache.row_on_host.begin() + slot, run, 1);
    p += run;
  }
  if (!offload) return absl::OkStatus();
  KVR_RETURN_IF_ERROR(PrefillHandOff::BackendTrainingTopK(b, c, seq.attention_, q, k, n,
                                                          staging,
                                                          &seq.stats_.backend_topk_shards));
  HandOffJob job;
  job.client = client_;
  job.config = std::shared_ptr<const LlamaConfig>(weights_, &weights_->config);
  job.attention = seq.attention_;
  job.sequence_id = seq.id_;
  job.capability = seq.capability_;
  job.layer = layer;
  job.prompt_len = n;
  job.cancel = seq.cancel_;
  job.done_ns = seq.handoff_done_ns_;
  job.start = seq.prefill_start_;
  seq.pending_[layer] = handoff_->Start(std::move(job), staging);
  // Synchronous mode: this layer's uploads are done; surface errors now.
  if (handoff_->synchronous()) KVR_RETURN_IF_ERROR(WaitHandOff(seq, layer));
  return absl::OkStatus();
}

absl::Status RetrievalEngine::WaitHandOff(EngineSequence& seq, int layer) {
  const int begin = layer < 0 ? 0 : layer;
  const int end = layer < 0 ? static_cast<int>(seq.pending_.size()) : layer + 1;
  for (int l = begin; l < end; ++l) {
    std::shared_future<absl::Status>& f = seq.pending_[l];
    if (!f.valid()) continue;
    const Clock::time_point start = Clock::now();
    const absl::Status st = f.get();
    f = {};
    seq.stats_.handoff_wait_seconds += Seconds(start);
    seq.stats_.handoff_seconds =
        static_cast<double>(seq.handoff_done_ns_->load(std::memory_order_relaxed)) * 1e-9;
    KVR_RETURN_IF_ERROR(st);
  }
  return absl::OkStatus();
}

absl::Status RetrievalEngine::EndSequence(EngineSequence& seq) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (seq.engine_ != this) return absl::InvalidArgumentError("EndSequence: foreign sequence");
    KVR_RETURN_IF_ERROR(EndLocked(seq, EngineSequence::State::kEnded));
  }
  return FlushDrops();
}

absl::Status RetrievalEngine::EndSequence() { return EndSequence(*own_); }

absl::Status RetrievalEngine::Cancel(EngineSequence& seq) {
  seq.Cancel();
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (seq.engine_ != this) return absl::InvalidArgumentError("Cancel: foreign sequence");
    KVR_RETURN_IF_ERROR(EndLocked(seq, EngineSequence::State::kCancelled));
  }
  return FlushDrops();
}

absl::Status RetrievalEngine::CheckStep(EngineSequence& seq) {
  using State = EngineSequence::State;
  if (seq.state_ == State::kActive && seq.cancel_.cancelled()) {
    KVR_RETURN_IF_ERROR(EndLocked(seq, State::kCancelled));
  }
  if (seq.state_ == State::kCancelled) {
    return absl::CancelledError(absl::StrCat("sequence ", seq.id_, " was cancelled"));
  }
  if (seq.state_ != State::kActive) {
    return absl::FailedPreconditionError("DecodeStep: no sequence (call Prefill)");
  }
  if (seq.position_ >= max_seq_len_) {
    return absl::OutOfRangeError(
        absl::StrCat("DecodeStep: sequence full at max_seq_len ", max_seq_len_));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::span<const float>> RetrievalEngine::DecodeStep(int32_t token) {
  return Step(*own_, token);
}

absl::StatusOr<std::span<const float>> RetrievalEngine::Step(EngineSequence& seq, int32_t token) {
  EngineSequence* seqs[1] = {&seq};
  absl::Status status;
  KVR_RETURN_IF_ERROR(StepBatch(seqs, std::span<const int32_t>(&token, 1),
                                std::span<absl::Status>(&status, 1)));
  KVR_RETURN_IF_ERROR(status);
  return seq.logits();
}

absl::Status RetrievalEngine::StepBatch(std::span<EngineSequence* const> seqs,
                                        std::span<const int32_t> tokens,
                                        std::span<absl::Status> statuses) {
  if (seqs.size() != tokens.size() || seqs.size() != statuses.size()) {
    return absl::InvalidArgumentError(absl::StrCat("StepBatch: ", seqs.size(), " sequences, ",
                                                   tokens.size(), " tokens, ", statuses.size(),
                                                   " statuses"));
  }
  steps_waiting_.fetch_add(1);
  std::unique_lock<std::mutex> lock(mu_);
  steps_waiting_.fetch_sub(1);
  const absl::Status st = [&] {
    for (size_t i = 0; i < seqs.size(); ++i) {
      if (seqs[i] == nullptr || seqs[i]->engine_ != this) {
        return absl::InvalidArgumentError(
            absl::StrCat("StepBatch: sequence ", i, " is null or belongs to another engine"));
      }
      for (size_t j = 0; j < i; ++j) {
        if (seqs[j] == seqs[i]) {
          return absl::InvalidArgumentError(
              absl::StrCat("StepBatch: sequence ", i, " repeats sequence ", j));
        }
      }
    }
    return StepBatchLocked(seqs, tokens, statuses);
  }();
  // Counted on every path: a prefill between layers may wait for this step.
  ++steps_done_;
  lock.unlock();
  step_cv_.notify_all();
  FlushDrops().IgnoreError();  // sequences that failed or were cancelled
  return st;
}

absl::Status RetrievalEngine::StepBatchLocked(std::span<EngineSequence* const> all,
                                              std::span<const int32_t> all_tokens,
                                              std::span<absl::Status> all_statuses) {
  const LlamaConfig& c = weights_->config;
  Backend& b = *backend_;
  const Clock::time_point start = Clock::now();
  // The sequences that can step, with their step geometry.
  struct Item {
    EngineSequence* seq;
    absl::Status* status;
    int32_t token;
    int64_t pos, slot, leaving, node_end, local_rows;
    bool full, evict, ask_node;
    bool open_chunk;  // the leaving token starts chunk last_chunk_ + 1
  };
  std::vector<Item> items;
  items.reserve(all.size());
  for (size_t i = 0; i < all.size(); ++i) {
    all_statuses[i] = CheckStep(*all[i]);
    if (!all_statuses[i].ok()) continue;
    EngineSequence& seq = *all[i];
    Item it{&seq, &all_statuses[i], all_tokens[i], seq.position_, seq.Slot(seq.position_),
            -1, 0, 0, seq.attention_.mode == AttentionMode::kFull, false, false, false};
    StepCoverage& cov = seq.coverage_;
    if (it.full) {
      it.local_rows = it.pos + 1;
      cov = StepCoverage{it.pos, 0, 0, 0, 0, it.pos + 1};
    } else {
      const int64_t s = seq.attention_.sinks, w = seq.attention_.window;
      // The token leaving the window this step (it shares the new token's slot).
      it.leaving = it.pos - w;
      it.evict = it.leaving >= s;
      if (it.evict) KVR_CHECK_MSG(it.leaving == seq.node_end_, "window eviction out of order");
      it.node_end = it.evict ? it.leaving + 1 : seq.node_end_;
      it.open_chunk = it.evict && seq.last_chunk_ >= 0 &&
                      seq.last_chunk_tokens_ >= seq.attention_.chunk_tokens;
      it.local_rows = std::min(it.pos + 1, seq.cache_rows_);
      cov.pos = it.pos;
      cov.sink_end = std::min(it.pos + 1, s);
      cov.node_begin = s;
      cov.node_end = std::max(s, it.node_end);
      // Until the sinks are full (a prompt shorter than them) every position
      // is a sink and the window is empty.
      cov.window_begin = std::min(std::max(s, it.node_end), it.pos + 1);
      cov.window_end = it.pos + 1;
      KVR_CHECK_MSG(cov.attended() == it.pos + 1 &&
                        it.local_rows ==
                            cov.sink_end + (cov.window_end - cov.window_begin),
                    "attention coverage: sinks + node + window != [0, pos]");
      it.ask_node = it.node_end > s;
    }
    items.push_back(it);
  }
  if (items.empty()) return absl::OkStatus();
  const int64_t n = static_cast<int64_t>(items.size());
  KVR_RETURN_IF_ERROR(EnsureBatchCapacity(n));
  // A backend failure in a batched op fails every sequence of the batch.
  auto fail_all = [&](absl::Status st) {
    for (Item& it : items) {
      if (it.status->ok()) *it.status = st;
      EndLocked(*it.seq, EngineSequence::State::kFailed).IgnoreError();
    }
    return st;
  };
#define KVR_BATCH_OP(expr)                                         \
  do {                                                             \
    if (absl::Status _st = (expr); !_st.ok()) return fail_all(_st); \
  } while (0)

  const AttentionShape shape = c.attention_shape();
  const size_t d = static_cast<size_t>(c.head_dim);
  const size_t qd = static_cast<size_t>(c.q_dim()), kv = static_cast<size_t>(c.kv_dim());
  std::vector<int32_t> tokens(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    tokens[i] = items[i].token;
    step_positions_[i] = static_cast<int32_t>(items[i].pos);
  }
  const std::span<const int32_t> positions(step_positions_.data(), static_cast<size_t>(n));
  const BlockActivations act = step_act_.Rows(n);
  const Tensor logits = logits_.Rows(0, n);
  // Per-sequence work; an error fails that sequence only.
  auto seq_op = [](Item& it, absl::Status st) {
    if (it.status->ok() && !st.ok()) *it.status = std::move(st);
    return it.status->ok();
  };
  // Window-leaving tokens go to the nodes with AppendAsync: every sequence's
  // and kv head's append of a layer is in flight at once (the node syncs them
  // as one group), and all are acknowledged before that layer's Attends.
  std::vector<std::pair<int64_t, std::unique_ptr<retrieval::StatusWaiter>>> appends;
  // Batched step: the layer's appends and Attends as one call each (item j
  // belongs to items[*_owner[j]]).
  const bool batching = attend_batching_;
  std::vector<retrieval::AppendBatchItem> append_batch;
  std::vector<int64_t> append_owner;
  std::vector<std::unique_ptr<retrieval::StatusWaiter>> append_waiters;
  std::vector<retrieval::AttendBatchItem> attend_batch;
  // Items per batch call: kvr_node's default --max_batch_items, so a large
  // batch (appends: sequences x kv heads) is sent as several calls.
  constexpr size_t kMaxItemsPerCall = 1024;
  std::vector<int64_t> attend_owner;
  if (batching) spill_rows_host_.resize(static_cast<size_t>(n) * 2 * kv);
  // A step that fails between a layer's appends and its attention still
  // waits for the append batch (it writes into append_batch) before leaving.
  struct WaitOnExit {
    std::vector<std::unique_ptr<retrieval::StatusWaiter>>* waiters;
    ~WaitOnExit() {
      for (auto& w : *waiters) w->Wait().IgnoreError();
    }
  } wait_appends{&append_waiters};
  auto attention = AttentionHookFns(
      // Each sequence's leaving token goes to the node, then its new k / v
      // row takes the ring slot.
      [&](int l) -> absl::StatusOr<std::span<const KvRun>> {
        appends.clear();
        step_kv_runs_.clear();
        for (int64_t i = 0; i < n; ++i) {
          Item& it = items[i];
          if (!it.status->ok()) continue;
          const EngineSequence::Cache& cache = it.seq->caches_[l];
          const Tensor k_row = cache.k.Rows(it.slot, 1), v_row = cache.v.Rows(it.slot, 1);
          if (it.evict) {
            // The leaving token's rows: the host copy when current, else (it was
            // computed while no query went to the node) from the device.
            const float* k_src = cache.k_host.data() + it.slot * kv;
            const float* v_src = cache.v_host.data() + it.slot * kv;
            if (!cache.row_on_host[it.slot]) {
              const Backend::DownloadItem rows[] = {
                  {k_row, std::as_writable_bytes(std::span<float>(k_row_host_))},
                  {v_row, std::as_writable_bytes(std::span<float>(v_row_host_))}};
              if (!seq_op(it, b.DownloadMany(rows))) continue;
              k_src = k_row_host_.data();
              v_src = v_row_host_.data();
              if (batching) {
                // The batch is sent after every sequence's rows are read.
                float* keep = spill_rows_host_.data() + static_cast<size_t>(i) * 2 * kv;
                std::copy_n(k_src, kv, keep);
                std::copy_n(v_src, kv, keep + kv);
                k_src = keep;
                v_src = keep + kv;
              }
            }
            for (int g = 0; g < c.n_kv_heads && it.status->ok(); ++g) {
              const ConstMatrixView key(k_src + g * d, 1, d);
              const ConstMatrixView value(v_src + g * d, 1, d);
              if (it.open_chunk) {
                // The last chunk is full: this token opens the next one.
                retrieval::ShardUpload up;
                up.key = {it.seq->id_, l, g, it.seq->last_chunk_ + 1};
                up.first_position = it.leaving;
                up.keys = key;
                up.values = value;
                up.capability = it.seq->capability_;
                seq_op(it, client_->UploadShard(up));
                continue;
              }
              retrieval::AppendRequest req;
              req.sequence_id = it.seq->id_;
              req.layer = l;
              req.kv_head = g;
              req.first_position = it.leaving;
              req.keys = key;
              req.values = value;
              req.capability = it.seq->capability_;
              if (batching) {
                append_batch.push_back({std::move(req), absl::OkStatus()});
                append_owner.push_back(i);
                continue;
              }
              auto waiter = std::make_unique<retrieval::StatusWaiter>();
              client_->AppendAsync(req, waiter->callback());  // copies key and value
              appends.emplace_back(i, std::move(waiter));
            }
            if (!it.status->ok()) continue;
          }
          step_kv_runs_.push_back({i, 1, k_row, v_row, it.status});
        }
        // Each call reads its rows before returning.
        for (size_t first = 0; first < append_batch.size(); first += kMaxItemsPerCall) {
          const size_t count = std::min(kMaxItemsPerCall, append_batch.size() - first);
          append_waiters.push_back(std::make_unique<retrieval::StatusWaiter>());
          client_->AppendBatchAsync(std::span(append_batch).subspan(first, count),
                                    append_waiters.back()->callback());
        }
        return std::span<const KvRun>(step_kv_runs_);
      },
      // The node's partials for the queries, merged with the local ones.
      [&](int l, const Tensor& q, const Tensor& o) -> absl::Status {
        for (auto& [i, waiter] : appends) seq_op(items[i], waiter->Wait());
        if (!append_waiters.empty()) {
          // A refused batch put its error in every item.
          for (auto& w : append_waiters) w->Wait().IgnoreError();
          append_waiters.clear();
          for (size_t j = 0; j < append_batch.size(); ++j) {
            seq_op(items[append_owner[j]], std::move(append_batch[j].status));
          }
          append_batch.clear();
          append_owner.clear();
        }

        // The queries for the nodes, and with them (the same wait) every
        // retrieval sequence's new k / v rows into its host copy.
        const bool ask_any = std::any_of(items.begin(), items.end(), [](const Item& it) {
          return it.ask_node && it.status->ok();
        });
        downloads_.clear();
        if (ask_any) {
          downloads_.push_back(
              {q, std::as_writable_bytes(std::span<float>(q_host_.data(), n * qd))});
        }
        for (Item& it : items) {
          if (it.full || !it.status->ok()) continue;
          EngineSequence::Cache& cache = it.seq->caches_[l];
          cache.row_on_host[it.slot] = ask_any;  // the device row is the new token's now
          if (!ask_any) continue;
          const size_t row = static_cast<size_t>(it.slot) * kv;
          downloads_.push_back({cache.k.Rows(it.slot, 1),
                                std::as_writable_bytes(std::span<float>(&cache.k_host[row], kv))});
          downloads_.push_back({cache.v.Rows(it.slot, 1),
                                std::as_writable_bytes(std::span<float>(&cache.v_host[row], kv))});
        }
        if (ask_any) KVR_RETURN_IF_ERROR(b.DownloadMany(downloads_));
        // Start every sequence's node call, then the local attention meanwhile.
        for (int64_t i = 0; i < n; ++i) {
          Item& it = items[i];
          if (!it.ask_node || !it.status->ok()) continue;
          StepSlot& slot = step_slots_[i];
          slot.waiter = std::make_unique<retrieval::StatusWaiter>();
          slot.attend_stats = {};
          retrieval::AttendRequest req;
          req.sequence_id = it.seq->id_;
          req.layer = l;
          req.queries =
              ConstMatrixView(q_host_.data() + i * qd, static_cast<size_t>(c.n_heads), d);
          req.k = it.seq->attention_.top_k;
          req.beam = it.seq->attention_.beam;
          req.estimate = it.seq->attention_.estimate;
          req.capability = it.seq->capability_;
          if (batching) {
            slot.waiter.reset();
            slot.batched = true;
            attend_batch.push_back({std::move(req), slot.partials.view(), &slot.attend_stats, {}});
            attend_owner.push_back(i);
            continue;
          }
          client_->AttendAsync(req, slot.partials.view(), &slot.attend_stats,
                               slot.waiter->callback());
        }
        std::vector<std::unique_ptr<retrieval::StatusWaiter>> attend_waiters;
        for (size_t first = 0; first < attend_batch.size(); first += kMaxItemsPerCall) {
          const size_t count = std::min(kMaxItemsPerCall, attend_batch.size() - first);
          attend_waiters.push_back(std::make_unique<retrieval::StatusWaiter>());
          client_->AttendBatchAsync(std::span(attend_batch).subspan(first, count),
                                    attend_waiters.back()->callback());
        }
        for (int64_t i = 0; i < n; ++i) {
          Item& it = items[i];
          if (!it.status->ok()) continue;
          const EngineSequence::Cache& cache = it.seq->caches_[l];
          const Clock::time_point local_start = Clock::now();
          if (it.full) {
            seq_op(it, b.Attention(q.Rows(i, 1), cache.k.Rows(0, it.pos + 1),
                                   cache.v.Rows(0, it.pos + 1), shape, it.pos, o.Rows(i, 1)));
          } else {
            // The static pattern (sinks + window, in slot order: no mask needed).
            seq_op(it, b.PartialAttention(q.Rows(i, 1), cache.k, cache.v, shape,
                                          /*first_pos=*/it.local_rows, 0, it.local_rows,
                                          o.Rows(i, 1), m1_.Rows(i, 1), l1_.Rows(i, 1)));
          }
          it.seq->stats_.local_attention_seconds += Seconds(local_start);
        }
        // Always wait: the node writes into the slots' partials and stats.
        double batch_wait = 0.0;
        if (!attend_waiters.empty()) {
          const Clock::time_point wait = Clock::now();
          // A refused batch failed every item of it.
          for (auto& w : attend_waiters) w->Wait().IgnoreError();
          batch_wait = Seconds(wait);
          for (size_t j = 0; j < attend_batch.size(); ++j) {
            step_slots_[attend_owner[j]].batch_status = std::move(attend_batch[j].status);
          }
          attend_batch.clear();
          attend_owner.clear();
        }
        for (int64_t i = 0; i < n; ++i) {
          Item& it = items[i];
          StepSlot& slot = step_slots_[i];
          if (slot.waiter == nullptr && !slot.batched) continue;
          EngineStats& stats = it.seq->stats_;
          absl::Status remote;
          if (slot.batched) {
            // Every sequence of the batch waited for the one call.
            slot.batched = false;
            remote = std::move(slot.batch_status);
            stats.node_wait_seconds += batch_wait;
          } else {
            const Clock::time_point wait = Clock::now();
            remote = slot.waiter->Wait();
            slot.waiter.reset();
            stats.node_wait_seconds += Seconds(wait);
          }
          if (!seq_op(it, remote)) continue;
          ++stats.attend_calls;
          stats.retrieved_tokens += static_cast<double>(slot.attend_stats.keys_attended) /
                                    (static_cast<double>(c.n_heads) * c.n_layers);
          const Clock::time_point merge_start = Clock::now();
          if (seq_op(it, b.UploadF32(slot.partials.o.data, o2_.Rows(i, 1))) &&
              seq_op(it, b.UploadF32(slot.partials.m, m2_.Rows(i, 1))) &&
              seq_op(it, b.UploadF32(slot.partials.l, l2_.Rows(i, 1)))) {
            seq_op(it, b.MergeAttention(o.Rows(i, 1), m1_.Rows(i, 1), l1_.Rows(i, 1),
                                        o2_.Rows(i, 1), m2_.Rows(i, 1), l2_.Rows(i, 1),
                                        c.head_dim));
          }
          stats.local_attention_seconds += Seconds(merge_start);
        }
        return absl::OkStatus();
      });

  KVR_BATCH_OP(block_.Embed(tokens, act.x));
  for (int l = 0; l < c.n_layers; ++l) {
    for (Item& it : items) {
      // This layer's prefill uploads must be on the node before Append / Attend.
      if (it.status->ok() && !it.full) seq_op(it, WaitHandOff(*it.seq, l));
    }
    KVR_BATCH_OP(block_.Forward(l, positions, act, attention));
  }
  KVR_BATCH_OP(block_.Logits(act.x, act.xb, logits));
  const size_t vocab = static_cast<size_t>(c.vocab_size);
  KVR_BATCH_OP(b.DownloadF32(logits, std::span<float>(logits_host_.data(), n * vocab)));
#undef KVR_BATCH_OP
  const double seconds = Seconds(start);
  for (int64_t i = 0; i < n; ++i) {
    Item& it = items[i];
    EngineSequence& seq = *it.seq;
    if (!it.status->ok()) {
      // Some layers may have appended to the node: the sequence cannot go on.
      EndLocked(seq, EngineSequence::State::kFailed).IgnoreError();
      continue;
    }
    std::copy_n(logits_host_.data() + i * vocab, vocab, seq.logits_.begin());
    EngineStats& stats = seq.stats_;
    if (it.full) {
      stats.local_tokens += it.pos + 1;
    } else {
      seq.node_end_ = it.node_end;
      if (it.open_chunk) {
        ++seq.last_chunk_;
        seq.last_chunk_tokens_ = 1;
      } else if (it.evict) {
        seq.last_chunk_ = std::max(seq.last_chunk_, 0);  // Append creates chunk 0
        ++seq.last_chunk_tokens_;
      }
      stats.offloaded_tokens = seq.node_end_ - seq.attention_.sinks;
      stats.node_chunks = seq.last_chunk_ + 1;
      stats.local_tokens += it.local_rows;
      stats.node_held_tokens += stats.offloaded_tokens;
    }
    ++seq.position_;
    ++stats.decode_steps;
    stats.decode_seconds += seconds;
  }
  return absl::OkStatus();
}

}  // namespace kvr::worker
