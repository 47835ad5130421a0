// NodeCore::ReadShards (the source of a node-to-node copy) and
// NodeCore::SyncShards (the destination), see node_core.h and node_sync.h.
#include <algorithm>
#include <cstring>
#include <map>
#include <set>
#include <shared_mutex>
#include <string>
#include <tuple>
#include <utility>

#include "common/serialize.h"
#include "retrieval_node/core/node_core.h"
#include "retrieval_node/core/node_state.h"
#include "retrieval_node/core/sequence_access.h"
#include "retrieval_node/index/flat_index.h"

namespace kvr::retrieval {
namespace {

using ChunkId = std::tuple<int32_t, int32_t, int32_t>;  // (layer, kv head, chunk)

size_t RowBytes(const SequenceSpec& spec) {
  return static_cast<size_t>(spec.head_dim) * DTypeSize(spec.value_dtype);
}

std::string ShardName(uint64_t sequence_id, int32_t layer, int32_t kv_head, int32_t chunk) {
  return ShardKey{sequence_id, layer, kv_head, chunk}.DebugString();
}

bool SameSpec(const SequenceSpec& a, const SequenceSpec& b) {
  return a.sequence_id == b.sequence_id && a.n_layers == b.n_layers && a.n_heads == b.n_heads &&
         a.n_kv_heads == b.n_kv_heads && a.head_dim == b.head_dim &&
         a.value_dtype == b.value_dtype && a.index_type == b.index_type;
}

}  // namespace

uint32_t NodeCore::PrefixCrc(const HeadState& head, size_t slot, size_t rows, size_t row_bytes) {
  const Chunk& c = head.chunks[slot];
  const size_t indexed = c.positions.size();
  uint32_t crc = 0;
  for (size_t j = 0; j < rows; ++j) {
    const bool in_index = j < indexed;
    const size_t t = j - (in_index ? 0 : indexed);
    const ConstMatrixView keys = in_index ? c.index->keys() : head.tail->keys();
    const auto* k = reinterpret_cast<const uint8_t*>(keys.row(t));
    crc = Crc32c(std::span<const uint8_t>(k, keys.cols() * sizeof(float)), crc);
    const ValueMatrix& values = in_index ? c.values : head.tail_values;
    crc = Crc32c(values.raw_bytes().subspan(t * row_bytes, row_bytes), crc);
    const int64_t p = in_index ? c.positions[t] : head.tail_positions[t];
    crc = Crc32c(std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(&p), sizeof(p)), crc);
  }
  return crc;
}

// --- source ------------------------------------------------------------------

