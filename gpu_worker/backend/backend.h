// The op interface the decode worker's model and engine run on.
//
// A Backend owns a memory space (host for "cpu", a device for "cuda") and runs
// the ops a Llama forward pass needs on Tensors it allocated or imported.
// Backends are created by name through BackendRegistry, so the engine never
// names a concrete backend type (ggml-style registry, no #ifdef ladders).
//
// Conventions for every op:
//   * Tensors are dense row-major [rows x cols] (see tensor.h). Activations for
//     a batch of n tokens are [n x features]; multi-head activations are
//     [n x (heads * head_dim)], head h at columns [h * head_dim, (h+1) * head_dim).
//   * Compute is fp32. Weights (MatMul's w, Embedding's table) may be stored
//     in another dtype where a backend says so; activations are always kF32.
//   * Shape or dtype mismatches return InvalidArgument and leave outputs
//     unspecified; out-of-range token ids (input from outside) likewise.
//     These checks are the Backend class's own (see below), the same for
//     every backend.
//   * Outputs may alias inputs only where an op says so.
//   * Ops may run asynchronously w.r.t. the host (CUDA); Download, Argmax and
//     Synchronize wait for all earlier work. The CPU backend is synchronous.
//   * Thread-safety: one thread at a time per Backend instance (ops
//     parallelize internally). Distinct instances are independent.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "gpu_worker/backend/tensor.h"

namespace kvr::worker {

// Head layout of an attention layer. GQA: query head h reads KV head
// h / (n_heads / n_kv_heads); n_kv_heads must divide n_heads.
struct AttentionShape {
  int n_heads = 0;
  int n_kv_heads = 0;
  int head_dim = 0;
  // Score scale; 0 means 1 / sqrt(head_dim).
  float scale = 0.0f;

  int64_t q_cols() const { return int64_t{n_heads} * head_dim; }
  int64_t kv_cols() const { return int64_t{n_kv_heads} * head_dim; }
};

// Which dimensions RoPE rotates together inside one head of size d.
enum class RopeStyle {
  kInterleaved,  // pairs (2i, 2i+1): llama2.c and Meta's reference checkpoints
  kHalfSplit,    // pairs (i, i + d/2): Hugging Face "rotate_half" checkpoints
};

// Which GEMM the CPU backend's MatMul uses for many rows (prefill).
enum class CpuMatMul : uint8_t {
  // OpenBLAS when built with it and openblas_get_corename() names a core with
  // AVX2 / AVX-512 kernels, else the own kernels. The environment variable
  // KVR_CPU_MATMUL=auto|own|openblas overrides this default.
  kAuto = 0,
  kOwn = 1,       // always the own SIMD kernels
  kOpenBlas = 2,  // OpenBLAS whatever core it detected (FailedPrecondition when not built with it)
};

struct BackendOptions {
  // Host threads an op may use (CPU backend): 1 = the calling thread only;
  // 0 = hardware_concurrency().
  int num_threads = 0;
  CpuMatMul cpu_matmul = CpuMatMul::kAuto;
  // Device ordinal (CUDA backend).
  int device = 0;
};

// Ops a backend may lack; SupportsOp says whether it has one, and calling
// one it lacks is Unimplemented.
enum class OptionalOp : uint8_t {
  kTopK,  // Backend::TopK, for top_k <= MaxTopK()
};

// The public ops are non-virtual: each checks its arguments against the
// contract written on it, once for every backend (backend.cc), and then calls
// the backend's protected Do<Op>. Argument errors are InvalidArgument naming
// the op, the argument and what was wanted (e.g. "RmsNorm weight: got [1 x 8
// f32], want [1 x 16 f32]"); a tensor of another backend instance is one of
// them.
class Backend {
 public:
  virtual ~Backend() = default;

  // The registry name ("cpu", "cuda").
  virtual std::string_view name() const = 0;
  // One line for logs and model info: the name plus what the backend runs
  // on (threads, SIMD, which GEMM; device).
  virtual std::string Describe() const { return std::string(name()); }

  // Device memory now, for a backend whose tensors live in memory of their
  // own (a GPU's): free and total bytes. nullopt: its tensors are host
  // memory (the CPU backend), or the device cannot say.
  struct DeviceMemory {
    int64_t free_bytes = 0;
    int64_t total_bytes = 0;
  };
  virtual std::optional<DeviceMemory> DeviceMemoryNow() const { return std::nullopt; }

  // ---- Memory ------------------------------------------------------------
  // A zero-filled [rows x cols] tensor in this backend's memory. Negative or
  // size_t-overflowing shapes are InvalidArgument.
  absl::StatusOr<Tensor> Allocate(DType dtype, int64_t rows, int64_t cols);
  // A tensor with the contents of `host` (read-only use, e.g. weights). The
  // CPU backend aliases host.data without copying and holds `keepalive` for
  // the tensor's lifetime; a device backend copies and may drop `keepalive`.
  absl::StatusOr<Tensor> ImportHost(const HostTensor& host, std::shared_ptr<const void> keepalive);
  // Copies host bytes into `dst` / `src` into host bytes; sizes must equal
  // the tensor's bytes(). Download waits for earlier ops.
  absl::Status Upload(std::span<const std::byte> src, const Tensor& dst);
  absl::Status Download(const Tensor& src, std::span<std::byte> dst);
  // Waits until every op issued so far has finished.
  absl::Status Synchronize() { return DoSynchronize(); }

