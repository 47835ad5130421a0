// Conversions between the kvr.v1 messages and the plain C++ structs of
// retrieval_node/core/node_types.h, shared by the node's handlers
// (retrieval_node/server/node_service.h) and the gRPC / UCX clients
// (retrieval_node/client/). The only place that maps the C++ enums (DType,
// index::IndexType) to and from their kvr.v1 numbering.
//
// Every function that reads a message from the wire validates it and returns
// InvalidArgument naming the field and the limit; none aborts on bad input.
// Packed tensors are little-endian row-major (x86-64 / aarch64 hosts).
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "common/status.h"
#include "common/tensor.h"
#include "common/value_matrix.h"
#include "grpcpp/support/status.h"
#include "kvr/v1/retrieval.pb.h"
#include "retrieval_node/core/node_sync.h"
#include "retrieval_node/core/node_types.h"

namespace kvr::retrieval {

// absl::Status <-> grpc::Status (the code numbering is the same).
grpc::Status ToGrpcStatus(const absl::Status& status);
absl::Status FromGrpcStatus(const grpc::Status& status);

// Enum conversions. The From* functions reject UNSPECIFIED and unknown
// values, naming `field`.
absl::StatusOr<DType> DTypeFromProto(int dtype, absl::string_view field);
v1::DType DTypeToProto(DType dtype);
absl::StatusOr<IndexType> IndexTypeFromProto(int type, absl::string_view field);
v1::IndexType IndexTypeToProto(IndexType type);

absl::StatusOr<SequenceSpec> SequenceSpecFromProto(const v1::SequenceSpec& spec);
void SequenceSpecToProto(const SequenceSpec& spec, v1::SequenceSpec* out);
ShardKey ShardKeyFromProto(const v1::ShardKey& key);
void ShardKeyToProto(const ShardKey& key, v1::ShardKey* out);
void ShardInfoToProto(const ShardInfo& info, v1::ShardInfo* out);
absl::StatusOr<ShardInfo> ShardInfoFromProto(const v1::ShardInfo& info);

// Fills `out` from `request` (queries packed as fp32, the shard selection as
// repeated HeadChunk). The clients' one encoder of Attend.
void AttendRequestToProto(const AttendRequest& request, v1::AttendRequest* out);
// Fills `out` from `request` (keys and values packed as fp32). The clients'
// one encoder of Append (gRPC Append / AppendBatch, UCX AppendBatch).
void AppendRequestToProto(const AppendRequest& request, v1::AppendRequest* out);

// The shard selection of `request` into `out` (cleared first).
// InvalidArgument naming `shards` when it lists more than `max_shards`
// entries (the node's bound: n_kv_heads x held chunks is checked by the core;
// this one bounds the copy before the sequence is known).
absl::Status AttendShardsFromProto(const v1::AttendRequest& request, size_t max_shards,
                                   std::vector<HeadChunkRef>* out);

// SyncShards / ReadShards (node_sync.h). The From* functions check what a
// peer sent: counts against `max_entries` (InvalidArgument naming the field),
// packed sizes (positions a multiple of 8 bytes, tail_keys of 4; DataLoss
// for a source's chunk), enums; ranges against the sequence are the core's.
void SyncRequestToProto(const SyncRequest& request, v1::SyncShardsRequest* out);
absl::StatusOr<SyncRequest> SyncRequestFromProto(const v1::SyncShardsRequest& request,
                                                 size_t max_entries);
void SyncResultToProto(const SyncResult& result, v1::SyncShardsResponse* out);
SyncResult SyncResultFromProto(const v1::SyncShardsResponse& response);
void ReadShardsQueryToProto(const ReadShardsQuery& query, v1::ReadShardsRequest* out);
absl::StatusOr<ReadShardsQuery> ReadShardsQueryFromProto(const v1::ReadShardsRequest& request,
                                                         size_t max_entries);
void SyncHeaderToProto(const SyncHeader& header, v1::ReadShardsHeader* out);
absl::StatusOr<SyncHeader> SyncHeaderFromProto(const v1::ReadShardsHeader& header);
void SyncChunkToProto(const SyncChunkData& chunk, v1::SyncChunk* out);
absl::StatusOr<SyncChunkData> SyncChunkFromProto(const v1::SyncChunk& chunk);

// Bytes of `rows` x `cols` elements of `dtype`, or InvalidArgument naming
// `field` when rows is outside [0, max_rows] or cols outside [1, max_cols].
absl::StatusOr<int64_t> PackedBytes(int64_t rows, int64_t cols, DType dtype, int64_t max_rows,
                                    int64_t max_cols, absl::string_view field);

// Converts `count` packed elements of `dtype` in `bytes` (exactly
// count * DTypeSize bytes, checked) to fp32, appending to `out`.
absl::Status UnpackFloats(std::span<const uint8_t> bytes, DType dtype, absl::string_view field,
                          std::vector<float>* out);

// Checks a Matrix message (dtype known, rows in [0, max_rows], cols ==
// `cols` when cols > 0, data size == rows * cols * dtype size) and converts
// it to fp32 into `out` (rows x cols). `finite`: also reject NaN / Inf.
absl::Status UnpackMatrix(const v1::Matrix& m, int64_t max_rows, int64_t cols, bool finite,
                          absl::string_view field, Matrix* out);

// Packs `m` (any stride) as a DTYPE_F32 Matrix message.
void PackMatrix(ConstMatrixView m, v1::Matrix* out);

// Appends rows [begin, end) of `m` as packed fp32 bytes to `out`.
void AppendRows(ConstMatrixView m, size_t begin, size_t end, std::string* out);

// InvalidArgument naming `field` and the first offending index if any value
// is NaN or Inf.
absl::Status CheckFinite(std::span<const float> values, absl::string_view field);

}  // namespace kvr::retrieval
