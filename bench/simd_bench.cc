// Times the graph-search / flat-scan hot path, dot_batch and dot_gather at
// d = 128, for every kernel table this CPU supports (fp32 and bf16 rows).
//
//   simd_bench [--benchmark_format=json] [--benchmark_filter=...]
//
// The ns_per_dot column is the figure to quote: nanoseconds per row dot
// product. Batches run over rows that fit in L1 ("l1": compute-bound) and in
// L2 ("l2": a flat-scan block). Gather runs over a base that fits in L2 and
// one far larger than the last-level cache ("dram": random rows as in graph
// search), which measures how well the prefetching hides memory latency.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <map>
#include <random>
#include <string>
#include <vector>

#include <benchmark/benchmark.h>

#include "common/half.h"
#include "common/simd/kernels.h"
#include "common/simd/sq8_kernels.h"

namespace kvr::simd {
namespace {

constexpr size_t kDim = 128;
constexpr size_t kBatchRows = 1024;     // 512 KiB of fp32 rows: a flat scan block (L2)
constexpr size_t kL1BatchRows = 64;     // 32 KiB: compute-bound, rows stay in L1
constexpr size_t kGatherIds = 64;       // one graph node's neighbour list
constexpr size_t kL2BaseRows = 2048;    // 1 MiB fp32
constexpr size_t kDramBaseRows = 1 << 19;  // 256 MiB fp32

struct Data {
  std::vector<float> q;
  std::vector<float> rows;
  std::vector<uint16_t> rows_bf16;
};

const Data& Rows(size_t n) {
  static std::map<size_t, Data> cache;  // node-based: references stay valid
  if (auto it = cache.find(n); it != cache.end()) return it->second;
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  Data d;
  d.q.resize(kDim);
  for (float& x : d.q) x = dist(rng);
  d.rows.resize(n * kDim);
  for (float& x : d.rows) x = dist(rng);
  d.rows_bf16.resize(d.rows.size());
  for (size_t i = 0; i < d.rows.size(); ++i) d.rows_bf16[i] = FloatToBf16(d.rows[i]);
  return cache.emplace(n, std::move(d)).first->second;
}

// Enough random id lists that successive iterations touch different rows.
std::vector<uint32_t> RandomIds(size_t base_rows, size_t lists) {
  std::mt19937 rng(11);
  std::uniform_int_distribution<uint32_t> pick(0, static_cast<uint32_t>(base_rows - 1));
  std::vector<uint32_t> ids(lists * kGatherIds);
  for (uint32_t& id : ids) id = pick(rng);
  return ids;
}

void SetDotRate(benchmark::State& state, size_t dots_per_iter) {
  // An inverted rate is seconds per counted unit; counting in units of 1e9
  // dots makes it nanoseconds per dot.
  state.counters["ns_per_dot"] = benchmark::Counter(
      static_cast<double>(state.iterations() * dots_per_iter) * 1e-9,
      benchmark::Counter::kIsRate | benchmark::Counter::kInvert);
}

void BM_DotBatch(benchmark::State& state, const Kernels* k, bool bf16, size_t n) {
  const Data& data = Rows(n);
  std::vector<float> out(n);
  for (auto _ : state) {
    if (bf16) {
      k->dot_batch_bf16(data.q.data(), data.rows_bf16.data(), n, kDim, kDim, out.data());
    } else {
      k->dot_batch(data.q.data(), data.rows.data(), n, kDim, kDim, out.data());
    }
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  SetDotRate(state, n);
}

void BM_DotGather(benchmark::State& state, const Kernels* k, bool bf16, size_t base_rows) {
  const Data& data = Rows(base_rows);
  constexpr size_t kLists = 4096;
  const std::vector<uint32_t> ids = RandomIds(base_rows, kLists);
  std::vector<float> out(kGatherIds);
  size_t list = 0;
  for (auto _ : state) {
    const uint32_t* l = ids.data() + list * kGatherIds;
    list = (list + 1) % kLists;
    if (bf16) {
      k->dot_gather_bf16(data.q.data(), data.rows_bf16.data(), l, kGatherIds, kDim, kDim,
                         out.data());
    } else {
      k->dot_gather(data.q.data(), data.rows.data(), l, kGatherIds, kDim, kDim, out.data());
    }
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  SetDotRate(state, kGatherIds);
}

void BM_Dot(benchmark::State& state, const Kernels* k) {
  const Data& data = Rows(kBatchRows);
  size_t row = 0;
  for (auto _ : state) {
    benchmark::DoNotOptimize(k->dot(data.q.data(), data.rows.data() + row * kDim, kDim));
    row = (row + 1) % kBatchRows;
  }
  SetDotRate(state, 1);
}

// Blocked SQ8 codes of n keys (random bytes) and 8 random queries.
struct Sq8Data {
  std::vector<uint8_t> codes;
  std::vector<int8_t> q;
};

const Sq8Data& Sq8Rows(size_t n) {
  static std::map<size_t, Sq8Data> cache;
  if (auto it = cache.find(n); it != cache.end()) return it->second;
  std::mt19937 rng(5);
  Sq8Data d;
  d.codes.resize(n / kSq8Block * Sq8BlockBytes(kDim));
  for (uint8_t& c : d.codes) c = static_cast<uint8_t>(rng());
  d.q.resize(kSq8MaxMultiQueries * kDim);
  for (int8_t& c : d.q) c = static_cast<int8_t>(rng());
  return cache.emplace(n, std::move(d)).first->second;
}

void BM_ScanSq8(benchmark::State& state, const Sq8Kernels* k, size_t n, size_t nq, bool multi) {
  const Sq8Data& data = Sq8Rows(n);
  const size_t chunk = multi ? 32 : 64;  // blocks per pass, as ScanSq8Codes used
  std::vector<int32_t> out(kSq8MaxMultiQueries * chunk * kSq8Block);
  const size_t nblocks = n / kSq8Block, bytes = Sq8BlockBytes(kDim);
  for (auto _ : state) {
    for (size_t b0 = 0; b0 < nblocks; b0 += chunk) {
      const size_t nb = std::min(chunk, nblocks - b0);
      if (multi) {
        k->scan_sq8_multi(data.q.data(), kDim, nq, data.codes.data() + b0 * bytes, nb, kDim,
                          out.data(), chunk * kSq8Block);
      } else {
        for (size_t t = 0; t < nq; ++t) {
          k->scan_sq8(data.q.data() + t * kDim, data.codes.data() + b0 * bytes, nb, kDim,
                      out.data() + t * chunk * kSq8Block);
        }
      }
    }
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  SetDotRate(state, n * nq);
}

void RegisterSq8() {
  const Sq8Kernels* tables[3];
  const size_t ntables = AvailableSq8(tables, 3);
  for (size_t t = 0; t < ntables; ++t) {
    const std::string name = tables[t]->name;
    for (size_t n : {size_t{1024}, size_t{131072}}) {
      const std::string where = n == 1024 ? "n1024/l2/" : "n131072/l3/";
      for (size_t nq : {size_t{1}, size_t{4}, size_t{8}}) {
        for (bool multi : {false, true}) {
          const std::string mode = multi ? "multi" : "per_query";
          benchmark::RegisterBenchmark(
              ("scan_sq8/" + mode + "/d128/" + where + "nq" + std::to_string(nq) + "/" + name)
                  .c_str(),
              BM_ScanSq8, tables[t], n, nq, multi);
        }
      }
    }
  }
}

void RegisterAll() {
  RegisterSq8();
  for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512}) {
    const Kernels* k = ForIsa(isa);
    if (k == nullptr) {
      std::fprintf(stderr, "simd_bench: skipping isa %d (not supported on this CPU)\n",
                   static_cast<int>(isa));
      continue;
    }
    const std::string n = k->name;
    benchmark::RegisterBenchmark(("dot/d128/" + n).c_str(), BM_Dot, k);
    for (bool bf16 : {false, true}) {
      const std::string type = bf16 ? "bf16" : "fp32";
      benchmark::RegisterBenchmark(("dot_batch/" + type + "/d128/n64/l1/" + n).c_str(),
                                   BM_DotBatch, k, bf16, kL1BatchRows);
      benchmark::RegisterBenchmark(("dot_batch/" + type + "/d128/n1024/l2/" + n).c_str(),
                                   BM_DotBatch, k, bf16, kBatchRows);
      benchmark::RegisterBenchmark(("dot_gather/" + type + "/d128/n64/l2/" + n).c_str(),
                                   BM_DotGather, k, bf16, kL2BaseRows);
      benchmark::RegisterBenchmark(("dot_gather/" + type + "/d128/n64/dram/" + n).c_str(),
                                   BM_DotGather, k, bf16, kDramBaseRows);
    }
  }
}

}  // namespace
}  // namespace kvr::simd

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  kvr::simd::RegisterAll();
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
