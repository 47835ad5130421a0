#include "retrieval_node/core/node_core.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <shared_mutex>

#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "absl/strings/escaping.h"
#include "retrieval_node/core/node_state.h"
#include "retrieval_node/core/sequence_access.h"
#include "retrieval_node/index/attend.h"
#include "retrieval_node/index/flat_index.h"
#include "retrieval_node/index/flat_sq8_index.h"
#include "retrieval_node/index/pca_sq8_index.h"

namespace kvr::retrieval {

namespace {

absl::Status CheckRange(int64_t value, int64_t limit, absl::string_view field) {
  if (value < 0 || value >= limit) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, " ", value, " outside [0, ", limit, ")"));
  }
  return absl::OkStatus();
}

// Rows x head_dim, with `rows` rows when rows >= 0.
absl::Status CheckMatrix(ConstMatrixView m, const SequenceSpec& spec, int64_t rows,
                         absl::string_view field, absl::string_view where) {
  if (m.cols() != static_cast<size_t>(spec.head_dim)) {
    return absl::InvalidArgumentError(absl::StrCat(field, " dim ", m.cols(), " != head_dim ",
                                                   spec.head_dim, " for ", where));
  }
  if (rows >= 0 && m.rows() != static_cast<size_t>(rows)) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, " rows ", m.rows(), " != ", rows, " for ", where));
  }
  if (m.rows() > 0 && m.data() == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(field, " has no data for ", where));
  }
  return absl::OkStatus();
}

// Lowers the calling thread's CPU priority to nice 19 (once per thread;
// Linux threads have their own nice value). Best effort: deferred index
// builds then take only the CPU that prefill and Attends leave.
void LowerThreadPriority() {
  thread_local bool lowered = false;
  if (lowered) return;
  lowered = true;
  (void)setpriority(PRIO_PROCESS, static_cast<id_t>(syscall(SYS_gettid)), 19);
}

// A copy of `m` (row by row: views may be strided).
Matrix CopyMatrix(ConstMatrixView m) {
  Matrix out(m.rows(), m.cols());
  for (size_t i = 0; i < m.rows(); ++i) std::copy_n(m.row(i), m.cols(), out.row(i));
  return out;
}

// Rows [first, first + rows) of `values`' element storage.
std::span<const uint8_t> RawRows(const ValueMatrix& values, size_t first, size_t rows) {
  const size_t row_bytes = values.cols() * DTypeSize(values.dtype());
  return values.raw_bytes().subspan(first * row_bytes, rows * row_bytes);
}

}  // namespace

namespace internal {

absl::Status CheckPositionRange(int64_t first_position, size_t rows, absl::string_view where) {
  if (first_position < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("first_position ", first_position, " < 0 for ", where));
  }
  if (rows > 0 && static_cast<uint64_t>(rows - 1) >
                      static_cast<uint64_t>(kMaxPosition - first_position)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "first_position ", first_position, " + ", rows, " rows overflows: the last position ",
        "must be <= ", kMaxPosition, " for ", where));
  }
  return absl::OkStatus();
}

}  // namespace internal

namespace {

size_t Sqrt(size_t n) { return static_cast<size_t>(std::sqrt(static_cast<double>(n))); }

// Rows [0, n) of `values` as fp32 into `out` (n x cols).
Matrix ToFloat(const ValueMatrix& values) {
  Matrix out(values.rows(), values.cols());
  for (size_t i = 0; i < values.rows(); ++i) values.RowToFloat(i, out.row(i));
  return out;
}

}  // namespace

namespace internal {

absl::Status CheckHead(const SequenceSpec& spec, int32_t layer, int32_t kv_head) {
  KVR_RETURN_IF_ERROR(CheckRange(layer, spec.n_layers, "layer"));
  return CheckRange(kv_head, spec.n_kv_heads, "kv_head");
}

absl::Status ValidateSpec(const SequenceSpec& spec) {
  constexpr int32_t kMaxLayers = 1 << 12, kMaxHeads = 1 << 12;
  if (spec.n_layers < 1 || spec.n_layers > kMaxLayers) {
    return absl::InvalidArgumentError(
        absl::StrCat("n_layers ", spec.n_layers, " outside [1, ", kMaxLayers, "]"));
  }
  if (spec.n_kv_heads < 1 || spec.n_kv_heads > kMaxHeads) {
    return absl::InvalidArgumentError(
        absl::StrCat("n_kv_heads ", spec.n_kv_heads, " outside [1, ", kMaxHeads, "]"));
  }
  if (spec.n_heads < 1 || spec.n_heads > kMaxHeads || spec.n_heads % spec.n_kv_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat("n_heads ", spec.n_heads,
                                                   " must be in [1, ", kMaxHeads,
                                                   "] and a multiple of n_kv_heads ",
                                                   spec.n_kv_heads));
  }
  const int64_t heads = int64_t{spec.n_layers} * spec.n_kv_heads;
  if (heads > kMaxHeadsPerSequence) {
    return absl::InvalidArgumentError(absl::StrCat("n_layers ", spec.n_layers, " x n_kv_heads ",
                                                   spec.n_kv_heads, " = ", heads,
                                                   " heads > ", kMaxHeadsPerSequence));
  }
  if (spec.head_dim < 1 || static_cast<size_t>(spec.head_dim) > index::kMaxDim) {
    return absl::InvalidArgumentError(
        absl::StrCat("head_dim ", spec.head_dim, " outside [1, ", index::kMaxDim, "]"));
  }
  KVR_RETURN_IF_ERROR(DTypeFromTag(static_cast<uint32_t>(spec.value_dtype)).status());
  if (spec.index_type != IndexType::kGraph && spec.index_type != IndexType::kFlat &&
      spec.index_type != IndexType::kIvf && spec.index_type != IndexType::kAuto &&
      spec.index_type != IndexType::kFlatSq8 && spec.index_type != IndexType::kIvfSq8 &&
      spec.index_type != IndexType::kPcaSq8) {
    return absl::InvalidArgumentError(
        absl::StrCat("index_type ", static_cast<int>(spec.index_type), " unknown"));
  }
  if (spec.index_type == IndexType::kPcaSq8 &&
      static_cast<size_t>(spec.head_dim) > index::kMaxPcaDim) {
    return absl::InvalidArgumentError(absl::StrCat("index_type pca_sq8 needs head_dim <= ",
                                                   index::kMaxPcaDim, ", got ", spec.head_dim));
  }
  return absl::OkStatus();
}

index::CalibrationOptions CalibrationForSpec(const SequenceSpec& spec,
                                             const index::CalibrationOptions& base) {
  index::CalibrationOptions o = base;
  const int32_t group = spec.n_kv_heads > 0 ? spec.n_heads / spec.n_kv_heads : 1;
  o.queries_per_search =
      std::clamp<size_t>(static_cast<size_t>(std::max(group, 1)), 1, index::kMaxHoldoutQueries);
  return o;
}

}  // namespace internal

using internal::CheckHead;
using internal::CheckPositionRange;
using internal::ValidateSpec;

NodeCore::NodeCore(const NodeCoreOptions& options) : options_(options) {
  if (options_.threads > 0) {
    pool_ = std::make_unique<ThreadPool>(options_.threads);
    seal_pool_ = std::make_unique<ThreadPool>(1);
    if (options_.attend_threads > 0) {
      batch_pool_ = std::make_unique<ThreadPool>(options_.attend_threads);
    }
    if (options_.search_threads > 1) {
      search_pool_ = std::make_unique<ThreadPool>(options_.search_threads - 1);
    }
  }
  if (options_.recalibrate_every > 0) recal_pool_ = std::make_unique<ThreadPool>(1);
  if (options_.background_summaries && options_.threads > 0) {
    summary_pool_ = std::make_unique<ThreadPool>(1);
  }
  if (options_.defer_index_build && options_.index_build_threads > 0) {
    build_pool_ = std::make_unique<ThreadPool>(options_.index_build_threads);
  }
  if (options_.lease_seconds > 0) lease_thread_ = std::thread([this] { LeaseLoop(); });
}

NodeCore::~NodeCore() {
  if (lease_thread_.joinable()) {
    {
      std::lock_guard<std::mutex> lock(lease_mu_);
      lease_stop_ = true;
    }
    lease_cv_.notify_all();
    lease_thread_.join();
  }
  stopping_.store(true);  // queued deferred builds are discarded
  build_pool_.reset();    // a running one finishes first (it uses pool_)
  batch_pool_.reset();  // pending batch items finish first
  seal_pool_.reset();  // seal builds may use pool_
  pool_.reset();  // joins workers: pending Attends finish before shards go away
  search_pool_.reset();  // after pool_ and batch_pool_: their Attends schedule onto it
  recal_pool_.reset();  // after pool_: Attends schedule recalibrations
  summary_pool_.reset();  // after pool_: Attends queue summary builds
  // Seals never installed return their reservations while memory_used_ lives.
  for (auto& [id, seq] : sequences_) {
    for (auto& h : seq->heads) h->sealing.reset();
  }
}

void NodeCore::LeaseLoop() {
  const auto period = std::chrono::duration_cast<std::chrono::steady_clock::duration>(
      std::chrono::duration<double>(std::min(options_.lease_seconds / 4, 1.0)));
  std::unique_lock<std::mutex> lock(lease_mu_);
  while (!lease_cv_.wait_for(lock, period, [this] { return lease_stop_; })) {
    lock.unlock();
    ExpireLeases();
    lock.lock();
  }
}

absl::StatusOr<int64_t> NodeCore::RenewLeases(std::string_view lease_owner) {
  KVR_RETURN_IF_ERROR(CheckLeaseOwner(lease_owner, /*allow_empty=*/false));
  std::lock_guard<std::mutex> lock(mu_);
  int64_t held = 0;
  for (const auto& [id, seq] : sequences_) {
    if (seq->owner.lease_owner == lease_owner) ++held;
  }
  if (held > 0) lease_renewed_[std::string(lease_owner)] = std::chrono::steady_clock::now();
  return held;
}

int64_t NodeCore::ExpireLeases() {
  if (options_.lease_seconds <= 0) return 0;
  const auto now = std::chrono::steady_clock::now();
  const auto lease = std::chrono::duration_cast<std::chrono::steady_clock::duration>(
      std::chrono::duration<double>(options_.lease_seconds));
  std::vector<std::pair<uint64_t, std::string>> expired;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& [id, seq] : sequences_) {
      const std::string& owner = seq->owner.lease_owner;
      if (owner.empty()) continue;
      // No entry: recovery is installing it (Recover starts its lease last).
      auto it = lease_renewed_.find(owner);
      if (it != lease_renewed_.end() && now - it->second > lease) expired.emplace_back(id, owner);
    }
    for (const auto& [id, owner] : expired) {
      auto it = lease_renewed_.find(owner);
      if (it != lease_renewed_.end() && now - it->second > lease) lease_renewed_.erase(it);
    }
  }
  int64_t dropped = 0;
  for (const auto& [id, owner] : expired) {
    const absl::Status st = Drop(id, nullptr);
    if (absl::IsNotFound(st)) continue;  // dropped meanwhile
    ++dropped;
    std::fprintf(stderr,
                 "kvr_node: lease of sequence %llu (owner %s) expired after %g s: dropped%s%s\n",
                 static_cast<unsigned long long>(id), absl::BytesToHexString(owner).c_str(),
                 options_.lease_seconds, st.ok() ? "" : " from memory; ",
                 st.ok() ? "" : st.ToString().c_str());
  }
  leases_expired_.fetch_add(dropped, std::memory_order_relaxed);
  return dropped;
}

absl::Status NodeCore::CheckAccess(const Sequence& seq, std::string_view capability,
                                   absl::string_view op) {
  if (absl::Status st = CheckCapability(capability); !st.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(op, ": ", st.message()));
  }
  const std::string& want = seq.owner.capability_sha256;
  const bool match = want.empty() ? capability.empty()
                                  : !capability.empty() &&
                                        ConstantTimeEquals(Sha256(capability), want);
  if (!match) {
    return absl::PermissionDeniedError(absl::StrCat(
        op, ": capability does not match sequence ", seq.spec.sequence_id));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<NodeCore::Sequence>> NodeCore::FindFor(
    uint64_t sequence_id, std::string_view capability, absl::string_view op) {
  std::shared_ptr<Sequence> seq = Find(sequence_id);
  if (seq == nullptr) {
    return absl::NotFoundError(absl::StrCat(op, ": unknown sequence ", sequence_id));
  }
  KVR_RETURN_IF_ERROR(CheckAccess(*seq, capability, op));
  return seq;
}

absl::StatusOr<std::unique_ptr<NodeCore>> NodeCore::Create(const NodeCoreOptions& options) {
  if (options.tail_capacity < 1 || options.tail_capacity > (size_t{1} << 24)) {
    return absl::InvalidArgumentError(
        absl::StrCat("tail_capacity ", options.tail_capacity, " outside [1, 2^24]"));
  }
  if (options.train_k < 1 || options.train_k > index::kMaxSearchK) {
    return absl::InvalidArgumentError(
        absl::StrCat("train_k ", options.train_k, " outside [1, ", index::kMaxSearchK, "]"));
  }
  if (options.upload_memory_bytes < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("upload_memory_bytes ", options.upload_memory_bytes, " < 0"));
  }
  if (options.memory_budget_bytes < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("memory_budget_bytes ", options.memory_budget_bytes, " < 0"));
  }
  if (options.decode_train_queries > kMaxDecodeTrainQueries) {
    return absl::InvalidArgumentError(absl::StrCat("decode_train_queries ",
                                                   options.decode_train_queries, " > ",
                                                   kMaxDecodeTrainQueries));
  }
  if (options.attend_threads > 256) {
    return absl::InvalidArgumentError(
        absl::StrCat("attend_threads ", options.attend_threads, " > 256"));
  }
  if (options.index_build_threads > 256) {
    return absl::InvalidArgumentError(
        absl::StrCat("index_build_threads ", options.index_build_threads, " > 256"));
  }
  if (options.search_threads > 256) {
    return absl::InvalidArgumentError(
        absl::StrCat("search_threads ", options.search_threads, " > 256"));
  }
  if (options.max_batch_items < 1 || options.max_batch_items > kMaxBatchItemsLimit) {
    return absl::InvalidArgumentError(absl::StrCat(
        "max_batch_items ", options.max_batch_items, " outside [1, ", kMaxBatchItemsLimit, "]"));
  }
  if (options.recalibrate_every > kMaxRecalibrateEvery) {
    return absl::InvalidArgumentError(absl::StrCat("recalibrate_every ",
                                                   options.recalibrate_every, " > ",
                                                   kMaxRecalibrateEvery));
  }
  KVR_RETURN_IF_ERROR(index::ValidateCalibrationOptions(options.calibration));
  if (options.threads > 256) {
    return absl::InvalidArgumentError(absl::StrCat("threads ", options.threads, " > 256"));
  }
  if (!std::isfinite(options.lease_seconds) || options.lease_seconds < 0 ||
      options.lease_seconds > 1e9) {
    return absl::InvalidArgumentError(
        absl::StrCat("lease_seconds ", options.lease_seconds, " outside [0, 1e9]"));
  }
  if (options.estimate_clusters_per_chunk < index::kMinEstimateClusters ||
      options.estimate_clusters_per_chunk > index::kMaxEstimateClusters) {
    return absl::InvalidArgumentError(absl::StrCat(
        "estimate_clusters_per_chunk ", options.estimate_clusters_per_chunk, " outside [",
        index::kMinEstimateClusters, ", ", index::kMaxEstimateClusters, "]"));
  }
  KVR_RETURN_IF_ERROR(index::ValidateExactZone(
      {options.exact_zone_keys_fraction, options.exact_zone_mass_fraction}));
  KVR_RETURN_IF_ERROR(index::ValidateGraphOptions(options.graph));
  return std::unique_ptr<NodeCore>(new NodeCore(options));
}

