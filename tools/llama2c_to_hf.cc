// llama2c_to_hf: converts a llama2.c checkpoint (e.g. stories260K.bin) into a
// Hugging Face Llama checkpoint directory: config.json + model.safetensors
// (or shards + model.safetensors.index.json with --max_shard_mb). q/k rows are
// permuted into HF's rotate_half layout, as convert_llama_weights_to_hf.py
// does. No tokenizer is written.
//
//   llama2c_to_hf --input stories260K.bin --output_dir /tmp/stories260K-hf [--dtype bf16]
#include <cstdio>
#include <string>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "gpu_worker/model/safetensors_loader.h"

ABSL_FLAG(std::string, input, "", "llama2.c checkpoint (.bin) to convert");
ABSL_FLAG(std::string, output_dir, "", "directory to write config.json and the safetensors into");
ABSL_FLAG(std::string, dtype, "f32", "storage dtype of the written tensors: f32 | bf16 | f16");
ABSL_FLAG(int64_t, max_shard_mb, 0,
          "when > 0, shard the weights into files of at most this many MiB");

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "Converts a llama2.c checkpoint into a Hugging Face safetensors checkpoint.\n"
      "  llama2c_to_hf --input stories260K.bin --output_dir DIR [--dtype f32|bf16|f16]");
  absl::ParseCommandLine(argc, argv);
  const std::string input = absl::GetFlag(FLAGS_input);
  const std::string out = absl::GetFlag(FLAGS_output_dir);
  if (input.empty() || out.empty()) {
    std::fprintf(stderr, "llama2c_to_hf: --input and --output_dir are required\n");
    return 2;
  }
  kvr::worker::HfWriteOptions options;
  const std::string dtype = absl::GetFlag(FLAGS_dtype);
  if (dtype == "f32") {
    options.dtype = kvr::DType::kF32;
  } else if (dtype == "bf16") {
    options.dtype = kvr::DType::kBf16;
  } else if (dtype == "f16") {
    options.dtype = kvr::DType::kF16;
  } else {
    std::fprintf(stderr, "llama2c_to_hf: --dtype must be f32, bf16 or f16, got %s\n",
                 dtype.c_str());
    return 2;
  }
  const int64_t shard_mb = absl::GetFlag(FLAGS_max_shard_mb);
  if (shard_mb < 0) {
    std::fprintf(stderr, "llama2c_to_hf: --max_shard_mb must be >= 0\n");
    return 2;
  }
  options.max_shard_bytes = shard_mb << 20;
  if (absl::Status s = kvr::worker::ConvertLlama2cToHf(input, out, options); !s.ok()) {
    std::fprintf(stderr, "llama2c_to_hf: %s\n", s.ToString().c_str());
    return 1;
  }
  std::printf("wrote %s (dtype %s)\n", out.c_str(), dtype.c_str());
  return 0;
}
