#include "retrieval_node/index/index.h"

#include <string>

#include "retrieval_node/index/attention_graph_index.h"
#include "retrieval_node/index/calibrate.h"
#include "retrieval_node/index/flat_index.h"
#include "retrieval_node/index/flat_sq8_index.h"
#include "retrieval_node/index/ivf_index.h"
#include "retrieval_node/index/pca_sq8_index.h"

namespace kvr::index {

absl::string_view IndexTypeName(IndexType type) {
  switch (type) {
    case IndexType::kGraph:
      return "graph";
    case IndexType::kFlat:
      return "flat";
    case IndexType::kIvf:
      return "ivf";
    case IndexType::kAuto:
      return "auto";
    case IndexType::kFlatSq8:
      return "flat_sq8";
    case IndexType::kIvfSq8:
      return "ivf_sq8";
    case IndexType::kPcaSq8:
      return "pca_sq8";
  }
  return "unknown";
}

absl::StatusOr<IndexType> ParseIndexType(absl::string_view name) {
  if (name == "graph") return IndexType::kGraph;
  if (name == "flat") return IndexType::kFlat;
  if (name == "ivf") return IndexType::kIvf;
  if (name == "auto") return IndexType::kAuto;
  if (name == "flat_sq8") return IndexType::kFlatSq8;
  if (name == "ivf_sq8") return IndexType::kIvfSq8;
  if (name == "pca_sq8") return IndexType::kPcaSq8;
  return absl::InvalidArgumentError(
      absl::StrCat("index type \"", std::string(name),
                   "\" is not one of graph, flat, ivf, auto, flat_sq8, ivf_sq8, pca_sq8"));
}

absl::Status ValidateFinite(ConstMatrixView m, size_t dim, absl::string_view what) {
  if (m.rows() > 0 && m.cols() != dim) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, " dim ", m.cols(), " != index dim ", dim));
  }
  return CheckFinite(m, what);
}

absl::Status ValidateSearch(const KeyIndex& index, ConstMatrixView queries,
                            const SearchParams& params, std::span<int64_t> ids,
                            std::span<float> scores) {
  const std::string what = absl::StrCat(std::string(IndexTypeName(index.type())), " index");
  return ValidateTopKArgs(index.dim(), index.size(), queries, params.k, ids, scores, what);
}

absl::StatusOr<std::unique_ptr<KeyIndex>> LoadIndex(std::span<const uint8_t> blob) {
  KVR_ASSIGN_OR_RETURN(OpenedBlob opened, OpenBlob(blob));
  switch (opened.kind) {
    case kFlatBlobKind: {
      KVR_ASSIGN_OR_RETURN(auto idx, FlatIndex::Deserialize(opened));
      return std::unique_ptr<KeyIndex>(std::move(idx));
    }
    case kIvfBlobKind: {
      KVR_ASSIGN_OR_RETURN(auto idx, IvfIndex::Deserialize(opened));
      return std::unique_ptr<KeyIndex>(std::move(idx));
    }
    case kGraphBlobKind: {
      KVR_ASSIGN_OR_RETURN(auto idx, AttentionGraphIndex::Deserialize(opened));
      return std::unique_ptr<KeyIndex>(std::move(idx));
    }
    case kFlatSq8BlobKind: {
      KVR_ASSIGN_OR_RETURN(auto idx, FlatSq8Index::Deserialize(opened));
      return std::unique_ptr<KeyIndex>(std::move(idx));
    }
    case kPcaSq8BlobKind: {
      KVR_ASSIGN_OR_RETURN(auto idx, PcaSq8Index::Deserialize(opened));
      return std::unique_ptr<KeyIndex>(std::move(idx));
    }
    case kCalibratedBlobKind: {
      KVR_ASSIGN_OR_RETURN(auto idx, CalibratedIndex::Deserialize(opened));
      return std::unique_ptr<KeyIndex>(std::move(idx));
    }
  }
  return absl::InvalidArgumentError(absl::StrCat("unknown index kind ", opened.kind));
}

}  // namespace kvr::index
