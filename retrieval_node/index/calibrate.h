// Self-calibration: an index chooses its own search effort (graph beam, IVF
// nprobe) and, for IndexType::kAuto, its kind, for a requested recall, from
// held-back training queries with their exact top-k (DESIGN.md §2,
// "Self-calibration"; issue 17 item 4).
//
// Calibration of one index: recall@k on the held-back queries is measured at
// efforts k, 2k, 4k, ... (beam; nprobe 1, 2, 4, ...) until it reaches the
// target, then the bracket is bisected down to ~1/16 of the effort. The
// chosen effort is the smallest one evaluated whose held-back recall is >=
// target; its held-back recall is the index's expected recall. An index that
// cannot reach the target within its largest effort (beam kMaxCalibratedBeam
// or n; every IVF list) gets that largest effort and reports the (lower)
// recall it reached.
//
// Cost per query (a model) is deterministic: the mean distance
// computations per held-back query at the chosen effort times a per-kind
// constant in units of one flat-scan distance (kGraphDistanceCost,
// kIvfDistanceCost below). A flat scan costs n and has recall 1.
//
// kAuto chooses by measured time (issue 17, session 26): the model misranks
// short scans (per-search fixed costs, SQ8 rerank), so every candidate that
// meets the target after calibration is timed at its chosen effort on the
// first CalibrationOptions::timing_queries held-back queries
// (queries_per_search queries per search, as a node searches the query
// heads of one kv head together; on the calling thread, median of
// timing_repetitions passes), and the fastest is kept (ChooseFastest: ties
// within kAutoTimeTie go to the earlier candidate of flat, flat_sq8, ivf,
// ivf_sq8, graph, pca_sq8).
//
// pca_sq8's effort is its rerank factor, calibrated like an IVF nprobe
// (1, 2, 4, ... kMaxSq8RerankFactor, then bisected); CalibrationResult::
// rerank_factor holds it. The model only
// bounds calibration: a candidate's effort search stops once an effort
// missing the target models more than kAutoPruneFactor x the cheapest
// modelled contender so far (flat's n to begin with). A candidate whose
// first timed pass takes over kAutoPruneFactor x the fastest so far is not
// timed further (pruned).
//
// Without held-back queries the index keeps its built-in default effort and
// reports expected recall unknown (NaN; see CalibrationResult).
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "common/serialize.h"
#include "common/tensor.h"
#include "common/thread_pool.h"
#include "retrieval_node/index/attention_graph_index.h"
#include "retrieval_node/index/index.h"
#include "retrieval_node/index/ivf_index.h"
#include "retrieval_node/index/pca_sq8_index.h"

