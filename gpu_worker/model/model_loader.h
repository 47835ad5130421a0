// Loads a model and its tokenizer from the --model / --tokenizer flags the
// worker and `kvr capture` share: a Hugging Face checkpoint
// directory (config.json + safetensors; tokenizer: --tokenizer, else the
// directory's tokenizer.json, else its tokenizer.model) or a llama2.c
// checkpoint (empty = the bundled stories260K; tokenizer: --tokenizer, else
// tok512.bin beside it). A --tokenizer ending in .json is a tokenizer.json,
// in .model a SentencePiece model (only through `sentencepiece_loader`),
// anything else a llama2.c tokenizer.
#pragma once

#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "gpu_worker/model/tokenizer.h"
#include "gpu_worker/model/weights.h"

namespace kvr::worker {

struct LoadedModel {
  std::shared_ptr<const LlamaWeights> weights;
  std::unique_ptr<Tokenizer> tokenizer;
  std::string model;      // the checkpoint path (file or directory)
  std::string tokenizer_path;
  bool hf_dir = false;    // `model` is a Hugging Face checkpoint directory
};

// Loads a SentencePiece .model tokenizer. Passed in (`kvr capture` passes
// SentencePieceTokenizer::Load) rather than called here, so that a binary
// that does not pass one never links libsentencepiece: its bundled abseil
// flags must not be loaded after abseil's own (cmake/KvrTargets.cmake,
// kvr_link_protobuf_first), which kvr_worker's link order cannot promise.
using SentencePieceLoader =
    std::function<absl::StatusOr<std::unique_ptr<Tokenizer>>(const std::string& path)>;

// NotFound when a file is missing (naming the flag), InvalidArgument when
// the tokenizer has more tokens than the model's vocab_size, Unimplemented
// for a .model tokenizer without `sentencepiece_loader`; the loaders'
// errors otherwise.
absl::StatusOr<LoadedModel> LoadModel(const std::string& model_flag,
                                      const std::string& tokenizer_flag,
                                      const SentencePieceLoader& sentencepiece_loader = nullptr);

}  // namespace kvr::worker
