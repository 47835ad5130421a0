// The emulated runtime: device and pinned allocations, lazy streams, events,
// errors, launches and cublasGemmEx. See cuda_emulator.h for the model.
#include "gpu_worker/backend/cuda/emulator/cuda_emulator.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "gpu_worker/backend/cuda/emulator/grid_executor.h"

struct KvrEmuStream {
  struct Op {
    uint64_t seq;
    std::function<void()> run;
  };
  std::deque<Op> ops;
  uint64_t enqueued = 0;  // sequence number of the last op queued
  uint64_t done = 0;      // ... and of the last op run
};

struct KvrEmuEvent {
  KvrEmuStream* stream = nullptr;  // null: never recorded (complete)
  uint64_t seq = 0;
};

struct KvrEmuCublas {
  cudaStream_t stream = nullptr;
};

namespace kvr::cuda_emu {
namespace {

constexpr int kMultiProcessors = 132;               // H100 SXM
constexpr int kDefaultDynamicShared = 48 << 10;     // without cudaFuncSetAttribute
constexpr int kMaxDynamicSharedOptin = 227 << 10;   // sm_90
constexpr size_t kDefaultMemoryBytes = size_t{8} << 30;

struct Allocation {
  std::byte* base = nullptr;
  size_t bytes = 0;
  void* map = nullptr;
  size_t map_bytes = 0;
  bool pinned = false;
};

struct Emulator {
  std::recursive_mutex mu;
  std::map<uintptr_t, Allocation> allocations;  // by base address
  size_t device_bytes = 0;
  size_t capacity = kDefaultMemoryBytes;
  cudaError_t last_error = cudaSuccess;
  cudaError_t sticky = cudaSuccess;  // a device fault: every later call fails
  uint64_t host_waits = 0;
  KvrEmuStream legacy;               // stream 0
  std::set<KvrEmuStream*> streams;
  std::set<KvrEmuEvent*> events;
  std::map<const void*, int> max_dynamic_shared;

