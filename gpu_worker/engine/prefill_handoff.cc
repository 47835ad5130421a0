#include "gpu_worker/engine/prefill_handoff.h"

#include <algorithm>
#include <span>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "common/train_topk.h"
#ifdef __linux__
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace kvr::worker {
namespace {

using Clock = std::chrono::steady_clock;

// A future already holding `status`.
std::shared_future<absl::Status> Ready(absl::Status status) {
  std::promise<absl::Status> p;
  p.set_value(std::move(status));
  return p.get_future().share();
}

// Raises the calling thread's nice value to `nice` (once per thread; Linux
// applies PRIO_PROCESS with a thread id to that thread only).
void LowerThreadPriority(int nice) {
  thread_local bool done = false;
  if (done || nice <= 0) return;
  done = true;
#ifdef __linux__
  setpriority(PRIO_PROCESS, static_cast<id_t>(syscall(SYS_gettid)), nice);
#endif
}

// Self-calibration (retrieval_node/index/calibrate.h): every
// kHoldoutEvery-th training query (more sparsely for long prompts, so at
// most kMaxHoldoutRows spread over the whole prompt) is held back from a
// chunk's training top-k and uploaded with its exact top-k as held-back
// queries, on which the node chooses its search effort (and, for index
// auto, its kind). Prompts with fewer than kMinHoldoutRows held back send none.
constexpr size_t kHoldoutEvery = 8;
constexpr size_t kMaxHoldoutRows = 512;
constexpr size_t kMinHoldoutRows = 8;

// Splits a chunk's training top-k rows (`ids`: rows x width) into training
// and held-back rows: held-back rows' ids go to `holdout_ids` and their
// queries (query_row(i): row i's d floats) to `holdout_queries`; the other
// rows are compacted, in order, to the front of `ids`. Returns the training
// rows kept (all rows when too few would be held back).
template <typename QueryRow>
size_t SplitHoldout(std::span<int64_t> ids, size_t width, size_t d, QueryRow&& query_row,
                    std::vector<float>* holdout_queries, std::vector<int64_t>* holdout_ids) {
  holdout_queries->clear();
  holdout_ids->clear();
  const size_t rows = width == 0 ? 0 : ids.size() / width;
  const size_t every = std::max(kHoldoutEvery, (rows + kMaxHoldoutRows - 1) / kMaxHoldoutRows);
  if (rows / every < kMinHoldoutRows) return rows;
  size_t kept = 0;
  for (size_t i = 0; i < rows; ++i) {
    int64_t* row = ids.data() + i * width;
    if (i % every == every - 1 && holdout_ids->size() < kMaxHoldoutRows * width) {
      holdout_ids->insert(holdout_ids->end(), row, row + width);
      const float* q = query_row(i);
      holdout_queries->insert(holdout_queries->end(), q, q + d);
    } else {
      if (kept != i) std::copy_n(row, width, ids.data() + kept * width);
      ++kept;
    }
  }
  return kept;
}

int64_t NanosSince(Clock::time_point since) {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - since).count();
}

void StoreMax(std::atomic<int64_t>& a, int64_t v) {
  int64_t cur = a.load(std::memory_order_relaxed);
  while (cur < v && !a.compare_exchange_weak(cur, v, std::memory_order_relaxed)) {
  }
}

}  // namespace

OffloadGeometry::OffloadGeometry(const AttentionOptions& a, int64_t prompt_len)
    : mid(static_cast<size_t>(prompt_len - a.window - a.sinks)),
      chunk(static_cast<size_t>(a.chunk_tokens)),
      chunks((mid + chunk - 1) / chunk),
      max_topk(std::min(static_cast<size_t>(a.train_k), std::min(mid, chunk))) {}

PrefillHandOff::PrefillHandOff(int threads, int depth, int nice,
                               const TrainingTopKOptions& train_options)
    : nice_(nice), train_options_(train_options) {
  for (int i = 0; i < depth; ++i) staging_.push_back(std::make_unique<HandOffStaging>());
  if (threads > 0) pool_ = std::make_unique<ThreadPool>(static_cast<size_t>(threads));
}

PrefillHandOff::~PrefillHandOff() = default;