  absl::Status UploadF32(std::span<const float> src, const Tensor& dst) {
    return Upload(std::as_bytes(src), dst);
  }
  absl::Status DownloadF32(const Tensor& src, std::span<float> dst) {
    return Download(src, std::as_writable_bytes(dst));
  }

  // Several downloads that wait for the device once (a device backend
  // enqueues every copy, then waits; by default Download runs for each).
  // Each dst must hold exactly its tensor's bytes. On error the contents of
  // every dst are unspecified.
  struct DownloadItem {
    Tensor src;
    std::span<std::byte> dst;
  };
  absl::Status DownloadMany(std::span<const DownloadItem> items);

  // ---- Ops ---------------------------------------------------------------
  // out[i] = table[tokens[i]]. table [vocab x d], out [tokens.size() x d] f32.
  // tokens is host memory. A token outside [0, vocab) is InvalidArgument.
  absl::Status Embedding(const Tensor& table, std::span<const int32_t> tokens, const Tensor& out);

  // out[i] = x[i] * weight / sqrt(mean(x[i]^2) + eps). x, out [n x d];
  // weight [1 x d]. out may alias x.
  absl::Status RmsNorm(const Tensor& x, const Tensor& weight, float eps, const Tensor& out);

  // y = x * w^T: x [n x in] f32, w [out x in] (the CPU backend takes f32 or
  // bf16), y [n x out] f32. y must not alias x. Multithreaded over outputs.
  absl::Status MatMul(const Tensor& x, const Tensor& w, const Tensor& y);

  // Rotates x [n x (n_heads * head_dim)] in place: row i is at position
  // positions[i] (host memory, size n); pair k of every head turns by angle
  // positions[i] * inv_freq[k]. inv_freq [1 x head_dim/2] f32; head_dim even.
  absl::Status Rope(const Tensor& x, int n_heads, int head_dim, std::span<const int32_t> positions,
                    const Tensor& inv_freq, RopeStyle style);

  // out = silu(gate) * up, elementwise; all [n x h]. out may alias gate or up.
  absl::Status SwiGlu(const Tensor& gate, const Tensor& up, const Tensor& out);

  // x += y, elementwise; same shapes.
  absl::Status Add(const Tensor& x, const Tensor& y);

  // Causal softmax attention of one sequence. q [n x q_cols] holds queries at
  // positions first_pos .. first_pos + n - 1 (already rotated); k_cache and
  // v_cache [S x kv_cols] hold the keys/values of positions 0 .. S-1 with
  // S >= first_pos + n. Query i attends keys 0 .. first_pos + i.
  // out [n x q_cols] must not alias q.
  absl::Status Attention(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                         const AttentionShape& shape, int64_t first_pos, const Tensor& out);

  // The partial form over key rows [key_begin, key_end) of the caches (with
  // the same causal rule as Attention: query i also needs key j <= first_pos
  // + i; pass first_pos >= key_end - 1 for no masking). Per query i and head
  // h, over the visible keys j with scores s_j = scale * q . k_j:
  //   m = max s_j,  l = sum exp(s_j - m),  o = sum exp(s_j - m) v_j / l.
  // o [n x q_cols], m and l [n x n_heads]. No visible key: m = -inf, l = 0,
  // o = 0. Merging the partials of disjoint ranges that cover 0 .. first_pos
  // + i (MergeAttention) gives Attention's output. first_pos >= 0.
  absl::Status PartialAttention(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                                const AttentionShape& shape, int64_t first_pos, int64_t key_begin,
                                int64_t key_end, const Tensor& o, const Tensor& m,
                                const Tensor& l);

  // Log-sum-exp merge of partial (o2, m2, l2) into (o, m, l), in place:
  //   M = max(m, m2), L = l e^(m-M) + l2 e^(m2-M),
  //   O = (o l e^(m-M) + o2 l2 e^(m2-M)) / L.
  // o, o2 [n x heads * head_dim]; m, l, m2, l2 [n x heads]; head_dim > 0.
  // Empty partials (l = 0) are identities.
  absl::Status MergeAttention(const Tensor& o, const Tensor& m, const Tensor& l, const Tensor& o2,
                              const Tensor& m2, const Tensor& l2, int head_dim);

  // Row-wise softmax of x / temperature, in place. x [n x V]; temperature > 0.
  absl::Status Softmax(const Tensor& x, float temperature);

  // out[i] = argmax of row i of x [n x V] (the lowest index among ties);
  // out is host memory of size n; V > 0. Waits for earlier ops.
  absl::Status Argmax(const Tensor& x, std::span<int32_t> out);

  // ---- Optional ops --------------------------------------------------------
  // Whether this backend implements `op`; the default is none.
  virtual bool SupportsOp(OptionalOp op) const;