namespace kvr::index {

// Cost of one distance computation of each kind, in flat-scan distances.
// A flat scan streams keys through a blocked SIMD kernel; a graph walk
// gathers one key row per neighbour (a cache miss each) and keeps a beam;
// IVF scans contiguous lists like the flat scan does. Measured with
// bench/index_bench (docs/benchmarks.md §3c): µs per distance computation
// of the graph / of the flat scan at 131072 keys, d 128, one thread.
// Measured (one query per search, as a node searches one kv head's shard):
// flat 26.5 ns, graph 101-111 ns (3.8-4.2x), IVF 27.5 ns (1.04x) per
// distance at 32768 keys on this project's 2-core box; under load 87.5 /
// 274-321 (3.1-3.7x) / 127 (1.46x).
inline constexpr double kFlatDistanceCost = 1.0;
inline constexpr double kGraphDistanceCost = 4.0;
inline constexpr double kIvfDistanceCost = 1.2;
// One SQ8 code distance of flat_sq8 / of IVF-SQ8 (their exact reranks and
// IVF's centroid products are counted at the same rate, a few % of the
// work). Measured one query per search at 131072 keys, d 128, loaded 2-core
// box (AVX-512 VNNI): flat 19.6 ns, flat_sq8 5.4 ns (0.28x), IVF-SQ8
// 7.3-8.0 ns (0.37-0.41x; short lists, scattered) per distance
// (docs/benchmarks.md "Quantized scans (SQ8)").
inline constexpr double kFlatSq8DistanceCost = 0.3;
inline constexpr double kIvfSq8DistanceCost = 0.4;
// kAuto by the cost model only (CalibratedBuildOptions::auto_by_time false,
// the session-25 choice kept for comparison): a graph or IVF index is kept
// only when its modelled cost is at most flat's / kMinSpeedupOverFlat: the
// constants above are good to ~25%, and a flat index is exact, appends
// without re-linking and never misses.
inline constexpr double kMinSpeedupOverFlat = 1.25;
// kAuto by measured time: candidates within this fraction of the fastest
// measured time count as tied (timing noise on a shared machine); the
// earliest of them in the candidate order wins (simpler kinds first).
inline constexpr double kAutoTimeTie = 0.05;
// kAuto by measured time: calibration of a candidate stops at an effort
// missing the target that models over this multiple of the cheapest
// modelled contender so far, and a candidate whose first timed pass is
// over this multiple of the fastest so far is not timed further.
inline constexpr double kAutoPruneFactor = 2.0;
// kAuto scans shards of fewer keys (flat, exact): the cost model leaves out
// per-search fixed costs (centroid ranking, beam upkeep) that dominate
// there, and a 2048-key scan takes ~50 µs, below a node call's overhead.
inline constexpr size_t kAutoMinKeys = 2048;

// The largest graph beam calibration tries (the graph's own limit is 65536).
inline constexpr int kMaxCalibratedBeam = 1 << 14;
// Held-back queries a calibrated upload may carry (ShardUpload::holdout_*).
inline constexpr size_t kMaxHoldoutQueries = 4096;

struct CalibrationOptions {
  double target_recall = 0.95;  // recall@k on held-back queries to reach, (0, 1]
  // Added to target_recall (capped at 1) when choosing an effort: held-back
  // queries are prefill queries, and decode queries (later positions, a
  // shifted mean) measured 0.005-0.014 below them at the same effort on the
  // topical, lowrank and sink families (docs/benchmarks.md §1 final run), so
  // without it a 0.95 target served ~0.94 to decode; 0.01 still left
  // 0.947-0.949. A recency head's decode queries differ more (positional:
  // 0.07 below). [0, 0.2]
  double decode_margin = 0.02;
  int k = 100;                  // recall@k (clamped to the top-k width given and to n)
  // Held-back queries evaluated (the first ones given; a worker spreads them
  // over positions). Bounds the calibration cost: efforts tried x this many
  // searches.
  size_t max_queries = 256;
  // kAuto by measured time: held-back queries timed per candidate (the
  // first ones), [1, kMaxHoldoutQueries], and timed passes over them, of
  // which the median counts, [1, kMaxTimingRepetitions]. Bounds the timing
  // cost: candidates x timing_queries x timing_repetitions searches.
  size_t timing_queries = 32;
  int timing_repetitions = 3;
  // kAuto by measured time: held-back queries searched per Search call when
  // timing, [1, kMaxHoldoutQueries] (the time reported stays per query:
  // total / queries). A node passes its sequence's query heads per kv head
  // (SequenceSpec n_heads / n_kv_heads, the GQA group): those queries reach
  // one shard together, and a scan kind reads its codes once for all of
  // them while a graph walks once per query.
  size_t queries_per_search = 1;
};
inline constexpr int kMaxTimingRepetitions = 15;

// OK, or InvalidArgument naming the field and its range.
absl::Status ValidateCalibrationOptions(const CalibrationOptions& options);

// The calibrated effort of `result`'s kind: IVF nprobe, pca_sq8 rerank
// factor, else the graph beam (0 for flat and flat_sq8).
int CalibratedEffort(const CalibrationResult& result);

// Held-back queries and their exact top ids over the index's keys.
struct Holdout {
  ConstMatrixView queries;       // rows x dim, finite
  std::span<const int64_t> topk; // rows x width ids, best first, -1 pads
  size_t width = 0;
  size_t rows() const { return queries.rows(); }
  bool empty() const { return queries.rows() == 0 || width == 0; }
};

// Checks `holdout` against an index of n keys of dimension dim: queries
// finite with dim columns, at most kMaxHoldoutQueries rows, topk exactly
// rows x width ids in [-1, n), width in [1, kMaxSearchK]. InvalidArgument
// naming the field and limit otherwise.
absl::Status ValidateHoldout(const Holdout& holdout, size_t n, size_t dim);

// Mean recall of `index` on the held-back queries at `params` (params.k is
// replaced by the recall k), and the mean distance computations per query.
struct EffortMeasurement {
  double recall = 0;
  double distance_computations = 0;  // per query
};
absl::StatusOr<EffortMeasurement> MeasureEffort(const KeyIndex& index, const Holdout& holdout,
                                                const SearchParams& params,
                                                const CalibrationOptions& options,
                                                ThreadPool* pool);

// Chooses the smallest effort of `index` (graph: beam; IVF: nprobe; flat:
// none) meeting options.target_recall on `holdout` (see the file comment).
// An empty holdout gives the index's default effort and NaN recall.
absl::StatusOr<CalibrationResult> CalibrateEffort(const KeyIndex& index, const Holdout& holdout,
                                                  const CalibrationOptions& options,
                                                  ThreadPool* pool);

// Median over `repetitions` passes ([1, kMaxTimingRepetitions]) of the mean
// µs per query of searching the rows of `queries` (>= 1 row, the index's
// dim, finite) `queries_per_search` at a time ([1, kMaxHoldoutQueries]; the
// last call takes the rest) with `params` on the calling thread: each pass's
// time divided by queries.rows(). The first pass also warms caches (hence
// the median). Errors: the search's, or InvalidArgument for no queries,
// repetitions or queries_per_search out of range.
absl::StatusOr<double> TimeSearch(const KeyIndex& index, ConstMatrixView queries,
                                  const SearchParams& params, int repetitions,
                                  size_t queries_per_search = 1);

// One candidate kind kAuto considered (BuildCalibrated with
// CalibratedBuildOptions::candidates): what calibration chose for it and, if
// it was timed, how fast it searched.
struct AutoCandidate {
  CalibrationResult calibration;  // kind, effort, held-back recall, modelled cost
  bool meets_target = false;      // calibration.expected_recall >= target_recall
  // No contender: it missed the target (not timed), or its first timed pass
  // was over kAutoPruneFactor x the fastest so far (measured_us is that pass).
  bool pruned = false;
  double measured_us = 0;   // TimeSearch at the chosen effort; 0 when not timed
  double timing_seconds = 0;  // wall time spent timing it (build-time cost)
};

// The candidate kAuto keeps: the index into `candidates` of the fastest
// measured (measured_us > 0) among those meeting the target (meets_target)
// and not pruned;
// candidates within kAutoTimeTie of the fastest count as tied and the
// earliest of them wins. -1 when none meets the target and was timed.
// Deterministic for given inputs.
int ChooseFastest(std::span<const AutoCandidate> candidates);

// A KeyIndex that wraps a chosen index with the search effort calibration
// gave it: Search fills SearchParams::beam / nprobe when the caller leaves
// them 0 and otherwise behaves exactly like the wrapped index (type() is the
// wrapped kind). Add goes to the wrapped index (the expected recall then
// describes the keys calibrated on). Serialized as kCalibratedBlobKind,
// holding the wrapped index's blob (never another calibrated one).
//
// The wrapped index may be shared with other CalibratedIndex objects
// (Recalibrated: the node swaps in a new search effort found on decode
// queries without copying the index); Add then copies it first (Serialize +
// LoadIndex), so an index shared with a reader is never changed in place.
class CalibratedIndex final : public KeyIndex {
 public:
  // `inner` must not be null or itself calibrated; `result.kind` must be its
  // type. (A std::unique_ptr converts.)
  static absl::StatusOr<std::unique_ptr<CalibratedIndex>> Create(std::shared_ptr<KeyIndex> inner,
                                                                 const CalibrationResult& result);
  // `index` (calibrated or not) with `result` as its calibration, sharing the
  // searched index (no copy). InvalidArgument when result.kind is not the
  // searched index's kind.
  static absl::StatusOr<std::unique_ptr<CalibratedIndex>> Recalibrated(
      const std::shared_ptr<KeyIndex>& index, const CalibrationResult& result);
  static absl::StatusOr<std::unique_ptr<CalibratedIndex>> Deserialize(const OpenedBlob& blob);

