// Synthetic attention data for one KV head: keys, values, training (prefill)
// queries and decode queries with the out-of-distribution geometry of real LLM
// attention (DESIGN.md §1, §4), plus diagnostics that measure that geometry.
//
// Several FAMILIES of genuinely different geometry (issue 17: a benchmark that
// cannot overfit one generator); AttentionDataOptions::family picks one,
// AttentionFamilyNames() lists them. Shared by every family: sizes, seed,
// positions (training queries at a sorted random sample of [0, n_keys), decode
// queries at n_keys + test_position_offset + j) and RoPE (pairs (2i, 2i+1)
// rotate at ω_i = rope_theta^(-2i/d), i = 0 the fastest). Values are N(0, I)
// (plus the topic part for "topical" and "sink").
//
// ---- "topical" (the default; the original generator) ----------------------
//
//   key scale s_k[c]    power law (1 + rank)^(-spectrum_decay) over pairs, the
//                       rank following frequency (low frequency = large scale,
//                       as in trained models) up to `spectrum_jitter`.
//   query scale s_q[c]  s_k[c]^(1 - query_spectrum_tilt) * exp(jitter * N(0,1)):
//                       queries weight the channels differently from keys.
//   topics              T_j ~ N(0, I), j < topics; popularity ∝ (j+1)^-topic_skew.
//                       Key positions form runs (mean `segment_length`) that
//                       share one topic, like passages of a document.
//   key k_t  = μ_k + key_norm/√d · s_k ⊙ (√key_topic_share T_z(t) + √(1-·) g)
//              + outliers (a few low-frequency channels with large magnitude
//              of a fixed sign), then RoPE at position t.
//   query q  = μ_q + u_q · s_q ⊙ (√concentration T_z + √(1-concentration) h),
//              then RoPE at its position; u_q is set so that the content
//              logits q·k/√d have std `logit_std` over keys.
//   μ_k      ∝ s_k (rides on the high-variance channels; random signs).
//   μ_q      ∝ 1/s_k with Mahalanobis norm query_mean·√d (lies where keys
//              barely vary: moves queries away from the key distribution
//              without changing which keys they prefer much).
//   value v_t = √value_topic_share V_z(t) + √(1-·) N(0, I)  (no RoPE).
//   Training queries take the topic of their own position; decode queries
//   take the topic of a random earlier position and carry an extra
//   `decode_shift`. So test queries are out of distribution for the keys
//   (different mean, spectrum and norm) and, more mildly, for the training
//   queries (later RoPE angles, decode shift).
//
// ---- "lowrank" (LowRankFamilyOptions): low intrinsic dimension -------------
//
//   Imitates heads whose keys live on a few-dimensional curved manifold (most
//   key energy in a handful of low-frequency RoPE pairs, as measured on real
//   Llama keys). A latent z_t ∈ R^m (m = manifold_dim) follows an
//   Ornstein-Uhlenbeck walk over positions (correlation `correlation_length`),
//   features f(z) = [z, sin(W z + b)] (2·planes of them; W ~ N(0, curvature²))
//   are mixed by a random A into the `planes` lowest-frequency RoPE pairs:
//     key   k_t = μ_k + A f(z_t) (key_norm RMS) + isotropic noise (a `noise`
//           fraction of the key variance, on every channel), then RoPE.
//   RoPE turns each pair within its own plane, so the key cloud stays in
//   2·planes dimensions (+ noise) at any length.
//     query q = A (D ⊙ f(z*)) + an offset outside the key span (norm
//           `query_offset` × the in-span part), then RoPE; D = exp(query_reweight
//           · N(0, 1)) per feature: the same subspace, weighted differently, so
//           a query's best keys are not its L2-nearest ones. z* is the latent
//           of the query's own position (training) or of a random earlier
//           position (decode), plus `query_spread` · N(0, I). Query scale is
//           set so the logits q·k/√d have std `logit_std` over keys.
//
// ---- "flat" (FlatFamilyOptions): near-flat scores ---------------------------
//
//   Imitates broad "averaging" heads: keys μ_k + s ⊙ g with a shallow power-law
//   spectrum (`spectrum_decay`, high intrinsic dimension, no topics), queries a
//   shared mean (all queries like the same keys a little) plus their own
//   direction, channel weights log-normal (std 1) unlike the keys'; the logit
//   std over keys is only `logit_std` (default 0.3), so the exact top-100 holds
//   under 2% of the softmax mass at 16K keys and well under 1% at 128K.
//
// ---- "positional" (PositionalFamilyOptions): a RoPE / recency head ----------
//
//   Keys and queries carry a constant vector c on the RoPE pairs with ω in
//   [1/(4W), 16/W] (W = `recency_window`); after RoPE, q·k/√d = f(m - n) +
//   content, with f(Δ) = position_logit · mean_i cos(Δ ω_i): highest for the
//   nearest positions, fading over ~W (RoPE's aliasing ripples beyond stay
//   below f(100) at 128K keys for W = 1024). The content part (isotropic keys and queries, cross
//   terms included) has std `content_logit_std`: keys are nearly
//   interchangeable except for where they sit. Decode queries attend to the
//   most recent keys. Needs apply_rope.
//
// ---- "sink" (SinkFamilyOptions): sink-dominated -----------------------------
//
//   The topical model underneath (every topical field applies; logit_std
//   replaced by `rest_logit_std`, diffuse), plus an attention sink: the first
//   `sink_keys` keys carry a large value on the lowest-frequency RoPE pair
//   (left unrotated: at θ = 500000 it turns < 0.32 rad over 128K positions,
//   and unrotated the sink holds at any length; a sink key is nothing else,
//   like a BOS token) that every query meets, the
//   j-th with weight 2^-j, sized so the sinks take `sink_mass` of the
//   softmax mass for a typical query; the other keys have small noise there.
//   The top-k always contains the sinks; the rest is topical but diffuse.
//
// Measured OOD statistics per family (kvr_datagen --family=F --n_keys=131072
// --n_train=16384 --n_test=1000; test queries vs keys; "L2-NN" = fraction of a
// query's top-100 inside the 100 L2-nearest keys of its top-1 key, queries vs
// held-out keys used as queries):
//   family      Mahalanobis q→k/k→k   top-100 mass   L2-NN queries / keys
//   topical     177.6 / 11.3 = 15.7×    0.728         0.105 / 0.204
//   lowrank      22.5 / 11.3 =  2.0×    0.288         0.298 / 0.350
//   flat          3.7 / 11.4 =  0.3×    0.002         0.020 / 0.192
//   positional   11.4 / 11.3 =  1.0×    0.121         0.471 / 0.783
//   sink        121.0 / 11.3 = 10.7×    0.682         0.046 / 0.202
// (Mahalanobis is not scale-free: lowrank's and flat's queries are small
// vectors. flat's top-100 holds 1.4% of the mass at 16K keys.)
//
// Everything is a pure function of the options (seed included): the thread
// pool only changes speed, never bytes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "tools/dataset_io.h"
#include "common/tensor.h"
#include "common/thread_pool.h"

