// kvr_store_append_bench: what durability costs an Append.
//
//   kvr_store_append_bench [--dir=DIR] [--appends=N]
//
// One decode-shaped sequence (4 layers x 8 kv heads x d 128, bf16 values,
// graph index over an uploaded 512-key chunk per head); N single-token
// appends round-robin over the heads (tail_capacity 64, so every 64th append
// of a head seals its tail into the graph and persists the new index blob).
// Runs the same appends on an in-process node without persistence, over a
// ShardStore with sync off (WAL written, not fsynced) and with sync on (the
// node's default: WAL fsynced before the ack), and prints per-append latency.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "retrieval_node/client/in_process_node.h"
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
  InProcessNodeOptions o;
  o.threads = 2;
  o.persistence = persistence;
  auto node = InProcessRetrievalNode::Create(o).value();
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

double Quantile(std::vector<double> v, double q) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<size_t>(q * static_cast<double>(v.size())))];
}

int Main(int argc, char** argv) {
  std::string dir = std::filesystem::temp_directory_path() / "kvr_store_append_bench";
  int appends = 8192;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a.rfind("--dir=", 0) == 0) {
      dir = a.substr(6);
    } else if (a.rfind("--appends=", 0) == 0) {
      appends = std::stoi(a.substr(10));
    } else {
      std::fprintf(stderr, "usage: %s [--dir=DIR] [--appends=N]\n", argv[0]);
      return 2;
    }
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
  return 0;
}

}  // namespace
}  // namespace kvr::retrieval

int main(int argc, char** argv) { return kvr::retrieval::Main(argc, argv); }
