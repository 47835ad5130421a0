// AttentionGraphIndex: the RetrievalAttention / RoarGraph-style index for
// out-of-distribution (attention) queries.
//
// Build input: the keys plus, for a set of training queries (the prefill
// queries, which the decode worker holds anyway), each query's exact top-t key
// ids. The query->key bipartite neighbourhoods are projected onto key->key
// edges (each query's best key links to the query's other neighbours),
// occlusion-pruned to out-degree `degree`, completed with reverse edges, and
// every key is linked in (searched from the entry point and connected) so all
// keys are reachable. Search is best-first from the entry point with beam L.
//
// Keys appended after build (Add) are linked in incrementally the same way.
// Search is const and thread-safe; Build uses the given pool.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <vector>

#include "common/scratch_pool.h"
#include "common/thread_pool.h"
#include "retrieval_node/index/index.h"

namespace kvr::index {

struct AttentionGraphOptions {
  int degree = 32;           // M: maximum out-degree of a key (plus one connectivity edge)
  int build_beam = 64;       // beam when Add links appended keys in
  // Beam when Build links in the keys no training query reached (most keys
  // of a head: 110K of 128K on the lowrank family). No decode query is
  // likely to want them, so a short search is enough: 16 instead of 64 halves
  // the build's CPU time at equal or better recall on the lowrank, topical
  // and positional families at 128K keys (docs/benchmarks.md §3.2; 32 was
  // worse on topical). [1, 65536]; blob version 3 stores it.
  int link_beam = 16;
  int default_beam = 128;    // L used by Search when SearchParams::beam == 0
  int entry_points = 16;     // keys every search starts from (most frequent in training top-k)
  float prune_alpha = 1.0f;  // occlusion: drop c if alpha * d(s, c) < d(p, c) for a kept s
  bool saturate = true;      // fill rows up to `degree` with the nearest pruned candidates
  // Each training query's best `pivots_per_query` keys each link to the
  // query's other top-k keys (RoarGraph uses 1: only the best key). 16, chosen
  // over all data families at 128K keys (docs/benchmarks.md §3): vs 4, +1.2
  // points recall@100 on topical and +6 to +9 on flat at equal keys scanned,
  // -0.5 on lowrank; ~1.3x the projection work.
  int pivots_per_query = 16;
  // Projection candidates are considered most frequent first (how many of
  // the pivot's training queries want them), nearest first among equals;
  // false: nearest first (RoarGraph).
  bool frequency_order = true;
  // Score keys from a bf16 copy during the graph walk (half the memory
  // traffic); the returned top-k are re-scored exactly in fp32 (those k
  // products count as distance computations too). Costs 2 bytes/key/dim.
  bool scan_bf16 = false;
  // Query routing: `routers` training queries (evenly spaced over the rows
  // given to Build, at most one per 128 keys), each remembering its best
  // `router_entries` keys; a search scores every router and starts from the
  // keys of the best `router_probe` routers as well as the fixed entry
  // points. Build derives a router's direction from its query's top-k keys
  // (their mean minus all keys' mean); SetRouters replaces that by the
  // queries themselves. They find the far keys a recency head also attends
  // to (content matches no entry point leads to: the positional family
  // plateaued at recall@100 0.91 without them, 0.97 with 1024 routers) and
  // halve the beam lowrank needs (docs/benchmarks.md §3.2). 0 routers: fixed
  // entry points only. [0, 65536].
  int routers = 1024;
  int router_probe = 4;
  int router_entries = 8;
  // The `recent_entries` most recent keys (highest positions; Add moves them
  // to the newest keys) also seed every search, beside the `entry_points`
  // heavy hitters: recency heads ("positional" data family) attend to the
  // newest keys, which no heavy hitter's neighbourhood leads to (recall@100
  // 0.00 without them at 128K keys, docs/benchmarks.md §3). [0, 1024], and
  // entry_points + recent_entries <= 1024.
  int recent_entries = 8;
};

// Checks option ranges; InvalidArgument names the field and its limits.
absl::Status ValidateGraphOptions(const AttentionGraphOptions& options);

class AttentionGraphIndex final : public KeyIndex {
 public:
  // Builds over `keys` (n x d, finite). `train_topk` is row-major
  // (train_topk.size() / topk_width rows of topk_width key ids, best first;
  // id -1 pads short rows). `pool` may be null (single thread).
  static absl::StatusOr<std::unique_ptr<AttentionGraphIndex>> Build(
      ConstMatrixView keys, std::span<const int64_t> train_topk, size_t topk_width,
      const AttentionGraphOptions& options, ThreadPool* pool);

