#include "gpu_worker/backend/cuda/cuda_backend.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <mutex>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "gpu_worker/backend/cuda/attention.cuh"
#include "gpu_worker/backend/cuda/cuda_api.h"
#include "gpu_worker/backend/cuda/cuda_status.h"
#include "gpu_worker/backend/cuda/elementwise.cuh"
#include "gpu_worker/backend/cuda/gemm.h"
#include "gpu_worker/backend/cuda/sampling.cuh"
#include "gpu_worker/backend/cuda/topk.cuh"

namespace kvr::worker {
namespace {

using cuda::CudaAllocStatus;
using cuda::CudaStatus;

// Uploads/Downloads up to this size go through pinned staging.
constexpr size_t kPinnedStagingMax = size_t{4} << 20;
// Pinned slots for host-span op arguments (tokens, positions): a slot is
// rewritten only after the copy issued kArgSlots stagings ago has run.
constexpr int kArgSlots = 4;
// Pinned buffers for staged uploads, used in turn: an upload waits only for
// the copy issued kUploadSlots uploads ago, so a few small uploads in a row
// (a merge's o, m and l) never wait for each other or for the kernels queued
// before them.
constexpr int kUploadSlots = 8;

// A device allocation that grows (never shrinks); growth is rare (largest
// size seen) so steady-state ops do not allocate.
class DeviceScratch {
 public:
  DeviceScratch() = default;
  DeviceScratch(const DeviceScratch&) = delete;
  DeviceScratch& operator=(const DeviceScratch&) = delete;
  ~DeviceScratch() {
    if (ptr_ != nullptr) (void)cudaFree(ptr_);
  }
  absl::StatusOr<void*> Ensure(size_t bytes, absl::string_view what) {
    if (bytes <= size_) return ptr_;
    if (ptr_ != nullptr) {
      (void)cudaFree(ptr_);  // implicitly waits for work that may use it
      ptr_ = nullptr;
      size_ = 0;
    }
    const size_t want = std::max<size_t>(bytes, 256);
    KVR_RETURN_IF_ERROR(CudaAllocStatus(cudaMalloc(&ptr_, want), what, want));
    size_ = want;
    return ptr_;
  }

 private:
  void* ptr_ = nullptr;
  size_t size_ = 0;
};

// A pinned host buffer that grows.
class PinnedBuffer {
 public:
  PinnedBuffer() = default;
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;
  ~PinnedBuffer() {
    if (ptr_ != nullptr) (void)cudaFreeHost(ptr_);
  }
  absl::StatusOr<void*> Ensure(size_t bytes, absl::string_view what) {
    if (bytes <= size_) return ptr_;
    if (ptr_ != nullptr) {
      (void)cudaFreeHost(ptr_);
      ptr_ = nullptr;
      size_ = 0;
    }
    const size_t want = std::max<size_t>(bytes, 4096);
    KVR_RETURN_IF_ERROR(CudaAllocStatus(cudaMallocHost(&ptr_, want), what, want));
    size_ = want;
    return ptr_;
  }

 private:
  void* ptr_ = nullptr;
  size_t size_ = 0;
};

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(int device) : device_(device) {}

  ~CudaBackend() override {
    (void)cudaSetDevice(device_);
    if (stream_ != nullptr) (void)cudaStreamSynchronize(stream_);
    if (cublas_ != nullptr) (void)cublasDestroy(cublas_);
    for (PinnedSlot& s : upload_slots_) {
      if (s.done != nullptr) (void)cudaEventDestroy(s.done);
    }
    for (ArgSlot& s : arg_slots_) {
      if (s.done != nullptr) (void)cudaEventDestroy(s.done);
    }
    // The pinned and device buffers free themselves after this body; cudaFree
    // does not need the stream.
    if (stream_ != nullptr) (void)cudaStreamDestroy(stream_);
  }

