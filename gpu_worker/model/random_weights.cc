#include "gpu_worker/model/random_weights.h"

#include <cmath>
#include <new>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/half.h"

namespace kvr::worker {
namespace {

uint64_t SplitMix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// Uniform in [-1, 1) from (stream, index).
inline float Uniform(uint64_t stream, uint64_t index) {
  const uint64_t bits = SplitMix64(stream ^ SplitMix64(index));
  return static_cast<float>(static_cast<double>(bits >> 40) * (2.0 / 16777216.0) - 1.0);
}

struct Storage {
  std::vector<std::unique_ptr<std::byte[]>> buffers;
};

class Filler {
 public:
  Filler(const RandomWeightsOptions& o, Storage* storage) : o_(o), storage_(storage) {}

  // A [rows x cols] tensor with values center + half_width * U[-1, 1).
  absl::StatusOr<HostTensor> Make(int64_t rows, int64_t cols, DType dtype, float center,
                                  float half_width) {
    const uint64_t stream = SplitMix64(o_.seed * 0x100000001b3ull + next_id_++);
    const size_t n = static_cast<size_t>(rows) * static_cast<size_t>(cols);
    std::unique_ptr<std::byte[]> buf(new (std::nothrow) std::byte[n * DTypeSize(dtype)]);
    if (buf == nullptr) {
      return absl::ResourceExhaustedError(absl::StrCat("random weights: cannot allocate ",
                                                       n * DTypeSize(dtype), " bytes for [", rows,
                                                       " x ", cols, "]"));
    }
    std::byte* p = buf.get();
    auto fill = [&](size_t b, size_t e) {
      if (dtype == DType::kF32) {
        float* f = reinterpret_cast<float*>(p);
        for (size_t i = b; i < e; ++i) f[i] = center + half_width * Uniform(stream, i);
      } else {
        uint16_t* h = reinterpret_cast<uint16_t*>(p);
        for (size_t i = b; i < e; ++i) h[i] = FloatToBf16(center + half_width * Uniform(stream, i));
      }
    };
    constexpr size_t kGrain = size_t{1} << 20;
    if (o_.pool != nullptr && n > kGrain) {
      o_.pool->ParallelFor(n, kGrain, fill);
    } else {
      fill(0, n);
    }
    storage_->buffers.push_back(std::move(buf));
    return HostTensor{dtype, rows, cols, p};
  }

  absl::StatusOr<HostTensor> Matrix(int64_t rows, int64_t cols) {
    // Uniform on [-a, a) has std a / sqrt(3); want 1 / sqrt(cols).
    return Make(rows, cols, o_.dtype, 0.0f, std::sqrt(3.0f / static_cast<float>(cols)));
  }
  absl::StatusOr<HostTensor> Norm(int64_t cols) { return Make(1, cols, DType::kF32, 1.0f, 0.1f); }

 private:
  const RandomWeightsOptions& o_;
  Storage* storage_;
  uint64_t next_id_ = 0;
};

}  // namespace

absl::StatusOr<std::shared_ptr<const LlamaWeights>> MakeRandomWeights(
    const LlamaConfig& config, const RandomWeightsOptions& options) {
  if (options.dtype != DType::kF32 && options.dtype != DType::kBf16) {
    return absl::InvalidArgumentError(absl::StrCat(
        "random weights: dtype ", DTypeName(options.dtype), " not supported (f32 or bf16)"));
  }
  if (options.n_layers_override < 0) {
    return absl::InvalidArgumentError("random weights: n_layers_override < 0");
  }
  auto w = std::make_shared<LlamaWeights>();
  w->config = config;
  if (options.n_layers_override > 0) w->config.n_layers = options.n_layers_override;
  KVR_RETURN_IF_ERROR(w->config.Validate());
  const LlamaConfig& c = w->config;

  auto storage = std::make_shared<Storage>();
  Filler f(options, storage.get());
  KVR_ASSIGN_OR_RETURN(w->token_embedding,
                       f.Make(c.vocab_size, c.dim, options.dtype, 0.0f, std::sqrt(3.0f)));
  w->layers.resize(static_cast<size_t>(c.n_layers));
  for (LlamaLayerWeights& lw : w->layers) {
    KVR_ASSIGN_OR_RETURN(lw.attn_norm, f.Norm(c.dim));
    KVR_ASSIGN_OR_RETURN(lw.wq, f.Matrix(c.q_dim(), c.dim));
    KVR_ASSIGN_OR_RETURN(lw.wk, f.Matrix(c.kv_dim(), c.dim));
    KVR_ASSIGN_OR_RETURN(lw.wv, f.Matrix(c.kv_dim(), c.dim));
    KVR_ASSIGN_OR_RETURN(lw.wo, f.Matrix(c.dim, c.q_dim()));
    KVR_ASSIGN_OR_RETURN(lw.ffn_norm, f.Norm(c.dim));
    KVR_ASSIGN_OR_RETURN(lw.w1, f.Matrix(c.hidden_dim, c.dim));
    KVR_ASSIGN_OR_RETURN(lw.w2, f.Matrix(c.dim, c.hidden_dim));
    KVR_ASSIGN_OR_RETURN(lw.w3, f.Matrix(c.hidden_dim, c.dim));
  }
  KVR_ASSIGN_OR_RETURN(w->final_norm, f.Norm(c.dim));
  if (c.tied_embeddings) {
    w->classifier = w->token_embedding;
  } else {
    KVR_ASSIGN_OR_RETURN(w->classifier, f.Matrix(c.vocab_size, c.dim));
  }
  w->storage = std::move(storage);
  KVR_RETURN_IF_ERROR(w->Validate());
  return std::shared_ptr<const LlamaWeights>(std::move(w));
}

}  // namespace kvr::worker
