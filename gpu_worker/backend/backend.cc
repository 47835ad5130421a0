#include "gpu_worker/backend/backend.h"

#include <map>
#include <mutex>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status.h"
#include "gpu_worker/backend/cpu/cpu_backend.h"

namespace kvr::worker {
namespace {

std::string ShapeStr(const Tensor& t) {
  return absl::StrCat("[", t.rows(), " x ", t.cols(), " ", DTypeName(t.dtype()), "]");
}

// `t` was made by `backend` (this instance, not just this kind of backend).
absl::Status Mine(const Backend& backend, const Tensor& t, absl::string_view what) {
  if (t.owner() != &backend) {
    return absl::InvalidArgumentError(absl::StrCat(
        what, ": tensor does not belong to this ", std::string(backend.name()), " backend"));
  }
  return absl::OkStatus();
}

// An f32 tensor of `backend`; rows/cols < 0 accept any.
absl::Status F32(const Backend& backend, const Tensor& t, absl::string_view what, int64_t rows,
                 int64_t cols) {
  KVR_RETURN_IF_ERROR(Mine(backend, t, what));
  if (t.dtype() != DType::kF32 || (rows >= 0 && t.rows() != rows) ||
      (cols >= 0 && t.cols() != cols)) {
    return absl::InvalidArgumentError(absl::StrCat(
        what, ": got ", ShapeStr(t), ", want [", rows < 0 ? std::string("*") : absl::StrCat(rows),
        " x ", cols < 0 ? std::string("*") : absl::StrCat(cols), " f32]"));
  }
  return absl::OkStatus();
}

// rows x cols elements of `dtype` have a byte size that fits in size_t.
absl::Status CheckShape(DType dtype, int64_t rows, int64_t cols, absl::string_view op) {
  if (rows < 0 || cols < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(op, ": negative shape [", rows, " x ", cols, "]"));
  }
  size_t bytes = 0;
  if (__builtin_mul_overflow(static_cast<size_t>(rows), static_cast<size_t>(cols), &bytes) ||
      __builtin_mul_overflow(bytes, DTypeSize(dtype), &bytes)) {
    return absl::InvalidArgumentError(
        absl::StrCat(op, ": [", rows, " x ", cols, "] overflows size_t"));
  }
  return absl::OkStatus();
}

absl::Status CheckHeadLayout(const AttentionShape& shape, absl::string_view op) {
  if (shape.n_heads <= 0 || shape.n_kv_heads <= 0 || shape.head_dim <= 0 ||
      shape.n_heads % shape.n_kv_heads != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(op, ": bad head layout n_heads=", shape.n_heads,
                     " n_kv_heads=", shape.n_kv_heads, " head_dim=", shape.head_dim));
  }
  return absl::OkStatus();
}

// The head layout and q, k_cache, v_cache of Attention / PartialAttention.
absl::Status CheckAttention(const Backend& backend, const Tensor& q, const Tensor& k_cache,
                            const Tensor& v_cache, const AttentionShape& shape,
                            absl::string_view op) {
  KVR_RETURN_IF_ERROR(CheckHeadLayout(shape, op));
  KVR_RETURN_IF_ERROR(F32(backend, q, absl::StrCat(op, " q"), -1, shape.q_cols()));
  KVR_RETURN_IF_ERROR(F32(backend, k_cache, absl::StrCat(op, " k_cache"), -1, shape.kv_cols()));
  KVR_RETURN_IF_ERROR(
      F32(backend, v_cache, absl::StrCat(op, " v_cache"), k_cache.rows(), shape.kv_cols()));
  return absl::OkStatus();
}

// [key_begin, key_end) lies within the cache's rows.
absl::Status CheckKeyRange(int64_t key_begin, int64_t key_end, const Tensor& k_cache,
                           absl::string_view op) {
  if (key_begin < 0 || key_begin > key_end || key_end > k_cache.rows()) {
    return absl::InvalidArgumentError(absl::StrCat(op, ": key range [", key_begin, ", ", key_end,
                                                   ") outside the cache's ", k_cache.rows(),
                                                   " rows"));
  }
  return absl::OkStatus();
}

}  // namespace

// ---- Memory ----------------------------------------------------------------

absl::StatusOr<Tensor> Backend::Allocate(DType dtype, int64_t rows, int64_t cols) {
  KVR_RETURN_IF_ERROR(CheckShape(dtype, rows, cols, "Allocate"));
  return DoAllocate(dtype, rows, cols);
}

absl::StatusOr<Tensor> Backend::ImportHost(const HostTensor& host,
                                           std::shared_ptr<const void> keepalive) {
  if (host.rows < 0 || host.cols < 0 || (host.data == nullptr && host.numel() != 0)) {
    return absl::InvalidArgumentError("ImportHost: bad host tensor");
  }
  KVR_RETURN_IF_ERROR(CheckShape(host.dtype, host.rows, host.cols, "ImportHost"));
  return DoImportHost(host, std::move(keepalive));
}