absl::Status NodeCore::ReadShards(const ReadShardsQuery& query,
                                  const std::function<absl::Status(const SyncHeader&)>& on_header,
                                  const std::function<absl::Status(SyncChunkData)>& on_chunk) {
  if (query.cursors.size() > kMaxSyncCursors) {
    return absl::InvalidArgumentError(absl::StrCat("ReadShards: cursors lists ",
                                                   query.cursors.size(), " entries > max ",
                                                   kMaxSyncCursors));
  }
  KVR_ASSIGN_OR_RETURN(std::shared_ptr<Sequence> seq,
                       FindFor(query.sequence_id, query.capability, "ReadShards"));
  SyncHeader header;
  std::vector<SyncChunkData> out;
  MemoryReservation working;
  {
    std::shared_lock<std::shared_mutex> lock(seq->mu);
    if (seq->dropped) {
      return absl::NotFoundError(absl::StrCat("ReadShards: unknown sequence ", query.sequence_id));
    }
    const SequenceSpec& spec = seq->spec;
    header.spec = spec;
    std::map<ChunkId, const SyncCursor*> cursors;
    for (const SyncCursor& c : query.cursors) {
      const absl::Status in_range = internal::CheckHead(spec, c.layer, c.kv_head);
      if (!in_range.ok()) {
        return absl::InvalidArgumentError(
            absl::StrCat("ReadShards: cursors entry: ", in_range.message()));
      }
      if (!cursors.emplace(ChunkId{c.layer, c.kv_head, c.chunk}, &c).second) {
        return absl::InvalidArgumentError(
            absl::StrCat("ReadShards: cursors lists ",
                         ShardName(spec.sequence_id, c.layer, c.kv_head, c.chunk), " twice"));
      }
    }
    // The chunks to read, as (layer, kv head, slot, cursor).
    struct Pick {
      int32_t layer, kv_head;
      size_t slot;
      const SyncCursor* cursor;
    };
    std::vector<Pick> picks;
    if (query.all) {
      for (int32_t layer = 0; layer < spec.n_layers; ++layer) {
        for (int32_t g = 0; g < spec.n_kv_heads; ++g) {
          const HeadState& h = seq->head(layer, g);
          for (size_t i = 0; i < h.chunks.size(); ++i) {
            auto it = cursors.find(ChunkId{layer, g, h.chunks[i].chunk});
            picks.push_back({layer, g, i, it == cursors.end() ? nullptr : it->second});
          }
        }
      }
    } else {
      for (const auto& [id, cursor] : cursors) {
        const HeadState& h = seq->head(cursor->layer, cursor->kv_head);
        const int32_t want = cursor->chunk;  // (clang: no lambda capture of a binding)
        const auto it = std::find_if(h.chunks.begin(), h.chunks.end(),
                                     [want](const Chunk& c) { return c.chunk == want; });
        if (it == h.chunks.end()) {
          return absl::NotFoundError(absl::StrCat(
              "ReadShards: ",
              ShardName(spec.sequence_id, cursor->layer, cursor->kv_head, cursor->chunk),
              " is not held by the source"));
        }
        picks.push_back({cursor->layer, cursor->kv_head,
                         static_cast<size_t>(it - h.chunks.begin()), cursor});
      }
    }
    // Reserve the copy before making it (index blobs ~ their memory).
    const size_t d = static_cast<size_t>(spec.head_dim);
    int64_t estimate = 0;
    for (const Pick& p : picks) {
      const HeadState& h = seq->head(p.layer, p.kv_head);
      const Chunk& c = h.chunks[p.slot];
      const bool last = p.slot + 1 == h.chunks.size();
      const size_t rows = c.positions.size() + (last ? h.tail_positions.size() : 0);
      estimate += static_cast<int64_t>(rows * (sizeof(int64_t) + RowBytes(spec) + d * sizeof(float)));
      if (c.index != nullptr) estimate += static_cast<int64_t>(c.index->MemoryBytes());
    }
    const int64_t limit = options_.upload_memory_bytes;
    int64_t used = upload_memory_used_.load(std::memory_order_relaxed);
    do {
      if (limit > 0 && used + estimate > limit) {
        return absl::ResourceExhaustedError(absl::StrCat(
            "ReadShards of sequence ", spec.sequence_id, " needs ~", estimate,
            " bytes of working memory but upload_memory_bytes ", limit, " has ",
            std::max<int64_t>(0, limit - used), " left"));
      }
    } while (!upload_memory_used_.compare_exchange_weak(used, used + estimate,
                                                        std::memory_order_relaxed));
    working = MemoryReservation(&upload_memory_used_, estimate);
    for (const Pick& p : picks) {
      const HeadState& h = seq->head(p.layer, p.kv_head);
      const Chunk& c = h.chunks[p.slot];
      SyncChunkData data;
      data.layer = p.layer;
      data.kv_head = p.kv_head;
      data.chunk = c.chunk;
      data.last = p.slot + 1 == h.chunks.size();
      const size_t index_rows = c.index != nullptr ? c.index->size() : 0;
      data.index_rows = static_cast<int64_t>(index_rows);
      data.positions = c.positions;
      if (data.last) {
        data.positions.insert(data.positions.end(), h.tail_positions.begin(),
                              h.tail_positions.end());
      }
      const int64_t after = p.cursor != nullptr ? p.cursor->after_position : -1;
      const size_t rows = data.positions.size();
      const size_t first = static_cast<size_t>(
          std::upper_bound(data.positions.begin(), data.positions.end(), after) -
          data.positions.begin());
      data.first_sent_row = static_cast<int64_t>(first);
      data.prefix_crc = PrefixCrc(h, p.slot, first, RowBytes(spec));
      const bool kept = p.cursor != nullptr && p.cursor->known_index_rows == data.index_rows;
      if (index_rows > 0 && !kept) KVR_RETURN_IF_ERROR(c.index->Serialize(&data.index_blob));
      const size_t rb = RowBytes(spec);
      data.values.reserve((rows - first) * rb);
      if (first < index_rows) {
        const auto raw = c.values.raw_bytes().subspan(first * rb, (index_rows - first) * rb);
        data.values.insert(data.values.end(), raw.begin(), raw.end());
      }
      const size_t tail_first = std::max(first, index_rows);
      if (tail_first < rows) {
        const size_t t0 = tail_first - index_rows, tn = rows - tail_first;
        const auto raw = h.tail_values.raw_bytes().subspan(t0 * rb, tn * rb);
        data.values.insert(data.values.end(), raw.begin(), raw.end());
        const ConstMatrixView keys = h.tail->keys().rows_slice(t0, tn);
        data.tail_keys.resize(tn * d);
        for (size_t i = 0; i < tn; ++i) std::copy_n(keys.row(i), d, &data.tail_keys[i * d]);
      }
      header.payload_bytes += data.PayloadBytes();
      out.push_back(std::move(data));
    }
    header.chunks = static_cast<int64_t>(out.size());
  }
  KVR_RETURN_IF_ERROR(on_header(header));
  for (SyncChunkData& data : out) KVR_RETURN_IF_ERROR(on_chunk(std::move(data)));
  return absl::OkStatus();
}

