#include "retrieval_node/index/index.h"

#include <string>

#include "retrieval_node/index/attention_graph_index.h"
#include "retrieval_node/index/flat_index.h"
#include "retrieval_node/index/ivf_index.h"

namespace kvr::index {

absl::string_view IndexKindName(IndexKind kind) {
  switch (kind) {
    case IndexKind::kFlat:
      return "flat";
    case IndexKind::kIvf:
      return "ivf";
    case IndexKind::kAttentionGraph:
      return "attention_graph";
  }
  return "unknown";
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
  const std::string what = absl::StrCat(std::string(IndexKindName(index.kind())), " index");
  return ValidateTopKArgs(index.dim(), index.size(), queries, params.k, ids, scores, what);
}

absl::StatusOr<std::unique_ptr<KeyIndex>> LoadIndex(std::span<const uint8_t> blob) {
  KVR_ASSIGN_OR_RETURN(OpenedBlob opened, OpenBlob(blob));
  switch (static_cast<IndexKind>(opened.kind)) {
    case IndexKind::kFlat: {
      KVR_ASSIGN_OR_RETURN(auto idx, FlatIndex::Deserialize(opened));
      return std::unique_ptr<KeyIndex>(std::move(idx));
    }
    case IndexKind::kIvf: {
      KVR_ASSIGN_OR_RETURN(auto idx, IvfIndex::Deserialize(opened));
      return std::unique_ptr<KeyIndex>(std::move(idx));
    }
    case IndexKind::kAttentionGraph: {
      KVR_ASSIGN_OR_RETURN(auto idx, AttentionGraphIndex::Deserialize(opened));
      return std::unique_ptr<KeyIndex>(std::move(idx));
    }
  }
  return absl::InvalidArgumentError(absl::StrCat("unknown index kind ", opened.kind));
}

}  // namespace kvr::index
