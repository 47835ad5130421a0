// Node-to-node shard copy (RetrievalClient::SyncShards): what the source
// node reads out of its NodeCore (NodeCore::ReadShards) and the destination
// installs (NodeCore::SyncShards), as plain structs. The kvr.v1 ReadShards
// stream carries exactly these (retrieval_node/server/node_service.cc); an
// in-process SyncSource lets tests sync two NodeCores directly.
//
// Unit: one chunk of one (layer, kv head). A chunk's rows are its index
// rows followed, for the head's last chunk, by its tail rows (appended keys
// not yet sealed). The destination asks per chunk it holds for the rows after
// its last one (a cursor); the source answers per chunk with every row's
// position (so the destination can check that what it holds is a prefix),
// the index blob (KeyIndex::Serialize, the encoder persistence uses) unless
// the destination's index already has the same rows, the values (and, for
// tail rows, the keys) of the rows after the cursor only, and a checksum of
// the rows before it (so equal positions with other contents are caught).
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "common/status.h"
#include "retrieval_node/core/node_types.h"

namespace kvr::retrieval {

// What the destination holds of one chunk.
struct SyncCursor {
  int32_t layer = 0;
  int32_t kv_head = 0;
  int32_t chunk = 0;
  int64_t after_position = -1;    // send the rows after this position (-1: every row)
  int64_t known_index_rows = -1;  // rows of the destination's index (-1: none / unknown)
};

// Which chunks of one sequence to read.
struct ReadShardsQuery {
  uint64_t sequence_id = 0;
  // True: every chunk the source holds (cursors give what the destination
  // holds of some; a cursor for a chunk the source lacks is ignored). False:
  // exactly the cursors' chunks (NotFound naming one the source lacks).
  bool all = false;
  std::vector<SyncCursor> cursors;
  std::string capability;  // the sequence's (PermissionDenied on a mismatch)
};

// One chunk as the source sends it.
struct SyncChunkData {
  int32_t layer = 0;
  int32_t kv_head = 0;
  int32_t chunk = 0;
  bool last = false;       // the head's last chunk on the source (rows include the tail)
  int64_t index_rows = 0;  // rows in the source's index; the rest are tail rows
  std::vector<int64_t> positions;  // every row, ascending
  // KeyIndex::Serialize of the index; empty when index_rows == 0 or the
  // destination's cursor said its index has index_rows rows (kept).
  std::vector<uint8_t> index_blob;
  int64_t first_sent_row = 0;   // rows [first_sent_row, rows) carry values below
  // CRC32C of rows [0, first_sent_row) -- per row its fp32 key, raw value
  // and int64 position bytes -- so the destination can tell rows it holds at
  // the same positions but with other contents (it then reads the chunk
  // whole).
  uint32_t prefix_crc = 0;
  std::vector<uint8_t> values;  // those rows, the sequence's value dtype, raw
  // Keys (fp32) of the tail rows among them: rows [max(first_sent_row,
  // index_rows), rows).
  std::vector<float> tail_keys;

  // Bytes of payload (what the source declares and the destination budgets).
  int64_t PayloadBytes() const {
    return static_cast<int64_t>(positions.size() * sizeof(int64_t) + index_blob.size() +
                                values.size() + tail_keys.size() * sizeof(float));
  }
};

// Sent first: the sequence and the size of everything that follows.
struct SyncHeader {
  SequenceSpec spec;
  int64_t payload_bytes = 0;  // sum of PayloadBytes() of the chunks
  int64_t chunks = 0;
};

// Where a destination reads from: runs `query` against the source and hands
// over the header, then each chunk, stopping at the first callback error
// (returned as is). Implementations: the gRPC ReadShards stream
// (node_service.cc), NodeCoreSyncSource (in process, tests).
class SyncSource {
 public:
  virtual ~SyncSource() = default;
  virtual absl::Status Read(const ReadShardsQuery& query,
                            const std::function<absl::Status(const SyncHeader&)>& on_header,
                            const std::function<absl::Status(SyncChunkData)>& on_chunk) = 0;
};

}  // namespace kvr::retrieval
