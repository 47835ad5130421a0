#include "retrieval_node/store/shard_store.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <filesystem>
#include <functional>
#include <map>
#include <optional>
#include <mutex>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

#include "common/serialize.h"
#include "rocksdb/db.h"
#include "rocksdb/iterator.h"
#include "rocksdb/options.h"
#include "rocksdb/write_batch.h"

namespace kvr::retrieval {

// The database and its group-commit writer.
struct ShardStore::Db {
  // Puts one write's records into `batch`.
  using Fill = std::function<absl::Status(rocksdb::WriteBatch* batch)>;

  std::unique_ptr<rocksdb::DB> db;
  rocksdb::WriteOptions write_options;
  bool group_commit = true;
  size_t max_group_bytes = 0;

  std::mutex mu;
  std::condition_variable wake;   // the writer: a group is open, or stop
  std::condition_variable space;  // writers held back: the open group was taken
  // Writes encoded since the writer last took the group, and their
  // callbacks in call order. Guarded by `mu`.
  std::unique_ptr<rocksdb::WriteBatch> open = std::make_unique<rocksdb::WriteBatch>();
  std::vector<StatusCallback> waiting;
  bool stop = false;
  std::thread writer;
  std::atomic<int64_t> commits{0};
  std::atomic<int64_t> writes{0};

