// Writes the SentencePiece harness's seed model (fuzz/corpus/sentencepiece/
// tiny.model: mode byte 1, then a 400-piece BPE (256 byte pieces) model trained on a few
// sentences). Its own program: libsentencepiece bundles protobuf-lite
// symbols that clash with libprotobuf, which make_seeds links.
//
// Usage: make_spm_seed CORPUS_DIR
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>

#include "sentencepiece_trainer.h"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s CORPUS_DIR\n", argv[0]);
    return 2;
  }
  namespace fs = std::filesystem;
  const fs::path tmp = fs::temp_directory_path() / "kvr_make_spm_seed";
  fs::create_directories(tmp);
  {
    std::ofstream text(tmp / "train.txt");
    for (int rep = 0; rep < 20; ++rep) {
      text << "Once upon a time, there was a little girl named Lily.\n"
           << "h\xc3\xa9llo w\xc3\xb6rld \xf0\x9f\x98\x80 123456789\n"
           << "the cat sat on the mat and the dog ran to the park " << rep << "\n";
    }
  }
  const auto st = sentencepiece::SentencePieceTrainer::Train(
      "--input=" + (tmp / "train.txt").string() + " --model_prefix=" + (tmp / "tiny").string() +
      " --vocab_size=400 --model_type=bpe --byte_fallback=true --character_coverage=1.0"
      " --normalization_rule_name=identity --minloglevel=2");
  if (!st.ok()) {
    std::fprintf(stderr, "make_spm_seed: %s\n", st.ToString().c_str());
    return 1;
  }
  std::ifstream in(tmp / "tiny.model", std::ios::binary);
  const std::string model(std::istreambuf_iterator<char>(in), {});
  fs::create_directories(fs::path(argv[1]) / "sentencepiece");
  std::ofstream out(fs::path(argv[1]) / "sentencepiece" / "tiny.model", std::ios::binary);
  out.put('\x01');
  out << model;
  fs::remove_all(tmp);
  std::printf("make_spm_seed: wrote %zu-byte model\n", model.size());
  return 0;
}
