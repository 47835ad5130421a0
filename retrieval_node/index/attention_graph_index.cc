#include "retrieval_node/index/attention_graph_index.h"

#include <time.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <numeric>

#include "common/simd/kernels.h"
#include "common/train_topk.h"
#include "retrieval_node/index/beam.h"
#include "retrieval_node/index/flat_index.h"

namespace kvr::index {
namespace {

constexpr uint32_t kNone = std::numeric_limits<uint32_t>::max();
// Version 2 adds recent_entries and the recent entry count; version 1 blobs
// load with neither (recent_entries = 0).
// Version 3 adds link_beam (earlier versions load with the default; it only
// matters when Build links keys in).
constexpr uint32_t kFormatVersion = 3;
// At most one router per this many keys (a router costs one inner product
// per search, like a key).
constexpr size_t kKeysPerRouter = 128;
constexpr int kMaxEntries = 1024;
constexpr int kMaxDegree = 256;
constexpr size_t kMaxCandidatesPerDegree = 8;
constexpr int kMaxBeam = 1 << 16;
// How far (in positions) the link pass looks for an already linked key to
// seed a key's search from.
constexpr uint32_t kSeedWindow = 256;

// CPU time of this process (all threads), in seconds.
double ProcessCpuSeconds() {
  timespec ts{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

}  // namespace

// Per-search working memory, reused across calls (allocation happens only
// when the index grew or a larger beam is asked for than ever before).
struct AttentionGraphIndex::Scratch {
  std::vector<uint32_t> visited;  // epoch tag per key
  uint32_t epoch = 0;
  Beam beam;
  std::vector<uint32_t> fresh;  // unvisited neighbours of the node being expanded
  std::vector<float> fresh_scores;
  std::vector<float> router_scores;
  std::vector<uint32_t> router_order;
  std::vector<std::pair<float, uint32_t>> rescored;

  // Starts a new search over `n` keys: every key becomes unvisited.
  void Reset(size_t n) {
    if (visited.size() < n) {
      visited.assign(n, 0);
      epoch = 0;
    }
    if (++epoch == 0) {  // wrapped: clear tags once every 2^32 searches
      std::fill(visited.begin(), visited.end(), 0);
      epoch = 1;
    }
  }
  bool Visit(uint32_t id) {
    if (visited[id] == epoch) return false;
    visited[id] = epoch;
    return true;
  }
  size_t MemoryBytes() const {
    return visited.capacity() * sizeof(uint32_t) + beam.MemoryBytes() +
           fresh.capacity() * sizeof(uint32_t) + fresh_scores.capacity() * sizeof(float) +
           router_scores.capacity() * sizeof(float) + router_order.capacity() * sizeof(uint32_t) +
           rescored.capacity() * sizeof(std::pair<float, uint32_t>);
  }
};

// Holds a scratch for the duration of a scope.
class AttentionGraphIndex::ScratchLease {
 public:
  explicit ScratchLease(ScratchPool<Scratch>* pool) : pool_(pool), s_(pool->Acquire()) {}
  ~ScratchLease() { pool_->Release(std::move(s_)); }
  Scratch* operator->() { return s_.get(); }
  Scratch& operator*() { return *s_; }

 private:
  ScratchPool<Scratch>* pool_;
  std::unique_ptr<Scratch> s_;
};

AttentionGraphIndex::AttentionGraphIndex(size_t dim, const AttentionGraphOptions& options)
    : dim_(dim),
      options_(options),
      stride_(static_cast<size_t>(options.degree) + 1),
      scratch_(std::make_unique<ScratchPool<Scratch>>()) {}

AttentionGraphIndex::~AttentionGraphIndex() = default;

absl::Status ValidateGraphOptions(const AttentionGraphOptions& o) {
  if (o.degree < 2 || o.degree > kMaxDegree) {
    return absl::InvalidArgumentError(
        absl::StrCat("attention graph degree=", o.degree, " outside [2, ", kMaxDegree, "]"));
  }
  if (o.build_beam < 1 || o.build_beam > kMaxBeam) {
    return absl::InvalidArgumentError(
        absl::StrCat("attention graph build_beam=", o.build_beam, " outside [1, ", kMaxBeam, "]"));
  }
  if (o.link_beam < 1 || o.link_beam > kMaxBeam) {
    return absl::InvalidArgumentError(
        absl::StrCat("attention graph link_beam=", o.link_beam, " outside [1, ", kMaxBeam, "]"));
  }
  if (o.default_beam < 1 || o.default_beam > kMaxBeam) {
    return absl::InvalidArgumentError(absl::StrCat(
        "attention graph default_beam=", o.default_beam, " outside [1, ", kMaxBeam, "]"));
  }
  if (o.entry_points < 1 || o.entry_points > kMaxEntries) {
    return absl::InvalidArgumentError(
        absl::StrCat("attention graph entry_points=", o.entry_points, " outside [1, 1024]"));
  }
  if (o.recent_entries < 0 || o.recent_entries > kMaxEntries - o.entry_points) {
    return absl::InvalidArgumentError(absl::StrCat(
        "attention graph recent_entries=", o.recent_entries, " outside [0, 1024 - entry_points=",
        kMaxEntries - o.entry_points, "]"));
  }
  if (o.routers < 0 || o.routers > 65536 || o.router_probe < 1 || o.router_probe > 1024 ||
      o.router_entries < 1 || o.router_entries > 1024) {
    return absl::InvalidArgumentError(absl::StrCat(
        "attention graph routers=", o.routers, " router_probe=", o.router_probe,
        " router_entries=", o.router_entries,
        " outside routers [0, 65536], probe [1, 1024], entries [1, 1024]"));
  }
  if (o.pivots_per_query < 1 || o.pivots_per_query > 1024) {
    return absl::InvalidArgumentError(absl::StrCat("attention graph pivots_per_query=",
                                                   o.pivots_per_query, " outside [1, 1024]"));
  }
  if (!(o.prune_alpha >= 1.0f && o.prune_alpha <= 2.0f)) {
    return absl::InvalidArgumentError(
        absl::StrCat("attention graph prune_alpha=", o.prune_alpha, " outside [1, 2]"));
  }
  return absl::OkStatus();
}

void AttentionGraphIndex::RefreshBf16(size_t from, size_t to) {
  if (!options_.scan_bf16) {
    keys_bf16_.clear();
    return;
  }
  keys_bf16_.resize(to * dim_);
  simd::Active().fp32_to_bf16(keys_.data() + from * dim_, keys_bf16_.data() + from * dim_,
                              (to - from) * dim_);
}

void AttentionGraphIndex::RefreshNorms(size_t from, size_t to) {
  sq_norms_.resize(to);
  const simd::Kernels& kern = simd::Active();
  for (size_t i = from; i < to; ++i) {
    sq_norms_[i] = kern.dot(keys_.data() + i * dim_, keys_.data() + i * dim_, dim_);
  }
}

std::span<const uint32_t> AttentionGraphIndex::RegularNeighbors(uint32_t id) const {
  const uint32_t* r = row(id);
  const size_t degree = stride_ - 1;
  size_t count = 0;
  while (count < degree && r[count] != kNone) ++count;
  return {r, count};
}

std::vector<uint32_t> AttentionGraphIndex::neighbors(uint32_t id) const {
  KVR_CHECK(id < n_);
  const auto regular = RegularNeighbors(id);
  std::vector<uint32_t> out(regular.begin(), regular.end());
  if (row(id)[stride_ - 1] != kNone) out.push_back(row(id)[stride_ - 1]);
  return out;
}

bool AttentionGraphIndex::AllReachable() const {
  const auto seen = Reachable();
  return std::all_of(seen.begin(), seen.end(), [](uint8_t v) { return v != 0; });
}

float AttentionGraphIndex::L2(uint32_t a, uint32_t b) const {
  return simd::Active().l2sqr(key(a), key(b), dim_);
}

// Occlusion (relative-neighbourhood) pruning around `source`: scan candidates
// nearest first and keep one unless a kept neighbour s is much closer to it
// than the source is (alpha * d(s, c) < d(source, c)). When fewer than
// `degree` survive and `fill` is set, the nearest pruned candidates fill the
// remaining slots (a saturated graph navigates better at small degree).
void AttentionGraphIndex::Prune(uint32_t source, std::vector<Cand>* cands,
                                std::vector<uint32_t>* out, std::vector<float>* out_dist) const {
  const size_t degree = static_cast<size_t>(options_.degree);
  // Only the nearest kMaxCandidatesPerDegree * degree candidates compete: the
  // occlusion test costs O(degree) distances per candidate.
  const size_t cap = kMaxCandidatesPerDegree * degree;
  if (cands->size() > cap) {
    std::nth_element(cands->begin(), cands->begin() + cap, cands->end());
    cands->resize(cap);
  }
  std::sort(cands->begin(), cands->end());
  // Duplicates (same id) have the same rank, so they are adjacent.
  cands->erase(std::unique(cands->begin(), cands->end(),
                           [](const Cand& a, const Cand& b) { return a.id == b.id; }),
               cands->end());
  out->clear();
  if (out_dist != nullptr) out_dist->clear();
  std::vector<const Cand*> pruned;
  for (const Cand& c : *cands) {
    if (c.id == source) continue;
    if (out->size() == degree) break;
    bool occluded = false;
    for (uint32_t s : *out) {
      if (options_.prune_alpha * L2(s, c.id) < c.dist) {
        occluded = true;
        break;
      }
    }
    if (occluded) {
      pruned.push_back(&c);
    } else {
      out->push_back(c.id);
      if (out_dist != nullptr) out_dist->push_back(c.dist);
    }
  }
  if (options_.saturate) {
    for (size_t i = 0; i < pruned.size() && out->size() < degree; ++i) {
      out->push_back(pruned[i]->id);
      if (out_dist != nullptr) out_dist->push_back(pruned[i]->dist);
    }
  }
}

// Replaces the regular edges of `id`; the connectivity slot is kept.
void AttentionGraphIndex::SetNeighbors(uint32_t id, std::span<const uint32_t> nbrs) {
  uint32_t* r = row(id);
  const size_t degree = stride_ - 1;
  KVR_CHECK(nbrs.size() <= degree);
  std::copy(nbrs.begin(), nbrs.end(), r);
  std::fill(r + nbrs.size(), r + degree, kNone);
}

// Best-first search from the entry points. Scores are q.k (kIp) or
// -||q - k||^2 (kL2, used to link keys in). Leaves the beam sorted best first.
template <AttentionGraphIndex::Metric kMetric>
void AttentionGraphIndex::SearchOne(const float* q, size_t beam_width, Scratch* s,
                                    int64_t* distance_computations,
                                    std::span<const uint32_t> extra_seeds) const {
  const simd::Kernels& kern = simd::Active();
  s->Reset(n_);
  s->beam.Reset(beam_width);
  const float q_norm = kMetric == Metric::kL2 ? kern.dot(q, q, dim_) : 0.0f;
  if (s->fresh.size() < stride_) {
    s->fresh.resize(stride_);
    s->fresh_scores.resize(stride_);
  }
  auto score_ids = [&](const uint32_t* ids, size_t count, float* out) {
    if constexpr (kMetric == Metric::kIp) {
      if (keys_bf16_.empty()) {
        kern.dot_gather(q, keys_.data(), ids, count, dim_, dim_, out);
      } else {
        kern.dot_gather_bf16(q, keys_bf16_.data(), ids, count, dim_, dim_, out);
      }
    } else {
      // -||q - k||^2 = 2 q.k - ||k||^2 - ||q||^2, batched like the IP walk
      // (on a bf16 copy while Build links keys in: half the memory traffic;
      // the caller re-measures the candidates it keeps exactly).
      if (!walk_bf16_.empty()) {
        kern.dot_gather_bf16(q, walk_bf16_.data(), ids, count, dim_, dim_, out);
      } else {
        kern.dot_gather(q, keys_.data(), ids, count, dim_, dim_, out);
      }
      for (size_t i = 0; i < count; ++i) {
        out[i] = std::min(0.0f, 2.0f * out[i] - sq_norms_[ids[i]] - q_norm);
      }
    }
    *distance_computations += static_cast<int64_t>(count);
  };

  // Entry points: score all, seed the beam.
  auto seed = [&](std::span<const uint32_t> ids) {
    size_t m = 0;
    for (uint32_t e : ids) {
      if (e != kNone && s->Visit(e)) {
        if (m == s->fresh.size()) {
          s->fresh.resize(2 * m);
          s->fresh_scores.resize(2 * m);
        }
        s->fresh[m++] = e;
      }
    }
    score_ids(s->fresh.data(), m, s->fresh_scores.data());
    for (size_t i = 0; i < m; ++i) s->beam.Insert(s->fresh[i], s->fresh_scores[i]);
  };
  seed(entries_);
  if (!extra_seeds.empty()) seed(extra_seeds);
  if constexpr (kMetric == Metric::kIp) {
    const size_t routers = router_vecs_.size() / dim_;
    if (routers > 0) {
      // Route among training queries (in distribution for decode queries,
      // unlike keys), then start from the keys the nearest ones wanted.
      const size_t e = static_cast<size_t>(options_.router_entries);
      const size_t probe = std::min<size_t>(static_cast<size_t>(options_.router_probe), routers);
      s->router_scores.resize(routers);
      kern.dot_batch(q, router_vecs_.data(), routers, dim_, dim_, s->router_scores.data());
      *distance_computations += static_cast<int64_t>(routers);
      s->router_order.resize(routers);
      std::iota(s->router_order.begin(), s->router_order.end(), 0);
      std::partial_sort(s->router_order.begin(), s->router_order.begin() + probe,
                        s->router_order.end(), [&](uint32_t a, uint32_t b) {
                          return s->router_scores[a] > s->router_scores[b];
                        });
      for (size_t r = 0; r < probe; ++r) {
        seed({router_keys_.data() + static_cast<size_t>(s->router_order[r]) * e, e});
      }
    }
  }

  const size_t row_bytes = stride_ * sizeof(uint32_t);
  while (s->beam.HasUnexpanded()) {
    const uint32_t* r = row(s->beam.PopUnexpanded());
    // The walk is bound by memory latency: fetch the row the next expansion
    // most likely reads, and every neighbour's visited tag, before using them.
    if (s->beam.HasUnexpanded()) {
      const char* next = reinterpret_cast<const char*>(row(s->beam.PeekUnexpanded()));
      for (size_t off = 0; off < row_bytes; off += 64) __builtin_prefetch(next + off);
    }
    for (size_t j = 0; j < stride_; ++j) {
      if (r[j] != kNone) __builtin_prefetch(&s->visited[r[j]]);
    }
    size_t m = 0;
    for (size_t j = 0; j < stride_; ++j) {
      if (r[j] != kNone && s->Visit(r[j])) s->fresh[m++] = r[j];
    }
    if (m == 0) continue;
    score_ids(s->fresh.data(), m, s->fresh_scores.data());
    for (size_t i = 0; i < m; ++i) s->beam.Insert(s->fresh[i], s->fresh_scores[i]);
  }
}

absl::Status AttentionGraphIndex::Search(ConstMatrixView queries, const SearchParams& params,
                                         std::span<int64_t> ids, std::span<float> scores,
                                         SearchStats* stats) const {
  KVR_RETURN_IF_ERROR(ValidateSearch(*this, queries, params, ids, scores));
  if (params.beam < 0 || params.beam > kMaxBeam) {
    return absl::InvalidArgumentError(
        absl::StrCat("beam=", params.beam, " outside [0, ", kMaxBeam, "]"));
  }
  const size_t k = static_cast<size_t>(params.k);
  const size_t beam_width =
      std::max<size_t>(k, params.beam > 0 ? params.beam : options_.default_beam);
  ScratchLease s(scratch_.get());
  int64_t dc = 0;
  for (size_t i = 0; i < queries.rows(); ++i) {
    SearchOne<Metric::kIp>(queries.row(i), beam_width, &*s, &dc);
    const size_t found = std::min(k, s->beam.size());
    if (!keys_bf16_.empty() && found > 0) {
      // Exact fp32 scores for the results, re-sorted (best first, then id).
      s->fresh.resize(std::max(s->fresh.size(), found));
      s->fresh_scores.resize(std::max(s->fresh_scores.size(), found));
      for (size_t j = 0; j < found; ++j) s->fresh[j] = s->beam.id(j);
      simd::Active().dot_gather(queries.row(i), keys_.data(), s->fresh.data(), found, dim_, dim_,
                                s->fresh_scores.data());
      dc += static_cast<int64_t>(found);
      s->rescored.resize(found);
      for (size_t j = 0; j < found; ++j) s->rescored[j] = {s->fresh_scores[j], s->fresh[j]};
      std::sort(s->rescored.begin(), s->rescored.end(), [](const auto& a, const auto& b) {
        return a.first > b.first || (a.first == b.first && a.second < b.second);
      });
    }
    for (size_t j = 0; j < k; ++j) {
      if (j < found && !keys_bf16_.empty()) {
        ids[i * k + j] = s->rescored[j].second;
        scores[i * k + j] = s->rescored[j].first;
      } else if (j < found) {
        ids[i * k + j] = s->beam.id(j);
        scores[i * k + j] = s->beam.score(j);
      } else {
        ids[i * k + j] = -1;
        scores[i * k + j] = -std::numeric_limits<float>::infinity();
      }
    }
  }
  if (stats != nullptr) {
    stats->queries += static_cast<int64_t>(queries.rows());
    stats->distance_computations += dc;
  }
  return absl::OkStatus();
}

// Chooses the entry points: the keys that appear most often in the training
// queries' top-k lists (the "heavy hitters" most queries attend to), or key 0
// when there is no training data.
void AttentionGraphIndex::ChooseEntries(std::span<const uint32_t> in_topk_count) {
  entries_.clear();
  const size_t want = std::min<size_t>(static_cast<size_t>(options_.entry_points), n_);
  std::vector<uint32_t> order(n_);
  std::iota(order.begin(), order.end(), 0);
  std::partial_sort(order.begin(), order.begin() + want, order.end(),
                    [&](uint32_t a, uint32_t b) {
                      return in_topk_count[a] > in_topk_count[b] ||
                             (in_topk_count[a] == in_topk_count[b] && a < b);
                    });
  entries_.assign(order.begin(), order.begin() + want);
  recent_count_ = 0;
}

void AttentionGraphIndex::RefreshRecentEntries() {
  entries_.resize(entries_.size() - recent_count_);
  recent_count_ = 0;
  const size_t want = std::min<size_t>(static_cast<size_t>(options_.recent_entries), n_);
  const size_t heavy = entries_.size();
  for (size_t i = 0; i < want; ++i) {
    const uint32_t id = static_cast<uint32_t>(n_ - 1 - i);
    if (std::find(entries_.begin(), entries_.begin() + heavy, id) == entries_.begin() + heavy) {
      entries_.push_back(id);
      ++recent_count_;
    }
  }
}

absl::StatusOr<std::unique_ptr<AttentionGraphIndex>> AttentionGraphIndex::Build(
    ConstMatrixView keys, std::span<const int64_t> train_topk, size_t topk_width,
    const AttentionGraphOptions& options, ThreadPool* pool) {
  KVR_RETURN_IF_ERROR(ValidateGraphOptions(options));
  if (keys.cols() == 0 || keys.cols() > kMaxDim) {
    return absl::InvalidArgumentError(
        absl::StrCat("attention graph keys dim=", keys.cols(), " outside [1, ", kMaxDim, "]"));
  }
  if (keys.rows() >= kMaxKeys) {
    return absl::InvalidArgumentError(
        absl::StrCat("attention graph keys rows=", keys.rows(), " exceeds ", kMaxKeys - 1));
  }
  KVR_RETURN_IF_ERROR(ValidateFinite(keys, keys.cols(), "keys"));
  if (topk_width == 0 && !train_topk.empty()) {
    return absl::InvalidArgumentError("train_topk is non-empty but topk_width is 0");
  }
  if (topk_width != 0 && train_topk.size() % topk_width != 0) {
    return absl::InvalidArgumentError(absl::StrCat("train_topk size ", train_topk.size(),
                                                   " is not a multiple of topk_width ",
                                                   topk_width));
  }
  for (size_t i = 0; i < train_topk.size(); ++i) {
    const int64_t id = train_topk[i];
    if (id < -1 || id >= static_cast<int64_t>(keys.rows())) {
      return absl::InvalidArgumentError(absl::StrCat("train_topk[", i, "]=", id,
                                                     " outside [-1, ", keys.rows(), ")"));
    }
  }

  auto index = std::unique_ptr<AttentionGraphIndex>(new AttentionGraphIndex(keys.cols(), options));
  index->n_ = keys.rows();
  index->keys_.resize(keys.rows() * keys.cols());
  for (size_t i = 0; i < keys.rows(); ++i) {
    std::copy(keys.row(i), keys.row(i) + keys.cols(), index->keys_.data() + i * keys.cols());
  }
  index->adjacency_.assign(index->n_ * index->stride_, kNone);
  index->RefreshBf16(0, index->n_);
  index->RefreshNorms(0, index->n_);
  if (index->n_ == 0) return index;
  index->BuildGraph(train_topk, topk_width, pool);
  return index;
}

void AttentionGraphIndex::BuildGraph(std::span<const int64_t> train_topk, size_t topk_width,
                                     ThreadPool* pool) {
  ThreadPool inline_pool(0);
  if (pool == nullptr) pool = &inline_pool;
  const size_t n = n_;
  const size_t n_train = topk_width == 0 ? 0 : train_topk.size() / topk_width;

  // 1. Bucket training queries by their pivots (their best `pivots_per_query`
  //    keys); count how often each key is in some query's top-k (entry
  //    points).
  const size_t pivots = static_cast<size_t>(options_.pivots_per_query);
  std::vector<uint32_t> in_topk(n, 0);
  std::vector<uint32_t> pivot_start(n + 1, 0);
  for (size_t q = 0; q < n_train; ++q) {
    const int64_t* row = train_topk.data() + q * topk_width;
    size_t seen = 0;
    for (size_t j = 0; j < topk_width; ++j) {
      if (row[j] < 0) continue;
      ++in_topk[row[j]];
      if (seen++ < pivots) ++pivot_start[row[j] + 1];
    }
  }
  for (size_t i = 0; i < n; ++i) pivot_start[i + 1] += pivot_start[i];
  std::vector<uint32_t> by_pivot(pivot_start[n]);
  {
    std::vector<uint32_t> fill(pivot_start.begin(), pivot_start.end() - 1);
    for (size_t q = 0; q < n_train; ++q) {
      const int64_t* row = train_topk.data() + q * topk_width;
      size_t seen = 0;
      for (size_t j = 0; j < topk_width && seen < pivots; ++j) {
        if (row[j] < 0) continue;
        by_pivot[fill[row[j]]++] = static_cast<uint32_t>(q);
        ++seen;
      }
    }
  }
  ChooseEntries(in_topk);

  using Clock = std::chrono::steady_clock;
  auto t0 = Clock::now();
  auto lap = [&t0] {
    const auto t1 = Clock::now();
    const double s = std::chrono::duration<double>(t1 - t0).count();
    t0 = t1;
    return s;
  };
  const double cpu0 = ProcessCpuSeconds();

  // 2. Projection: each pivot links to the pruned union of its queries'
  //    other neighbours.
  pool->ParallelFor(n, 256, [&](size_t begin, size_t end) {
    const simd::Kernels& kern = simd::Active();
    std::vector<Cand> cands;
    std::vector<uint32_t> uniq, counts;
    // Open-addressing table (id -> index into uniq), kNone = empty; grows to
    // twice the most ids a pivot has seen and is emptied through `uniq`.
    std::vector<uint32_t> slot_id, slot_at;
    std::vector<float> dots;
    std::vector<uint32_t> out;
    for (size_t p = begin; p < end; ++p) {
      if (pivot_start[p] == pivot_start[p + 1]) continue;
      // Distinct candidates, in first-seen order, and how many of the pivot's
      // queries want each, counted by hashing (sorting every pivot's ids was
      // ~10% of the build; Prune orders candidates by (rank, id), so the
      // graph does not depend on this order).
      const size_t m = static_cast<size_t>(pivot_start[p + 1] - pivot_start[p]) * topk_width;
      size_t cap = 64;
      while (cap < 2 * m) cap <<= 1;
      if (slot_id.size() < cap) {
        slot_id.assign(cap, kNone);
        slot_at.resize(cap);
      }
      const size_t mask = slot_id.size() - 1;
      uniq.clear();
      counts.clear();
      for (uint32_t t = pivot_start[p]; t < pivot_start[p + 1]; ++t) {
        const int64_t* row = train_topk.data() + static_cast<size_t>(by_pivot[t]) * topk_width;
        for (size_t j = 0; j < topk_width; ++j) {
          if (row[j] < 0 || static_cast<size_t>(row[j]) == p) continue;
          const uint32_t id = static_cast<uint32_t>(row[j]);
          size_t h = (static_cast<size_t>(id) * 0x9E3779B1u) & mask;
          while (slot_id[h] != kNone && slot_id[h] != id) h = (h + 1) & mask;
          if (slot_id[h] == kNone) {
            slot_id[h] = id;
            slot_at[h] = static_cast<uint32_t>(uniq.size());
            uniq.push_back(id);
            counts.push_back(1);
          } else {
            ++counts[slot_at[h]];
          }
        }
      }
      for (uint32_t id : uniq) {  // empty the table for the next pivot
        size_t h = (static_cast<size_t>(id) * 0x9E3779B1u) & mask;
        while (slot_id[h] != id) h = (h + 1) & mask;
        slot_id[h] = kNone;
      }
      // Distances batched (gathered dot products, prefetched: this loop is
      // bound by memory latency) as ||p||^2 + ||c||^2 - 2 p.c.
      dots.resize(uniq.size());
      kern.dot_gather(key(static_cast<uint32_t>(p)), keys_.data(), uniq.data(), uniq.size(), dim_,
                      dim_, dots.data());
      cands.clear();
      for (size_t i = 0; i < uniq.size(); ++i) {
        const float d = std::max(0.0f, sq_norms_[p] + sq_norms_[uniq[i]] - 2.0f * dots[i]);
        // Counts are small integers; d / (1 + d) < 1 orders equal counts by distance.
        const float rank = options_.frequency_order
                               ? -static_cast<float>(counts[i]) + d / (1.0f + d)
                               : d;
        cands.push_back({d, uniq[i], rank});
      }
      Prune(static_cast<uint32_t>(p), &cands, &out);
      SetNeighbors(static_cast<uint32_t>(p), out);
    }
  });

  build_stats_.projection_seconds = lap();

  // 3. Reverse edges: every projected edge p->c also offers c->p; merged per
  //    target and re-pruned, so each row stays within the degree.
  AddReverseEdges(pool);
  build_stats_.reverse_seconds = lap();
  build_stats_.keys_covered = 0;
  for (uint32_t i = 0; i < n; ++i) build_stats_.keys_covered += RegularNeighbors(i).empty() ? 0 : 1;

  // 4. Link in every key the training queries did not reach, so that every
  //    key is reachable from the entry points.
  // The link searches walk a bf16 copy of the keys (memory-bound otherwise).
  walk_bf16_.resize(n * dim_);
  simd::Active().fp32_to_bf16(keys_.data(), walk_bf16_.data(), n * dim_);
  build_stats_.keys_linked = LinkUnreachable(pool, static_cast<size_t>(options_.link_beam));
  RefreshRecentEntries();
  RoutersFromTopK(train_topk, topk_width);
  walk_bf16_ = {};
  build_stats_.link_seconds = lap();
  build_stats_.cpu_seconds = ProcessCpuSeconds() - cpu0;
}

void AttentionGraphIndex::AddReverseEdges(ThreadPool* pool) {
  const size_t n = n_;
  const size_t degree = static_cast<size_t>(options_.degree);
  std::vector<uint32_t> rev_start(n + 1, 0);
  for (size_t p = 0; p < n; ++p) {
    for (uint32_t c : RegularNeighbors(static_cast<uint32_t>(p))) ++rev_start[c + 1];
  }
  for (size_t i = 0; i < n; ++i) rev_start[i + 1] += rev_start[i];
  std::vector<uint32_t> rev(rev_start[n]);
  {
    std::vector<uint32_t> fill(rev_start.begin(), rev_start.end() - 1);
    for (size_t p = 0; p < n; ++p) {
      for (uint32_t c : RegularNeighbors(static_cast<uint32_t>(p))) rev[fill[c]++] = static_cast<uint32_t>(p);
    }
  }
  // New rows are computed from the old ones and written afterwards, so the
  // result does not depend on thread scheduling.
  std::vector<uint32_t> next(n * degree, kNone);
  pool->ParallelFor(n, 256, [&](size_t begin, size_t end) {
    std::vector<Cand> cands;
    std::vector<uint32_t> out;
    for (size_t c = begin; c < end; ++c) {
      const auto own = RegularNeighbors(static_cast<uint32_t>(c));
      if (rev_start[c] == rev_start[c + 1]) {
        std::copy(own.begin(), own.end(), next.begin() + c * degree);
        continue;
      }
      cands.clear();
      for (uint32_t x : own) cands.push_back(MakeCand(L2(static_cast<uint32_t>(c), x), x));
      for (uint32_t t = rev_start[c]; t < rev_start[c + 1]; ++t) {
        cands.push_back(MakeCand(L2(static_cast<uint32_t>(c), rev[t]), rev[t]));
      }
      Prune(static_cast<uint32_t>(c), &cands, &out);
      std::copy(out.begin(), out.end(), next.begin() + c * degree);
    }
  });
  for (size_t c = 0; c < n; ++c) {
    size_t count = 0;
    while (count < degree && next[c * degree + count] != kNone) ++count;
    SetNeighbors(static_cast<uint32_t>(c), {next.data() + c * degree, count});
  }
}

// Marks every key reachable from the entry points.
std::vector<uint8_t> AttentionGraphIndex::Reachable() const {
  std::vector<uint8_t> seen(n_, 0);
  std::vector<uint32_t> stack;
  for (uint32_t e : entries_) {
    if (!seen[e]) {
      seen[e] = 1;
      stack.push_back(e);
    }
  }
  while (!stack.empty()) {
    const uint32_t v = stack.back();
    stack.pop_back();
    const uint32_t* r = row(v);
    for (size_t j = 0; j < stride_; ++j) {
      const uint32_t w = r[j];
      if (w != kNone && !seen[w]) {
        seen[w] = 1;
        stack.push_back(w);
      }
    }
  }
  return seen;
}

void AttentionGraphIndex::ChooseLinks(uint32_t id, std::vector<Cand>* cands,
                                      std::vector<uint32_t>* out,
                                      std::vector<float>* out_dist) const {
  // Keep whatever out-edges the key already has (from projection).
  for (uint32_t x : RegularNeighbors(id)) cands->push_back(MakeCand(L2(id, x), x));
  Prune(id, cands, out, out_dist);
}

void AttentionGraphIndex::BeginLinking(size_t n) {
  edge_len_.resize(n * (stride_ - 1));
  edge_len_known_.assign(n, 0);
}

void AttentionGraphIndex::EndLinking() {
  edge_len_ = {};
  edge_len_known_ = {};
}

float* AttentionGraphIndex::EdgeLengths(uint32_t id) {
  float* len = edge_len_.data() + static_cast<size_t>(id) * (stride_ - 1);
  if (!edge_len_known_[id]) {
    const auto current = RegularNeighbors(id);
    for (size_t j = 0; j < current.size(); ++j) len[j] = L2(id, current[j]);
    edge_len_known_[id] = 1;
  }
  return len;
}

void AttentionGraphIndex::ApplyLinks(uint32_t id, std::span<const uint32_t> out,
                                     std::span<const float> out_dist,
                                     std::span<const Cand> cands) {
  KVR_CHECK(out.size() == out_dist.size() && edge_len_known_.size() >= n_);
  SetNeighbors(id, out);
  std::copy(out_dist.begin(), out_dist.end(),
            edge_len_.data() + static_cast<size_t>(id) * (stride_ - 1));
  edge_len_known_[id] = 1;
  // Offer each kept neighbour the reverse edge: taken when it has a free slot
  // or when the new key is nearer than its farthest neighbour (which it
  // replaces; LinkUnreachable re-checks that the replaced key stays reachable).
  bool linked = false;
  const size_t degree = stride_ - 1;
  for (size_t i = 0; i < out.size(); ++i) {
    const uint32_t c = out[i];
    uint32_t* r = row(c);
    float* len = EdgeLengths(c);
    const auto current = RegularNeighbors(c);
    if (current.size() < degree) {
      r[current.size()] = id;
      len[current.size()] = out_dist[i];
      linked = true;
      continue;
    }
    size_t far = 0;
    for (size_t j = 1; j < current.size(); ++j) {
      if (len[j] > len[far]) far = j;
    }
    if (out_dist[i] < len[far]) {
      r[far] = id;
      len[far] = out_dist[i];
      linked = true;
    }
  }
  if (linked) return;
  // No neighbour kept the edge: use the connectivity slot of the nearest
  // candidate that has it free. Candidates come from a search, so they are
  // reachable (or will be once their own turn comes).
  for (uint32_t c : out) {
    if (TrySetRepairEdge(c, id)) return;
  }
  for (const Cand& c : cands) {
    if (c.id != id && TrySetRepairEdge(c.id, id)) return;
  }
  // Every candidate's slot is used: take the next free slot anywhere (a
  // rotating cursor keeps this linear overall). LinkUnreachable re-checks
  // reachability, so a later round fixes what this cannot.
  for (size_t tried = 0; tried < n_; ++tried) {
    const uint32_t c = static_cast<uint32_t>(repair_cursor_++ % n_);
    if (c != id && TrySetRepairEdge(c, id)) return;
  }
}

// Makes `target` the connectivity edge of `source` if that slot is free.
bool AttentionGraphIndex::TrySetRepairEdge(uint32_t source, uint32_t target) {
  uint32_t& slot = row(source)[stride_ - 1];
  if (slot == target) return true;
  if (slot != kNone) return false;
  slot = target;
  return true;
}

// Up to two keys nearest to `id` by position (one below, one above, within
// kSeedWindow positions) whose `linked` flag is set; returns how many.
size_t AttentionGraphIndex::NearestLinkedByPosition(uint32_t id, std::span<const uint8_t> linked,
                                                    uint32_t* out) const {
  size_t m = 0;
  const uint32_t lo = id > kSeedWindow ? id - kSeedWindow : 0;
  for (uint32_t j = id; j > lo;) {
    if (linked[--j]) {
      out[m++] = j;
      break;
    }
  }
  const uint32_t hi = static_cast<uint32_t>(std::min<size_t>(n_, size_t{id} + kSeedWindow + 1));
  for (uint32_t j = id + 1; j < hi; ++j) {
    if (linked[j]) {
      out[m++] = j;
      break;
    }
  }
  return m;
}

size_t AttentionGraphIndex::LinkUnreachable(ThreadPool* pool, size_t beam) {
  ThreadPool inline_pool(0);
  if (pool == nullptr) pool = &inline_pool;
  // Search (by L2, with the key as query) in parallel batches against the
  // current graph, then link sequentially. Keys in a batch cannot find each
  // other, so batches grow with the reachable part (at most half of it): the
  // graph a batch searches is always at least twice the batch.
  size_t linked = 0;
  const bool own_cache = edge_len_known_.size() < n_;
  if (own_cache) BeginLinking(n_);
  std::atomic<int64_t> link_dc{0};
  size_t last_todo = std::numeric_limits<size_t>::max();
  for (int round = 0; round < 64; ++round) {
    const std::vector<uint8_t> seen = Reachable();
    std::vector<uint32_t> todo;
    for (uint32_t i = 0; i < n_; ++i) {
      if (!seen[i]) todo.push_back(i);
    }
    if (todo.empty()) {
      if (own_cache) EndLinking();
      build_stats_.link_distance_computations += link_dc.load();
      return linked;
    }
    if (todo.size() >= last_todo) break;  // no progress: splice the rest below
    last_todo = todo.size();
    linked += todo.size();
    size_t reachable = n_ - todo.size();
    std::vector<uint8_t> linked_now = seen;
    for (size_t b = 0; b < todo.size();) {
      const size_t batch = std::max<size_t>(32, reachable / 2);
      const size_t e = std::min(todo.size(), b + batch);
      // Parallel: search and choose each key's out-edges (reads only).
      // Sequential: write them and the reverse edges.
      std::vector<std::vector<Cand>> found(e - b);
      std::vector<std::vector<uint32_t>> outs(e - b);
      std::vector<std::vector<float>> out_dists(e - b);
      pool->ParallelFor(e - b, 16, [&](size_t begin, size_t end) {
        ScratchLease s(scratch_.get());
        int64_t dc = 0;
        uint32_t near[2];
        struct AddDc {  // publishes this chunk's count however the loop exits
          std::atomic<int64_t>* total;
          int64_t* dc;
          ~AddDc() { total->fetch_add(*dc, std::memory_order_relaxed); }
        } add_dc{&link_dc, &dc};
        for (size_t i = begin; i < end; ++i) {
          const uint32_t id = todo[b + i];
          // Also start from the nearest linked keys by position (neighbouring
          // positions tend to hold similar keys; a cheap, often close seed).
          const size_t m = NearestLinkedByPosition(id, linked_now, near);
          SearchOne<Metric::kL2>(key(id), beam, &*s, &dc, {near, m});
          for (size_t j = 0; j < s->beam.size(); ++j) {
            if (s->beam.id(j) != id) {
              found[i].push_back(MakeCand(L2(id, s->beam.id(j)), s->beam.id(j)));
            }
          }
          dc += static_cast<int64_t>(found[i].size());
          ChooseLinks(id, &found[i], &outs[i], &out_dists[i]);
        }
      });
      for (size_t i = 0; i < e - b; ++i) {
        ApplyLinks(todo[b + i], outs[i], out_dists[i], found[i]);
        linked_now[todo[b + i]] = 1;
      }
      reachable += e - b;
      b = e;
    }
  }
  // Searching and linking stopped making progress (seen with small,
  // repetitive chunks: two unreachable keys whose connectivity slots point at
  // each other) or ran 64 rounds. Splice what is left into the connectivity
  // chain: never fails.
  SpliceUnreachable();
  if (own_cache) EndLinking();
  build_stats_.link_distance_computations += link_dc.load();
  return linked;
}

void AttentionGraphIndex::SpliceUnreachable() {
  std::vector<uint8_t> seen = Reachable();
  KVR_CHECK(!entries_.empty() || n_ == 0);
  std::vector<uint32_t> group;
  std::vector<uint32_t> stack;
  for (bool again = true; again;) {
    again = false;
    for (uint32_t u = 0; u < n_; ++u) {
      if (seen[u]) continue;
      // Everything u reaches that is not reachable yet becomes reachable with it.
      group.clear();
      stack.assign(1, u);
      seen[u] = 2;  // 2: in u's group (this pass)
      while (!stack.empty()) {
        const uint32_t v = stack.back();
        stack.pop_back();
        group.push_back(v);
        const uint32_t* r = row(v);
        for (size_t j = 0; j < stride_; ++j) {
          const uint32_t w = r[j];
          if (w != kNone && !seen[w]) {
            seen[w] = 2;
            stack.push_back(w);
          }
        }
      }
      // The group's key whose connectivity slot is free, or points outside the
      // group (at a key reachable without the group), takes over the entry's
      // old connectivity edge; otherwise u's slot does (u is reached from the
      // entry, so only edges inside the group change).
      uint32_t tail = u;
      for (uint32_t v : group) {
        const uint32_t slot = row(v)[stride_ - 1];
        if (slot == kNone || seen[slot] == 1) {
          tail = v;
          break;
        }
      }
      uint32_t& entry_slot = row(entries_.front())[stride_ - 1];
      const uint32_t old = entry_slot;
      entry_slot = u;
      row(tail)[stride_ - 1] = old;
      if (tail != u || group.size() == 1) {
        for (uint32_t v : group) seen[v] = 1;  // tail's slot led nowhere in the group
        continue;
      }
      // u's own slot was replaced: mark what u still reaches; the rest of the
      // group waits for a later splice (each splice adds u, so this ends).
      for (uint32_t v : group) seen[v] = 0;
      stack.assign(1, u);
      seen[u] = 1;
      while (!stack.empty()) {
        const uint32_t v = stack.back();
        stack.pop_back();
        const uint32_t* r = row(v);
        for (size_t j = 0; j < stride_; ++j) {
          const uint32_t w = r[j];
          if (w != kNone && !seen[w]) {
            seen[w] = 1;
            stack.push_back(w);
          }
        }
      }
      for (uint32_t v : group) {
        if (!seen[v] && v < u) again = true;
      }
    }
  }
}

absl::Status AttentionGraphIndex::Add(ConstMatrixView keys) {
  KVR_RETURN_IF_ERROR(ValidateFinite(keys, dim_, "keys"));
  if (n_ + keys.rows() >= kMaxKeys) {
    return absl::InvalidArgumentError(absl::StrCat("attention graph would hold ",
                                                   n_ + keys.rows(), " keys, limit ",
                                                   kMaxKeys - 1));
  }
  if (keys.rows() == 0) return absl::OkStatus();
  const size_t old_n = n_;
  keys_.resize((n_ + keys.rows()) * dim_);
  adjacency_.resize((n_ + keys.rows()) * stride_, kNone);
  for (size_t i = 0; i < keys.rows(); ++i) {
    std::copy(keys.row(i), keys.row(i) + dim_, keys_.data() + (old_n + i) * dim_);
  }
  RefreshBf16(old_n, old_n + keys.rows());
  RefreshNorms(old_n, old_n + keys.rows());
  if (old_n == 0) {
    // An index built empty: the first key is the entry; link the rest.
    n_ = keys.rows();
    entries_.assign(1, 0);
    recent_count_ = 0;
    RefreshRecentEntries();
    LinkUnreachable(nullptr, static_cast<size_t>(options_.build_beam));
    return absl::OkStatus();
  }
  // Insert one by one; each new key is searchable before the next is linked.
  BeginLinking(n_ + keys.rows());
  ScratchLease s(scratch_.get());
  std::vector<Cand> cands;
  std::vector<uint32_t> out;
  std::vector<float> out_dist;
  int64_t dc = 0;
  for (size_t i = 0; i < keys.rows(); ++i) {
    const uint32_t id = static_cast<uint32_t>(old_n + i);
    SearchOne<Metric::kL2>(key(id), static_cast<size_t>(options_.build_beam), &*s, &dc);
    cands.clear();
    for (size_t j = 0; j < s->beam.size(); ++j) {
      cands.push_back(MakeCand(-s->beam.score(j), s->beam.id(j)));
    }
    n_ = id + 1;
    ChooseLinks(id, &cands, &out, &out_dist);
    ApplyLinks(id, out, out_dist, cands);
  }
  // The newest keys become the recent entry points first: keys reached only
  // through the previous recent entries must be relinked too. Re-pruning a
  // neighbour's row can also drop the last edge into an older key; relink
  // any key that is unreachable from the final entry points.
  RefreshRecentEntries();
  LinkUnreachable(nullptr, static_cast<size_t>(options_.build_beam));
  EndLinking();
  return absl::OkStatus();
}

size_t AttentionGraphIndex::MemoryBytes() const {
  return sizeof(*this) + keys_.capacity() * sizeof(float) +
         keys_bf16_.capacity() * sizeof(uint16_t) +
         router_vecs_.capacity() * sizeof(float) + router_keys_.capacity() * sizeof(uint32_t) +
         adjacency_.capacity() * sizeof(uint32_t) + entries_.capacity() * sizeof(uint32_t) +
         sq_norms_.capacity() * sizeof(float) + walk_bf16_.capacity() * sizeof(uint16_t) +
         edge_len_.capacity() * sizeof(float) + edge_len_known_.capacity() +
         scratch_->MemoryBytes();
}

absl::Status AttentionGraphIndex::Serialize(std::vector<uint8_t>* out) const {
  BinaryWriter w;
  w.Put<uint64_t>(dim_);
  w.Put<uint64_t>(n_);
  w.Put<int32_t>(options_.degree);
  w.Put<int32_t>(options_.build_beam);
  w.Put<int32_t>(options_.default_beam);
  w.Put<int32_t>(options_.entry_points);
  w.Put<float>(options_.prune_alpha);
  w.Put<uint8_t>(options_.saturate ? 1 : 0);
  w.Put<int32_t>(options_.pivots_per_query);
  w.Put<int32_t>(options_.routers);
  w.Put<int32_t>(options_.router_probe);
  w.Put<int32_t>(options_.router_entries);
  w.Put<uint8_t>(options_.frequency_order ? 1 : 0);
  w.Put<uint8_t>(options_.scan_bf16 ? 1 : 0);
  w.Put<int32_t>(options_.recent_entries);
  w.Put<uint64_t>(recent_count_);
  w.Put<int32_t>(options_.link_beam);
  w.PutArray(std::span<const uint32_t>(entries_));
  w.PutArray(std::span<const float>(keys_.data(), n_ * dim_));
  w.PutArray(std::span<const uint32_t>(adjacency_.data(), n_ * stride_));
  w.PutArray(std::span<const float>(router_vecs_));
  w.PutArray(std::span<const uint32_t>(router_keys_));
  const auto blob = SealBlob(kGraphBlobKind, kFormatVersion,
                             w.bytes());
  out->insert(out->end(), blob.begin(), blob.end());
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<AttentionGraphIndex>> AttentionGraphIndex::Deserialize(
    const OpenedBlob& blob) {
  if (blob.kind != kGraphBlobKind) {
    return absl::InvalidArgumentError(
        absl::StrCat("blob kind ", blob.kind, " is not an attention graph index"));
  }
  if (blob.version < 1 || blob.version > kFormatVersion) {
    return absl::InvalidArgumentError(absl::StrCat("attention graph format version ",
                                                   blob.version, " unsupported (want ",
                                                   kFormatVersion, ")"));
  }
  BinaryReader r(blob.payload, "attention graph index");
  uint64_t dim = 0, n = 0;
  AttentionGraphOptions o;
  uint8_t saturate = 0;
  KVR_RETURN_IF_ERROR(r.Get(&dim, "dim"));
  KVR_RETURN_IF_ERROR(r.Get(&n, "n"));
  KVR_RETURN_IF_ERROR(r.Get(&o.degree, "degree"));
  KVR_RETURN_IF_ERROR(r.Get(&o.build_beam, "build_beam"));
  KVR_RETURN_IF_ERROR(r.Get(&o.default_beam, "default_beam"));
  KVR_RETURN_IF_ERROR(r.Get(&o.entry_points, "entry_points"));
  KVR_RETURN_IF_ERROR(r.Get(&o.prune_alpha, "prune_alpha"));
  KVR_RETURN_IF_ERROR(r.Get(&saturate, "saturate"));
  KVR_RETURN_IF_ERROR(r.Get(&o.pivots_per_query, "pivots_per_query"));
  KVR_RETURN_IF_ERROR(r.Get(&o.routers, "routers"));
  KVR_RETURN_IF_ERROR(r.Get(&o.router_probe, "router_probe"));
  KVR_RETURN_IF_ERROR(r.Get(&o.router_entries, "router_entries"));
  uint8_t frequency_order = 0, scan_bf16 = 0;
  KVR_RETURN_IF_ERROR(r.Get(&frequency_order, "frequency_order"));
  KVR_RETURN_IF_ERROR(r.Get(&scan_bf16, "scan_bf16"));
  uint64_t recent_count = 0;
  o.recent_entries = 0;
  if (blob.version >= 2) {
    KVR_RETURN_IF_ERROR(r.Get(&o.recent_entries, "recent_entries"));
    KVR_RETURN_IF_ERROR(r.Get(&recent_count, "recent_count"));
  }
  if (blob.version >= 3) KVR_RETURN_IF_ERROR(r.Get(&o.link_beam, "link_beam"));
  o.frequency_order = frequency_order != 0;
  o.scan_bf16 = scan_bf16 != 0;
  o.saturate = saturate != 0;
  if (dim == 0 || dim > kMaxDim || n >= kMaxKeys) {
    return absl::DataLossError(
        absl::StrCat("attention graph index: dim=", dim, " n=", n, " out of range"));
  }
  if (absl::Status st = ValidateGraphOptions(o); !st.ok()) {
    return absl::DataLossError(absl::StrCat("attention graph index: ", st.message()));
  }
  auto index = std::unique_ptr<AttentionGraphIndex>(new AttentionGraphIndex(dim, o));
  index->n_ = n;
  KVR_RETURN_IF_ERROR(r.GetArray(&index->entries_, "entries", kMaxEntries));
  if (recent_count > index->entries_.size()) {
    return absl::DataLossError(absl::StrCat("attention graph index: recent_count=", recent_count,
                                            " > entries ", index->entries_.size()));
  }
  index->recent_count_ = static_cast<size_t>(recent_count);
  KVR_RETURN_IF_ERROR(r.GetArray(&index->keys_, "keys", n * dim));
  KVR_RETURN_IF_ERROR(r.GetArray(&index->adjacency_, "adjacency", n * index->stride_));
  KVR_RETURN_IF_ERROR(r.GetArray(&index->router_vecs_, "router_vecs",
                                 static_cast<uint64_t>(o.routers) * dim));
  KVR_RETURN_IF_ERROR(r.GetArray(&index->router_keys_, "router_keys",
                                 static_cast<uint64_t>(o.routers) * o.router_entries));
  KVR_RETURN_IF_ERROR(r.ExpectEnd());
  if (index->keys_.size() != n * dim || index->adjacency_.size() != n * index->stride_) {
    return absl::DataLossError("attention graph index: keys/adjacency sizes disagree with n");
  }
  if (n > 0 && index->entries_.empty()) {
    return absl::DataLossError("attention graph index: no entry points");
  }
  for (uint32_t e : index->entries_) {
    if (e >= n) return absl::DataLossError("attention graph index: entry point out of range");
  }
  for (size_t i = 0; i < index->adjacency_.size(); ++i) {
    const uint32_t v = index->adjacency_[i];
    if (v != kNone && v >= n) {
      return absl::DataLossError(
          absl::StrCat("attention graph index: adjacency[", i, "]=", v, " >= n=", n));
    }
  }
  const size_t n_routers = index->router_vecs_.size() / dim;
  if (index->router_vecs_.size() != n_routers * dim ||
      index->router_keys_.size() != n_routers * static_cast<size_t>(o.router_entries)) {
    return absl::DataLossError("attention graph index: router arrays disagree");
  }
  for (uint32_t v : index->router_keys_) {
    if (v != kNone && v >= n) return absl::DataLossError("attention graph index: router key >= n");
  }
  for (float x : index->router_vecs_) {
    if (!std::isfinite(x)) return absl::DataLossError("attention graph index: non-finite router");
  }
  for (float x : index->keys_) {
    if (!std::isfinite(x)) return absl::DataLossError("attention graph index: non-finite key");
  }
  index->RefreshBf16(0, index->n_);
  index->RefreshNorms(0, index->n_);
  return index;
}

void AttentionGraphIndex::RoutersFromTopK(std::span<const int64_t> train_topk,
                                          size_t topk_width) {
  router_vecs_.clear();
  router_keys_.clear();
  const size_t n_train = topk_width == 0 ? 0 : train_topk.size() / topk_width;
  if (options_.routers == 0 || n_train == 0) return;
  // The keys' mean: every key shares it, so it says nothing about which
  // query wanted them.
  std::vector<double> mean(dim_, 0.0);
  for (size_t i = 0; i < n_; ++i) {
    const float* k = key(static_cast<uint32_t>(i));
    for (size_t j = 0; j < dim_; ++j) mean[j] += k[j];
  }
  for (double& m : mean) m /= static_cast<double>(n_);
  const size_t routers = std::min({static_cast<size_t>(options_.routers), n_train,
                                   n_ / kKeysPerRouter});
  if (routers == 0) return;
  const size_t e = static_cast<size_t>(options_.router_entries);
  router_vecs_.assign(routers * dim_, 0.0f);
  router_keys_.assign(routers * e, kNone);
  std::vector<double> v(dim_);
  for (size_t r = 0; r < routers; ++r) {
    const int64_t* ids = train_topk.data() + (r * n_train / routers) * topk_width;
    std::fill(v.begin(), v.end(), 0.0);
    size_t m = 0;
    for (size_t j = 0; j < topk_width; ++j) {
      if (ids[j] < 0) continue;
      const float* k = key(static_cast<uint32_t>(ids[j]));
      for (size_t c = 0; c < dim_; ++c) v[c] += k[c] - mean[c];
      if (m < e) router_keys_[r * e + m++] = static_cast<uint32_t>(ids[j]);
    }
    double norm = 0;
    for (double x : v) norm += x * x;
    const double inv = norm > 0 ? 1.0 / std::sqrt(norm) : 0.0;
    for (size_t c = 0; c < dim_; ++c) router_vecs_[r * dim_ + c] = static_cast<float>(v[c] * inv);
  }
}

absl::Status AttentionGraphIndex::SetRouters(ConstMatrixView train_queries,
                                             std::span<const int64_t> train_topk,
                                             size_t topk_width) {
  router_vecs_.clear();
  router_keys_.clear();
  const size_t n_train = train_queries.rows();
  if (options_.routers == 0 || n_train == 0) return absl::OkStatus();
  KVR_RETURN_IF_ERROR(ValidateFinite(train_queries, dim_, "train_queries"));
  if (topk_width == 0 || train_topk.size() != n_train * topk_width) {
    return absl::InvalidArgumentError(absl::StrCat("train_topk has ", train_topk.size(),
                                                   " ids, want train_queries rows ", n_train,
                                                   " x topk_width ", topk_width));
  }
  const size_t routers = std::min({static_cast<size_t>(options_.routers), n_train,
                                   n_ / kKeysPerRouter});
  if (routers == 0) return absl::OkStatus();
  const size_t e = static_cast<size_t>(options_.router_entries);
  router_vecs_.resize(routers * dim_);
  router_keys_.assign(routers * e, kNone);
  for (size_t r = 0; r < routers; ++r) {
    // Evenly spaced over the training queries (prefill positions).
    const size_t q = r * n_train / routers;
    const float* src = train_queries.row(q);
    float norm = 0;
    for (size_t j = 0; j < dim_; ++j) norm += src[j] * src[j];
    const float inv = norm > 0 ? 1.0f / std::sqrt(norm) : 0.0f;
    for (size_t j = 0; j < dim_; ++j) router_vecs_[r * dim_ + j] = src[j] * inv;
    const int64_t* row = train_topk.data() + q * topk_width;
    size_t m = 0;
    for (size_t j = 0; j < topk_width && m < e; ++j) {
      if (row[j] < 0) continue;
      if (row[j] >= static_cast<int64_t>(n_)) {
        return absl::InvalidArgumentError(
            absl::StrCat("train_topk id ", row[j], " >= index size ", n_));
      }
      router_keys_[r * e + m++] = static_cast<uint32_t>(row[j]);
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<AttentionGraphIndex>> AttentionGraphIndex::BuildFromQueries(
    ConstMatrixView keys, ConstMatrixView train_queries, int train_k,
    const AttentionGraphOptions& options, ThreadPool* pool) {
  if (train_k < 1) {
    return absl::InvalidArgumentError(absl::StrCat("train_k=", train_k, " must be >= 1"));
  }
  // The training set prepared as the worker prepares it (common/train_topk.h):
  // the exact top-k of a stratified sample of at most 16384 queries.
  const TrainingTopKOptions sampling;
  const size_t k = std::min<size_t>(static_cast<size_t>(train_k), keys.rows());
  const size_t m = TrainingQueryCount(train_queries.rows(), sampling);
  std::vector<int64_t> topk(m * k);
  std::vector<float> scores(m * k);
  std::vector<size_t> sample;
  if (k > 0 && m > 0) {
    KVR_RETURN_IF_ERROR(TrainingTopK(keys, train_queries, static_cast<int>(k), sampling, pool,
                                     topk, scores, &sample));
  }
  KVR_ASSIGN_OR_RETURN(auto index, Build(keys, topk, k, options, pool));
  if (m == train_queries.rows()) {
    KVR_RETURN_IF_ERROR(index->SetRouters(train_queries, topk, k));
  } else {
    Matrix sampled(m, train_queries.cols());
    for (size_t i = 0; i < m; ++i) {
      std::copy_n(train_queries.row(sample[i]), train_queries.cols(), sampled.row(i));
    }
    KVR_RETURN_IF_ERROR(index->SetRouters(sampled.view(), topk, k));
  }
  return index;
}

}  // namespace kvr::index