  // Encodes a write into the open group (or, without group commit, writes it
  // now); `done` gets its status once it is durable. `what` names it in
  // errors.
  void Submit(const Fill& fill, const std::string& what, StatusCallback done);
  absl::Status SubmitAndWait(const Fill& fill, const std::string& what);
  void WriterLoop();
  // Drains the open group and joins the writer.
  void Stop();
};

namespace {

constexpr uint32_t kFormatVersion = 1;
constexpr char kFormatKey[] = "F";

// Blob kind tags of the records (common/serialize.h envelopes).
constexpr uint32_t kSpecBlob = 0x4b560101;
constexpr uint32_t kChunkMetaBlob = 0x4b560102;
constexpr uint32_t kValueSegmentBlob = 0x4b560103;
constexpr uint32_t kHeadMetaBlob = 0x4b560104;
constexpr uint32_t kTailSegmentBlob = 0x4b560105;
constexpr uint32_t kBlobVersion = 1;

// Sizes of the key parts after "S" seq:8.
constexpr size_t kSeqKeyLen = 1 + 8;
constexpr size_t kHeadKeyLen = kSeqKeyLen + 4 + 4;

void PutBe32(std::string* s, uint32_t v) {
  for (int i = 3; i >= 0; --i) s->push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}
void PutBe64(std::string* s, uint64_t v) {
  for (int i = 7; i >= 0; --i) s->push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}
uint32_t GetBe32(const char* p) {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v = (v << 8) | static_cast<uint8_t>(p[i]);
  return v;
}
uint64_t GetBe64(const char* p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v = (v << 8) | static_cast<uint8_t>(p[i]);
  return v;
}
// Signed values keep their order under the sign-bit flip.
uint64_t OrderedBits(int64_t v) { return static_cast<uint64_t>(v) ^ (uint64_t{1} << 63); }
int64_t FromOrderedBits(uint64_t v) { return static_cast<int64_t>(v ^ (uint64_t{1} << 63)); }

absl::Status FromRocks(const rocksdb::Status& st, absl::string_view what) {
  if (st.ok()) return absl::OkStatus();
  const std::string message = absl::StrCat(what, ": rocksdb: ", st.ToString());
  if (st.IsCorruption()) return absl::DataLossError(message);
  if (st.IsIOError() || st.IsBusy() || st.IsTimedOut() || st.IsTryAgain()) {
    return absl::UnavailableError(message);
  }
  return absl::InternalError(message);
}

rocksdb::Slice AsSlice(const std::vector<uint8_t>& bytes) {
  return rocksdb::Slice(reinterpret_cast<const char*>(bytes.data()), bytes.size());
}
std::span<const uint8_t> AsBytes(const rocksdb::Slice& s) {
  return {reinterpret_cast<const uint8_t*>(s.data()), s.size()};
}

std::vector<uint8_t> SealRecord(uint32_t kind, const BinaryWriter& w) {
  return SealBlob(kind, kBlobVersion, w.bytes());
}

// Opens a record's envelope and checks its kind and version.
absl::StatusOr<OpenedBlob> OpenRecord(std::span<const uint8_t> bytes, uint32_t kind) {
  KVR_ASSIGN_OR_RETURN(OpenedBlob blob, OpenBlob(bytes));
  if (blob.kind != kind || blob.version != kBlobVersion) {
    return absl::DataLossError(absl::StrCat("record kind/version ", blob.kind, "/", blob.version,
                                            ", expected ", kind, "/", kBlobVersion));
  }
  return blob;
}

size_t RowBytes(const SequenceSpec& spec) {
  return static_cast<size_t>(spec.head_dim) * DTypeSize(spec.value_dtype);
}

// --- record codecs ---------------------------------------------------------------

// Owner fields after the spec's (records written before them end there:
// DecodeSpec then returns an empty owner, an open sequence).
constexpr uint8_t kOwnerTag = 1;
constexpr uint64_t kMaxOwnerFieldBytes = 4096;

struct StoredSpec {
  SequenceSpec spec;
  SequenceOwner owner;
};

std::vector<uint8_t> EncodeSpec(const SequenceSpec& spec, const SequenceOwner& owner) {
  BinaryWriter w;
  w.Put<uint64_t>(spec.sequence_id);
  w.Put<int32_t>(spec.n_layers);
  w.Put<int32_t>(spec.n_heads);
  w.Put<int32_t>(spec.n_kv_heads);
  w.Put<int32_t>(spec.head_dim);
  w.Put<uint8_t>(static_cast<uint8_t>(spec.value_dtype));
  w.Put<uint8_t>(static_cast<uint8_t>(spec.index_type));
  w.Put<uint8_t>(kOwnerTag);
  w.PutString(owner.capability_sha256);
  w.PutString(owner.principal);
  w.PutString(owner.lease_owner);
  return SealRecord(kSpecBlob, w);
}

absl::StatusOr<StoredSpec> DecodeSpec(std::span<const uint8_t> bytes) {
  KVR_ASSIGN_OR_RETURN(OpenedBlob blob, OpenRecord(bytes, kSpecBlob));
  BinaryReader r(blob.payload, "sequence spec");
  SequenceSpec spec;
  uint8_t dtype = 0, index_type = 0;
  KVR_RETURN_IF_ERROR(r.Get(&spec.sequence_id, "sequence_id"));
  KVR_RETURN_IF_ERROR(r.Get(&spec.n_layers, "n_layers"));
  KVR_RETURN_IF_ERROR(r.Get(&spec.n_heads, "n_heads"));
  KVR_RETURN_IF_ERROR(r.Get(&spec.n_kv_heads, "n_kv_heads"));
  KVR_RETURN_IF_ERROR(r.Get(&spec.head_dim, "head_dim"));
  KVR_RETURN_IF_ERROR(r.Get(&dtype, "value_dtype"));
  KVR_RETURN_IF_ERROR(r.Get(&index_type, "index_type"));
  SequenceOwner owner;
  if (r.remaining() > 0) {
    uint8_t tag = 0;
    KVR_RETURN_IF_ERROR(r.Get(&tag, "owner tag"));
    if (tag != kOwnerTag) {
      return absl::DataLossError(absl::StrCat("sequence spec: owner tag ", tag, " unknown"));
    }
    KVR_RETURN_IF_ERROR(
        r.GetString(&owner.capability_sha256, "capability_sha256", kMaxOwnerFieldBytes));
    KVR_RETURN_IF_ERROR(r.GetString(&owner.principal, "principal", kMaxOwnerFieldBytes));
    KVR_RETURN_IF_ERROR(r.GetString(&owner.lease_owner, "lease_owner", kMaxOwnerFieldBytes));
    if (!owner.capability_sha256.empty() && owner.capability_sha256.size() != 32) {
      return absl::DataLossError(absl::StrCat("sequence spec: capability_sha256 has ",
                                              owner.capability_sha256.size(),
                                              " bytes, expected 32 or 0"));
    }
  }
  KVR_RETURN_IF_ERROR(r.ExpectEnd());
  KVR_ASSIGN_OR_RETURN(spec.value_dtype, DTypeFromTag(dtype));
  spec.index_type = static_cast<IndexType>(index_type);
  return StoredSpec{spec, std::move(owner)};
}

struct ChunkMeta {
  int64_t rows = 0;
  bool has_index = false;
};

std::vector<uint8_t> EncodeChunkMeta(const ChunkWrite& c) {
  BinaryWriter w;
  w.Put<int64_t>(c.rows);
  w.Put<uint8_t>(c.index_blob.empty() ? 0 : 1);
  return SealRecord(kChunkMetaBlob, w);
}

absl::StatusOr<ChunkMeta> DecodeChunkMeta(std::span<const uint8_t> bytes) {
  KVR_ASSIGN_OR_RETURN(OpenedBlob blob, OpenRecord(bytes, kChunkMetaBlob));
  BinaryReader r(blob.payload, "chunk meta");
  ChunkMeta m;
  uint8_t has_index = 0;
  KVR_RETURN_IF_ERROR(r.Get(&m.rows, "rows"));
  KVR_RETURN_IF_ERROR(r.Get(&has_index, "has_index"));
  KVR_RETURN_IF_ERROR(r.ExpectEnd());
  m.has_index = has_index != 0;
  if (m.rows < 0 || m.has_index != (m.rows > 0)) {
    return absl::DataLossError(
        absl::StrCat("chunk meta: rows ", m.rows, " with has_index ", int{has_index}));
  }
  return m;
}

// Rows of values (raw, the sequence's dtype) and positions; tail segments
// also carry the fp32 keys.
struct Segment {
  int64_t rows = 0;
  std::vector<float> keys;  // rows x head_dim (tail segments only)
  std::vector<uint8_t> values;
  std::vector<int64_t> positions;
};

// `keys` empty (0 rows) for value segments.
std::vector<uint8_t> EncodeSegment(uint32_t kind, int64_t rows, uint32_t cols, DType dtype,
                                   ConstMatrixView keys, std::span<const uint8_t> values,
                                   std::span<const int64_t> positions) {
  BinaryWriter w;
  w.Put<int64_t>(rows);
  w.Put<uint32_t>(cols);
  w.Put<uint8_t>(static_cast<uint8_t>(dtype));
  w.Put<uint64_t>(static_cast<uint64_t>(keys.rows()) * keys.cols());
  for (size_t i = 0; i < keys.rows(); ++i) {
    const auto* p = reinterpret_cast<const uint8_t*>(keys.row(i));
    w.mutable_bytes().insert(w.mutable_bytes().end(), p, p + keys.cols() * sizeof(float));
  }
  w.PutArray(values);
  w.PutArray(positions);
  return SealRecord(kind, w);
}

absl::StatusOr<Segment> DecodeSegment(std::span<const uint8_t> bytes, uint32_t kind,
                                      const SequenceSpec& spec, bool with_keys) {
  KVR_ASSIGN_OR_RETURN(OpenedBlob blob, OpenRecord(bytes, kind));
  BinaryReader r(blob.payload, with_keys ? "tail segment" : "value segment");
  Segment seg;
  uint32_t cols = 0;
  uint8_t dtype = 0;
  KVR_RETURN_IF_ERROR(r.Get(&seg.rows, "rows"));
  KVR_RETURN_IF_ERROR(r.Get(&cols, "cols"));
  KVR_RETURN_IF_ERROR(r.Get(&dtype, "dtype"));
  if (seg.rows < 1 || seg.rows > int64_t{index::kMaxKeys} ||
      cols != static_cast<uint32_t>(spec.head_dim) ||
      dtype != static_cast<uint8_t>(spec.value_dtype)) {
    return absl::DataLossError(absl::StrCat("segment of ", seg.rows, " rows x ", cols,
                                            " dtype ", int{dtype}, " for a sequence of head_dim ",
                                            spec.head_dim, " dtype ",
                                            static_cast<int>(spec.value_dtype)));
  }
  const uint64_t rows = static_cast<uint64_t>(seg.rows);
  const uint64_t key_count = with_keys ? rows * cols : 0;
  KVR_RETURN_IF_ERROR(r.GetArray(&seg.keys, "keys", key_count));
  KVR_RETURN_IF_ERROR(r.GetArray(&seg.values, "values", rows * RowBytes(spec)));
  KVR_RETURN_IF_ERROR(r.GetArray(&seg.positions, "positions", rows));
  KVR_RETURN_IF_ERROR(r.ExpectEnd());
  if (seg.keys.size() != key_count || seg.values.size() != rows * RowBytes(spec) ||
      seg.positions.size() != rows) {
    return absl::DataLossError(absl::StrCat("segment of ", rows, " rows holds ", seg.keys.size(),
                                            " key floats, ", seg.values.size(),
                                            " value bytes and ", seg.positions.size(),
                                            " positions"));
  }
  return seg;
}

struct HeadMeta {
  int64_t last_position = -1;
  int64_t tail_rows = 0;
};

std::vector<uint8_t> EncodeHeadMeta(const HeadWrite& w) {
  BinaryWriter b;
  b.Put<int64_t>(w.last_position);
  b.Put<int64_t>(w.tail_rows);
  return SealRecord(kHeadMetaBlob, b);
}

absl::StatusOr<HeadMeta> DecodeHeadMeta(std::span<const uint8_t> bytes) {
  KVR_ASSIGN_OR_RETURN(OpenedBlob blob, OpenRecord(bytes, kHeadMetaBlob));
  BinaryReader r(blob.payload, "head meta");
  HeadMeta m;
  KVR_RETURN_IF_ERROR(r.Get(&m.last_position, "last_position"));
  KVR_RETURN_IF_ERROR(r.Get(&m.tail_rows, "tail_rows"));
  KVR_RETURN_IF_ERROR(r.ExpectEnd());
  if (m.tail_rows < 0) return absl::DataLossError(absl::StrCat("tail_rows ", m.tail_rows));
  return m;
}

// --- recovery ------------------------------------------------------------------------

std::string HeadName(uint64_t seq, int32_t layer, int32_t kv_head) {
  return absl::StrCat("(seq ", seq, ", layer ", layer, ", kv head ", kv_head, ")");
}

absl::Status Loss(absl::string_view what, absl::string_view message) {
  return absl::DataLossError(absl::StrCat("recovery: ", what, ": ", message));
}

// One chunk's records as read, decoded when its head is complete.
struct PendingChunk {
  std::optional<std::string> index_blob;
  std::optional<std::string> meta;
  std::vector<std::pair<int64_t, std::string>> segments;  // (first_row, record), key order
};

// One head's records as read.
struct PendingHead {
  uint64_t seq = 0;
  int32_t layer = 0;
  int32_t kv_head = 0;
  std::map<int32_t, PendingChunk> chunks;
  std::optional<std::string> meta;
  std::vector<std::pair<int64_t, std::string>> tail;  // (first position, record)
};

absl::StatusOr<RecoveredChunk> BuildChunk(const SequenceSpec& spec, const PendingHead& ph,
                                          int32_t chunk_id, const PendingChunk& pc) {
  const std::string shard =
      absl::StrCat("shard ", ShardKey{ph.seq, ph.layer, ph.kv_head, chunk_id}.DebugString());
  const auto wrap = [&](absl::string_view record, const absl::Status& st) {
    return Loss(shard, absl::StrCat(record, ": ", st.message()));
  };
  if (!pc.meta.has_value()) return Loss(shard, "chunk meta record missing");
  absl::StatusOr<ChunkMeta> meta = DecodeChunkMeta(AsBytes(*pc.meta));
  if (!meta.ok()) return wrap("chunk meta", meta.status());
  RecoveredChunk out;
  out.chunk = chunk_id;
  if (meta->rows == 0) {
    if (pc.index_blob.has_value() || !pc.segments.empty()) {
      return Loss(shard, "index or values stored for a chunk of 0 rows");
    }
    return out;
  }
  if (!pc.index_blob.has_value()) return Loss(shard, "index blob missing");
  absl::StatusOr<std::unique_ptr<index::KeyIndex>> idx = index::LoadIndex(AsBytes(*pc.index_blob));
  if (!idx.ok()) return wrap("index blob", idx.status());
  if (static_cast<int64_t>((*idx)->size()) != meta->rows) {
    return Loss(shard, absl::StrCat("index holds ", (*idx)->size(), " keys, chunk meta says ",
                                    meta->rows));
  }
  std::vector<uint8_t> values;
  values.reserve(static_cast<size_t>(meta->rows) * RowBytes(spec));
  out.positions.reserve(static_cast<size_t>(meta->rows));
  int64_t next_row = 0;
  for (const auto& [first_row, record] : pc.segments) {
    const std::string name = absl::StrCat("value segment at row ", first_row);
    if (first_row != next_row) {
      return Loss(shard, absl::StrCat(name, " does not follow row ", next_row - 1));
    }
    absl::StatusOr<Segment> seg = DecodeSegment(AsBytes(record), kValueSegmentBlob, spec, false);
    if (!seg.ok()) return wrap(name, seg.status());
    if (next_row + seg->rows > meta->rows) {
      return Loss(shard, absl::StrCat(name, " ends past the chunk's ", meta->rows, " rows"));
    }
    values.insert(values.end(), seg->values.begin(), seg->values.end());
    out.positions.insert(out.positions.end(), seg->positions.begin(), seg->positions.end());
    next_row += seg->rows;
  }
  if (next_row != meta->rows) {
    return Loss(shard, absl::StrCat("value segments hold ", next_row, " rows, the index ",
                                    meta->rows));
  }
  absl::StatusOr<ValueMatrix> vm = ValueMatrix::FromRaw(
      spec.value_dtype, static_cast<size_t>(meta->rows), static_cast<size_t>(spec.head_dim),
      values);
  if (!vm.ok()) return wrap("values", vm.status());
  out.values = std::move(vm).value();
  out.index = std::move(idx).value();
  return out;
}

absl::StatusOr<RecoveredHead> BuildHead(const SequenceSpec& spec, const PendingHead& ph) {
  const std::string head = HeadName(ph.seq, ph.layer, ph.kv_head);
  if (!ph.meta.has_value()) return Loss(head, "head meta record missing");
  absl::StatusOr<HeadMeta> meta = DecodeHeadMeta(AsBytes(*ph.meta));
  if (!meta.ok()) return Loss(head, absl::StrCat("head meta: ", meta.status().message()));
  RecoveredHead out;
  out.layer = ph.layer;
  out.kv_head = ph.kv_head;
  out.last_position = meta->last_position;
  for (const auto& [chunk_id, pc] : ph.chunks) {
    KVR_ASSIGN_OR_RETURN(RecoveredChunk c, BuildChunk(spec, ph, chunk_id, pc));
    out.chunks.push_back(std::move(c));
  }
  const std::string tail = absl::StrCat("tail of ", head);
  const size_t d = static_cast<size_t>(spec.head_dim);
  std::vector<uint8_t> values;
  std::vector<float> keys;
  for (const auto& [first_position, record] : ph.tail) {
    const std::string name = absl::StrCat("tail segment at position ", first_position);
    absl::StatusOr<Segment> seg = DecodeSegment(AsBytes(record), kTailSegmentBlob, spec, true);
    if (!seg.ok()) return Loss(tail, absl::StrCat(name, ": ", seg.status().message()));
    if (seg->positions.front() != first_position) {
      return Loss(tail, absl::StrCat(name, " starts at position ", seg->positions.front()));
    }
    keys.insert(keys.end(), seg->keys.begin(), seg->keys.end());
    values.insert(values.end(), seg->values.begin(), seg->values.end());
    out.tail_positions.insert(out.tail_positions.end(), seg->positions.begin(),
                              seg->positions.end());
  }
  const size_t rows = out.tail_positions.size();
  if (static_cast<int64_t>(rows) != meta->tail_rows) {
    return Loss(tail, absl::StrCat("tail segments hold ", rows, " rows, the head meta says ",
                                   meta->tail_rows));
  }
  out.tail_keys = Matrix(rows, d);
  out.tail_keys.data = std::move(keys);
  absl::StatusOr<ValueMatrix> vm = ValueMatrix::FromRaw(spec.value_dtype, rows, d, values);
  if (!vm.ok()) return Loss(tail, vm.status().message());
  out.tail_values = std::move(vm).value();
  return out;
}

}  // namespace

// --- keys ----------------------------------------------------------------------------

std::string ShardStore::SequenceKey(uint64_t sequence_id) {
  std::string k = "S";
  PutBe64(&k, sequence_id);
  return k;
}

std::string ShardStore::HeadPrefix(uint64_t sequence_id, int32_t layer, int32_t kv_head) {
  std::string k = SequenceKey(sequence_id);
  PutBe32(&k, static_cast<uint32_t>(layer));
  PutBe32(&k, static_cast<uint32_t>(kv_head));
  return k;
}

namespace {
std::string ChunkPrefix(const ShardKey& s) {
  std::string k = ShardStore::HeadPrefix(s.sequence_id, s.layer, s.kv_head);
  k.push_back('C');
  PutBe32(&k, static_cast<uint32_t>(s.chunk));
  return k;
}
}  // namespace

std::string ShardStore::ChunkIndexKey(const ShardKey& shard) { return ChunkPrefix(shard) + "I"; }
std::string ShardStore::ChunkMetaKey(const ShardKey& shard) { return ChunkPrefix(shard) + "M"; }

std::string ShardStore::ValueSegmentKey(const ShardKey& shard, int64_t first_row) {
  std::string k = ChunkPrefix(shard) + "V";
  PutBe64(&k, OrderedBits(first_row));
  return k;
}

std::string ShardStore::HeadMetaKey(uint64_t sequence_id, int32_t layer, int32_t kv_head) {
  return HeadPrefix(sequence_id, layer, kv_head) + "H";
}

std::string ShardStore::TailSegmentKey(uint64_t sequence_id, int32_t layer, int32_t kv_head,
                                       int64_t first_position) {
  std::string k = HeadPrefix(sequence_id, layer, kv_head) + "T";
  PutBe64(&k, OrderedBits(first_position));
  return k;
}

// --- store ---------------------------------------------------------------------------

void ShardStore::Db::Submit(const Fill& fill, const std::string& what, StatusCallback done) {
  if (!group_commit) {
    rocksdb::WriteBatch batch;
    absl::Status st = fill(&batch);
    if (st.ok()) {
      st = FromRocks(db->Write(write_options, &batch), what);
      writes.fetch_add(1, std::memory_order_relaxed);
      commits.fetch_add(1, std::memory_order_relaxed);
    }
    done(std::move(st));
    return;
  }
  std::unique_lock<std::mutex> lock(mu);
  space.wait(lock,
             [&] { return stop || waiting.empty() || open->GetDataSize() < max_group_bytes; });
  if (stop) {
    lock.unlock();
    done(absl::UnavailableError(absl::StrCat(what, ": the store is closing")));
    return;
  }
  // A write whose records cannot all be encoded leaves nothing in the group.
  open->SetSavePoint();
  absl::Status st = fill(open.get());
  if (!st.ok()) {
    const rocksdb::Status undone = open->RollbackToSavePoint();
    KVR_CHECK_MSG(undone.ok(), undone.ToString().c_str());
    lock.unlock();
    done(std::move(st));
    return;
  }
  KVR_CHECK(open->PopSavePoint().ok());
  waiting.push_back(std::move(done));
  const bool first = waiting.size() == 1;
  lock.unlock();
  if (first) wake.notify_one();
}

absl::Status ShardStore::Db::SubmitAndWait(const Fill& fill, const std::string& what) {
  StatusWaiter waiter;
  Submit(fill, what, waiter.callback());
  return waiter.Wait();
}

void ShardStore::Db::WriterLoop() {
  std::unique_lock<std::mutex> lock(mu);
  for (;;) {
    wake.wait(lock, [&] { return stop || !waiting.empty(); });
    if (waiting.empty()) return;  // stopping, and everything queued is written
    // Take the whole group; writes arriving from now on open the next one
    // while this one syncs.
    std::unique_ptr<rocksdb::WriteBatch> batch =
        std::exchange(open, std::make_unique<rocksdb::WriteBatch>());
    std::vector<StatusCallback> done = std::exchange(waiting, {});
    lock.unlock();
    space.notify_all();
    const absl::Status st = FromRocks(
        db->Write(write_options, batch.get()),
        absl::StrCat("group commit of ", done.size(), " writes"));
    writes.fetch_add(1, std::memory_order_relaxed);
    commits.fetch_add(static_cast<int64_t>(done.size()), std::memory_order_relaxed);
    batch.reset();
    for (StatusCallback& d : done) d(st);
    lock.lock();
  }
}

void ShardStore::Db::Stop() {
  {
    std::lock_guard<std::mutex> lock(mu);
    stop = true;
  }
  wake.notify_all();
  space.notify_all();
  if (writer.joinable()) writer.join();
}

ShardStore::ShardStore(std::string dir, const ShardStoreOptions& options, std::unique_ptr<Db> db)
    : dir_(std::move(dir)), options_(options), db_(std::move(db)) {
  db_->write_options.sync = options_.sync;
  // Without sync a write costs microseconds and RocksDB already batches
  // concurrent writers; a hand-off to the writer thread would cost more.
  db_->group_commit = options_.group_commit && options_.sync;
  db_->max_group_bytes = options_.max_group_bytes;
  if (db_->group_commit) db_->writer = std::thread([db = db_.get()] { db->WriterLoop(); });
}

ShardStore::~ShardStore() { db_->Stop(); }

ShardStoreStats ShardStore::stats() const {
  ShardStoreStats st;
  st.commits = db_->commits.load(std::memory_order_relaxed);
  st.writes = db_->writes.load(std::memory_order_relaxed);
  return st;
}

absl::StatusOr<std::unique_ptr<ShardStore>> ShardStore::Open(const std::string& dir,
                                                             const ShardStoreOptions& options) {
  if (dir.empty()) return absl::InvalidArgumentError("ShardStore: empty data dir");
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) {
    return absl::UnavailableError(
        absl::StrCat("ShardStore: cannot create data dir ", dir, ": ", ec.message()));
  }
  rocksdb::Options o;
  o.create_if_missing = true;
  o.paranoid_checks = true;
  // Index blobs and segments are large and written once: keep them out of
  // the LSM tree's compactions.
  o.enable_blob_files = true;
  o.min_blob_size = 4096;
  o.enable_blob_garbage_collection = true;
  rocksdb::DB* raw = nullptr;
  KVR_RETURN_IF_ERROR(FromRocks(rocksdb::DB::Open(o, dir, &raw),
                                absl::StrCat("ShardStore: open ", dir)));
  auto db = std::make_unique<Db>();
  db->db.reset(raw);
  std::string format;
  const rocksdb::Status got = db->db->Get(rocksdb::ReadOptions(), kFormatKey, &format);
  if (got.IsNotFound()) {
    std::string v;
    PutBe32(&v, kFormatVersion);
    rocksdb::WriteOptions wo;
    wo.sync = true;
    KVR_RETURN_IF_ERROR(FromRocks(db->db->Put(wo, kFormatKey, v),
                                  absl::StrCat("ShardStore: write format record in ", dir)));
  } else {
    KVR_RETURN_IF_ERROR(FromRocks(got, absl::StrCat("ShardStore: read format record in ", dir)));
    if (format.size() != 4 || GetBe32(format.data()) != kFormatVersion) {
      return absl::FailedPreconditionError(absl::StrCat(
          "ShardStore: ", dir, " holds format ",
          format.size() == 4 ? absl::StrCat(GetBe32(format.data())) : "(unreadable)",
          ", this node reads format ", kFormatVersion));
    }
  }
  return std::unique_ptr<ShardStore>(new ShardStore(dir, options, std::move(db)));
}

