// services/infra/placement: stable hashes (fixed vectors), rendezvous placement
// against a brute-force oracle, balance and minimal movement with numeric
// bounds, request grouping, chunk arithmetic and node-list parsing.
#include "services/infra/placement/placement.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <set>
#include <string>
#include <vector>

namespace kvr::placement {
namespace {

std::vector<NodeInfo> MakeNodes(int n, int first = 0) {
  std::vector<NodeInfo> nodes;
  for (int i = first; i < first + n; ++i) {
    nodes.push_back({"kvr-node-" + std::to_string(i), "10.0.0." + std::to_string(i) + ":7000"});
  }
  return nodes;
}

Placement MustCreate(std::vector<NodeInfo> nodes, int replicas) {
  absl::StatusOr<Placement> p = Placement::Create(std::move(nodes), replicas);
  KVR_CHECK_MSG(p.ok(), std::string(p.status().message()).c_str());
  return *std::move(p);
}

// Uniformly random keys from raw mt19937_64 bits (the engine is specified by
// the standard, so the key set is the same everywhere).
std::vector<ShardKey> RandomKeys(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<ShardKey> keys(n);
  for (ShardKey& k : keys) {
    k.sequence_id = rng();
    const uint64_t r = rng();
    k.layer = static_cast<uint32_t>(r & 0xff);
    k.kv_head = static_cast<uint32_t>((r >> 8) & 0xff);
    k.chunk = static_cast<uint32_t>(r >> 32);
  }
  return keys;
}

// The shape a real deployment produces: small consecutive integers.
// 16 sequences x 32 layers x 8 kv heads x 25 chunks = 102400 keys.
std::vector<ShardKey> StructuredKeys() {
  std::vector<ShardKey> keys;
  for (uint64_t s = 0; s < 16; ++s)
    for (uint32_t l = 0; l < 32; ++l)
      for (uint32_t h = 0; h < 8; ++h)
        for (uint32_t c = 0; c < 25; ++c) keys.push_back({s, l, h, c});
  return keys;
}

std::vector<std::string> IdsFor(const Placement& p, const ShardKey& k) {
  std::vector<std::string> ids;
  for (size_t i : p.NodesFor(k)) ids.push_back(p.node(i).id);
  return ids;
}

// Brute-force oracle: all nodes sorted by rendezvous weight, heaviest first.
std::vector<std::string> OracleRanking(const std::vector<NodeInfo>& nodes, const ShardKey& k) {
  std::vector<std::pair<uint64_t, std::string>> w;
  for (const NodeInfo& n : nodes) w.push_back({RendezvousWeight(HashNodeId(n.id), k.Hash()), n.id});
  std::sort(w.begin(), w.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  std::vector<std::string> ids;
  for (auto& [weight, id] : w) ids.push_back(id);
  return ids;
}

// ---------------------------------------------------------------------------
// Hash test vectors. These pin the deployment contract: if one changes, every
// stored shard would move. The expected values were computed by an
// independent Python reimplementation of the documented scheme.
// ---------------------------------------------------------------------------

TEST(PlacementHashTest, Mix64MatchesSplitMix64Reference) {
  // SplitMix64 seeded with 0: outputs are Mix64(k * 0x9e3779b97f4a7c15).
  EXPECT_EQ(Mix64(0x9e3779b97f4a7c15ull), 0xe220a8397b1dcdafull);
  EXPECT_EQ(Mix64(0x3c6ef372fe94f82aull), 0x6e789e6aa1b965f4ull);
  static_assert(Mix64(0x9e3779b97f4a7c15ull) == 0xe220a8397b1dcdafull);
}

TEST(PlacementHashTest, ShardKeyVectors) {
  static_assert(ShardKey{0, 0, 0, 0}.Hash() == 0xa9f6b816a6eab83eull);
  EXPECT_EQ((ShardKey{0, 0, 0, 0}.Hash()), 0xa9f6b816a6eab83eull);
  EXPECT_EQ((ShardKey{1, 0, 0, 0}.Hash()), 0x3cc0c159596b4822ull);
  EXPECT_EQ((ShardKey{0, 1, 0, 0}.Hash()), 0x74c6a12f007f48c4ull);
  EXPECT_EQ((ShardKey{0, 0, 1, 0}.Hash()), 0x4796a1c8e5873f15ull);
  EXPECT_EQ((ShardKey{0, 0, 0, 1}.Hash()), 0x9e4064d4dc790b90ull);
  EXPECT_EQ((ShardKey{123456789012345ull, 31, 7, 42}.Hash()), 0xbe0bdd40fa666497ull);
  EXPECT_EQ((ShardKey{~0ull, ~0u, ~0u, ~0u}.Hash()), 0x413909b28ee3d57dull);
}

TEST(PlacementHashTest, NodeIdVectors) {
  EXPECT_EQ(HashNodeId(""), 0xe220a8397b1dcdafull);
  EXPECT_EQ(HashNodeId("a"), 0x5e025f9ade9eaf3eull);
  EXPECT_EQ(HashNodeId("exactly8"), 0x79e7bd8a7e0d03cfull);
  EXPECT_EQ(HashNodeId("kvr-node-0"), 0x2e1e696b4cff218aull);
  EXPECT_EQ(HashNodeId("kvr-node-1"), 0xa45f6b7b6a48fd6dull);
  EXPECT_EQ(HashNodeId("10.0.0.1:7000"), 0xd241e82b3d232c24ull);
  EXPECT_EQ(RendezvousWeight(HashNodeId("kvr-node-0"), ShardKey{}.Hash()), 0x14aaa972390f7611ull);
  // The zero padding of the last block is disambiguated by the length seed.
  EXPECT_NE(HashNodeId("a"), HashNodeId(std::string("a\0", 2)));
}

TEST(PlacementTest, GoldenRankings) {
  // Same Python oracle; 5 nodes kvr-node-0..4, R = 3.
  const Placement p = MustCreate(MakeNodes(5), 3);
  EXPECT_EQ(p.NodesFor({0, 0, 0, 0}), (std::vector<size_t>{1, 3, 4}));
  EXPECT_EQ(p.NodesFor({7, 3, 1, 2}), (std::vector<size_t>{1, 2, 0}));
  EXPECT_EQ(p.NodesFor({123456789012345ull, 31, 7, 42}), (std::vector<size_t>{2, 0, 4}));
  EXPECT_EQ(p.NodesFor({42, 0, 5, 9}), (std::vector<size_t>{4, 1, 0}));
}

// ---------------------------------------------------------------------------
// Placement basics
// ---------------------------------------------------------------------------

TEST(PlacementTest, MatchesBruteForceOracleForEveryReplicaCount) {
  const std::vector<NodeInfo> nodes = MakeNodes(7);
  const std::vector<ShardKey> keys = RandomKeys(2000, 1);
  for (int r = 1; r <= 7; ++r) {
    const Placement p = MustCreate(nodes, r);
    for (const ShardKey& k : keys) {
      const std::vector<size_t> got = p.NodesFor(k);
      ASSERT_EQ(got.size(), static_cast<size_t>(r));
      EXPECT_EQ(std::set<size_t>(got.begin(), got.end()).size(), got.size()) << "not distinct";
      std::vector<std::string> want = OracleRanking(nodes, k);
      want.resize(r);
      ASSERT_EQ(IdsFor(p, k), want);
      ASSERT_EQ(p.Primary(k), got[0]);
    }
  }
}

TEST(PlacementTest, DeterministicAndIndependentOfNodeOrder) {
  const std::vector<NodeInfo> nodes = MakeNodes(10);
  const Placement base = MustCreate(nodes, 3);
  const Placement again = MustCreate(nodes, 3);
  const std::vector<ShardKey> keys = RandomKeys(10000, 2);
  std::mt19937_64 rng(3);
  for (int trial = 0; trial < 5; ++trial) {
    std::vector<NodeInfo> shuffled = nodes;
    std::shuffle(shuffled.begin(), shuffled.end(), rng);
    const Placement p = MustCreate(shuffled, 3);
    for (const ShardKey& k : keys) {
      ASSERT_EQ(IdsFor(p, k), IdsFor(base, k));
      ASSERT_EQ(base.NodesFor(k), again.NodesFor(k));
    }
  }
  // Only the id matters: the same ids at other addresses place identically.
  std::vector<NodeInfo> moved = nodes;
  for (NodeInfo& n : moved) n.address = "elsewhere:1";
  const Placement p = MustCreate(moved, 3);
  for (const ShardKey& k : keys) ASSERT_EQ(p.NodesFor(k), base.NodesFor(k));
}

TEST(PlacementTest, SpanOverloadGivesRankPrefixes) {
  const Placement p = MustCreate(MakeNodes(8), 2);
  for (const ShardKey& k : RandomKeys(1000, 4)) {
    std::vector<size_t> all(8);
    p.NodesFor(k, std::span<size_t>(all));
    for (size_t m = 1; m <= 8; ++m) {
      std::vector<size_t> some(m);
      p.NodesFor(k, std::span<size_t>(some));
      ASSERT_TRUE(std::equal(some.begin(), some.end(), all.begin()));
    }
    ASSERT_EQ(p.NodesFor(k), std::vector<size_t>(all.begin(), all.begin() + 2));
  }
}

TEST(PlacementTest, SingleNodeOwnsEverything) {
  const Placement p = MustCreate(MakeNodes(1), 1);
  for (const ShardKey& k : RandomKeys(100, 5)) EXPECT_EQ(p.Primary(k), 0u);
}

// ---------------------------------------------------------------------------
// Balance: 10 nodes, ~100k shards. Expected per-node count E = n/10 with
// binomial sd sqrt(n * 0.1 * 0.9) ~ 95, so the +-10% bound (+-1000) is > 10 sd
// away: only a biased hash fails it. The chi-square (9 dof) bound 27.88 is
// the p = 0.001 critical value.
// ---------------------------------------------------------------------------

struct Balance {
  double max_rel_dev = 0;
  double chi2 = 0;
};

Balance MeasurePrimaryBalance(const Placement& p, const std::vector<ShardKey>& keys) {
  std::vector<size_t> count(p.num_nodes(), 0);
  for (const ShardKey& k : keys) ++count[p.Primary(k)];
  const double expected = static_cast<double>(keys.size()) / p.num_nodes();
  Balance b;
  for (size_t c : count) {
    const double d = static_cast<double>(c) - expected;
    b.max_rel_dev = std::max(b.max_rel_dev, std::abs(d) / expected);
    b.chi2 += d * d / expected;
  }
  return b;
}

TEST(PlacementBalanceTest, RandomKeysOverTenNodes) {
  const Placement p = MustCreate(MakeNodes(10), 1);
  const Balance b = MeasurePrimaryBalance(p, RandomKeys(100000, 6));
  std::printf("balance random 100k/10 nodes: max |share - 1/10| / (1/10) = %.4f, chi2(9) = %.2f\n",
              b.max_rel_dev, b.chi2);
  EXPECT_LT(b.max_rel_dev, 0.10);
  EXPECT_LT(b.chi2, 27.88);
}

TEST(PlacementBalanceTest, StructuredKeysOverTenNodes) {
  const Placement p = MustCreate(MakeNodes(10), 1);
  const Balance b = MeasurePrimaryBalance(p, StructuredKeys());
  std::printf("balance structured 102400/10 nodes: max rel dev = %.4f, chi2(9) = %.2f\n",
              b.max_rel_dev, b.chi2);
  EXPECT_LT(b.max_rel_dev, 0.10);
  EXPECT_LT(b.chi2, 27.88);
}

TEST(PlacementBalanceTest, ReplicaLoadOverTenNodes) {
  // With R = 3 every node should hold 3/10 of the replicas.
  const Placement p = MustCreate(MakeNodes(10), 3);
  const std::vector<ShardKey> keys = RandomKeys(100000, 7);
  std::vector<size_t> count(10, 0);
  for (const ShardKey& k : keys)
    for (size_t i : p.NodesFor(k)) ++count[i];
  const double expected = 3.0 * keys.size() / 10;
  double max_rel = 0;
  for (size_t c : count) max_rel = std::max(max_rel, std::abs(c - expected) / expected);
  std::printf("replica load R=3 100k/10 nodes: max rel dev = %.4f\n", max_rel);
  EXPECT_LT(max_rel, 0.10);
}

// ---------------------------------------------------------------------------
// Minimal movement
// ---------------------------------------------------------------------------

TEST(PlacementMovementTest, AddingANodeMovesOnlyShardsToIt) {
  const Placement before = MustCreate(MakeNodes(10), 1);
  std::vector<NodeInfo> grown = MakeNodes(10);
  grown.insert(grown.begin() + 4, NodeInfo{"kvr-node-10", "10.0.0.10:7000"});  // not at the end
  const Placement after = MustCreate(grown, 1);
  const std::vector<ShardKey> keys = RandomKeys(100000, 8);
  size_t moved = 0;
  size_t moved_elsewhere = 0;
  for (const ShardKey& k : keys) {
    const std::string& old_id = before.node(before.Primary(k)).id;
    const std::string& new_id = after.node(after.Primary(k)).id;
    if (old_id != new_id) {
      ++moved;
      if (new_id != "kvr-node-10") ++moved_elsewhere;
    }
  }
  const double frac = static_cast<double>(moved) / keys.size();
  std::printf("add 11th node: moved %zu of %zu = %.4f (ideal 1/11 = %.4f, rel err %.3f)\n", moved,
              keys.size(), frac, 1.0 / 11, std::abs(frac * 11 - 1));
  EXPECT_EQ(moved_elsewhere, 0u);
  EXPECT_NEAR(frac, 1.0 / 11, 0.2 / 11);
}

TEST(PlacementMovementTest, RemovingANodeMovesOnlyItsShards) {
  const std::vector<NodeInfo> nodes = MakeNodes(10);
  const Placement before = MustCreate(nodes, 1);
  std::vector<NodeInfo> shrunk = nodes;
  shrunk.erase(shrunk.begin() + 3);  // kvr-node-3
  const Placement after = MustCreate(shrunk, 1);
  const std::vector<ShardKey> keys = RandomKeys(100000, 9);
  size_t moved = 0;
  size_t owned_by_removed = 0;
  for (const ShardKey& k : keys) {
    const std::string& old_id = before.node(before.Primary(k)).id;
    const std::string& new_id = after.node(after.Primary(k)).id;
    if (old_id == "kvr-node-3") ++owned_by_removed;
    if (old_id != new_id) {
      ++moved;
      ASSERT_EQ(old_id, "kvr-node-3") << "a shard of a surviving node moved";
    }
  }
  std::printf("remove 1 of 10 nodes: moved %zu of %zu = %.4f (the removed node held %zu)\n", moved,
              keys.size(), static_cast<double>(moved) / keys.size(), owned_by_removed);
  EXPECT_EQ(moved, owned_by_removed);
  EXPECT_NEAR(static_cast<double>(moved) / keys.size(), 0.1, 0.01);
}

TEST(PlacementMovementTest, ReplicaSetsChangeOnlyWhereTheNodeWas) {
  const std::vector<NodeInfo> nodes = MakeNodes(10);
  const Placement before = MustCreate(nodes, 3);
  std::vector<NodeInfo> shrunk = nodes;
  shrunk.erase(shrunk.begin() + 6);  // kvr-node-6
  const Placement after = MustCreate(shrunk, 3);
  const std::vector<ShardKey> keys = RandomKeys(100000, 10);
  size_t changed = 0;
  for (const ShardKey& k : keys) {
    std::vector<size_t> top4(4);
    before.NodesFor(k, std::span<size_t>(top4));
    std::vector<std::string> old_ids;
    for (size_t i : top4) old_ids.push_back(before.node(i).id);
    const std::vector<std::string> new_ids = IdsFor(after, k);
    const auto where = std::find(old_ids.begin(), old_ids.begin() + 3, "kvr-node-6");
    if (where == old_ids.begin() + 3) {
      // Sets without the removed node keep their members and their order.
      ASSERT_EQ(new_ids, std::vector<std::string>(old_ids.begin(), old_ids.begin() + 3));
    } else {
      // The removed node drops out; the old 4th-ranked node joins at the end.
      ++changed;
      std::vector<std::string> want = old_ids;
      want.erase(want.begin() + (where - old_ids.begin()));
      ASSERT_EQ(new_ids, want);
    }
  }
  std::printf("R=3, remove 1 of 10 nodes: %zu of %zu replica sets changed = %.4f (ideal 3/10)\n",
              changed, keys.size(), static_cast<double>(changed) / keys.size());
  EXPECT_NEAR(static_cast<double>(changed) / keys.size(), 0.3, 0.03);
}

TEST(PlacementMovementTest, ReplicaSetsGainOnlyTheNewNode) {
  const Placement before = MustCreate(MakeNodes(10), 3);
  const Placement after = MustCreate(MakeNodes(11), 3);
  for (const ShardKey& k : RandomKeys(20000, 11)) {
    std::vector<std::string> old_ids = IdsFor(before, k);
    std::vector<std::string> new_ids = IdsFor(after, k);
    const auto where = std::find(new_ids.begin(), new_ids.end(), "kvr-node-10");
    if (where == new_ids.end()) {
      ASSERT_EQ(new_ids, old_ids);
    } else {
      old_ids.insert(old_ids.begin() + (where - new_ids.begin()), "kvr-node-10");
      old_ids.pop_back();
      ASSERT_EQ(new_ids, old_ids);
    }
  }
}

// ---------------------------------------------------------------------------
// Create errors
// ---------------------------------------------------------------------------

TEST(PlacementTest, CreateRejectsBadInput) {
  auto msg = [](const absl::StatusOr<Placement>& p) { return std::string(p.status().message()); };
  absl::StatusOr<Placement> p = Placement::Create({}, 1);
  ASSERT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(msg(p).find("nodes: empty"), std::string::npos) << msg(p);

  p = Placement::Create(MakeNodes(3), 0);
  ASSERT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(msg(p).find("replicas: 0 outside [1, 3]"), std::string::npos) << msg(p);
  p = Placement::Create(MakeNodes(3), 4);
  ASSERT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(msg(p).find("replicas: 4 outside [1, 3]"), std::string::npos) << msg(p);

  p = Placement::Create({{"a", "h:1"}, {"b", "h:2"}, {"a", "h:3"}}, 1);
  ASSERT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(msg(p).find("duplicate id \"a\" at index 0 and 2"), std::string::npos) << msg(p);

  p = Placement::Create({{"a", "h:1"}, {"", "h:2"}}, 1);
  ASSERT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(msg(p).find("nodes[1]: empty id"), std::string::npos) << msg(p);

  p = Placement::Create(MakeNodes(3), 3);
  ASSERT_TRUE(p.ok());
  EXPECT_EQ(p->Find("kvr-node-2"), std::optional<size_t>(2));
  EXPECT_EQ(p->Find("nope"), std::nullopt);
}

// ---------------------------------------------------------------------------
// Grouping a layer's shards by primary node
// ---------------------------------------------------------------------------

TEST(PlacementGroupTest, OneRequestPerNodeCoveringEveryShardOnce) {
  const Placement p = MustCreate(MakeNodes(4), 2);
  const std::vector<uint32_t> heads = {0, 1, 2, 3, 4, 5, 6, 7};
  const std::vector<uint32_t> chunks = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9};
  LayerGroups groups;
  for (uint32_t layer = 0; layer < 4; ++layer) {
    p.GroupByPrimary(/*sequence_id=*/99, layer, heads, chunks, &groups);  // reused buffers
    ASSERT_EQ(groups.num_nodes(), 4u);
    ASSERT_EQ(groups.num_shards(), heads.size() * chunks.size());
    std::set<std::pair<uint32_t, uint32_t>> seen;
    size_t nonempty = 0;
    for (size_t node = 0; node < 4; ++node) {
      const std::span<const HeadChunk> mine = groups.ForNode(node);
      nonempty += mine.empty() ? 0 : 1;
      for (size_t i = 0; i < mine.size(); ++i) {
        EXPECT_EQ(p.Primary({99, layer, mine[i].kv_head, mine[i].chunk}), node);
        EXPECT_TRUE(seen.insert({mine[i].kv_head, mine[i].chunk}).second) << "listed twice";
        if (i > 0) {  // input order kept: heads outer, chunks inner
          EXPECT_TRUE(std::pair(mine[i - 1].kv_head, mine[i - 1].chunk) <
                      std::pair(mine[i].kv_head, mine[i].chunk));
        }
      }
    }
    EXPECT_EQ(seen.size(), heads.size() * chunks.size());
    EXPECT_EQ(groups.num_requests(), nonempty);
    EXPECT_EQ(nonempty, 4u);  // 80 shards over 4 nodes: each node gets some
    const LayerGroups fresh = p.GroupByPrimary(99, layer, heads, chunks);
    for (size_t node = 0; node < 4; ++node) {
      ASSERT_TRUE(std::ranges::equal(fresh.ForNode(node), groups.ForNode(node)));
    }
  }
}

TEST(PlacementGroupTest, EmptyInputsGiveNoRequests) {
  const Placement p = MustCreate(MakeNodes(3), 1);
  const std::vector<uint32_t> heads = {0, 1};
  const LayerGroups g = p.GroupByPrimary(1, 0, heads, {});
  EXPECT_EQ(g.num_nodes(), 3u);
  EXPECT_EQ(g.num_shards(), 0u);
  EXPECT_EQ(g.num_requests(), 0u);
}

// ---------------------------------------------------------------------------
// Chunking
// ---------------------------------------------------------------------------

TEST(PlacementChunkTest, ChunkArithmetic) {
  constexpr uint64_t kC = kDefaultChunkTokens;
  EXPECT_EQ(ChunkOf(0, kC), 0u);
  EXPECT_EQ(ChunkOf(kC - 1, kC), 0u);
  EXPECT_EQ(ChunkOf(kC, kC), 1u);
  EXPECT_EQ(ChunkOf(5 * kC + 7, kC), 5u);
  EXPECT_EQ(ChunkCount(0, kC), 0u);
  EXPECT_EQ(ChunkCount(1, kC), 1u);
  EXPECT_EQ(ChunkCount(kC, kC), 1u);
  EXPECT_EQ(ChunkCount(kC + 1, kC), 2u);
  EXPECT_EQ(ChunkTokenRange(1, kC), (TokenRange{kC, 2 * kC}));
  EXPECT_EQ(ChunkTokenRange(1, kC, 20000), (TokenRange{kC, 20000}));
  EXPECT_EQ(ChunkTokenRange(3, kC, 20000), (TokenRange{20000, 20000}));
  EXPECT_EQ(ChunkTokenRange(0xffffffffu, 1ull << 40).end, ~0ull);  // saturates
  EXPECT_EQ(ChunkTokenRange(1, 1ull << 63), (TokenRange{1ull << 63, ~0ull}));

  std::mt19937_64 rng(12);
  for (int i = 0; i < 10000; ++i) {
    const uint64_t chunk_tokens = 1 + rng() % 100000;
    const uint64_t pos = rng() % (chunk_tokens << 20);
    const TokenRange r = ChunkTokenRange(ChunkOf(pos, chunk_tokens), chunk_tokens);
    ASSERT_LE(r.begin, pos);
    ASSERT_LT(pos, r.end);
    ASSERT_EQ(r.size(), chunk_tokens);
    // Chunks tile [0, n) exactly.
    const uint64_t n = pos + 1;
    const uint32_t count = ChunkCount(n, chunk_tokens);
    ASSERT_EQ(ChunkTokenRange(count - 1, chunk_tokens, n).end, n);
    ASSERT_EQ(ChunkTokenRange(count - 1, chunk_tokens, n).begin, (count - 1) * chunk_tokens);
  }
}

// ---------------------------------------------------------------------------
// Node-list parsing
// ---------------------------------------------------------------------------

TEST(PlacementParseTest, AcceptsBothFormsAndMixes) {
  absl::StatusOr<std::vector<NodeInfo>> got =
      ParseNodeList(" kvr-node-0=10.0.0.1:7000 , 10.0.0.2:7001,n2 = [::1]:65535,h:1");
  ASSERT_TRUE(got.ok()) << got.status();
  const std::vector<NodeInfo> want = {{"kvr-node-0", "10.0.0.1:7000"},
                                      {"10.0.0.2:7001", "10.0.0.2:7001"},
                                      {"n2", "[::1]:65535"},
                                      {"h:1", "h:1"}};
  EXPECT_EQ(*got, want);
  // Parsed lists feed Create directly.
  EXPECT_TRUE(Placement::Create(*std::move(got), 2).ok());
}

TEST(PlacementParseTest, ErrorsNameTheOffendingEntry) {
  struct Case {
    const char* spec;
    const char* want;  // substring of the message
  };
  const Case cases[] = {
      {"", "node list is empty"},
      {"   ", "node list is empty"},
      {"a:1,,b:2", "entry 2 (\"\"): empty entry"},
      {"a:1,", "entry 2 (\"\"): empty entry"},
      {"a:1,host", "entry 2 (\"host\"): missing port"},
      {"host:", "entry 1 (\"host:\"): missing port"},
      {"a:1,b:2,c:0", "entry 3 (\"c:0\"): port 0 outside [1, 65535]"},
      {"c:65536", "entry 1 (\"c:65536\"): port 65536 outside [1, 65535]"},
      {"c:99999999999999999999", "port 99999999999999999999 outside [1, 65535]"},
      {"c:80x", "entry 1 (\"c:80x\"): port \"80x\" is not a number"},
      {"c:-1", "port \"-1\" is not a number"},
      {":80", "entry 1 (\":80\"): empty host"},
      {"=h:1", "entry 1 (\"=h:1\"): empty id"},
      {"x=", "entry 1 (\"x=\"): empty address"},
      {"::1:80", "IPv6 host must be bracketed"},
      {"[::1]", "entry 1 (\"[::1]\"): missing port"},
      {"[::1:80", "unterminated '['"},
  };
  for (const Case& c : cases) {
    absl::StatusOr<std::vector<NodeInfo>> got = ParseNodeList(c.spec);
    ASSERT_FALSE(got.ok()) << c.spec;
    EXPECT_EQ(got.status().code(), absl::StatusCode::kInvalidArgument) << c.spec;
    EXPECT_NE(std::string(got.status().message()).find(c.want), std::string::npos)
        << "spec \"" << c.spec << "\" gave: " << got.status().message();
  }
}

TEST(PlacementParseTest, DuplicateIdsAreCaughtByCreate) {
  absl::StatusOr<std::vector<NodeInfo>> got = ParseNodeList("h:1,x=h:2,h:1");
  ASSERT_TRUE(got.ok());
  absl::StatusOr<Placement> p = Placement::Create(*std::move(got), 1);
  ASSERT_FALSE(p.ok());
  EXPECT_NE(std::string(p.status().message()).find("duplicate id \"h:1\" at index 0 and 2"),
            std::string::npos)
      << p.status();
}

}  // namespace
}  // namespace kvr::placement
