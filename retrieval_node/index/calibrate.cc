#include "retrieval_node/index/calibrate.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <limits>
#include <string>
#include <utility>

#include "common/exact_topk.h"
#include "retrieval_node/index/flat_index.h"
#include "retrieval_node/index/flat_sq8_index.h"

namespace kvr::index {
namespace {

// Version 2 adds CalibrationResult::measured_us, version 3 its
// rerank_factor; versions 1 and 2 still load (those fields 0).
constexpr uint32_t kCalibratedVersion = 3;
constexpr int kMaxCalibratedNprobe = 1 << 20;
constexpr size_t kQueriesPerBlock = 8;

double KindCost(IndexType kind) {
  switch (kind) {
    case IndexType::kGraph:
      return kGraphDistanceCost;
    case IndexType::kIvf:
      return kIvfDistanceCost;
    case IndexType::kIvfSq8:
      return kIvfSq8DistanceCost;
    case IndexType::kFlatSq8:
    case IndexType::kPcaSq8:
      return kFlatSq8DistanceCost;
    default:
      return kFlatDistanceCost;
  }
}

// KindCost of `index`'s kind.
double IndexCost(const KeyIndex& index) { return KindCost(index.type()); }

// The recall k for `index` and `holdout`.
size_t RecallK(const KeyIndex& index, const Holdout& holdout, const CalibrationOptions& options) {
  return std::min({static_cast<size_t>(options.k), holdout.width, index.size()});
}

// The effort knob of a calibrated kind: the graph's beam, IVF's nprobe or
// pca_sq8's rerank factor.
void SetEffort(IndexType kind, int effort, SearchParams* params) {
  if (kind == IndexType::kGraph) params->beam = effort;
  if (IsIvfKind(kind)) params->nprobe = effort;
  if (kind == IndexType::kPcaSq8) params->rerank_factor = effort;
}

}  // namespace

int CalibratedEffort(const CalibrationResult& result) {
  if (IsIvfKind(result.kind)) return result.nprobe;
  if (result.kind == IndexType::kPcaSq8) return result.rerank_factor;
  return result.beam;
}

absl::Status ValidateCalibrationOptions(const CalibrationOptions& options) {
  if (!(options.target_recall > 0.0 && options.target_recall <= 1.0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("target_recall ", options.target_recall, " outside (0, 1]"));
  }
  if (!(options.decode_margin >= 0.0 && options.decode_margin <= 0.2)) {
    return absl::InvalidArgumentError(
        absl::StrCat("decode_margin ", options.decode_margin, " outside [0, 0.2]"));
  }
  if (options.k < 1 || options.k > kMaxSearchK) {
    return absl::InvalidArgumentError(
        absl::StrCat("calibration k ", options.k, " outside [1, ", kMaxSearchK, "]"));
  }
  if (options.max_queries < 1 || options.max_queries > kMaxHoldoutQueries) {
    return absl::InvalidArgumentError(absl::StrCat("calibration max_queries ",
                                                   options.max_queries, " outside [1, ",
                                                   kMaxHoldoutQueries, "]"));
  }
  if (options.timing_queries < 1 || options.timing_queries > kMaxHoldoutQueries) {
    return absl::InvalidArgumentError(absl::StrCat("calibration timing_queries ",
                                                   options.timing_queries, " outside [1, ",
                                                   kMaxHoldoutQueries, "]"));
  }
  if (options.timing_repetitions < 1 || options.timing_repetitions > kMaxTimingRepetitions) {
    return absl::InvalidArgumentError(absl::StrCat("calibration timing_repetitions ",
                                                   options.timing_repetitions, " outside [1, ",
                                                   kMaxTimingRepetitions, "]"));
  }
  if (options.queries_per_search < 1 || options.queries_per_search > kMaxHoldoutQueries) {
    return absl::InvalidArgumentError(absl::StrCat("calibration queries_per_search ",
                                                   options.queries_per_search, " outside [1, ",
                                                   kMaxHoldoutQueries, "]"));
  }
  return absl::OkStatus();
}

absl::StatusOr<double> TimeSearch(const KeyIndex& index, ConstMatrixView queries,
                                  const SearchParams& params, int repetitions,
                                  size_t queries_per_search) {
  if (queries.rows() == 0) return absl::InvalidArgumentError("TimeSearch: no queries");
  if (repetitions < 1 || repetitions > kMaxTimingRepetitions) {
    return absl::InvalidArgumentError(absl::StrCat("TimeSearch: repetitions ", repetitions,
                                                   " outside [1, ", kMaxTimingRepetitions, "]"));
  }
  if (queries_per_search < 1 || queries_per_search > kMaxHoldoutQueries) {
    return absl::InvalidArgumentError(absl::StrCat("TimeSearch: queries_per_search ",
                                                   queries_per_search, " outside [1, ",
                                                   kMaxHoldoutQueries, "]"));
  }
  const size_t per_call = std::min(queries_per_search, queries.rows());
  const size_t k = static_cast<size_t>(std::max(params.k, 1));
  // per_call <= kMaxHoldoutQueries and k <= kMaxSearchK: no overflow.
  std::vector<int64_t> ids(per_call * k);
  std::vector<float> scores(per_call * k);
  std::vector<double> us(static_cast<size_t>(repetitions));
  for (double& pass : us) {
    const auto t0 = std::chrono::steady_clock::now();
    for (size_t i = 0; i < queries.rows(); i += per_call) {
      const size_t nq = std::min(per_call, queries.rows() - i);
      KVR_RETURN_IF_ERROR(index.Search(queries.rows_slice(i, nq), params, {ids.data(), nq * k},
                                       {scores.data(), nq * k}));
    }
    pass = 1e6 * std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() /
           static_cast<double>(queries.rows());
  }
  std::nth_element(us.begin(), us.begin() + static_cast<ptrdiff_t>(us.size() / 2), us.end());
  return us[us.size() / 2];
}

int ChooseFastest(std::span<const AutoCandidate> candidates) {
  int best = -1;
  for (size_t i = 0; i < candidates.size(); ++i) {
    const AutoCandidate& c = candidates[i];
    if (!c.meets_target || c.pruned || !(c.measured_us > 0)) continue;
    // A later candidate must be more than kAutoTimeTie faster to win a tie.
    if (best < 0 || c.measured_us < candidates[static_cast<size_t>(best)].measured_us *
                                         (1.0 - kAutoTimeTie)) {
      best = static_cast<int>(i);
    }
  }
  return best;
}

absl::Status ValidateHoldout(const Holdout& holdout, size_t n, size_t dim) {
  const size_t rows = holdout.queries.rows();
  if (rows > kMaxHoldoutQueries) {
    return absl::InvalidArgumentError(
        absl::StrCat("holdout_queries rows ", rows, " > ", kMaxHoldoutQueries));
  }
  if (rows == 0 && holdout.topk.empty()) return absl::OkStatus();
  if (holdout.width < 1 || holdout.width > static_cast<size_t>(kMaxSearchK)) {
    return absl::InvalidArgumentError(absl::StrCat("holdout_topk_width ", holdout.width,
                                                   " outside [1, ", kMaxSearchK, "]"));
  }
  // rows <= 4096 and width <= kMaxSearchK: the product cannot overflow.
  if (holdout.topk.size() != rows * holdout.width) {
    return absl::InvalidArgumentError(
        absl::StrCat("holdout_topk has ", holdout.topk.size(), " ids, expected holdout rows ",
                     rows, " x holdout_topk_width ", holdout.width));
  }
  KVR_RETURN_IF_ERROR(ValidateFinite(holdout.queries, dim, "holdout_queries"));
  for (int64_t id : holdout.topk) {
    if (id < -1 || id >= static_cast<int64_t>(n)) {
      return absl::InvalidArgumentError(
          absl::StrCat("holdout_topk id ", id, " outside [-1, ", n, ")"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<EffortMeasurement> MeasureEffort(const KeyIndex& index, const Holdout& holdout,
                                                const SearchParams& params,
                                                const CalibrationOptions& options,
                                                ThreadPool* pool) {
  const size_t k = RecallK(index, holdout, options);
  const size_t rows = std::min(holdout.rows(), options.max_queries);
  if (k == 0 || rows == 0) return absl::InvalidArgumentError("no held-back queries to measure");
  const size_t blocks = (rows + kQueriesPerBlock - 1) / kQueriesPerBlock;
  struct BlockResult {
    double recall_sum = 0;
    int64_t counted = 0;
    int64_t distance_computations = 0;
    absl::Status status;
  };
  std::vector<BlockResult> results(blocks);
  SearchParams p = params;
  p.k = static_cast<int>(k);
  auto run = [&](size_t begin, size_t end) {
    std::vector<int64_t> ids(kQueriesPerBlock * k), truth;
    std::vector<float> scores(ids.size());
    truth.reserve(k);
    for (size_t b = begin; b < end; ++b) {
      BlockResult& out = results[b];
      const size_t q0 = b * kQueriesPerBlock, nq = std::min(kQueriesPerBlock, rows - q0);
      SearchStats stats;
      out.status = index.Search(holdout.queries.rows_slice(q0, nq), p, {ids.data(), nq * k},
                                {scores.data(), nq * k}, &stats);
      if (!out.status.ok()) return;
      out.distance_computations = stats.distance_computations;
      for (size_t i = 0; i < nq; ++i) {
        const int64_t* row = holdout.topk.data() + (q0 + i) * holdout.width;
        truth.clear();
        for (size_t j = 0; j < k; ++j) {
          if (row[j] >= 0) truth.push_back(row[j]);
        }
        if (truth.empty()) continue;
        std::sort(truth.begin(), truth.end());
        size_t hits = 0;
        for (size_t j = 0; j < k; ++j) {
          hits += std::binary_search(truth.begin(), truth.end(), ids[i * k + j]) ? 1 : 0;
        }
        out.recall_sum += static_cast<double>(hits) / static_cast<double>(truth.size());
        ++out.counted;
      }
    }
  };
  if (pool != nullptr) {
    pool->ParallelFor(blocks, 1, run);
  } else {
    run(0, blocks);
  }
  EffortMeasurement m;
  int64_t counted = 0, dc = 0;
  for (const BlockResult& r : results) {
    KVR_RETURN_IF_ERROR(r.status);
    m.recall += r.recall_sum;
    counted += r.counted;
    dc += r.distance_computations;
  }
  m.recall = counted > 0 ? m.recall / static_cast<double>(counted) : 1.0;
  m.distance_computations = static_cast<double>(dc) / static_cast<double>(rows);
  return m;
}

namespace {

// CalibrateEffort that gives up once an effort failing the target already
// costs `max_cost` or more (kAuto: the candidate cannot win any more); the
// result then reports that effort's (lower) recall.
absl::StatusOr<CalibrationResult> CalibrateEffortBounded(const KeyIndex& index,
                                                         const Holdout& holdout,
                                                         const CalibrationOptions& options,
                                                         double max_cost, ThreadPool* pool) {
  KVR_RETURN_IF_ERROR(ValidateCalibrationOptions(options));
  if (index.calibration() != nullptr) {
    return absl::InvalidArgumentError("CalibrateEffort: the index is already calibrated");
  }
  KVR_RETURN_IF_ERROR(ValidateHoldout(holdout, index.size(), index.dim()));
  CalibrationResult result;
  result.kind = index.type();
  result.target_recall = options.target_recall;
  const double n = static_cast<double>(index.size());
  if (result.kind == IndexType::kFlat) {
    result.expected_recall = 1.0;  // exact
    result.k = options.k;
    result.cost_per_query = n * kFlatDistanceCost;
    return result;
  }
  if (holdout.empty() || index.size() == 0) return result;  // default effort, recall unknown
  const size_t k = RecallK(index, holdout, options);
  result.k = static_cast<int>(k);
  result.holdout_queries = static_cast<int64_t>(std::min(holdout.rows(), options.max_queries));
  if (result.kind == IndexType::kFlatSq8) {  // no effort knob: measure once
    KVR_ASSIGN_OR_RETURN(EffortMeasurement m, MeasureEffort(index, holdout, {}, options, pool));
    result.expected_recall = m.recall;
    result.cost_per_query = m.distance_computations * IndexCost(index);
    return result;
  }

  // Effort range: graph beam [k, min(n, kMaxCalibratedBeam)]; IVF nprobe
  // [1, nlist]; pca_sq8 rerank factor [1, kMaxSq8RerankFactor].
  int low_effort = 1, max_effort = 1;
  if (result.kind == IndexType::kPcaSq8) {
    max_effort = kMaxSq8RerankFactor;
  } else if (result.kind == IndexType::kGraph) {
    low_effort = static_cast<int>(k);
    max_effort = static_cast<int>(
        std::max<size_t>(k, std::min<size_t>(index.size(), kMaxCalibratedBeam)));
  } else if (IsIvfKind(result.kind)) {
    const auto* ivf = dynamic_cast<const IvfIndex*>(&index);
    if (ivf == nullptr) return absl::InternalError("IVF-typed index is not an IvfIndex");
    max_effort = static_cast<int>(std::min<size_t>(ivf->nlist(), kMaxCalibratedNprobe));
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot calibrate a ", std::string(IndexTypeName(result.kind)), " index"));
  }
  auto measure = [&](int effort) -> absl::StatusOr<EffortMeasurement> {
    SearchParams p;
    SetEffort(result.kind, effort, &p);
    return MeasureEffort(index, holdout, p, options, pool);
  };
  // The held-back recall to reach (see CalibrationOptions::decode_margin).
  const double goal = std::min(1.0, options.target_recall + options.decode_margin);
  // Doubling: the first effort meeting the goal (or the largest).
  int fail = 0, meet = low_effort;
  KVR_ASSIGN_OR_RETURN(EffortMeasurement best, measure(meet));
  while (best.recall < goal && meet < max_effort &&
         best.distance_computations * IndexCost(index) < max_cost) {
    fail = meet;
    meet = static_cast<int>(std::min<int64_t>(int64_t{meet} * 2, max_effort));
    KVR_ASSIGN_OR_RETURN(best, measure(meet));
  }
  // Bisection of (fail, meet] down to ~1/16 of the effort.
  if (best.recall >= goal) {
    while (fail > 0 && meet - fail > std::max(1, meet / 16)) {
      const int mid = fail + (meet - fail) / 2;
      KVR_ASSIGN_OR_RETURN(EffortMeasurement m, measure(mid));
      if (m.recall >= goal) {
        meet = mid;
        best = m;
      } else {
        fail = mid;
      }
    }
  }
  if (result.kind == IndexType::kGraph) result.beam = meet;
  if (IsIvfKind(result.kind)) result.nprobe = meet;
  if (result.kind == IndexType::kPcaSq8) result.rerank_factor = meet;
  result.expected_recall = best.recall;
  result.cost_per_query = best.distance_computations * IndexCost(index);
  return result;
}

}  // namespace

absl::StatusOr<CalibrationResult> CalibrateEffort(const KeyIndex& index, const Holdout& holdout,
                                                  const CalibrationOptions& options,
                                                  ThreadPool* pool) {
  return CalibrateEffortBounded(index, holdout, options,
                                std::numeric_limits<double>::infinity(), pool);
}

absl::StatusOr<std::unique_ptr<CalibratedIndex>> CalibratedIndex::Create(
    std::shared_ptr<KeyIndex> inner, const CalibrationResult& result) {
  if (inner == nullptr) return absl::InvalidArgumentError("CalibratedIndex: no index");
  if (inner->calibration() != nullptr) {
    return absl::InvalidArgumentError("CalibratedIndex: the index is already calibrated");
  }
  if (inner->type() != result.kind) {
    return absl::InvalidArgumentError(absl::StrCat(
        "CalibratedIndex: calibrated kind ", std::string(IndexTypeName(result.kind)),
        " != index kind ", std::string(IndexTypeName(inner->type()))));
  }
  return std::unique_ptr<CalibratedIndex>(new CalibratedIndex(std::move(inner), result));
}

absl::StatusOr<std::unique_ptr<CalibratedIndex>> CalibratedIndex::Recalibrated(
    const std::shared_ptr<KeyIndex>& index, const CalibrationResult& result) {
  if (index == nullptr) return absl::InvalidArgumentError("CalibratedIndex: no index");
  if (const auto* calibrated = dynamic_cast<const CalibratedIndex*>(index.get())) {
    return Create(calibrated->inner_, result);
  }
  return Create(index, result);
}

absl::Status CalibratedIndex::Add(ConstMatrixView keys) {
  if (inner_.use_count() > 1) {
    // Shared with another CalibratedIndex (Recalibrated): add to a copy.
    std::vector<uint8_t> blob;
    KVR_RETURN_IF_ERROR(inner_->Serialize(&blob));
    KVR_ASSIGN_OR_RETURN(std::unique_ptr<KeyIndex> copy, LoadIndex(blob));
    inner_ = std::move(copy);
  }
  return inner_->Add(keys);
}

absl::StatusOr<CalibrationResult> CalibrateOnQueries(const KeyIndex& index,
                                                     ConstMatrixView queries,
                                                     const CalibrationOptions& options,
                                                     ThreadPool* pool) {
  KVR_RETURN_IF_ERROR(ValidateCalibrationOptions(options));
  const size_t rows = std::min(queries.rows(), options.max_queries);
  if (rows < kMinRecalibrationQueries) {
    return absl::InvalidArgumentError(absl::StrCat("recalibration needs >= ",
                                                   kMinRecalibrationQueries,
                                                   " queries, got ", rows));
  }
  const size_t n = index.size();
  if (n == 0) return absl::InvalidArgumentError("recalibration of an empty index");
  if (queries.cols() != index.dim()) {
    return absl::InvalidArgumentError(absl::StrCat("recalibration queries have ", queries.cols(),
                                                   " columns, the index ", index.dim()));
  }
  const KeyIndex* searched = &index;
  if (const auto* calibrated = dynamic_cast<const CalibratedIndex*>(&index)) {
    searched = &calibrated->inner();
  }
  const size_t width = std::min(static_cast<size_t>(options.k), n);
  const ConstMatrixView used = queries.rows_slice(0, rows);
  std::vector<int64_t> topk(rows * width);
  std::vector<float> scores(rows * width);
  KVR_RETURN_IF_ERROR(
      ExactTopK(searched->keys(), used, static_cast<int>(width), topk, scores, pool));
  const Holdout holdout{used, topk, width};
  return CalibrateEffort(*searched, holdout, options, pool);
}

absl::Status CalibratedIndex::Search(ConstMatrixView queries, const SearchParams& params,
                                     std::span<int64_t> ids, std::span<float> scores,
                                     SearchStats* stats) const {
  SearchParams p = params;
  if (p.beam == 0) p.beam = result_.beam;
  if (p.nprobe == 0) p.nprobe = result_.nprobe;
  if (p.rerank_factor == 0) p.rerank_factor = result_.rerank_factor;
  return inner_->Search(queries, p, ids, scores, stats);
}

absl::Status CalibratedIndex::Serialize(std::vector<uint8_t>* out) const {
  std::vector<uint8_t> inner;
  KVR_RETURN_IF_ERROR(inner_->Serialize(&inner));
  BinaryWriter w;
  w.Put<uint8_t>(static_cast<uint8_t>(result_.kind));
  w.Put<int32_t>(result_.beam);
  w.Put<int32_t>(result_.nprobe);
  w.Put<double>(result_.expected_recall);
  w.Put<double>(result_.target_recall);
  w.Put<int32_t>(result_.k);
  w.Put<int64_t>(result_.holdout_queries);
  w.Put<double>(result_.cost_per_query);
  w.Put<double>(result_.measured_us);
  w.Put<int32_t>(result_.rerank_factor);
  w.PutArray(std::span<const uint8_t>(inner));
  const std::vector<uint8_t> blob = SealBlob(kCalibratedBlobKind, kCalibratedVersion, w.bytes());
  out->insert(out->end(), blob.begin(), blob.end());
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<CalibratedIndex>> CalibratedIndex::Deserialize(
    const OpenedBlob& blob) {
  KVR_RETURN_IF_ERROR(CheckBlobKind(blob, kCalibratedBlobKind, 1, kCalibratedVersion, "calibrated index"));
  BinaryReader r(blob.payload, "calibrated index");
  CalibrationResult c;
  uint8_t kind = 0;
  KVR_RETURN_IF_ERROR(r.Get(&kind, "kind"));
  KVR_RETURN_IF_ERROR(r.Get(&c.beam, "beam"));
  KVR_RETURN_IF_ERROR(r.Get(&c.nprobe, "nprobe"));
  KVR_RETURN_IF_ERROR(r.Get(&c.expected_recall, "expected_recall"));
  KVR_RETURN_IF_ERROR(r.Get(&c.target_recall, "target_recall"));
  KVR_RETURN_IF_ERROR(r.Get(&c.k, "k"));
  KVR_RETURN_IF_ERROR(r.Get(&c.holdout_queries, "holdout_queries"));
  KVR_RETURN_IF_ERROR(r.Get(&c.cost_per_query, "cost_per_query"));
  if (blob.version >= 2) KVR_RETURN_IF_ERROR(r.Get(&c.measured_us, "measured_us"));
  if (blob.version >= 3) KVR_RETURN_IF_ERROR(r.Get(&c.rerank_factor, "rerank_factor"));
  std::vector<uint8_t> inner_blob;
  KVR_RETURN_IF_ERROR(r.GetArray(&inner_blob, "inner", r.remaining()));
  KVR_RETURN_IF_ERROR(r.ExpectEnd());
  auto bad = [](absl::string_view field, auto value) {
    return absl::DataLossError(absl::StrCat("calibrated index: field '", field, "' value ",
                                            value, " out of range"));
  };
  if (kind != static_cast<uint8_t>(IndexType::kGraph) &&
      kind != static_cast<uint8_t>(IndexType::kFlat) &&
      kind != static_cast<uint8_t>(IndexType::kIvf) &&
      kind != static_cast<uint8_t>(IndexType::kFlatSq8) &&
      kind != static_cast<uint8_t>(IndexType::kIvfSq8) &&
      kind != static_cast<uint8_t>(IndexType::kPcaSq8)) {
    return bad("kind", int{kind});
  }
  c.kind = static_cast<IndexType>(kind);
  if (c.beam < 0 || c.beam > kMaxCalibratedBeam) return bad("beam", c.beam);
  if (c.nprobe < 0 || c.nprobe > kMaxCalibratedNprobe) return bad("nprobe", c.nprobe);
  if (!std::isnan(c.expected_recall) && !(c.expected_recall >= 0 && c.expected_recall <= 1)) {
    return bad("expected_recall", c.expected_recall);
  }
  if (!(c.target_recall >= 0 && c.target_recall <= 1)) {
    return bad("target_recall", c.target_recall);
  }
  if (c.k < 0 || c.k > kMaxSearchK) return bad("k", c.k);
  if (c.holdout_queries < 0 || c.holdout_queries > static_cast<int64_t>(kMaxHoldoutQueries)) {
    return bad("holdout_queries", c.holdout_queries);
  }
  if (!std::isfinite(c.cost_per_query) || c.cost_per_query < 0) {
    return bad("cost_per_query", c.cost_per_query);
  }
  if (!std::isfinite(c.measured_us) || c.measured_us < 0) {
    return bad("measured_us", c.measured_us);
  }
  if (c.rerank_factor < 0 || c.rerank_factor > kMaxSq8RerankFactor) {
    return bad("rerank_factor", c.rerank_factor);
  }
  // The wrapped index: any kind but another calibrated one (no nesting).
  KVR_ASSIGN_OR_RETURN(OpenedBlob opened, OpenBlob(inner_blob));
  if (opened.kind == kCalibratedBlobKind) {
    return absl::DataLossError("calibrated index: wraps another calibrated index");
  }
  KVR_ASSIGN_OR_RETURN(std::unique_ptr<KeyIndex> inner, LoadIndex(inner_blob));
  // Blobs written before IVF-SQ8 was its own kind say kIvf for it.
  if (c.kind == IndexType::kIvf && inner->type() == IndexType::kIvfSq8) {
    c.kind = IndexType::kIvfSq8;
  }
  if (inner->type() != c.kind) {
    return absl::DataLossError(absl::StrCat(
        "calibrated index: field 'kind' says ", std::string(IndexTypeName(c.kind)),
        " but the wrapped index is ", std::string(IndexTypeName(inner->type()))));
  }
  return std::unique_ptr<CalibratedIndex>(new CalibratedIndex(std::move(inner), c));
}

absl::StatusOr<std::unique_ptr<CalibratedIndex>> BuildCalibrated(
    IndexType type, ConstMatrixView keys, std::span<const int64_t> train_topk,
    size_t topk_width, const Holdout& holdout, const CalibratedBuildOptions& options,
    ThreadPool* pool) {
  KVR_RETURN_IF_ERROR(ValidateCalibrationOptions(options.calibration));
  const size_t n = keys.rows();
  if (n == 0) return absl::InvalidArgumentError("BuildCalibrated: no keys");
  KVR_RETURN_IF_ERROR(ValidateHoldout(holdout, n, keys.cols()));
  auto build_flat = [&]() -> absl::StatusOr<std::unique_ptr<KeyIndex>> {
    KVR_ASSIGN_OR_RETURN(std::unique_ptr<FlatIndex> flat, FlatIndex::Create(keys.cols()));
    flat->Reserve(n);
    KVR_RETURN_IF_ERROR(flat->Add(keys));
    return std::unique_ptr<KeyIndex>(std::move(flat));
  };
  auto build_graph = [&]() -> absl::StatusOr<std::unique_ptr<KeyIndex>> {
    std::unique_ptr<AttentionGraphIndex> graph;
    if (!train_topk.empty()) {
      KVR_ASSIGN_OR_RETURN(graph, AttentionGraphIndex::Build(keys, train_topk, topk_width,
                                                             options.graph, pool));
    } else {
      const int train_k = static_cast<int>(std::min<size_t>(32, n));
      KVR_ASSIGN_OR_RETURN(graph, AttentionGraphIndex::BuildFromQueries(keys, keys, train_k,
                                                                        options.graph, pool));
    }
    return std::unique_ptr<KeyIndex>(std::move(graph));
  };
  auto build_flat_sq8 = [&]() -> absl::StatusOr<std::unique_ptr<KeyIndex>> {
    KVR_ASSIGN_OR_RETURN(std::unique_ptr<FlatSq8Index> flat,
                         FlatSq8Index::Create(keys.cols(), options.ivf.rerank_factor));
    KVR_RETURN_IF_ERROR(flat->Add(keys));
    return std::unique_ptr<KeyIndex>(std::move(flat));
  };
  auto build_pca = [&]() -> absl::StatusOr<std::unique_ptr<KeyIndex>> {
    KVR_ASSIGN_OR_RETURN(std::unique_ptr<PcaSq8Index> pca,
                         PcaSq8Index::Create(keys.cols(), options.pca));
    KVR_RETURN_IF_ERROR(pca->Add(keys));
    return std::unique_ptr<KeyIndex>(std::move(pca));
  };
  auto build_ivf = [&](bool sq8) -> absl::StatusOr<std::unique_ptr<KeyIndex>> {
    IvfOptions o = options.ivf;
    o.sq8 = sq8;
    o.nlist = std::clamp<size_t>(
        static_cast<size_t>(std::sqrt(static_cast<double>(n))), 1, std::max<size_t>(1, o.nlist));
    // As one of kAuto's candidates, k-means trains on 64 keys per list (a
    // quarter of IvfIndex's default) to keep the extra build short.
    if (type == IndexType::kAuto && o.max_train_points == 0) o.max_train_points = 64 * o.nlist;
    KVR_ASSIGN_OR_RETURN(std::unique_ptr<IvfIndex> ivf, IvfIndex::Build(keys, o, pool));
    return std::unique_ptr<KeyIndex>(std::move(ivf));
  };
  auto calibrate = [&](std::unique_ptr<KeyIndex> index)
      -> absl::StatusOr<std::unique_ptr<CalibratedIndex>> {
    KVR_ASSIGN_OR_RETURN(CalibrationResult r,
                         CalibrateEffort(*index, holdout, options.calibration, pool));
    return CalibratedIndex::Create(std::move(index), r);
  };
  switch (type) {
    case IndexType::kFlat: {
      KVR_ASSIGN_OR_RETURN(auto idx, build_flat());
      return calibrate(std::move(idx));
    }
    case IndexType::kGraph: {
      KVR_ASSIGN_OR_RETURN(auto idx, build_graph());
      return calibrate(std::move(idx));
    }
    case IndexType::kIvf: {
      KVR_ASSIGN_OR_RETURN(auto idx, build_ivf(options.ivf.sq8));
      return calibrate(std::move(idx));
    }
    case IndexType::kIvfSq8: {
      KVR_ASSIGN_OR_RETURN(auto idx, build_ivf(true));
      return calibrate(std::move(idx));
    }
    case IndexType::kFlatSq8: {
      KVR_ASSIGN_OR_RETURN(auto idx, build_flat_sq8());
      return calibrate(std::move(idx));
    }
    case IndexType::kPcaSq8: {
      KVR_ASSIGN_OR_RETURN(auto idx, build_pca());
      return calibrate(std::move(idx));
    }
    case IndexType::kAuto:
      break;
  }
  if (n < kAutoMinKeys) {
    KVR_ASSIGN_OR_RETURN(auto flat, build_flat());
    return calibrate(std::move(flat));
  }
  if (holdout.empty()) {  // nothing to choose by: the default kind and effort
    KVR_ASSIGN_OR_RETURN(auto idx, build_graph());
    return calibrate(std::move(idx));
  }
  const double target = options.calibration.target_recall;
  const double flat_cost = static_cast<double>(n) * kFlatDistanceCost;

  if (options.auto_by_time) {
    // Candidates in order (ties go to the earlier): flat, flat_sq8, ivf,
    // ivf_sq8, graph. Only the fastest so far is kept in memory.
    const size_t timing_rows = std::min(holdout.rows(), options.calibration.timing_queries);
    const ConstMatrixView timing_queries = holdout.queries.rows_slice(0, timing_rows);
    const int timing_k = static_cast<int>(
        std::min({static_cast<size_t>(options.calibration.k), holdout.width, n}));
    std::vector<AutoCandidate> seen;
    std::unique_ptr<CalibratedIndex> best;
    double cheapest_model = flat_cost;  // least modelled cost of a contender so far
    auto consider_timed = [&](std::unique_ptr<KeyIndex> index) -> absl::Status {
      KVR_ASSIGN_OR_RETURN(CalibrationResult r,
                           CalibrateEffortBounded(*index, holdout, options.calibration,
                                                  kAutoPruneFactor * cheapest_model, pool));
      AutoCandidate c;
      c.meets_target = r.expected_recall >= target;  // false for NaN
      c.pruned = !c.meets_target;
      if (c.meets_target) {
        SearchParams p;
        p.k = timing_k;
        SetEffort(r.kind, CalibratedEffort(r), &p);
        const size_t per_search = options.calibration.queries_per_search;
        const auto t0 = std::chrono::steady_clock::now();
        // One pass first (it also warms caches): a candidate over
        // kAutoPruneFactor x the fastest so far is not timed further.
        KVR_ASSIGN_OR_RETURN(c.measured_us, TimeSearch(*index, timing_queries, p, 1, per_search));
        const int fastest = ChooseFastest(seen);
        c.pruned = fastest >= 0 && c.measured_us > kAutoPruneFactor *
                                                      seen[static_cast<size_t>(fastest)].measured_us;
        if (!c.pruned) {
          KVR_ASSIGN_OR_RETURN(c.measured_us,
                               TimeSearch(*index, timing_queries, p,
                                          options.calibration.timing_repetitions, per_search));
        }
        c.timing_seconds =
            std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        r.measured_us = c.measured_us;
        // A contender's model bounds the later calibrations (a pruned one's
        // model proved wrong by its time).
        if (!c.pruned) cheapest_model = std::min(cheapest_model, r.cost_per_query);
      }
      c.calibration = r;
      seen.push_back(c);
      if (!c.pruned && ChooseFastest(seen) == static_cast<int>(seen.size()) - 1) {
        KVR_ASSIGN_OR_RETURN(best, CalibratedIndex::Create(std::move(index), r));
      }
      return absl::OkStatus();
    };
    {
      KVR_ASSIGN_OR_RETURN(auto flat, build_flat());
      KVR_RETURN_IF_ERROR(consider_timed(std::move(flat)));
    }
    for (int candidate = 0; candidate < 3; ++candidate) {
      KVR_ASSIGN_OR_RETURN(auto idx,
                           candidate == 0 ? build_flat_sq8() : build_ivf(candidate == 2));
      KVR_RETURN_IF_ERROR(consider_timed(std::move(idx)));
    }
    if (!train_topk.empty()) {
      KVR_ASSIGN_OR_RETURN(auto graph, build_graph());
      KVR_RETURN_IF_ERROR(consider_timed(std::move(graph)));
    }
    // Last, so that the earlier kinds win ties and keep their positions in
    // `candidates`; skipped above kMaxPcaDim (the eigen-decomposition's bound).
    if (options.pca_candidate && keys.cols() <= kMaxPcaDim) {
      KVR_ASSIGN_OR_RETURN(auto pca, build_pca());
      KVR_RETURN_IF_ERROR(consider_timed(std::move(pca)));
    }
    if (options.candidates != nullptr) *options.candidates = seen;
    if (best == nullptr) return absl::InternalError("auto: the flat candidate was not kept");
    return best;
  }

  // By the cost model alone (the session-25 rule).
  std::unique_ptr<CalibratedIndex> best;  // the cheapest meeting the target so far
  // What a candidate must stay under to still win: flat / kMinSpeedupOverFlat
  // and the best candidate's cost (its calibration stops once it fails there).
  auto bound = [&]() {
    const double b = flat_cost / kMinSpeedupOverFlat;
    return best == nullptr ? b : std::min(b, best->calibration()->cost_per_query);
  };
  auto calibrate_bounded = [&](std::unique_ptr<KeyIndex> index)
      -> absl::StatusOr<std::unique_ptr<CalibratedIndex>> {
    KVR_ASSIGN_OR_RETURN(
        CalibrationResult r,
        CalibrateEffortBounded(*index, holdout, options.calibration, bound(), pool));
    return CalibratedIndex::Create(std::move(index), r);
  };
  auto consider = [&](std::unique_ptr<CalibratedIndex> candidate) {
    const CalibrationResult& c = *candidate->calibration();
    const bool meets = c.expected_recall >= target;  // false for NaN
    if (meets && (best == nullptr || c.cost_per_query < best->calibration()->cost_per_query)) {
      best = std::move(candidate);
    }
  };
  if (!train_topk.empty()) {
    KVR_ASSIGN_OR_RETURN(auto graph, build_graph());
    KVR_ASSIGN_OR_RETURN(auto calibrated, calibrate_bounded(std::move(graph)));
    consider(std::move(calibrated));
  }
  // Candidates after the graph: ivf, ivf_sq8, flat_sq8 (then flat below).
  for (int candidate = 0; candidate < 3; ++candidate) {
    KVR_ASSIGN_OR_RETURN(auto idx, candidate < 2 ? build_ivf(candidate == 1) : build_flat_sq8());
    KVR_ASSIGN_OR_RETURN(auto calibrated, calibrate_bounded(std::move(idx)));
    const CalibrationResult& c = *calibrated->calibration();
    // flat_sq8, like flat, keeps an approximate kind only when that one is
    // kMinSpeedupOverFlat cheaper (no effort to drift, cheap appends).
    if (candidate == 2 && best != nullptr && c.expected_recall >= target &&
        best->calibration()->cost_per_query * kMinSpeedupOverFlat > c.cost_per_query) {
      best = std::move(calibrated);
      continue;
    }
    consider(std::move(calibrated));
  }
  // Flat last: it wins ties and whatever could not beat the scan.
  if (best == nullptr || best->calibration()->cost_per_query * kMinSpeedupOverFlat > flat_cost) {
    KVR_ASSIGN_OR_RETURN(auto flat, build_flat());
    KVR_ASSIGN_OR_RETURN(best, calibrate(std::move(flat)));
  }
  return best;
}

}  // namespace kvr::index