absl::Status ShardStore::PutSequence(const SequenceSpec& spec, const SequenceOwner& owner) {
  const std::string what = absl::StrCat("PutSequence ", spec.sequence_id);
  return db_->SubmitAndWait(
      [&](rocksdb::WriteBatch* batch) {
        return FromRocks(batch->Put(SequenceKey(spec.sequence_id), AsSlice(EncodeSpec(spec, owner))),
                         what);
      },
      what);
}

absl::Status ShardStore::DropSequence(uint64_t sequence_id) {
  const std::string begin = SequenceKey(sequence_id);
  const std::string end = begin + "\xff";  // after every key of the sequence (layer < 2^24)
  const std::string what = absl::StrCat("DropSequence ", sequence_id);
  return db_->SubmitAndWait(
      [&](rocksdb::WriteBatch* batch) { return FromRocks(batch->DeleteRange(begin, end), what); },
      what);
}

namespace {

absl::Status EncodeHeadWrite(const HeadWrite& write, const std::string& what,
                             rocksdb::WriteBatch* out) {
  rocksdb::WriteBatch& batch = *out;
  const std::string head = ShardStore::HeadPrefix(write.sequence_id, write.layer, write.kv_head);
  const auto put = [&](const std::string& key, const std::vector<uint8_t>& value) {
    return batch.Put(key, AsSlice(value));
  };
  if (write.replace) {  // chunk ("C"), head meta ("H") and tail ("T") records
    KVR_RETURN_IF_ERROR(FromRocks(batch.DeleteRange(head + "C", head + "U"), what));
  }
  if (write.clear_tail) {
    KVR_RETURN_IF_ERROR(FromRocks(batch.DeleteRange(head + "T", head + "U"), what));
  }
  for (const ChunkWrite& c : write.chunks) {
    const ShardKey shard{write.sequence_id, write.layer, write.kv_head, c.chunk};
    KVR_RETURN_IF_ERROR(FromRocks(put(ShardStore::ChunkMetaKey(shard), EncodeChunkMeta(c)), what));
    if (!c.index_blob.empty()) {
      KVR_RETURN_IF_ERROR(
          FromRocks(batch.Put(ShardStore::ChunkIndexKey(shard), AsSlice(c.index_blob)), what));
    }
    if (c.segment.has_value() && c.segment->rows > 0) {
      const ValueSegment& s = *c.segment;
      if (s.positions.size() != static_cast<size_t>(s.rows) ||
          s.values.size() % static_cast<size_t>(s.rows) != 0) {
        return absl::InternalError(absl::StrCat(what, ": value segment of ", s.rows, " rows has ",
                                                s.positions.size(), " positions and ",
                                                s.values.size(), " value bytes"));
      }
      KVR_RETURN_IF_ERROR(FromRocks(
          put(ShardStore::ValueSegmentKey(shard, s.first_row),
              EncodeSegment(kValueSegmentBlob, s.rows, static_cast<uint32_t>(write.head_dim),
                            write.value_dtype, ConstMatrixView(), s.values, s.positions)),
          what));
    }
  }
  if (write.tail.has_value() && write.tail->keys.rows() > 0) {
    const TailWrite& t = *write.tail;
    KVR_RETURN_IF_ERROR(FromRocks(
        put(ShardStore::TailSegmentKey(write.sequence_id, write.layer, write.kv_head,
                                       t.positions.front()),
            EncodeSegment(kTailSegmentBlob, static_cast<int64_t>(t.keys.rows()),
                          static_cast<uint32_t>(write.head_dim), write.value_dtype, t.keys,
                          t.values, t.positions)),
        what));
  }
  return FromRocks(put(ShardStore::HeadMetaKey(write.sequence_id, write.layer, write.kv_head),
                       EncodeHeadMeta(write)),
                   what);
}

}  // namespace

