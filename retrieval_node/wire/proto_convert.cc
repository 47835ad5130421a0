#include "retrieval_node/wire/proto_convert.h"

#include <cmath>
#include <cstring>

#include "common/half.h"
#include "retrieval_node/index/index.h"

namespace kvr::retrieval {

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()), std::string(status.message()));
}

absl::Status FromGrpcStatus(const grpc::Status& status) {
  if (status.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()), status.error_message());
}

absl::StatusOr<DType> DTypeFromProto(int dtype, absl::string_view field) {
  switch (dtype) {
    case v1::DTYPE_F32:
      return DType::kF32;
    case v1::DTYPE_BF16:
      return DType::kBf16;
    case v1::DTYPE_F16:
      return DType::kF16;
    default:
      return absl::InvalidArgumentError(absl::StrCat(
          field, " ", dtype, " is not one of DTYPE_F32 (1), DTYPE_BF16 (2), DTYPE_F16 (3)"));
  }
}

v1::DType DTypeToProto(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return v1::DTYPE_F32;
    case DType::kBf16:
      return v1::DTYPE_BF16;
    case DType::kF16:
      return v1::DTYPE_F16;
  }
  return v1::DTYPE_UNSPECIFIED;
}

absl::StatusOr<IndexType> IndexTypeFromProto(int type, absl::string_view field) {
  switch (type) {
    case v1::INDEX_TYPE_GRAPH:
      return IndexType::kGraph;
    case v1::INDEX_TYPE_FLAT:
      return IndexType::kFlat;
    case v1::INDEX_TYPE_IVF:
      return IndexType::kIvf;
    case v1::INDEX_TYPE_AUTO:
      return IndexType::kAuto;
    case v1::INDEX_TYPE_FLAT_SQ8:
      return IndexType::kFlatSq8;
    case v1::INDEX_TYPE_IVF_SQ8:
      return IndexType::kIvfSq8;
    case v1::INDEX_TYPE_PCA_SQ8:
      return IndexType::kPcaSq8;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat(field, " ", type,
                       " is not one of INDEX_TYPE_GRAPH (1), INDEX_TYPE_FLAT (2), "
                       "INDEX_TYPE_IVF (3), INDEX_TYPE_AUTO (4), INDEX_TYPE_FLAT_SQ8 (5), "
                       "INDEX_TYPE_IVF_SQ8 (6), INDEX_TYPE_PCA_SQ8 (7)"));
  }
}

v1::IndexType IndexTypeToProto(IndexType type) {
  switch (type) {
    case IndexType::kGraph:
      return v1::INDEX_TYPE_GRAPH;
    case IndexType::kFlat:
      return v1::INDEX_TYPE_FLAT;
    case IndexType::kIvf:
      return v1::INDEX_TYPE_IVF;
    case IndexType::kAuto:
      return v1::INDEX_TYPE_AUTO;
    case IndexType::kFlatSq8:
      return v1::INDEX_TYPE_FLAT_SQ8;
    case IndexType::kIvfSq8:
      return v1::INDEX_TYPE_IVF_SQ8;
    case IndexType::kPcaSq8:
      return v1::INDEX_TYPE_PCA_SQ8;
  }
  return v1::INDEX_TYPE_UNSPECIFIED;
}

absl::StatusOr<SequenceSpec> SequenceSpecFromProto(const v1::SequenceSpec& spec) {
  SequenceSpec out;
  out.sequence_id = spec.sequence_id();
  out.n_layers = spec.n_layers();
  out.n_heads = spec.n_heads();
  out.n_kv_heads = spec.n_kv_heads();
  out.head_dim = spec.head_dim();
  KVR_ASSIGN_OR_RETURN(out.value_dtype, DTypeFromProto(spec.value_dtype(), "spec.value_dtype"));
  KVR_ASSIGN_OR_RETURN(out.index_type, IndexTypeFromProto(spec.index_type(), "spec.index_type"));
  return out;
}

