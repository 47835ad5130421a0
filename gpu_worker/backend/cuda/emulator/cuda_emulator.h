// A CPU emulator of the part of the CUDA runtime, the CUDA C++ kernel
// language and cuBLAS that the cuda backend uses, so that the backend's own
// sources (kernels and host code, unchanged) build with the host compiler
// and run in tests on machines without a GPU.
//
// Include it only through gpu_worker/backend/cuda/cuda_api.h with
// KVR_CUDA_EMULATION defined; never in the same translation unit as the
// toolkit's headers (it declares the same names).
//
// What it emulates, and what it checks that a sloppy emulator would let pass:
//   * Kernels: every CUDA thread runs as a fiber; __syncthreads() is a block
//     barrier and __shfl_sync / __shfl_xor_sync exchange values inside a warp
//     of 32 fibers. A barrier some threads never reach (exited threads
//     included, as the programming guide requires), a shuffle whose warp
//     has exited lanes, and a mask other than 0xffffffff are reported as a
//     launch failure (sticky, like a device fault) with a message on stderr.
//     Dynamic shared memory is filled with 0xff bytes (NaN floats) before each
//     block, so reads of shared memory no thread wrote show up in results.
//   * Launch limits: block size (1..1024 threads), grid size, dynamic shared
//     memory (48 KiB unless cudaFuncSetAttribute raised it, at most the
//     opt-in limit) fail the launch as the runtime does.
//   * Streams are lazy: kernels, cudaMemcpyAsync between device memory and
//     pinned host memory, cudaMemsetAsync and cuBLAS calls are queued and run
//     only when the host waits (cudaStreamSynchronize, cudaEventSynchronize on
//     an event behind them, cudaFree, a synchronous copy). Host code that
//     reuses a pinned buffer before the copy reading it has run, or reads a
//     pinned result before waiting, gets wrong values, as it could on a GPU.
//     Copies from / to pageable memory are synchronous as the runtime
//     documents (the stream is drained first).
//   * Memory: every allocation ends right before an inaccessible page (an
//     overrun faults), copies must stay inside one live device allocation,
//     and device memory is capped (KVR_CUDA_EMU_MEMORY_BYTES, default 8 GiB)
//     so an oversized cudaMalloc fails with cudaErrorMemoryAllocation.
//   * cublasGemmEx: column-major reference product with the documented
//     argument rules (leading dimensions, operand types), fp32 accumulation.
// One emulated device (ordinal 0) with an H100's multiprocessor count (132)
// and shared-memory limits. All entry points are thread-safe (one global
// lock); kernels run on the calling host thread.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

#include "common/half.h"

// ---- Runtime API types, with the toolkit's names and values ----------------

enum cudaError {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInsufficientDriver = 35,
  cudaErrorNoDevice = 100,
  cudaErrorInvalidDevice = 101,
  cudaErrorNoKernelImageForDevice = 209,
  cudaErrorInvalidResourceHandle = 400,
  cudaErrorNotReady = 600,
  cudaErrorIllegalAddress = 700,
  cudaErrorLaunchOutOfResources = 701,
  cudaErrorLaunchFailure = 719,
  cudaErrorNotSupported = 801,
};
typedef enum cudaError cudaError_t;

enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4,
};

enum cudaDeviceAttr {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrWarpSize = 10,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};

enum cudaFuncAttribute {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
};

inline constexpr unsigned cudaStreamDefault = 0x0;
inline constexpr unsigned cudaStreamNonBlocking = 0x1;
inline constexpr unsigned cudaEventDefault = 0x0;
inline constexpr unsigned cudaEventDisableTiming = 0x2;

struct KvrEmuStream;
struct KvrEmuEvent;
typedef KvrEmuStream* cudaStream_t;
typedef KvrEmuEvent* cudaEvent_t;

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

// The fields of the toolkit's cudaDeviceProp that kvr reads.
struct cudaDeviceProp {
  char name[256];
  size_t totalGlobalMem;
  size_t sharedMemPerBlockOptin;
  int multiProcessorCount;
  int maxThreadsPerBlock;
  int warpSize;
  int major, minor;
};

