#include "gpu_worker/model/llama2c_tokenizer.h"

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
  // Greedy merges: the best-scoring mergeable adjacent pair, leftmost on ties.
  // cand[i] is the merged id of (tokens[i], tokens[i+1]) or -1; only the
  // neighbours of a merge change, so each round is one scan of floats.
  auto pair_id = [&](size_t i) {
    buf.assign(pieces_[static_cast<size_t>(tokens[i])]);
    buf.append(pieces_[static_cast<size_t>(tokens[i + 1])]);
    return Lookup(buf);
  };
  std::vector<int32_t> cand(tokens.size() > 0 ? tokens.size() - 1 : 0);
  for (size_t i = 0; i < cand.size(); ++i) cand[i] = pair_id(i);
  for (;;) {
    float best_score = -1e10f;
    size_t best = cand.size();
    for (size_t i = 0; i < cand.size(); ++i) {
      if (cand[i] >= 0 && scores_[static_cast<size_t>(cand[i])] > best_score) {
        best_score = scores_[static_cast<size_t>(cand[i])];
        best = i;
      }
    }
    if (best == cand.size()) break;
    tokens[best] = cand[best];
    tokens.erase(tokens.begin() + static_cast<std::ptrdiff_t>(best) + 1);
    cand.erase(cand.begin() + static_cast<std::ptrdiff_t>(best));
    if (best > 0) cand[best - 1] = pair_id(best - 1);
    if (best < cand.size()) cand[best] = pair_id(best);
  }
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