void SequenceSpecToProto(const SequenceSpec& spec, v1::SequenceSpec* out) {
  out->set_sequence_id(spec.sequence_id);
  out->set_n_layers(spec.n_layers);
  out->set_n_heads(spec.n_heads);
  out->set_n_kv_heads(spec.n_kv_heads);
  out->set_head_dim(spec.head_dim);
  out->set_value_dtype(DTypeToProto(spec.value_dtype));
  out->set_index_type(IndexTypeToProto(spec.index_type));
}

ShardKey ShardKeyFromProto(const v1::ShardKey& key) {
  return ShardKey{key.sequence_id(), key.layer(), key.kv_head(), key.chunk()};
}

void ShardKeyToProto(const ShardKey& key, v1::ShardKey* out) {
  out->set_sequence_id(key.sequence_id);
  out->set_layer(key.layer);
  out->set_kv_head(key.kv_head);
  out->set_chunk(key.chunk);
}

void ShardInfoToProto(const ShardInfo& info, v1::ShardInfo* out) {
  ShardKeyToProto(info.key, out->mutable_key());
  out->set_n_keys(info.n_keys);
  out->set_tail_keys(info.tail_keys);
  out->set_first_position(info.first_position);
  out->set_last_position(info.last_position);
  out->set_index_type(IndexTypeToProto(info.index_type));
  out->set_memory_bytes(info.memory_bytes);
  out->set_search_effort(info.search_effort);
  if (info.expected_recall >= 0) out->set_expected_recall(info.expected_recall);
  if (info.measured_search_us > 0) out->set_measured_search_us(info.measured_search_us);
  out->set_index_pending(info.index_pending);
}

absl::StatusOr<ShardInfo> ShardInfoFromProto(const v1::ShardInfo& info) {
  ShardInfo out;
  out.key = ShardKeyFromProto(info.key());
  out.n_keys = info.n_keys();
  out.tail_keys = info.tail_keys();
  out.first_position = info.first_position();
  out.last_position = info.last_position();
  KVR_ASSIGN_OR_RETURN(out.index_type, IndexTypeFromProto(info.index_type(), "shard.index_type"));
  out.memory_bytes = info.memory_bytes();
  out.search_effort = info.search_effort();
  out.index_pending = info.index_pending();
  if (info.has_expected_recall()) {
    if (!(info.expected_recall() >= 0 && info.expected_recall() <= 1)) {
      return absl::InvalidArgumentError(absl::StrCat("shard.expected_recall ",
                                                     info.expected_recall(), " outside [0, 1]"));
    }
    out.expected_recall = info.expected_recall();
  }
  if (info.has_measured_search_us()) {
    // A search longer than an hour is no measurement this node could make.
    if (!(info.measured_search_us() >= 0 && info.measured_search_us() <= 3.6e9)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "shard.measured_search_us ", info.measured_search_us(), " outside [0, 3.6e9]"));
    }
    out.measured_search_us = info.measured_search_us();
  }
  return out;
}

absl::StatusOr<int64_t> PackedBytes(int64_t rows, int64_t cols, DType dtype, int64_t max_rows,
                                    int64_t max_cols, absl::string_view field) {
  if (rows < 0 || rows > max_rows) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, " rows ", rows, " outside [0, ", max_rows, "]"));
  }
  if (cols < 1 || cols > max_cols) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, " cols ", cols, " outside [1, ", max_cols, "]"));
  }
  // rows <= 2^31 and cols <= 2^12 keep the product far below 2^63.
  return rows * cols * static_cast<int64_t>(DTypeSize(dtype));
}

