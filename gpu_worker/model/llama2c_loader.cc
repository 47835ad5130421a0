#include "gpu_worker/model/llama2c_loader.h"

#include <cstring>

#include "absl/strings/str_cat.h"
#include "gpu_worker/model/model_files.h"

namespace kvr::worker {
namespace {

constexpr size_t kHeaderBytes = 7 * sizeof(int32_t);

// Walks the file's sections in order, checking each against the file size.
class SectionReader {
 public:
  SectionReader(std::span<const std::byte> file, const std::string& name)
      : file_(file), name_(name), offset_(kHeaderBytes) {}

  // The next `count` floats (count = product of `factors`), described as
  // `what` ("wq (n_layers * dim * dim)") in errors.
  absl::StatusOr<const float*> Take(const char* what, std::initializer_list<uint64_t> factors) {
    uint64_t count = 1;
    for (uint64_t f : factors) {
      if (__builtin_mul_overflow(count, f, &count)) return Overflow(what);
    }
    uint64_t bytes = 0, end = 0;
    if (__builtin_mul_overflow(count, uint64_t{sizeof(float)}, &bytes) ||
        __builtin_add_overflow(uint64_t{offset_}, bytes, &end)) {
      return Overflow(what);
    }
    if (end > file_.size()) {
      return absl::DataLossError(absl::StrCat("llama2.c file ", name_, " is ", file_.size(),
                                              " bytes, but section ", what, " of ", count,
                                              " floats spans bytes [", offset_, ", ", end,
                                              "): the file is truncated or its header is wrong"));
    }
    const float* p = reinterpret_cast<const float*>(file_.data() + offset_);
    offset_ = static_cast<size_t>(end);
    return p;
  }

  size_t offset() const { return offset_; }

 private:
  absl::Status Overflow(const char* what) const {
    return absl::InvalidArgumentError(absl::StrCat("llama2.c file ", name_, ": size of section ",
                                                   what, " overflows; the header is wrong"));
  }

  std::span<const std::byte> file_;
  const std::string& name_;
  size_t offset_;
};

absl::Status Positive(const std::string& name, const char* field, int32_t v) {
  if (v <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("llama2.c file ", name, ": header field ", field,
                                                   " = ", v, " must be positive"));
  }
  return absl::OkStatus();
}

HostTensor F32View(const float* p, int64_t rows, int64_t cols) {
  return HostTensor{DType::kF32, rows, cols, p};
}

}  // namespace

