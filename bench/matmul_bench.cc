// matmul_bench: the CPU backend's own MatMul kernels (y = x * W^T, SIMD +
// ThreadPool) vs OpenBLAS (sgemv for one row, sgemm otherwise) on the same
// fp32 data, at Llama-3-8B projection shapes: decode (1 row), a small batch
// (16 rows, the backend's BLAS threshold) and prefill (64 rows); plus the
// backend as configured (KVR_CPU_MATMUL / OpenBLAS core detection decide
// whether it calls OpenBLAS for >= 16 rows). Prints GFLOP/s and the max
// relative difference (docs/benchmarks.md §6).
//
// --gemm instead compares the backend's two own MatMul paths in one run:
// per-dot (KVR_CPU_GEMM=dot: one dot per token and output row) and
// register-blocked (the default), on --dtypes weights (bf16 by default, as
// decode_bench uses) at the decode shapes of a Llama-3-8B layer and its
// classifier (4096->4096, 4096->1024, 4096->14336, 14336->4096,
// 4096->128256) for --rows tokens; prints ms and GFLOP/s of each, the
// speed-up and max |blocked - per-dot| / max |per-dot| (docs/benchmarks.md
// §10, "Batched MatMul").
//
//   matmul_bench [--threads=1,2] [--reps=20]
//   OPENBLAS_CORETYPE=SkylakeX matmul_bench   # OpenBLAS forced to its AVX-512 kernels
//   matmul_bench --gemm --threads=2 --rows=1,4,16 --reps=5
#include <cblas.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstdio>
#include <random>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "common/half.h"
#include "gpu_worker/backend/backend.h"

ABSL_FLAG(std::string, threads, "1,2", "thread counts to measure");
ABSL_FLAG(int, reps, 20, "repetitions per shape (median reported)");
ABSL_FLAG(bool, gemm, false,
          "compare the backend's per-dot and blocked MatMul paths (bf16/f32 weights) instead");
ABSL_FLAG(std::string, rows, "1,4,16", "--gemm: token counts (rows of x), each 1..4096");
ABSL_FLAG(std::string, dtypes, "bf16", "--gemm: weight types, from bf16,f32");


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

// Positive integers from a comma-separated flag, each <= max; empty on error
// (after printing it).
std::vector<int> ParseList(const char* flag, const std::string& text, int max) {
  std::vector<int> out;
  for (absl::string_view s : absl::StrSplit(text, ',')) {
    int v = 0;
    if (!absl::SimpleAtoi(s, &v) || v < 1 || v > max) {
      std::fprintf(stderr, "matmul_bench: --%s: '%s' is not an integer in 1..%d\n", flag,
                   std::string(s).c_str(), max);
      return {};
    }
    out.push_back(v);
  }
  return out;
}

// A cheap deterministic value in [-1, 1) for element i (the classifier has
// 5e8 weights; a hash fills it in a second or two).
float HashValue(uint64_t i) {
  uint64_t z = i * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z ^= z >> 31;
  return static_cast<float>(static_cast<double>(z >> 40) / double(uint64_t{1} << 23) - 1.0);
}

