// Shard → retrieval-node placement: a pure function of the node set.
//
// A sequence's KV cache is sharded by ShardKey = (sequence id, layer, kv head,
// chunk index); a chunk is a contiguous token range of `chunk_tokens` tokens.
// Placement maps each shard to R distinct nodes by highest-random-weight
// (rendezvous) hashing: every node gets the weight Mix64(node_hash ^
// shard_hash) and the R heaviest nodes own the shard, heaviest (the primary)
// first. Consequences, all tested:
//   * the result depends only on the set of node ids, not on their order, the
//     process, the build or the machine (the hashes are written out here, not
//     std::hash);
//   * adding a node moves only the shards the new node now wins (~1/(N+1) of
//     them); removing a node moves only the shards it held;
//   * with R replicas, a membership change alters only the replica lists that
//     contain the changed node (the others keep their order).
// A Placement is immutable; when the live node set changes, build a new one.
// All const methods are thread-safe.
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/string_view.h"
#include "common/status.h"

namespace kvr::placement {

// ---------------------------------------------------------------------------
// Stable hashing. These functions are part of the wire/deployment contract:
// every worker and node must compute the same values, so they never change
// (test vectors in tests/unit/placement_test.cc pin them).
// ---------------------------------------------------------------------------

// The SplitMix64 finalizer (Steele, Lea, Flood 2014; the output function of
// Java's SplittableRandom): a bijection on 64-bit words with full avalanche.
// Mix64(0x9e3779b97f4a7c15) == 0xe220a8397b1dcdaf (SplitMix64 seeded with 0).
constexpr uint64_t Mix64(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebull;
  x ^= x >> 31;
  return x;
}

// Folds one 64-bit word into a running hash: Mix64((h ^ word) + kGamma), with
// kGamma = 0x9e3779b97f4a7c15 (the SplitMix64 increment) so a zero state and a
// zero word do not stay zero.
constexpr uint64_t HashAbsorb(uint64_t h, uint64_t word) {
  return Mix64((h ^ word) + 0x9e3779b97f4a7c15ull);
}

// Hash of a node id: seeded with the byte length, then each 8-byte block of
// the id read little-endian (the last block zero-padded) is absorbed in order.
uint64_t HashNodeId(absl::string_view id);

// One KV shard. The fields are absorbed in this order: sequence_id, then
// (layer << 32 | kv_head), then chunk, starting from kShardSeed.
struct ShardKey {
  uint64_t sequence_id = 0;
  uint32_t layer = 0;
  uint32_t kv_head = 0;
  uint32_t chunk = 0;

  static constexpr uint64_t kShardSeed = 0x6b76722d73686172ull;  // "kvr-shar"

  constexpr uint64_t Hash() const {
    uint64_t h = HashAbsorb(kShardSeed, sequence_id);
    h = HashAbsorb(h, (uint64_t{layer} << 32) | kv_head);
    return HashAbsorb(h, chunk);
  }

