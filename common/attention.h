// Partial attention and its log-sum-exp merge (RetrievalAttention App. B.1).
//
// A partial of one query over a key set S with scaled scores s_i:
//   m = max_i s_i,  l = sum_i exp(s_i - m),  o = sum_i exp(s_i - m) v_i / l.
// The empty set is (o = 0, m = -inf, l = 0). Partials over disjoint sets merge
// exactly:  M = max_j m_j,  L = sum_j l_j e^(m_j - M),  O = sum_j o_j l_j e^(m_j - M) / L.
// Merging with an empty partial is the identity; merging empties stays empty.
// A partial is "empty" iff l == 0.
//
// All functions are allocation-free unless noted, thread-compatible, and use
// the active SIMD kernels (fp32 accumulation).
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>

#include "common/status.h"
#include "common/tensor.h"
#include "common/value_matrix.h"

namespace kvr {

inline constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// n partials of width dv: row i of `o` with m[i], l[i]. Non-owning.
struct PartialsView {
  MatrixView o;         // n x dv
  std::span<float> m;   // n
  std::span<float> l;   // n

  size_t size() const { return m.size(); }
  size_t dim() const { return o.cols(); }
  // Partials [begin, begin + count).
  PartialsView slice(size_t begin, size_t count) const {
    return {o.rows_slice(begin, count), m.subspan(begin, count), l.subspan(begin, count)};
  }
};

struct ConstPartialsView {
  ConstMatrixView o;
  std::span<const float> m;
  std::span<const float> l;

  ConstPartialsView() = default;
  ConstPartialsView(ConstMatrixView o_in, std::span<const float> m_in, std::span<const float> l_in)
      : o(o_in), m(m_in), l(l_in) {}
  ConstPartialsView(const PartialsView& p)  // NOLINT(runtime/explicit)
      : o(p.o), m(p.m), l(p.l) {}
  size_t size() const { return m.size(); }
  size_t dim() const { return o.cols(); }
};

// Owning storage for n partials (tests, tools, the worker's merge buffers).
struct Partials {
  Matrix o;
  std::vector<float> m;
  std::vector<float> l;

  Partials() = default;
  // n empty partials of width dv.
  Partials(size_t n, size_t dv) : o(n, dv), m(n, kNegInf), l(n, 0.0f) {}
  PartialsView view() { return {o.view(), m, l}; }
  ConstPartialsView view() const { return {o.view(), m, l}; }
};

// Sets every partial in `p` to the empty partial.
void SetEmpty(PartialsView p);
// Sets one partial (o, *m, *l) to empty.
void SetEmpty(std::span<float> o, float* m, float* l);

// The partial of one query over the value rows `ids` with already-scaled
// scores `scores` (scores[j] belongs to ids[j]). Entries with id < 0 or score
// -inf are padding and contribute nothing. `scratch` must hold at least
// scores.size() floats (exp weights). Writes o (values.cols() floats), *m, *l.
// KVR_CHECKs sizes and ids < values.rows().
void PartialFromScores(std::span<const float> scores, std::span<const int64_t> ids,
                       const ValueMatrix& values, std::span<float> scratch, std::span<float> o,
                       float* m, float* l);

// As above with value rows 0..scores.size()-1 (a dense key range).
void PartialFromDenseScores(std::span<const float> scores, const ValueMatrix& values,
                            size_t first_row, std::span<float> scratch, std::span<float> o,
                            float* m, float* l);

// (o, *m, *l) <- merge((o, *m, *l), (o2, m2, l2)). Spans have equal length.
void MergeInto(std::span<float> o, float* m, float* l, std::span<const float> o2, float m2,
               float l2);

// Element-wise MergeInto for n queries: dst[i] <- merge(dst[i], src[i]).
// KVR_CHECKs equal shapes.
void MergeInto(PartialsView dst, ConstPartialsView src);

// Merges `parts` (p partials of ONE query: rows of parts.o) into (o, *m, *l),
// overwriting them. All-empty (or p == 0) gives the empty partial.
void MergeMany(ConstPartialsView parts, std::span<float> o, float* m, float* l);

// Exact attention (the "exact scan" baseline) of every query row over ALL keys:
// out[i] = partial over keys 0..n-1 with s_j = scale * (q_i . k_j). Returns
// InvalidArgument on shape mismatches (queries/keys dims, values rows vs keys
// rows, out size). Allocates one n_keys score buffer per call.
absl::Status ExactAttention(ConstMatrixView queries, ConstMatrixView keys,
                            const ValueMatrix& values, float scale, PartialsView out);

}  // namespace kvr
