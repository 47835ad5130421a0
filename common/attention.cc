#include "common/attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "common/simd/kernels.h"

namespace kvr {

void SetEmpty(std::span<float> o, float* m, float* l) {
  std::fill(o.begin(), o.end(), 0.0f);
  *m = kNegInf;
  *l = 0.0f;
}

void SetEmpty(PartialsView p) {
  for (size_t i = 0; i < p.size(); ++i) SetEmpty(p.o.row_span(i), &p.m[i], &p.l[i]);
}

namespace {

// o <- o / l, or the empty partial when nothing contributed.
void Finish(std::span<float> o, float m, float l, float* m_out, float* l_out) {
  if (!(l > 0.0f)) {
    SetEmpty(o, m_out, l_out);
    return;
  }
  const float inv = 1.0f / l;
  for (float& x : o) x *= inv;
  *m_out = m;
  *l_out = l;
}

}  // namespace

void PartialFromScores(std::span<const float> scores, std::span<const int64_t> ids,
                       const ValueMatrix& values, std::span<float> scratch, std::span<float> o,
                       float* m, float* l) {
  KVR_CHECK(ids.size() == scores.size());
  KVR_CHECK(scratch.size() >= scores.size());
  KVR_CHECK(o.size() == values.cols());
  const auto& k = simd::Active();
  std::fill(o.begin(), o.end(), 0.0f);
  const float mx = k.max(scores.data(), scores.size());
  if (mx == kNegInf || std::isnan(mx)) {
    SetEmpty(o, m, l);
    return;
  }
  k.exp_shift_sum(scores.data(), mx, scratch.data(), scores.size());
  float sum = 0.0f;
  for (size_t j = 0; j < scores.size(); ++j) {
    const float w = scratch[j];
    if (ids[j] < 0 || !(w > 0.0f)) continue;
    KVR_CHECK(static_cast<uint64_t>(ids[j]) < values.rows());
    values.AccumulateRow(static_cast<size_t>(ids[j]), w, o.data());
    sum += w;
  }
  Finish(o, mx, sum, m, l);
}

void PartialFromDenseScores(std::span<const float> scores, const ValueMatrix& values,
                            size_t first_row, std::span<float> scratch, std::span<float> o,
                            float* m, float* l) {
  KVR_CHECK(scratch.size() >= scores.size());
  KVR_CHECK(o.size() == values.cols());
  KVR_CHECK(first_row + scores.size() <= values.rows());
  const auto& k = simd::Active();
  std::fill(o.begin(), o.end(), 0.0f);
  const float mx = k.max(scores.data(), scores.size());
  if (mx == kNegInf || std::isnan(mx)) {
    SetEmpty(o, m, l);
    return;
  }
  const float sum = k.exp_shift_sum(scores.data(), mx, scratch.data(), scores.size());
  for (size_t j = 0; j < scores.size(); ++j) {
    const float w = scratch[j];
    if (w > 0.0f) values.AccumulateRow(first_row + j, w, o.data());
  }
  Finish(o, mx, sum, m, l);
}

void MergeInto(std::span<float> o, float* m, float* l, std::span<const float> o2, float m2,
               float l2) {
  KVR_CHECK(o.size() == o2.size());
  if (!(l2 > 0.0f)) return;  // merging an empty partial: identity
  if (!(*l > 0.0f)) {        // this one is empty: take the other
    std::copy(o2.begin(), o2.end(), o.begin());
    *m = m2;
    *l = l2;
    return;
  }
  const float mx = std::max(*m, m2);
  const float a = *l * std::exp(*m - mx);
  const float b = l2 * std::exp(m2 - mx);
  const float total = a + b;
  const float wa = a / total;
  const float wb = b / total;
  for (size_t i = 0; i < o.size(); ++i) o[i] = wa * o[i] + wb * o2[i];
  *m = mx;
  *l = total;
}

void MergeInto(PartialsView dst, ConstPartialsView src) {
  KVR_CHECK(dst.size() == src.size());
  KVR_CHECK(dst.dim() == src.dim());
  for (size_t i = 0; i < dst.size(); ++i) {
    MergeInto(dst.o.row_span(i), &dst.m[i], &dst.l[i], src.o.row_span(i), src.m[i], src.l[i]);
  }
}

void MergeMany(ConstPartialsView parts, std::span<float> o, float* m, float* l) {
  KVR_CHECK(parts.dim() == o.size());
  KVR_CHECK(parts.l.size() == parts.size() && parts.o.rows() == parts.size());
  float mx = kNegInf;
  for (size_t j = 0; j < parts.size(); ++j) {
    if (parts.l[j] > 0.0f) mx = std::max(mx, parts.m[j]);
  }
  std::fill(o.begin(), o.end(), 0.0f);
  if (mx == kNegInf) {
    SetEmpty(o, m, l);
    return;
  }
  float total = 0.0f;
  for (size_t j = 0; j < parts.size(); ++j) {
    if (parts.l[j] > 0.0f) total += parts.l[j] * std::exp(parts.m[j] - mx);
  }
  const auto& k = simd::Active();
  for (size_t j = 0; j < parts.size(); ++j) {
    if (!(parts.l[j] > 0.0f)) continue;
    const float w = parts.l[j] * std::exp(parts.m[j] - mx) / total;
    if (w > 0.0f) k.axpy(w, parts.o.row(j), o.data(), o.size());
  }
  *m = mx;
  *l = total;
}

absl::Status ExactAttention(ConstMatrixView queries, ConstMatrixView keys,
                            const ValueMatrix& values, float scale, PartialsView out) {
  if (queries.cols() != keys.cols() && !queries.empty() && !keys.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("exact attention: query dim ", queries.cols(),
                                                   " != key dim ", keys.cols()));
  }
  if (values.rows() != keys.rows()) {
    return absl::InvalidArgumentError(absl::StrCat("exact attention: ", values.rows(),
                                                   " value rows != ", keys.rows(), " keys"));
  }
  if (out.size() != queries.rows() || out.o.rows() != queries.rows() ||
      out.l.size() != queries.rows() || out.dim() != values.cols()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "exact attention: output holds ", out.size(), " x ", out.dim(), " partials, need ",
        queries.rows(), " x ", values.cols()));
  }
  if (!std::isfinite(scale)) {
    return absl::InvalidArgumentError(absl::StrCat("exact attention: scale ", scale,
                                                   " is not finite"));
  }
  const auto& k = simd::Active();
  const size_t n = keys.rows();
  std::vector<float> scores(n), weights(n);
  for (size_t i = 0; i < queries.rows(); ++i) {
    if (n == 0) {
      SetEmpty(out.o.row_span(i), &out.m[i], &out.l[i]);
      continue;
    }
    k.dot_batch(queries.row(i), keys.data(), n, keys.cols(), keys.stride(), scores.data());
    for (float& s : scores) s *= scale;
    PartialFromDenseScores(scores, values, 0, weights, out.o.row_span(i), &out.m[i], &out.l[i]);
  }
  return absl::OkStatus();
}

}  // namespace kvr