  friend bool operator==(const ShardKey&, const ShardKey&) = default;
  template <typename H>
  friend H AbslHashValue(H h, const ShardKey& k) {
    return H::combine(std::move(h), k.sequence_id, k.layer, k.kv_head, k.chunk);
  }
};

// Rendezvous weight of a node for a shard (larger wins).
constexpr uint64_t RendezvousWeight(uint64_t node_hash, uint64_t shard_hash) {
  return Mix64(node_hash ^ shard_hash);
}

// ---------------------------------------------------------------------------
// Chunking: chunk c holds tokens [c * chunk_tokens, (c + 1) * chunk_tokens).
// chunk_tokens must be > 0 (validated when the config is read; KVR_CHECK here).
// ---------------------------------------------------------------------------

inline constexpr uint64_t kDefaultChunkTokens = 16384;

// The chunk holding token `token_position` (0-based). KVR_CHECKs that the
// index fits in uint32_t.
uint32_t ChunkOf(uint64_t token_position, uint64_t chunk_tokens);

// Number of chunks covering `num_tokens` tokens (ceil; 0 for 0 tokens).
uint32_t ChunkCount(uint64_t num_tokens, uint64_t chunk_tokens);

// Half-open token range [begin, end).
struct TokenRange {
  uint64_t begin = 0;
  uint64_t end = 0;
  uint64_t size() const { return end - begin; }
  friend bool operator==(const TokenRange&, const TokenRange&) = default;
};

// Tokens of chunk `chunk`, clipped to the first `num_tokens` tokens of the
// sequence (the last chunk of a sequence is usually partial; a chunk wholly
// past num_tokens gives an empty range at num_tokens).
TokenRange ChunkTokenRange(uint32_t chunk, uint64_t chunk_tokens,
                           uint64_t num_tokens = std::numeric_limits<uint64_t>::max());

// ---------------------------------------------------------------------------
// Node list
// ---------------------------------------------------------------------------

struct NodeInfo {
  std::string id;       // stable name (e.g. a StatefulSet pod name); placement hashes this
  std::string address;  // "host:port" or "[v6]:port" to connect to
  friend bool operator==(const NodeInfo&, const NodeInfo&) = default;
};

// Parses "id=host:port,id=host:port,..." or "host:port,host:port,..." (the
// id is then the address); forms may be mixed. Whitespace around entries,
// ids and addresses is ignored. IPv6 hosts are bracketed: "[::1]:7000".
// Errors (InvalidArgument, naming the 1-based entry and its text): empty list,
// empty entry (",,", trailing ","), empty id, missing or empty host, missing
// port, non-numeric port, port outside [1, 65535], unbracketed IPv6 host.
// Duplicate ids are reported by Placement::Create.
absl::StatusOr<std::vector<NodeInfo>> ParseNodeList(absl::string_view spec);

// ---------------------------------------------------------------------------
// Per-layer request grouping
// ---------------------------------------------------------------------------

struct HeadChunk {
  uint32_t kv_head = 0;
  uint32_t chunk = 0;
  friend bool operator==(const HeadChunk&, const HeadChunk&) = default;
};

// The shards of one (sequence, layer) grouped by primary node, in CSR form:
// ForNode(i) lists the (kv_head, chunk) pairs node i owns, in the order they
// were given (heads outer, chunks inner). A decode step sends one request per
// node with a non-empty list. Reusing one LayerGroups across calls does not
// allocate once its buffers have grown to size.
class LayerGroups {
 public:
  size_t num_nodes() const { return offsets_.empty() ? 0 : offsets_.size() - 1; }
  std::span<const HeadChunk> ForNode(size_t node) const {
    return std::span<const HeadChunk>(shards_).subspan(offsets_[node],
                                                       offsets_[node + 1] - offsets_[node]);
  }
  // Nodes with at least one shard, i.e. requests to send.
  size_t num_requests() const;
  size_t num_shards() const { return shards_.size(); }

 private:
  friend class Placement;
  std::vector<HeadChunk> shards_;
  std::vector<size_t> offsets_;    // num_nodes + 1
  std::vector<uint32_t> primary_;  // scratch: primary node per input shard
};

// ---------------------------------------------------------------------------
// Placement
// ---------------------------------------------------------------------------

class Placement {
 public:
  // Errors (InvalidArgument): empty node list, empty or duplicate node id,
  // replicas outside [1, nodes.size()]. Node indices used by every method
  // below are positions in `nodes` as given (so they line up with the
  // caller's connection list); the results as ids do not depend on the order.
  static absl::StatusOr<Placement> Create(std::vector<NodeInfo> nodes, int replicas);

  size_t num_nodes() const { return nodes_.size(); }
  int replicas() const { return replicas_; }
  const std::vector<NodeInfo>& nodes() const { return nodes_; }
  const NodeInfo& node(size_t i) const { return nodes_[i]; }
  // Index of the node with this id, if present.
  std::optional<size_t> Find(absl::string_view id) const;

  // The replicas() nodes owning `key`, heaviest rendezvous weight first
  // (element 0 is the primary). Distinct. Allocates the result.
  std::vector<size_t> NodesFor(const ShardKey& key) const;
  // Same, into out[0 .. out.size()) for any 1 <= out.size() <= num_nodes()
  // (so callers may ask for more or fewer than replicas(), e.g. failover
  // candidates). Does not allocate.
  void NodesFor(const ShardKey& key, std::span<size_t> out) const;
  // NodesFor(key)[0], without allocating.
  size_t Primary(const ShardKey& key) const;

  // Groups the shards {sequence_id} x {layer} x kv_heads x chunks by primary
  // node into `*out` (overwritten; see LayerGroups).
  void GroupByPrimary(uint64_t sequence_id, uint32_t layer, std::span<const uint32_t> kv_heads,
                      std::span<const uint32_t> chunks, LayerGroups* out) const;
  LayerGroups GroupByPrimary(uint64_t sequence_id, uint32_t layer,
                             std::span<const uint32_t> kv_heads,
                             std::span<const uint32_t> chunks) const;

 private:
  Placement(std::vector<NodeInfo> nodes, std::vector<uint64_t> hashes, int replicas)
      : nodes_(std::move(nodes)), node_hashes_(std::move(hashes)), replicas_(replicas) {}

  // Strict "heavier than" on (weight, node hash, id): a total order, so ties
  // (astronomically rare) still resolve the same way on every machine.
  bool Heavier(size_t a, uint64_t weight_a, size_t b, uint64_t weight_b) const;

  std::vector<NodeInfo> nodes_;
  std::vector<uint64_t> node_hashes_;  // HashNodeId(nodes_[i].id)
  int replicas_ = 1;
};

}  // namespace kvr::placement
