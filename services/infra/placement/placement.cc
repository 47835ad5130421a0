#include "services/infra/placement/placement.h"

#include <algorithm>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace kvr::placement {

uint64_t HashNodeId(absl::string_view id) {
  uint64_t h = HashAbsorb(0, id.size());
  for (size_t pos = 0; pos < id.size(); pos += 8) {
    uint64_t word = 0;
    const size_t n = std::min<size_t>(8, id.size() - pos);
    for (size_t j = 0; j < n; ++j) {
      word |= uint64_t{static_cast<unsigned char>(id[pos + j])} << (8 * j);
    }
    h = HashAbsorb(h, word);
  }
  return h;
}

// ---------------------------------------------------------------------------
// Chunking
// ---------------------------------------------------------------------------

uint32_t ChunkOf(uint64_t token_position, uint64_t chunk_tokens) {
  KVR_CHECK_MSG(chunk_tokens > 0, "chunk_tokens must be > 0");
  const uint64_t chunk = token_position / chunk_tokens;
  KVR_CHECK_MSG(chunk <= std::numeric_limits<uint32_t>::max(), "chunk index overflows uint32");
  return static_cast<uint32_t>(chunk);
}

uint32_t ChunkCount(uint64_t num_tokens, uint64_t chunk_tokens) {
  KVR_CHECK_MSG(chunk_tokens > 0, "chunk_tokens must be > 0");
  const uint64_t count = num_tokens / chunk_tokens + (num_tokens % chunk_tokens != 0 ? 1 : 0);
  KVR_CHECK_MSG(count <= uint64_t{std::numeric_limits<uint32_t>::max()} + 1,
                "chunk count overflows uint32");
  return static_cast<uint32_t>(count);
}

TokenRange ChunkTokenRange(uint32_t chunk, uint64_t chunk_tokens, uint64_t num_tokens) {
  KVR_CHECK_MSG(chunk_tokens > 0, "chunk_tokens must be > 0");
  constexpr uint64_t kMax = std::numeric_limits<uint64_t>::max();
  // Past 2^64 tokens (only with absurd chunk_tokens) the bounds saturate.
  const uint64_t begin =
      chunk != 0 && chunk_tokens > kMax / chunk ? kMax : uint64_t{chunk} * chunk_tokens;
  const uint64_t end = begin > kMax - chunk_tokens ? kMax : begin + chunk_tokens;
  TokenRange r;
  r.begin = std::min(begin, num_tokens);
  r.end = std::min(end, num_tokens);
  return r;
}

// ---------------------------------------------------------------------------
// Node list parsing
// ---------------------------------------------------------------------------