  // Exact top-k by inner product (the retrieval index's training data: each
  // prefill query's best keys). For each row i of q [n x shape.q_cols()] and
  // each query head h = kv_head * group + j of KV head `kv_head` (group =
  // n_heads / n_kv_heads), the top_k rows of k_cache [S x shape.kv_cols()]
  // among [key_begin, key_end) with the largest unscaled q_h . k, best first,
  // ties to the smaller row, ids relative to key_begin. Row (i, j) of ids and
  // scores (host memory, n * group * top_k each) starts at (i * group + j) *
  // top_k: the layout of ExactTopK over the group's queries stacked row by
  // row. kv_head kAllKvHeads does every KV head in one call, KV head g's
  // rows following at g * n * group. top_k in [1, key_end - key_begin];
  // Unimplemented when top_k > MaxTopK() or without
  // SupportsOp(OptionalOp::kTopK). Waits for the result (once).
  static constexpr int kAllKvHeads = -1;
  // The largest top_k TopK takes; 0 without SupportsOp(OptionalOp::kTopK).
  virtual int MaxTopK() const { return 0; }
  absl::Status TopK(const Tensor& q, const Tensor& k_cache, const AttentionShape& shape,
                    int kv_head, int64_t key_begin, int64_t key_end, int top_k,
                    std::span<int64_t> ids, std::span<float> scores);

 protected:
  // The implementations. Each is called only by the public op of its name,
  // after that op checked every argument its contract states (ownership,
  // dtypes, shapes, ranges, aliasing, output sizes, op support), so they do
  // not check again. They may still fail with their device's errors, and
  // with Unimplemented for valid arguments a backend does not handle (said
  // in the backend's header).
  virtual absl::StatusOr<Tensor> DoAllocate(DType dtype, int64_t rows, int64_t cols) = 0;
  virtual absl::StatusOr<Tensor> DoImportHost(const HostTensor& host,
                                              std::shared_ptr<const void> keepalive) = 0;
  virtual absl::Status DoUpload(std::span<const std::byte> src, const Tensor& dst) = 0;
  virtual absl::Status DoDownload(const Tensor& src, std::span<std::byte> dst) = 0;
  virtual absl::Status DoSynchronize() = 0;
  // The default calls DoDownload for each item.
  virtual absl::Status DoDownloadMany(std::span<const DownloadItem> items);

  virtual absl::Status DoEmbedding(const Tensor& table, std::span<const int32_t> tokens,
                                   const Tensor& out) = 0;
  virtual absl::Status DoRmsNorm(const Tensor& x, const Tensor& weight, float eps,
                                 const Tensor& out) = 0;
  virtual absl::Status DoMatMul(const Tensor& x, const Tensor& w, const Tensor& y) = 0;
  virtual absl::Status DoRope(const Tensor& x, int n_heads, int head_dim,
                              std::span<const int32_t> positions, const Tensor& inv_freq,
                              RopeStyle style) = 0;
  virtual absl::Status DoSwiGlu(const Tensor& gate, const Tensor& up, const Tensor& out) = 0;
  virtual absl::Status DoAdd(const Tensor& x, const Tensor& y) = 0;
  virtual absl::Status DoAttention(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                                   const AttentionShape& shape, int64_t first_pos,
                                   const Tensor& out) = 0;
  virtual absl::Status DoPartialAttention(const Tensor& q, const Tensor& k_cache,
                                          const Tensor& v_cache, const AttentionShape& shape,
                                          int64_t first_pos, int64_t key_begin, int64_t key_end,
                                          const Tensor& o, const Tensor& m, const Tensor& l) = 0;
  virtual absl::Status DoMergeAttention(const Tensor& o, const Tensor& m, const Tensor& l,
                                        const Tensor& o2, const Tensor& m2, const Tensor& l2,
                                        int head_dim) = 0;
  virtual absl::Status DoSoftmax(const Tensor& x, float temperature) = 0;
  virtual absl::Status DoArgmax(const Tensor& x, std::span<int32_t> out) = 0;
  // Only reached when SupportsOp(OptionalOp::kTopK) and top_k <= MaxTopK();
  // the default is Unimplemented.
  virtual absl::Status DoTopK(const Tensor& q, const Tensor& k_cache, const AttentionShape& shape,
                              int kv_head, int64_t key_begin, int64_t key_end, int top_k,
                              std::span<int64_t> ids, std::span<float> scores);
};

using BackendFactory =
    std::function<absl::StatusOr<std::unique_ptr<Backend>>(const BackendOptions&)>;

// Backends by name. "cpu" is always registered. Optional backends (a separate
// target, e.g. CUDA) call Register from their own initialization code. All
// functions are thread-safe.
class BackendRegistry {
 public:
  // NotFound (listing the registered names) for an unknown name.
  static absl::StatusOr<std::unique_ptr<Backend>> Create(std::string_view name,
                                                         const BackendOptions& options = {});
  // AlreadyExists if `name` is taken; InvalidArgument for a null factory.
  static absl::Status Register(std::string name, BackendFactory factory);
  static std::vector<std::string> Names();
};

}  // namespace kvr::worker