std::shared_ptr<NodeCore::Sequence> NodeCore::Find(uint64_t sequence_id) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = sequences_.find(sequence_id);
  return it == sequences_.end() ? nullptr : it->second;
}

std::shared_ptr<NodeCore::Sequence> NodeCore::NewSequence(const SequenceSpec& spec) {
  auto seq = std::make_shared<Sequence>();
  seq->spec = spec;
  const size_t heads = static_cast<size_t>(spec.n_layers) * spec.n_kv_heads;
  seq->heads.reserve(heads);
  for (size_t i = 0; i < heads; ++i) {
    auto h = std::make_unique<HeadState>();
    h->tail_values = ValueMatrix(spec.value_dtype, static_cast<size_t>(spec.head_dim));
    seq->heads.push_back(std::move(h));
  }
  return seq;
}

absl::Status NodeCore::CreateSequence(const SequenceSpec& spec, const SequenceAccess& access) {
  KVR_RETURN_IF_ERROR(ValidateSpec(spec));
  KVR_RETURN_IF_ERROR(CheckCapability(access.capability));
  KVR_RETURN_IF_ERROR(CheckLeaseOwner(access.lease_owner, /*allow_empty=*/true));
  std::shared_ptr<Sequence> seq = NewSequence(spec);
  seq->owner.capability_sha256 = access.capability.empty() ? "" : Sha256(access.capability);
  seq->owner.principal = access.principal;
  seq->owner.lease_owner = access.lease_owner;
  const auto exists = [&] {
    return absl::AlreadyExistsError(absl::StrCat("sequence ", spec.sequence_id, " exists"));
  };
  std::unique_lock<std::mutex> lifecycle(lifecycle_mu_, std::defer_lock);
  if (options_.persistence != nullptr) {
    lifecycle.lock();  // no other Create / Drop until the spec is durable and visible
    KVR_RETURN_IF_ERROR(PersistenceError());
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (sequences_.contains(spec.sequence_id)) return exists();
      if (auto q = quarantined_.find(spec.sequence_id); q != quarantined_.end()) {
        return absl::FailedPreconditionError(absl::StrCat(
            "sequence ", spec.sequence_id, " is quarantined (recovery: ", q->second,
            "); DropSequence it to delete its stored records first"));
      }
    }
    const absl::Status st = options_.persistence->PutSequence(spec, seq->owner);
    if (!st.ok()) {
      return FailPersistence(st, absl::StrCat("CreateSequence ", spec.sequence_id));
    }
  }
  std::lock_guard<std::mutex> lock(mu_);
  if (!sequences_.emplace(spec.sequence_id, std::move(seq)).second) return exists();
  if (!access.lease_owner.empty()) {
    lease_renewed_[access.lease_owner] = std::chrono::steady_clock::now();
  }
  return absl::OkStatus();
}

absl::Status NodeCore::PersistenceError() {
  if (!persistence_failed_.load(std::memory_order_acquire)) return absl::OkStatus();
  std::lock_guard<std::mutex> lock(persistence_error_mu_);
  return persistence_error_;
}

absl::Status NodeCore::FailPersistence(const absl::Status& cause, absl::string_view where) {
  const absl::Status status = absl::UnavailableError(absl::StrCat(
      "persistence failed in ", where, ": ", cause.ToString(),
      "; the node accepts no more writes (restart it to recover from its data dir)"));
  std::lock_guard<std::mutex> lock(persistence_error_mu_);
  if (persistence_error_.ok()) persistence_error_ = status;
  persistence_failed_.store(true, std::memory_order_release);
  return status;
}

absl::Status NodeCore::Persist(const HeadWrite& write, absl::string_view where) {
  if (options_.persistence == nullptr) return absl::OkStatus();
  const absl::Status st = options_.persistence->CommitHead(write);
  if (!st.ok()) return FailPersistence(st, where);
  return absl::OkStatus();
}

int64_t NodeCore::HeadBytes(const HeadState& head) {
  int64_t bytes = 0;
  for (const Chunk& c : head.chunks) {
    if (c.index != nullptr) bytes += static_cast<int64_t>(c.index->MemoryBytes());
    bytes += static_cast<int64_t>(c.values.MemoryBytes() + c.positions.capacity() * sizeof(int64_t));
  }
  if (head.tail != nullptr) {
    bytes += static_cast<int64_t>(head.tail->MemoryBytes() + head.tail_values.MemoryBytes() +
                                  head.tail_positions.capacity() * sizeof(int64_t));
  }
  return bytes;
}

int64_t NodeCore::EstimateBytes(const SequenceSpec& spec, size_t n) const {
  const int64_t d = spec.head_dim;
  int64_t per_key = d * int64_t(sizeof(float)) + d * int64_t(DTypeSize(spec.value_dtype)) +
                    int64_t(sizeof(int64_t));
  if (spec.index_type == IndexType::kGraph || spec.index_type == IndexType::kAuto) {
    per_key += int64_t(options_.graph.degree + 1) * int64_t(sizeof(uint32_t));
  }
  if (spec.index_type == IndexType::kFlatSq8 || spec.index_type == IndexType::kIvfSq8 ||
      spec.index_type == IndexType::kPcaSq8 || spec.index_type == IndexType::kAuto) {
    per_key += d;  // one SQ8 code byte per dimension (pca_sq8: per kept direction, <= d)
  }
  return per_key * static_cast<int64_t>(n);
}

absl::Status NodeCore::ReserveMemory(int64_t bytes, absl::string_view where) {
  const int64_t budget = options_.memory_budget_bytes;
  if (budget <= 0) {
    memory_used_.fetch_add(bytes, std::memory_order_relaxed);
    return absl::OkStatus();
  }
  int64_t used = memory_used_.load(std::memory_order_relaxed);
  do {
    if (used + bytes > budget) {
      return absl::ResourceExhaustedError(absl::StrCat(
          where, " needs ~", bytes, " bytes but memory_budget_bytes ", budget, " has ",
          std::max<int64_t>(0, budget - used), " left (", used, " in use)"));
    }
  } while (!memory_used_.compare_exchange_weak(used, used + bytes, std::memory_order_relaxed));
  return absl::OkStatus();
}

void NodeCore::SettleMemory(HeadState* head, int64_t reserved) {
  const int64_t now = HeadBytes(*head);
  memory_used_.fetch_add(now - head->accounted_bytes - reserved, std::memory_order_relaxed);
  head->accounted_bytes = now;
}

absl::Status NodeCore::CheckUploadAdmission(uint64_t sequence_id, size_t n_keys,
                                            std::string_view capability) {
  KVR_ASSIGN_OR_RETURN(std::shared_ptr<Sequence> seq,
                       FindFor(sequence_id, capability, "UploadShard"));
  const int64_t budget = options_.memory_budget_bytes;
  const int64_t need = EstimateBytes(seq->spec, n_keys);
  const int64_t used = MemoryUsedBytes();
  if (budget > 0 && used + need > budget) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "UploadShard of ", n_keys, " keys to sequence ", sequence_id, " needs ~", need,
        " bytes but memory_budget_bytes ", budget, " has ", std::max<int64_t>(0, budget - used),
        " left (", used, " in use)"));
  }
  return absl::OkStatus();
}

absl::StatusOr<NodeCore::UploadAdmission> NodeCore::ReserveUpload(uint64_t sequence_id,
                                                                   size_t n_keys,
                                                                   int64_t working_bytes,
                                                                   std::string_view capability) {
  if (working_bytes < 0) {
    return absl::InvalidArgumentError(absl::StrCat("working_bytes ", working_bytes, " < 0"));
  }
  KVR_ASSIGN_OR_RETURN(std::shared_ptr<Sequence> seq,
                       FindFor(sequence_id, capability, "UploadShard"));
  const std::string what =
      absl::StrCat("UploadShard of ", n_keys, " keys to sequence ", sequence_id);
  const int64_t shard_bytes = EstimateBytes(seq->spec, n_keys);
  UploadAdmission admission;
  KVR_RETURN_IF_ERROR(ReserveMemory(shard_bytes, what));
  admission.shard = MemoryReservation(&memory_used_, shard_bytes);
  const int64_t limit = options_.upload_memory_bytes;
  int64_t used = upload_memory_used_.load(std::memory_order_relaxed);
  do {
    if (limit > 0 && used + working_bytes > limit) {
      return absl::ResourceExhaustedError(absl::StrCat(
          what, " needs ~", working_bytes, " bytes of upload working memory but ",
          "upload_memory_bytes ", limit, " has ", std::max<int64_t>(0, limit - used),
          " left (", used, " held by uploads in flight)"));
    }
  } while (!upload_memory_used_.compare_exchange_weak(used, used + working_bytes,
                                                      std::memory_order_relaxed));
  admission.working = MemoryReservation(&upload_memory_used_, working_bytes);
  return admission;
}

absl::StatusOr<std::unique_ptr<index::KeyIndex>> NodeCore::BuildIndex(
    IndexType type, ConstMatrixView keys, std::span<const int64_t> train_topk, size_t topk_width,
    ConstMatrixView train_queries, int train_k, const index::Holdout& holdout,
    size_t queries_per_search) {
  return BuildIndexOn(pool_.get(), type, keys, train_topk, topk_width, train_queries, train_k,
                      holdout, queries_per_search);
}

absl::StatusOr<std::unique_ptr<index::KeyIndex>> NodeCore::BuildIndexOn(
    ThreadPool* pool, IndexType type, ConstMatrixView keys, std::span<const int64_t> train_topk,
    size_t topk_width, ConstMatrixView train_queries, int train_k,
    const index::Holdout& holdout, size_t queries_per_search) {
  const size_t n = keys.rows();
  if (type == IndexType::kAuto && (!holdout.empty() || n < index::kAutoMinKeys) &&
      n >= options_.min_index_keys) {
    // Self-calibration picks the kind (index/calibrate.h; flat below kAutoMinKeys).
    index::CalibratedBuildOptions o;
    o.calibration = options_.calibration;
    o.calibration.queries_per_search = queries_per_search;
    o.graph = options_.graph;
    o.ivf = options_.ivf;
    o.pca_candidate = true;
    KVR_ASSIGN_OR_RETURN(std::unique_ptr<index::CalibratedIndex> chosen,
                         index::BuildCalibrated(type, keys, train_topk, topk_width, holdout, o,
                                                pool));
    return std::unique_ptr<index::KeyIndex>(std::move(chosen));
  }
  if (type == IndexType::kAuto) type = IndexType::kGraph;  // no held-back queries: the default
  if (type != IndexType::kFlat && !holdout.empty() && n >= options_.min_index_keys) {
    // Build as below, then calibrate the search effort on the held-back queries.
    KVR_ASSIGN_OR_RETURN(std::unique_ptr<index::KeyIndex> built,
                         BuildIndexOn(pool, type, keys, train_topk, topk_width, train_queries,
                                      train_k));
    KVR_ASSIGN_OR_RETURN(index::CalibrationResult chosen,
                         index::CalibrateEffort(*built, holdout, options_.calibration,
                                                pool));
    KVR_ASSIGN_OR_RETURN(std::unique_ptr<index::CalibratedIndex> calibrated,
                         index::CalibratedIndex::Create(std::move(built), chosen));
    return std::unique_ptr<index::KeyIndex>(std::move(calibrated));
  }
  if (type == IndexType::kFlatSq8 && n >= options_.min_index_keys) {
    KVR_ASSIGN_OR_RETURN(std::unique_ptr<index::FlatSq8Index> flat,
                         index::FlatSq8Index::Create(keys.cols(), options_.ivf.rerank_factor));
    KVR_RETURN_IF_ERROR(flat->Add(keys));
    return std::unique_ptr<index::KeyIndex>(std::move(flat));
  }
  if (type == IndexType::kPcaSq8 && n >= options_.min_index_keys) {
    KVR_ASSIGN_OR_RETURN(std::unique_ptr<index::PcaSq8Index> pca,
                         index::PcaSq8Index::Create(keys.cols()));
    KVR_RETURN_IF_ERROR(pca->Add(keys));
    return std::unique_ptr<index::KeyIndex>(std::move(pca));
  }
  if (type == IndexType::kFlat || n < options_.min_index_keys) {
    KVR_ASSIGN_OR_RETURN(std::unique_ptr<index::FlatIndex> flat, index::FlatIndex::Create(keys.cols()));
    flat->Reserve(n);
    KVR_RETURN_IF_ERROR(flat->Add(keys));
    return std::unique_ptr<index::KeyIndex>(std::move(flat));
  }
  if (index::IsIvfKind(type)) {
    index::IvfOptions o = options_.ivf;
    if (type == IndexType::kIvfSq8) o.sq8 = true;
    o.nlist = std::clamp<size_t>(Sqrt(n), 1, o.nlist);
    KVR_ASSIGN_OR_RETURN(std::unique_ptr<index::IvfIndex> ivf,
                         index::IvfIndex::Build(keys, o, pool));
    return std::unique_ptr<index::KeyIndex>(std::move(ivf));
  }
  std::unique_ptr<index::AttentionGraphIndex> graph;
  if (!train_topk.empty()) {
    KVR_ASSIGN_OR_RETURN(graph, index::AttentionGraphIndex::Build(keys, train_topk, topk_width,
                                                                  options_.graph, pool));
  } else {
    const ConstMatrixView queries = train_queries.rows() > 0 ? train_queries : keys;
    const int k = static_cast<int>(std::min<size_t>(static_cast<size_t>(train_k), n));
    KVR_ASSIGN_OR_RETURN(graph, index::AttentionGraphIndex::BuildFromQueries(
                                    keys, queries, k, options_.graph, pool));
  }
  return std::unique_ptr<index::KeyIndex>(std::move(graph));
}