  Emulator() {
    if (const char* env = std::getenv("KVR_CUDA_EMU_MEMORY_BYTES")) {
      uint64_t v = 0;
      if (absl::SimpleAtoi(env, &v) && v > 0) capacity = v;
    }
  }
};

Emulator& E() {
  static Emulator* e = new Emulator();
  return *e;
}

cudaError_t Fail(cudaError_t err) {
  E().last_error = err;
  return err;
}

// Reports a device fault (sticky, as on a GPU) and drops all queued work.
void Fault(const std::string& what, cudaError_t err) {
  Emulator& e = E();
  std::fprintf(stderr, "kvr cuda emulator: %s\n", what.c_str());
  e.sticky = err;
  e.last_error = err;
  e.legacy.ops.clear();
  for (KvrEmuStream* s : e.streams) s->ops.clear();
}

KvrEmuStream* Resolve(cudaStream_t s) { return s == nullptr ? &E().legacy : s; }

bool Live(cudaStream_t s) { return s == nullptr || E().streams.count(s) != 0; }

void Enqueue(KvrEmuStream* s, std::function<void()> run) {
  s->ops.push_back({++s->enqueued, std::move(run)});
}

// Runs s's queued ops with sequence numbers <= upto.
void Drain(KvrEmuStream* s, uint64_t upto = UINT64_MAX) {
  Emulator& e = E();
  if (!s->ops.empty() && s->ops.front().seq <= upto) ++e.host_waits;
  while (!s->ops.empty() && s->ops.front().seq <= upto && e.sticky == cudaSuccess) {
    KvrEmuStream::Op op = std::move(s->ops.front());
    s->ops.pop_front();
    op.run();
    s->done = op.seq;
  }
}

void DrainAll() {
  Emulator& e = E();
  Drain(&e.legacy);
  for (KvrEmuStream* s : e.streams) Drain(s);
}

// The live allocation holding [p, p + bytes), or null.
const Allocation* Find(const void* p, size_t bytes) {
  Emulator& e = E();
  const auto addr = reinterpret_cast<uintptr_t>(p);
  auto it = e.allocations.upper_bound(addr);
  if (it == e.allocations.begin()) return nullptr;
  --it;
  const Allocation& a = it->second;
  const auto base = reinterpret_cast<uintptr_t>(a.base);
  if (addr < base || addr - base > a.bytes || a.bytes - (addr - base) < bytes) return nullptr;
  return &a;
}

bool IsDevice(const void* p, size_t bytes) {
  const Allocation* a = Find(p, bytes);
  return a != nullptr && !a->pinned;
}
bool IsPinned(const void* p, size_t bytes) {
  const Allocation* a = Find(p, bytes);
  return a != nullptr && a->pinned;
}

// Maps `bytes` so that they end right before an inaccessible page.
cudaError_t Map(size_t bytes, bool pinned, void** out) {
  Emulator& e = E();
  *out = nullptr;
  if (bytes == 0) return cudaSuccess;
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const size_t payload = (bytes + 15) & ~size_t{15};
  const size_t body = (payload + page - 1) / page * page;
  if (body < payload || body + page < body) return Fail(cudaErrorMemoryAllocation);
  void* map = mmap(nullptr, body + page, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (map == MAP_FAILED) return Fail(cudaErrorMemoryAllocation);
  mprotect(static_cast<std::byte*>(map) + body, page, PROT_NONE);
  Allocation a;
  a.map = map;
  a.map_bytes = body + page;
  a.base = static_cast<std::byte*>(map) + body - payload;
  a.bytes = bytes;
  a.pinned = pinned;
  e.allocations[reinterpret_cast<uintptr_t>(a.base)] = a;
  *out = a.base;
  return cudaSuccess;
}

cudaError_t Unmap(void* p, bool pinned) {
  Emulator& e = E();
  if (p == nullptr) return cudaSuccess;
  auto it = e.allocations.find(reinterpret_cast<uintptr_t>(p));
  if (it == e.allocations.end() || it->second.pinned != pinned) return Fail(cudaErrorInvalidValue);
  if (!pinned) e.device_bytes -= it->second.bytes;
  munmap(it->second.map, it->second.map_bytes);
  e.allocations.erase(it);
  return cudaSuccess;
}

#define KVR_EMU_ENTER()                                   \
  std::lock_guard<std::recursive_mutex> lock(E().mu);     \
  if (E().sticky != cudaSuccess) return E().sticky

}  // namespace

// ---- Launches -------------------------------------------------------------------

uint64_t HostWaits() {
  std::lock_guard<std::recursive_mutex> lock(E().mu);
  return E().host_waits;
}

cudaError_t SetFuncAttribute(const void* kernel, cudaFuncAttribute attr, int value) {
  KVR_EMU_ENTER();
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      value > kMaxDynamicSharedOptin) {
    return Fail(cudaErrorInvalidValue);
  }
  E().max_dynamic_shared[kernel] = value;
  return cudaSuccess;
}

cudaError_t EnqueueLaunch(const LaunchConfig& config, std::function<void()> body) {
  KVR_EMU_ENTER();
  Emulator& e = E();
  const dim3 b = config.block, g = config.grid;
  const uint64_t threads = uint64_t{b.x} * b.y * b.z;
  if (threads == 0 || threads > 1024 || b.x > 1024 || b.y > 1024 || b.z > 64 || g.x == 0 ||
      g.y == 0 || g.z == 0 || g.x > 0x7fffffffu || g.y > 65535 || g.z > 65535) {
    return Fail(cudaErrorInvalidConfiguration);
  }
  auto it = e.max_dynamic_shared.find(config.kernel);
  const size_t limit = it != e.max_dynamic_shared.end() ? it->second : kDefaultDynamicShared;
  if (config.shared_bytes > limit) return Fail(cudaErrorInvalidValue);
  if (!Live(config.stream)) return Fail(cudaErrorInvalidResourceHandle);
  Enqueue(Resolve(config.stream), [config, body = std::move(body)] {
    const std::string fault = RunGrid(config, body);
    if (!fault.empty()) Fault(fault, cudaErrorLaunchFailure);
  });
  return cudaSuccess;
}

}  // namespace kvr::cuda_emu

using kvr::cuda_emu::DrainAll;
using kvr::cuda_emu::E;
using kvr::cuda_emu::Emulator;
using kvr::cuda_emu::Fail;

// ---- Device ---------------------------------------------------------------------

cudaError_t cudaGetDeviceCount(int* count) {
  KVR_EMU_ENTER();
  if (count == nullptr) return Fail(cudaErrorInvalidValue);
  *count = 1;
  return cudaSuccess;
}

cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device) {
  KVR_EMU_ENTER();
  if (prop == nullptr) return Fail(cudaErrorInvalidValue);
  if (device != 0) return Fail(cudaErrorInvalidDevice);
  *prop = cudaDeviceProp{};
  std::snprintf(prop->name, sizeof prop->name, "%s",
                "kvr CPU emulator of CUDA (not a GPU: its timings mean nothing)");
  prop->totalGlobalMem = E().capacity;
  prop->sharedMemPerBlockOptin = kvr::cuda_emu::kMaxDynamicSharedOptin;
  prop->multiProcessorCount = kvr::cuda_emu::kMultiProcessors;
  prop->maxThreadsPerBlock = 1024;
  prop->warpSize = 32;
  prop->major = 9;
  prop->minor = 0;
  return cudaSuccess;
}

cudaError_t cudaDriverGetVersion(int* version) {
  KVR_EMU_ENTER();
  if (version == nullptr) return Fail(cudaErrorInvalidValue);
  *version = 0;
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) {
  KVR_EMU_ENTER();
  return device == 0 ? cudaSuccess : Fail(cudaErrorInvalidDevice);
}

cudaError_t cudaGetDevice(int* device) {
  KVR_EMU_ENTER();
  if (device == nullptr) return Fail(cudaErrorInvalidValue);
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  KVR_EMU_ENTER();
  if (value == nullptr) return Fail(cudaErrorInvalidValue);
  if (device != 0) return Fail(cudaErrorInvalidDevice);
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock:
      *value = 1024;
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlock:
      *value = kvr::cuda_emu::kDefaultDynamicShared;
      return cudaSuccess;
    case cudaDevAttrWarpSize:
      *value = 32;
      return cudaSuccess;
    case cudaDevAttrMultiProcessorCount:
      *value = kvr::cuda_emu::kMultiProcessors;
      return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor:
      *value = 9;
      return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor:
      *value = 0;
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = kvr::cuda_emu::kMaxDynamicSharedOptin;
      return cudaSuccess;
  }
  return Fail(cudaErrorInvalidValue);
}

cudaError_t cudaDeviceSynchronize() {
  KVR_EMU_ENTER();
  DrainAll();
  return E().sticky;
}

cudaError_t cudaMemGetInfo(size_t* free_bytes, size_t* total_bytes) {
  KVR_EMU_ENTER();
  if (free_bytes == nullptr || total_bytes == nullptr) return Fail(cudaErrorInvalidValue);
  *total_bytes = E().capacity;
  *free_bytes = E().capacity - E().device_bytes;
  return cudaSuccess;
}

cudaError_t cudaGetLastError() {
  std::lock_guard<std::recursive_mutex> lock(E().mu);
  const cudaError_t err = E().last_error;
  if (E().sticky == cudaSuccess) E().last_error = cudaSuccess;
  return err;
}

cudaError_t cudaPeekAtLastError() {
  std::lock_guard<std::recursive_mutex> lock(E().mu);
  return E().last_error;
}

const char* cudaGetErrorName(cudaError_t err) {
  switch (err) {
    case cudaSuccess:
      return "cudaSuccess";
    case cudaErrorInvalidValue:
      return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation:
      return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration:
      return "cudaErrorInvalidConfiguration";
    case cudaErrorInsufficientDriver:
      return "cudaErrorInsufficientDriver";
    case cudaErrorNoDevice:
      return "cudaErrorNoDevice";
    case cudaErrorInvalidDevice:
      return "cudaErrorInvalidDevice";
    case cudaErrorNoKernelImageForDevice:
      return "cudaErrorNoKernelImageForDevice";
    case cudaErrorInvalidResourceHandle:
      return "cudaErrorInvalidResourceHandle";
    case cudaErrorNotReady:
      return "cudaErrorNotReady";
    case cudaErrorIllegalAddress:
      return "cudaErrorIllegalAddress";
    case cudaErrorLaunchOutOfResources:
      return "cudaErrorLaunchOutOfResources";
    case cudaErrorLaunchFailure:
      return "cudaErrorLaunchFailure";
    case cudaErrorNotSupported:
      return "cudaErrorNotSupported";
  }
  return "cudaErrorUnknown";
}

const char* cudaGetErrorString(cudaError_t err) {
  switch (err) {
    case cudaSuccess:
      return "no error";
    case cudaErrorInvalidValue:
      return "invalid argument";
    case cudaErrorMemoryAllocation:
      return "out of memory";
    case cudaErrorInvalidConfiguration:
      return "invalid configuration argument";
    case cudaErrorIllegalAddress:
      return "an illegal memory access was encountered";
    case cudaErrorLaunchFailure:
      return "unspecified launch failure";
    default:
      return cudaGetErrorName(err);
  }
}

// ---- Memory -----------------------------------------------------------------------

