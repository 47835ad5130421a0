#include "gpu_worker/model/model_loader.h"

#include <filesystem>
#include <system_error>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "gpu_worker/model/bundled_model.h"
#include "gpu_worker/model/hf_bpe_tokenizer.h"
#include "gpu_worker/model/llama2c_loader.h"
#include "gpu_worker/model/llama2c_tokenizer.h"
#include "gpu_worker/model/safetensors_loader.h"

namespace kvr::worker {

absl::StatusOr<LoadedModel> LoadModel(const std::string& model_flag,
                                      const std::string& tokenizer_flag,
                                      const SentencePieceLoader& sentencepiece_loader) {
  namespace fs = std::filesystem;
  LoadedModel m;
  m.model = model_flag;
  m.tokenizer_path = tokenizer_flag;
  std::error_code ec;
  if (!model_flag.empty() && fs::is_directory(model_flag, ec)) {
    m.hf_dir = true;
    KVR_ASSIGN_OR_RETURN(m.weights, LoadHfCheckpoint(model_flag));
    if (m.tokenizer_path.empty()) {
      for (const char* name : {"tokenizer.json", "tokenizer.model"}) {
        if (fs::exists(fs::path(model_flag) / name, ec)) {
          m.tokenizer_path = (fs::path(model_flag) / name).string();
          break;
        }
      }
      if (m.tokenizer_path.empty()) {
        return absl::NotFoundError(absl::StrCat(
            "--tokenizer: ", model_flag, " has no tokenizer.json or tokenizer.model; name one"));
      }
    }
  } else {
    KVR_ASSIGN_OR_RETURN(const ModelPaths paths, ResolveModelPaths(model_flag, tokenizer_flag));
    m.model = paths.model;
    m.tokenizer_path = paths.tokenizer;
    KVR_ASSIGN_OR_RETURN(m.weights, LoadLlama2c(m.model));
  }
  const std::string ext = fs::path(m.tokenizer_path).extension().string();
  if (ext == ".json") {
    KVR_ASSIGN_OR_RETURN(m.tokenizer, HfBpeTokenizer::Load(m.tokenizer_path));
  } else if (ext == ".model") {
    if (!sentencepiece_loader) {
      return absl::UnimplementedError(absl::StrCat(
          "--tokenizer ", m.tokenizer_path,
          ": SentencePiece .model tokenizers are not loaded here; use the checkpoint's "
          "tokenizer.json"));
    }
    KVR_ASSIGN_OR_RETURN(m.tokenizer, sentencepiece_loader(m.tokenizer_path));
  } else {
    KVR_ASSIGN_OR_RETURN(m.tokenizer,
                         Llama2cTokenizer::Load(m.tokenizer_path, m.weights->config.vocab_size));
  }
  if (m.tokenizer->vocab_size() > m.weights->config.vocab_size) {
    return absl::InvalidArgumentError(absl::StrCat("--tokenizer: ", m.tokenizer->vocab_size(),
                                                   " tokens, more than the model's vocab_size ",
                                                   m.weights->config.vocab_size));
  }
  return m;
}

}  // namespace kvr::worker