absl::Status Backend::Upload(std::span<const std::byte> src, const Tensor& dst) {
  KVR_RETURN_IF_ERROR(Mine(*this, dst, "Upload dst"));
  if (src.size() != dst.bytes()) {
    return absl::InvalidArgumentError(
        absl::StrCat("Upload: ", src.size(), " bytes into tensor of ", dst.bytes()));
  }
  return DoUpload(src, dst);
}

absl::Status Backend::Download(const Tensor& src, std::span<std::byte> dst) {
  KVR_RETURN_IF_ERROR(Mine(*this, src, "Download src"));
  if (dst.size() != src.bytes()) {
    return absl::InvalidArgumentError(
        absl::StrCat("Download: tensor of ", src.bytes(), " bytes into ", dst.size()));
  }
  return DoDownload(src, dst);
}

absl::Status Backend::DownloadMany(std::span<const DownloadItem> items) {
  for (const DownloadItem& item : items) {
    KVR_RETURN_IF_ERROR(Mine(*this, item.src, "DownloadMany src"));
    if (item.dst.size() != item.src.bytes()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "DownloadMany: tensor of ", item.src.bytes(), " bytes into ", item.dst.size()));
    }
  }
  return DoDownloadMany(items);
}

absl::Status Backend::DoDownloadMany(std::span<const DownloadItem> items) {
  for (const DownloadItem& item : items) KVR_RETURN_IF_ERROR(DoDownload(item.src, item.dst));
  return absl::OkStatus();
}

// ---- Ops -------------------------------------------------------------------

absl::Status Backend::Embedding(const Tensor& table, std::span<const int32_t> tokens,
                                const Tensor& out) {
  KVR_RETURN_IF_ERROR(Mine(*this, table, "Embedding table"));
  KVR_RETURN_IF_ERROR(
      F32(*this, out, "Embedding out", static_cast<int64_t>(tokens.size()), table.cols()));
  for (size_t i = 0; i < tokens.size(); ++i) {
    const int32_t t = tokens[i];
    if (t < 0 || t >= table.rows()) {
      return absl::InvalidArgumentError(absl::StrCat("Embedding: token ", t, " at index ", i,
                                                     " outside vocab [0, ", table.rows(), ")"));
    }
  }
  return DoEmbedding(table, tokens, out);
}

absl::Status Backend::RmsNorm(const Tensor& x, const Tensor& weight, float eps,
                              const Tensor& out) {
  KVR_RETURN_IF_ERROR(F32(*this, x, "RmsNorm x", -1, -1));
  KVR_RETURN_IF_ERROR(F32(*this, weight, "RmsNorm weight", 1, x.cols()));
  KVR_RETURN_IF_ERROR(F32(*this, out, "RmsNorm out", x.rows(), x.cols()));
  return DoRmsNorm(x, weight, eps, out);
}

absl::Status Backend::MatMul(const Tensor& x, const Tensor& w, const Tensor& y) {
  KVR_RETURN_IF_ERROR(F32(*this, x, "MatMul x", -1, -1));
  KVR_RETURN_IF_ERROR(Mine(*this, w, "MatMul w"));
  if (w.cols() != x.cols()) {
    return absl::InvalidArgumentError(
        absl::StrCat("MatMul: x ", ShapeStr(x), " vs w ", ShapeStr(w), ": inner dims differ"));
  }
  KVR_RETURN_IF_ERROR(F32(*this, y, "MatMul y", x.rows(), w.rows()));
  if (y.data() == x.data() && y.numel() != 0) {
    return absl::InvalidArgumentError("MatMul: y aliases x");
  }
  return DoMatMul(x, w, y);
}

absl::Status Backend::Rope(const Tensor& x, int n_heads, int head_dim,
                           std::span<const int32_t> positions, const Tensor& inv_freq,
                           RopeStyle style) {
  if (n_heads <= 0 || head_dim <= 0 || head_dim % 2 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("Rope: bad head layout n_heads=", n_heads, " head_dim=", head_dim));
  }
  KVR_RETURN_IF_ERROR(F32(*this, x, "Rope x", static_cast<int64_t>(positions.size()),
                          int64_t{n_heads} * head_dim));
  KVR_RETURN_IF_ERROR(F32(*this, inv_freq, "Rope inv_freq", 1, head_dim / 2));
  return DoRope(x, n_heads, head_dim, positions, inv_freq, style);
}