  IndexType type() const override { return inner_->type(); }
  size_t dim() const override { return inner_->dim(); }
  size_t size() const override { return inner_->size(); }
  absl::Status Search(ConstMatrixView queries, const SearchParams& params,
                      std::span<int64_t> ids, std::span<float> scores,
                      SearchStats* stats = nullptr) const override;
  absl::Status Add(ConstMatrixView keys) override;
  size_t MemoryBytes() const override { return inner_->MemoryBytes() + sizeof(*this); }
  absl::Status Serialize(std::vector<uint8_t>* out) const override;
  ConstMatrixView keys() const override { return inner_->keys(); }
  const CalibrationResult* calibration() const override { return &result_; }

  const KeyIndex& inner() const { return *inner_; }

 private:
  CalibratedIndex(std::shared_ptr<KeyIndex> inner, const CalibrationResult& result)
      : inner_(std::move(inner)), result_(result) {}

  std::shared_ptr<KeyIndex> inner_;
  CalibrationResult result_;
};

// Decode-query calibration (the node's recalibration on its ring of recent
// decode queries, NodeCoreOptions::recalibrate_every): the fewest queries a
// recalibration uses; with fewer the index keeps its calibration.
inline constexpr size_t kMinRecalibrationQueries = 32;

// Calibrates the search effort of `index`'s searched index (its inner one
// when calibrated) on `queries` (rows x dim, finite; the first
// options.max_queries are used), whose exact top-min(options.k, n) over
// index.keys() is computed here (an O(queries x n x dim) scan on `pool`).
// The result is as CalibrateEffort's (options.decode_margin applies: the
// queries are past decode queries, the ones to serve are later ones).
// InvalidArgument for fewer than kMinRecalibrationQueries queries, a
// dimension mismatch or an empty index. `pool` may be null.
absl::StatusOr<CalibrationResult> CalibrateOnQueries(const KeyIndex& index,
                                                     ConstMatrixView queries,
                                                     const CalibrationOptions& options,
                                                     ThreadPool* pool);

// What BuildCalibrated may build.
struct CalibratedBuildOptions {
  CalibrationOptions calibration;
  AttentionGraphOptions graph;
  IvfOptions ivf;  // nlist is clamped to sqrt(n) (as the node does)
  PcaSq8Options pca;  // kPcaSq8 and kAuto's pca_sq8 candidate
  // kAuto by measured time: also build, calibrate and time pca_sq8 (the
  // last candidate; keys of at most kMaxPcaDim dimensions). Off by default
  // so callers comparing against the session-26 candidate set keep it; the
  // node and bench/index_bench turn it on.
  bool pca_candidate = false;
  // kAuto: choose by measured time (the file comment); false: by the cost
  // model alone (the session-25 rule, kept so benchmarks can compare).
  bool auto_by_time = true;
  // kAuto by measured time: when not null, receives every candidate
  // considered, in candidate order (for benchmarks and tests).
  std::vector<AutoCandidate>* candidates = nullptr;
};

// Builds an index of `type` over `keys` and calibrates it on `holdout`:
//  * kFlat: a flat index (recall 1);
//  * kGraph: the graph from train_topk (keys as their own training queries
//    when train_topk is empty), beam calibrated;
//  * kIvf: IVF, nprobe calibrated;
//  * kFlatSq8: flat_sq8 (no effort knob: its recall at its rerank factor);
//  * kIvfSq8: IVF with SQ8 lists (options.ivf.sq8 set), nprobe calibrated;
//  * kPcaSq8: pca_sq8 (options.pca), rerank factor calibrated;
//  * kAuto: candidates flat, flat_sq8, IVF, IVF-SQ8, graph (only when
//    train_topk is given) and pca_sq8 (options.pca_candidate), each calibrated; by measured time (default) the
//    fastest timed one meeting the target (ChooseFastest; flat when none
//    does); with auto_by_time false the session-25 cost-model rule (least
//    modelled cost meeting the target, flat_sq8 replacing an approximate kind
//    unless that is kMinSpeedupOverFlat cheaper, as flat does). Fewer than
//    kAutoMinKeys keys: flat, untimed. With an empty holdout (and >=
//    kAutoMinKeys keys) kAuto builds the graph as kGraph does, with its
//    default effort and unknown recall.
// `pool` may be null.
absl::StatusOr<std::unique_ptr<CalibratedIndex>> BuildCalibrated(
    IndexType type, ConstMatrixView keys, std::span<const int64_t> train_topk,
    size_t topk_width, const Holdout& holdout, const CalibratedBuildOptions& options,
    ThreadPool* pool);

}  // namespace kvr::index
