// NodeCore's in-memory state, shared by the files that implement it
// (node_core.cc: the operations; node_recovery.cc: rebuilding from the
// persistence). Internal to retrieval_node/core/: nothing else includes it.
#pragma once

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
#include "retrieval_node/index/flat_index.h"
#include "retrieval_node/index/index.h"

namespace kvr::retrieval {

struct NodeCore::Chunk {
  int32_t chunk = 0;
  std::unique_ptr<index::KeyIndex> index;  // null until the first build
  ValueMatrix values;                      // row i belongs to index id i
  std::vector<int64_t> positions;          // absolute position of index id i
};

struct NodeCore::HeadState {
  std::vector<Chunk> chunks;  // ascending chunk index
  std::unique_ptr<index::FlatIndex> tail;
  ValueMatrix tail_values;
  std::vector<int64_t> tail_positions;
  int64_t last_position = -1;  // highest position held (-1: none)
  int64_t accounted_bytes = 0;  // counted in memory_used_ (under the sequence lock)

  // Recent decode queries (ring of `recent_capacity` rows), training data for
  // seals that build an index. Written by Attend under the shared sequence
  // lock, hence its own mutex.
  std::mutex query_mu;
  std::vector<float> recent;
  size_t recent_next = 0;
  size_t recent_count = 0;
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

}  // namespace internal
}  // namespace kvr::retrieval