  absl::Status Init() {
    KVR_RETURN_IF_ERROR(CudaStatus(cudaSetDevice(device_), absl::StrCat("cudaSetDevice(", device_, ")")));
    KVR_RETURN_IF_ERROR(CudaStatus(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking),
                                   "cudaStreamCreateWithFlags"));
    KVR_RETURN_IF_ERROR(CudaStatus(
        cudaDeviceGetAttribute(&num_sms_, cudaDevAttrMultiProcessorCount, device_),
        "cudaDeviceGetAttribute(MultiProcessorCount)"));
    KVR_CUBLAS_RETURN_IF_ERROR(cublasCreate(&cublas_));
    KVR_CUBLAS_RETURN_IF_ERROR(cublasSetStream(cublas_, stream_));
    for (PinnedSlot& s : upload_slots_) {
      KVR_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&s.done, cudaEventDisableTiming));
    }
    for (ArgSlot& s : arg_slots_) {
      KVR_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&s.done, cudaEventDisableTiming));
    }
    return absl::OkStatus();
  }

  std::string_view name() const override { return "cuda"; }

  std::string Describe() const override {
#if defined(KVR_CUDA_EMULATION)
    constexpr const char* kWhat = " (CPU emulator of CUDA: for tests, not speed)";
#else
    constexpr const char* kWhat = "";
#endif
    return absl::StrCat("cuda device ", device_, ", ", num_sms_, " SMs", kWhat);
  }

  std::optional<DeviceMemory> DeviceMemoryNow() const override {
    size_t free_bytes = 0, total_bytes = 0;
    if (cudaSetDevice(device_) != cudaSuccess ||
        cudaMemGetInfo(&free_bytes, &total_bytes) != cudaSuccess) {
      return std::nullopt;
    }
    return DeviceMemory{static_cast<int64_t>(free_bytes), static_cast<int64_t>(total_bytes)};
  }

  // ---- Optional ops --------------------------------------------------------

  bool SupportsOp(OptionalOp op) const override { return op == OptionalOp::kTopK; }
  int MaxTopK() const override { return cuda::kMaxGpuTopK; }

 protected:
  // Backend's public ops validated the arguments. Unimplemented for valid
  // ones: Attention / PartialAttention with head_dim > cuda::kMaxAttendHeadDim.

  // ---- Memory --------------------------------------------------------------

  absl::StatusOr<Tensor> DoAllocate(DType dtype, int64_t rows, int64_t cols) override {
    KVR_ASSIGN_OR_RETURN(Tensor t, AllocateUninit(dtype, rows, cols, "Allocate"));
    if (t.bytes() != 0) {
      KVR_RETURN_IF_ERROR(
          CudaStatus(cudaMemsetAsync(t.data(), 0, t.bytes(), stream_), "cudaMemsetAsync(Allocate)"));
    }
    return t;
  }

  absl::StatusOr<Tensor> DoImportHost(const HostTensor& host,
                                      std::shared_ptr<const void> keepalive) override {
    KVR_ASSIGN_OR_RETURN(Tensor t, AllocateUninit(host.dtype, host.rows, host.cols, "ImportHost"));
    KVR_RETURN_IF_ERROR(DoUpload(std::span<const std::byte>(
                                     static_cast<const std::byte*>(host.data), host.bytes()),
                                 t));
    return t;  // the device copy does not need `keepalive`
  }

  absl::Status DoUpload(std::span<const std::byte> src, const Tensor& dst) override {
    if (src.empty()) return absl::OkStatus();
    KVR_RETURN_IF_ERROR(Activate());
    if (src.size() <= kPinnedStagingMax) {
      // The copy issued from this slot kUploadSlots uploads ago must be done.
      PinnedSlot& slot = upload_slots_[next_upload_];
      next_upload_ = (next_upload_ + 1) % kUploadSlots;
      KVR_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(slot.done));
      KVR_ASSIGN_OR_RETURN(void* pinned, slot.host.Ensure(src.size(), "cudaMallocHost(upload)"));
      std::memcpy(pinned, src.data(), src.size());
      KVR_RETURN_IF_ERROR(CudaStatus(
          cudaMemcpyAsync(dst.data(), pinned, src.size(), cudaMemcpyHostToDevice, stream_),
          "cudaMemcpyAsync(Upload, pinned)"));
      return CudaStatus(cudaEventRecord(slot.done, stream_), "cudaEventRecord(upload)");
    }
    // Pageable source: the call returns once the bytes have been taken.
    return CudaStatus(
        cudaMemcpyAsync(dst.data(), src.data(), src.size(), cudaMemcpyHostToDevice, stream_),
        "cudaMemcpyAsync(Upload, pageable)");
  }

  absl::Status DoDownload(const Tensor& src, std::span<std::byte> dst) override {
    KVR_RETURN_IF_ERROR(Activate());
    if (dst.empty()) return DoSynchronize();
    return CopyToHost(src.data(), dst.data(), dst.size());
  }

  absl::Status DoDownloadMany(std::span<const DownloadItem> items) override {
    std::vector<HostCopy> copies;
    copies.reserve(items.size());
    for (const DownloadItem& item : items) {
      copies.push_back({item.src.data(), item.dst.data(), item.dst.size()});
    }
    KVR_RETURN_IF_ERROR(Activate());
    return CopyManyToHost(copies);
  }

  absl::Status DoSynchronize() override {
    KVR_RETURN_IF_ERROR(Activate());
    return CudaStatus(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
  }

  // ---- Ops -----------------------------------------------------------------

  absl::Status DoEmbedding(const Tensor& table, std::span<const int32_t> tokens,
                           const Tensor& out) override {
    if (tokens.empty() || table.cols() == 0) return absl::OkStatus();
    KVR_RETURN_IF_ERROR(Activate());
    KVR_ASSIGN_OR_RETURN(const int32_t* dev_tokens, StageInts(tokens));
    return CudaStatus(cuda::LaunchEmbedding(table.data(),
                                            static_cast<cuda::TableType>(table.dtype()), dev_tokens,
                                            static_cast<int64_t>(tokens.size()), table.cols(),
                                            out.data_as<float>(), stream_),
                      "LaunchEmbedding");
  }

  absl::Status DoRmsNorm(const Tensor& x, const Tensor& weight, float eps,
                         const Tensor& out) override {
    KVR_RETURN_IF_ERROR(Activate());
    return CudaStatus(cuda::LaunchRmsNorm(x.data_as<const float>(), weight.data_as<const float>(),
                                          eps, x.rows(), x.cols(), out.data_as<float>(), stream_),
                      "LaunchRmsNorm");
  }

  absl::Status DoMatMul(const Tensor& x, const Tensor& w, const Tensor& y) override {
    KVR_RETURN_IF_ERROR(Activate());
    const size_t scratch_bytes = cuda::MatMulScratchBytes(w.dtype(), x.rows(), x.cols());
    void* scratch = nullptr;
    if (scratch_bytes != 0) {
      KVR_ASSIGN_OR_RETURN(scratch, matmul_scratch_.Ensure(scratch_bytes, "cudaMalloc(MatMul scratch)"));
    }
    return cuda::CublasMatMul(cublas_, stream_, x.data_as<const float>(), w.data(), w.dtype(),
                              y.data_as<float>(), x.rows(), x.cols(), w.rows(), scratch);
  }

  absl::Status DoRope(const Tensor& x, int n_heads, int head_dim,
                      std::span<const int32_t> positions, const Tensor& inv_freq,
                      RopeStyle style) override {
    if (positions.empty()) return absl::OkStatus();
    KVR_RETURN_IF_ERROR(Activate());
    KVR_ASSIGN_OR_RETURN(const int32_t* dev_pos, StageInts(positions));
    return CudaStatus(cuda::LaunchRope(x.data_as<float>(), x.rows(), n_heads, head_dim, dev_pos,
                                       inv_freq.data_as<const float>(),
                                       style == RopeStyle::kInterleaved, stream_),
                      "LaunchRope");
  }

  absl::Status DoSwiGlu(const Tensor& gate, const Tensor& up, const Tensor& out) override {
    KVR_RETURN_IF_ERROR(Activate());
    return CudaStatus(cuda::LaunchSwiGlu(gate.data_as<const float>(), up.data_as<const float>(),
                                         out.data_as<float>(), static_cast<int64_t>(gate.numel()),
                                         stream_),
                      "LaunchSwiGlu");
  }

  absl::Status DoAdd(const Tensor& x, const Tensor& y) override {
    KVR_RETURN_IF_ERROR(Activate());
    return CudaStatus(cuda::LaunchAdd(x.data_as<float>(), y.data_as<const float>(),
                                      static_cast<int64_t>(x.numel()), stream_),
                      "LaunchAdd");
  }

  absl::Status DoAttention(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                           const AttentionShape& shape, int64_t first_pos,
                           const Tensor& out) override {
    KVR_RETURN_IF_ERROR(CheckHeadDim(shape, "Attention"));
    return Attend(q, k_cache, v_cache, shape, first_pos, 0, first_pos + q.rows(),
                  out.data_as<float>(), nullptr, nullptr);
  }

  absl::Status DoPartialAttention(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                                  const AttentionShape& shape, int64_t first_pos,
                                  int64_t key_begin, int64_t key_end, const Tensor& o,
                                  const Tensor& m, const Tensor& l) override {
    KVR_RETURN_IF_ERROR(CheckHeadDim(shape, "PartialAttention"));
    return Attend(q, k_cache, v_cache, shape, first_pos, key_begin, key_end, o.data_as<float>(),
                  m.data_as<float>(), l.data_as<float>());
  }

  absl::Status DoMergeAttention(const Tensor& o, const Tensor& m, const Tensor& l,
                                const Tensor& o2, const Tensor& m2, const Tensor& l2,
                                int head_dim) override {
    const int64_t n = m.rows(), heads = m.cols();
    KVR_RETURN_IF_ERROR(Activate());
    return CudaStatus(
        cuda::LaunchMergeAttention(o.data_as<float>(), m.data_as<float>(), l.data_as<float>(),
                                   o2.data_as<const float>(), m2.data_as<const float>(),
                                   l2.data_as<const float>(), n * heads, head_dim, stream_),
        "LaunchMergeAttention");
  }

  absl::Status DoSoftmax(const Tensor& x, float temperature) override {
    KVR_RETURN_IF_ERROR(Activate());
    return CudaStatus(
        cuda::LaunchSoftmax(x.data_as<float>(), x.rows(), x.cols(), temperature, stream_),
        "LaunchSoftmax");
  }

  absl::Status DoArgmax(const Tensor& x, std::span<int32_t> out) override {
    KVR_RETURN_IF_ERROR(Activate());
    if (out.empty()) return DoSynchronize();
    const size_t bytes = out.size() * sizeof(int32_t);
    KVR_ASSIGN_OR_RETURN(void* dev, argmax_out_.Ensure(bytes, "cudaMalloc(Argmax out)"));
    KVR_RETURN_IF_ERROR(CudaStatus(cuda::LaunchArgmax(x.data_as<const float>(), x.rows(), x.cols(),
                                                      static_cast<int32_t*>(dev), stream_),
                                   "LaunchArgmax"));
    return CopyToHost(dev, out.data(), bytes);
  }

  // ---- Optional ops --------------------------------------------------------

  absl::Status DoTopK(const Tensor& q, const Tensor& k_cache, const AttentionShape& shape,
                      int kv_head, int64_t key_begin, int64_t key_end, int top_k,
                      std::span<int64_t> ids, std::span<float> scores) override {
    const size_t count = ids.size();  // == scores.size(), checked by TopK
    KVR_RETURN_IF_ERROR(Activate());
    if (count == 0) return DoSynchronize();
    const size_t id_bytes = count * sizeof(int64_t), score_bytes = count * sizeof(float);
    KVR_ASSIGN_OR_RETURN(void* dev, topk_out_.Ensure(id_bytes + score_bytes, "cudaMalloc(TopK out)"));
    cuda::TopKArgs a;
    a.q = q.data_as<const float>();
    a.k = k_cache.data_as<const float>();
    a.n = q.rows();
    a.n_heads = shape.n_heads;
    a.n_kv_heads = shape.n_kv_heads;
    a.head_dim = shape.head_dim;
    a.kv_head = kv_head;
    a.key_begin = key_begin;
    a.key_end = key_end;
    a.top_k = top_k;
    a.ids = static_cast<int64_t*>(dev);
    a.scores = reinterpret_cast<float*>(static_cast<std::byte*>(dev) + id_bytes);
    KVR_RETURN_IF_ERROR(CudaStatus(cuda::LaunchTopK(a, stream_), "LaunchTopK"));
    const HostCopy copies[] = {{a.ids, ids.data(), id_bytes},
                               {a.scores, scores.data(), score_bytes}};
    return CopyManyToHost(copies);
  }

 private:
  // A pinned buffer and the event recorded after the last copy from it.
  struct PinnedSlot {
    PinnedBuffer host;
    cudaEvent_t done = nullptr;
  };
  struct ArgSlot : PinnedSlot {
    void* host_ptr = nullptr;
    size_t size = 0;  // int32 values staged last
  };

  absl::Status Activate() const {
    return CudaStatus(cudaSetDevice(device_), "cudaSetDevice");
  }

  // A shape Allocate / ImportHost validated (its byte size fits in size_t).
  absl::StatusOr<Tensor> AllocateUninit(DType dtype, int64_t rows, int64_t cols,
                                        absl::string_view what) {
    const size_t bytes = static_cast<size_t>(rows) * static_cast<size_t>(cols) * DTypeSize(dtype);
    KVR_RETURN_IF_ERROR(Activate());
    void* p = nullptr;
    if (bytes != 0) {
      KVR_RETURN_IF_ERROR(CudaAllocStatus(
          cudaMalloc(&p, bytes),
          absl::StrCat(what, " [", rows, " x ", cols, " ", DTypeName(dtype), "]: cudaMalloc"),
          bytes));
    }
    std::shared_ptr<void> storage(p, [](void* q) {
      if (q != nullptr) (void)cudaFree(q);
    });
    return Tensor(this, std::move(storage), p, dtype, rows, cols);
  }

  struct HostCopy {
    const void* dev;
    void* host;
    size_t bytes;
  };

  // Several device -> host copies with one wait: all through one pinned
  // buffer when they fit in kPinnedStagingMax together, else one by one.
  absl::Status CopyManyToHost(std::span<const HostCopy> copies) {
    size_t total = 0;
    for (const HostCopy& c : copies) total += c.bytes;
    if (total > kPinnedStagingMax) {
      for (const HostCopy& c : copies) KVR_RETURN_IF_ERROR(CopyToHost(c.dev, c.host, c.bytes));
      return absl::OkStatus();
    }
    if (total == 0) return DoSynchronize();
    KVR_ASSIGN_OR_RETURN(void* pinned, download_stage_.Ensure(total, "cudaMallocHost(download)"));
    auto* stage = static_cast<std::byte*>(pinned);
    size_t offset = 0;
    for (const HostCopy& c : copies) {
      if (c.bytes == 0) continue;
      KVR_RETURN_IF_ERROR(CudaStatus(
          cudaMemcpyAsync(stage + offset, c.dev, c.bytes, cudaMemcpyDeviceToHost, stream_),
          "cudaMemcpyAsync(Download, pinned)"));
      offset += c.bytes;
    }
    KVR_RETURN_IF_ERROR(CudaStatus(cudaStreamSynchronize(stream_), "cudaStreamSynchronize"));
    offset = 0;
    for (const HostCopy& c : copies) {
      if (c.bytes != 0) std::memcpy(c.host, stage + offset, c.bytes);
      offset += c.bytes;
    }
    return absl::OkStatus();
  }

  // Device -> host through pinned staging when small; waits for the stream.
  absl::Status CopyToHost(const void* dev, void* host, size_t bytes) {
    if (bytes <= kPinnedStagingMax) {
      const HostCopy copy{dev, host, bytes};
      return CopyManyToHost({&copy, 1});
    }
    KVR_RETURN_IF_ERROR(
        CudaStatus(cudaMemcpyAsync(host, dev, bytes, cudaMemcpyDeviceToHost, stream_),
                   "cudaMemcpyAsync(Download, pageable)"));
    return CudaStatus(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
  }

  // Copies host int32 arguments to device memory ordered on the stream and
  // returns the device address, valid for ops enqueued before the next
  // kArgSlots stagings. Repeating the last staged values (Rope of q and k at
  // the same positions, every layer) reuses them without a copy.
  absl::StatusOr<const int32_t*> StageInts(std::span<const int32_t> v) {
    const size_t bytes = v.size_bytes();
    if (last_slot_ >= 0) {
      ArgSlot& last = arg_slots_[last_slot_];
      if (last.size == v.size() && std::memcmp(last.host_ptr, v.data(), bytes) == 0) {
        return static_cast<const int32_t*>(arg_dev_ptr_[last_slot_]);
      }
    }
    const int slot_index = (last_slot_ + 1) % kArgSlots;
    ArgSlot& slot = arg_slots_[slot_index];
    // Its previous copy (kArgSlots stagings ago) must have left the buffers.
    KVR_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(slot.done));
    KVR_ASSIGN_OR_RETURN(void* host, slot.host.Ensure(bytes, "cudaMallocHost(op arguments)"));
    KVR_ASSIGN_OR_RETURN(void* dev,
                         arg_dev_[slot_index].Ensure(bytes, "cudaMalloc(op arguments)"));
    std::memcpy(host, v.data(), bytes);
    KVR_RETURN_IF_ERROR(
        CudaStatus(cudaMemcpyAsync(dev, host, bytes, cudaMemcpyHostToDevice, stream_),
                   "cudaMemcpyAsync(op arguments)"));
    KVR_CUDA_RETURN_IF_ERROR(cudaEventRecord(slot.done, stream_));
    slot.host_ptr = host;
    slot.size = v.size();
    arg_dev_ptr_[slot_index] = dev;
    last_slot_ = slot_index;
    return static_cast<const int32_t*>(dev);
  }

  absl::Status Attend(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                      const AttentionShape& shape, int64_t first_pos, int64_t key_begin,
                      int64_t key_end, float* o, float* m, float* l) {
    cuda::AttendArgs a;
    a.q = q.data_as<const float>();
    a.k = k_cache.data_as<const float>();
    a.v = v_cache.data_as<const float>();
    a.n = q.rows();
    a.n_heads = shape.n_heads;
    a.n_kv_heads = shape.n_kv_heads;
    a.head_dim = shape.head_dim;
    a.scale = shape.scale != 0.0f ? shape.scale
                                  : 1.0f / std::sqrt(static_cast<float>(shape.head_dim));
    a.first_pos = first_pos;
    a.key_begin = key_begin;
    a.key_end = key_end;
    a.o = o;
    a.m = m;
    a.l = l;
    if (a.n == 0) return absl::OkStatus();
    KVR_RETURN_IF_ERROR(Activate());
    const cuda::AttendPlan plan = cuda::PlanAttend(a, num_sms_);
    float* ws = nullptr;
    if (plan.workspace_floats != 0) {
      KVR_ASSIGN_OR_RETURN(void* p, attend_ws_.Ensure(plan.workspace_floats * sizeof(float),
                                                      "cudaMalloc(attention split workspace)"));
      ws = static_cast<float*>(p);
    }
    return CudaStatus(cuda::LaunchAttend(a, plan, ws, stream_), "LaunchAttend");
  }

  // The attention kernels take head_dim <= kMaxAttendHeadDim (attention.cuh).
  static absl::Status CheckHeadDim(const AttentionShape& shape, absl::string_view op) {
    if (shape.head_dim > cuda::kMaxAttendHeadDim) {
      return absl::UnimplementedError(absl::StrCat(op, ": head_dim ", shape.head_dim, " > ",
                                                   cuda::kMaxAttendHeadDim,
                                                   " is not supported by the cuda backend"));
    }
    return absl::OkStatus();
  }

  const int device_;
  int num_sms_ = 1;
  cudaStream_t stream_ = nullptr;
  cublasHandle_t cublas_ = nullptr;
  PinnedBuffer download_stage_;
  std::array<PinnedSlot, kUploadSlots> upload_slots_;
  int next_upload_ = 0;
  std::array<ArgSlot, kArgSlots> arg_slots_;
  std::array<DeviceScratch, kArgSlots> arg_dev_;
  std::array<void*, kArgSlots> arg_dev_ptr_{};
  int last_slot_ = -1;
  DeviceScratch matmul_scratch_, attend_ws_, argmax_out_, topk_out_;
};

}  // namespace