cudaError_t cudaMalloc(void** ptr, size_t bytes) {
  KVR_EMU_ENTER();
  if (ptr == nullptr) return Fail(cudaErrorInvalidValue);
  Emulator& e = E();
  if (bytes > e.capacity - e.device_bytes) {
    *ptr = nullptr;
    return Fail(cudaErrorMemoryAllocation);
  }
  const cudaError_t err = kvr::cuda_emu::Map(bytes, /*pinned=*/false, ptr);
  if (err == cudaSuccess) e.device_bytes += bytes;
  return err;
}

cudaError_t cudaFree(void* ptr) {
  KVR_EMU_ENTER();
  DrainAll();  // cudaFree waits for the device
  return kvr::cuda_emu::Unmap(ptr, /*pinned=*/false);
}

cudaError_t cudaMallocHost(void** ptr, size_t bytes) {
  KVR_EMU_ENTER();
  if (ptr == nullptr) return Fail(cudaErrorInvalidValue);
  return kvr::cuda_emu::Map(bytes, /*pinned=*/true, ptr);
}

cudaError_t cudaFreeHost(void* ptr) {
  KVR_EMU_ENTER();
  DrainAll();
  return kvr::cuda_emu::Unmap(ptr, /*pinned=*/true);
}

namespace kvr::cuda_emu {
namespace {

// Validates a copy and says whether it may run later (between device memory
// and pinned memory, or device to device) or must run now.
cudaError_t ClassifyCopy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind,
                         bool* deferred) {
  const bool dst_dev = IsDevice(dst, bytes), src_dev = IsDevice(src, bytes);
  if (kind == cudaMemcpyDefault) {
    kind = dst_dev ? (src_dev ? cudaMemcpyDeviceToDevice : cudaMemcpyHostToDevice)
                   : (src_dev ? cudaMemcpyDeviceToHost : cudaMemcpyHostToHost);
  }
  switch (kind) {
    case cudaMemcpyHostToDevice:
      if (!dst_dev || src_dev) return cudaErrorInvalidValue;
      *deferred = IsPinned(src, bytes);
      return cudaSuccess;
    case cudaMemcpyDeviceToHost:
      if (!src_dev || dst_dev) return cudaErrorInvalidValue;
      *deferred = IsPinned(dst, bytes);
      return cudaSuccess;
    case cudaMemcpyDeviceToDevice:
      if (!src_dev || !dst_dev) return cudaErrorInvalidValue;
      *deferred = true;
      return cudaSuccess;
    case cudaMemcpyHostToHost:
      if (src_dev || dst_dev) return cudaErrorInvalidValue;
      *deferred = false;
      return cudaSuccess;
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace
}  // namespace kvr::cuda_emu

cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind,
                            cudaStream_t stream) {
  KVR_EMU_ENTER();
  if (bytes == 0) return cudaSuccess;
  if (dst == nullptr || src == nullptr) return Fail(cudaErrorInvalidValue);
  if (!kvr::cuda_emu::Live(stream)) return Fail(cudaErrorInvalidResourceHandle);
  bool deferred = false;
  const cudaError_t err = kvr::cuda_emu::ClassifyCopy(dst, src, bytes, kind, &deferred);
  if (err != cudaSuccess) return Fail(err);
  KvrEmuStream* s = kvr::cuda_emu::Resolve(stream);
  if (deferred) {
    kvr::cuda_emu::Enqueue(s, [dst, src, bytes] { std::memcpy(dst, src, bytes); });
    return cudaSuccess;
  }
  // Pageable host memory: the runtime drains the stream and copies before
  // returning.
  kvr::cuda_emu::Drain(s);
  if (E().sticky != cudaSuccess) return E().sticky;
  std::memcpy(dst, src, bytes);
  return cudaSuccess;
}

cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind) {
  KVR_EMU_ENTER();
  if (bytes == 0) return cudaSuccess;
  if (dst == nullptr || src == nullptr) return Fail(cudaErrorInvalidValue);
  bool deferred = false;
  const cudaError_t err = kvr::cuda_emu::ClassifyCopy(dst, src, bytes, kind, &deferred);
  if (err != cudaSuccess) return Fail(err);
  DrainAll();
  if (E().sticky != cudaSuccess) return E().sticky;
  std::memcpy(dst, src, bytes);
  return cudaSuccess;
}