absl::Status Backend::SwiGlu(const Tensor& gate, const Tensor& up, const Tensor& out) {
  KVR_RETURN_IF_ERROR(F32(*this, gate, "SwiGlu gate", -1, -1));
  KVR_RETURN_IF_ERROR(F32(*this, up, "SwiGlu up", gate.rows(), gate.cols()));
  KVR_RETURN_IF_ERROR(F32(*this, out, "SwiGlu out", gate.rows(), gate.cols()));
  return DoSwiGlu(gate, up, out);
}

absl::Status Backend::Add(const Tensor& x, const Tensor& y) {
  KVR_RETURN_IF_ERROR(F32(*this, x, "Add x", -1, -1));
  KVR_RETURN_IF_ERROR(F32(*this, y, "Add y", x.rows(), x.cols()));
  return DoAdd(x, y);
}

absl::Status Backend::Attention(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                                const AttentionShape& shape, int64_t first_pos,
                                const Tensor& out) {
  KVR_RETURN_IF_ERROR(CheckAttention(*this, q, k_cache, v_cache, shape, "Attention"));
  KVR_RETURN_IF_ERROR(F32(*this, out, "Attention out", q.rows(), q.cols()));
  if (out.data() == q.data() && out.numel() != 0) {
    return absl::InvalidArgumentError("Attention: out aliases q");
  }
  // first_pos + q.rows() <= k_cache.rows(), without overflow.
  if (first_pos < 0 || first_pos > k_cache.rows() - q.rows()) {
    return absl::InvalidArgumentError(absl::StrCat("Attention: positions [", first_pos, ", ",
                                                   first_pos + q.rows(), ") exceed the cache's ",
                                                   k_cache.rows(), " rows"));
  }
  return DoAttention(q, k_cache, v_cache, shape, first_pos, out);
}

absl::Status Backend::PartialAttention(const Tensor& q, const Tensor& k_cache,
                                       const Tensor& v_cache, const AttentionShape& shape,
                                       int64_t first_pos, int64_t key_begin, int64_t key_end,
                                       const Tensor& o, const Tensor& m, const Tensor& l) {
  KVR_RETURN_IF_ERROR(CheckAttention(*this, q, k_cache, v_cache, shape, "PartialAttention"));
  KVR_RETURN_IF_ERROR(F32(*this, o, "PartialAttention o", q.rows(), q.cols()));
  KVR_RETURN_IF_ERROR(F32(*this, m, "PartialAttention m", q.rows(), shape.n_heads));
  KVR_RETURN_IF_ERROR(F32(*this, l, "PartialAttention l", q.rows(), shape.n_heads));
  KVR_RETURN_IF_ERROR(CheckKeyRange(key_begin, key_end, k_cache, "PartialAttention"));
  if (first_pos < 0) {
    return absl::InvalidArgumentError("PartialAttention: negative first_pos");
  }
  return DoPartialAttention(q, k_cache, v_cache, shape, first_pos, key_begin, key_end, o, m, l);
}

absl::Status Backend::MergeAttention(const Tensor& o, const Tensor& m, const Tensor& l,
                                     const Tensor& o2, const Tensor& m2, const Tensor& l2,
                                     int head_dim) {
  KVR_RETURN_IF_ERROR(F32(*this, m, "MergeAttention m", -1, -1));
  const int64_t n = m.rows(), heads = m.cols();
  if (head_dim <= 0) return absl::InvalidArgumentError("MergeAttention: head_dim <= 0");
  KVR_RETURN_IF_ERROR(F32(*this, l, "MergeAttention l", n, heads));
  KVR_RETURN_IF_ERROR(F32(*this, m2, "MergeAttention m2", n, heads));
  KVR_RETURN_IF_ERROR(F32(*this, l2, "MergeAttention l2", n, heads));
  KVR_RETURN_IF_ERROR(F32(*this, o, "MergeAttention o", n, heads * head_dim));
  KVR_RETURN_IF_ERROR(F32(*this, o2, "MergeAttention o2", n, heads * head_dim));
  return DoMergeAttention(o, m, l, o2, m2, l2, head_dim);
}

absl::Status Backend::Softmax(const Tensor& x, float temperature) {
  KVR_RETURN_IF_ERROR(F32(*this, x, "Softmax x", -1, -1));
  if (!(temperature > 0.0f)) {
    return absl::InvalidArgumentError(
        absl::StrCat("Softmax: temperature ", temperature, " must be > 0"));
  }
  return DoSoftmax(x, temperature);
}

absl::Status Backend::Argmax(const Tensor& x, std::span<int32_t> out) {
  KVR_RETURN_IF_ERROR(F32(*this, x, "Argmax x", static_cast<int64_t>(out.size()), -1));
  if (x.cols() == 0) return absl::InvalidArgumentError("Argmax: empty rows");
  return DoArgmax(x, out);
}