absl::Status UnpackFloats(std::span<const uint8_t> bytes, DType dtype, absl::string_view field,
                          std::vector<float>* out) {
  const size_t esize = DTypeSize(dtype);
  if (bytes.size() % esize != 0) {
    return absl::InvalidArgumentError(absl::StrCat(field, " has ", bytes.size(),
                                                   " bytes, not a multiple of ", esize, " (",
                                                   std::string(DTypeName(dtype)), ")"));
  }
  const size_t count = bytes.size() / esize;
  const size_t base = out->size();
  out->resize(base + count);
  float* dst = out->data() + base;
  if (dtype == DType::kF32) {
    if (count > 0) std::memcpy(dst, bytes.data(), bytes.size());
    return absl::OkStatus();
  }
  for (size_t i = 0; i < count; ++i) {
    uint16_t h;
    std::memcpy(&h, bytes.data() + 2 * i, 2);
    dst[i] = dtype == DType::kBf16 ? Bf16ToFloat(h) : Fp16ToFloat(h);
  }
  return absl::OkStatus();
}

absl::Status CheckFinite(std::span<const float> values, absl::string_view field) {
  for (size_t i = 0; i < values.size(); ++i) {
    if (!std::isfinite(values[i])) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, " element ", i, " is ", values[i], " (must be finite)"));
    }
  }
  return absl::OkStatus();
}

absl::Status UnpackMatrix(const v1::Matrix& m, int64_t max_rows, int64_t cols, bool finite,
                          absl::string_view field, Matrix* out) {
  KVR_ASSIGN_OR_RETURN(const DType dtype, DTypeFromProto(m.dtype(), absl::StrCat(field, ".dtype")));
  if (cols > 0 && m.cols() != cols) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ".cols ", m.cols(), " != head_dim ", cols));
  }
  KVR_ASSIGN_OR_RETURN(const int64_t bytes,
                       PackedBytes(m.rows(), m.cols(), dtype, max_rows,
                                   static_cast<int64_t>(index::kMaxDim), field));
  if (static_cast<int64_t>(m.data().size()) != bytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        field, ".data has ", m.data().size(), " bytes, expected rows ", m.rows(), " x cols ",
        m.cols(), " x ", DTypeSize(dtype), " (", std::string(DTypeName(dtype)), ") = ", bytes));
  }
  out->rows = static_cast<size_t>(m.rows());
  out->cols = static_cast<size_t>(m.cols());
  out->data.clear();
  out->data.reserve(out->rows * out->cols);
  const auto* p = reinterpret_cast<const uint8_t*>(m.data().data());
  KVR_RETURN_IF_ERROR(UnpackFloats({p, m.data().size()}, dtype, absl::StrCat(field, ".data"),
                                   &out->data));
  if (finite) KVR_RETURN_IF_ERROR(CheckFinite(out->data, field));
  return absl::OkStatus();
}

void AppendRows(ConstMatrixView m, size_t begin, size_t end, std::string* out) {
  const size_t row_bytes = m.cols() * sizeof(float);
  if (m.stride() == m.cols()) {
    out->append(reinterpret_cast<const char*>(m.row(begin)), (end - begin) * row_bytes);
    return;
  }
  for (size_t i = begin; i < end; ++i) {
    out->append(reinterpret_cast<const char*>(m.row(i)), row_bytes);
  }
}

void PackMatrix(ConstMatrixView m, v1::Matrix* out) {
  out->set_dtype(v1::DTYPE_F32);
  out->set_rows(static_cast<int64_t>(m.rows()));
  out->set_cols(static_cast<int32_t>(m.cols()));
  std::string* data = out->mutable_data();
  data->clear();
  data->reserve(m.rows() * m.cols() * sizeof(float));
  if (m.rows() > 0) AppendRows(m, 0, m.rows(), data);
}

void AttendRequestToProto(const AttendRequest& request, v1::AttendRequest* out) {
  out->set_sequence_id(request.sequence_id);
  out->set_layer(request.layer);
  PackMatrix(request.queries, out->mutable_queries());
  out->set_k(request.k);
  out->set_beam(request.beam);
  out->set_nprobe(request.nprobe);
  out->set_scale(request.scale);
  out->set_capability(request.capability);
  out->set_estimate(static_cast<v1::EstimateMode>(static_cast<int32_t>(request.estimate)));
  out->mutable_shards()->Reserve(static_cast<int>(request.shards.size()));
  for (const HeadChunkRef& ref : request.shards) {
    v1::HeadChunk* s = out->add_shards();
    s->set_kv_head(ref.kv_head);
    s->set_chunk(ref.chunk);
  }
}

