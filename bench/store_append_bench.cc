// kvr_store_append_bench: what durability costs an Append.
//
//   kvr_store_append_bench [--dir=DIR] [--appends=N] [--appenders=1,4,16] [--steps=N]
//
// One decode-shaped sequence (4 layers x 8 kv heads x d 128, bf16 values,
// graph index over an uploaded 512-key chunk per head); N single-token
// appends round-robin over the heads (tail_capacity 64, so every 64th append
// of a head seals its tail into the graph and persists the new index blob).
// Runs the same appends on an in-process node without persistence, over a
// ShardStore with sync off (WAL written, not fsynced) and with sync on (the
// node's default: WAL fsynced before the ack), and prints per-append latency.
//
// Concurrent appenders (synced store): A threads, each decoding its own
// sequence (same shape, a 64-key chunk per head), --steps steps of one token
// per (layer, kv head). Three modes, in the same run:
//   per-append sync   ShardStore group_commit off, blocking Append per head
//                     (the node before group commit: one fsync per append,
//                     under the sequence lock);
//   grouped, blocking group commit on, blocking Append per head;
//   grouped, async    group commit on; per layer, AppendAsync for every kv
//                     head, then wait for all (how the decode step should
//                     append).
// Prints appends/s, per-append latency (issue to ack) and appends per
// RocksDB write.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "retrieval_node/core/node_core.h"
#include "retrieval_node/store/shard_store.h"