namespace kvr {

// "lowrank" family knobs (see the file comment).
struct LowRankFamilyOptions {
  size_t manifold_dim = 4;         // latent dimension m. [1, 16], <= 2 * planes
  size_t planes = 8;               // lowest-frequency RoPE pairs the keys span. [1, dim/2]
  double curvature = 1.0;          // std of the latent→sine frequencies. [0, 10]
  double correlation_length = 32;  // positions over which the latent walk decorrelates. [1, 1e9]
  double noise = 0.05;             // fraction of key variance off the manifold. [0, 0.5]
  double query_reweight = 1.0;     // log-normal std of the query's feature weights. [0, 4]
  double query_offset = 2.0;       // |query outside key span| / |query in span|. [0, 100]
  double query_spread = 0.3;       // latent std of a query around its target. [0, 10]
  double logit_std = 3.0;          // std over keys of q·k/√d. (0, 1000]
};

// "flat" family knobs.
struct FlatFamilyOptions {
  double spectrum_decay = 0.25;  // power-law exponent of the key channel scales. [0, 4]
  double shared_query = 0.5;     // fraction of query variance in the shared mean. [0, 1]
  double logit_std = 0.3;        // std over keys of q·k/√d. (0, 1000]
};

// "positional" family knobs.
struct PositionalFamilyOptions {
  double recency_window = 1024;     // positions the recency bump spans. [1, 1e9]
  double position_logit = 10.0;     // f(0): logit gain of the nearest positions. [0, 1000]
  double content_logit_std = 0.5;   // std of the content part of the logits. (0, 1000]
};

// "sink" family knobs (the topical fields apply underneath).
struct SinkFamilyOptions {
  size_t sink_keys = 4;         // the first keys that act as sinks. [1, 64], <= n_keys
  double sink_mass = 0.8;       // softmax mass they take for a typical query. [0.001, 0.999]
  double rest_logit_std = 1.5;  // logit_std of the topical part (diffuse). (0, 1000]
};

struct AttentionDataOptions {
  // Data family: "topical" (default), "lowrank", "flat", "positional", "sink"
  // (AttentionFamilyNames()); the topical fields below apply to "topical" and
  // "sink", the family structs to their family.
  std::string family = "topical";
  LowRankFamilyOptions lowrank;
  FlatFamilyOptions flat;
  PositionalFamilyOptions positional;
  SinkFamilyOptions sink;