absl::Status NodeCore::UploadShard(const ShardUpload& upload) {
  const ShardKey& key = upload.key;
  KVR_ASSIGN_OR_RETURN(std::shared_ptr<Sequence> seq,
                       FindFor(key.sequence_id, upload.capability, "UploadShard"));
  std::unique_lock<std::shared_mutex> lock(seq->mu);
  if (seq->dropped) {
    return absl::NotFoundError(absl::StrCat("UploadShard: unknown sequence ", key.sequence_id));
  }
  KVR_RETURN_IF_ERROR(PersistenceError());
  const SequenceSpec& spec = seq->spec;
  const std::string where = absl::StrCat("shard ", key.DebugString());
  KVR_RETURN_IF_ERROR(CheckHead(spec, key.layer, key.kv_head));
  // The tail folds into the last chunk below; when that chunk's deferred
  // build is not in yet, wait for it with the lock released (Attends go on).
  for (;;) {
    const HeadState& h = seq->head(key.layer, key.kv_head);
    if (h.chunks.empty() || h.chunks.back().pending == nullptr || h.tail == nullptr ||
        h.tail->size() == 0) {
      break;
    }
    const std::shared_ptr<BuildJob> job = h.chunks.back().pending;
    lock.unlock();
    WaitBuild(job);
    lock.lock();
    if (seq->dropped) {
      return absl::NotFoundError(absl::StrCat("UploadShard: unknown sequence ", key.sequence_id));
    }
    KVR_RETURN_IF_ERROR(PersistenceError());
    HeadState& again = seq->head(key.layer, key.kv_head);
    if (!again.chunks.empty() && again.chunks.back().pending == job) {
      again.chunks.back().pending.reset();  // finished without installing: stays flat
    }
  }
  if (key.chunk < 0) {
    return absl::InvalidArgumentError(absl::StrCat("chunk ", key.chunk, " < 0 for ", where));
  }
  const size_t n = upload.keys.rows();
  if (n == 0) return absl::InvalidArgumentError(absl::StrCat("no keys for ", where));
  if (n > index::kMaxKeys) {
    return absl::InvalidArgumentError(
        absl::StrCat("keys rows ", n, " > ", index::kMaxKeys, " for ", where));
  }
  KVR_RETURN_IF_ERROR(CheckMatrix(upload.keys, spec, -1, "keys", where));
  KVR_RETURN_IF_ERROR(CheckMatrix(upload.values, spec, static_cast<int64_t>(n), "values", where));
  HeadState& head = seq->head(key.layer, key.kv_head);
  if (!head.chunks.empty() && key.chunk <= head.chunks.back().chunk) {
    return absl::AlreadyExistsError(absl::StrCat(where, ": chunk ", key.chunk,
                                                 " is not after the last chunk ",
                                                 head.chunks.back().chunk));
  }
  KVR_RETURN_IF_ERROR(CheckPositionRange(upload.first_position, n, where));
  if (upload.first_position <= head.last_position) {
    return absl::InvalidArgumentError(absl::StrCat(
        "first_position ", upload.first_position, " must be > ", head.last_position,
        " (the last position held) for ", where));
  }
  if (!upload.train_topk.empty()) {
    const size_t w = upload.train_topk_width;
    if (w == 0 || upload.train_topk.size() % w != 0) {
      return absl::InvalidArgumentError(absl::StrCat("train_topk size ", upload.train_topk.size(),
                                                     " is not a multiple of train_topk_width ",
                                                     w, " for ", where));
    }
    for (int64_t id : upload.train_topk) {
      if (id < -1 || id >= static_cast<int64_t>(n)) {
        return absl::InvalidArgumentError(
            absl::StrCat("train_topk id ", id, " outside [-1, ", n, ") for ", where));
      }
    }
  }
  const index::Holdout holdout{upload.holdout_queries, upload.holdout_topk,
                               upload.holdout_topk_width};
  if (absl::Status s = index::ValidateHoldout(holdout, n, static_cast<size_t>(spec.head_dim));
      !s.ok()) {
    return absl::Status(s.code(), absl::StrCat(s.message(), " for ", where));
  }
  if (upload.train_queries.rows() > 0) {
    KVR_RETURN_IF_ERROR(CheckMatrix(upload.train_queries, spec, -1, "train_queries", where));
    if (upload.train_k < 1 || upload.train_k > index::kMaxSearchK) {
      return absl::InvalidArgumentError(absl::StrCat("train_k ", upload.train_k, " outside [1, ",
                                                     index::kMaxSearchK, "] for ", where));
    }
  }
  const int64_t reserved = EstimateBytes(spec, n);
  KVR_RETURN_IF_ERROR(ReserveMemory(reserved, absl::StrCat("UploadShard ", where)));
  // Only real builds are deferred (a flat or small chunk's index is its keys).
  const bool defer = options_.defer_index_build && spec.index_type != IndexType::kFlat &&
                     n >= options_.min_index_keys &&
                     !(spec.index_type == IndexType::kAuto && n < index::kAutoMinKeys);
  // With persistence, `write` describes every change made to `head`;
  // `diverged` marks a failure that left a change it does not describe.
  HeadWrite write;
  HeadWrite* const w = options_.persistence != nullptr ? &write : nullptr;
  bool diverged = false;
  const absl::Status status = [&]() -> absl::Status {
    // The tail belongs to the current last chunk: fold it in first.
    if (head.tail != nullptr && head.tail->size() > 0) {
      diverged = true;
      KVR_RETURN_IF_ERROR(Seal(*seq, &head, w));
      diverged = false;
    }

    Chunk chunk;
    chunk.chunk = key.chunk;
    if (defer) {
      // Served exactly through a flat index until the real one is built.
      KVR_ASSIGN_OR_RETURN(std::unique_ptr<index::FlatIndex> flat,
                           index::FlatIndex::Create(upload.keys.cols()));
      flat->Reserve(n);
      KVR_RETURN_IF_ERROR(flat->Add(upload.keys));
      chunk.index = std::move(flat);
      // What the real index adds beyond the flat one stays reserved (the
      // budget is charged at upload as when building synchronously).
      SequenceSpec flat_spec = spec;
      flat_spec.index_type = IndexType::kFlat;
      const int64_t index_bytes = std::max<int64_t>(0, reserved - EstimateBytes(flat_spec, n));
      if (!QueueBuild(seq, upload, index_bytes, &chunk)) chunk.index.reset();
    }
    if (chunk.index == nullptr) {
      KVR_ASSIGN_OR_RETURN(chunk.index,
                           BuildIndex(spec.index_type, upload.keys, upload.train_topk,
                                      upload.train_topk_width, upload.train_queries,
                                      upload.train_k, holdout,
                                      internal::CalibrationForSpec(spec, options_.calibration)
                                          .queries_per_search));
    }
    chunk.values = ValueMatrix::FromFloat(spec.value_dtype, upload.values);
    chunk.positions.resize(n);
    for (size_t i = 0; i < n; ++i) chunk.positions[i] = upload.first_position + int64_t(i);
    head.chunks.push_back(std::move(chunk));
    head.last_position = upload.first_position + (static_cast<int64_t>(n) - 1);
    if (w != nullptr) {
      diverged = true;
      const Chunk& c = head.chunks.back();
      ChunkWrite cw;
      cw.chunk = c.chunk;
      cw.rows = static_cast<int64_t>(n);
      KVR_RETURN_IF_ERROR(c.index->Serialize(&cw.index_blob));
      cw.segment = ValueSegment{0, static_cast<int64_t>(n), c.values.raw_bytes(), c.positions};
      w->chunks.push_back(std::move(cw));
      diverged = false;
    }
    return absl::OkStatus();
  }();
  SettleMemory(&head, reserved);
  if (status.ok()) shard_uploads_.fetch_add(1, std::memory_order_relaxed);
  if (status.ok() && options_.estimate && summary_pool_ != nullptr &&
      head.chunks.back().index->size() > 1) {
    // Clustered now, on the summary thread, so the first Attend finds it.
    const Chunk& c = head.chunks.back();
    std::lock_guard<std::mutex> slock(c.estimate->mu);
    QueueSummaryLocked(seq, key.layer, key.kv_head, c);
  }
  if (w != nullptr) {
    if (diverged) return FailPersistence(status, absl::StrCat("UploadShard ", where));
    if (!write.chunks.empty()) {
      write.sequence_id = key.sequence_id;
      write.layer = key.layer;
      write.kv_head = key.kv_head;
      write.head_dim = spec.head_dim;
      write.value_dtype = spec.value_dtype;
      write.last_position = head.last_position;
      write.tail_rows = head.tail != nullptr ? static_cast<int64_t>(head.tail->size()) : 0;
      KVR_RETURN_IF_ERROR(Persist(write, absl::StrCat("UploadShard ", where)));
    }
  }
  return status;
}

absl::Status NodeCore::Append(const AppendRequest& request) {
  StatusWaiter waiter;
  AppendAsync(request, waiter.callback());
  return waiter.Wait();
}

void NodeCore::AppendAsync(const AppendRequest& request, StatusCallback done) {
  bool handed_off = false;
  absl::Status status = ApplyAppend(request, done, &handed_off);
  if (!handed_off) done(std::move(status));
}

absl::Status NodeCore::ApplyAppend(const AppendRequest& request, StatusCallback& done,
                                   bool* handed_off) {
  KVR_ASSIGN_OR_RETURN(std::shared_ptr<Sequence> seq,
                       FindFor(request.sequence_id, request.capability, "Append"));
  std::unique_lock<std::shared_mutex> lock(seq->mu);
  if (seq->dropped) {
    return absl::NotFoundError(absl::StrCat("Append: unknown sequence ", request.sequence_id));
  }
  KVR_RETURN_IF_ERROR(PersistenceError());
  const SequenceSpec& spec = seq->spec;
  const std::string where = absl::StrCat("append to (seq ", request.sequence_id, ", layer ",
                                         request.layer, ", kv head ", request.kv_head, ")");
  KVR_RETURN_IF_ERROR(CheckHead(spec, request.layer, request.kv_head));
  const size_t n = request.keys.rows();
  KVR_RETURN_IF_ERROR(CheckMatrix(request.keys, spec, -1, "keys", where));
  KVR_RETURN_IF_ERROR(CheckMatrix(request.values, spec, static_cast<int64_t>(n), "values", where));
  if (n == 0) return absl::OkStatus();
  // A seal this append must install whose build is not done: wait for it
  // with the lock released (Attends of the sequence go on), then look again
  // (SyncShards may have replaced the head, DropSequence dropped it).
  while (std::shared_ptr<SealJob> job = SealToAwait(seq->head(request.layer, request.kv_head), n)) {
    lock.unlock();
    WaitSeal(job);
    lock.lock();
    if (seq->dropped) {
      return absl::NotFoundError(absl::StrCat("Append: unknown sequence ", request.sequence_id));
    }
    KVR_RETURN_IF_ERROR(PersistenceError());
  }
  HeadState& head = seq->head(request.layer, request.kv_head);
  KVR_RETURN_IF_ERROR(CheckPositionRange(request.first_position, n, where));
  if (request.first_position <= head.last_position) {
    return absl::InvalidArgumentError(absl::StrCat(
        "first_position ", request.first_position, " must be > ", head.last_position,
        " (the last position held) for ", where));
  }
  KVR_RETURN_IF_ERROR(index::ValidateFinite(request.keys, spec.head_dim, "keys"));
  const int64_t reserved = EstimateBytes(spec, n);
  KVR_RETURN_IF_ERROR(ReserveMemory(reserved, where));
  // With persistence, `write` describes every change made to `head` (one
  // atomic commit: the tail rows, or the seal they triggered, plus the
  // head's summary); `diverged` marks a failure that left a change it does
  // not describe.
  HeadWrite write;
  HeadWrite* const w = options_.persistence != nullptr ? &write : nullptr;
  bool diverged = false;
  const absl::Status status = [&]() -> absl::Status {
    if (head.chunks.empty()) {
      head.chunks.push_back(Chunk{});
      if (w != nullptr) w->chunks.push_back(ChunkWrite{});  // chunk 0, no keys yet
    }
    if (head.tail == nullptr) {
      KVR_ASSIGN_OR_RETURN(head.tail,
                           index::FlatIndex::Create(static_cast<size_t>(spec.head_dim)));
      head.tail->Reserve(options_.tail_capacity);
    }
    const size_t old_rows = head.tail->size();
    diverged = true;
    KVR_RETURN_IF_ERROR(head.tail->Add(request.keys));
    KVR_RETURN_IF_ERROR(head.tail_values.Append(request.values));
    for (size_t i = 0; i < n; ++i) {
      head.tail_positions.push_back(request.first_position + int64_t(i));
    }
    head.last_position = request.first_position + (static_cast<int64_t>(n) - 1);
    KVR_RETURN_IF_ERROR(AdvanceSeals(*seq, &head, w));
    // An installed seal rewrote the remaining tail (these rows included).
    if (w != nullptr && !w->clear_tail) {
      w->tail = TailWrite{head.tail->keys().rows_slice(old_rows, n),
                          RawRows(head.tail_values, old_rows, n),
                          std::span<const int64_t>(head.tail_positions).subspan(old_rows, n)};
    }
    diverged = false;
    return absl::OkStatus();
  }();
  SettleMemory(&head, reserved);
  if (w != nullptr) {
    if (diverged) return FailPersistence(status, where);
    if (!write.chunks.empty() || write.clear_tail || write.tail.has_value()) {
      write.sequence_id = request.sequence_id;
      write.layer = request.layer;
      write.kv_head = request.kv_head;
      write.head_dim = spec.head_dim;
      write.value_dtype = spec.value_dtype;
      write.last_position = head.last_position;
      write.tail_rows = head.tail != nullptr ? static_cast<int64_t>(head.tail->size()) : 0;
      // Queued under the sequence lock, so the commits of one head reach the
      // store in the order they were applied; the sync itself runs after the
      // lock is released (grouped with other appends' by the store), and
      // `done` acknowledges only once it is durable.
      options_.persistence->CommitHeadAsync(
          write, [this, where, status, done = std::move(done)](absl::Status committed) {
            if (!committed.ok()) committed = FailPersistence(committed, where);
            done(status.ok() ? std::move(committed) : status);
          });
      *handed_off = true;
    }
  }
  return status;
}