cudaError_t cudaGetDeviceCount(int* count);
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device);
// 0: no driver (there is none; the emulator is the "device").
cudaError_t cudaDriverGetVersion(int* version);
cudaError_t cudaSetDevice(int device);
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t cudaDeviceSynchronize();
cudaError_t cudaMemGetInfo(size_t* free_bytes, size_t* total_bytes);
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorName(cudaError_t err);
const char* cudaGetErrorString(cudaError_t err);

cudaError_t cudaMalloc(void** ptr, size_t bytes);
cudaError_t cudaFree(void* ptr);
cudaError_t cudaMallocHost(void** ptr, size_t bytes);
cudaError_t cudaFreeHost(void* ptr);
cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind);
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind,
                            cudaStream_t stream = nullptr);
cudaError_t cudaMemsetAsync(void* ptr, int value, size_t bytes, cudaStream_t stream = nullptr);

cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned flags);
cudaError_t cudaStreamDestroy(cudaStream_t stream);
cudaError_t cudaStreamSynchronize(cudaStream_t stream);
cudaError_t cudaEventCreateWithFlags(cudaEvent_t* event, unsigned flags);
cudaError_t cudaEventDestroy(cudaEvent_t event);
cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream = nullptr);
cudaError_t cudaEventSynchronize(cudaEvent_t event);
cudaError_t cudaEventQuery(cudaEvent_t event);

// ---- cuBLAS (the GEMM the backend uses) -------------------------------------

enum cublasStatus_t {
  CUBLAS_STATUS_SUCCESS = 0,
  CUBLAS_STATUS_NOT_INITIALIZED = 1,
  CUBLAS_STATUS_ALLOC_FAILED = 3,
  CUBLAS_STATUS_INVALID_VALUE = 7,
  CUBLAS_STATUS_ARCH_MISMATCH = 8,
  CUBLAS_STATUS_MAPPING_ERROR = 11,
  CUBLAS_STATUS_EXECUTION_FAILED = 13,
  CUBLAS_STATUS_INTERNAL_ERROR = 14,
  CUBLAS_STATUS_NOT_SUPPORTED = 15,
  CUBLAS_STATUS_LICENSE_ERROR = 16,
};
enum cublasOperation_t { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1, CUBLAS_OP_C = 2 };
enum cudaDataType_t { CUDA_R_32F = 0, CUDA_R_16F = 2, CUDA_R_16BF = 14 };
enum cublasComputeType_t { CUBLAS_COMPUTE_32F = 68, CUBLAS_COMPUTE_32F_PEDANTIC = 69 };
enum cublasGemmAlgo_t { CUBLAS_GEMM_DEFAULT = -1 };
struct KvrEmuCublas;
typedef KvrEmuCublas* cublasHandle_t;

cublasStatus_t cublasCreate(cublasHandle_t* handle);
cublasStatus_t cublasDestroy(cublasHandle_t handle);
cublasStatus_t cublasSetStream(cublasHandle_t handle, cudaStream_t stream);
// C (m x n, ldc) = alpha op(A) op(B) + beta C, column-major; op(A) is m x k,
// op(B) k x n. A and B of one type (32F, 16F or 16BF), C 32F, compute 32F.
cublasStatus_t cublasGemmEx(cublasHandle_t handle, cublasOperation_t transa,
                            cublasOperation_t transb, int m, int n, int k, const void* alpha,
                            const void* a, cudaDataType_t a_type, int lda, const void* b,
                            cudaDataType_t b_type, int ldb, const void* beta, void* c,
                            cudaDataType_t c_type, int ldc, cublasComputeType_t compute,
                            cublasGemmAlgo_t algo);

// ---- The kernel language ----------------------------------------------------

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
// Blocks run one after another on one host thread, so a function-local static
// is exactly one block's shared variable.
#define __shared__ static