  // --- sizes ---------------------------------------------------------------
  size_t n_keys = 131072;  // keys and values, at positions 0..n_keys-1. [1, 2^31)
  size_t n_train = 16384;  // prefill queries, <= n_keys (n_keys = one per position)
  size_t n_test = 1000;    // decode queries, at positions after the keys
  size_t dim = 128;        // head dim d (keys, queries and values); even, [2, 1024]
  uint64_t seed = 1;       // same options + seed => identical bytes

  // --- positions and RoPE --------------------------------------------------
  bool apply_rope = true;       // rotate keys and queries by position
  double rope_theta = 500000;   // RoPE base θ (Llama 3); > 1
  size_t test_position_offset = 0;  // first decode position = n_keys + offset

  // --- spectrum ------------------------------------------------------------
  // Power-law exponent of the per-pair scales (0 = isotropic). Larger values
  // concentrate energy on a few low-frequency pairs. [0, 4]
  double spectrum_decay = 1.0;
  // How far the scale ranking departs from the frequency ranking, as a
  // fraction of the number of pairs (0 = strictly by frequency). [0, 4]
  double spectrum_jitter = 0.25;
  // Shape of the query scales relative to the key scales:
  // s_q ∝ s_k^(1 - query_spectrum_tilt). 0 = queries weight channels like keys
  // do; 1 = isotropic queries; 2 = queries weight most the channels where keys
  // vary least. Tilting spreads a query's top-k across the key cloud (the
  // geometry that defeats key-key graphs). [0, 2]
  double query_spectrum_tilt = 1.0;
  // Log-normal std of the query scales on top of the tilt. [0, 4]
  double query_spectrum_jitter = 0.5;
  // RMS norm of the key content part (sets absolute key magnitudes). > 0
  double key_norm = 12.0;
  // Expected std over keys of a query's content logit q·k/√d: the softmax
  // temperature, i.e. how peaked attention is. The query content norm is
  // derived from it (so tilting the spectrum does not flatten attention). > 0
  double logit_std = 3.0;

  // --- means ---------------------------------------------------------------
  double key_mean = 0.5;    // |μ_k| / key_norm. >= 0
  // Size of the query mean μ_q as a Mahalanobis norm under the key content
  // covariance, in units of √d (a typical key is ≈ √d from the key mean).
  // μ_q lies where keys barely vary, so it moves queries away from the keys
  // without changing which keys they prefer. >= 0
  double query_mean = 1.0;

  // --- key outlier channels --------------------------------------------------
  // Outlier channels, drawn among the lowest-frequency quarter of the pairs;
  // <= 2 * max(1, d/8) (32 for d = 128).
  size_t outlier_channels = 4;
  double outlier_scale = 8.0;   // their magnitude / RMS key channel (key_norm/√d). >= 0
  double outlier_spread = 0.3;  // relative std of an outlier's magnitude. >= 0