absl::Status NodeCore::Seal(const Sequence& seq, HeadState* head, HeadWrite* write) {
  KVR_CHECK(!head->chunks.empty() && head->tail != nullptr);
  head->sealing.reset();  // abandoned: this folds the whole tail now
  Chunk& chunk = head->chunks.back();
  const ConstMatrixView tail_keys = head->tail->keys();
  const size_t total = (chunk.index ? chunk.index->size() : 0) + tail_keys.rows();
  const IndexType want = seq.spec.index_type;
  const bool rebuild =
      chunk.index == nullptr || (chunk.index->type() == IndexType::kFlat &&
                                 chunk.index->calibration() == nullptr &&  // not chosen by kAuto
                                 want != IndexType::kFlat && total >= options_.min_index_keys);
  if (!rebuild) {
    if (chunk.index.use_count() > 1) {
      // An abandoned background seal may still read it: add to a copy.
      std::vector<uint8_t> blob;
      KVR_RETURN_IF_ERROR(chunk.index->Serialize(&blob));
      KVR_ASSIGN_OR_RETURN(chunk.index, index::LoadIndex(blob));
    }
    KVR_RETURN_IF_ERROR(chunk.index->Add(tail_keys));
  } else {
    Matrix all(total, tail_keys.cols());
    size_t r = 0;
    if (chunk.index != nullptr) {
      const ConstMatrixView old = chunk.index->keys();
      for (size_t i = 0; i < old.rows(); ++i, ++r) std::copy_n(old.row(i), old.cols(), all.row(r));
    }
    for (size_t i = 0; i < tail_keys.rows(); ++i, ++r) {
      std::copy_n(tail_keys.row(i), tail_keys.cols(), all.row(r));
    }
    Matrix queries;
    {
      std::lock_guard<std::mutex> lock(head->query_mu);
      queries = Matrix(head->recent_count, tail_keys.cols());
      std::copy_n(head->recent.begin(), queries.data.size(), queries.data.begin());
    }
    KVR_ASSIGN_OR_RETURN(chunk.index, BuildIndex(want, all.view(), {}, 0, queries.view(),
                                                 options_.train_k));
  }
  if (chunk.values.cols() == 0) {
    chunk.values = ValueMatrix(seq.spec.value_dtype, static_cast<size_t>(seq.spec.head_dim));
  }
  const size_t first_row = chunk.positions.size();
  const Matrix tail_values = ToFloat(head->tail_values);
  KVR_RETURN_IF_ERROR(chunk.values.Append(tail_values.view()));
  chunk.positions.insert(chunk.positions.end(), head->tail_positions.begin(),
                         head->tail_positions.end());
  KVR_CHECK(chunk.values.rows() == chunk.index->size() &&
            chunk.positions.size() == chunk.index->size());
  head->tail->Clear();
  head->tail_values.Clear();
  head->tail_positions.clear();
  seals_.fetch_add(1, std::memory_order_relaxed);
  if (write != nullptr) {
    KVR_RETURN_IF_ERROR(
        RecordSeal(chunk, first_row, chunk.positions.size() - first_row, {}, write));
  }
  return absl::OkStatus();
}

absl::Status NodeCore::RecordSeal(const Chunk& chunk, size_t first_row, size_t rows,
                                  std::vector<uint8_t> blob, HeadWrite* write) {
  ChunkWrite cw;
  cw.chunk = chunk.chunk;
  cw.rows = static_cast<int64_t>(chunk.index->size());
  cw.index_blob = std::move(blob);
  if (cw.index_blob.empty()) KVR_RETURN_IF_ERROR(chunk.index->Serialize(&cw.index_blob));
  cw.segment = ValueSegment{static_cast<int64_t>(first_row), static_cast<int64_t>(rows),
                            RawRows(chunk.values, first_row, rows),
                            std::span<const int64_t>(chunk.positions).subspan(first_row, rows)};
  write->chunks.push_back(std::move(cw));
  write->clear_tail = true;
  write->tail.reset();
  return absl::OkStatus();
}

std::shared_ptr<NodeCore::SealJob> NodeCore::SealToAwait(const HeadState& head,
                                                         size_t incoming) const {
  if (head.sealing == nullptr || head.tail == nullptr) return nullptr;
  const size_t after = head.tail->size() + incoming - head.sealing->rows;
  if (after < SealLag()) return nullptr;
  std::lock_guard<std::mutex> lock(head.sealing->mu);
  return head.sealing->state == SealJob::State::kDone ? nullptr : head.sealing;
}

absl::Status NodeCore::AdvanceSeals(const Sequence& seq, HeadState* head, HeadWrite* write) {
  // The last chunk's deferred build is not in: the tail keeps its rows
  // (searched exactly) and seals after the install.
  if (!head->chunks.empty() && head->chunks.back().pending != nullptr) return absl::OkStatus();
  const size_t capacity = options_.tail_capacity;
  if (!options_.background_seals) {
    if (head->tail == nullptr || head->tail->size() < capacity) return absl::OkStatus();
    return Seal(seq, head, write);
  }
  for (;;) {
    const size_t rows = head->tail != nullptr ? head->tail->size() : 0;
    if (head->sealing != nullptr) {
      if (rows - head->sealing->rows < SealLag()) return absl::OkStatus();
      WaitSeal(head->sealing);  // done already unless one append brought many rows
      KVR_RETURN_IF_ERROR(InstallSeal(seq, head, write));
      continue;
    }
    if (rows < capacity) return absl::OkStatus();
    const absl::Status started = StartSeal(seq, head);
    if (absl::IsResourceExhausted(started)) {
      // No room for a second copy of the chunk's index: seal in place now.
      return Seal(seq, head, write);
    }
    KVR_RETURN_IF_ERROR(started);
  }
}

absl::Status NodeCore::StartSeal(const Sequence& seq, HeadState* head) {
  KVR_CHECK(!head->chunks.empty() && head->tail != nullptr && head->sealing == nullptr);
  const size_t rows = options_.tail_capacity;
  KVR_CHECK(head->tail->size() >= rows);
  const Chunk& chunk = head->chunks.back();
  auto job = std::make_shared<SealJob>();
  job->base = chunk.index;
  job->type = seq.spec.index_type;
  job->rows = rows;
  const size_t base_rows = job->base != nullptr ? job->base->size() : 0;
  job->rebuild = job->base == nullptr ||
                 (job->base->type() == IndexType::kFlat && job->type != IndexType::kFlat &&
                  base_rows + rows >= options_.min_index_keys);
  const ConstMatrixView tail_keys = head->tail->keys();
  const size_t d = tail_keys.cols();
  job->keys = Matrix(rows, d);
  std::copy_n(tail_keys.row(0), rows * d, job->keys.data.begin());
  if (job->rebuild) {
    std::lock_guard<std::mutex> lock(head->query_mu);
    job->queries = Matrix(head->recent_count, d);
    std::copy_n(head->recent.begin(), job->queries.data.size(), job->queries.data.begin());
  }
  if (options_.recalibrate_every > 0 && job->type != IndexType::kFlat) {
    // At most once per recalibrate_every ring queries (a seal otherwise keeps
    // the chunk's last calibration), and whenever the chunk has none yet.
    const index::CalibrationResult* known =
        job->base != nullptr ? job->base->calibration() : nullptr;
    bool due = job->rebuild || known == nullptr || std::isnan(known->expected_recall);
    {
      std::lock_guard<std::mutex> lock(head->query_mu);
      due = due || head->queries_since_seal_calibration >= options_.recalibrate_every;
      if (due && head->recent_count >= index::kMinRecalibrationQueries) {
        head->queries_since_seal_calibration = 0;
      }
    }
    if (due) job->calibration_queries = RecentQueries(head, d, options_.calibration.max_queries);
    if (job->calibration_queries.rows < index::kMinRecalibrationQueries) {
      job->calibration_queries = Matrix();
    }
  }
  job->serialize = options_.persistence != nullptr;
  // The new index beside the old one (and its serialized copy).
  int64_t bytes = EstimateBytes(seq.spec, rows) +
                  (job->base != nullptr ? static_cast<int64_t>(job->base->MemoryBytes()) : 0);
  if (job->serialize) bytes *= 2;
  KVR_RETURN_IF_ERROR(ReserveMemory(
      bytes, absl::StrCat("seal of ", rows, " tail rows of sequence ", seq.spec.sequence_id)));
  job->reservation = MemoryReservation(&memory_used_, bytes);
  head->sealing = job;
  if (seal_pool_ != nullptr) {
    seal_pool_->Schedule([this, job] { RunSeal(job); });
  } else {
    RunSeal(job);
  }
  return absl::OkStatus();
}

void NodeCore::RunSeal(const std::shared_ptr<SealJob>& job) {
  {
    std::lock_guard<std::mutex> lock(job->mu);
    if (job->state != SealJob::State::kQueued) return;
    job->state = SealJob::State::kRunning;
    if (job.use_count() == 1) {
      // Abandoned (Seal, SyncShards or DropSequence let go of it): only the
      // seal thread's task holds it; nobody will install it.
      job->status = absl::CancelledError("seal abandoned");
      job->state = SealJob::State::kDone;
      return;
    }
  }
  if (options_.before_seal_build) options_.before_seal_build();
  std::shared_ptr<index::KeyIndex> result;
  std::vector<uint8_t> blob;
  const absl::Status status = [&]() -> absl::Status {
    if (job->rebuild) {
      const size_t old_rows = job->base != nullptr ? job->base->size() : 0;
      const size_t d = job->keys.cols;
      Matrix all(old_rows + job->rows, d);
      if (old_rows > 0) std::copy_n(job->base->keys().row(0), old_rows * d, all.data.begin());
      std::copy_n(job->keys.data.begin(), job->rows * d, all.data.begin() + old_rows * d);
      ConstMatrixView train = job->queries.view();
      Matrix trained;
      if (job->calibration_queries.rows > 0 && job->queries.rows > 0) {
        // Every 4th ring query is held back for the calibration below, the
        // rest train the rebuild (a graph calibrated on its own training
        // queries would overrate itself).
        const size_t q = job->queries.rows;
        Matrix held((q + 3) / 4, d);
        trained = Matrix(q - held.rows, d);
        for (size_t i = 0; i < q; ++i) {
          float* dst = i % 4 == 0 ? held.row(i / 4) : trained.row(i - i / 4 - 1);
          std::copy_n(job->queries.row(i), d, dst);
        }
        job->calibration_queries = std::move(held);
        train = trained.view();
      }
      KVR_ASSIGN_OR_RETURN(result, BuildIndex(job->type, all.view(), {}, 0, train,
                                              options_.train_k));
    } else {
      std::vector<uint8_t> copy;
      KVR_RETURN_IF_ERROR(job->base->Serialize(&copy));
      KVR_ASSIGN_OR_RETURN(std::unique_ptr<index::KeyIndex> grown, index::LoadIndex(copy));
      copy = std::vector<uint8_t>();
      KVR_RETURN_IF_ERROR(grown->Add(job->keys.view()));
      result = std::move(grown);
    }
    if (job->calibration_queries.rows >= index::kMinRecalibrationQueries &&
        result->type() != IndexType::kFlat) {
      // The appended keys are found as the decode queries want them: the
      // effort comes from recent decode queries over the new index.
      // (A seal keeps the chunk's kind: no flat index, flat_bytes null.)
      std::shared_ptr<index::KeyIndex> calibrated =
          CalibrateOnRing(result, job->type, job->calibration_queries.view(), nullptr);
      if (calibrated != nullptr) result = std::move(calibrated);
    }
    if (job->serialize) KVR_RETURN_IF_ERROR(result->Serialize(&blob));
    return absl::OkStatus();
  }();
  job->base.reset();  // the old index goes once the chunk drops it too
  job->queries = Matrix();
  job->calibration_queries = Matrix();
  {
    std::lock_guard<std::mutex> lock(job->mu);
    job->status = status;
    job->result = std::move(result);
    job->blob = std::move(blob);
    job->state = SealJob::State::kDone;
  }
  job->cv.notify_all();
}