namespace kvr::retrieval {
namespace {

constexpr int kLayers = 4, kKvHeads = 8, kHeads = 32, kDim = 128, kChunkKeys = 512;

Matrix RandomMatrix(size_t rows, size_t cols, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  Matrix m(rows, cols);
  for (float& x : m.data) x = dist(rng);
  return m;
}

struct Result {
  std::string mode;
  std::vector<double> micros;  // per append
  std::vector<double> seal_micros;
};

Result Run(const std::string& mode, ShardPersistence* persistence, int appends) {
  NodeCoreOptions o;
  o.threads = 2;
  o.persistence = persistence;
  auto node = NodeCore::Create(o).value();
  SequenceSpec spec;
  spec.sequence_id = 1;
  spec.n_layers = kLayers;
  spec.n_heads = kHeads;
  spec.n_kv_heads = kKvHeads;
  spec.head_dim = kDim;
  spec.value_dtype = DType::kBf16;
  spec.index_type = IndexType::kGraph;
  KVR_CHECK(node->CreateSequence(spec).ok());
  for (int layer = 0; layer < kLayers; ++layer) {
    for (int g = 0; g < kKvHeads; ++g) {
      const Matrix keys = RandomMatrix(kChunkKeys, kDim, 10 * layer + g);
      const Matrix values = RandomMatrix(kChunkKeys, kDim, 1000 + 10 * layer + g);
      ShardUpload up;
      up.key = ShardKey{1, layer, g, 0};
      up.keys = keys.view();
      up.values = values.view();
      KVR_CHECK(node->UploadShard(up).ok());
    }
  }
  const Matrix tokens = RandomMatrix(appends, kDim, 7);
  Result r;
  r.mode = mode;
  const int heads = kLayers * kKvHeads;
  for (int i = 0; i < appends; ++i) {
    const int h = i % heads;
    AppendRequest a;
    a.sequence_id = 1;
    a.layer = h / kKvHeads;
    a.kv_head = h % kKvHeads;
    a.first_position = kChunkKeys + i / heads;
    a.keys = tokens.view().rows_slice(i, 1);
    a.values = tokens.view().rows_slice(i, 1);
    const auto t0 = std::chrono::steady_clock::now();
    const absl::Status st = node->Append(a);
    const double us =
        std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
    KVR_CHECK_MSG(st.ok(), st.ToString().c_str());
    const bool sealed = (i / heads + 1) % static_cast<int>(o.tail_capacity) == 0;
    (sealed ? r.seal_micros : r.micros).push_back(us);
  }
  return r;
}

enum class Mode { kPerAppendSync, kGroupedBlocking, kGroupedAsync };

struct ConcurrentResult {
  std::string mode;
  int appenders = 0;
  double appends_per_second = 0.0;
  std::vector<double> micros;  // every append, issue to ack
  double appends_per_write = 0.0;
};

ConcurrentResult RunConcurrent(Mode mode, int appenders, int steps, const std::string& dir) {
  std::filesystem::remove_all(dir);
  ShardStoreOptions so;
  so.group_commit = mode != Mode::kPerAppendSync;
  auto store = ShardStore::Open(dir, so);
  KVR_CHECK_MSG(store.ok(), store.status().ToString().c_str());
  NodeCoreOptions o;
  o.threads = 2;
  o.persistence = store->get();
  auto node = NodeCore::Create(o).value();
  constexpr int kChunk = 64;
  const int heads = kLayers * kKvHeads;
  for (int a = 0; a < appenders; ++a) {
    SequenceSpec spec;
    spec.sequence_id = static_cast<uint64_t>(a + 1);
    spec.n_layers = kLayers;
    spec.n_heads = kHeads;
    spec.n_kv_heads = kKvHeads;
    spec.head_dim = kDim;
    spec.value_dtype = DType::kBf16;
    spec.index_type = IndexType::kGraph;
    KVR_CHECK(node->CreateSequence(spec).ok());
    for (int h = 0; h < heads; ++h) {
      const Matrix keys = RandomMatrix(kChunk, kDim, 100 * a + h);
      ShardUpload up;
      up.key = ShardKey{spec.sequence_id, h / kKvHeads, h % kKvHeads, 0};
      up.keys = keys.view();
      up.values = keys.view();
      KVR_CHECK(node->UploadShard(up).ok());
    }
  }
  const ShardStoreStats before = (*store)->stats();
  std::vector<std::vector<double>> micros(static_cast<size_t>(appenders));
  using Clock = std::chrono::steady_clock;
  const auto drive = [&](int a) {
    const Matrix tokens = RandomMatrix(static_cast<size_t>(steps) * heads, kDim, 7 + a);
    std::vector<double>& out = micros[static_cast<size_t>(a)];
    out.reserve(static_cast<size_t>(steps) * heads);
    std::vector<Clock::time_point> issued(kKvHeads);
    for (int step = 0; step < steps; ++step) {
      for (int layer = 0; layer < kLayers; ++layer) {
        std::vector<StatusWaiter> waiters(mode == Mode::kGroupedAsync ? kKvHeads : 0);
        for (int g = 0; g < kKvHeads; ++g) {
          AppendRequest r;
          r.sequence_id = static_cast<uint64_t>(a + 1);
          r.layer = layer;
          r.kv_head = g;
          r.first_position = kChunk + step;
          r.keys = tokens.view().rows_slice(static_cast<size_t>(step) * heads +
                                                static_cast<size_t>(layer * kKvHeads + g),
                                            1);
          r.values = r.keys;
          issued[g] = Clock::now();
          if (mode == Mode::kGroupedAsync) {
            node->AppendAsync(r, waiters[g].callback());
          } else {
            const absl::Status st = node->Append(r);
            KVR_CHECK_MSG(st.ok(), st.ToString().c_str());
            out.push_back(
                std::chrono::duration<double, std::micro>(Clock::now() - issued[g]).count());
          }
        }
        for (int g = 0; g < static_cast<int>(waiters.size()); ++g) {
          const absl::Status st = waiters[g].Wait();
          KVR_CHECK_MSG(st.ok(), st.ToString().c_str());
          // Acks arrive with their group; the wait for head g ends after all
          // earlier heads', so this is the time to the ack or a little after.
          out.push_back(
              std::chrono::duration<double, std::micro>(Clock::now() - issued[g]).count());
        }
      }
    }
  };
  const auto t0 = Clock::now();
  std::vector<std::thread> threads;
  for (int a = 0; a < appenders; ++a) threads.emplace_back(drive, a);
  for (std::thread& t : threads) t.join();
  const double seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  const ShardStoreStats after = (*store)->stats();
  ConcurrentResult r;
  r.mode = mode == Mode::kPerAppendSync    ? "per-append sync"
           : mode == Mode::kGroupedBlocking ? "grouped, blocking"
                                            : "grouped, async";
  r.appenders = appenders;
  for (auto& m : micros) r.micros.insert(r.micros.end(), m.begin(), m.end());
  r.appends_per_second = static_cast<double>(r.micros.size()) / seconds;
  r.appends_per_write = static_cast<double>(after.commits - before.commits) /
                        static_cast<double>(std::max<int64_t>(1, after.writes - before.writes));
  node.reset();
  store->reset();
  std::filesystem::remove_all(dir);
  return r;
}

double Quantile(std::vector<double> v, double q) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<size_t>(q * static_cast<double>(v.size())))];
}

