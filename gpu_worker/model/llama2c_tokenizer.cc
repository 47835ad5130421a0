#include "gpu_worker/model/llama2c_tokenizer.h"

#include <algorithm>
#include <cstring>
#include <fstream>
#include <iterator>

#include "absl/strings/str_cat.h"

namespace kvr::worker {
namespace {

constexpr int kMaxPieceBytes = 1 << 16;

// The byte a "<0xXX>" piece stands for, or -1.
int ByteOfPiece(std::string_view p) {
  if (p.size() != 6 || p.substr(0, 3) != "<0x" || p[5] != '>') return -1;
  int v = 0;
  for (char c : p.substr(3, 2)) {
    v <<= 4;
    if (c >= '0' && c <= '9') {
      v |= c - '0';
    } else if (c >= 'A' && c <= 'F') {
      v |= c - 'A' + 10;
    } else if (c >= 'a' && c <= 'f') {
      v |= c - 'a' + 10;
    } else {
      return -1;
    }
  }
  return v;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Llama2cTokenizer>> Llama2cTokenizer::Load(const std::string& path,
                                                                         int vocab_size) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open llama2.c tokenizer ", path));
  std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) return absl::DataLossError(absl::StrCat("error reading ", path));
  return Parse(std::as_bytes(std::span<const char>(bytes)), vocab_size, path);
}

absl::StatusOr<std::unique_ptr<Llama2cTokenizer>> Llama2cTokenizer::Parse(
    std::span<const std::byte> data, int vocab_size, const std::string& name) {
  size_t off = 0;
  auto read_i32 = [&](int32_t* v) {
    if (data.size() - off < 4) return false;
    std::memcpy(v, data.data() + off, 4);
    off += 4;
    return true;
  };
  int32_t max_token_length = 0;
  if (!read_i32(&max_token_length)) {
    return absl::DataLossError(absl::StrCat("llama2.c tokenizer ", name, " is ", data.size(),
                                            " bytes, too short for max_token_length"));
  }
  if (max_token_length <= 0 || max_token_length > kMaxPieceBytes) {
    return absl::InvalidArgumentError(absl::StrCat("llama2.c tokenizer ", name,
                                                   ": max_token_length = ", max_token_length,
                                                   " outside [1, ", kMaxPieceBytes, "]"));
  }
  std::unique_ptr<Llama2cTokenizer> t(new Llama2cTokenizer);
  for (int i = 0; vocab_size <= 0 ? off < data.size() : i < vocab_size; ++i) {
    float score;
    int32_t len;
    if (data.size() - off < 8) {
      return absl::DataLossError(absl::StrCat("llama2.c tokenizer ", name,
                                              ": truncated in the header of token ", i,
                                              " (file is ", data.size(), " bytes)"));
    }
    std::memcpy(&score, data.data() + off, 4);
    std::memcpy(&len, data.data() + off + 4, 4);
    off += 8;
    if (len < 0 || len > kMaxPieceBytes) {
      return absl::InvalidArgumentError(
          absl::StrCat("llama2.c tokenizer ", name, ": token ", i, " has length ", len));
    }
    if (data.size() - off < static_cast<size_t>(len)) {
      return absl::DataLossError(absl::StrCat("llama2.c tokenizer ", name, ": token ", i, " needs ",
                                              len, " bytes, ", data.size() - off, " left"));
    }
    t->pieces_.emplace_back(reinterpret_cast<const char*>(data.data() + off),
                            static_cast<size_t>(len));
    t->scores_.push_back(score);
    off += static_cast<size_t>(len);
  }
  if (t->pieces_.size() < 3) {
    return absl::InvalidArgumentError(absl::StrCat("llama2.c tokenizer ", name, " has ",
                                                   t->pieces_.size(),
                                                   " tokens; needs at least <unk>, BOS, EOS"));
  }
  t->index_.reserve(t->pieces_.size());
  for (size_t i = 0; i < t->pieces_.size(); ++i) {
    t->index_.emplace(std::string_view(t->pieces_[i]), static_cast<int32_t>(i));  // keeps first
  }
  t->byte_fallback_ = t->pieces_.size() >= 259;
  for (int b = 0; b < 256 && t->byte_fallback_; ++b) {
    t->byte_fallback_ = ByteOfPiece(t->pieces_[static_cast<size_t>(b + 3)]) == b;
  }
  // Every output token's piece is a concatenation of the pieces of the
  // initial tokens it merged, and each initial piece is at least as long as
  // the input bytes it stands for (itself, "<0xXX>" for one byte, or <unk>
  // for one byte) unless <unk> is empty and can be emitted.
  if (t->byte_fallback_ || !t->pieces_[0].empty()) {
    for (const std::string& p : t->pieces_) {
      t->max_bytes_per_token_ = std::max(t->max_bytes_per_token_, p.size());
    }
  }
  return t;
}

int32_t Llama2cTokenizer::Lookup(std::string_view piece) const {
  auto it = index_.find(piece);
  return it == index_.end() ? -1 : it->second;
}

absl::StatusOr<std::vector<int32_t>> Llama2cTokenizer::Encode(std::string_view text, bool add_bos,
                                                              bool add_eos) const {
  std::vector<int32_t> tokens;
  tokens.reserve(text.size() + 3);
  if (add_bos) tokens.push_back(bos_id());
  auto push_byte = [&](unsigned char b) {
    tokens.push_back(byte_fallback_ ? static_cast<int32_t>(b) + 3 : 0);
  };
  if (!text.empty()) {
    const int32_t space = Lookup(" ");
    if (space >= 0) {
      tokens.push_back(space);
    } else if (byte_fallback_) {
      push_byte(' ');
    }
  }
  // One token per UTF-8 codepoint (run.c: a continuation byte extends the
  // current codepoint up to 4 bytes).
  std::string buf;
  for (size_t i = 0; i < text.size(); ++i) {
    const unsigned char c = static_cast<unsigned char>(text[i]);
    if ((c & 0xC0) != 0x80) buf.clear();
    buf.push_back(static_cast<char>(c));
    const bool next_continues =
        i + 1 < text.size() && (static_cast<unsigned char>(text[i + 1]) & 0xC0) == 0x80;
    if (next_continues && buf.size() < 4) continue;
    const int32_t id = Lookup(buf);
    if (id >= 0) {
      tokens.push_back(id);
    } else {
      for (char b : buf) push_byte(static_cast<unsigned char>(b));
    }
    buf.clear();
  }
  // Greedy merges: the best-scoring mergeable adjacent pair, leftmost on ties
  // (run.c scans every pair each round, O(n^2); this is the same choice in
  // O(n log n)). Tokens stay at their initial index i in a linked list
  // (prev/next), so "leftmost" is the smallest i. The heap holds one entry per
  // pair seen; an entry is stale when either side was merged away or changed,
  // and is skipped when popped. A valid top entry is exactly run.c's choice:
  // the highest score, ties to the leftmost pair. run.c only merges a pair
  // whose score beats its initial best of -1e10 (so NaN never merges).
  struct Pair {
    float score;
    uint32_t left, right;  // indices of the two tokens
    int32_t left_id, right_id, merged;
  };
  auto worse = [](const Pair& a, const Pair& b) {
    if (a.score != b.score) return a.score < b.score;
    return a.left > b.left;
  };
  const size_t n = tokens.size();
  std::vector<uint32_t> prev(n), next(n);
  for (size_t i = 0; i < n; ++i) {
    prev[i] = static_cast<uint32_t>(i - 1);  // wraps for 0: never read
    next[i] = static_cast<uint32_t>(i + 1);
  }
  std::vector<bool> alive(n, true);
  std::vector<Pair> heap;
  heap.reserve(n);
  auto consider = [&](size_t l) {
    if (l >= n || !alive[l] || next[l] >= n) return;
    const uint32_t r = next[l];
    buf.assign(pieces_[static_cast<size_t>(tokens[l])]);
    buf.append(pieces_[static_cast<size_t>(tokens[r])]);
    const int32_t id = Lookup(buf);
    if (id < 0) return;
    const float sc = scores_[static_cast<size_t>(id)];
    if (!(sc > -1e10f)) return;
    heap.push_back(Pair{sc, static_cast<uint32_t>(l), r, tokens[l], tokens[r], id});
    std::push_heap(heap.begin(), heap.end(), worse);
  };
  for (size_t i = 0; i + 1 < n; ++i) consider(i);
  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), worse);
    const Pair p = heap.back();
    heap.pop_back();
    if (!alive[p.left] || !alive[p.right] || next[p.left] != p.right ||
        tokens[p.left] != p.left_id || tokens[p.right] != p.right_id) {
      continue;  // stale
    }
    tokens[p.left] = p.merged;
    alive[p.right] = false;
    next[p.left] = next[p.right];
    if (next[p.right] < n) prev[next[p.right]] = p.left;
    if (p.left > 0) consider(prev[p.left]);
    consider(p.left);
  }
  size_t kept = 0;
  for (size_t i = 0; i < n; ++i) {
    if (alive[i]) tokens[kept++] = tokens[i];
  }
  tokens.resize(kept);
  if (add_eos) tokens.push_back(eos_id());
  return tokens;
}

absl::StatusOr<std::string> Llama2cTokenizer::Decode(int32_t prev_id, int32_t id) const {
  if (id < 0 || id >= vocab_size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("token id ", id, " outside vocabulary [0, ", vocab_size(), ")"));
  }
  std::string_view p = pieces_[static_cast<size_t>(id)];
  if (prev_id == bos_id() && !p.empty() && p[0] == ' ') p.remove_prefix(1);
  if (const int b = ByteOfPiece(p); b >= 0) return std::string(1, static_cast<char>(b));
  return std::string(p);
}

}  // namespace kvr::worker