namespace {

// Checks "host:port" / "[v6]:port"; returns the reason it is bad, or OK.
absl::Status ValidateAddress(absl::string_view addr) {
  absl::string_view host;
  absl::string_view port;
  if (!addr.empty() && addr.front() == '[') {
    const size_t close = addr.find(']');
    if (close == absl::string_view::npos) return absl::InvalidArgumentError("unterminated '['");
    host = addr.substr(1, close - 1);
    absl::string_view rest = addr.substr(close + 1);
    if (rest.empty() || rest.front() != ':') {
      return absl::InvalidArgumentError("missing port (want host:port)");
    }
    port = rest.substr(1);
  } else {
    const size_t colon = addr.rfind(':');
    if (colon == absl::string_view::npos) {
      return absl::InvalidArgumentError("missing port (want host:port)");
    }
    host = addr.substr(0, colon);
    port = addr.substr(colon + 1);
    if (host.find(':') != absl::string_view::npos) {
      return absl::InvalidArgumentError("IPv6 host must be bracketed, e.g. [::1]:7000");
    }
  }
  if (host.empty()) return absl::InvalidArgumentError("empty host");
  if (port.empty()) return absl::InvalidArgumentError("missing port (want host:port)");
  if (!std::all_of(port.begin(), port.end(), [](char c) { return c >= '0' && c <= '9'; })) {
    return absl::InvalidArgumentError(absl::StrCat("port \"", port, "\" is not a number"));
  }
  // Compare digit strings without overflow: strip leading zeros, then length.
  absl::string_view digits = port;
  while (digits.size() > 1 && digits.front() == '0') digits.remove_prefix(1);
  uint32_t value = 0;
  if (digits.size() <= 5) {
    for (char c : digits) value = value * 10 + static_cast<uint32_t>(c - '0');
  }
  if (digits.size() > 5 || value < 1 || value > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("port ", port, " outside [1, 65535]"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::vector<NodeInfo>> ParseNodeList(absl::string_view spec) {
  if (absl::StripAsciiWhitespace(spec).empty()) {
    return absl::InvalidArgumentError(
        "node list is empty (want id=host:port,... or host:port,...)");
  }
  std::vector<NodeInfo> nodes;
  size_t index = 0;
  for (absl::string_view raw : absl::StrSplit(spec, ',')) {
    ++index;
    const absl::string_view entry = absl::StripAsciiWhitespace(raw);
    auto bad = [&](absl::string_view why) {
      return absl::InvalidArgumentError(
          absl::StrCat("node list entry ", index, " (\"", entry, "\"): ", why));
    };
    if (entry.empty()) return bad("empty entry");
    NodeInfo node;
    const size_t eq = entry.find('=');
    absl::string_view address = entry;
    if (eq != absl::string_view::npos) {
      const absl::string_view id = absl::StripAsciiWhitespace(entry.substr(0, eq));
      if (id.empty()) return bad("empty id before '='");
      node.id = std::string(id);
      address = absl::StripAsciiWhitespace(entry.substr(eq + 1));
    }
    if (address.empty()) return bad("empty address (want host:port)");
    if (absl::Status s = ValidateAddress(address); !s.ok()) return bad(s.message());
    node.address = std::string(address);
    if (node.id.empty()) node.id = node.address;
    nodes.push_back(std::move(node));
  }
  return nodes;
}

// ---------------------------------------------------------------------------
// LayerGroups
// ---------------------------------------------------------------------------

size_t LayerGroups::num_requests() const {
  size_t n = 0;
  for (size_t i = 0; i + 1 < offsets_.size(); ++i) n += offsets_[i + 1] > offsets_[i] ? 1 : 0;
  return n;
}

// ---------------------------------------------------------------------------
// Placement
// ---------------------------------------------------------------------------

absl::StatusOr<Placement> Placement::Create(std::vector<NodeInfo> nodes, int replicas) {
  if (nodes.empty()) {
    return absl::InvalidArgumentError("nodes: empty list (need at least 1 node)");
  }
  if (replicas < 1 || static_cast<size_t>(replicas) > nodes.size()) {
    return absl::InvalidArgumentError(absl::StrCat("replicas: ", replicas, " outside [1, ",
                                                   nodes.size(), "] (the number of nodes)"));
  }
  absl::flat_hash_map<absl::string_view, size_t> seen;
  std::vector<uint64_t> hashes;
  hashes.reserve(nodes.size());
  for (size_t i = 0; i < nodes.size(); ++i) {
    if (nodes[i].id.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("nodes[", i, "]: empty id (address \"", nodes[i].address, "\")"));
    }
    auto [it, inserted] = seen.emplace(nodes[i].id, i);
    if (!inserted) {
      return absl::InvalidArgumentError(absl::StrCat("nodes: duplicate id \"", nodes[i].id,
                                                     "\" at index ", it->second, " and ", i));
    }
    hashes.push_back(HashNodeId(nodes[i].id));
  }
  return Placement(std::move(nodes), std::move(hashes), replicas);
}

std::optional<size_t> Placement::Find(absl::string_view id) const {
  for (size_t i = 0; i < nodes_.size(); ++i) {
    if (nodes_[i].id == id) return i;
  }
  return std::nullopt;
}

bool Placement::Heavier(size_t a, uint64_t weight_a, size_t b, uint64_t weight_b) const {
  if (weight_a != weight_b) return weight_a > weight_b;
  if (node_hashes_[a] != node_hashes_[b]) return node_hashes_[a] > node_hashes_[b];
  return nodes_[a].id > nodes_[b].id;  // ids are unique
}

size_t Placement::Primary(const ShardKey& key) const {
  const uint64_t shard = key.Hash();
  size_t best = 0;
  uint64_t best_weight = RendezvousWeight(node_hashes_[0], shard);
  for (size_t i = 1; i < node_hashes_.size(); ++i) {
    const uint64_t w = RendezvousWeight(node_hashes_[i], shard);
    if (Heavier(i, w, best, best_weight)) {
      best = i;
      best_weight = w;
    }
  }
  return best;
}

void Placement::NodesFor(const ShardKey& key, std::span<size_t> out) const {
  KVR_CHECK(!out.empty() && out.size() <= nodes_.size());
  const uint64_t shard = key.Hash();
  auto weight = [&](size_t i) { return RendezvousWeight(node_hashes_[i], shard); };
  // Insertion into the running top-|out| (N is tens; weights are recomputed
  // rather than stored so nothing is allocated).
  size_t filled = 0;
  for (size_t i = 0; i < nodes_.size(); ++i) {
    const uint64_t w = weight(i);
    size_t pos = filled;
    while (pos > 0 && Heavier(i, w, out[pos - 1], weight(out[pos - 1]))) --pos;
    if (pos >= out.size()) continue;
    const size_t last = std::min(filled, out.size() - 1);
    for (size_t j = last; j > pos; --j) out[j] = out[j - 1];
    out[pos] = i;
    if (filled < out.size()) ++filled;
  }
}

std::vector<size_t> Placement::NodesFor(const ShardKey& key) const {
  std::vector<size_t> out(static_cast<size_t>(replicas_));
  NodesFor(key, std::span<size_t>(out));
  return out;
}

void Placement::GroupByPrimary(uint64_t sequence_id, uint32_t layer,
                               std::span<const uint32_t> kv_heads, std::span<const uint32_t> chunks,
                               LayerGroups* out) const {
  const size_t n = kv_heads.size() * chunks.size();
  out->primary_.resize(n);
  out->offsets_.assign(nodes_.size() + 1, 0);
  // Pass 1: primary of every shard, counted per node.
  size_t s = 0;
  for (uint32_t head : kv_heads) {
    for (uint32_t chunk : chunks) {
      const size_t p = Primary(ShardKey{sequence_id, layer, head, chunk});
      out->primary_[s++] = static_cast<uint32_t>(p);
      ++out->offsets_[p + 1];
    }
  }
  for (size_t i = 0; i < nodes_.size(); ++i) out->offsets_[i + 1] += out->offsets_[i];
  // Pass 2: stable counting-sort placement (offsets_[p] is the cursor, then
  // shifted back).
  out->shards_.resize(n);
  s = 0;
  for (uint32_t head : kv_heads) {
    for (uint32_t chunk : chunks) {
      out->shards_[out->offsets_[out->primary_[s++]]++] = HeadChunk{head, chunk};
    }
  }
  for (size_t i = nodes_.size(); i > 0; --i) out->offsets_[i] = out->offsets_[i - 1];
  out->offsets_[0] = 0;
}

LayerGroups Placement::GroupByPrimary(uint64_t sequence_id, uint32_t layer,
                                      std::span<const uint32_t> kv_heads,
                                      std::span<const uint32_t> chunks) const {
  LayerGroups groups;
  GroupByPrimary(sequence_id, layer, kv_heads, chunks, &groups);
  return groups;
}

}  // namespace kvr::placement