// --gemm: per-dot vs blocked MatMul of the same backend build, one run.
int RunGemm() {
  using kvr::worker::Backend;
  using kvr::worker::BackendRegistry;
  struct GemmShape {
    const char* name;
    int in, out;
  };
  const GemmShape shapes[] = {{"q/o proj", 4096, 4096},
                              {"k/v proj", 4096, 1024},
                              {"ffn gate/up", 4096, 14336},
                              {"ffn down", 14336, 4096},
                              {"classifier", 4096, 128256}};
  const std::vector<int> threads = ParseList("threads", absl::GetFlag(FLAGS_threads), 256);
  const std::vector<int> rows = ParseList("rows", absl::GetFlag(FLAGS_rows), 4096);
  if (threads.empty() || rows.empty()) return 2;
  std::vector<kvr::DType> dtypes;
  for (absl::string_view s : absl::StrSplit(absl::GetFlag(FLAGS_dtypes), ',')) {
    if (s == "bf16") {
      dtypes.push_back(kvr::DType::kBf16);
    } else if (s == "f32") {
      dtypes.push_back(kvr::DType::kF32);
    } else {
      std::fprintf(stderr, "matmul_bench: --dtypes: '%s' is not bf16 or f32\n",
                   std::string(s).c_str());
      return 2;
    }
  }
  const int reps = std::max(1, absl::GetFlag(FLAGS_reps));
  std::printf("%-12s %5s %3s %6s %4s %3s %11s %11s %11s %11s %8s %12s\n", "shape", "in", "->",
              "out", "n", "thr", "dot ms", "dot GF/s", "blocked ms", "blk GF/s", "speedup",
              "max rel diff");
  std::printf("(max rel diff = max |blocked - dot| / max |dot| over the output)\n");
  for (kvr::DType dtype : dtypes) {
    for (const GemmShape& s : shapes) {
      const size_t wn = static_cast<size_t>(s.out) * static_cast<size_t>(s.in);
      std::vector<uint16_t> wb;
      std::vector<float> wf;
      if (dtype == kvr::DType::kBf16) {
        wb.resize(wn);
        for (size_t i = 0; i < wn; ++i) wb[i] = kvr::FloatToBf16(HashValue(i) * 0.02f);
      } else {
        wf.resize(wn);
        for (size_t i = 0; i < wn; ++i) wf[i] = HashValue(i) * 0.02f;
      }
      const auto w_bytes = dtype == kvr::DType::kBf16
                               ? std::as_bytes(std::span<const uint16_t>(wb))
                               : std::as_bytes(std::span<const float>(wf));
      std::printf("weights %s\n", kvr::DTypeName(dtype));
      for (int t : threads) {
        kvr::worker::BackendOptions opts;
        opts.num_threads = t;
        opts.cpu_matmul = kvr::worker::CpuMatMul::kOwn;
        setenv("KVR_CPU_GEMM", "dot", 1);
        auto dot = BackendRegistry::Create("cpu", opts);
        setenv("KVR_CPU_GEMM", "blocked", 1);
        auto blocked = BackendRegistry::Create("cpu", opts);
        unsetenv("KVR_CPU_GEMM");
        if (!dot.ok() || !blocked.ok()) {
          const absl::Status& st = dot.ok() ? blocked.status() : dot.status();
          std::fprintf(stderr, "%s\n", std::string(st.message()).c_str());
          return 1;
        }
        Backend* b[2] = {dot->get(), blocked->get()};
        for (int n : rows) {
          std::vector<float> x(static_cast<size_t>(n) * s.in);
          for (size_t i = 0; i < x.size(); ++i) x[i] = HashValue(i + (uint64_t{1} << 40));
          // Both paths' tensors, then alternating repetitions (dot, blocked,
          // dot, ...) so that load changes during the run hit both alike.
          std::vector<kvr::worker::Tensor> tx, tw, ty;
          for (int k = 0; k < 2; ++k) {
            auto ax = b[k]->Allocate(kvr::DType::kF32, n, s.in);
            auto aw = b[k]->Allocate(dtype, s.out, s.in);
            auto ay = b[k]->Allocate(kvr::DType::kF32, n, s.out);
            if (!ax.ok() || !aw.ok() || !ay.ok()) return 1;
            if (!b[k]->UploadF32(x, *ax).ok() || !b[k]->Upload(w_bytes, *aw).ok()) return 1;
            tx.push_back(*ax);
            tw.push_back(*aw);
            ty.push_back(*ay);
          }
          std::vector<double> times[2];
          for (int rep = 0; rep <= reps; ++rep) {  // rep 0 warms up
            for (int k = 0; k < 2; ++k) {
              const auto a = Clock::now();
              if (auto st = b[k]->MatMul(tx[k], tw[k], ty[k]); !st.ok()) std::abort();
              if (rep > 0) {
                times[k].push_back(std::chrono::duration<double>(Clock::now() - a).count());
              }
            }
          }
          double sec[2];
          std::vector<float> y[2];
          for (int k = 0; k < 2; ++k) {
            std::sort(times[k].begin(), times[k].end());
            sec[k] = times[k][times[k].size() / 2];
            y[k].resize(static_cast<size_t>(n) * s.out);
            if (!b[k]->DownloadF32(ty[k], y[k]).ok()) return 1;
          }
          double diff = 0, scale = 0;
          for (size_t i = 0; i < y[0].size(); ++i) {
            diff = std::max(diff, std::abs(double(y[1][i]) - y[0][i]));
            scale = std::max(scale, std::abs(double(y[0][i])));
          }
          const double flop = 2.0 * n * s.in * s.out;
          std::printf("%-12s %5d %3s %6d %4d %3d %11.3f %11.1f %11.3f %11.1f %7.2fx %12.1e\n",
                      s.name, s.in, "->", s.out, n, t, sec[0] * 1e3, flop / sec[0] / 1e9,
                      sec[1] * 1e3, flop / sec[1] / 1e9, sec[0] / sec[1],
                      scale > 0 ? diff / scale : diff);
          std::fflush(stdout);
        }
      }
    }
  }
  return 0;
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
  return absl::GetFlag(FLAGS_gemm) ? RunGemm() : Run();
}