Matrix NodeCore::RecentQueries(HeadState* head, size_t dim, size_t max_rows) {
  std::lock_guard<std::mutex> lock(head->query_mu);
  const size_t ring = dim > 0 ? head->recent.size() / dim : 0;
  const size_t rows = std::min(head->recent_count, max_rows);
  Matrix out(rows, dim);
  if (ring == 0) return Matrix(0, dim);
  // The newest row is at recent_next - 1 (mod ring).
  for (size_t i = 0; i < rows; ++i) {
    const size_t slot = (head->recent_next + ring - rows + i) % ring;
    std::copy_n(head->recent.begin() + static_cast<std::ptrdiff_t>(slot * dim), dim, out.row(i));
  }
  return out;
}

std::shared_ptr<index::KeyIndex> NodeCore::CalibrateOnRing(
    const std::shared_ptr<index::KeyIndex>& idx, IndexType want, ConstMatrixView queries,
    int64_t* flat_bytes) {
  const bool allow_flat = flat_bytes != nullptr;
  if (allow_flat) *flat_bytes = 0;
  // Single-threaded (no pool): bounded CPU, Attends keep the core's pool.
  absl::StatusOr<index::CalibrationResult> result =
      index::CalibrateOnQueries(*idx, queries, options_.calibration, nullptr);
  if (!result.ok()) return nullptr;
  const double n = static_cast<double>(idx->size());
  const double target =
      std::min(1.0, options_.calibration.target_recall + options_.calibration.decode_margin);
  if (allow_flat && want == IndexType::kAuto &&
      (result->expected_recall < target ||
       result->cost_per_query * index::kMinSpeedupOverFlat > n)) {
    // Index auto: this kind cannot serve the decode queries cheaper than the
    // exact scan; the chunk becomes flat (what kAuto picks when no kind does).
    // Its keys are reserved in the budget before they are copied.
    const int64_t bytes = static_cast<int64_t>(idx->size() * idx->dim() * sizeof(float));
    if (!ReserveMemory(bytes, "recalibration to a flat index").ok()) return nullptr;
    const auto give_back = [&] {
      memory_used_.fetch_sub(bytes, std::memory_order_relaxed);
      return nullptr;
    };
    absl::StatusOr<std::unique_ptr<index::FlatIndex>> flat = index::FlatIndex::Create(idx->dim());
    if (!flat.ok()) return give_back();
    (*flat)->Reserve(idx->size());
    if (!(*flat)->Add(idx->keys()).ok()) return give_back();
    index::CalibrationResult exact;
    exact.kind = IndexType::kFlat;
    exact.expected_recall = 1.0;
    exact.target_recall = options_.calibration.target_recall;
    exact.k = result->k;
    exact.holdout_queries = result->holdout_queries;
    exact.cost_per_query = n;
    absl::StatusOr<std::unique_ptr<index::CalibratedIndex>> wrapped =
        index::CalibratedIndex::Create(std::unique_ptr<index::KeyIndex>(std::move(*flat)), exact);
    if (!wrapped.ok()) return give_back();
    *flat_bytes = bytes;  // still reserved: the caller settles or returns it
    return std::shared_ptr<index::KeyIndex>(std::move(*wrapped));
  }
  absl::StatusOr<std::unique_ptr<index::CalibratedIndex>> wrapped =
      index::CalibratedIndex::Recalibrated(idx, *result);
  if (!wrapped.ok()) return nullptr;
  return std::shared_ptr<index::KeyIndex>(std::move(*wrapped));
}

void NodeCore::Recalibrate(const std::shared_ptr<Sequence>& seq, int32_t layer,
                           int32_t kv_head) {
  if (options_.before_recalibration) options_.before_recalibration();
  const size_t d = static_cast<size_t>(seq->spec.head_dim);
  const IndexType want = seq->spec.index_type;
  struct Target {
    int32_t chunk;
    std::shared_ptr<index::KeyIndex> index;  // what the chunk held
    std::shared_ptr<index::KeyIndex> result;
    int64_t flat_bytes = 0;
  };
  std::vector<Target> targets;
  Matrix queries;
  {
    std::shared_lock<std::shared_mutex> lock(seq->mu);
    if (seq->dropped) return;
    HeadState& head = seq->head(layer, kv_head);
    {
      std::lock_guard<std::mutex> qlock(head.query_mu);
      head.recalibration_queued = false;  // the next one may queue from now on
    }
    queries = RecentQueries(&head, d, options_.calibration.max_queries);
    for (const Chunk& c : head.chunks) {
      if (c.index != nullptr && c.index->type() != IndexType::kFlat) {
        targets.push_back(Target{c.chunk, c.index, nullptr, 0});
      }
    }
  }
  if (queries.rows < index::kMinRecalibrationQueries) return;
  for (Target& t : targets) {  // no lock held: Attends and appends go on
    t.result = CalibrateOnRing(t.index, want, queries.view(), &t.flat_bytes);
  }
  std::unique_lock<std::shared_mutex> lock(seq->mu);
  HeadState& head = seq->head(layer, kv_head);
  for (Target& t : targets) {
    if (seq->dropped) break;
    if (t.result == nullptr) continue;
    const auto it = std::find_if(head.chunks.begin(), head.chunks.end(),
                                 [&](const Chunk& c) { return c.chunk == t.chunk; });
    // Replaced meanwhile (a seal, a sync): its new index stays.
    if (it == head.chunks.end() || it->index != t.index) continue;
    it->index = std::move(t.result);
    recalibrations_.fetch_add(1, std::memory_order_relaxed);
    if (t.flat_bytes > 0) {
      t.index.reset();
      SettleMemory(&head, t.flat_bytes);  // the reservation becomes the head's bytes
      t.flat_bytes = 0;
    }
  }
  // Flat indexes built for chunks that changed meanwhile: return their bytes.
  for (const Target& t : targets) {
    if (t.flat_bytes > 0) memory_used_.fetch_sub(t.flat_bytes, std::memory_order_relaxed);
  }
}

void NodeCore::WaitSeal(const std::shared_ptr<SealJob>& job) {
  RunSeal(job);  // a no-op unless nobody started it yet
  std::unique_lock<std::mutex> lock(job->mu);
  job->cv.wait(lock, [&] { return job->state == SealJob::State::kDone; });
}

absl::Status NodeCore::InstallSeal(const Sequence& seq, HeadState* head, HeadWrite* write) {
  const std::shared_ptr<SealJob> job = std::move(head->sealing);
  head->sealing.reset();
  {
    std::lock_guard<std::mutex> lock(job->mu);
    KVR_CHECK(job->state == SealJob::State::kDone);
  }
  KVR_RETURN_IF_ERROR(job->status);
  Chunk& chunk = head->chunks.back();
  const size_t rows = job->rows;
  const size_t d = static_cast<size_t>(seq.spec.head_dim);
  KVR_CHECK(head->tail->size() >= rows &&
            job->result->size() == chunk.positions.size() + rows);
  if (chunk.values.cols() == 0) chunk.values = ValueMatrix(seq.spec.value_dtype, d);
  const size_t first_row = chunk.positions.size();
  Matrix sealed_values(rows, d);
  for (size_t i = 0; i < rows; ++i) head->tail_values.RowToFloat(i, sealed_values.row(i));
  KVR_RETURN_IF_ERROR(chunk.values.Append(sealed_values.view()));
  chunk.positions.insert(chunk.positions.end(), head->tail_positions.begin(),
                         head->tail_positions.begin() + static_cast<std::ptrdiff_t>(rows));
  chunk.index = job->result;
  KVR_CHECK(chunk.values.rows() == chunk.index->size() &&
            chunk.positions.size() == chunk.index->size());

  // The rows that arrived during the build form the new tail.
  const size_t rest = head->tail->size() - rows;
  KVR_ASSIGN_OR_RETURN(std::unique_ptr<index::FlatIndex> tail, index::FlatIndex::Create(d));
  tail->Reserve(std::max(options_.tail_capacity, rest));
  KVR_RETURN_IF_ERROR(tail->Add(head->tail->keys().rows_slice(rows, rest)));
  KVR_ASSIGN_OR_RETURN(ValueMatrix tail_values,
                       ValueMatrix::FromRaw(seq.spec.value_dtype, rest, d,
                                            RawRows(head->tail_values, rows, rest)));
  head->tail = std::move(tail);
  head->tail_values = std::move(tail_values);
  head->tail_positions.erase(head->tail_positions.begin(),
                             head->tail_positions.begin() + static_cast<std::ptrdiff_t>(rows));
  seals_.fetch_add(1, std::memory_order_relaxed);
  if (write != nullptr) {
    // A second install in one write (an append of many rows) replaces the
    // chunk's index; its segment is written beside the first one's.
    KVR_RETURN_IF_ERROR(RecordSeal(chunk, first_row, rows, std::move(job->blob), write));
    if (rest > 0) {
      write->tail = TailWrite{head->tail->keys(), head->tail_values.raw_bytes(),
                              std::span<const int64_t>(head->tail_positions)};
    }
  }
  job->reservation.Release();
  return absl::OkStatus();
}

bool NodeCore::QueueBuild(const std::shared_ptr<Sequence>& seq, const ShardUpload& upload,
                          int64_t index_bytes, Chunk* chunk) {
  auto job = std::make_shared<BuildJob>();
  job->type = seq->spec.index_type;
  job->placeholder = chunk->index;
  job->train_topk.assign(upload.train_topk.begin(), upload.train_topk.end());
  job->train_topk_width = upload.train_topk_width;
  job->train_queries = CopyMatrix(upload.train_queries);
  job->train_k = upload.train_k;
  job->queries_per_search =
      internal::CalibrationForSpec(seq->spec, options_.calibration).queries_per_search;
  job->holdout_queries = CopyMatrix(upload.holdout_queries);
  job->holdout_topk.assign(upload.holdout_topk.begin(), upload.holdout_topk.end());
  job->holdout_topk_width = upload.holdout_topk_width;
  job->serialize = options_.persistence != nullptr;
  const int64_t copies = static_cast<int64_t>(
      (job->train_topk.size() + job->holdout_topk.size()) * sizeof(int64_t) +
      (job->train_queries.data.size() + job->holdout_queries.data.size()) * sizeof(float));
  const int64_t bytes = index_bytes + copies;
  if (!ReserveMemory(bytes, "deferred index build").ok()) return false;
  job->reservation = MemoryReservation(&memory_used_, bytes);
  job->targets.push_back(
      BuildJob::Target{seq, upload.key.layer, upload.key.kv_head, upload.key.chunk});
  chunk->pending = job;
  builds_pending_.fetch_add(1, std::memory_order_relaxed);
  if (build_pool_ != nullptr) {
    build_pool_->Schedule([this, job] {
      LowerThreadPriority();
      RunBuild(job);
    });
  }
  return true;
}

void NodeCore::RunBuild(const std::shared_ptr<BuildJob>& job) {
  bool alive = false;
  {
    std::lock_guard<std::mutex> lock(job->mu);
    if (job->state != BuildJob::State::kQueued) return;
    job->state = BuildJob::State::kRunning;
    for (const BuildJob::Target& t : job->targets) alive = alive || !t.seq.expired();
  }
  alive = alive && !stopping_.load();
  absl::Status status = absl::CancelledError("deferred index build abandoned");
  std::shared_ptr<index::KeyIndex> result;
  std::vector<uint8_t> blob;
  double seconds = 0;
  if (alive) {
    if (options_.before_index_build) options_.before_index_build();
    const auto start = std::chrono::steady_clock::now();
    const index::Holdout holdout{job->holdout_queries.view(), job->holdout_topk,
                                 job->holdout_topk_width};
    // On this (nice 19) thread alone: the node's pool runs at normal
    // priority and would take prefill's cores (several builds run at once
    // with index_build_threads > 1).
    absl::StatusOr<std::unique_ptr<index::KeyIndex>> built =
        BuildIndexOn(nullptr, job->type, job->placeholder->keys(), job->train_topk,
                     job->train_topk_width, job->train_queries.view(), job->train_k, holdout,
                     job->queries_per_search);
    status = built.status();
    if (built.ok()) {
      result = std::move(built).value();
      if (job->serialize) status = result->Serialize(&blob);
    }
    seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  }
  std::vector<BuildJob::Target> targets;
  {
    std::lock_guard<std::mutex> lock(job->mu);
    job->status = status;
    job->result = result;
    job->blob = std::move(blob);
    job->seconds = seconds;
    job->state = BuildJob::State::kBuilt;  // forks from now on take `result` themselves
    targets = job->targets;
    job->train_queries = Matrix();
    job->holdout_queries = Matrix();
    job->train_topk = std::vector<int64_t>();
    job->holdout_topk = std::vector<int64_t>();
  }
  // Counted before any install becomes visible: a ListShards that sees the
  // chunk built also sees the build in the metrics and no longer pending.
  builds_pending_.fetch_sub(1, std::memory_order_relaxed);
  if (alive && status.ok() && options_.on_index_built) {
    const index::CalibrationResult* cal = result->calibration();
    options_.on_index_built(result->type(), seconds, cal != nullptr ? cal->measured_us : 0,
                            cal != nullptr && !std::isnan(cal->expected_recall)
                                ? cal->expected_recall
                                : (result->type() == IndexType::kFlat ? 1.0 : -1.0));
  }
  if (alive) {
    for (const BuildJob::Target& t : targets) {
      if (std::shared_ptr<Sequence> seq = t.seq.lock()) {
        InstallBuild(job, seq, t.layer, t.kv_head, t.chunk);
      }
    }
  }
  {
    std::lock_guard<std::mutex> lock(job->mu);
    job->blob = std::vector<uint8_t>();
    job->reservation.Release();  // the installs settled the real bytes
    job->state = BuildJob::State::kFinished;
  }
  job->cv.notify_all();
}

