#include "retrieval_node/index/index.h"

#include <cmath>
#include <string>

#include "retrieval_node/index/attention_graph_index.h"
#include "retrieval_node/index/flat_index.h"
#include "retrieval_node/index/ivf_index.h"

namespace kvr::index {

absl::string_view IndexTypeName(IndexType type) {
  switch (type) {
    case IndexType::kGraph:
      return "graph";
    case IndexType::kFlat:
      return "flat";
    case IndexType::kIvf:
      return "ivf";
  }
  return "unknown";
}

absl::StatusOr<IndexType> ParseIndexType(absl::string_view name) {
  if (name == "graph") return IndexType::kGraph;
  if (name == "flat") return IndexType::kFlat;
  if (name == "ivf") return IndexType::kIvf;
  return absl::InvalidArgumentError(
      absl::StrCat("index type \"", std::string(name), "\" is not one of graph, flat, ivf"));
}

absl::Status ValidateFinite(ConstMatrixView m, size_t dim, absl::string_view what) {
  if (m.rows() > 0 && m.cols() != dim) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, " dim ", m.cols(), " != index dim ", dim));
  }
  for (size_t i = 0; i < m.rows(); ++i) {
    const float* r = m.row(i);
    for (size_t j = 0; j < m.cols(); ++j) {
      if (!std::isfinite(r[j])) {
        return absl::InvalidArgumentError(absl::StrCat(what, " row ", i, " col ", j, " is ",
                                                       std::isnan(r[j]) ? "NaN" : "Inf"));
      }
    }
  }
  return absl::OkStatus();
}

absl::Status ValidateSearchArgs(size_t dim, size_t size, ConstMatrixView queries, int k,
                                std::span<int64_t> ids, std::span<float> scores,
                                absl::string_view what) {
  if (queries.rows() > 0 && queries.cols() != dim) {
    return absl::InvalidArgumentError(
        absl::StrCat("query dim ", queries.cols(), " != ", what, " dim ", dim));
  }
  if (k < 1 || k > kMaxSearchK) {
    return absl::InvalidArgumentError(
        absl::StrCat("k=", k, " outside [1, ", kMaxSearchK, "]"));
  }
  if (size == 0) {
    return absl::InvalidArgumentError(absl::StrCat("search on an empty ", what));
  }
  if (static_cast<size_t>(k) > size) {
    return absl::InvalidArgumentError(
        absl::StrCat("k=", k, " exceeds ", what, " size ", size));
  }
  const size_t need = queries.rows() * static_cast<size_t>(k);
  if (ids.size() < need || scores.size() < need) {
    return absl::InvalidArgumentError(absl::StrCat(
        "output holds ", ids.size(), " ids and ", scores.size(), " scores, need ", need, " (",
        queries.rows(), " queries x k=", k, ")"));
  }
  return ValidateFinite(queries, dim, "queries");
}

absl::Status ValidateSearch(const KeyIndex& index, ConstMatrixView queries,
                            const SearchParams& params, std::span<int64_t> ids,
                            std::span<float> scores) {
  const std::string what = absl::StrCat(std::string(IndexTypeName(index.type())), " index");
  return ValidateSearchArgs(index.dim(), index.size(), queries, params.k, ids, scores, what);
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
  }
  return absl::InvalidArgumentError(absl::StrCat("unknown index kind ", opened.kind));
}

}  // namespace kvr::index
