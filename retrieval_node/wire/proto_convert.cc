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
    default:
      return absl::InvalidArgumentError(absl::StrCat(
          field, " ", type,
          " is not one of INDEX_TYPE_GRAPH (1), INDEX_TYPE_FLAT (2), INDEX_TYPE_IVF (3)"));
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
  out->mutable_shards()->Reserve(static_cast<int>(request.shards.size()));
  for (const HeadChunkRef& ref : request.shards) {
    v1::HeadChunk* s = out->add_shards();
    s->set_kv_head(ref.kv_head);
    s->set_chunk(ref.chunk);
  }
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

}  // namespace kvr::retrieval
