// Hugging Face Llama checkpoints in safetensors format: a directory with
// config.json (see hf_config.h) and either model.safetensors or
// model.safetensors.index.json plus the shard files its weight_map names.
//
// safetensors file: u64 little-endian header length N, N bytes of JSON
// {"name": {"dtype": "BF16", "shape": [r, c], "data_offsets": [b, e]}, ...,
// "__metadata__": {...}}, then the data section; offsets are relative to it.
//
// Tensors read (HF names; matrices [out x in]):
//   model.embed_tokens.weight                         [vocab x dim]
//   model.layers.N.self_attn.{q,k,v,o}_proj.weight    q [n_heads*head_dim x dim],
//                                                     k, v [n_kv_heads*head_dim x dim],
//                                                     o [dim x n_heads*head_dim]
//   model.layers.N.mlp.{gate,up,down}_proj.weight     gate, up [hidden x dim], down [dim x hidden]
//   model.layers.N.{input,post_attention}_layernorm.weight, model.norm.weight   [dim]
//   lm_head.weight                                    [vocab x dim]; not read when
//                                                     tie_word_embeddings (the embedding is used)
// Other tensors in the files are ignored.
//
// dtypes: every file is memory-mapped read-only. BF16 and F32 matrices and
// embeddings are referenced in place (no copy; a copy only when a tensor's
// offset is not aligned to its element size). F16 matrices are widened to
// F32 at load (exact; twice the memory) because the CPU backend's MatMul has
// no f16 path yet. Norm weights are always converted to F32 (they are tiny
// and LlamaWeights keeps norms in f32). Other dtypes are InvalidArgument.
//
// RoPE: HF checkpoints store q_proj / k_proj rows permuted for the
// "rotate_half" layout, so the weights carry RopeStyle::kHalfSplit and are
// used as stored (no un-permuting).
//
// Errors (never a crash): a header length beyond the file, a header that is
// not valid JSON or has malformed entries, data offsets outside the data
// section or disagreeing with dtype x shape are DataLoss naming the file and
// tensor; a missing tensor, or one whose dtype or shape disagrees with
// config.json, is InvalidArgument naming it; a shard named by the index but
// absent is DataLoss naming the shard and a tensor in it; a directory with no
// config.json or no model.safetensors[.index.json] is NotFound.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "gpu_worker/model/weights.h"

namespace kvr::worker {

// One entry of a safetensors header; `data` points into the parsed buffer.
struct SafetensorsEntry {
  std::string name;
  std::string dtype;  // as written: "BF16", "F16", "F32", ...
  std::vector<int64_t> shape;
  std::span<const std::byte> data;
};

// Parses and bounds-checks a whole safetensors file held in memory (`name`
// for errors). Entries are in header order minus "__metadata__".
absl::StatusOr<std::vector<SafetensorsEntry>> ParseSafetensors(std::span<const std::byte> file,
                                                               const std::string& name);

// Loads the checkpoint in directory `dir`. The weights alias the mappings,
// which `storage` keeps alive.
absl::StatusOr<std::shared_ptr<const LlamaWeights>> LoadHfCheckpoint(const std::string& dir);

struct HfWriteOptions {
  // Storage dtype of every tensor in the written files (norms included).
  DType dtype = DType::kF32;
  // When > 0, tensors are split over shard files of at most this many bytes
  // of tensor data each (one tensor per shard when a tensor is larger), and
  // model.safetensors.index.json is written; 0 writes model.safetensors.
  int64_t max_shard_bytes = 0;
};

// Writes `weights` (any dtype LlamaWeights holds) as an HF checkpoint into
// directory `dir` (created if needed; existing files of the same names are
// replaced): config.json and the safetensors file(s). Weights with
// RopeStyle::kInterleaved (llama2.c / Meta layout) have their q/k rows
// permuted per head into the rotate_half layout, as HF's
// convert_llama_weights_to_hf.py does: row h*d + t*d/2 + i of the output is
// row h*d + 2i + t of the input (d = head_dim, t in {0,1}). Tied weights
// write no lm_head.weight. InvalidArgument for invalid weights; Internal for
// I/O failures, naming the file.
absl::Status WriteHfCheckpoint(const LlamaWeights& weights, const std::string& dir,
                               const HfWriteOptions& options = {});

// LoadLlama2c(llama2c_path) followed by WriteHfCheckpoint (the llama2c_to_hf
// tool).
absl::Status ConvertLlama2cToHf(const std::string& llama2c_path, const std::string& dir,
                                const HfWriteOptions& options = {});

}  // namespace kvr::worker
