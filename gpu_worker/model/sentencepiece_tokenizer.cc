#include "gpu_worker/model/sentencepiece_tokenizer.h"

#include <fstream>
#include <iterator>

#include "absl/strings/str_cat.h"

// sentencepiece_processor.h declares `namespace absl { using std::string_view; }`,
// which clashes with Debian's abseil (its own absl::string_view class). Its
// API is therefore seen under another namespace name; the alias is
// std::string_view either way, so symbols and ABI are unchanged.
#define absl kvr_sentencepiece_absl
#include <sentencepiece_processor.h>
#undef absl

namespace kvr::worker {
namespace {

constexpr std::string_view kSpaceMark = "\xE2\x96\x81";  // U+2581 "▁"

}  // namespace

SentencePieceTokenizer::SentencePieceTokenizer()
    : sp_(std::make_unique<sentencepiece::SentencePieceProcessor>()) {}
SentencePieceTokenizer::~SentencePieceTokenizer() = default;

absl::StatusOr<std::unique_ptr<SentencePieceTokenizer>> SentencePieceTokenizer::Load(
    const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open SentencePiece model ", path));
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) return absl::DataLossError(absl::StrCat("error reading ", path));
  return Parse(bytes, path);
}

absl::StatusOr<std::unique_ptr<SentencePieceTokenizer>> SentencePieceTokenizer::Parse(
    std::string_view model, const std::string& name) {
  std::unique_ptr<SentencePieceTokenizer> t(new SentencePieceTokenizer);
  if (auto s = t->sp_->LoadFromSerializedProto(model); !s.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("SentencePiece model ", name, " does not load: ", s.ToString()));
  }
  t->vocab_ = t->sp_->GetPieceSize();
  t->bos_ = t->sp_->bos_id();
  t->eos_ = t->sp_->eos_id();
  if (t->vocab_ <= 0 || t->bos_ < 0 || t->eos_ < 0) {
    return absl::InvalidArgumentError(absl::StrCat("SentencePiece model ", name, " has ", t->vocab_,
                                                   " pieces, bos id ", t->bos_, ", eos id ",
                                                   t->eos_, "; needs BOS and EOS pieces"));
  }
  return t;
}

absl::StatusOr<std::vector<int32_t>> SentencePieceTokenizer::Encode(std::string_view text,
                                                                    bool add_bos,
                                                                    bool add_eos) const {
  std::vector<int> ids;
  if (auto s = sp_->Encode(text, &ids); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("SentencePiece encode: ", s.ToString()));
  }
  std::vector<int32_t> out;
  out.reserve(ids.size() + 2);
  if (add_bos) out.push_back(bos_);
  out.insert(out.end(), ids.begin(), ids.end());
  if (add_eos) out.push_back(eos_);
  return out;
}

const std::string& SentencePieceTokenizer::piece(int32_t id) const { return sp_->IdToPiece(id); }

absl::StatusOr<std::string> SentencePieceTokenizer::Decode(int32_t prev_id, int32_t id) const {
  if (id < 0 || id >= vocab_) {
    return absl::InvalidArgumentError(
        absl::StrCat("token id ", id, " outside vocabulary [0, ", vocab_, ")"));
  }
  if (sp_->IsControl(id)) return std::string();
  if (sp_->IsUnknown(id)) return std::string(" \xE2\x81\x87 ");
  const std::string& p = sp_->IdToPiece(id);
  if (sp_->IsByte(id)) {
    // "<0xXX>"
    return std::string(1, static_cast<char>(std::stoi(p.substr(3, 2), nullptr, 16)));
  }
  std::string out;
  out.reserve(p.size());
  for (size_t i = 0; i < p.size();) {
    if (std::string_view(p).substr(i, kSpaceMark.size()) == kSpaceMark) {
      out.push_back(' ');
      i += kSpaceMark.size();
    } else {
      out.push_back(p[i++]);
    }
  }
  if (prev_id == bos_ && !out.empty() && out[0] == ' ') out.erase(0, 1);
  return out;
}

}  // namespace kvr::worker