// --- destination ----------------------------------------------------------------

absl::Status NodeCore::PlanSync(const SyncRequest& request, ReadShardsQuery* query) {
  const SequenceSpec& spec = request.spec;
  query->sequence_id = spec.sequence_id;
  query->capability = request.capability;
  query->all = request.shards.empty();
  query->cursors.clear();
  if (request.shards.size() > kMaxSyncCursors) {
    return absl::InvalidArgumentError(absl::StrCat("SyncShards: shards lists ",
                                                   request.shards.size(), " entries > max ",
                                                   kMaxSyncCursors));
  }
  std::set<ChunkId> listed;
  for (const ShardRef& s : request.shards) {
    const absl::Status in_range = internal::CheckHead(spec, s.layer, s.kv_head);
    if (!in_range.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("SyncShards: shards entry: ", in_range.message()));
    }
    if (s.chunk < 0) {
      return absl::InvalidArgumentError(absl::StrCat("SyncShards: shards entry chunk ", s.chunk, " < 0"));
    }
    if (!listed.emplace(s.layer, s.kv_head, s.chunk).second) {
      return absl::InvalidArgumentError(absl::StrCat(
          "SyncShards: shards lists ", ShardName(spec.sequence_id, s.layer, s.kv_head, s.chunk),
          " twice"));
    }
  }
  std::shared_ptr<Sequence> seq = Find(spec.sequence_id);
  std::map<ChunkId, SyncCursor> held;
  if (seq != nullptr) {
    KVR_RETURN_IF_ERROR(CheckAccess(*seq, request.capability, "SyncShards"));
    std::shared_lock<std::shared_mutex> lock(seq->mu);
    if (!SameSpec(seq->spec, spec)) {
      return absl::FailedPreconditionError(absl::StrCat(
          "SyncShards: sequence ", spec.sequence_id, " exists here with another spec"));
    }
    for (int32_t layer = 0; layer < spec.n_layers; ++layer) {
      for (int32_t g = 0; g < spec.n_kv_heads; ++g) {
        const HeadState& h = seq->head(layer, g);
        for (size_t i = 0; i < h.chunks.size(); ++i) {
          const Chunk& c = h.chunks[i];
          SyncCursor cur{layer, g, c.chunk, -1, -1};
          if (c.index != nullptr) cur.known_index_rows = static_cast<int64_t>(c.index->size());
          if (!c.positions.empty()) cur.after_position = c.positions.back();
          if (i + 1 == h.chunks.size() && !h.tail_positions.empty()) {
            cur.after_position = h.tail_positions.back();
          }
          held.emplace(ChunkId{layer, g, c.chunk}, cur);
        }
      }
    }
  }
  if (query->all) {
    for (const auto& [id, cur] : held) query->cursors.push_back(cur);
  } else {
    for (const ChunkId& id : listed) {
      auto it = held.find(id);
      query->cursors.push_back(it != held.end()
                                   ? it->second
                                   : SyncCursor{std::get<0>(id), std::get<1>(id),
                                                std::get<2>(id), -1, -1});
    }
  }
  return absl::OkStatus();
}