cudaError_t cudaMemsetAsync(void* ptr, int value, size_t bytes, cudaStream_t stream) {
  KVR_EMU_ENTER();
  if (bytes == 0) return cudaSuccess;
  if (!kvr::cuda_emu::IsDevice(ptr, bytes)) return Fail(cudaErrorInvalidValue);
  if (!kvr::cuda_emu::Live(stream)) return Fail(cudaErrorInvalidResourceHandle);
  kvr::cuda_emu::Enqueue(kvr::cuda_emu::Resolve(stream),
                         [ptr, value, bytes] { std::memset(ptr, value, bytes); });
  return cudaSuccess;
}

// ---- Streams and events -----------------------------------------------------------

cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned flags) {
  KVR_EMU_ENTER();
  if (stream == nullptr || (flags & ~cudaStreamNonBlocking) != 0) {
    return Fail(cudaErrorInvalidValue);
  }
  *stream = new KvrEmuStream();
  E().streams.insert(*stream);
  return cudaSuccess;
}

cudaError_t cudaStreamDestroy(cudaStream_t stream) {
  KVR_EMU_ENTER();
  if (stream == nullptr || E().streams.erase(stream) == 0) {
    return Fail(cudaErrorInvalidResourceHandle);
  }
  kvr::cuda_emu::Drain(stream);  // queued work still completes
  for (KvrEmuEvent* ev : E().events) {
    if (ev->stream == stream) ev->stream = nullptr;
  }
  delete stream;
  return E().sticky;
}

cudaError_t cudaStreamSynchronize(cudaStream_t stream) {
  KVR_EMU_ENTER();
  if (!kvr::cuda_emu::Live(stream)) return Fail(cudaErrorInvalidResourceHandle);
  kvr::cuda_emu::Drain(kvr::cuda_emu::Resolve(stream));
  return E().sticky;
}

cudaError_t cudaEventCreateWithFlags(cudaEvent_t* event, unsigned flags) {
  KVR_EMU_ENTER();
  if (event == nullptr || (flags & ~(cudaEventDisableTiming | 0x1u | 0x4u)) != 0) {
    return Fail(cudaErrorInvalidValue);
  }
  *event = new KvrEmuEvent();
  E().events.insert(*event);
  return cudaSuccess;
}

cudaError_t cudaEventDestroy(cudaEvent_t event) {
  KVR_EMU_ENTER();
  if (event == nullptr || E().events.erase(event) == 0) {
    return Fail(cudaErrorInvalidResourceHandle);
  }
  delete event;
  return cudaSuccess;
}

cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream) {
  KVR_EMU_ENTER();
  if (event == nullptr || E().events.count(event) == 0 || !kvr::cuda_emu::Live(stream)) {
    return Fail(cudaErrorInvalidResourceHandle);
  }
  KvrEmuStream* s = kvr::cuda_emu::Resolve(stream);
  event->stream = s;
  event->seq = s->enqueued;
  return cudaSuccess;
}

cudaError_t cudaEventSynchronize(cudaEvent_t event) {
  KVR_EMU_ENTER();
  if (event == nullptr || E().events.count(event) == 0) {
    return Fail(cudaErrorInvalidResourceHandle);
  }
  if (event->stream != nullptr) kvr::cuda_emu::Drain(event->stream, event->seq);
  return E().sticky;
}

cudaError_t cudaEventQuery(cudaEvent_t event) {
  KVR_EMU_ENTER();
  if (event == nullptr || E().events.count(event) == 0) {
    return Fail(cudaErrorInvalidResourceHandle);
  }
  if (event->stream == nullptr || event->stream->done >= event->seq) return cudaSuccess;
  return cudaErrorNotReady;
}

// ---- cuBLAS ----------------------------------------------------------------------