  // --- topics (low-rank shared structure) ------------------------------------
  size_t topics = 256;           // number of latent topics. [1, 2^20]
  double topic_skew = 1.0;       // Zipf exponent of topic popularity. >= 0
  double segment_length = 64;    // mean run of consecutive key positions per topic. >= 1
  double key_topic_share = 0.3;  // fraction of key content variance along its topic. [0, 1]
  // Fraction of query content variance along its topic: how strongly a query's
  // attention concentrates on one topic's keys (1 = every query of a topic
  // wants the same keys; 0 = queries are unstructured). [0, 1]
  double concentration = 0.5;
  // Extra mean shift of decode queries (vs training queries) / RMS query
  // content norm. >= 0
  double decode_shift = 0.2;
  double value_topic_share = 0.5;  // fraction of value variance along its topic. [0, 1]
};

// Named difficulty presets of the "topical" family; sizes and seed keep their defaults, unknown names
// are InvalidArgument.
//              spectrum_decay  query_spectrum_tilt  outlier_scale  concentration  logit_std
//   "easy"          1.5              0.5                 4             0.7           4.0
//   "default"       1.0              1.0                 8             0.5           3.0
//   "hard"          0.75             1.5                16             0.35          2.5
// Harder = higher intrinsic key dimension, queries weighting channels unlike
// keys, less topical queries, stronger outliers (logit_std is separate: at
// 131072 keys the top-100 softmax mass is about 0.55 / 0.73 / 0.88). Measured with a key-key L2
// kNN graph (degree 16 + reverse edges) searched by inner product, 16384
// keys, beam 100: recall@100 easy 0.96 / default 0.82 / hard 0.77 for decode
// queries vs 0.97 / 0.89 / 0.93 for held-out keys used as queries.
absl::StatusOr<AttentionDataOptions> AttentionDataPreset(absl::string_view name);
// "easy", "default", "hard".
std::vector<std::string> AttentionDataPresetNames();

// The data families, in a fixed order: "topical", "lowrank", "flat",
// "positional", "sink".
std::vector<std::string> AttentionFamilyNames();

// OK, or InvalidArgument naming the first bad field (by its option/flag name)
// and its allowed range.
absl::Status ValidateAttentionDataOptions(const AttentionDataOptions& options);

struct AttentionData {
  Matrix keys;           // n_keys x dim, RoPE at positions 0..n_keys-1
  Matrix values;         // n_keys x dim
  Matrix train_queries;  // n_train x dim
  Matrix test_queries;   // n_test x dim
  std::vector<int64_t> train_positions;  // ascending, in [0, n_keys)
  std::vector<int64_t> test_positions;   // n_keys + test_position_offset + j
  std::vector<uint32_t> key_topics;      // topic of each key position (topical, sink; else empty)
};

// Generates a data set; InvalidArgument for bad options. Work is spread over
// `pool` (nullptr = ThreadPool::Default()); output does not depend on it.
// Cost: O((n_keys + n_train + n_test) * dim): 1M keys + values + 131K
// queries at d = 128 take ~4 s on 2 cores.
absl::StatusOr<AttentionData> GenerateAttentionData(const AttentionDataOptions& options,
                                                    ThreadPool* pool = nullptr);

// Rotates rows of `x` in place: row r at positions[r], pairs (2i, 2i+1) by the
// angle positions[r] * theta^(-2i/d). x.cols() must be even,
// positions.size() == x.rows(), positions >= 0. Angles are computed in double.
void ApplyRope(MatrixView x, std::span<const int64_t> positions, double theta);

// ---------------------------------------------------------------------------
// Out-of-distribution diagnostics
// ---------------------------------------------------------------------------

struct OodStatsOptions {
  size_t covariance_sample = 20000;  // reference rows used for the mean / covariance
  size_t eval_sample = 2000;         // held-out reference rows and query rows averaged
  // Added to the covariance diagonal, relative to trace/d, before Cholesky
  // (multiplied by 10 until it factors).
  double ridge = 1e-6;
  size_t topk = 100;           // k of the top-k diagnostics
  size_t topk_queries = 64;    // queries (and reference rows) scanned exactly; 0 = skip
  uint64_t seed = 1;           // which rows are sampled
};

struct OodStats {
  size_t n_reference = 0;  // rows of the reference set (keys)
  size_t n_queries = 0;
  size_t dim = 0;
  double ridge_used = 0;   // relative ridge that made the covariance factor

  // Mean Mahalanobis distance sqrt((x-μ)ᵀ Σ⁻¹ (x-μ)) to the reference
  // distribution (μ, Σ estimated on a sample of reference rows), over held-out
  // reference rows ("key→key") and over query rows ("query→key").
  double mahalanobis_key_to_key = 0;
  double mahalanobis_query_to_key = 0;
  double mahalanobis_ratio = 0;  // query→key / key→key
  double mean_key_norm = 0;
  double mean_query_norm = 0;
  double mean_cosine = 0;  // cosine of the key mean and the query mean

  // Exact top-k by inner product over all reference rows, for a sample of
  // queries; zero when topk_queries == 0 or the reference has < topk rows.
  size_t topk = 0;
  // Mean softmax mass (scores q·k/√d) captured by the top-k: how concentrated
  // attention is.
  double topk_attention_mass = 0;
  // Mean fraction of a query's top-k inside the k L2-nearest keys of its top-1
  // key: how well key-key neighbourhoods (what HNSW-style graphs link) cover
  // what the query wants.
  double topk_in_l2_neighbourhood = 0;
  // The same with held-out keys used as queries (the in-distribution baseline).
  double key_topk_in_l2_neighbourhood = 0;
  // Mean fraction of a query's top-k among the k largest-norm keys (high =
  // the top-k is just "big keys").
  double topk_overlap_with_norm_topk = 0;
  // Mean top-k overlap fraction between two different queries (high = every
  // query wants the same keys).
  double topk_pairwise_overlap = 0;

  // Multi-line human-readable summary.
  std::string ToString() const;
};

// Measures how far `queries` lie from the distribution of `reference` (keys).
// InvalidArgument when dims differ, a set is empty, or the reference has
// fewer than dim + 2 rows. Thread-safe; uses `pool` (nullptr = Default()).
absl::StatusOr<OodStats> ComputeOodStats(ConstMatrixView reference, ConstMatrixView queries,
                                         const OodStatsOptions& options = {},
                                         ThreadPool* pool = nullptr);

// Exact top-k by inner product: row i of the result holds the ids of query i's
// k highest-scoring reference rows, best first (ties by lower id). k must be
// in [1, reference.rows()] and reference.rows() < 2^31. For ground-truth files
// (WriteIdMatrixFile).
absl::StatusOr<IdMatrix> ExactTopK(ConstMatrixView reference, ConstMatrixView queries, size_t k,
                                   ThreadPool* pool = nullptr);

}  // namespace kvr
