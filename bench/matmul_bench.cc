// matmul_bench: the CPU backend's own MatMul kernels (y = x * W^T, SIMD +
// ThreadPool) vs OpenBLAS (sgemv for one row, sgemm otherwise) on the same
// fp32 data, at Llama-3-8B projection shapes: decode (1 row), a small batch
// (16 rows, the backend's BLAS threshold) and prefill (64 rows); plus the
// backend as configured (KVR_CPU_MATMUL / OpenBLAS core detection decide
// whether it calls OpenBLAS for >= 16 rows). Prints GFLOP/s and the max
// relative difference (docs/benchmarks.md §6).
//
//   matmul_bench [--threads=1,2] [--reps=20]
//   OPENBLAS_CORETYPE=SkylakeX matmul_bench   # OpenBLAS forced to its AVX-512 kernels
#include <cblas.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "gpu_worker/backend/backend.h"

ABSL_FLAG(std::string, threads, "1,2", "thread counts to measure");
ABSL_FLAG(int, reps, 20, "repetitions per shape (median reported)");


namespace {

using Clock = std::chrono::steady_clock;

struct Shape {
  const char* name;
  int rows, in, out;
};

template <typename F>
double MedianSeconds(int reps, F&& f) {
  std::vector<double> t;
  f();  // warm up
  for (int i = 0; i < reps; ++i) {
    const auto a = Clock::now();
    f();
    t.push_back(std::chrono::duration<double>(Clock::now() - a).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

int Run() {
  using kvr::worker::Backend;
  using kvr::worker::BackendRegistry;
  const Shape shapes[] = {{"decode q/o proj", 1, 4096, 4096},
                          {"decode ffn up/gate", 1, 4096, 14336},
                          {"batch q/o proj", 16, 4096, 4096},
                          {"prefill q/o proj", 64, 4096, 4096},
                          {"prefill ffn up/gate", 64, 4096, 14336}};
  std::vector<int> threads;
  for (absl::string_view s : absl::StrSplit(absl::GetFlag(FLAGS_threads), ',')) {
    int t = 0;
    if (!absl::SimpleAtoi(s, &t) || t < 1) {
      std::fprintf(stderr, "matmul_bench: --threads: '%s' is not a positive integer\n",
                   std::string(s).c_str());
      return 2;
    }
    threads.push_back(t);
  }
  const int reps = absl::GetFlag(FLAGS_reps);
  {
    auto b = BackendRegistry::Create("cpu", {});
    if (!b.ok()) {
      std::fprintf(stderr, "%s\n", std::string(b.status().message()).c_str());
      return 1;
    }
    std::printf("OpenBLAS core: %s; backend as configured: %s\n", openblas_get_corename(),
                (*b)->Describe().c_str());
  }
  std::printf("%-34s %3s %10s %14s %13s %12s %14s\n", "shape (rows x in -> out)", "thr",
              "own GF/s", "OpenBLAS GF/s", "own/OpenBLAS", "max rel diff", "backend GF/s");
  std::mt19937 rng(1);
  std::normal_distribution<float> g;
  for (const Shape& s : shapes) {
    std::vector<float> x(static_cast<size_t>(s.rows) * s.in), w(static_cast<size_t>(s.out) * s.in);
    for (float& v : x) v = g(rng);
    for (float& v : w) v = g(rng) * 0.02f;
    for (int t : threads) {
      kvr::worker::BackendOptions opts;
      opts.num_threads = t;
      opts.cpu_matmul = kvr::worker::CpuMatMul::kOwn;
      auto backend = BackendRegistry::Create("cpu", opts);
      opts.cpu_matmul = kvr::worker::CpuMatMul::kAuto;
      auto configured = BackendRegistry::Create("cpu", opts);
      if (!backend.ok() || !configured.ok()) {
        const absl::Status& st = backend.ok() ? configured.status() : backend.status();
        std::fprintf(stderr, "%s\n", std::string(st.message()).c_str());
        return 1;
      }
      Backend& b = **backend;
      auto tx = b.Allocate(kvr::DType::kF32, s.rows, s.in);
      auto tw = b.Allocate(kvr::DType::kF32, s.out, s.in);
      auto ty = b.Allocate(kvr::DType::kF32, s.rows, s.out);
      if (!tx.ok() || !tw.ok() || !ty.ok()) return 1;
      if (!b.UploadF32(x, *tx).ok() || !b.UploadF32(w, *tw).ok()) return 1;
      const double kvr_s = MedianSeconds(reps, [&] {
        if (auto st = b.MatMul(*tx, *tw, *ty); !st.ok()) std::abort();
      });
      std::vector<float> y(static_cast<size_t>(s.rows) * s.out), yb(y.size());
      if (!b.Download(*ty, std::as_writable_bytes(std::span<float>(y))).ok()) return 1;
      // The backend as configured (own kernels or OpenBLAS by the same rule
      // the engine gets).
      Backend& c = **configured;
      auto cx = c.Allocate(kvr::DType::kF32, s.rows, s.in);
      auto cw = c.Allocate(kvr::DType::kF32, s.out, s.in);
      auto cy = c.Allocate(kvr::DType::kF32, s.rows, s.out);
      if (!cx.ok() || !cw.ok() || !cy.ok()) return 1;
      if (!c.UploadF32(x, *cx).ok() || !c.UploadF32(w, *cw).ok()) return 1;
      const double configured_s = MedianSeconds(reps, [&] {
        if (auto st = c.MatMul(*cx, *cw, *cy); !st.ok()) std::abort();
      });
      openblas_set_num_threads(t);
      // One row is a matrix-vector product: give OpenBLAS its sgemv.
      const double blas_s = MedianSeconds(reps, [&] {
        if (s.rows == 1) {
          cblas_sgemv(CblasRowMajor, CblasNoTrans, s.out, s.in, 1.0f, w.data(), s.in, x.data(), 1,
                      0.0f, yb.data(), 1);
        } else {
          cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, s.rows, s.out, s.in, 1.0f,
                      x.data(), s.in, w.data(), s.in, 0.0f, yb.data(), s.out);
        }
      });
      double diff = 0;
      for (size_t i = 0; i < y.size(); ++i) {
        diff = std::max(diff, std::abs(double(y[i]) - yb[i]) / (std::abs(double(yb[i])) + 1e-3));
      }
      const double flop = 2.0 * s.rows * s.in * s.out;
      char label[64];
      std::snprintf(label, sizeof(label), "%s %dx%d->%d", s.name, s.rows, s.in, s.out);
      std::printf("%-34s %3d %10.1f %14.1f %12.2fx %12.2e %14.1f\n", label, t,
                  flop / kvr_s / 1e9, flop / blas_s / 1e9, blas_s / kvr_s, diff,
                  flop / configured_s / 1e9);
      std::fflush(stdout);
    }
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  return Run();
}
