// NodeCore's in-memory state, shared by the files that implement it
// (node_core.cc: the operations; node_recovery.cc: rebuilding from the
// persistence). Internal to retrieval_node/core/: nothing else includes it.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <limits>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <vector>

#include "common/status.h"
#include "common/value_matrix.h"
#include "retrieval_node/core/node_core.h"
#include "retrieval_node/core/node_types.h"
#include "retrieval_node/index/cluster_summary.h"
#include "retrieval_node/index/flat_index.h"
#include "retrieval_node/index/index.h"

namespace kvr::retrieval {

// The remainder-estimation summary of one chunk (issue 18; NodeCore::
// ChunkSummary). Written by Attend and by the summary thread under the
// shared sequence lock, hence its own mutex. Key ids of a chunk are append-only (row i of values / keys()
// stays key i across seals), so a summary of the first size() keys stays
// valid and is extended, never rebuilt.
struct NodeCore::EstimateSlot {
  std::mutex mu;
  std::shared_ptr<const index::ClusterSummary> summary;  // null: none yet
  int64_t bytes = 0;  // held in memory_used_ (returned by Drop); -1: returned
  // The budget refused a summary (or its build failed): this chunk is
  // attended exactly from then on instead of re-clustering at every Attend.
  bool refused = false;
  bool queued = false;  // a RefreshSummary for this slot is queued or running
};

struct NodeCore::Chunk {
  int32_t chunk = 0;
  // Null until the first build. Never changed in place while shared: a
  // background seal (SealJob::base) may be reading it with no lock held, so
  // a writer that finds it shared builds a copy instead (Seal).
  std::shared_ptr<index::KeyIndex> index;
  ValueMatrix values;                      // row i belongs to index id i
  std::vector<int64_t> positions;          // absolute position of index id i
  std::shared_ptr<EstimateSlot> estimate = std::make_shared<EstimateSlot>();
  // The deferred build this chunk waits for (NodeCore::BuildJob), or null.
  // While set, `index` is the job's flat placeholder and the head's tail is
  // not sealed into this chunk. Shared with forks of the sequence.
  std::shared_ptr<BuildJob> pending;
};

struct NodeCore::HeadState {
  std::vector<Chunk> chunks;  // ascending chunk index
  std::unique_ptr<index::FlatIndex> tail;
  ValueMatrix tail_values;
  std::vector<int64_t> tail_positions;
  int64_t last_position = -1;  // highest position held (-1: none)
  int64_t accounted_bytes = 0;  // counted in memory_used_ (under the sequence lock)

  // The background seal of the tail's first `sealing->rows` rows, or null
  // (see NodeCore::SealJob). Set and installed under the exclusive sequence
  // lock.
  std::shared_ptr<SealJob> sealing;

  // Recent decode queries (ring of options.decode_train_queries rows),
  // training data for seals that build an index. Written by Attend under the
  // shared sequence lock, hence its own mutex. `recent_bytes` is held in
  // memory_used_ (returned by Drop).
  std::mutex query_mu;
  std::vector<float> recent;
  size_t recent_next = 0;
  size_t recent_count = 0;
  int64_t recent_bytes = 0;
  // Ring queries since this head's last recalibration was queued, and
  // whether one is queued or running (NodeCoreOptions::recalibrate_every).
  size_t queries_since_recalibration = 0;
  bool recalibration_queued = false;
  // Ring queries since a seal last calibrated this head's new index.
  size_t queries_since_seal_calibration = 0;
};

// A tail seal built beside the sequence (NodeCore::StartSeal): its inputs
// are copies or immutable shares taken under the exclusive sequence lock, so
// RunSeal takes no lock of the sequence and may run on the seal thread, or
// inline on a caller that holds the lock (WaitSeal claims a job not yet
// started). Installed by InstallSeal under the exclusive lock.
struct NodeCore::SealJob {
  // --- inputs (fixed at StartSeal) ---
  std::shared_ptr<index::KeyIndex> base;  // the chunk's index then (null: none)
  bool rebuild = false;                   // build over base's keys + `keys`, else base + Add
  IndexType type = IndexType::kFlat;      // the sequence's index type
  Matrix keys;                            // the sealed tail rows (rows x head_dim)
  Matrix queries;                         // decode queries to train a rebuild on
  // Decode queries to calibrate the new index on (recalibrate_every > 0;
  // empty: keep the index's calibration).
  Matrix calibration_queries;
  size_t rows = 0;                        // keys.rows
  bool serialize = false;                 // produce `blob` (persistence)
  MemoryReservation reservation;          // the new index's bytes until installed

