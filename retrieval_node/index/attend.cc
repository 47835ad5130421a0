#include "retrieval_node/index/attend.h"

#include <algorithm>
#include <cmath>

namespace kvr::index {

size_t AttendScratch::MemoryBytes() const {
  return ids_.capacity() * sizeof(int64_t) +
         (scores_.capacity() + weights_.capacity() + estimate_o_.capacity()) * sizeof(float);
}

absl::Status Attend(ConstMatrixView queries, const KeyIndex& index, const ValueMatrix& values,
                    const AttendParams& params, PartialsView out, AttendScratch* scratch,
                    SearchStats* stats, EstimateStats* estimate_stats) {
  KVR_CHECK(scratch != nullptr);
  const size_t n = queries.rows();
  if (values.rows() != index.size()) {
    return absl::InvalidArgumentError(absl::StrCat("attend: ", values.rows(),
                                                   " value rows != ", index.size(),
                                                   " indexed keys"));
  }
  if (out.size() != n || out.o.rows() != n || out.l.size() != n ||
      out.dim() != values.cols()) {
    return absl::InvalidArgumentError(absl::StrCat("attend: output holds ", out.size(), " x ",
                                                   out.dim(), " partials, need ", n, " x ",
                                                   values.cols()));
  }
  if (!std::isfinite(params.scale) || !(params.scale > 0.0f)) {
    return absl::InvalidArgumentError(
        absl::StrCat("attend: scale ", params.scale, " must be finite and > 0"));
  }
  if (const ClusterSummary* est = params.estimate;
      est != nullptr && (est->size() != index.size() || est->dim() != index.dim() ||
                         est->value_dim() != values.cols())) {
    return absl::InvalidArgumentError(absl::StrCat(
        "attend: estimate summary covers ", est->size(), " keys of dim ", est->dim(), " / ",
        est->value_dim(), ", index holds ", index.size(), " of dim ", index.dim(), " / ",
        values.cols()));
  }
  KVR_RETURN_IF_ERROR(ValidateExactZone(params.zone));
  if (params.search.k < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("k=", params.search.k, " outside [1, ", kMaxSearchK, "]"));
  }
  if (index.size() == 0) {
    KVR_RETURN_IF_ERROR(ValidateFinite(queries, index.dim(), "queries"));
    SetEmpty(out);
    if (stats != nullptr) stats->queries += static_cast<int64_t>(n);
    return absl::OkStatus();
  }
  // A shard smaller than k: attend to every key.
  SearchParams search = params.search;
  search.k = static_cast<int>(std::min<size_t>(static_cast<size_t>(search.k), index.size()));
  const size_t k = static_cast<size_t>(search.k);
  if (scratch->ids_.size() < n * k) {
    scratch->ids_.resize(n * k);
    scratch->scores_.resize(n * k);
  }
  if (scratch->weights_.size() < k) scratch->weights_.resize(k);
  std::span<int64_t> ids(scratch->ids_.data(), n * k);
  std::span<float> scores(scratch->scores_.data(), n * k);
  KVR_RETURN_IF_ERROR(index.Search(queries, search, ids, scores, stats));
  const float scale = params.scale;
  for (size_t i = 0; i < n; ++i) {
    float* s = scores.data() + i * k;
    const int64_t* id = ids.data() + i * k;
    for (size_t j = 0; j < k; ++j) s[j] = id[j] < 0 ? kNegInf : s[j] * scale;
    PartialFromScores(std::span<const float>(s, k), std::span<const int64_t>(id, k), values,
                      std::span<float>(scratch->weights_.data(), k), out.o.row_span(i),
                      &out.m[i], &out.l[i]);
    if (params.estimate != nullptr) {
      std::vector<float>& eo = scratch->estimate_o_;
      eo.resize(values.cols());
      float em = kNegInf;
      float el = 0.0f;
      params.estimate->Estimate(queries.row_span(i), scale, std::span<const int64_t>(id, k),
                                index.keys(), values, &scratch->estimate_, eo, &em, &el,
                                estimate_stats, params.zone);
      MergeInto(out.o.row_span(i), &out.m[i], &out.l[i], eo, em, el);
    }
  }
  return absl::OkStatus();
}

}  // namespace kvr::index