void NodeCore::InstallBuild(const std::shared_ptr<BuildJob>& job,
                            const std::shared_ptr<Sequence>& seq, int32_t layer, int32_t kv_head,
                            int32_t chunk_id) {
  std::unique_lock<std::shared_mutex> lock(seq->mu);
  if (seq->dropped) return;
  HeadState& head = seq->head(layer, kv_head);
  const auto it = std::find_if(head.chunks.begin(), head.chunks.end(),
                               [&](const Chunk& c) { return c.chunk == chunk_id; });
  // Replaced meanwhile (SyncShards): its new chunk stays.
  if (it == head.chunks.end() || it->pending != job) return;
  it->pending.reset();
  std::shared_ptr<index::KeyIndex> result;
  std::vector<uint8_t> blob;
  {
    std::lock_guard<std::mutex> jlock(job->mu);
    if (!job->status.ok()) {
      std::fprintf(stderr, "kvr: deferred index build of sequence %llu failed (%s); the chunk "
                           "stays exact (flat)\n",
                   static_cast<unsigned long long>(seq->spec.sequence_id),
                   std::string(job->status.message()).c_str());
      return;
    }
    result = job->result;
    blob = job->blob;  // one target with persistence (forks are refused then)
  }
  if (it->index != job->placeholder) return;  // never: seals wait for the build
  it->index = std::move(result);
  SettleMemory(&head, 0);
  if (options_.persistence != nullptr && !blob.empty() && PersistenceError().ok()) {
    // Replaces the chunk's flat blob; its rows are stored already.
    HeadWrite write;
    write.sequence_id = seq->spec.sequence_id;
    write.layer = layer;
    write.kv_head = kv_head;
    write.head_dim = seq->spec.head_dim;
    write.value_dtype = seq->spec.value_dtype;
    write.last_position = head.last_position;
    write.tail_rows = head.tail != nullptr ? static_cast<int64_t>(head.tail->size()) : 0;
    ChunkWrite cw;
    cw.chunk = chunk_id;
    cw.rows = static_cast<int64_t>(it->index->size());
    cw.index_blob = std::move(blob);
    write.chunks.push_back(std::move(cw));
    const std::string where =
        absl::StrCat("deferred index build of ", ShardKey{seq->spec.sequence_id, layer, kv_head,
                                                          chunk_id}.DebugString());
    options_.persistence->CommitHeadAsync(write, [this, where](absl::Status committed) {
      if (!committed.ok()) (void)FailPersistence(committed, where);
    });
  }
}

void NodeCore::WaitBuild(const std::shared_ptr<BuildJob>& job) {
  RunBuild(job);  // a no-op unless nobody started it yet
  std::unique_lock<std::mutex> lock(job->mu);
  job->cv.wait(lock, [&] { return job->state == BuildJob::State::kFinished; });
}

void NodeCore::AttendAsync(const AttendRequest& request, PartialsView out, AttendStats* stats,
                           StatusCallback done) {
  if (pool_ == nullptr) {
    done(AttendNow(request, out, stats, nullptr));
    return;
  }
  pool_->Schedule([this, request, out, stats, done = std::move(done)]() mutable {
    done(AttendNow(request, out, stats, pool_.get()));
  });
}

namespace {

// Joins a batch's items: `done` runs (OK) after the last one finished.
struct ItemJoin {
  std::atomic<size_t> left;
  StatusCallback done;
  ItemJoin(size_t n, StatusCallback d) : left(n), done(std::move(d)) {}
  void Finish() {
    if (left.fetch_sub(1, std::memory_order_acq_rel) == 1) done(absl::OkStatus());
  }
};

// Runs a batch: every item of `items` is started with `start(item, cb)`
// and its status stored in item.status; `done` (OK) runs once the last one
// finished. More than `limit` items (--max_batch_items): every item and
// `done` get ResourceExhausted naming max_batch_items and `what`, nothing
// runs.
template <typename Item, typename Start>
void RunBatch(std::span<Item> items, size_t limit, absl::string_view what, StatusCallback done,
              Start start) {
  if (items.size() > limit) {
    const absl::Status st = absl::ResourceExhaustedError(
        absl::StrCat(what, ": ", items.size(), " items exceed max_batch_items ", limit));
    for (Item& item : items) item.status = st;
    done(st);
    return;
  }
  if (items.empty()) {
    done(absl::OkStatus());
    return;
  }
  auto join = std::make_shared<ItemJoin>(items.size(), std::move(done));
  for (Item& item : items) {
    start(item, [&item, join](absl::Status st) {
      item.status = std::move(st);
      join->Finish();
    });
  }
}

}  // namespace

void NodeCore::AttendBatchAsync(std::span<AttendBatchItem> items, StatusCallback done) {
  RunBatch(items, options_.max_batch_items, "AttendBatch", std::move(done),
           [this](AttendBatchItem& item, StatusCallback cb) {
             AttendBatchItemAsync(item.request, item.out, item.stats, std::move(cb));
           });
}

void NodeCore::AttendBatchItemAsync(const AttendRequest& request, PartialsView out,
                                    AttendStats* stats, StatusCallback done) {
  ThreadPool* const pool = batch_pool_ != nullptr ? batch_pool_.get() : pool_.get();
  if (pool == nullptr) {
    done(AttendNow(request, out, stats, nullptr));
    return;
  }
  pool->Schedule([this, request, out, stats, pool, done = std::move(done)]() mutable {
    done(AttendNow(request, out, stats, pool));
  });
}

void NodeCore::AppendBatchAsync(std::span<AppendBatchItem> items, StatusCallback done) {
  RunBatch(items, options_.max_batch_items, "AppendBatch", std::move(done),
           [this](AppendBatchItem& item, StatusCallback cb) {
             AppendAsync(item.request, std::move(cb));
           });
}

absl::Status NodeCore::SelectShards(const Sequence& seq, const AttendRequest& request,
                                    std::vector<std::vector<size_t>>* selected) {
  const SequenceSpec& spec = seq.spec;
  size_t held = 0;
  for (int32_t g = 0; g < spec.n_kv_heads; ++g) held += seq.head(request.layer, g).chunks.size();
  if (request.shards.size() > held) {
    return absl::InvalidArgumentError(absl::StrCat(
        "Attend: shards lists ", request.shards.size(), " entries but layer ", request.layer,
        " of sequence ", spec.sequence_id, " has ", held,
        " shards (n_kv_heads x held chunks): the limit"));
  }
  selected->resize(static_cast<size_t>(spec.n_kv_heads));
  for (auto& v : *selected) v.clear();
  for (const HeadChunkRef& ref : request.shards) {
    if (ref.kv_head < 0 || ref.kv_head >= spec.n_kv_heads) {
      return absl::InvalidArgumentError(absl::StrCat("Attend: shards entry kv_head ", ref.kv_head,
                                                     " outside [0, ", spec.n_kv_heads, ")"));
    }
    const HeadState& head = seq.head(request.layer, ref.kv_head);
    const auto it = std::lower_bound(
        head.chunks.begin(), head.chunks.end(), ref.chunk,
        [](const Chunk& c, int32_t chunk) { return c.chunk < chunk; });
    if (it == head.chunks.end() || it->chunk != ref.chunk) {
      return absl::NotFoundError(absl::StrCat(
          "Attend: shards lists ",
          ShardKey{spec.sequence_id, request.layer, ref.kv_head, ref.chunk}.DebugString(),
          " which this node does not hold"));
    }
    (*selected)[static_cast<size_t>(ref.kv_head)].push_back(
        static_cast<size_t>(it - head.chunks.begin()));
  }
  for (int32_t g = 0; g < spec.n_kv_heads; ++g) {
    std::vector<size_t>& slots = (*selected)[static_cast<size_t>(g)];
    std::sort(slots.begin(), slots.end());
    const auto dup = std::adjacent_find(slots.begin(), slots.end());
    if (dup != slots.end()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "Attend: shards lists kv_head ", g, " chunk ",
          seq.head(request.layer, g).chunks[*dup].chunk, " more than once"));
    }
  }
  return absl::OkStatus();
}

absl::Status NodeCore::AttendNow(const AttendRequest& request, PartialsView out,
                                 AttendStats* stats, ThreadPool* helpers) {
  KVR_ASSIGN_OR_RETURN(std::shared_ptr<Sequence> seq,
                       FindFor(request.sequence_id, request.capability, "Attend"));
  std::shared_lock<std::shared_mutex> lock(seq->mu);
  const SequenceSpec& spec = seq->spec;
  const absl::string_view where = "Attend";
  KVR_RETURN_IF_ERROR(CheckRange(request.layer, spec.n_layers, "layer"));
  KVR_RETURN_IF_ERROR(CheckMatrix(request.queries, spec, spec.n_heads, "queries", where));
  if (out.size() != static_cast<size_t>(spec.n_heads) || out.o.rows() != out.size() ||
      out.l.size() != out.size() || out.dim() != static_cast<size_t>(spec.head_dim)) {
    return absl::InvalidArgumentError(absl::StrCat("Attend: output holds ", out.size(), " x ",
                                                   out.dim(), " partials, need ", spec.n_heads,
                                                   " x ", spec.head_dim));
  }
  if (request.k < 1 || request.k > index::kMaxSearchK) {
    return absl::InvalidArgumentError(
        absl::StrCat("k ", request.k, " outside [1, ", index::kMaxSearchK, "]"));
  }
  if (request.beam < 0 || request.nprobe < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("beam ", request.beam, " / nprobe ", request.nprobe, " must be >= 0"));
  }
  if (!std::isfinite(request.scale) || request.scale < 0.0f) {
    return absl::InvalidArgumentError(
        absl::StrCat("scale ", request.scale, " must be finite and >= 0"));
  }
  if (request.estimate != EstimateMode::kDefault && request.estimate != EstimateMode::kOff &&
      request.estimate != EstimateMode::kOn) {
    return absl::InvalidArgumentError(absl::StrCat(
        "estimate ", static_cast<int32_t>(request.estimate), " is not a known EstimateMode"));
  }
  const bool estimate = request.estimate == EstimateMode::kOn ||
                        (request.estimate == EstimateMode::kDefault && options_.estimate);
  index::AttendParams params;
  params.search.k = request.k;
  params.search.beam = request.beam;
  params.search.nprobe = request.nprobe;
  params.zone = {options_.exact_zone_keys_fraction, options_.exact_zone_mass_fraction};
  params.scale = request.scale > 0.0f ? request.scale
                                      : 1.0f / std::sqrt(static_cast<float>(spec.head_dim));

  // Shard selection: selected[g] lists the chunk slots of head g to search
  // (ascending), or everything when the request lists no shards.
  const bool select = !request.shards.empty();
  thread_local std::vector<std::vector<size_t>> selected;
  if (select) {
    KVR_RETURN_IF_ERROR(SelectShards(*seq, request, &selected));
  }

  const size_t group = static_cast<size_t>(spec.n_heads / spec.n_kv_heads);
  const size_t d = static_cast<size_t>(spec.head_dim);
  // Phase 1, per head in order: record the decode queries, then list the
  // head's searches in the order the sequential path merges them (chunks
  // ascending, the tail after the head's last chunk).
  thread_local std::vector<SearchTask> tl_tasks;
  std::vector<SearchTask>* const tasks = &tl_tasks;
  tasks->clear();
  for (int32_t g = 0; g < spec.n_kv_heads; ++g) {
    HeadState& head = seq->head(request.layer, g);
    const ConstMatrixView q = request.queries.rows_slice(g * group, group);
    if (select && selected[static_cast<size_t>(g)].empty()) continue;
    if (const size_t ring = options_.decode_train_queries; ring > 0) {
      std::lock_guard<std::mutex> qlock(head.query_mu);
      if (head.recent_bytes == 0) {
        // Allocated once, inside the budget; no room: this head keeps none
        // (-1, not retried).
        const int64_t bytes = static_cast<int64_t>(ring * d * sizeof(float));
        if (ReserveMemory(bytes, "decode query ring").ok()) {
          head.recent.resize(ring * d);
          head.recent_bytes = bytes;
        } else {
          head.recent_bytes = -1;
        }
      }
      for (size_t i = 0; i < group && !head.recent.empty(); ++i) {
        std::copy_n(q.row(i), d, head.recent.begin() + head.recent_next * d);
        head.recent_next = (head.recent_next + 1) % ring;
        head.recent_count = std::min(head.recent_count + 1, ring);
      }
      if (recal_pool_ != nullptr && !head.recent.empty()) {
        head.queries_since_recalibration += group;
        head.queries_since_seal_calibration += group;
        if (head.queries_since_recalibration >= options_.recalibrate_every &&
            !head.recalibration_queued &&
            head.recent_count >= index::kMinRecalibrationQueries) {
          // Queued, not run: the work happens on the recalibration thread.
          head.recalibration_queued = true;
          head.queries_since_recalibration = 0;
          recal_pool_->Schedule(
              [this, seq, layer = request.layer, g] { Recalibrate(seq, layer, g); });
        }
      }
    }
    if (!select) {
      for (const Chunk& c : head.chunks) tasks->push_back({g, &c});
      tasks->push_back({g, nullptr});
      continue;
    }
    for (size_t slot : selected[static_cast<size_t>(g)]) {
      tasks->push_back({g, &head.chunks[slot]});
      // The appended tail belongs to the head's last chunk.
      if (slot + 1 == head.chunks.size()) tasks->push_back({g, nullptr});
    }
  }

  // Phase 2: every search into its own partials, in parallel when a pool
  // lends threads (the caller claims searches too, so a full pool only
  // means the caller does them all).
  thread_local std::vector<SearchResult> tl_results;
  std::vector<SearchResult>* const results = &tl_results;
  if (results->size() < tasks->size()) results->resize(tasks->size());
  for (size_t t = 0; t < tasks->size(); ++t) {
    SearchResult& r = (*results)[t];
    if (r.partials.m.size() != group || r.partials.o.cols != d) r.partials = Partials(group, d);
  }
  auto run = [this, &seq, &request, &params, tasks, results, group, estimate](size_t begin,
                                                                             size_t end) {
    for (size_t t = begin; t < end; ++t) {
      const SearchTask& task = (*tasks)[t];
      SearchShard(seq, request.layer, request.k, estimate, params,
                  request.queries.rows_slice(static_cast<size_t>(task.g) * group, group), task,
                  &(*results)[t]);
    }
  };
  ThreadPool* const pool = options_.search_threads == 1 ? nullptr
                           : search_pool_ != nullptr    ? search_pool_.get()
                                                        : helpers;
  if (pool != nullptr && tasks->size() > 1) {
    pool->ParallelFor(tasks->size(), 1, run);
  } else {
    run(0, tasks->size());
  }

  // Phase 3: merge in task order (the sequential order), so the output does
  // not depend on which thread ran what.
  SetEmpty(out);
  AttendStats local;
  for (size_t t = 0; t < tasks->size(); ++t) {
    const SearchResult& r = (*results)[t];
    KVR_RETURN_IF_ERROR(r.status);
    if (!r.produced) continue;
    MergeInto(out.slice(static_cast<size_t>((*tasks)[t].g) * group, group), r.partials.view());
    local.shards_searched += r.stats.shards_searched;
    local.keys_held += r.stats.keys_held;
    local.keys_attended += r.stats.keys_attended;
    local.distance_computations += r.stats.distance_computations;
    local.keys_estimated += r.stats.keys_estimated;
    local.clusters_estimated += r.stats.clusters_estimated;
    local.keys_exact_zone += r.stats.keys_exact_zone;
    local.summaries_clustered += r.stats.summaries_clustered;
  }
  if (stats != nullptr) *stats = local;
  return absl::OkStatus();
}