void PrefillHandOff::WaitSlot() {
  HandOffStaging& next = *staging_[next_];
  // An earlier layer's (or sequence's) upload still reads this slot. The
  // future is only set and cleared by the one prefill calling us.
  if (next.busy.valid()) next.busy.wait();
}

HandOffStaging* PrefillHandOff::NextSlot() {
  HandOffStaging* staging = staging_[next_].get();
  next_ = (next_ + 1) % staging_.size();
  // Normally free already: the engine calls WaitSlot outside its backend lock.
  if (staging->busy.valid()) staging->busy.wait();  // an earlier layer's upload
  staging->busy = {};
  return staging;
}

std::shared_future<absl::Status> PrefillHandOff::Start(HandOffJob job, HandOffStaging* staging) {
  job.train_options = train_options_;
  if (pool_ == nullptr) {
    absl::Status st = UploadLayer(job, staging);
    StoreMax(*job.done_ns, NanosSince(job.start));
    return Ready(std::move(st));
  }
  auto promise = std::make_shared<std::promise<absl::Status>>();
  std::shared_future<absl::Status> done = promise->get_future().share();
  staging->busy = done;
  pool_->Schedule([promise, job = std::move(job), staging, nice = nice_] {
    LowerThreadPriority(nice);
    absl::Status st =
        job.cancel.cancelled()
            ? absl::CancelledError(absl::StrCat("sequence ", job.sequence_id, " cancelled"))
            : UploadLayer(job, staging);
    StoreMax(*job.done_ns, NanosSince(job.start));
    promise->set_value(std::move(st));
  });
  return done;
}

absl::Status PrefillHandOff::BackendTrainingTopK(Backend& backend, const LlamaConfig& c,
                                                 const AttentionOptions& attention,
                                                 const Tensor& q, const Tensor& k,
                                                 int64_t prompt_len, HandOffStaging* staging,
                                                 int64_t* shards) {
  staging->backend_stride = 0;
  if (attention.index != retrieval::IndexType::kGraph &&
      attention.index != retrieval::IndexType::kAuto) {
    return absl::OkStatus();
  }
  const OffloadGeometry geo(attention, prompt_len);
  if (!backend.SupportsOp(OptionalOp::kTopK) ||
      static_cast<size_t>(backend.MaxTopK()) < geo.max_topk) {
    return absl::OkStatus();
  }
  const size_t rows_per_query_set =
      static_cast<size_t>(prompt_len) * static_cast<size_t>(c.n_heads / c.n_kv_heads);
  const size_t kv_heads = static_cast<size_t>(c.n_kv_heads);
  const size_t stride = kv_heads * rows_per_query_set * geo.max_topk;
  staging->backend_ids.resize(geo.chunks * stride);
  staging->backend_scores.resize(staging->backend_ids.size());
  // One call (one wait) per chunk for every kv head.
  for (size_t ci = 0; ci < geo.chunks; ++ci) {
    const size_t rows = geo.Rows(ci), topk = geo.TopK(ci);
    const size_t count = kv_heads * rows_per_query_set * topk;
    const int64_t key_begin = attention.sinks + static_cast<int64_t>(geo.Begin(ci));
    KVR_RETURN_IF_ERROR(backend.TopK(q, k, c.attention_shape(), Backend::kAllKvHeads, key_begin,
                                     key_begin + static_cast<int64_t>(rows),
                                     static_cast<int>(topk),
                                     {staging->backend_ids.data() + ci * stride, count},
                                     {staging->backend_scores.data() + ci * stride, count}));
    *shards += c.n_kv_heads;
  }
  staging->backend_stride = stride;
  return absl::OkStatus();
}

