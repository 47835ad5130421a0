#include "gpu_worker/backend/cpu/cpu_backend.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/simd/kernels.h"
#include "gpu_worker/backend/cpu/openblas_gemm.h"
#include "common/status.h"
#include "common/thread_pool.h"

namespace kvr::worker {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Grows a thread-local scratch vector to at least n floats; steady state
// reuses it.
float* Scratch(std::vector<float>& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

// MatMuls with at least this many rows go to OpenBLAS when it is used:
// below it the product is close to matrix-vector, memory-bound, and the own
// kernels are as fast (docs/benchmarks.md §6).
constexpr int64_t kBlasMinRows = 16;

// Output rows per unit of the MatMul thread split: a multiple of every SIMD
// table's tile height (4 or 8), so only the matrix's last block has a
// partial tile.
constexpr size_t kGemmRowBlock = 32;

const char* IsaName(simd::Isa isa) {
  switch (isa) {
    case simd::Isa::kAvx512:
      return "avx512";
    case simd::Isa::kAvx2:
      return "avx2";
    case simd::Isa::kScalar:
      break;
  }
  return "scalar";
}

class CpuBackend final : public Backend {
 public:
  CpuBackend(int threads, bool use_blas, bool per_dot, std::string blas_core)
      : threads_(threads),
        use_blas_(use_blas),
        per_dot_(per_dot),
        blas_core_(std::move(blas_core)),
        pool_(static_cast<size_t>(threads - 1)),
        k_(simd::Active()) {}

  std::string_view name() const override { return "cpu"; }

  std::string Describe() const override {
    const std::string core = blas_core_.empty() ? "not built" : blas_core_;
    const absl::string_view own = per_dot_ ? "own kernels (per-dot)" : "own kernels (blocked)";
    return absl::StrCat("cpu (", threads_, " threads, simd ", IsaName(k_.isa),
                        ", matmul: ",
                        use_blas_ ? absl::StrCat("OpenBLAS sgemm [core ", core, "] for f32 >= ",
                                                 kBlasMinRows, " rows, ", own, " otherwise")
                                  : absl::StrCat(own, " [OpenBLAS core ", core, "]"),
                        ")");
  }

 protected:
  // Backend's public ops validated the arguments. Unimplemented for valid
  // ones: f16 MatMul weights.
  absl::StatusOr<Tensor> DoAllocate(DType dtype, int64_t rows, int64_t cols) override {
    // Allocate checked that the byte size fits in size_t; the padding to 64
    // bytes must fit too.
    const size_t bytes = static_cast<size_t>(rows) * static_cast<size_t>(cols) * DTypeSize(dtype);
    if (bytes > std::numeric_limits<size_t>::max() - 64) {
      return absl::InvalidArgumentError(
          absl::StrCat("Allocate: [", rows, " x ", cols, "] overflows size_t"));
    }
    const size_t padded = std::max<size_t>(64, (bytes + 63) / 64 * 64);
    void* p = std::aligned_alloc(64, padded);
    if (p == nullptr) {
      return absl::ResourceExhaustedError(
          absl::StrCat("Allocate: cannot allocate ", padded, " bytes"));
    }
    std::memset(p, 0, padded);
    std::shared_ptr<void> storage(p, [](void* q) { std::free(q); });
    return Tensor(this, std::move(storage), p, dtype, rows, cols);
  }

  absl::StatusOr<Tensor> DoImportHost(const HostTensor& host,
                                      std::shared_ptr<const void> keepalive) override {
    return Tensor(this, std::const_pointer_cast<void>(std::move(keepalive)),
                  const_cast<void*>(host.data), host.dtype, host.rows, host.cols);
  }

  absl::Status DoUpload(std::span<const std::byte> src, const Tensor& dst) override {
    if (!src.empty()) std::memcpy(dst.data(), src.data(), src.size());
    return absl::OkStatus();
  }

  absl::Status DoDownload(const Tensor& src, std::span<std::byte> dst) override {
    if (!dst.empty()) std::memcpy(dst.data(), src.data(), dst.size());
    return absl::OkStatus();
  }

  absl::Status DoSynchronize() override { return absl::OkStatus(); }

  absl::Status DoEmbedding(const Tensor& table, std::span<const int32_t> tokens,
                           const Tensor& out) override {
    const size_t d = static_cast<size_t>(table.cols());
    for (size_t i = 0; i < tokens.size(); ++i) {
      const size_t t = static_cast<size_t>(tokens[i]);
      float* dst = out.data_as<float>() + i * d;
      switch (table.dtype()) {
        case DType::kF32:
          std::memcpy(dst, table.data_as<const float>() + t * d, d * sizeof(float));
          break;
        case DType::kBf16:
          k_.bf16_to_fp32(table.data_as<const uint16_t>() + t * d, dst, d);
          break;
        case DType::kF16:
          k_.fp16_to_fp32(table.data_as<const uint16_t>() + t * d, dst, d);
          break;
      }
    }
    return absl::OkStatus();
  }

  absl::Status DoRmsNorm(const Tensor& x, const Tensor& weight, float eps,
                         const Tensor& out) override {
    const size_t d = static_cast<size_t>(x.cols());
    const float* w = weight.data_as<const float>();
    For(static_cast<size_t>(x.rows()), 1, [&](size_t b, size_t e) {
      for (size_t i = b; i < e; ++i) {
        const float* xi = x.data_as<const float>() + i * d;
        float* oi = out.data_as<float>() + i * d;
        const float ss = k_.dot(xi, xi, d) / static_cast<float>(d) + eps;
        const float inv = 1.0f / std::sqrt(ss);
        for (size_t j = 0; j < d; ++j) oi[j] = w[j] * (inv * xi[j]);
      }
    });
    return absl::OkStatus();
  }

  absl::Status DoMatMul(const Tensor& x, const Tensor& w, const Tensor& y) override {
    if (w.dtype() == DType::kF16) {
      return absl::UnimplementedError("MatMul: f16 weights are not supported on cpu yet");
    }
    const size_t n = static_cast<size_t>(x.rows());
    const size_t in = static_cast<size_t>(x.cols());
    const size_t out = static_cast<size_t>(w.rows());
    const float* xd = x.data_as<const float>();
    float* yd = y.data_as<float>();
    const bool bf16 = w.dtype() == DType::kBf16;
    if (use_blas_ && !bf16 && x.rows() >= kBlasMinRows) {
      OpenBlasSgemmNT(threads_, n, in, out, xd, w.data_as<const float>(), yd);
      return absl::OkStatus();
    }
    if (!per_dot_) {
      // Split the output features across threads in blocks of kGemmRowBlock
      // rows (the kernels' tile heights divide it); each thread's rows go
      // through the register-blocked matmul kernel with every token.
      const size_t blocks = (out + kGemmRowBlock - 1) / kGemmRowBlock;
      const size_t grain = std::max<size_t>(1, blocks / (static_cast<size_t>(threads_) * 4));
      For(blocks, grain, [&](size_t b, size_t e) {
        const size_t o0 = b * kGemmRowBlock;
        const size_t o1 = std::min(out, e * kGemmRowBlock);
        if (bf16) {
          k_.matmul_bf16(xd, n, in, w.data_as<const uint16_t>() + o0 * in, o1 - o0, in, in,
                         yd + o0, out);
        } else {
          k_.matmul_f32(xd, n, in, w.data_as<const float>() + o0 * in, o1 - o0, in, in,
                        yd + o0, out);
        }
      });
      return absl::OkStatus();
    }
    // KVR_CPU_GEMM=dot: the per-pair path (one dot per token and output).
    // Split the output features across threads; every W row is read once and
    // reused for all n tokens.
    const size_t grain = std::max<size_t>(1, out / (static_cast<size_t>(threads_) * 4));
    For(out, grain, [&](size_t b, size_t e) {
      for (size_t o = b; o < e; ++o) {
        if (bf16) {
          const uint16_t* wr = w.data_as<const uint16_t>() + o * in;
          for (size_t i = 0; i < n; ++i) yd[i * out + o] = k_.dot_bf16(xd + i * in, wr, in);
        } else {
          const float* wr = w.data_as<const float>() + o * in;
          for (size_t i = 0; i < n; ++i) yd[i * out + o] = k_.dot(xd + i * in, wr, in);
        }
      }
    });
    return absl::OkStatus();
  }

  absl::Status DoRope(const Tensor& x, int n_heads, int head_dim,
                      std::span<const int32_t> positions, const Tensor& inv_freq,
                      RopeStyle style) override {
    const size_t half = static_cast<size_t>(head_dim / 2);
    const size_t cols = static_cast<size_t>(x.cols());
    const float* freq = inv_freq.data_as<const float>();
    For(positions.size(), 1, [&](size_t b, size_t e) {
      thread_local std::vector<float> scratch;
      float* cs = Scratch(scratch, 2 * half);
      for (size_t i = b; i < e; ++i) {
        const float pos = static_cast<float>(positions[i]);
        for (size_t k = 0; k < half; ++k) {
          const float angle = pos * freq[k];
          cs[2 * k] = std::cos(angle);
          cs[2 * k + 1] = std::sin(angle);
        }
        float* row = x.data_as<float>() + i * cols;
        for (int h = 0; h < n_heads; ++h) {
          float* v = row + static_cast<size_t>(h) * head_dim;
          for (size_t k = 0; k < half; ++k) {
            const size_t a = style == RopeStyle::kInterleaved ? 2 * k : k;
            const size_t c = style == RopeStyle::kInterleaved ? 2 * k + 1 : k + half;
            const float v0 = v[a], v1 = v[c];
            v[a] = v0 * cs[2 * k] - v1 * cs[2 * k + 1];
            v[c] = v0 * cs[2 * k + 1] + v1 * cs[2 * k];
          }
        }
      }
    });
    return absl::OkStatus();
  }

  absl::Status DoSwiGlu(const Tensor& gate, const Tensor& up, const Tensor& out) override {
    const float* g = gate.data_as<const float>();
    const float* u = up.data_as<const float>();
    float* o = out.data_as<float>();
    For(gate.numel(), 4096, [&](size_t b, size_t e) {
      for (size_t i = b; i < e; ++i) {
        float v = g[i];
        v *= 1.0f / (1.0f + std::exp(-v));
        o[i] = v * u[i];
      }
    });
    return absl::OkStatus();
  }

  absl::Status DoAdd(const Tensor& x, const Tensor& y) override {
    float* a = x.data_as<float>();
    const float* b = y.data_as<const float>();
    for (size_t i = 0, n = x.numel(); i < n; ++i) a[i] += b[i];
    return absl::OkStatus();
  }

  absl::Status DoAttention(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                           const AttentionShape& shape, int64_t first_pos,
                           const Tensor& out) override {
    Attend(q, k_cache, v_cache, shape, first_pos, 0, first_pos + q.rows(), out.data_as<float>(),
           nullptr, nullptr);
    return absl::OkStatus();
  }

  absl::Status DoPartialAttention(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                                  const AttentionShape& shape, int64_t first_pos,
                                  int64_t key_begin, int64_t key_end, const Tensor& o,
                                  const Tensor& m, const Tensor& l) override {
    Attend(q, k_cache, v_cache, shape, first_pos, key_begin, key_end, o.data_as<float>(),
           m.data_as<float>(), l.data_as<float>());
    return absl::OkStatus();
  }

  absl::Status DoMergeAttention(const Tensor& o, const Tensor& m, const Tensor& l,
                                const Tensor& o2, const Tensor& m2, const Tensor& l2,
                                int head_dim) override {
    const size_t hd = static_cast<size_t>(head_dim);
    for (size_t r = 0, rows = m.numel(); r < rows; ++r) {
      float& ma = m.data_as<float>()[r];
      float& la = l.data_as<float>()[r];
      const float mb = m2.data_as<const float>()[r];
      const float lb = l2.data_as<const float>()[r];
      float* oa = o.data_as<float>() + r * hd;
      const float* ob = o2.data_as<const float>() + r * hd;
      if (lb == 0.0f) continue;
      if (la == 0.0f) {
        std::memcpy(oa, ob, hd * sizeof(float));
        ma = mb;
        la = lb;
        continue;
      }
      const float mx = std::max(ma, mb);
      const float wa = la * std::exp(ma - mx);
      const float wb = lb * std::exp(mb - mx);
      const float total = wa + wb;
      const float ca = wa / total, cb = wb / total;
      for (size_t j = 0; j < hd; ++j) oa[j] = oa[j] * ca + ob[j] * cb;
      ma = mx;
      la = total;
    }
    return absl::OkStatus();
  }

  absl::Status DoSoftmax(const Tensor& x, float temperature) override {
    const size_t v = static_cast<size_t>(x.cols());
    const float inv_t = 1.0f / temperature;
    for (int64_t i = 0; i < x.rows(); ++i) {
      float* row = x.data_as<float>() + i * v;
      if (inv_t != 1.0f) {
        for (size_t j = 0; j < v; ++j) row[j] *= inv_t;
      }
      const float mx = k_.max(row, v);
      const float sum = k_.exp_shift_sum(row, mx, row, v);
      const float inv = 1.0f / sum;
      for (size_t j = 0; j < v; ++j) row[j] *= inv;
    }
    return absl::OkStatus();
  }

  absl::Status DoArgmax(const Tensor& x, std::span<int32_t> out) override {
    const size_t v = static_cast<size_t>(x.cols());
    for (size_t i = 0; i < out.size(); ++i) {
      const float* row = x.data_as<const float>() + i * v;
      size_t best = 0;
      for (size_t j = 1; j < v; ++j) {
        if (row[j] > row[best]) best = j;
      }
      out[i] = static_cast<int32_t>(best);
    }
    return absl::OkStatus();
  }

 private:
  template <typename Fn>
  void For(size_t n, size_t grain, const Fn& fn) {
    if (threads_ <= 1 || n <= grain) {
      fn(size_t{0}, n);
      return;
    }
    pool_.ParallelFor(n, grain, fn);
  }

  // Softmax attention of every (query, head) over keys [key_begin, key_end)
  // that are also <= first_pos + query index. Writes normalized o; m and l
  // when non-null.
  void Attend(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
              const AttentionShape& shape, int64_t first_pos, int64_t key_begin, int64_t key_end,
              float* o, float* m, float* l) {
    const size_t n = static_cast<size_t>(q.rows());
    const size_t heads = static_cast<size_t>(shape.n_heads);
    const size_t hd = static_cast<size_t>(shape.head_dim);
    const size_t group = heads / static_cast<size_t>(shape.n_kv_heads);
    const size_t q_cols = static_cast<size_t>(shape.q_cols());
    const size_t kv_cols = static_cast<size_t>(shape.kv_cols());
    const float scale =
        shape.scale != 0.0f ? shape.scale : 1.0f / std::sqrt(static_cast<float>(hd));
    const float* qd = q.data_as<const float>();
    const float* kd = k_cache.data_as<const float>();
    const float* vd = v_cache.data_as<const float>();
    For(n * heads, 1, [&](size_t b, size_t e) {
      thread_local std::vector<float> scratch;
      for (size_t item = b; item < e; ++item) {
        const size_t i = item / heads, h = item % heads;
        const size_t kvh = h / group;
        const int64_t visible_end =
            std::min<int64_t>(key_end, first_pos + static_cast<int64_t>(i) + 1);
        const size_t count =
            visible_end > key_begin ? static_cast<size_t>(visible_end - key_begin) : 0;
        float* oh = o + i * q_cols + h * hd;
        std::memset(oh, 0, hd * sizeof(float));
        if (count == 0) {
          if (m != nullptr) m[i * heads + h] = kNegInf;
          if (l != nullptr) l[i * heads + h] = 0.0f;
          continue;
        }
        float* s = Scratch(scratch, count);
        const float* kbase = kd + static_cast<size_t>(key_begin) * kv_cols + kvh * hd;
        const float* vbase = vd + static_cast<size_t>(key_begin) * kv_cols + kvh * hd;
        k_.dot_batch(qd + i * q_cols + h * hd, kbase, count, hd, kv_cols, s);
        for (size_t j = 0; j < count; ++j) s[j] *= scale;
        const float mx = k_.max(s, count);
        const float sum = k_.exp_shift_sum(s, mx, s, count);
        const float inv = 1.0f / sum;
        for (size_t j = 0; j < count; ++j) k_.axpy(s[j] * inv, vbase + j * kv_cols, oh, hd);
        if (m != nullptr) m[i * heads + h] = mx;
        if (l != nullptr) l[i * heads + h] = sum;
      }
    });
  }

  const int threads_;
  const bool use_blas_;     // many-row f32 MatMuls call OpenBLAS
  const bool per_dot_;      // KVR_CPU_GEMM=dot: one dot per (token, output)
  const std::string blas_core_;  // openblas_get_corename(), "" without OpenBLAS
  ThreadPool pool_;
  const simd::Kernels& k_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Backend>> NewCpuBackend(const BackendOptions& options) {
  if (options.num_threads < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("cpu backend: num_threads ", options.num_threads, " < 0"));
  }
  int threads = options.num_threads;
  if (threads == 0) threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  CpuMatMul mode = options.cpu_matmul;
  if (mode == CpuMatMul::kAuto) {
    if (const char* env = std::getenv("KVR_CPU_MATMUL"); env != nullptr && *env != '\0') {
      const std::string_view v(env);
      if (v == "own") {
        mode = CpuMatMul::kOwn;
      } else if (v == "openblas") {
        mode = CpuMatMul::kOpenBlas;
      } else if (v != "auto") {
        return absl::InvalidArgumentError(absl::StrCat("cpu backend: KVR_CPU_MATMUL=\"",
                                                       std::string(v),
                                                       "\" is not one of auto, own, openblas"));
      }
    }
  }
  bool per_dot = false;
  if (const char* env = std::getenv("KVR_CPU_GEMM"); env != nullptr && *env != '\0') {
    const std::string_view v(env);
    if (v == "dot") {
      per_dot = true;
    } else if (v != "blocked") {
      return absl::InvalidArgumentError(absl::StrCat(
          "cpu backend: KVR_CPU_GEMM=\"", std::string(v), "\" is not one of blocked, dot"));
    }
  }
  const std::string core = OpenBlasCoreName();
  if (mode == CpuMatMul::kOpenBlas && !OpenBlasBuilt()) {
    return absl::FailedPreconditionError(
        "cpu backend: OpenBLAS matmul requested but kvr was not built with OpenBLAS "
        "(KVR_WITH_OPENBLAS)");
  }
  const bool use_blas = mode == CpuMatMul::kOpenBlas ||
                        (mode == CpuMatMul::kAuto && OpenBlasBuilt() && OpenBlasCoreIsModern(core));
  return std::unique_ptr<Backend>(new CpuBackend(threads, use_blas, per_dot, core));
}

}  // namespace kvr::worker