  // --- state and outputs (guarded by mu) ---
  std::mutex mu;
  std::condition_variable cv;
  enum class State { kQueued, kRunning, kDone } state = State::kQueued;
  absl::Status status;
  std::shared_ptr<index::KeyIndex> result;
  std::vector<uint8_t> blob;  // result->Serialize when `serialize`
};

// A deferred index build (NodeCoreOptions::defer_index_build, QueueBuild):
// the inputs the synchronous UploadShard build would use, copied at upload,
// built by RunBuild with no lock held and installed into every target chunk
// still pending on it (the uploading sequence's, and its forks').
struct NodeCore::BuildJob {
  // --- inputs (fixed at QueueBuild) ---
  IndexType type = IndexType::kFlat;  // the sequence's index type
  // The flat index installed at upload: its keys are the build's keys (never
  // changed while pending: the chunk's seals wait).
  std::shared_ptr<index::KeyIndex> placeholder;
  std::vector<int64_t> train_topk;
  size_t train_topk_width = 0;
  Matrix train_queries;
  int train_k = 0;
  size_t queries_per_search = 1;  // auto times searches of this many queries
  Matrix holdout_queries;
  std::vector<int64_t> holdout_topk;
  size_t holdout_topk_width = 0;
  bool serialize = false;  // persist the result (the node has persistence)
  // The copies above plus the index's estimated bytes beyond the flat
  // placeholder; returned once installed or discarded (guarded by mu).
  MemoryReservation reservation;

  struct Target {
    std::weak_ptr<Sequence> seq;
    int32_t layer = 0;
    int32_t kv_head = 0;
    int32_t chunk = 0;
  };

  // --- state and outputs (guarded by mu) ---
  std::mutex mu;
  std::condition_variable cv;
  enum class State { kQueued, kRunning, kBuilt, kFinished } state = State::kQueued;
  std::vector<Target> targets;  // ForkSequence adds its copies until kBuilt
  absl::Status status;
  std::shared_ptr<index::KeyIndex> result;
  std::vector<uint8_t> blob;  // result->Serialize when `serialize`
  double seconds = 0;         // the build's wall time
};

struct NodeCore::Sequence {
  SequenceSpec spec;
  SequenceOwner owner;  // fixed at creation (CreateSequence, SyncShards, Recover)
  std::shared_mutex mu;  // shared: Attend; exclusive: Upload / Append
  bool dropped = false;  // set by DropSequence under `mu`: later writers get NotFound
  std::vector<std::unique_ptr<HeadState>> heads;  // [layer * n_kv_heads + kv_head]

  HeadState& head(int32_t layer, int32_t kv_head) const {
    return *heads[static_cast<size_t>(layer) * spec.n_kv_heads + kv_head];
  }
};

namespace internal {

// The highest absolute position a token may have (positions are int64).
inline constexpr int64_t kMaxPosition = std::numeric_limits<int64_t>::max();
// Heads (n_layers x n_kv_heads) one sequence may have: each is a HeadState
// allocated at CreateSequence, so the product is bounded, not just each
// factor. 2^16 is 8x the largest open models (DeepSeek-V3: 61 x 128 = 7808).
inline constexpr int64_t kMaxHeadsPerSequence = int64_t{1} << 16;

// InvalidArgument naming first_position unless 0 <= first_position and the
// last of `rows` consecutive positions (first_position + rows - 1) fits
// int64 (kMaxPosition); `where` names the shard or head in the message.
absl::Status CheckPositionRange(int64_t first_position, size_t rows, absl::string_view where);

// InvalidArgument unless 0 <= layer < n_layers and 0 <= kv_head < n_kv_heads.
absl::Status CheckHead(const SequenceSpec& spec, int32_t layer, int32_t kv_head);

// InvalidArgument naming the field when `spec` is not a shape the node
// accepts (layers, heads, head_dim, value dtype, index type).
absl::Status ValidateSpec(const SequenceSpec& spec);

// `base` with queries_per_search set to the query heads per kv head of
// `spec` (n_heads / n_kv_heads, at least 1, at most kMaxHoldoutQueries):
// what auto times a candidate's search with (index/calibrate.h).
index::CalibrationOptions CalibrationForSpec(const SequenceSpec& spec,
                                             const index::CalibrationOptions& base);

}  // namespace internal
}  // namespace kvr::retrieval