int Main(int argc, char** argv) {
  std::string dir = std::filesystem::temp_directory_path() / "kvr_store_append_bench";
  int appends = 8192;
  int steps = 32;
  std::vector<int> appenders = {1, 4, 16};
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a.rfind("--dir=", 0) == 0) {
      dir = a.substr(6);
    } else if (a.rfind("--appends=", 0) == 0) {
      appends = std::stoi(a.substr(10));
    } else if (a.rfind("--steps=", 0) == 0) {
      steps = std::stoi(a.substr(8));
    } else if (a.rfind("--appenders=", 0) == 0) {
      appenders.clear();
      std::stringstream list(a.substr(12));
      for (std::string item; std::getline(list, item, ',');) appenders.push_back(std::stoi(item));
    } else {
      std::fprintf(stderr,
                   "usage: %s [--dir=DIR] [--appends=N] [--appenders=1,4,16] [--steps=N]\n",
                   argv[0]);
      return 2;
    }
  }
  if (appends < 1 || steps < 1 || appenders.empty() ||
      std::any_of(appenders.begin(), appenders.end(), [](int n) { return n < 1 || n > 256; })) {
    std::fprintf(stderr, "--appends and --steps must be >= 1, --appenders in [1, 256]\n");
    return 2;
  }
  std::vector<Result> results;
  results.push_back(Run("memory only", nullptr, appends));
  for (const bool sync : {false, true}) {
    std::filesystem::remove_all(dir);
    ShardStoreOptions so;
    so.sync = sync;
    auto store = ShardStore::Open(dir, so);
    KVR_CHECK_MSG(store.ok(), store.status().ToString().c_str());
    results.push_back(Run(sync ? "rocksdb sync=true" : "rocksdb sync=false", store->get(), appends));
  }
  std::filesystem::remove_all(dir);
  std::printf("%d single-token appends, %d layers x %d kv heads, d %d, bf16, graph, tail 64; dir %s\n",
              appends, kLayers, kKvHeads, kDim, dir.c_str());
  std::printf("%-20s %10s %10s %10s %10s | %12s %12s\n", "mode", "p50 us", "p90 us", "p99 us",
              "mean us", "seal p50 us", "seal p99 us");
  for (const Result& r : results) {
    double sum = 0.0;
    for (double x : r.micros) sum += x;
    std::printf("%-20s %10.1f %10.1f %10.1f %10.1f | %12.1f %12.1f\n", r.mode.c_str(),
                Quantile(r.micros, 0.5), Quantile(r.micros, 0.9), Quantile(r.micros, 0.99),
                sum / static_cast<double>(std::max<size_t>(1, r.micros.size())),
                Quantile(r.seal_micros, 0.5), Quantile(r.seal_micros, 0.99));
  }

  std::vector<ConcurrentResult> concurrent;
  for (int n : appenders) {
    for (Mode mode : {Mode::kPerAppendSync, Mode::kGroupedBlocking, Mode::kGroupedAsync}) {
      concurrent.push_back(RunConcurrent(mode, n, steps, dir));
    }
  }
  std::printf("\nconcurrent appenders, rocksdb sync=true: each its own sequence, %d steps x %d "
              "layers x %d kv heads of one token\n",
              steps, kLayers, kKvHeads);
  std::printf("%-20s %9s %12s %10s %10s %14s\n", "mode", "appenders", "appends/s", "p50 us",
              "p99 us", "appends/write");
  for (const ConcurrentResult& r : concurrent) {
    std::printf("%-20s %9d %12.0f %10.1f %10.1f %14.1f\n", r.mode.c_str(), r.appenders,
                r.appends_per_second, Quantile(r.micros, 0.5), Quantile(r.micros, 0.99),
                r.appends_per_write);
  }
  return 0;
}

}  // namespace
}  // namespace kvr::retrieval

int main(int argc, char** argv) { return kvr::retrieval::Main(argc, argv); }