absl::Status PrefillHandOff::UploadLayer(const HandOffJob& job, HandOffStaging* staging) {
  const LlamaConfig& c = *job.config;
  const AttentionOptions& attention = job.attention;
  const size_t d = static_cast<size_t>(c.head_dim);
  const size_t kv = static_cast<size_t>(c.kv_dim()), qd = static_cast<size_t>(c.q_dim());
  const OffloadGeometry geo(attention, job.prompt_len);
  const size_t group = static_cast<size_t>(c.n_heads / c.n_kv_heads);
  const size_t train_rows = static_cast<size_t>(job.prompt_len) * group;
  // Only the graph index trains on the queries' top-k (flat and IVF ignore
  // it); auto may choose the graph.
  const bool train = attention.index == retrieval::IndexType::kGraph ||
                     attention.index == retrieval::IndexType::kAuto;
  std::vector<float> holdout_queries;
  std::vector<int64_t> holdout_ids;
  // The backend may have computed it already (BackendTrainingTopK).
  const bool precomputed = train && staging->backend_stride != 0;
  // The training queries of each kv head: a stratified sample of at most
  // max_train_queries of its prompt_len x group prefill queries (row
  // p * group + j: position p, query head j of the group), the same rows for
  // every kv head and chunk.
  std::vector<size_t> sample;
  if (train) sample = TrainingQuerySample(train_rows, job.train_options);
  const size_t sampled = sample.size();
  if (train && (!precomputed || sampled < train_rows)) {
    staging->train_ids.resize(sampled * geo.max_topk);
  }
  if (train && !precomputed) {
    staging->train_queries.resize(sampled * d);
    staging->train_scores.resize(staging->train_ids.size());
  }
  for (int g = 0; g < c.n_kv_heads; ++g) {
    if (train && !precomputed) {
      for (size_t i = 0; i < sampled; ++i) {
        const size_t p = sample[i] / group, j = sample[i] % group;
        const float* src = staging->q.data() + p * qd + (g * group + j) * d;
        std::copy_n(src, d, staging->train_queries.data() + i * d);
      }
    }
    for (size_t ci = 0; ci < geo.chunks; ++ci) {
      const size_t rows = geo.Rows(ci);
      const size_t row0 = static_cast<size_t>(attention.sinks) + geo.Begin(ci);
      const ConstMatrixView keys(staging->k.data() + row0 * kv + g * d, rows, d, kv);
      const ConstMatrixView values(staging->v.data() + row0 * kv + g * d, rows, d, kv);
      retrieval::ShardUpload up;
      up.key = {job.sequence_id, job.layer, g, static_cast<int32_t>(ci)};
      up.capability = job.capability;
      up.first_position = static_cast<int64_t>(row0);
      up.keys = keys;
      up.values = values;
      if (train) {
        const size_t topk = geo.TopK(ci);
        std::span<int64_t> ids;
        if (precomputed) {
          const size_t offset = ci * staging->backend_stride + g * train_rows * topk;
          ids = {staging->backend_ids.data() + offset, train_rows * topk};
          if (sampled < train_rows) {  // the sampled queries' rows only
            for (size_t i = 0; i < sampled; ++i) {
              std::copy_n(ids.data() + sample[i] * topk, topk,
                          staging->train_ids.data() + i * topk);
            }
            ids = {staging->train_ids.data(), sampled * topk};
          }
        } else {
          // Already sampled: TrainingTopK keeps every row of it.
          const ConstMatrixView queries(staging->train_queries.data(), sampled, d);
          ids = {staging->train_ids.data(), sampled * topk};
          KVR_RETURN_IF_ERROR(TrainingTopK(keys, queries, static_cast<int>(topk),
                                           job.train_options, /*pool=*/nullptr, ids,
                                           {staging->train_scores.data(), ids.size()}));
        }
        // Training row i is the sampled query sample[i]: prefill position
        // sample[i] / group, query head g * group + sample[i] % group.
        auto query_row = [&](size_t i) {
          const size_t r = sample[i];
          return staging->q.data() + (r / group) * qd + (g * group + r % group) * d;
        };
        const size_t kept = SplitHoldout(ids, topk, d, query_row, &holdout_queries, &holdout_ids);
        up.train_topk = ids.first(kept * topk);
        up.train_topk_width = topk;
        up.holdout_queries = ConstMatrixView(holdout_queries.data(), holdout_ids.size() / topk, d);
        up.holdout_topk = holdout_ids;
        up.holdout_topk_width = holdout_ids.empty() ? 0 : topk;
      }
      KVR_RETURN_IF_ERROR(job.client->UploadShard(up));
    }
  }
  return absl::OkStatus();
}

}  // namespace kvr::worker
