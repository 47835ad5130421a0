// Deterministic random weights of any LlamaConfig shape, for performance work
// at real shapes (e.g. Llama-3-8B) where no trained weights are available.
//
// Every element is a pure function of (seed, tensor, index), so results do
// not depend on thread count or fill order. Matrices [out x in] are uniform
// with standard deviation 1/sqrt(in) (activations keep their scale through
// the residual stream); the embedding has std 1; norms are 1 +- 0.1.
//
// Memory: ParameterCount() * DTypeSize(dtype) bytes, allocated per tensor and
// never zero-filled first. Llama-3-8B is ~8.0e9 parameters: ~32 GB at f32,
// ~16 GB at bf16; each of its 32 layers is ~0.22e9 parameters (0.87 GB f32),
// the embedding plus classifier ~1.05e9 (4.2 GB f32). Use n_layers_override
// to build a few-layer model with per-layer cost identical to the full one.
// Filling runs on `pool` (or the calling thread), a few seconds per 1e9
// elements per core.
#pragma once

#include <cstdint>
#include <memory>

#include "absl/status/statusor.h"
#include "common/thread_pool.h"
#include "gpu_worker/model/weights.h"

namespace kvr::worker {

struct RandomWeightsOptions {
  uint64_t seed = 1;
  // When > 0, replaces config.n_layers (the returned weights' config says so).
  int n_layers_override = 0;
  // Storage of matrices and the embedding: kF32 or kBf16. Norms stay f32.
  DType dtype = DType::kF32;
  // Optional; null fills on the calling thread.
  ThreadPool* pool = nullptr;
};

// InvalidArgument for an invalid config or dtype; ResourceExhausted when the
// memory cannot be allocated.
absl::StatusOr<std::shared_ptr<const LlamaWeights>> MakeRandomWeights(
    const LlamaConfig& config, const RandomWeightsOptions& options = {});

}  // namespace kvr::worker