  // Builds after computing each training query's exact top-`train_k` keys by a
  // flat scan (what the worker does during prefill), over TrainingTopK's
  // stratified sample of at most 16384 of the training queries
  // (common/train_topk.h; all of them when fewer).
  static absl::StatusOr<std::unique_ptr<AttentionGraphIndex>> BuildFromQueries(
      ConstMatrixView keys, ConstMatrixView train_queries, int train_k,
      const AttentionGraphOptions& options, ThreadPool* pool);

  static absl::StatusOr<std::unique_ptr<AttentionGraphIndex>> Deserialize(const OpenedBlob& blob);

  // Installs query routers (see AttentionGraphOptions::routers) from training
  // queries (rows x dim) and their top-k rows (as given to Build). A no-op
  // when options().routers == 0 or there are no training queries.
  absl::Status SetRouters(ConstMatrixView train_queries, std::span<const int64_t> train_topk,
                          size_t topk_width);

  IndexType type() const override { return IndexType::kGraph; }
  size_t dim() const override { return dim_; }
  size_t size() const override { return n_; }
  absl::Status Search(ConstMatrixView queries, const SearchParams& params,
                      std::span<int64_t> ids, std::span<float> scores,
                      SearchStats* stats = nullptr) const override;
  absl::Status Add(ConstMatrixView keys) override;
  size_t MemoryBytes() const override;
  absl::Status Serialize(std::vector<uint8_t>* out) const override;
  ConstMatrixView keys() const override { return ConstMatrixView(keys_.data(), n_, dim_); }

  ~AttentionGraphIndex() override;

  const AttentionGraphOptions& options() const { return options_; }
  // Out-neighbours of key `id`, the connectivity edge included (diagnostics).
  std::vector<uint32_t> neighbors(uint32_t id) const;
  // Heavy-hitter entry points, then the recent_count() recent keys.
  std::span<const uint32_t> entry_points() const { return entries_; }
  size_t recent_count() const { return recent_count_; }
  // What the last Build did, for benchmarks and diagnostics.
  struct BuildStats {
    double projection_seconds = 0;  // query->key neighbourhoods projected and pruned
    double reverse_seconds = 0;     // reverse edges merged and re-pruned
    double link_seconds = 0;        // keys no training query reached, linked in
    size_t keys_covered = 0;        // keys with projected edges (pivots or their targets)
    size_t keys_linked = 0;         // keys the connectivity pass had to link in
    int64_t link_distance_computations = 0;  // key-key distances its searches computed
    // CPU seconds the process spent during the build, all threads (a
    // loaded machine inflates wall time, much less this).
    double cpu_seconds = 0;
  };
  const BuildStats& build_stats() const { return build_stats_; }

  // Whether every key is reachable from the entry points (an invariant that
  // Build and Add keep; tests check it).
  bool AllReachable() const;

 private:
  struct Scratch;
  class ScratchLease;
  // A candidate edge target and its squared L2 distance to the edge's source.
  struct Cand {
    float dist;  // squared L2 to the row's source key
    uint32_t id;
    float rank = 0;  // consideration order, ascending (defaults to dist)
    bool operator<(const Cand& o) const { return rank < o.rank || (rank == o.rank && id < o.id); }
  };
  static Cand MakeCand(float dist, uint32_t id) { return {dist, id, dist}; }
  enum class Metric { kIp, kL2 };

  AttentionGraphIndex(size_t dim, const AttentionGraphOptions& options);

  const float* key(uint32_t id) const { return keys_.data() + static_cast<size_t>(id) * dim_; }
  uint32_t* row(uint32_t id) { return adjacency_.data() + static_cast<size_t>(id) * stride_; }
  const uint32_t* row(uint32_t id) const {
    return adjacency_.data() + static_cast<size_t>(id) * stride_;
  }
  std::span<const uint32_t> RegularNeighbors(uint32_t id) const;
  float L2(uint32_t a, uint32_t b) const;