absl::Status ShardStore::CommitHead(const HeadWrite& write) {
  StatusWaiter waiter;
  CommitHeadAsync(write, waiter.callback());
  return waiter.Wait();
}

void ShardStore::CommitHeadAsync(const HeadWrite& write, StatusCallback done) {
  const std::string what = absl::StrCat("CommitHead ", HeadName(write.sequence_id, write.layer,
                                                                write.kv_head));
  db_->Submit([&](rocksdb::WriteBatch* batch) { return EncodeHeadWrite(write, what, batch); },
              what, std::move(done));
}

absl::Status ShardStore::Recover(
    const std::function<absl::Status(const SequenceSpec&, const SequenceOwner&)>& on_sequence,
    const std::function<absl::Status(uint64_t sequence_id, RecoveredHead head)>& on_head) {
  return Walk(on_sequence, on_head, nullptr);
}

absl::Status ShardStore::RecoverSkippingBadSequences(
    const std::function<absl::Status(const SequenceSpec&, const SequenceOwner&)>& on_sequence,
    const std::function<absl::Status(uint64_t sequence_id, RecoveredHead head)>& on_head,
    const std::function<void(uint64_t sequence_id, const absl::Status& why)>& on_bad_sequence) {
  return Walk(on_sequence, on_head, on_bad_sequence);
}

