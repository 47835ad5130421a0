// The prefill hand-off: after each prefill layer, the middle tokens of every
// kv head (between the sinks and the window) go to the retrieval nodes as
// placement chunks, each with its index's training data (the exact
// top-train_k keys within the chunk of a stratified sample of at most
// max_train_queries prefill queries, common/train_topk.h), so the nodes build their
// indexes while later layers compute (DESIGN §4: index build hides behind
// prefill).
//
// PrefillHandOff owns a ring of host staging slots (a layer's K, V, Q and
// training data) and a small pool of low-priority threads that compute the
// training top-k (when the backend did not) and upload the chunks. The
// engine fills a slot under its backend lock, optionally runs the backend's
// TopK into it, and starts the upload; the returned future says when the
// layer is on the node (the first decode step waits for it just before that
// layer needs the node).
//
// Thread-safety: WaitSlot, NextSlot and Start are called by one prefill at a
// time (the engine's prefill mutex); uploads run on the pool. Destruction
// runs every queued upload first.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <future>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "common/thread_pool.h"
#include "common/train_topk.h"
#include "gpu_worker/backend/backend.h"
#include "gpu_worker/engine/attention_options.h"
#include "gpu_worker/engine/cancel_token.h"
#include "gpu_worker/model/model_config.h"
#include "retrieval_node/client/retrieval_client.h"

namespace kvr::worker {

// How a prompt's offloaded middle (between sinks and window) splits into
// placement chunks, and the width of its training top-k lists: the one
// geometry that the backend's top-k and the hand-off's uploads both index by.
struct OffloadGeometry {
  size_t mid;       // offloaded tokens
  size_t chunk;     // tokens per chunk (the last may hold fewer)
  size_t chunks;
  size_t max_topk;  // chunk ci's lists are TopK(ci) <= max_topk wide

  // prompt_len > a.sinks + a.window.
  OffloadGeometry(const AttentionOptions& a, int64_t prompt_len);
  size_t Begin(size_t ci) const { return ci * chunk; }
  size_t Rows(size_t ci) const { return std::min(chunk, mid - Begin(ci)); }
  size_t TopK(size_t ci) const { return std::min(max_topk, Rows(ci)); }
};

// Host staging of one layer's hand-off.
struct HandOffStaging {
  std::vector<float> k, v, q;  // [n x kv_dim], [n x kv_dim], [n x q_dim]
  std::vector<float> train_queries, train_scores;
  std::vector<int64_t> train_ids;
  // Training top-k from Backend::TopK: chunk ci's lists start at
  // ci * backend_stride, kv head g's at g * (queries * that chunk's k)
  // within (every query: the upload keeps the sampled rows); backend_stride
  // 0: none, the upload runs TrainingTopK.
  std::vector<int64_t> backend_ids;
  std::vector<float> backend_scores;
  size_t backend_stride = 0;
  std::shared_future<absl::Status> busy;  // the upload using it, if any
};

// One sequence's layer upload: where it goes and what it reports.
struct HandOffJob {
  retrieval::RetrievalClient* client = nullptr;
  std::shared_ptr<const LlamaConfig> config;  // kept alive by the job
  AttentionOptions attention;
  uint64_t sequence_id = 0;
  std::string capability;  // the sequence's, sent with every upload
  int layer = 0;
  int64_t prompt_len = 0;
  CancelToken cancel;  // a cancelled sequence's queued upload is skipped
  // Raised to the upload's finish time, in ns since `start`.
  std::shared_ptr<std::atomic<int64_t>> done_ns;
  std::chrono::steady_clock::time_point start;
  // Which prefill queries train the graph (set by PrefillHandOff::Start).
  TrainingTopKOptions train_options;
};

class PrefillHandOff {
 public:
  // `threads` upload threads at nice value `nice` (0 threads: Start runs the
  // upload on the caller), `depth` >= 1 staging slots. Each (kv head, chunk)
  // trains on TrainingTopK's sample of the prefill queries under
  // `train_options` (validated by the caller).
  PrefillHandOff(int threads, int depth, int nice,
                 const TrainingTopKOptions& train_options = {});
  ~PrefillHandOff();

  // Waits until the slot the next layer uses is free (no upload reads it).
  void WaitSlot();
  // The next layer's slot (waited for), advancing the ring. Its `busy` is
  // cleared.
  HandOffStaging* NextSlot();

  // Fills staging's backend_* with every (kv head, chunk)'s training top-k
  // of this layer, computed by the backend's TopK on q [prompt_len x q_dim]
  // and k [prompt_len x kv_dim], when the index trains on it and the
  // backend's TopK takes train_k; else leaves backend_stride 0. Waits for
  // the backend. Returns the (layer, kv head, chunk) lists computed there in
  // *shards (added).
  static absl::Status BackendTrainingTopK(Backend& backend, const LlamaConfig& c,
                                          const AttentionOptions& attention, const Tensor& q,
                                          const Tensor& k, int64_t prompt_len,
                                          HandOffStaging* staging, int64_t* shards);

  // Starts `job`'s upload from `staging` (filled: k, v, and q when the index
  // trains) on the pool, or runs it now when synchronous. The future holds
  // its status; `staging` stays busy until then.
  std::shared_future<absl::Status> Start(HandOffJob job, HandOffStaging* staging);

  bool synchronous() const { return pool_ == nullptr; }

 private:
  // Per kv head and chunk: the training top-k (unless precomputed) and
  // UploadShard.
  static absl::Status UploadLayer(const HandOffJob& job, HandOffStaging* staging);

  std::vector<std::unique_ptr<HandOffStaging>> staging_;
  size_t next_ = 0;
  int nice_ = 0;
  TrainingTopKOptions train_options_;
  // Declared last: destroyed first, running every queued upload.
  std::unique_ptr<ThreadPool> pool_;
};

}  // namespace kvr::worker