absl::Status NodeCore::ReceiveSync(const SyncRequest& request, const ReadShardsQuery& query,
                                   SyncSource* source, std::vector<SyncChunkData>* chunks,
                                   MemoryReservation* reservation, int64_t* bytes) {
  const SequenceSpec& spec = request.spec;
  const std::string what = absl::StrCat("SyncShards of sequence ", spec.sequence_id, " from ",
                                        request.source_address);
  int64_t declared = -1, declared_chunks = 0, received = 0;
  const auto on_header = [&](const SyncHeader& header) -> absl::Status {
    if (!SameSpec(header.spec, spec)) {
      return absl::FailedPreconditionError(
          absl::StrCat(what, ": the source holds the sequence with another spec"));
    }
    if (header.payload_bytes < 0 || header.chunks < 0 ||
        static_cast<uint64_t>(header.chunks) > kMaxSyncCursors) {
      return absl::DataLossError(absl::StrCat(what, ": source declared ", header.payload_bytes,
                                              " bytes in ", header.chunks, " chunks"));
    }
    // Counted against the budget before any of it is received.
    KVR_RETURN_IF_ERROR(ReserveMemory(header.payload_bytes, what));
    MemoryReservation r(&memory_used_, header.payload_bytes);
    *reservation = std::move(r);
    declared = header.payload_bytes;
    declared_chunks = header.chunks;
    return absl::OkStatus();
  };
  const auto on_chunk = [&](SyncChunkData data) -> absl::Status {
    if (declared < 0) return absl::DataLossError(absl::StrCat(what, ": data before the header"));
    received += data.PayloadBytes();
    if (received > declared || static_cast<int64_t>(chunks->size()) >= declared_chunks) {
      return absl::DataLossError(absl::StrCat(what, ": the source sent more than the ", declared,
                                              " bytes in ", declared_chunks,
                                              " chunks it declared"));
    }
    chunks->push_back(std::move(data));
    return absl::OkStatus();
  };
  KVR_RETURN_IF_ERROR(source->Read(query, on_header, on_chunk));
  if (declared < 0 || static_cast<int64_t>(chunks->size()) != declared_chunks) {
    return absl::DataLossError(absl::StrCat(what, ": the stream ended after ", chunks->size(),
                                            " of ", declared_chunks, " declared chunks"));
  }
  *bytes += received;
  return absl::OkStatus();
}

absl::Status NodeCore::AppendSyncedTail(const Sequence& seq, HeadState* head,
                                        const std::map<int32_t, SyncChunkData*>& incoming,
                                        bool all, SyncResult* result) {
  const SequenceSpec& spec = seq.spec;
  const auto not_tail_only = [] { return absl::UnimplementedError("not a tail-only delta"); };
  const Chunk& last = head->chunks.back();
  if (all && incoming.size() != head->chunks.size()) return not_tail_only();
  SyncChunkData* grown = nullptr;
  for (const auto& [id, c] : incoming) {
    const bool held = std::any_of(head->chunks.begin(), head->chunks.end(),
                                  [want = id](const Chunk& h) { return h.chunk == want; });
    if (!held || !c->index_blob.empty()) return not_tail_only();
    if (static_cast<size_t>(c->first_sent_row) == c->positions.size()) continue;  // unchanged
    if (id != last.chunk || !c->last || c->first_sent_row < c->index_rows) return not_tail_only();
    grown = c;
  }
  if (grown == nullptr) return not_tail_only();
  // Checked before anything changes: new positions after ours and
  // ascending, finite keys.
  const size_t d = static_cast<size_t>(spec.head_dim);
  const size_t first = static_cast<size_t>(grown->first_sent_row);
  const size_t n = grown->positions.size() - first;
  const std::span<const int64_t> positions =
      std::span<const int64_t>(grown->positions).subspan(first, n);
  int64_t prev = head->last_position;
  for (int64_t p : positions) {
    if (p <= prev) {
      return absl::DataLossError(absl::StrCat("SyncShards: source position ", p,
                                              " not after ", prev));
    }
    prev = p;
  }
  const ConstMatrixView keys(grown->tail_keys.data(), n, d, d);
  KVR_RETURN_IF_ERROR(index::ValidateFinite(keys, d, "SyncShards source tail keys"));
  KVR_ASSIGN_OR_RETURN(const ValueMatrix raw,
                       ValueMatrix::FromRaw(spec.value_dtype, n, d, grown->values));
  Matrix values(n, d);
  for (size_t i = 0; i < n; ++i) raw.RowToFloat(i, values.row(i));
  if (head->tail == nullptr) {
    KVR_ASSIGN_OR_RETURN(head->tail, index::FlatIndex::Create(d));
    head->tail->Reserve(std::max(options_.tail_capacity, n));
  }
  const size_t old_rows = head->tail->size();
  KVR_RETURN_IF_ERROR(head->tail->Add(keys));
  KVR_RETURN_IF_ERROR(head->tail_values.Append(values.view()));
  head->tail_positions.insert(head->tail_positions.end(), positions.begin(), positions.end());
  head->last_position = positions.back();
  SettleMemory(head, 0);
  result->keys_copied += static_cast<int64_t>(n);
  if (options_.persistence == nullptr) return absl::OkStatus();
  HeadWrite write;
  write.sequence_id = spec.sequence_id;
  write.layer = grown->layer;
  write.kv_head = grown->kv_head;
  write.head_dim = spec.head_dim;
  write.value_dtype = spec.value_dtype;
  write.last_position = head->last_position;
  write.tail_rows = static_cast<int64_t>(head->tail->size());
  const size_t rb = RowBytes(spec);
  write.tail = TailWrite{head->tail->keys().rows_slice(old_rows, n),
                         head->tail_values.raw_bytes().subspan(old_rows * rb, n * rb),
                         std::span<const int64_t>(head->tail_positions).subspan(old_rows, n)};
  return Persist(write, absl::StrCat("SyncShards ",
                                     ShardName(spec.sequence_id, grown->layer, grown->kv_head,
                                               last.chunk)));
}