absl::Status ShardStore::Walk(
    const std::function<absl::Status(const SequenceSpec&, const SequenceOwner&)>& on_sequence,
    const std::function<absl::Status(uint64_t sequence_id, RecoveredHead head)>& on_head,
    const std::function<void(uint64_t sequence_id, const absl::Status& why)>& on_bad_sequence) {
  rocksdb::ReadOptions ro;
  ro.verify_checksums = true;
  ro.fill_cache = false;
  const std::string upper = "T";
  const rocksdb::Slice upper_slice(upper);
  ro.iterate_upper_bound = &upper_slice;
  std::unique_ptr<rocksdb::Iterator> it(db_->db->NewIterator(ro));

  std::optional<SequenceSpec> spec;
  std::optional<PendingHead> pending;
  // The sequence whose remaining records are skipped (on_bad_sequence told).
  std::optional<uint64_t> skipping;
  // Strict: `st` is returned. Skipping: the sequence is reported and skipped.
  const auto bad = [&](uint64_t seq, const absl::Status& st) -> absl::Status {
    if (st.ok()) return st;
    if (!on_bad_sequence) return st;
    on_bad_sequence(seq, st);
    pending.reset();
    spec.reset();
    skipping = seq;
    return absl::OkStatus();
  };
  const auto flush = [&]() -> absl::Status {
    if (!pending.has_value()) return absl::OkStatus();
    PendingHead ph = std::move(*pending);
    pending.reset();
    absl::StatusOr<RecoveredHead> head = BuildHead(*spec, ph);
    if (!head.ok()) return bad(ph.seq, head.status());
    return bad(ph.seq, on_head(ph.seq, std::move(head).value()));
  };
  for (it->Seek("S"); it->Valid(); it->Next()) {
    const rocksdb::Slice key = it->key();
    const char* k = key.data();
    if (key.size() < kSeqKeyLen || k[0] != 'S') {
      return Loss("store", absl::StrCat("unexpected key of ", key.size(), " bytes"));
    }
    const uint64_t seq = GetBe64(k + 1);
    if (skipping.has_value() && *skipping == seq) continue;
    if (key.size() == kSeqKeyLen) {  // a sequence's spec: its heads follow
      KVR_RETURN_IF_ERROR(flush());
      absl::StatusOr<StoredSpec> decoded = DecodeSpec(AsBytes(it->value()));
      if (!decoded.ok()) {
        KVR_RETURN_IF_ERROR(bad(seq, Loss(absl::StrCat("sequence ", seq),
                                          absl::StrCat("spec: ", decoded.status().message()))));
        continue;
      }
      if (decoded->spec.sequence_id != seq) {
        KVR_RETURN_IF_ERROR(bad(seq, Loss(absl::StrCat("sequence ", seq),
                                          absl::StrCat("spec names sequence ",
                                                       decoded->spec.sequence_id))));
        continue;
      }
      spec = decoded->spec;
      KVR_RETURN_IF_ERROR(bad(seq, on_sequence(*spec, decoded->owner)));
      continue;
    }
    if (!spec.has_value() || spec->sequence_id != seq) {
      KVR_RETURN_IF_ERROR(flush());
      KVR_RETURN_IF_ERROR(
          bad(seq, Loss(absl::StrCat("sequence ", seq), "shard records without a spec record")));
      continue;
    }
    if (key.size() < kHeadKeyLen + 1) {
      KVR_RETURN_IF_ERROR(bad(seq, Loss(absl::StrCat("sequence ", seq), "truncated shard key")));
      continue;
    }
    const int32_t layer = static_cast<int32_t>(GetBe32(k + kSeqKeyLen));
    const int32_t kv_head = static_cast<int32_t>(GetBe32(k + kSeqKeyLen + 4));
    if (!pending.has_value() || pending->layer != layer || pending->kv_head != kv_head) {
      KVR_RETURN_IF_ERROR(flush());
      if (skipping.has_value() && *skipping == seq) continue;  // that head failed
      pending.emplace();
      pending->seq = seq;
      pending->layer = layer;
      pending->kv_head = kv_head;
    }
    const std::string name = HeadName(seq, layer, kv_head);
    const char type = k[kHeadKeyLen];
    const size_t rest = key.size() - kHeadKeyLen - 1;
    const char* r = k + kHeadKeyLen + 1;
    std::string value = it->value().ToString();
    if (type == 'H' && rest == 0) {
      pending->meta = std::move(value);
    } else if (type == 'T' && rest == 8) {
      pending->tail.emplace_back(FromOrderedBits(GetBe64(r)), std::move(value));
    } else if (type == 'C' && rest >= 5) {
      PendingChunk& pc = pending->chunks[static_cast<int32_t>(GetBe32(r))];
      const char sub = r[4];
      if (sub == 'I' && rest == 5) {
        pc.index_blob = std::move(value);
      } else if (sub == 'M' && rest == 5) {
        pc.meta = std::move(value);
      } else if (sub == 'V' && rest == 13) {
        pc.segments.emplace_back(FromOrderedBits(GetBe64(r + 5)), std::move(value));
      } else {
        KVR_RETURN_IF_ERROR(bad(seq, Loss(name, absl::StrCat("unknown chunk record type '",
                                                             std::string(1, sub), "'"))));
      }
    } else {
      KVR_RETURN_IF_ERROR(bad(seq, Loss(name, absl::StrCat("unknown record type '",
                                                           std::string(1, type), "'"))));
    }
  }
  KVR_RETURN_IF_ERROR(FromRocks(it->status(), "recovery: reading the store"));
  return flush();
}

}  // namespace kvr::retrieval