void AppendRequestToProto(const AppendRequest& request, v1::AppendRequest* out) {
  out->set_sequence_id(request.sequence_id);
  out->set_layer(request.layer);
  out->set_kv_head(request.kv_head);
  out->set_first_position(request.first_position);
  out->set_capability(request.capability);
  PackMatrix(request.keys, out->mutable_keys());
  PackMatrix(request.values, out->mutable_values());
}

absl::Status AttendShardsFromProto(const v1::AttendRequest& request, size_t max_shards,
                                   std::vector<HeadChunkRef>* out) {
  out->clear();
  if (static_cast<size_t>(request.shards_size()) > max_shards) {
    return absl::InvalidArgumentError(absl::StrCat("shards lists ", request.shards_size(),
                                                   " entries > max ", max_shards));
  }
  out->reserve(static_cast<size_t>(request.shards_size()));
  for (const v1::HeadChunk& s : request.shards()) out->push_back({s.kv_head(), s.chunk()});
  return absl::OkStatus();
}

void SyncRequestToProto(const SyncRequest& request, v1::SyncShardsRequest* out) {
  SequenceSpecToProto(request.spec, out->mutable_spec());
  out->set_source_address(request.source_address);
  out->set_capability(request.capability);
  out->set_lease_owner(request.lease_owner);
  for (const ShardRef& s : request.shards) {
    v1::ShardKey* k = out->add_shards();
    k->set_sequence_id(request.spec.sequence_id);
    k->set_layer(s.layer);
    k->set_kv_head(s.kv_head);
    k->set_chunk(s.chunk);
  }
}

absl::StatusOr<SyncRequest> SyncRequestFromProto(const v1::SyncShardsRequest& request,
                                                 size_t max_entries) {
  SyncRequest out;
  KVR_ASSIGN_OR_RETURN(out.spec, SequenceSpecFromProto(request.spec()));
  if (request.source_address().empty() || request.source_address().size() > 1024) {
    return absl::InvalidArgumentError(absl::StrCat("source_address of ",
                                                   request.source_address().size(),
                                                   " bytes: need a host:port of 1..1024"));
  }
  out.source_address = request.source_address();
  out.capability = request.capability();
  out.lease_owner = request.lease_owner();
  if (static_cast<size_t>(request.shards_size()) > max_entries) {
    return absl::InvalidArgumentError(absl::StrCat("shards lists ", request.shards_size(),
                                                   " entries > max ", max_entries));
  }
  out.shards.reserve(static_cast<size_t>(request.shards_size()));
  for (const v1::ShardKey& k : request.shards()) {
    out.shards.push_back({k.layer(), k.kv_head(), k.chunk()});
  }
  return out;
}

void SyncResultToProto(const SyncResult& result, v1::SyncShardsResponse* out) {
  out->set_keys_copied(result.keys_copied);
  out->set_bytes_copied(result.bytes_copied);
  for (int64_t p : result.last_positions) out->add_last_positions(p);
}

SyncResult SyncResultFromProto(const v1::SyncShardsResponse& response) {
  SyncResult out;
  out.keys_copied = response.keys_copied();
  out.bytes_copied = response.bytes_copied();
  out.last_positions.assign(response.last_positions().begin(), response.last_positions().end());
  return out;
}

void ReadShardsQueryToProto(const ReadShardsQuery& query, v1::ReadShardsRequest* out) {
  out->set_sequence_id(query.sequence_id);
  out->set_all(query.all);
  out->set_capability(query.capability);
  for (const SyncCursor& c : query.cursors) {
    v1::SyncCursor* p = out->add_cursors();
    p->set_layer(c.layer);
    p->set_kv_head(c.kv_head);
    p->set_chunk(c.chunk);
    p->set_after_position(c.after_position);
    p->set_known_index_rows(c.known_index_rows);
  }
}

