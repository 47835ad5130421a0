// Loader for llama2.c checkpoints in the legacy "v0" format (run.c):
//   header: 7 x int32 = dim, hidden_dim, n_layers, n_heads, n_kv_heads,
//           vocab_size (negative = unshared classifier), seq_len
//   then fp32 arrays, each covering all layers: token_embedding_table
//   [vocab x dim], rms_att_weight [L x dim], wq [L x dim x dim], wk, wv
//   [L x kv_dim x dim], wo [L x dim x dim], rms_ffn_weight [L x dim],
//   w1 [L x hidden x dim], w2 [L x dim x hidden], w3 [L x hidden x dim],
//   rms_final_weight [dim], freq_cis_real and freq_cis_imag
//   [seq_len x head_size / 2] (unused: RoPE is recomputed), then wcls
//   [vocab x dim] when unshared.
// head_size = dim / n_heads; kv_dim = n_kv_heads * head_size. RoPE is
// interleaved with theta 10000; rms_eps is 1e-5.
//
// The file is memory-mapped read-only and the returned views alias it (no
// copy). Every header field and section size is checked against the file
// size first: a bad or truncated file is InvalidArgument (impossible header
// values) or DataLoss (sizes disagree with the file), naming the field or
// section; never a crash.
#pragma once

#include <cstddef>
#include <memory>
#include <span>
#include <string>

#include "absl/status/statusor.h"
#include "gpu_worker/model/weights.h"

namespace kvr::worker {

absl::StatusOr<std::shared_ptr<const LlamaWeights>> LoadLlama2c(const std::string& path);

// The same over bytes already in memory; `keepalive` owns them. `name` is
// used in error messages.
absl::StatusOr<std::shared_ptr<const LlamaWeights>> ParseLlama2c(
    std::span<const std::byte> file, std::shared_ptr<const void> keepalive,
    const std::string& name);

}  // namespace kvr::worker