namespace kvr::cuda_emu {

// How many times the host has blocked until queued device work ran (a
// stream or event synchronize, a synchronous copy, cudaFree, ... that found
// work queued on a stream: one count per stream drained). For tests of how
// often code waits for the device; thread-safe.
uint64_t HostWaits();

const uint3& ThreadIndex();
const uint3& BlockIndex();
const dim3& BlockDim();
const dim3& GridDim();
void* DynamicSharedBytes();
void SyncThreads();
// Full-warp exchange of a value's bits; `src_lane` is taken modulo `width`
// (only 32, the whole warp, is supported; others fail the launch).
uint64_t ShuffleBits(unsigned mask, uint64_t bits, int src_lane, int width);
int LaneId();

template <typename T>
T* DynamicShared() {
  return static_cast<T*>(DynamicSharedBytes());
}

// The queued part of a launch: runs `body` once per thread of the grid.
struct LaunchConfig {
  const char* kernel_name;
  const void* kernel;  // identity, for cudaFuncSetAttribute limits
  dim3 grid, block;
  size_t shared_bytes;
  cudaStream_t stream;
};
cudaError_t EnqueueLaunch(const LaunchConfig& config, std::function<void()> body);
cudaError_t SetFuncAttribute(const void* kernel, cudaFuncAttribute attr, int value);

// `kernel<<<grid, block, shared, stream>>>(args...)` as
// `Launcher(...)(args...)`: the arguments are converted to the parameter
// types and copied at launch, as the runtime does.
template <typename... Params>
class Launcher {
 public:
  Launcher(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared,
           cudaStream_t stream)
      : config_{name, reinterpret_cast<const void*>(kernel), grid, block, shared, stream},
        kernel_(kernel) {}

  template <typename... Args>
  void operator()(Args&&... args) const {
    static_assert(sizeof...(Args) == sizeof...(Params), "kernel argument count");
    std::tuple<std::decay_t<Params>...> values(std::forward<Args>(args)...);
    auto kernel = kernel_;
    (void)EnqueueLaunch(config_, [kernel, values]() { std::apply(kernel, values); });
  }

 private:
  LaunchConfig config_;
  void (*kernel_)(Params...);
};

template <typename... Params>
Launcher<Params...> Launch(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block,
                           size_t shared, cudaStream_t stream) {
  return Launcher<Params...>(name, kernel, grid, block, shared, stream);
}

}  // namespace kvr::cuda_emu

template <typename Kernel>
cudaError_t cudaFuncSetAttribute(Kernel* kernel, cudaFuncAttribute attr, int value) {
  return ::kvr::cuda_emu::SetFuncAttribute(reinterpret_cast<const void*>(kernel), attr, value);
}

#define threadIdx (::kvr::cuda_emu::ThreadIndex())
#define blockIdx (::kvr::cuda_emu::BlockIndex())
#define blockDim (::kvr::cuda_emu::BlockDim())
#define gridDim (::kvr::cuda_emu::GridDim())

inline void __syncthreads() { ::kvr::cuda_emu::SyncThreads(); }

template <typename T>
T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8);
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = ::kvr::cuda_emu::ShuffleBits(mask, bits, src_lane, width);
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return __shfl_sync(mask, v, ::kvr::cuda_emu::LaneId() ^ lane_mask, width);
}

inline float __int_as_float(int v) {
  float f;
  std::memcpy(&f, &v, sizeof f);
  return f;
}
inline int __float_as_int(float f) {
  int v;
  std::memcpy(&v, &f, sizeof v);
  return v;
}

// CUDA's overloaded min / max for mixed integer widths.
template <typename A, typename B>
  requires std::is_arithmetic_v<A> && std::is_arithmetic_v<B>
constexpr std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  return static_cast<C>(b) < static_cast<C>(a) ? static_cast<C>(b) : static_cast<C>(a);
}
template <typename A, typename B>
  requires std::is_arithmetic_v<A> && std::is_arithmetic_v<B>
constexpr std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  return static_cast<C>(a) < static_cast<C>(b) ? static_cast<C>(b) : static_cast<C>(a);
}

// ---- bf16 / fp16 (cuda_bf16.h, cuda_fp16.h) ---------------------------------

struct __nv_bfloat16 {
  uint16_t bits;
};
struct __half {
  uint16_t bits;
};
inline float __bfloat162float(__nv_bfloat16 v) { return ::kvr::Bf16ToFloat(v.bits); }
inline float __half2float(__half v) { return ::kvr::Fp16ToFloat(v.bits); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return {::kvr::FloatToBf16(f)}; }
inline __half __float2half_rn(float f) { return {::kvr::FloatToFp16(f)}; }
