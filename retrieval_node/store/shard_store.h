// ShardStore: the RocksDB implementation of ShardPersistence
// (retrieval_node/core/shard_persistence.h) behind kvr_node --data_dir.
//
// Key layout (one default column family; integers big-endian so that byte
// order is numeric order; positions and rows with the sign bit flipped):
//
//   "F"                                        format record (u32 version)
//   "S" seq:8                                  sequence spec
//   "S" seq:8 layer:4 head:4 "C" chunk:4 "I"   chunk index blob (KeyIndex::Serialize)
//   "S" seq:8 layer:4 head:4 "C" chunk:4 "M"   chunk meta: rows, has index
//   "S" seq:8 layer:4 head:4 "C" chunk:4 "V" first_row:8
//                                              value segment: rows of values + positions
//   "S" seq:8 layer:4 head:4 "H"               head meta: last position, tail rows
//   "S" seq:8 layer:4 head:4 "T" first_pos:8   tail segment: keys, values, positions
//
// Every value except "F" is a checksummed blob (common/serialize.h), so a
// flipped byte is found at recovery. A sequence's keys all start with
// "S" seq:8, so DropSequence is one DeleteRange; a head's tail is one
// DeleteRange of its "T" range. Each HeadWrite's records (chunk records,
// tail range delete, tail segment, head meta) go into one WriteBatch, written
// with WriteOptions::sync (WAL fsynced before the commit is acknowledged)
// unless ShardStoreOptions::sync is off. Keys travel inside the index blob, so
// a chunk's keys are rewritten with its index at every seal; values and
// positions are append-only segments.
//
// Group commit (ShardStoreOptions::group_commit, on by default): every write
// is encoded into the open group batch under the store's mutex, in call
// order; one writer thread takes the whole group while the previous write
// syncs and applies it as ONE atomic RocksDB write with one WAL sync, then
// acknowledges each member. So N concurrent appends cost one fsync, not N,
// and a crash leaves a prefix of the call order (never half a HeadWrite:
// a group is atomic). Without it every write is its own synced write on the
// caller's thread.
//
// Thread-safe.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "retrieval_node/core/shard_persistence.h"

namespace kvr::retrieval {

struct ShardStoreOptions {
  // fsync the write-ahead log before every commit returns (durable across
  // power loss). Off: a commit survives a process crash but not an OS crash.
  bool sync = true;
  // Group concurrent writes into one synced RocksDB write (see the file
  // comment). Off, or with sync off: one write (and one sync, if any) per
  // call, on the caller's thread.
  bool group_commit = true;
  // Encoded bytes the open group may hold before new writes wait for the
  // writer thread to take it (backpressure; a single larger write proceeds
  // alone). Group commit only.
  size_t max_group_bytes = size_t{64} << 20;
};

// Counters since Open (tests, benchmarks).
struct ShardStoreStats {
  int64_t commits = 0;  // PutSequence / DropSequence / CommitHead(Async) calls written
  int64_t writes = 0;   // RocksDB writes issued for them (one sync each when sync is on)
};

class ShardStore final : public ShardPersistence {
 public:
  // Opens (creating when missing) the store under `dir`. FailedPrecondition
  // for a store of another format version; Unavailable when RocksDB cannot
  // open it (e.g. another process holds it).
  static absl::StatusOr<std::unique_ptr<ShardStore>> Open(const std::string& dir,
                                                          const ShardStoreOptions& options = {});
  ~ShardStore() override;

  absl::Status PutSequence(const SequenceSpec& spec, const SequenceOwner& owner) override;
  absl::Status DropSequence(uint64_t sequence_id) override;
  absl::Status CommitHead(const HeadWrite& write) override;
  void CommitHeadAsync(const HeadWrite& write, StatusCallback done) override;
  absl::Status Recover(
      const std::function<absl::Status(const SequenceSpec&, const SequenceOwner&)>& on_sequence,
      const std::function<absl::Status(uint64_t sequence_id, RecoveredHead head)>& on_head)
      override;
  absl::Status RecoverSkippingBadSequences(
      const std::function<absl::Status(const SequenceSpec&, const SequenceOwner&)>& on_sequence,
      const std::function<absl::Status(uint64_t sequence_id, RecoveredHead head)>& on_head,
      const std::function<void(uint64_t sequence_id, const absl::Status& why)>& on_bad_sequence)
      override;

  const std::string& dir() const { return dir_; }
  ShardStoreStats stats() const;

  // The keys above (tests address single records with them).
  static std::string SequenceKey(uint64_t sequence_id);
  static std::string HeadPrefix(uint64_t sequence_id, int32_t layer, int32_t kv_head);
  static std::string ChunkIndexKey(const ShardKey& shard);
  static std::string ChunkMetaKey(const ShardKey& shard);
  static std::string ValueSegmentKey(const ShardKey& shard, int64_t first_row);
  static std::string HeadMetaKey(uint64_t sequence_id, int32_t layer, int32_t kv_head);
  static std::string TailSegmentKey(uint64_t sequence_id, int32_t layer, int32_t kv_head,
                                    int64_t first_position);

 private:
  // Recover's walk; a null `on_bad_sequence` stops at the first error.
  absl::Status Walk(
      const std::function<absl::Status(const SequenceSpec&, const SequenceOwner&)>& on_sequence,
      const std::function<absl::Status(uint64_t sequence_id, RecoveredHead head)>& on_head,
      const std::function<void(uint64_t sequence_id, const absl::Status& why)>& on_bad_sequence);
  struct Db;
  ShardStore(std::string dir, const ShardStoreOptions& options, std::unique_ptr<Db> db);

  std::string dir_;
  ShardStoreOptions options_;
  std::unique_ptr<Db> db_;
};

}  // namespace kvr::retrieval
