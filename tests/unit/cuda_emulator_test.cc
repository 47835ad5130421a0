// The CUDA emulator's semantics (shuffles, barriers, shared memory, lazy
// streams, launch limits, cublasGemmEx) against scalar oracles, and the
// faults it promises to catch: each fault runs in a forked child (a device
// fault is sticky for the process, as on a GPU) that must die or report it.
#include <sys/resource.h>
#include <sys/wait.h>

#include <cmath>
#include <csignal>
#include <cstdint>
#include <random>
#include <vector>

#include "gpu_worker/backend/cuda/cuda_api.h"
#include "gtest/gtest.h"

namespace {

// ---- Kernels ------------------------------------------------------------------

// out[warp] = sum of in over the warp's lanes by an xor butterfly, and
// bcast[t] = in of lane 7 of t's warp.
__global__ void WarpSumKernel(const float* in, float* out, float* bcast) {
  const int t = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  float v = in[t];
  bcast[t] = __shfl_sync(0xffffffffu, v, 7);
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if ((threadIdx.x & 31) == 0) out[t / 32] = v;
}

// Block-wide sum through dynamic shared memory and barriers.
__global__ void BlockSumKernel(const int64_t* in, int64_t* out) {
  KVR_DYNAMIC_SHARED(int64_t, partial);
  partial[threadIdx.x] = in[blockIdx.x * blockDim.x + threadIdx.x];
  __syncthreads();
  for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) partial[threadIdx.x] += partial[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[blockIdx.x] = partial[0];
}

// Only even threads reach the barrier.
__global__ void DivergentBarrierKernel(float* out) {
  if (threadIdx.x % 2 == 0) __syncthreads();
  out[threadIdx.x] = 1.0f;
}

// Lanes 16..31 exit before the warp's full-mask shuffle.
__global__ void ExitedLanesShuffleKernel(float* out) {
  if (threadIdx.x >= 16) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}

// Thread 0 writes shared memory that the others read with no barrier between.
__global__ void MissingBarrierKernel(float* out) {
  KVR_DYNAMIC_SHARED(float, s);
  if (threadIdx.x == 0) s[0] = 42.0f;
  out[threadIdx.x] = s[0];
}

// Writes out[i] for i < n + 1: one element past the end.
__global__ void OverrunKernel(float* out, int n) {
  for (int i = static_cast<int>(threadIdx.x); i <= n; i += static_cast<int>(blockDim.x)) {
    out[i] = 1.0f;
  }
}

__global__ void FillKernel(float* out, float value) { out[threadIdx.x] = value; }

// ---- Helpers --------------------------------------------------------------------

template <typename T>
T* DeviceAlloc(size_t n) {
  void* p = nullptr;
  EXPECT_EQ(cudaMalloc(&p, n * sizeof(T)), cudaSuccess);
  return static_cast<T*>(p);
}

template <typename T>
std::vector<T> ToHost(const T* dev, size_t n) {
  std::vector<T> v(n);
  EXPECT_EQ(cudaMemcpy(v.data(), dev, n * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
  return v;
}

template <typename T>
T* FromHost(const std::vector<T>& v) {
  T* d = DeviceAlloc<T>(v.size());
  EXPECT_EQ(cudaMemcpy(d, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
  return d;
}

// ---- Tests ------------------------------------------------------------------------

TEST(CudaEmulatorTest, WarpShufflesMatchScalarSums) {
  std::mt19937 rng(1);
  std::uniform_int_distribution<int> dist(-1000, 1000);
  std::vector<float> in(4 * 64);  // 4 blocks x 2 warps; integers: exact sums
  for (float& x : in) x = static_cast<float>(dist(rng));
  float* d_in = FromHost(in);
  float* d_out = DeviceAlloc<float>(8);
  float* d_bcast = DeviceAlloc<float>(in.size());
  KVR_LAUNCH(WarpSumKernel, 4, 64, 0, nullptr)(d_in, d_out, d_bcast);
  ASSERT_EQ(cudaGetLastError(), cudaSuccess);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const auto out = ToHost(d_out, 8), bcast = ToHost(d_bcast, in.size());
  for (int w = 0; w < 8; ++w) {
    float want = 0;
    for (int l = 0; l < 32; ++l) want += in[w * 32 + l];
    EXPECT_EQ(out[w], want) << "warp " << w;
    for (int l = 0; l < 32; ++l) EXPECT_EQ(bcast[w * 32 + l], in[w * 32 + 7]);
  }
  cudaFree(d_in);
  cudaFree(d_out);
  cudaFree(d_bcast);
}

TEST(CudaEmulatorTest, BarriersAndDynamicSharedMemory) {
  const int blocks = 3, threads = 256;
  std::vector<int64_t> in(blocks * threads);
  for (size_t i = 0; i < in.size(); ++i) in[i] = static_cast<int64_t>(i * i) - 5000;
  int64_t* d_in = FromHost(in);
  int64_t* d_out = DeviceAlloc<int64_t>(blocks);
  KVR_LAUNCH(BlockSumKernel, blocks, threads, threads * sizeof(int64_t), nullptr)(d_in, d_out);
  ASSERT_EQ(cudaGetLastError(), cudaSuccess);
  const auto out = ToHost(d_out, blocks);
  for (int b = 0; b < blocks; ++b) {
    int64_t want = 0;
    for (int t = 0; t < threads; ++t) want += in[b * threads + t];
    EXPECT_EQ(out[b], want);
  }
  cudaFree(d_in);
  cudaFree(d_out);
}

TEST(CudaEmulatorTest, LaunchLimitsFailLikeTheRuntime) {
  float* d = DeviceAlloc<float>(1024);
  KVR_LAUNCH(FillKernel, 1, 1025, 0, nullptr)(d, 1.0f);
  EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidConfiguration);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);  // not sticky
  KVR_LAUNCH(FillKernel, 0, 32, 0, nullptr)(d, 1.0f);
  EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidConfiguration);
  // 64 KiB of dynamic shared memory needs the opt-in attribute first.
  KVR_LAUNCH(FillKernel, 1, 32, 64 << 10, nullptr)(d, 1.0f);
  EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidValue);
  EXPECT_EQ(cudaFuncSetAttribute(FillKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 << 10),
            cudaSuccess);
  KVR_LAUNCH(FillKernel, 1, 32, 64 << 10, nullptr)(d, 2.0f);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
  EXPECT_EQ(ToHost(d, 1)[0], 2.0f);
  EXPECT_EQ(cudaFuncSetAttribute(FillKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 1 << 20),
            cudaErrorInvalidValue);
  (void)cudaGetLastError();
  cudaFree(d);
}

TEST(CudaEmulatorTest, StreamsAreLazyForPinnedMemory) {
  cudaStream_t s = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), cudaSuccess);
  cudaEvent_t ev = nullptr;
  ASSERT_EQ(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming), cudaSuccess);
  void* pinned_raw = nullptr;
  ASSERT_EQ(cudaMallocHost(&pinned_raw, 4 * sizeof(float)), cudaSuccess);
  auto* pinned = static_cast<float*>(pinned_raw);
  float* d = DeviceAlloc<float>(4);

  // A pinned staging buffer rewritten before the copy ran: the copy reads
  // the new bytes, as a DMA that starts late would.
  pinned[0] = 1.0f;
  ASSERT_EQ(cudaMemcpyAsync(d, pinned, sizeof(float), cudaMemcpyHostToDevice, s), cudaSuccess);
  pinned[0] = 2.0f;
  ASSERT_EQ(cudaStreamSynchronize(s), cudaSuccess);
  EXPECT_EQ(ToHost(d, 1)[0], 2.0f);

  // Waiting on an event recorded after the copy makes reuse safe.
  pinned[0] = 3.0f;
  ASSERT_EQ(cudaMemcpyAsync(d, pinned, sizeof(float), cudaMemcpyHostToDevice, s), cudaSuccess);
  ASSERT_EQ(cudaEventRecord(ev, s), cudaSuccess);
  EXPECT_EQ(cudaEventQuery(ev), cudaErrorNotReady);
  ASSERT_EQ(cudaEventSynchronize(ev), cudaSuccess);
  EXPECT_EQ(cudaEventQuery(ev), cudaSuccess);
  pinned[0] = 4.0f;
  EXPECT_EQ(ToHost(d, 1)[0], 3.0f);

  // A kernel's result in pinned memory is there only after the wait.
  KVR_LAUNCH(FillKernel, 1, 4, 0, s)(d, 5.0f);
  ASSERT_EQ(cudaMemcpyAsync(pinned, d, 4 * sizeof(float), cudaMemcpyDeviceToHost, s), cudaSuccess);
  EXPECT_NE(pinned[1], 5.0f);  // not before the wait
  ASSERT_EQ(cudaStreamSynchronize(s), cudaSuccess);
  EXPECT_EQ(pinned[1], 5.0f);

  // Pageable destinations are synchronous (the runtime drains the stream).
  KVR_LAUNCH(FillKernel, 1, 4, 0, s)(d, 6.0f);
  float host[4] = {};
  ASSERT_EQ(cudaMemcpyAsync(host, d, sizeof host, cudaMemcpyDeviceToHost, s), cudaSuccess);
  EXPECT_EQ(host[3], 6.0f);

  // Copies must stay inside one device allocation.
  EXPECT_EQ(cudaMemcpyAsync(d, host, 5 * sizeof(float), cudaMemcpyHostToDevice, s),
            cudaErrorInvalidValue);
  EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidValue);
  EXPECT_EQ(cudaFreeHost(pinned), cudaSuccess);
  EXPECT_EQ(cudaFree(d), cudaSuccess);
  EXPECT_EQ(cudaEventDestroy(ev), cudaSuccess);
  EXPECT_EQ(cudaStreamDestroy(s), cudaSuccess);
}