cublasStatus_t cublasCreate(cublasHandle_t* handle) {
  std::lock_guard<std::recursive_mutex> lock(E().mu);
  if (handle == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  if (E().sticky != cudaSuccess) return CUBLAS_STATUS_NOT_INITIALIZED;
  *handle = new KvrEmuCublas();
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasDestroy(cublasHandle_t handle) {
  std::lock_guard<std::recursive_mutex> lock(E().mu);
  if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  delete handle;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetStream(cublasHandle_t handle, cudaStream_t stream) {
  std::lock_guard<std::recursive_mutex> lock(E().mu);
  if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  handle->stream = stream;
  return CUBLAS_STATUS_SUCCESS;
}

namespace kvr::cuda_emu {
namespace {

size_t TypeSize(cudaDataType_t t) { return t == CUDA_R_32F ? 4 : 2; }

float Element(const void* p, cudaDataType_t t, size_t i) {
  switch (t) {
    case CUDA_R_32F:
      return static_cast<const float*>(p)[i];
    case CUDA_R_16BF:
      return Bf16ToFloat(static_cast<const uint16_t*>(p)[i]);
    case CUDA_R_16F:
      return Fp16ToFloat(static_cast<const uint16_t*>(p)[i]);
  }
  return 0.0f;
}

// A column-major operand of `rows` x `cols` with leading dimension ld must lie
// in one device allocation.
bool OperandInDevice(const void* p, cudaDataType_t t, int rows, int cols, int ld) {
  if (rows == 0 || cols == 0) return true;
  const size_t elems = size_t(ld) * size_t(cols - 1) + size_t(rows);
  return IsDevice(p, elems * TypeSize(t));
}

}  // namespace
}  // namespace kvr::cuda_emu

cublasStatus_t cublasGemmEx(cublasHandle_t handle, cublasOperation_t transa,
                            cublasOperation_t transb, int m, int n, int k, const void* alpha,
                            const void* a, cudaDataType_t a_type, int lda, const void* b,
                            cudaDataType_t b_type, int ldb, const void* beta, void* c,
                            cudaDataType_t c_type, int ldc, cublasComputeType_t compute,
                            cublasGemmAlgo_t algo) {
  using kvr::cuda_emu::OperandInDevice;
  std::lock_guard<std::recursive_mutex> lock(E().mu);
  if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (E().sticky != cudaSuccess) return CUBLAS_STATUS_EXECUTION_FAILED;
  const bool ta = transa != CUBLAS_OP_N, tb = transb != CUBLAS_OP_N;
  if (m < 0 || n < 0 || k < 0 || alpha == nullptr || beta == nullptr ||
      lda < std::max(1, ta ? k : m) || ldb < std::max(1, tb ? n : k) || ldc < std::max(1, m)) {
    return CUBLAS_STATUS_INVALID_VALUE;
  }
  const bool type_ok = a_type == b_type && c_type == CUDA_R_32F &&
                       (a_type == CUDA_R_32F || a_type == CUDA_R_16F || a_type == CUDA_R_16BF);
  if (!type_ok || (compute != CUBLAS_COMPUTE_32F && compute != CUBLAS_COMPUTE_32F_PEDANTIC)) {
    return CUBLAS_STATUS_NOT_SUPPORTED;
  }
  if (m == 0 || n == 0) return CUBLAS_STATUS_SUCCESS;
  if (!OperandInDevice(a, a_type, ta ? k : m, ta ? m : k, lda) ||
      !OperandInDevice(b, b_type, tb ? n : k, tb ? k : n, ldb) ||
      !OperandInDevice(c, c_type, m, n, ldc)) {
    kvr::cuda_emu::Fault(absl::StrCat("cublasGemmEx m=", m, " n=", n, " k=", k, " lda=", lda,
                                      " ldb=", ldb, " ldc=", ldc,
                                      ": an operand reaches outside its device allocation"),
                         cudaErrorIllegalAddress);
    return CUBLAS_STATUS_EXECUTION_FAILED;
  }
  const float al = *static_cast<const float*>(alpha), be = *static_cast<const float*>(beta);
  kvr::cuda_emu::Enqueue(kvr::cuda_emu::Resolve(handle->stream), [=] {
    using kvr::cuda_emu::Element;
    // op(A) as rows of k, op(B) as columns of k, then k-ordered fp32 dots.
    std::vector<float> ar(size_t(m) * k), bc(size_t(n) * k);
    for (int i = 0; i < m; ++i) {
      for (int p = 0; p < k; ++p) {
        ar[size_t(i) * k + p] = Element(a, a_type, ta ? size_t(i) * lda + p : size_t(p) * lda + i);
      }
    }
    for (int j = 0; j < n; ++j) {
      for (int p = 0; p < k; ++p) {
        bc[size_t(j) * k + p] = Element(b, b_type, tb ? size_t(p) * ldb + j : size_t(j) * ldb + p);
      }
    }
    float* cf = static_cast<float*>(c);
    for (int j = 0; j < n; ++j) {
      for (int i = 0; i < m; ++i) {
        const float* x = &ar[size_t(i) * k];
        const float* y = &bc[size_t(j) * k];
        float acc = 0.0f;
        for (int p = 0; p < k; ++p) acc = std::fma(x[p], y[p], acc);
        float& out = cf[size_t(j) * ldc + i];
        out = be == 0.0f ? al * acc : al * acc + be * out;
      }
    }
  });
  return CUBLAS_STATUS_SUCCESS;
}