// ---- Optional ops ------------------------------------------------------------

bool Backend::SupportsOp(OptionalOp) const { return false; }

absl::Status Backend::TopK(const Tensor& q, const Tensor& k_cache, const AttentionShape& shape,
                           int kv_head, int64_t key_begin, int64_t key_end, int top_k,
                           std::span<int64_t> ids, std::span<float> scores) {
  if (!SupportsOp(OptionalOp::kTopK)) {
    return absl::UnimplementedError(
        absl::StrCat("backend '", std::string(name()), "' has no TopK op"));
  }
  KVR_RETURN_IF_ERROR(CheckHeadLayout(shape, "TopK"));
  if (kv_head != kAllKvHeads && (kv_head < 0 || kv_head >= shape.n_kv_heads)) {
    return absl::InvalidArgumentError(absl::StrCat("TopK: kv_head ", kv_head, " outside [0, ",
                                                   shape.n_kv_heads, ") and not kAllKvHeads"));
  }
  KVR_RETURN_IF_ERROR(F32(*this, q, "TopK q", -1, shape.q_cols()));
  KVR_RETURN_IF_ERROR(F32(*this, k_cache, "TopK k_cache", -1, shape.kv_cols()));
  KVR_RETURN_IF_ERROR(CheckKeyRange(key_begin, key_end, k_cache, "TopK"));
  if (top_k < 1 || top_k > key_end - key_begin) {
    return absl::InvalidArgumentError(
        absl::StrCat("TopK: k ", top_k, " outside [1, ", key_end - key_begin, "]"));
  }
  if (top_k > MaxTopK()) {
    return absl::UnimplementedError(absl::StrCat("TopK: k ", top_k, " > ", MaxTopK(),
                                                 " is not implemented on the ",
                                                 std::string(name()), " backend"));
  }
  const size_t group = static_cast<size_t>(shape.n_heads / shape.n_kv_heads);
  const size_t heads = kv_head == kAllKvHeads ? static_cast<size_t>(shape.n_kv_heads) : 1;
  const size_t count = static_cast<size_t>(q.rows()) * group * heads * static_cast<size_t>(top_k);
  if (ids.size() != count || scores.size() != count) {
    return absl::InvalidArgumentError(absl::StrCat("TopK: outputs of ", ids.size(), " ids and ",
                                                   scores.size(), " scores, want ", count));
  }
  return DoTopK(q, k_cache, shape, kv_head, key_begin, key_end, top_k, ids, scores);
}

absl::Status Backend::DoTopK(const Tensor&, const Tensor&, const AttentionShape&, int, int64_t,
                             int64_t, int, std::span<int64_t>, std::span<float>) {
  return absl::UnimplementedError(
      absl::StrCat("backend '", std::string(name()), "' has no TopK op"));
}

namespace {

struct Registry {
  std::mutex mu;
  std::map<std::string, BackendFactory, std::less<>> factories;
};

// The built-in "cpu" backend is registered here rather than by a static
// initializer in its own file, so that linking the static library can never
// drop it.
Registry& GetRegistry() {
  static Registry* registry = [] {
    auto* r = new Registry;
    r->factories.emplace("cpu",
                         [](const BackendOptions& options) { return NewCpuBackend(options); });
    return r;
  }();
  return *registry;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Backend>> BackendRegistry::Create(std::string_view name,
                                                                 const BackendOptions& options) {
  BackendFactory factory;
  {
    Registry& r = GetRegistry();
    std::lock_guard<std::mutex> lock(r.mu);
    auto it = r.factories.find(name);
    if (it == r.factories.end()) {
      std::vector<std::string> names;
      for (const auto& [n, f] : r.factories) names.push_back(n);
      return absl::NotFoundError(absl::StrCat("no backend named '", std::string(name),
                                              "'; registered: ", absl::StrJoin(names, ", ")));
    }
    factory = it->second;
  }
  return factory(options);
}

absl::Status BackendRegistry::Register(std::string name, BackendFactory factory) {
  if (!factory)
    return absl::InvalidArgumentError(absl::StrCat("backend '", name, "': null factory"));
  Registry& r = GetRegistry();
  std::lock_guard<std::mutex> lock(r.mu);
  if (!r.factories.emplace(name, std::move(factory)).second) {
    return absl::AlreadyExistsError(absl::StrCat("backend '", name, "' is already registered"));
  }
  return absl::OkStatus();
}

std::vector<std::string> BackendRegistry::Names() {
  Registry& r = GetRegistry();
  std::lock_guard<std::mutex> lock(r.mu);
  std::vector<std::string> names;
  for (const auto& [n, f] : r.factories) names.push_back(n);
  return names;
}

}  // namespace kvr::worker