TEST(CudaEmulatorTest, DeviceMemoryIsCapped) {
  size_t free_bytes = 0, total = 0;
  ASSERT_EQ(cudaMemGetInfo(&free_bytes, &total), cudaSuccess);
  void* p = nullptr;
  EXPECT_EQ(cudaMalloc(&p, total + 1), cudaErrorMemoryAllocation);
  EXPECT_EQ(p, nullptr);
  EXPECT_EQ(cudaGetLastError(), cudaErrorMemoryAllocation);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
}

TEST(CudaEmulatorTest, GemmExMatchesColumnMajorOracle) {
  cublasHandle_t h = nullptr;
  ASSERT_EQ(cublasCreate(&h), CUBLAS_STATUS_SUCCESS);
  const int m = 5, n = 3, k = 7, lda = 9, ldb = 8, ldc = 6;
  std::mt19937 rng(2);
  std::uniform_int_distribution<int> dist(-4, 4);
  for (cublasOperation_t ta : {CUBLAS_OP_N, CUBLAS_OP_T}) {
    for (cublasOperation_t tb : {CUBLAS_OP_N, CUBLAS_OP_T}) {
      const int a_cols = ta == CUBLAS_OP_N ? k : m, b_cols = tb == CUBLAS_OP_N ? n : k;
      std::vector<float> a(lda * a_cols), b(ldb * b_cols), c(ldc * n);
      for (float& x : a) x = static_cast<float>(dist(rng));
      for (float& x : b) x = static_cast<float>(dist(rng));
      for (float& x : c) x = static_cast<float>(dist(rng));
      float* da = FromHost(a);
      float* db = FromHost(b);
      float* dc = FromHost(c);
      const float alpha = 2.0f, beta = -1.0f;
      ASSERT_EQ(cublasGemmEx(h, ta, tb, m, n, k, &alpha, da, CUDA_R_32F, lda, db, CUDA_R_32F, ldb,
                             &beta, dc, CUDA_R_32F, ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                CUBLAS_STATUS_SUCCESS);
      const auto got = ToHost(dc, c.size());
      for (int j = 0; j < n; ++j) {
        for (int i = 0; i < m; ++i) {
          float acc = 0;
          for (int p = 0; p < k; ++p) {
            const float av = ta == CUBLAS_OP_N ? a[p * lda + i] : a[i * lda + p];
            const float bv = tb == CUBLAS_OP_N ? b[j * ldb + p] : b[p * ldb + j];
            acc += av * bv;
          }
          EXPECT_EQ(got[j * ldc + i], alpha * acc + beta * c[j * ldc + i]);
        }
        for (int i = m; i < ldc; ++i) EXPECT_EQ(got[j * ldc + i], c[j * ldc + i]);  // padding kept
      }
      cudaFree(da);
      cudaFree(db);
      cudaFree(dc);
    }
  }
  const float one = 1.0f;
  float* d = DeviceAlloc<float>(64);
  EXPECT_EQ(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, 4, 4, 4, &one, d, CUDA_R_32F, 3, d,
                         CUDA_R_32F, 4, &one, d, CUDA_R_32F, 4, CUBLAS_COMPUTE_32F,
                         CUBLAS_GEMM_DEFAULT),
            CUBLAS_STATUS_INVALID_VALUE);  // lda 3 < m 4
  EXPECT_EQ(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, 4, 4, 4, &one, d, CUDA_R_16BF, 4, d,
                         CUDA_R_32F, 4, &one, d, CUDA_R_32F, 4, CUBLAS_COMPUTE_32F,
                         CUBLAS_GEMM_DEFAULT),
            CUBLAS_STATUS_NOT_SUPPORTED);  // mixed operand types
  cudaFree(d);
  EXPECT_EQ(cublasDestroy(h), CUBLAS_STATUS_SUCCESS);
}