  void RefreshBf16(size_t from, size_t to);  // (re)converts keys_bf16_ rows [from, to)
  template <Metric kMetric>
  void SearchOne(const float* q, size_t beam_width, Scratch* s, int64_t* distance_computations,
                 std::span<const uint32_t> extra_seeds = {}) const;

  // Routers without the training queries (Build gets only their top-k): a
  // router's direction is its query's top-k keys' mean minus all keys' mean.
  void RoutersFromTopK(std::span<const int64_t> train_topk, size_t topk_width);
  void BuildGraph(std::span<const int64_t> train_topk, size_t topk_width, ThreadPool* pool);
  void ChooseEntries(std::span<const uint32_t> in_topk_count);
  // Replaces the trailing recent entries by the newest keys (after they are
  // linked in: an entry must have out-edges to lead anywhere).
  void RefreshRecentEntries();
  // `out_dist` (optional) receives the squared L2 of each kept edge.
  void Prune(uint32_t source, std::vector<Cand>* cands, std::vector<uint32_t>* out,
             std::vector<float>* out_dist = nullptr) const;
  void SetNeighbors(uint32_t id, std::span<const uint32_t> nbrs);
  void AddReverseEdges(ThreadPool* pool);
  std::vector<uint8_t> Reachable() const;
  // Links key `id` in, given candidate neighbours from a search: ChooseLinks
  // picks its out-edges (const; safe in parallel), ApplyLinks writes them and
  // offers each neighbour the reverse edge; if none keeps it, a free
  // connectivity slot of a candidate takes it so the key is reachable.
  void ChooseLinks(uint32_t id, std::vector<Cand>* cands, std::vector<uint32_t>* out,
                   std::vector<float>* out_dist) const;
  void ApplyLinks(uint32_t id, std::span<const uint32_t> out, std::span<const float> out_dist,
                  std::span<const Cand> cands);
  // Squared lengths of row `id`'s regular edges (n x degree, computed on
  // first use), kept only while keys are being linked in: the reverse-edge
  // offer replaces a full row's farthest edge without re-measuring the row.
  float* EdgeLengths(uint32_t id);
  void BeginLinking(size_t n);  // sizes the edge-length cache for n keys, every row unknown
  void EndLinking();    // frees it
  void RefreshNorms(size_t from, size_t to);  // (re)computes sq_norms_ rows [from, to)
  bool TrySetRepairEdge(uint32_t source, uint32_t target);
  // Links in every key the entry points do not reach, each found by a
  // search of width `beam`; returns how many keys it linked.
  size_t LinkUnreachable(ThreadPool* pool, size_t beam);
  // Last resort of LinkUnreachable: makes every unreachable key reachable by
  // splicing it into the entry point's connectivity slot chain (the entry's
  // old connectivity target stays reachable through the spliced group).
  // O(n) plus the group sizes; never fails.
  void SpliceUnreachable();
  size_t NearestLinkedByPosition(uint32_t id, std::span<const uint8_t> linked,
                                 uint32_t* out) const;

  size_t dim_;
  size_t n_ = 0;
  AttentionGraphOptions options_;
  size_t stride_;                    // degree + 1: regular edges, then the connectivity edge
  std::vector<float> keys_;          // n x dim
  std::vector<uint16_t> keys_bf16_;  // n x dim when options_.scan_bf16, else empty
  std::vector<uint32_t> adjacency_;  // n x stride_; regular edges kNone-terminated
  std::vector<uint32_t> entries_;    // entry points: heavy hitters best first, then recent keys
  size_t recent_count_ = 0;          // how many of entries_ (at its end) are recent keys
  std::vector<float> sq_norms_;      // n: ||key||^2 (L2 searches score by dot products)
  std::vector<uint16_t> walk_bf16_;  // n x dim bf16 keys while Build links keys in, else empty
  std::vector<float> edge_len_;      // n x degree while linking (see EdgeLengths), else empty
  std::vector<uint8_t> edge_len_known_;  // n while linking: row's edge_len_ is valid
  size_t repair_cursor_ = 0;         // where ApplyLinks' last-resort slot scan resumes
  std::vector<float> router_vecs_;   // routers x dim, unit norm
  std::vector<uint32_t> router_keys_;  // routers x router_entries, kNone-padded
  std::unique_ptr<ScratchPool<Scratch>> scratch_;
  BuildStats build_stats_;
};

}  // namespace kvr::index