absl::StatusOr<ReadShardsQuery> ReadShardsQueryFromProto(const v1::ReadShardsRequest& request,
                                                         size_t max_entries) {
  if (static_cast<size_t>(request.cursors_size()) > max_entries) {
    return absl::InvalidArgumentError(absl::StrCat("cursors lists ", request.cursors_size(),
                                                   " entries > max ", max_entries));
  }
  ReadShardsQuery out;
  out.sequence_id = request.sequence_id();
  out.all = request.all();
  out.capability = request.capability();
  out.cursors.reserve(static_cast<size_t>(request.cursors_size()));
  for (const v1::SyncCursor& c : request.cursors()) {
    out.cursors.push_back(
        {c.layer(), c.kv_head(), c.chunk(), c.after_position(), c.known_index_rows()});
  }
  return out;
}

void SyncHeaderToProto(const SyncHeader& header, v1::ReadShardsHeader* out) {
  SequenceSpecToProto(header.spec, out->mutable_spec());
  out->set_payload_bytes(header.payload_bytes);
  out->set_chunks(header.chunks);
}

absl::StatusOr<SyncHeader> SyncHeaderFromProto(const v1::ReadShardsHeader& header) {
  SyncHeader out;
  auto spec = SequenceSpecFromProto(header.spec());
  if (!spec.ok()) {
    return absl::DataLossError(absl::StrCat("ReadShards header: ", spec.status().message()));
  }
  out.spec = *spec;
  out.payload_bytes = header.payload_bytes();
  out.chunks = header.chunks();
  return out;
}

void SyncChunkToProto(const SyncChunkData& chunk, v1::SyncChunk* out) {
  out->set_layer(chunk.layer);
  out->set_kv_head(chunk.kv_head);
  out->set_chunk(chunk.chunk);
  out->set_last(chunk.last);
  out->set_index_rows(chunk.index_rows);
  out->set_positions(chunk.positions.data(), chunk.positions.size() * sizeof(int64_t));
  out->set_index_blob(chunk.index_blob.data(), chunk.index_blob.size());
  out->set_first_sent_row(chunk.first_sent_row);
  out->set_values(chunk.values.data(), chunk.values.size());
  out->set_tail_keys(chunk.tail_keys.data(), chunk.tail_keys.size() * sizeof(float));
  out->set_prefix_crc32c(chunk.prefix_crc);
}

absl::StatusOr<SyncChunkData> SyncChunkFromProto(const v1::SyncChunk& chunk) {
  if (chunk.positions().size() % sizeof(int64_t) != 0 ||
      chunk.tail_keys().size() % sizeof(float) != 0) {
    return absl::DataLossError(absl::StrCat("ReadShards chunk ", chunk.chunk(), ": positions of ",
                                            chunk.positions().size(), " bytes / tail_keys of ",
                                            chunk.tail_keys().size(),
                                            " bytes are not whole int64 / f32"));
  }
  SyncChunkData out;
  out.layer = chunk.layer();
  out.kv_head = chunk.kv_head();
  out.chunk = chunk.chunk();
  out.last = chunk.last();
  out.index_rows = chunk.index_rows();
  out.positions.resize(chunk.positions().size() / sizeof(int64_t));
  if (!out.positions.empty()) {
    std::memcpy(out.positions.data(), chunk.positions().data(), chunk.positions().size());
  }
  out.index_blob.assign(chunk.index_blob().begin(), chunk.index_blob().end());
  out.first_sent_row = chunk.first_sent_row();
  out.prefix_crc = chunk.prefix_crc32c();
  out.values.assign(chunk.values().begin(), chunk.values().end());
  out.tail_keys.resize(chunk.tail_keys().size() / sizeof(float));
  if (!out.tail_keys.empty()) {
    std::memcpy(out.tail_keys.data(), chunk.tail_keys().data(), chunk.tail_keys().size());
  }
  return out;
}

}  // namespace kvr::retrieval