absl::Status NodeCore::AssembleSync(Sequence* seq, std::vector<SyncChunkData>& chunks,
                                    bool all, bool install, std::vector<SyncCursor>* divergent,
                                    SyncResult* result) {
  const SequenceSpec& spec = seq->spec;
  const size_t d = static_cast<size_t>(spec.head_dim);
  const size_t rb = RowBytes(spec);
  std::map<std::pair<int32_t, int32_t>, std::vector<SyncChunkData*>> by_head;
  for (SyncChunkData& c : chunks) {
    const absl::Status in_range = internal::CheckHead(spec, c.layer, c.kv_head);
    if (!in_range.ok()) {
      return absl::DataLossError(absl::StrCat("SyncShards: source chunk: ", in_range.message()));
    }
    by_head[{c.layer, c.kv_head}].push_back(&c);
  }
  for (auto& [head_id, received] : by_head) {
    const auto [layer, g] = head_id;
    HeadState& old = seq->head(layer, g);
    const std::string where = absl::StrCat("SyncShards (seq ", spec.sequence_id, ", layer ", layer,
                                           ", kv head ", g, ")");
    // The destination's rows of chunk slot i: its index rows, then (last
    // chunk) its tail rows.
    const auto held_rows = [&](size_t i) {
      const Chunk& c = old.chunks[i];
      return c.positions.size() + (i + 1 == old.chunks.size() ? old.tail_positions.size() : 0);
    };
    const auto held_pos = [&](size_t i, size_t j) {
      const Chunk& c = old.chunks[i];
      return j < c.positions.size() ? c.positions[j] : old.tail_positions[j - c.positions.size()];
    };
    const auto held_key = [&](size_t i, size_t j) {
      const Chunk& c = old.chunks[i];
      return j < c.positions.size() ? c.index->keys().row(j)
                                    : old.tail->keys().row(j - c.positions.size());
    };
    const auto held_value = [&](size_t i, size_t j) {
      const Chunk& c = old.chunks[i];
      return j < c.positions.size() ? c.values.raw_bytes().subspan(j * rb, rb)
                                    : old.tail_values.raw_bytes().subspan(
                                          (j - c.positions.size()) * rb, rb);
    };
    std::map<int32_t, size_t> held;  // chunk id -> slot
    for (size_t i = 0; i < old.chunks.size(); ++i) held[old.chunks[i].chunk] = i;
    std::map<int32_t, SyncChunkData*> incoming;
    bool changed = false;
    for (SyncChunkData* c : received) {
      if (!incoming.emplace(c->chunk, c).second) {
        return absl::DataLossError(absl::StrCat(where, ": the source sent chunk ", c->chunk,
                                                " twice"));
      }
      const size_t rows = c->positions.size();
      const auto idx = static_cast<size_t>(std::max<int64_t>(c->index_rows, 0));
      if (c->index_rows < 0 || idx > rows || (!c->last && idx != rows) ||
          c->first_sent_row < 0 || static_cast<size_t>(c->first_sent_row) > rows ||
          c->values.size() != (rows - static_cast<size_t>(c->first_sent_row)) * rb ||
          c->tail_keys.size() !=
              (rows - std::max(static_cast<size_t>(c->first_sent_row), idx)) * d) {
        return absl::DataLossError(absl::StrCat(
            where, ": source chunk ", c->chunk, " is inconsistent: ", rows, " rows, ",
            c->index_rows, " indexed, from row ", c->first_sent_row, ", ", c->values.size(),
            " value bytes, ", c->tail_keys.size(), " tail key floats"));
      }
      // Is what we hold of it a prefix of the source's rows? (A whole chunk
      // -- every row sent, its index too -- replaces ours whatever it is.)
      const size_t first = static_cast<size_t>(c->first_sent_row);
      const bool whole = first == 0 && (idx == 0 || !c->index_blob.empty());
      auto h = held.find(c->chunk);
      const size_t have = h == held.end() || whole ? 0 : held_rows(h->second);
      bool prefix = first == have;
      for (size_t j = 0; prefix && j < have; ++j) prefix = held_pos(h->second, j) == c->positions[j];
      if (prefix && have > 0) prefix = PrefixCrc(old, h->second, have, rb) == c->prefix_crc;
      if (prefix && c->index_blob.empty() && idx > 0) {
        const Chunk* mine = h == held.end() ? nullptr : &old.chunks[h->second];
        prefix = mine != nullptr && mine->index != nullptr && mine->index->size() == idx;
      }
      if (!prefix) {
        divergent->push_back(SyncCursor{layer, g, c->chunk, -1, -1});
        continue;
      }
      if (first < rows || !c->index_blob.empty() || (whole && h != held.end())) changed = true;
    }
    // Syncing every shard: a head the source holds ends exactly like the
    // source's, so chunks of it only we hold go.
    for (const auto& [id, slot] : held) changed = changed || (all && !incoming.contains(id));
    if (!divergent->empty() || !changed || !install) continue;
    if (!old.chunks.empty()) {
      const absl::Status fast = AppendSyncedTail(*seq, &old, incoming, all, result);
      if (fast.ok()) continue;
      if (!absl::IsUnimplemented(fast)) return fast;  // Unimplemented: not a tail-only delta
    }

    // The new head: every chunk id of either side (of the source's only,
    // when syncing every shard), ascending.
    std::set<int32_t> ids;
    for (const auto& [id, slot] : held) {
      if (!all) ids.insert(id);
    }
    for (const auto& [id, data] : incoming) ids.insert(id);
    RecoveredHead rh;
    rh.layer = layer;
    rh.kv_head = g;
    const int32_t last_id = *ids.rbegin();
    HeadWrite write;
    write.sequence_id = spec.sequence_id;
    write.layer = layer;
    write.kv_head = g;
    write.head_dim = spec.head_dim;
    write.value_dtype = spec.value_dtype;
    write.replace = true;
    std::vector<uint8_t> tail_raw;
    for (int32_t id : ids) {
      RecoveredChunk rc;
      rc.chunk = id;
      std::vector<uint8_t> raw;
      std::vector<uint8_t> blob;
      auto in = incoming.find(id);
      if (in == incoming.end()) {  // ours, kept as it is
        const size_t slot = held.at(id);
        const Chunk& c = old.chunks[slot];
        const bool has_tail = slot + 1 == old.chunks.size() && !old.tail_positions.empty();
        if (has_tail && id != last_id) {
          return absl::FailedPreconditionError(absl::StrCat(
              where, ": this node's tail rows of chunk ", id,
              " would precede chunk ", last_id, "; sync the whole head"));
        }
        if (c.index != nullptr) {
          KVR_RETURN_IF_ERROR(c.index->Serialize(&blob));
          KVR_ASSIGN_OR_RETURN(rc.index, index::LoadIndex(blob));
        }
        const auto bytes = c.values.raw_bytes();
        raw.assign(bytes.begin(), bytes.end());
        rc.positions = c.positions;
        if (has_tail) {
          rh.tail_keys = Matrix(old.tail_positions.size(), d);
          const ConstMatrixView k = old.tail->keys();
          for (size_t i = 0; i < k.rows(); ++i) std::copy_n(k.row(i), d, rh.tail_keys.row(i));
          const auto tb = old.tail_values.raw_bytes();
          tail_raw.assign(tb.begin(), tb.end());
          rh.tail_positions = old.tail_positions;
        }
      } else {  // the source's
        const SyncChunkData& c = *in->second;
        const size_t rows = c.positions.size(), idx = static_cast<size_t>(c.index_rows);
        const size_t first = static_cast<size_t>(c.first_sent_row);
        if (rows > idx && id != last_id) {
          return absl::FailedPreconditionError(absl::StrCat(
              where, ": the source's tail rows of chunk ", id,
              " would precede this node's chunk ", last_id, "; sync the whole head"));
        }
        auto h = held.find(id);
        const auto value_row = [&](size_t j) -> std::span<const uint8_t> {
          if (j < first) return held_value(h->second, j);
          return std::span<const uint8_t>(c.values).subspan((j - first) * rb, rb);
        };
        if (!c.index_blob.empty()) {
          blob = c.index_blob;
          auto loaded = index::LoadIndex(blob);
          if (!loaded.ok()) {
            return absl::DataLossError(absl::StrCat(where, ": source index of chunk ", id, ": ",
                                                    loaded.status().message()));
          }
          rc.index = std::move(loaded).value();
        } else if (idx > 0) {
          KVR_RETURN_IF_ERROR(old.chunks[h->second].index->Serialize(&blob));
          KVR_ASSIGN_OR_RETURN(rc.index, index::LoadIndex(blob));
        }
        raw.reserve(idx * rb);
        for (size_t j = 0; j < idx; ++j) {
          const auto v = value_row(j);
          raw.insert(raw.end(), v.begin(), v.end());
        }
        rc.positions.assign(c.positions.begin(), c.positions.begin() + static_cast<ptrdiff_t>(idx));
        if (rows > idx) {
          rh.tail_keys = Matrix(rows - idx, d);
          const size_t sent_from = std::max(first, idx);
          for (size_t j = idx; j < rows; ++j) {
            const float* k = j < first ? held_key(h->second, j)
                                       : &c.tail_keys[(j - sent_from) * d];
            std::copy_n(k, d, rh.tail_keys.row(j - idx));
            const auto v = value_row(j);
            tail_raw.insert(tail_raw.end(), v.begin(), v.end());
          }
          rh.tail_positions.assign(c.positions.begin() + static_cast<ptrdiff_t>(idx),
                                   c.positions.end());
        }
        result->keys_copied += static_cast<int64_t>(rows - first);
      }
      const size_t n = rc.positions.size();
      KVR_ASSIGN_OR_RETURN(rc.values, ValueMatrix::FromRaw(spec.value_dtype, n, d, raw));
      ChunkWrite cw;
      cw.chunk = id;
      cw.rows = static_cast<int64_t>(n);
      cw.index_blob = std::move(blob);
      rh.chunks.push_back(std::move(rc));
      write.chunks.push_back(std::move(cw));
    }
    if (!rh.tail_positions.empty()) {
      KVR_ASSIGN_OR_RETURN(rh.tail_values, ValueMatrix::FromRaw(spec.value_dtype,
                                                                rh.tail_positions.size(), d,
                                                                tail_raw));
    } else {
      rh.tail_values = ValueMatrix(spec.value_dtype, d);
    }
    rh.last_position = -1;
    for (const RecoveredChunk& rc : rh.chunks) {
      if (!rc.positions.empty()) rh.last_position = std::max(rh.last_position, rc.positions.back());
    }
    if (!rh.tail_positions.empty()) rh.last_position = std::max(rh.last_position, rh.tail_positions.back());

    // Built and checked beside the sequence, then swapped in.
    std::shared_ptr<Sequence> fresh = NewSequence(spec);
    const absl::Status built = InstallHead(fresh.get(), std::move(rh));
    HeadState& made = fresh->head(layer, g);
    if (!built.ok()) {
      memory_used_.fetch_sub(made.accounted_bytes, std::memory_order_relaxed);
      return absl::DataLossError(absl::StrCat(where, ": ", built.message()));
    }
    {
      std::lock_guard<std::mutex> qlock(old.query_mu);  // carried over for later seals
      made.recent = std::move(old.recent);
      made.recent_next = old.recent_next;
      made.recent_count = old.recent_count;
      made.recent_bytes = old.recent_bytes;  // still counted, now by `made`
      old.recent_bytes = 0;
    }
    const size_t slot = static_cast<size_t>(layer) * spec.n_kv_heads + g;
    std::swap(seq->heads[slot], fresh->heads[slot]);
    memory_used_.fetch_sub(fresh->heads[slot]->accounted_bytes, std::memory_order_relaxed);
    fresh->heads[slot]->accounted_bytes = 0;
    if (options_.persistence != nullptr) {
      HeadState& now = seq->head(layer, g);
      for (size_t i = 0; i < now.chunks.size(); ++i) {
        const Chunk& c = now.chunks[i];
        write.chunks[i].segment =
            ValueSegment{0, static_cast<int64_t>(c.positions.size()), c.values.raw_bytes(),
                         std::span<const int64_t>(c.positions)};
      }
      if (!now.tail_positions.empty()) {
        write.tail = TailWrite{now.tail->keys(), now.tail_values.raw_bytes(),
                               std::span<const int64_t>(now.tail_positions)};
      }
      write.last_position = now.last_position;
      write.tail_rows = static_cast<int64_t>(now.tail_positions.size());
      KVR_RETURN_IF_ERROR(Persist(write, where));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<SyncResult> NodeCore::SyncShards(const SyncRequest& request, SyncSource* source) {
  const SequenceSpec& spec = request.spec;
  KVR_RETURN_IF_ERROR(internal::ValidateSpec(spec));
  KVR_RETURN_IF_ERROR(CheckCapability(request.capability));
  KVR_RETURN_IF_ERROR(CheckLeaseOwner(request.lease_owner, /*allow_empty=*/true));
  KVR_RETURN_IF_ERROR(PersistenceError());
  ReadShardsQuery query;
  KVR_RETURN_IF_ERROR(PlanSync(request, &query));
  SyncResult result;
  std::vector<SyncChunkData> chunks;
  MemoryReservation reservation, reservation2;
  KVR_RETURN_IF_ERROR(
      ReceiveSync(request, query, source, &chunks, &reservation, &result.bytes_copied));

  bool created = false;
  std::shared_ptr<Sequence> seq = Find(spec.sequence_id);
  if (seq == nullptr) {
    const absl::Status st = CreateSequence(
        spec, SequenceAccess{request.capability, request.lease_owner, request.principal});
    if (!st.ok() && !absl::IsAlreadyExists(st)) return st;
    created = st.ok();
    seq = Find(spec.sequence_id);
    if (seq == nullptr) {
      return absl::AbortedError(absl::StrCat("SyncShards: sequence ", spec.sequence_id,
                                             " was dropped during the sync"));
    }
  }
  // Created by someone else meanwhile: only with the same capability.
  KVR_RETURN_IF_ERROR(CheckAccess(*seq, request.capability, "SyncShards"));
  const auto fail = [&](absl::Status st) {
    if (created) (void)Drop(spec.sequence_id, nullptr);
    return st;
  };
  for (int round = 0; round < 2; ++round) {
    std::vector<SyncCursor> divergent;
    {
      std::unique_lock<std::shared_mutex> lock(seq->mu);
      if (seq->dropped) {
        return absl::AbortedError(absl::StrCat("SyncShards: sequence ", spec.sequence_id,
                                               " was dropped during the sync"));
      }
      if (!SameSpec(seq->spec, spec)) {
        return absl::FailedPreconditionError(absl::StrCat(
            "SyncShards: sequence ", spec.sequence_id, " exists here with another spec"));
      }
      // Check every head first (no change), then install them all.
      SyncResult scratch;
      const absl::Status checked =
          AssembleSync(seq.get(), chunks, query.all, false, &divergent, &scratch);
      if (!checked.ok()) return fail(checked);
      if (divergent.empty()) {
        const absl::Status done =
            AssembleSync(seq.get(), chunks, query.all, true, &divergent, &result);
        if (!done.ok()) return fail(done);
        result.last_positions.assign(
            static_cast<size_t>(spec.n_layers) * static_cast<size_t>(spec.n_kv_heads), -1);
        std::set<std::pair<int32_t, int32_t>> heads;
        for (const SyncChunkData& c : chunks) heads.emplace(c.layer, c.kv_head);
        for (const auto& [layer, g] : heads) {
          result.last_positions[static_cast<size_t>(layer) * spec.n_kv_heads + g] =
              seq->head(layer, g).last_position;
        }
        return result;
      }
    }
    if (round == 1) break;
    // Chunks whose rows here are not a prefix of the source's: read them
    // whole and replace them.
    ReadShardsQuery again;
    again.sequence_id = spec.sequence_id;
    again.capability = request.capability;
    again.cursors = divergent;
    std::vector<SyncChunkData> whole;
    const absl::Status st =
        ReceiveSync(request, again, source, &whole, &reservation2, &result.bytes_copied);
    if (!st.ok()) return fail(st);
    for (SyncChunkData& w : whole) {
      for (SyncChunkData& c : chunks) {
        if (c.layer == w.layer && c.kv_head == w.kv_head && c.chunk == w.chunk) {
          c = std::move(w);
          break;
        }
      }
    }
  }
  return fail(absl::AbortedError(absl::StrCat("SyncShards: sequence ", spec.sequence_id,
                                              " kept changing here during the sync; retry")));
}

}  // namespace kvr::retrieval