void NodeCore::SearchShard(const std::shared_ptr<Sequence>& seq, int32_t layer, int32_t k,
                           bool estimate, const index::AttendParams& params, ConstMatrixView q,
                           const SearchTask& task, SearchResult* result) {
  // k-means runs counted on this thread (a chunk's first estimating Attend
  // clusters small chunks inline; see ChunkSummary).
  const int64_t plans_before = index::ClusterSummary::PlansOnThisThread();
  result->produced = false;
  result->status = absl::OkStatus();
  result->stats = AttendStats{};
  thread_local index::AttendScratch scratch;
  const size_t group = q.rows();
  const HeadState& head = seq->head(layer, task.g);
  index::SearchStats search_stats;
  index::EstimateStats estimate_stats;
  AttendStats& local = result->stats;
  // `summary`: the chunk's estimation summary (null: exact top-k only).
  auto search = [&](const index::KeyIndex& idx, const ValueMatrix& values,
                    const index::ClusterSummary* summary) -> absl::Status {
    if (idx.size() == 0) return absl::OkStatus();
    index::AttendParams p = params;
    p.estimate = summary;
    KVR_RETURN_IF_ERROR(index::Attend(q, idx, values, p, result->partials.view(), &scratch,
                                      &search_stats, &estimate_stats));
    result->produced = true;
    local.shards_searched += 1;
    local.keys_held += static_cast<int64_t>(idx.size() * group);
    local.keys_attended +=
        static_cast<int64_t>(std::min<size_t>(idx.size(), static_cast<size_t>(k)) * group);
    return absl::OkStatus();
  };
  auto search_chunk = [&](const Chunk& c) -> absl::Status {
    if (c.index == nullptr) return absl::OkStatus();
    std::shared_ptr<const index::ClusterSummary> summary;
    if (estimate && c.index->size() > static_cast<size_t>(k)) {
      summary = ChunkSummary(seq, layer, task.g, c);
    }
    return search(*c.index, c.values, summary.get());
  };
  // With estimation the tail (at most tail_capacity keys, already scored
  // in full by its flat search) is attended exactly over all its keys, so
  // nothing in it needs estimating.
  auto search_tail = [&]() -> absl::Status {
    if (head.tail == nullptr || head.tail->size() == 0) return absl::OkStatus();
    if (!estimate || head.tail->size() <= static_cast<size_t>(k)) {
      return search(*head.tail, head.tail_values, nullptr);
    }
    KVR_RETURN_IF_ERROR(ExactAttention(q, head.tail->keys(), head.tail_values, params.scale,
                                       result->partials.view()));
    result->produced = true;
    const int64_t n_tail = static_cast<int64_t>(head.tail->size());
    local.shards_searched += 1;
    local.keys_held += n_tail * static_cast<int64_t>(group);
    local.keys_attended += n_tail * static_cast<int64_t>(group);
    search_stats.distance_computations += n_tail * static_cast<int64_t>(group);
    return absl::OkStatus();
  };
  result->status = task.chunk != nullptr ? search_chunk(*task.chunk) : search_tail();
  local.distance_computations = search_stats.distance_computations;
  local.keys_estimated = estimate_stats.keys_estimated;
  local.clusters_estimated = estimate_stats.clusters_estimated;
  local.keys_exact_zone = estimate_stats.keys_exact_zone;
  local.summaries_clustered = index::ClusterSummary::PlansOnThisThread() - plans_before;
}

namespace {
// Keys x clusters of the largest summary an Attend clusters itself (a
// k-means of ~1 ms or less: 16384 x d 128 x 6 iterations ~ 13 MFLOP): small
// chunks (a small model's, a short prompt's) get their estimate from the
// first Attend on, deterministically; larger ones go to the summary thread.
constexpr size_t kMaxInlineSummaryWork = 16384;
}  // namespace

size_t NodeCore::SummaryClusters(size_t n) const {
  // Clusters of at least kMinKeysPerEstimateCluster keys on average: a
  // summary with about as many clusters as keys would be exact attention at
  // exact-attention cost.
  return std::clamp<size_t>(n / index::kMinKeysPerEstimateCluster, 1,
                            options_.estimate_clusters_per_chunk);
}

std::shared_ptr<const index::ClusterSummary> NodeCore::ChunkSummary(
    const std::shared_ptr<Sequence>& seq, int32_t layer, int32_t kv_head, const Chunk& c) {
  EstimateSlot& slot = *c.estimate;
  std::lock_guard<std::mutex> lock(slot.mu);
  if (slot.bytes < 0 || slot.refused) return nullptr;  // dropped, or refused before
  const size_t n = c.index->size();
  const size_t want = SummaryClusters(n);
  if (slot.summary != nullptr && slot.summary->size() == n) return slot.summary;
  // Appends go to the existing clusters until the chunk has doubled while
  // it has fewer clusters than it should: then it is re-clustered
  // (amortised O(1) re-clusterings per key).
  const bool grow = slot.summary != nullptr && slot.summary->clusters() < want &&
                    n >= 2 * slot.summary->size();
  const bool extend = slot.summary != nullptr && slot.summary->size() < n && !grow;
  if (summary_pool_ != nullptr && !extend && n * want > kMaxInlineSummaryWork) {
    // Clustering is the summary thread's work: exact attention until then
    // (an outgrown summary no longer covers the chunk's keys).
    QueueSummaryLocked(seq, layer, kv_head, c);
    return nullptr;
  }
  std::shared_ptr<index::ClusterSummary> next;
  if (extend) {
    next = std::make_shared<index::ClusterSummary>(*slot.summary);
    if (!next->Append(c.index->keys(), c.values).ok()) {
      slot.refused = true;
      return nullptr;
    }
  } else {
    index::ClusterSummaryOptions o;
    o.clusters = want;
    o.second_order = options_.estimate_second_order;
    absl::StatusOr<index::ClusterSummary> built =
        index::ClusterSummary::Build(c.index->keys(), c.values, o, nullptr);
    if (!built.ok()) {
      slot.refused = true;
      return nullptr;
    }
    next = std::make_shared<index::ClusterSummary>(std::move(built).value());
  }
  return InstallSummary(slot, std::move(next));
}

std::shared_ptr<const index::ClusterSummary> NodeCore::InstallSummary(
    EstimateSlot& slot, std::shared_ptr<index::ClusterSummary> next) {
  const int64_t bytes = static_cast<int64_t>(next->MemoryBytes());
  if (bytes > slot.bytes) {
    if (!ReserveMemory(bytes - slot.bytes, "estimate summary").ok()) {
      // The previous (smaller) summary no longer covers the chunk: return
      // its bytes too.
      memory_used_.fetch_sub(slot.bytes, std::memory_order_relaxed);
      slot.bytes = 0;
      slot.summary.reset();
      slot.refused = true;
      return nullptr;
    }
  } else {
    memory_used_.fetch_sub(slot.bytes - bytes, std::memory_order_relaxed);
  }
  slot.bytes = bytes;
  slot.summary = std::move(next);
  return slot.summary;
}

void NodeCore::QueueSummaryLocked(const std::shared_ptr<Sequence>& seq, int32_t layer,
                                  int32_t kv_head, const Chunk& c) {
  EstimateSlot& slot = *c.estimate;
  if (slot.queued || slot.bytes < 0 || slot.refused || summary_pool_ == nullptr) return;
  slot.queued = true;
  summary_pool_->Schedule([this, seq, layer, kv_head, est = c.estimate] {
    RefreshSummary(seq, layer, kv_head, est);
  });
}

void NodeCore::RefreshSummary(const std::shared_ptr<Sequence>& seq, int32_t layer,
                              int32_t kv_head, const std::shared_ptr<EstimateSlot>& slot) {
  auto done = [&] {
    std::lock_guard<std::mutex> slock(slot->mu);
    slot->queued = false;
  };
  // The chunk of `slot` in head (layer, kv_head); caller holds seq->mu.
  auto find = [&]() -> const Chunk* {
    if (seq->dropped) return nullptr;
    for (const Chunk& c : seq->head(layer, kv_head).chunks) {
      if (c.estimate == slot && c.index != nullptr) return &c;
    }
    return nullptr;
  };
  // The index is never changed in place while shared (Chunk::index), so
  // its keys can be clustered with no lock held.
  std::shared_ptr<const index::KeyIndex> keys_of;
  {
    std::shared_lock<std::shared_mutex> lock(seq->mu);
    const Chunk* c = find();
    if (c == nullptr) return done();
    keys_of = c->index;
  }
  index::ClusterSummaryOptions o;
  o.clusters = SummaryClusters(keys_of->size());
  o.second_order = options_.estimate_second_order;
  absl::StatusOr<index::ClusterPlan> plan =
      index::ClusterSummary::Plan(keys_of->keys(), o, nullptr);
  std::shared_lock<std::shared_mutex> lock(seq->mu);
  const Chunk* c = find();
  std::lock_guard<std::mutex> slock(slot->mu);
  slot->queued = false;
  if (c == nullptr || slot->bytes < 0 || slot->refused) return;
  if (!plan.ok()) {
    slot->refused = true;
    return;
  }
  // Rows [0, plan size) are the keys clustered (key ids are append-only);
  // keys a seal added meanwhile join their nearest clusters.
  absl::StatusOr<index::ClusterSummary> built =
      index::ClusterSummary::FromPlan(*plan, c->index->keys(), c->values);
  if (built.ok() && built->size() < c->index->size()) {
    if (absl::Status st = built->Append(c->index->keys(), c->values); !st.ok()) built = st;
  }
  if (!built.ok()) {
    slot->refused = true;
    return;
  }
  InstallSummary(*slot, std::make_shared<index::ClusterSummary>(std::move(built).value()));
}

absl::Status NodeCore::DropSequence(uint64_t sequence_id, std::string_view capability) {
  return Drop(sequence_id, &capability);
}

absl::Status NodeCore::Drop(uint64_t sequence_id, const std::string_view* capability) {
  const std::string where = absl::StrCat("DropSequence ", sequence_id);
  std::unique_lock<std::mutex> lifecycle(lifecycle_mu_, std::defer_lock);
  // The store forgets the sequence before it can be created again. No early
  // return on an earlier persistence failure: a drop always frees memory.
  if (options_.persistence != nullptr) lifecycle.lock();
  std::shared_ptr<Sequence> seq;
  {
    std::unique_lock<std::mutex> lock(mu_);
    if (options_.persistence != nullptr && quarantined_.contains(sequence_id)) {
      // Its capability is checked when recovery read its spec record (an
      // unreadable record has none to check against).
      if (auto q = quarantined_capability_.find(sequence_id);
          capability != nullptr && q != quarantined_capability_.end()) {
        Sequence probe;
        probe.spec.sequence_id = sequence_id;
        probe.owner.capability_sha256 = q->second;
        KVR_RETURN_IF_ERROR(CheckAccess(probe, *capability, "DropSequence"));
      }
      // Not served; dropping it deletes the records recovery set aside.
      lock.unlock();
      const absl::Status st = options_.persistence->DropSequence(sequence_id);
      if (!st.ok()) return FailPersistence(st, where);
      lock.lock();
      quarantined_.erase(sequence_id);
      quarantined_capability_.erase(sequence_id);
      return absl::OkStatus();
    }
    auto it = sequences_.find(sequence_id);
    if (it == sequences_.end()) {
      return absl::NotFoundError(absl::StrCat("DropSequence: unknown sequence ", sequence_id));
    }
    if (capability != nullptr) {
      KVR_RETURN_IF_ERROR(CheckAccess(*it->second, *capability, "DropSequence"));
    }
    seq = std::move(it->second);
    sequences_.erase(it);
  }
  // Waits for a writer that found the sequence before it left the map; writers
  // that lock it later see `dropped`.
  std::unique_lock<std::shared_mutex> lock(seq->mu);
  seq->dropped = true;
  int64_t bytes = 0;
  for (const auto& h : seq->heads) {
    bytes += h->accounted_bytes;
    std::lock_guard<std::mutex> qlock(h->query_mu);
    if (h->recent_bytes > 0) bytes += h->recent_bytes;
    h->recent_bytes = -1;  // returned; an Attend still running records nothing more
    h->recent.clear();
    h->recent.shrink_to_fit();
    for (const Chunk& c : h->chunks) {
      std::lock_guard<std::mutex> slock(c.estimate->mu);
      if (c.estimate->bytes > 0) bytes += c.estimate->bytes;
      c.estimate->bytes = -1;  // returned; an Attend still running builds nothing more
      c.estimate->summary.reset();
    }
  }
  memory_used_.fetch_sub(bytes, std::memory_order_relaxed);
  // In-flight Attends hold their own reference; memory goes when they finish.
  if (options_.persistence != nullptr) {
    // Tried even after an earlier failure: deleting a sequence's records is
    // always consistent with what the node now holds.
    const absl::Status st = options_.persistence->DropSequence(sequence_id);
    if (!st.ok()) {
      return FailPersistence(
          st, absl::StrCat(where, " (the sequence is dropped from memory; its stored records "
                                  "may return at the next restart)"));
    }
  }
  return absl::OkStatus();
}