// Runs `body` in a forked child; returns its exit status (or -signal). The
// child writes no core file when it faults on purpose.
template <typename Body>
int InChild(Body body) {
  fflush(nullptr);
  const pid_t pid = fork();
  if (pid == 0) {
    const rlimit no_core{0, 0};
    setrlimit(RLIMIT_CORE, &no_core);
    // A fault the test expects must kill the child with the signal: under
    // ASan its own SEGV handler would report it and exit(1) instead.
    std::signal(SIGSEGV, SIG_DFL);
    _exit(body());
  }
  int status = 0;
  waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : -WTERMSIG(status);
}

TEST(CudaEmulatorTest, DivergentBarrierIsALaunchFailure) {
  EXPECT_EQ(InChild([] {
              float* d = DeviceAlloc<float>(64);
              KVR_LAUNCH(DivergentBarrierKernel, 1, 64, 0, nullptr)(d);
              if (cudaGetLastError() != cudaSuccess) return 1;
              if (cudaDeviceSynchronize() != cudaErrorLaunchFailure) return 2;
              // Sticky: the context is unusable afterwards.
              if (cudaMemsetAsync(d, 0, 4) != cudaErrorLaunchFailure) return 3;
              return 0;
            }),
            0);
}

TEST(CudaEmulatorTest, ShuffleWithExitedLanesIsALaunchFailure) {
  EXPECT_EQ(InChild([] {
              float* d = DeviceAlloc<float>(32);
              KVR_LAUNCH(ExitedLanesShuffleKernel, 1, 32, 0, nullptr)(d);
              return cudaDeviceSynchronize() == cudaErrorLaunchFailure ? 0 : 1;
            }),
            0);
}

TEST(CudaEmulatorTest, MissingBarrierReadsPoisonedSharedMemory) {
  float* d = DeviceAlloc<float>(64);
  KVR_LAUNCH(MissingBarrierKernel, 1, 64, sizeof(float), nullptr)(d);
  const auto out = ToHost(d, 64);
  EXPECT_EQ(out[0], 42.0f);
  for (int t = 1; t < 64; ++t) EXPECT_TRUE(std::isnan(out[t])) << "thread " << t << " " << out[t];
  cudaFree(d);
}

TEST(CudaEmulatorTest, OverrunPastAnAllocationFaults) {
  EXPECT_EQ(InChild([] {
              float* d = DeviceAlloc<float>(1000);
              KVR_LAUNCH(OverrunKernel, 1, 128, 0, nullptr)(d, 1000);
              (void)cudaDeviceSynchronize();
              return 0;
            }),
            -SIGSEGV);
  // The same kernel within bounds is fine.
  float* d = DeviceAlloc<float>(1001);
  KVR_LAUNCH(OverrunKernel, 1, 128, 0, nullptr)(d, 1000);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  EXPECT_EQ(ToHost(d, 1001)[1000], 1.0f);
  cudaFree(d);
}

}  // namespace
