// ShardPersistence: where NodeCore writes what it acknowledges,
// and where it reads it back at startup. The core sees only this interface
// (no storage types); retrieval_node/store/ implements it over RocksDB. With
// no persistence configured the node is purely in memory (embedded mode).
//
// The unit of durability is one (sequence, layer, kv head) — a "head" — per
// call: every mutation of a head (an append, an append that seals the tail
// into the chunk index, an upload that first seals the previous tail) is
// described by ONE HeadWrite, and CommitHead applies it atomically and
// durably before returning. A crash leaves each head as it was after some
// acknowledged CommitHead, never between two.
//
// Thread-safety: implementations are thread-safe. The core calls CommitHead /
// CommitHeadAsync for one sequence under that sequence's exclusive lock (so
// writes of one head reach the store in the order they were applied) and
// serialises PutSequence / DropSequence of any sequence against each other.
//
// Order: every write (PutSequence, DropSequence, CommitHead, CommitHeadAsync)
// takes its place in the store's order when the call is made (before it
// returns), and writes are applied in that order; an asynchronous commit
// queued before a DropSequence is never applied after it.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <vector>

#include "common/status.h"
#include "common/tensor.h"
#include "common/value_matrix.h"
#include "retrieval_node/core/node_types.h"
#include "retrieval_node/index/index.h"

namespace kvr::retrieval {

// Rows added to a chunk's values and positions (the chunk's keys travel in
// its index blob). Spans point into the caller's memory for the call only.
struct ValueSegment {
  int64_t first_row = 0;               // chunk row the segment starts at
  int64_t rows = 0;
  std::span<const uint8_t> values;     // rows x head_dim of the sequence's value dtype, raw
  std::span<const int64_t> positions;  // rows absolute positions
};

// A chunk created or changed by a write.
struct ChunkWrite {
  int32_t chunk = 0;
  int64_t rows = 0;  // keys in the chunk's index after the write
  // KeyIndex::Serialize of the chunk's index after the write; empty only
  // when rows == 0 (a chunk created by an append, indexed at its first seal).
  std::vector<uint8_t> index_blob;
  std::optional<ValueSegment> segment;  // rows [first_row, first_row + rows) of the chunk
};

// Rows appended to a head's tail (the flat buffer not yet in an index).
struct TailWrite {
  ConstMatrixView keys;                // rows x head_dim fp32
  std::span<const uint8_t> values;     // rows x head_dim of the value dtype, raw
  std::span<const int64_t> positions;  // rows
};

// Everything one call changed in one head. Applied in this order: the head's
// records are deleted (when `replace`), the tail is cleared (when `clear_tail`), the chunks are written in order (a later
// entry for the same chunk replaces its index and row count), the tail rows
// are appended, the head's summary is replaced.
struct HeadWrite {
  uint64_t sequence_id = 0;
  int32_t layer = 0;
  int32_t kv_head = 0;
  int32_t head_dim = 0;             // the sequence's (width of every row below)
  DType value_dtype = DType::kF32;  // the sequence's (element type of `values` below)
  int64_t last_position = -1;  // highest position the head holds after the write
  int64_t tail_rows = 0;       // rows in the tail after the write
  bool clear_tail = false;     // the tail was folded into a chunk
  // The head was replaced as a whole (SyncShards): every record of the head
  // is deleted first, then `chunks` (each written whole) and `tail` rebuild it.
  bool replace = false;
  std::vector<ChunkWrite> chunks;
  std::optional<TailWrite> tail;
};

// One chunk as recovered.
struct RecoveredChunk {
  int32_t chunk = 0;
  std::unique_ptr<index::KeyIndex> index;  // null when the chunk has no keys yet
  ValueMatrix values;                      // row i belongs to index id i
  std::vector<int64_t> positions;
};

// One head as recovered: chunks ascending, then the tail.
struct RecoveredHead {
  int32_t layer = 0;
  int32_t kv_head = 0;
  int64_t last_position = -1;
  std::vector<RecoveredChunk> chunks;
  Matrix tail_keys;  // tail rows x head_dim
  ValueMatrix tail_values;
  std::vector<int64_t> tail_positions;
};

class ShardPersistence {
 public:
  virtual ~ShardPersistence() = default;

  // Durably records a new sequence: its spec and who owns it (the
  // capability's hash, principal, lease owner). The id is not in the store.
  virtual absl::Status PutSequence(const SequenceSpec& spec, const SequenceOwner& owner) = 0;

  // Durably deletes the sequence and everything of its heads.
  virtual absl::Status DropSequence(uint64_t sequence_id) = 0;

  // Applies `write` atomically and durably (see the file comment).
  virtual absl::Status CommitHead(const HeadWrite& write) = 0;

  // CommitHead without waiting: `write` is captured (encoded; its spans may
  // be reused) and ordered before this returns; `done` runs exactly once,
  // with CommitHead's status, after the write is durable (or failed). `done`
  // may run on a store thread before or after this returns: keep it short
  // and never wait on this store from it. Implementations that group
  // concurrent commits into one synced write override this; the default
  // commits inline.
  virtual void CommitHeadAsync(const HeadWrite& write, StatusCallback done) {
    done(CommitHead(write));
  }

  // Reads the whole store back, in order of sequence id: `on_sequence` for a
  // sequence's spec and owner (a record written before owners existed gives
  // an empty SequenceOwner: an open sequence), then `on_head` for each of its heads that holds
  // anything. Every blob is checked (checksums, sizes, dims, contiguity);
  // corrupt or inconsistent data is a DataLoss status naming the shard or
  // sequence, and recovery stops there. Errors returned by a callback stop
  // the walk and are returned as they are.
  virtual absl::Status Recover(
      const std::function<absl::Status(const SequenceSpec&, const SequenceOwner&)>& on_sequence,
      const std::function<absl::Status(uint64_t sequence_id, RecoveredHead head)>& on_head) = 0;

  // Recover that never stops at one bad sequence: when a sequence's records
  // are corrupt or inconsistent, or `on_sequence` / `on_head` fail for it,
  // `on_bad_sequence` is told (sequence id, why), the walk skips the rest of
  // that sequence's records (they stay in the store) and goes on with the
  // next one. Only errors that belong to no sequence (the store itself
  // unreadable) are returned. The default, for stores that cannot skip, is
  // Recover (stops at the first error).
  virtual absl::Status RecoverSkippingBadSequences(
      const std::function<absl::Status(const SequenceSpec&, const SequenceOwner&)>& on_sequence,
      const std::function<absl::Status(uint64_t sequence_id, RecoveredHead head)>& on_head,
      const std::function<void(uint64_t sequence_id, const absl::Status& why)>& on_bad_sequence) {
    (void)on_bad_sequence;
    return Recover(on_sequence, on_head);
  }
};

}  // namespace kvr::retrieval