absl::StatusOr<std::shared_ptr<const LlamaWeights>> ParseLlama2c(
    std::span<const std::byte> file, std::shared_ptr<const void> keepalive,
    const std::string& name) {
  if (file.size() < kHeaderBytes) {
    return absl::DataLossError(absl::StrCat("llama2.c file ", name, " is ", file.size(),
                                            " bytes, shorter than the 28-byte header"));
  }
  int32_t h[7];
  std::memcpy(h, file.data(), kHeaderBytes);
  const int32_t dim = h[0], hidden_dim = h[1], n_layers = h[2], n_heads = h[3], n_kv_heads = h[4],
                raw_vocab = h[5], seq_len = h[6];
  KVR_RETURN_IF_ERROR(Positive(name, "dim", dim));
  KVR_RETURN_IF_ERROR(Positive(name, "hidden_dim", hidden_dim));
  KVR_RETURN_IF_ERROR(Positive(name, "n_layers", n_layers));
  KVR_RETURN_IF_ERROR(Positive(name, "n_heads", n_heads));
  KVR_RETURN_IF_ERROR(Positive(name, "n_kv_heads", n_kv_heads));
  KVR_RETURN_IF_ERROR(Positive(name, "seq_len", seq_len));
  if (raw_vocab == 0 || raw_vocab == INT32_MIN) {
    return absl::InvalidArgumentError(absl::StrCat(
        "llama2.c file ", name, ": header field vocab_size = ", raw_vocab, " is invalid"));
  }
  if (dim % n_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat("llama2.c file ", name,
                                                   ": header field n_heads = ", n_heads,
                                                   " does not divide dim = ", dim));
  }
  if (n_kv_heads > n_heads || n_heads % n_kv_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat("llama2.c file ", name,
                                                   ": header field n_kv_heads = ", n_kv_heads,
                                                   " does not divide n_heads = ", n_heads));
  }

  auto w = std::make_shared<LlamaWeights>();
  LlamaConfig& c = w->config;
  c.dim = dim;
  c.hidden_dim = hidden_dim;
  c.n_layers = n_layers;
  c.n_heads = n_heads;
  c.n_kv_heads = n_kv_heads;
  c.head_dim = dim / n_heads;
  c.vocab_size = raw_vocab < 0 ? -raw_vocab : raw_vocab;
  c.seq_len = seq_len;
  c.rope_theta = 10000.0f;
  c.rms_eps = 1e-5f;
  c.tied_embeddings = raw_vocab > 0;
  c.rope_style = RopeStyle::kInterleaved;
  if (absl::Status s = c.Validate(); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("llama2.c file ", name, ": ", s.message()));
  }

  const uint64_t L = static_cast<uint64_t>(n_layers), D = static_cast<uint64_t>(dim),
                 H = static_cast<uint64_t>(hidden_dim), V = static_cast<uint64_t>(c.vocab_size),
                 Q = static_cast<uint64_t>(c.q_dim()), KV = static_cast<uint64_t>(c.kv_dim()),
                 HS = static_cast<uint64_t>(c.head_dim), S = static_cast<uint64_t>(seq_len);
  SectionReader r(file, name);
  KVR_ASSIGN_OR_RETURN(const float* emb,
                       r.Take("token_embedding_table (vocab_size * dim)", {V, D}));
  KVR_ASSIGN_OR_RETURN(const float* rms_att, r.Take("rms_att_weight (n_layers * dim)", {L, D}));
  KVR_ASSIGN_OR_RETURN(const float* wq,
                       r.Take("wq (n_layers * dim * n_heads * head_size)", {L, D, Q}));
  KVR_ASSIGN_OR_RETURN(const float* wk,
                       r.Take("wk (n_layers * dim * n_kv_heads * head_size)", {L, D, KV}));
  KVR_ASSIGN_OR_RETURN(const float* wv,
                       r.Take("wv (n_layers * dim * n_kv_heads * head_size)", {L, D, KV}));
  KVR_ASSIGN_OR_RETURN(const float* wo,
                       r.Take("wo (n_layers * n_heads * head_size * dim)", {L, Q, D}));
  KVR_ASSIGN_OR_RETURN(const float* rms_ffn, r.Take("rms_ffn_weight (n_layers * dim)", {L, D}));
  KVR_ASSIGN_OR_RETURN(const float* w1, r.Take("w1 (n_layers * hidden_dim * dim)", {L, H, D}));
  KVR_ASSIGN_OR_RETURN(const float* w2, r.Take("w2 (n_layers * dim * hidden_dim)", {L, D, H}));
  KVR_ASSIGN_OR_RETURN(const float* w3, r.Take("w3 (n_layers * hidden_dim * dim)", {L, H, D}));
  KVR_ASSIGN_OR_RETURN(const float* rms_final, r.Take("rms_final_weight (dim)", {D}));
  KVR_ASSIGN_OR_RETURN(const float* fcr,
                       r.Take("freq_cis_real (seq_len * head_size / 2)", {S, HS / 2}));
  KVR_ASSIGN_OR_RETURN(const float* fci,
                       r.Take("freq_cis_imag (seq_len * head_size / 2)", {S, HS / 2}));
  (void)fcr;
  (void)fci;
  const float* wcls = emb;
  if (!c.tied_embeddings) {
    KVR_ASSIGN_OR_RETURN(wcls,
                         r.Take("wcls (vocab_size * dim; vocab_size < 0 means unshared)", {V, D}));
  }
  if (r.offset() != file.size()) {
    return absl::DataLossError(
        absl::StrCat("llama2.c file ", name, " has ", file.size() - r.offset(),
                     " bytes after the last section (ends at byte ", r.offset(),
                     "); the header is wrong (vocab_size = ", raw_vocab,
                     ": negative means an unshared classifier follows)"));
  }

  w->token_embedding = F32View(emb, c.vocab_size, dim);
  w->classifier = F32View(wcls, c.vocab_size, dim);
  w->final_norm = F32View(rms_final, 1, dim);
  w->layers.resize(static_cast<size_t>(n_layers));
  for (uint64_t l = 0; l < L; ++l) {
    LlamaLayerWeights& lw = w->layers[l];
    lw.attn_norm = F32View(rms_att + l * D, 1, dim);
    lw.wq = F32View(wq + l * D * Q, c.q_dim(), dim);
    lw.wk = F32View(wk + l * D * KV, c.kv_dim(), dim);
    lw.wv = F32View(wv + l * D * KV, c.kv_dim(), dim);
    lw.wo = F32View(wo + l * Q * D, dim, c.q_dim());
    lw.ffn_norm = F32View(rms_ffn + l * D, 1, dim);
    lw.w1 = F32View(w1 + l * H * D, hidden_dim, dim);
    lw.w2 = F32View(w2 + l * D * H, dim, hidden_dim);
    lw.w3 = F32View(w3 + l * H * D, hidden_dim, dim);
  }
  w->storage = std::move(keepalive);
  KVR_RETURN_IF_ERROR(w->Validate());
  return std::shared_ptr<const LlamaWeights>(std::move(w));
}

absl::StatusOr<std::shared_ptr<const LlamaWeights>> LoadLlama2c(const std::string& path) {
  KVR_ASSIGN_OR_RETURN(MappedFile file, MapFile(path, "llama2.c file"));
  if (file.bytes.size() < kHeaderBytes) {
    return absl::DataLossError(absl::StrCat("llama2.c file ", path, " is ", file.bytes.size(),
                                            " bytes, shorter than the 28-byte header"));
  }
  return ParseLlama2c(file.bytes, std::move(file.keepalive), path);
}

}  // namespace kvr::worker