int CudaDeviceCount(std::string* why) {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    if (why != nullptr) {
      *why = absl::StrCat("cudaGetDeviceCount returned ", cudaGetErrorName(err), " (",
                          cudaGetErrorString(err), ")");
    }
    return 0;
  }
  if (count == 0 && why != nullptr) *why = "cudaGetDeviceCount returned 0 devices";
  return count;
}

absl::StatusOr<std::unique_ptr<Backend>> NewCudaBackend(const BackendOptions& options) {
  std::string why;
  const int count = CudaDeviceCount(&why);
  if (count == 0) return absl::FailedPreconditionError(absl::StrCat("no CUDA device: ", why));
  if (options.device < 0 || options.device >= count) {
    return absl::InvalidArgumentError(absl::StrCat("cuda backend: device ", options.device,
                                                   " outside [0, ", count, ")"));
  }
  auto backend = std::make_unique<CudaBackend>(options.device);
  KVR_RETURN_IF_ERROR(backend->Init());
  return std::unique_ptr<Backend>(std::move(backend));
}

absl::Status RegisterCudaBackend() {
  static std::once_flag once;
  static absl::Status status;
  std::call_once(once, [] {
    status = BackendRegistry::Register(
        "cuda", [](const BackendOptions& options) { return NewCudaBackend(options); });
  });
  return status;
}

namespace {
[[maybe_unused]] const bool kCudaRegistered = RegisterCudaBackend().ok();
}  // namespace

}  // namespace kvr::worker