absl::Status NodeCore::ForkSequence(uint64_t source_id, std::string_view source_capability,
                                    uint64_t fork_id, const SequenceAccess& access) {
  const std::string where = absl::StrCat("ForkSequence ", source_id, " -> ", fork_id);
  if (fork_id == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": sequence_id (the fork's) must be non-zero"));
  }
  if (fork_id == source_id) {
    return absl::AlreadyExistsError(absl::StrCat(where, ": sequence ", fork_id, " exists"));
  }
  KVR_RETURN_IF_ERROR(CheckCapability(access.capability));
  KVR_RETURN_IF_ERROR(CheckLeaseOwner(access.lease_owner, /*allow_empty=*/true));
  KVR_ASSIGN_OR_RETURN(std::shared_ptr<Sequence> source,
                       FindFor(source_id, source_capability, "ForkSequence"));
  if (options_.persistence != nullptr) {
    return absl::FailedPreconditionError(absl::StrCat(
        where, ": not supported on a node with persistence (--data_dir); create the "
               "sequence and upload its shards instead"));
  }
  std::shared_ptr<Sequence> fork;
  // Held until the fork is served or abandoned: a deferred build the fork
  // joined (Chunk::pending) installs into it only after that, and into an
  // abandoned fork (marked dropped) not at all, so its bytes stay exact.
  std::unique_lock<std::shared_mutex> fork_lock;
  bool forked = false;
  struct DropUnlessForked {
    std::shared_ptr<Sequence>* created;
    const bool* served;
    ~DropUnlessForked() {
      if (!*served && *created != nullptr) (*created)->dropped = true;
    }
  } drop_unless_forked{&fork, &forked};
  int64_t bytes = 0;
  {
    // Exclusive: every writer of a head (appends, seals, recalibration
    // swaps) holds it so, and the copy sees one consistent state.
    std::unique_lock<std::shared_mutex> lock(source->mu);
    if (source->dropped) {
      return absl::NotFoundError(absl::StrCat("ForkSequence: unknown sequence ", source_id));
    }
    SequenceSpec spec = source->spec;
    spec.sequence_id = fork_id;
    fork = NewSequence(spec);
    fork_lock = std::unique_lock<std::shared_mutex>(fork->mu);
    const size_t d = static_cast<size_t>(spec.head_dim);
    for (size_t i = 0; i < source->heads.size(); ++i) {
      const HeadState& from = *source->heads[i];
      HeadState& to = *fork->heads[i];
      to.chunks.reserve(from.chunks.size());
      for (const Chunk& c : from.chunks) {
        Chunk copy;
        copy.chunk = c.chunk;
        copy.index = c.index;  // shared, immutable while shared
        if (c.pending != nullptr) {
          // The fork waits for the same deferred build, or takes its result
          // when it is built but not yet installed here.
          BuildJob& job = *c.pending;
          std::lock_guard<std::mutex> jlock(job.mu);
          if (job.state == BuildJob::State::kQueued || job.state == BuildJob::State::kRunning) {
            copy.pending = c.pending;
            job.targets.push_back(BuildJob::Target{
                fork, static_cast<int32_t>(i / static_cast<size_t>(spec.n_kv_heads)),
                static_cast<int32_t>(i % static_cast<size_t>(spec.n_kv_heads)), c.chunk});
          } else if (job.status.ok() && job.result != nullptr && c.index == job.placeholder) {
            copy.index = job.result;
          }
        }
        copy.values = c.values;
        copy.positions = c.positions;
        to.chunks.push_back(std::move(copy));
      }
      if (from.tail != nullptr) {
        KVR_ASSIGN_OR_RETURN(to.tail, index::FlatIndex::Create(d));
        to.tail->Reserve(std::max(options_.tail_capacity, from.tail->size()));
        if (from.tail->size() > 0) KVR_RETURN_IF_ERROR(to.tail->Add(from.tail->keys()));
        to.tail_values = from.tail_values;
        to.tail_positions = from.tail_positions;
      }
      to.last_position = from.last_position;
      to.accounted_bytes = HeadBytes(to);
      bytes += to.accounted_bytes;
    }
  }
  fork->owner.capability_sha256 = access.capability.empty() ? "" : Sha256(access.capability);
  fork->owner.principal = access.principal;
  fork->owner.lease_owner = access.lease_owner;
  KVR_RETURN_IF_ERROR(ReserveMemory(bytes, where));
  std::lock_guard<std::mutex> lock(mu_);
  if (sequences_.contains(fork_id) || quarantined_.contains(fork_id)) {
    memory_used_.fetch_sub(bytes, std::memory_order_relaxed);
    return absl::AlreadyExistsError(absl::StrCat(where, ": sequence ", fork_id, " exists"));
  }
  sequences_.emplace(fork_id, std::move(fork));
  if (!access.lease_owner.empty()) {
    lease_renewed_[access.lease_owner] = std::chrono::steady_clock::now();
  }
  forks_.fetch_add(1, std::memory_order_relaxed);
  forked = true;
  return absl::OkStatus();
}

absl::StatusOr<NodeStats> NodeCore::Stats(std::optional<std::string_view> principal) {
  std::vector<std::shared_ptr<Sequence>> seqs;
  NodeStats st;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& [id, s] : sequences_) {
      if (!principal.has_value() || s->owner.principal == *principal) seqs.push_back(s);
    }
    st.quarantined_sequences = static_cast<int64_t>(quarantined_.size());
  }
  st.leases_expired = leases_expired_.load(std::memory_order_relaxed);
  st.sequences = static_cast<int64_t>(seqs.size());
  st.seals = seals_.load(std::memory_order_relaxed);
  st.recalibrations = recalibrations_.load(std::memory_order_relaxed);
  st.shard_uploads = shard_uploads_.load(std::memory_order_relaxed);
  st.index_builds_pending = builds_pending_.load(std::memory_order_relaxed);
  st.forks = forks_.load(std::memory_order_relaxed);
  for (const auto& s : seqs) {
    std::shared_lock<std::shared_mutex> lock(s->mu);
    for (const auto& h : s->heads) {
      for (const Chunk& c : h->chunks) {
        st.shards += 1;
        if (c.index != nullptr) {
          st.indexed_keys += static_cast<int64_t>(c.index->size());
          st.memory_bytes += static_cast<int64_t>(c.index->MemoryBytes());
        }
        st.memory_bytes += static_cast<int64_t>(c.values.MemoryBytes() +
                                                c.positions.capacity() * sizeof(int64_t));
      }
      if (h->tail != nullptr) {
        st.tail_keys += static_cast<int64_t>(h->tail->size());
        st.memory_bytes += static_cast<int64_t>(h->tail->MemoryBytes() +
                                                h->tail_values.MemoryBytes());
      }
    }
  }
  return st;
}

absl::StatusOr<std::vector<ShardInfo>> NodeCore::ListShards(std::optional<uint64_t> sequence_id) {
  std::vector<std::shared_ptr<Sequence>> seqs;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (sequence_id.has_value()) {
      auto it = sequences_.find(*sequence_id);
      if (it == sequences_.end()) {
        return absl::NotFoundError(absl::StrCat("ListShards: unknown sequence ", *sequence_id));
      }
      seqs.push_back(it->second);
    } else {
      for (auto& [id, s] : sequences_) seqs.push_back(s);
    }
  }
  return Describe(seqs);
}

absl::StatusOr<std::vector<ShardInfo>> NodeCore::ListShards(std::optional<uint64_t> sequence_id,
                                                             std::string_view capability,
                                                             std::string_view principal) {
  std::vector<std::shared_ptr<Sequence>> seqs;
  if (sequence_id.has_value()) {
    KVR_ASSIGN_OR_RETURN(std::shared_ptr<Sequence> seq,
                         FindFor(*sequence_id, capability, "ListShards"));
    seqs.push_back(std::move(seq));
  } else {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& [id, s] : sequences_) {
      if (s->owner.principal == principal) seqs.push_back(s);
    }
  }
  return Describe(seqs);
}

std::vector<ShardInfo> NodeCore::Describe(const std::vector<std::shared_ptr<Sequence>>& seqs) {
  std::vector<ShardInfo> out;
  for (const auto& s : seqs) {
    std::shared_lock<std::shared_mutex> lock(s->mu);
    for (int32_t layer = 0; layer < s->spec.n_layers; ++layer) {
      for (int32_t g = 0; g < s->spec.n_kv_heads; ++g) {
        const HeadState& h = s->head(layer, g);
        for (size_t ci = 0; ci < h.chunks.size(); ++ci) {
          const Chunk& c = h.chunks[ci];
          ShardInfo info;
          info.key = ShardKey{s->spec.sequence_id, layer, g, c.chunk};
          info.index_pending = c.pending != nullptr;
          if (c.index != nullptr) {
            info.n_keys = static_cast<int64_t>(c.index->size());
            info.memory_bytes += static_cast<int64_t>(c.index->MemoryBytes());
            info.index_type = c.index->type();
            if (const index::CalibrationResult* cal = c.index->calibration(); cal != nullptr) {
              info.search_effort = index::CalibratedEffort(*cal);
              if (!std::isnan(cal->expected_recall)) info.expected_recall = cal->expected_recall;
              info.measured_search_us = cal->measured_us;
            } else if (info.index_type == IndexType::kFlat) {
              info.expected_recall = 1.0;  // exact
            }
          }
          info.memory_bytes += static_cast<int64_t>(c.values.MemoryBytes() +
                                                    c.positions.capacity() * sizeof(int64_t));
          if (!c.positions.empty()) {
            info.first_position = c.positions.front();
            info.last_position = c.positions.back();
          }
          if (ci + 1 == h.chunks.size() && !h.tail_positions.empty()) {
            info.tail_keys = static_cast<int64_t>(h.tail_positions.size());
            if (info.first_position < 0) info.first_position = h.tail_positions.front();
            info.last_position = h.tail_positions.back();
          }
          if (ci + 1 == h.chunks.size() && h.tail != nullptr) {
            info.memory_bytes += static_cast<int64_t>(h.tail->MemoryBytes() +
                                                      h.tail_values.MemoryBytes());
          }
          out.push_back(info);
        }
      }
    }
  }
  return out;
}

absl::StatusOr<std::vector<int64_t>> NodeCore::HeldPositions(uint64_t sequence_id, int32_t layer,
                                                             int32_t kv_head) {
  std::shared_ptr<Sequence> seq = Find(sequence_id);
  if (seq == nullptr) {
    return absl::NotFoundError(absl::StrCat("HeldPositions: unknown sequence ", sequence_id));
  }
  std::shared_lock<std::shared_mutex> lock(seq->mu);
  KVR_RETURN_IF_ERROR(CheckHead(seq->spec, layer, kv_head));
  const HeadState& head = seq->head(layer, kv_head);
  std::vector<int64_t> out;
  for (const Chunk& c : head.chunks) out.insert(out.end(), c.positions.begin(), c.positions.end());
  out.insert(out.end(), head.tail_positions.begin(), head.tail_positions.end());
  std::sort(out.begin(), out.end());
  return out;
}

absl::StatusOr<std::vector<int64_t>> NodeCore::SearchPositions(uint64_t sequence_id,
                                                              int32_t layer, int32_t kv_head,
                                                              ConstMatrixView queries, int k) {
  std::shared_ptr<Sequence> seq = Find(sequence_id);
  if (seq == nullptr) {
    return absl::NotFoundError(absl::StrCat("SearchPositions: unknown sequence ", sequence_id));
  }
  std::shared_lock<std::shared_mutex> lock(seq->mu);
  KVR_RETURN_IF_ERROR(CheckHead(seq->spec, layer, kv_head));
  KVR_RETURN_IF_ERROR(CheckMatrix(queries, seq->spec, -1, "queries", "SearchPositions"));
  if (k < 1 || k > index::kMaxSearchK) {
    return absl::InvalidArgumentError(
        absl::StrCat("k ", k, " outside [1, ", index::kMaxSearchK, "]"));
  }
  const HeadState& head = seq->head(layer, kv_head);
  const size_t rows = queries.rows(), kk = static_cast<size_t>(k);
  std::vector<std::vector<std::pair<float, int64_t>>> found(rows);
  auto search = [&](const index::KeyIndex& idx, const std::vector<int64_t>& positions) {
    if (idx.size() == 0) return absl::OkStatus();
    index::SearchParams p;
    p.k = static_cast<int>(std::min(kk, idx.size()));
    const size_t w = static_cast<size_t>(p.k);
    std::vector<int64_t> ids(rows * w);
    std::vector<float> scores(rows * w);
    KVR_RETURN_IF_ERROR(idx.Search(queries, p, ids, scores));
    for (size_t q = 0; q < rows; ++q) {
      for (size_t j = 0; j < w; ++j) {
        const int64_t id = ids[q * w + j];
        if (id >= 0) found[q].emplace_back(scores[q * w + j], positions[static_cast<size_t>(id)]);
      }
    }
    return absl::OkStatus();
  };
  for (const Chunk& c : head.chunks) {
    if (c.index != nullptr) KVR_RETURN_IF_ERROR(search(*c.index, c.positions));
  }
  if (head.tail != nullptr) KVR_RETURN_IF_ERROR(search(*head.tail, head.tail_positions));
  std::vector<int64_t> out(rows * kk, -1);
  for (size_t q = 0; q < rows; ++q) {
    auto& f = found[q];
    std::sort(f.begin(), f.end(), [](const auto& a, const auto& b) {
      return a.first != b.first ? a.first > b.first : a.second < b.second;
    });
    for (size_t j = 0; j < std::min(kk, f.size()); ++j) out[q * kk + j] = f[j].second;
  }
  return out;
}

}  // namespace kvr::retrieval
