// Shared parts of the decode benchmarks (gpu_decode_bench on CUDA,
// decode_bench on the CPU): the Llama-3-8B shape, deterministic synthetic
// data, timing. Benchmark-only code (kvr::bench_decode_common); nothing in
// the product links it.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "common/thread_pool.h"
#include "gpu_worker/model/model_config.h"

namespace kvr::bench {

using Clock = std::chrono::steady_clock;

// Seconds since `t`.
double Since(Clock::time_point t);

// Deterministic value in [-1, 1) from (seed, i) (splitmix64): a pure
// function, so any range of a synthetic tensor can be refilled on any thread
// and two modes of a benchmark see the same K/V at the same position.
float Noise(uint64_t seed, uint64_t i);

// p[i] = Noise(seed, i) for i in [0, n), in parallel on `pool`.
void Fill(ThreadPool& pool, float* p, size_t n, uint64_t seed);

// worker::Llama3_8BConfig() (dim 4096, FFN 14336, 32 query heads, 8 KV
// heads, head_dim 128, RoPE theta 500000 half-split, untied classifier, 32
// layers: random weights override them) with `vocab` classifier rows (128256
// is the real model's) and seq_len 4M, for synthetic long contexts.
worker::LlamaConfig Llama3_8BConfig(int vocab = 128256);

// Writes `rows` (each one JSON object's text) to `path` as a JSON array.
// Internal naming --json and the path when the file cannot be written.
absl::Status WriteJsonRows(const std::string& path, const std::vector<std::string>& rows);

// The comma-separated integers of flag `flag` (named in errors), each in
// [lo, hi]; InvalidArgument naming the flag, the entry and the range.
absl::StatusOr<std::vector<int64_t>> ParseIntList(absl::string_view flag, absl::string_view text,
                                                  int64_t lo, int64_t hi);

// VmRSS in bytes from the text of a /proc/<pid>/status file; 0 when absent
// or malformed. The kB figure follows "VmRSS:" after a tab and padding that
// vanishes at 8+ digits ("VmRSS:\t12345678 kB").
int64_t ParseVmRssBytes(absl::string_view status_text);

}  // namespace kvr::bench
