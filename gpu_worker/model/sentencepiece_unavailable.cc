// SentencePiece tokenizers in a build without libsentencepiece
// (KVR_WITH_SERVICES=OFF on a machine without libsentencepiece-dev): compiled
// instead of sentencepiece_tokenizer.cc. Loading fails with
// FailedPrecondition saying what is missing; the llama2.c and tokenizer.json
// tokenizers are unaffected. No SentencePieceTokenizer is ever constructed.
#include "absl/strings/str_cat.h"
#include "gpu_worker/model/sentencepiece_tokenizer.h"

namespace kvr::worker {
namespace {

absl::Status NotBuilt(const std::string& name) {
  return absl::FailedPreconditionError(absl::StrCat(
      "SentencePiece model ", name,
      ": kvr was built without libsentencepiece (install libsentencepiece-dev and reconfigure, "
      "or use a llama2.c tok*.bin / tokenizer.json tokenizer)"));
}

}  // namespace

absl::StatusOr<std::unique_ptr<SentencePieceTokenizer>> SentencePieceTokenizer::Load(
    const std::string& path) {
  return NotBuilt(path);
}

absl::StatusOr<std::unique_ptr<SentencePieceTokenizer>> SentencePieceTokenizer::Parse(
    std::string_view, const std::string& name) {
  return NotBuilt(name);
}

}  // namespace kvr::worker
