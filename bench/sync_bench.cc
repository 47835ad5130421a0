// sync_bench: node-to-node shard copy (SyncShards / ReadShards) over gRPC on
// loopback between two real kvr_node processes.
//
//   sync_bench [--layers 4] [--kv_heads 8] [--dim 128] [--chunk_keys 4096]
//              [--chunks 2] [--index graph] [--delta 64] [--repeats 3]
//
// Loads one sequence (layers x kv_heads heads, `chunks` uploaded chunks of
// `chunk_keys` random keys each, bf16 values, plus `delta` appended rows per
// head) into a source node, then times, from a destination node:
//   full     every shard copied into an empty destination (sequence dropped
//            between repeats);
//   delta    `delta` more rows appended per head on the source, then synced
//            (only they travel, plus every row's position);
//   no-op    a sync with nothing new.
// Prints keys/s and MB/s (payload bytes the destination received / wall
// time of the SyncShards call, index blobs and positions included).
#include <signal.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "common/subprocess.h"
#include "common/tensor.h"
#include "retrieval_node/client/grpc_retrieval_client.h"

ABSL_FLAG(std::string, kvr_node, KVR_NODE_BINARY, "kvr_node binary to start (twice)");
ABSL_FLAG(int, layers, 4, "layers of the sequence");
ABSL_FLAG(int, kv_heads, 8, "kv heads per layer");
ABSL_FLAG(int, dim, 128, "head dim");
ABSL_FLAG(int, chunk_keys, 4096, "keys per uploaded chunk");
ABSL_FLAG(int, chunks, 2, "uploaded chunks per head");
ABSL_FLAG(std::string, index, "graph", "index of the chunks: graph, flat or ivf");
ABSL_FLAG(int, delta, 64, "rows appended per head before the delta sync");
ABSL_FLAG(int, repeats, 3, "timed repeats of each mode");

namespace kvr::retrieval {
namespace {

[[noreturn]] void Die(const std::string& message) {
  std::fprintf(stderr, "sync_bench: %s\n", message.c_str());
  std::exit(1);
}

void CheckOk(const absl::Status& status, const std::string& what) {
  if (!status.ok()) Die(what + ": " + status.ToString());
}

// A kvr_node child on 127.0.0.1 (stopped with SIGTERM at destruction).
class Node {
 public:
  explicit Node(const std::string& binary) {
    auto proc = Subprocess::Start({binary, "--listen=127.0.0.1:0", "--metrics_listen=",
                                   "--threads=4"});
    if (!proc.ok()) Die(std::string(proc.status().message()));
    proc_ = std::move(*proc);
    auto address = proc_->WaitForLine("kvr_node listening on ", absl::Seconds(30));
    if (!address.ok()) Die(binary + ": " + std::string(address.status().message()));
    address_ = *address;
  }
  ~Node() { (void)proc_->Stop(SIGTERM, absl::Seconds(30)); }
  const std::string& address() const { return address_; }

 private:
  std::unique_ptr<Subprocess> proc_;
  std::string address_;
};

Matrix Random(size_t rows, size_t cols, std::mt19937* rng) {
  std::normal_distribution<float> dist(0.0f, 1.0f);
  Matrix m(rows, cols);
  for (float& x : m.data) x = dist(*rng);
  return m;
}

void AppendAll(GrpcRetrievalClient* c, const SequenceSpec& spec, int64_t first, int n,
               std::mt19937* rng) {
  for (int layer = 0; layer < spec.n_layers; ++layer) {
    for (int g = 0; g < spec.n_kv_heads; ++g) {
      const Matrix k = Random(n, spec.head_dim, rng), v = Random(n, spec.head_dim, rng);
      AppendRequest a;
      a.sequence_id = spec.sequence_id;
      a.layer = layer;
      a.kv_head = g;
      a.first_position = first;
      a.keys = k.view();
      a.values = v.view();
      CheckOk(c->Append(a), "Append");
    }
  }
}

int Main() {
  const std::string binary = absl::GetFlag(FLAGS_kvr_node);
  auto index = ParseIndexType(absl::GetFlag(FLAGS_index));
  CheckOk(index.status(), "--index");
  SequenceSpec spec;
  spec.sequence_id = 1;
  spec.n_layers = absl::GetFlag(FLAGS_layers);
  spec.n_kv_heads = absl::GetFlag(FLAGS_kv_heads);
  spec.n_heads = spec.n_kv_heads * 4;
  spec.head_dim = absl::GetFlag(FLAGS_dim);
  spec.value_dtype = DType::kBf16;
  spec.index_type = *index;
  const int chunk_keys = absl::GetFlag(FLAGS_chunk_keys), chunks = absl::GetFlag(FLAGS_chunks);
  const int delta = absl::GetFlag(FLAGS_delta), repeats = absl::GetFlag(FLAGS_repeats);

  Node src_node(binary), dst_node(binary);
  GrpcClientOptions options;
  options.upload_timeout = absl::Seconds(300);
  options.sync_timeout = absl::Seconds(300);
  auto src = GrpcRetrievalClient::Create(src_node.address(), options);
  auto dst = GrpcRetrievalClient::Create(dst_node.address(), options);
  CheckOk(src.status(), "client");
  CheckOk(dst.status(), "client");
  std::mt19937 rng(7);
  CheckOk((*src)->CreateSequence(spec), "CreateSequence");
  for (int layer = 0; layer < spec.n_layers; ++layer) {
    for (int g = 0; g < spec.n_kv_heads; ++g) {
      for (int c = 0; c < chunks; ++c) {
        const Matrix k = Random(chunk_keys, spec.head_dim, &rng);
        const Matrix v = Random(chunk_keys, spec.head_dim, &rng);
        ShardUpload up;
        up.key = ShardKey{spec.sequence_id, layer, g, c};
        up.first_position = int64_t{c} * chunk_keys;
        up.keys = k.view();
        up.values = v.view();
        CheckOk((*src)->UploadShard(up), "UploadShard");
      }
    }
  }
  int64_t next = int64_t{chunks} * chunk_keys;
  AppendAll(src->get(), spec, next, delta, &rng);
  next += delta;

  SyncRequest req;
  req.spec = spec;
  req.source_address = src_node.address();
  std::printf("sync_bench: %d layers x %d kv heads, d %d, %d chunks x %d keys (%s), bf16 "
              "values, loopback gRPC\n",
              spec.n_layers, spec.n_kv_heads, spec.head_dim, chunks, chunk_keys,
              std::string(IndexTypeName(spec.index_type)).c_str());
  std::printf("%-6s %12s %14s %10s %12s %10s\n", "mode", "keys", "bytes", "seconds", "keys/s",
              "MB/s");
  const auto run = [&](const char* mode) {
    const auto t0 = std::chrono::steady_clock::now();
    auto r = (*dst)->SyncShards(req);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    CheckOk(r.status(), std::string("SyncShards ") + mode);
    std::printf("%-6s %12lld %14lld %10.4f %12.0f %10.1f\n", mode,
                static_cast<long long>(r->keys_copied), static_cast<long long>(r->bytes_copied), s,
                static_cast<double>(r->keys_copied) / s,
                static_cast<double>(r->bytes_copied) / s / 1e6);
  };
  for (int i = 0; i < repeats; ++i) {
    if (i > 0) CheckOk((*dst)->DropSequence(spec.sequence_id), "DropSequence");
    run("full");
  }
  for (int i = 0; i < repeats; ++i) {
    AppendAll(src->get(), spec, next, delta, &rng);
    next += delta;
    run("delta");
  }
  for (int i = 0; i < repeats; ++i) run("no-op");
  return 0;
}

}  // namespace
}  // namespace kvr::retrieval

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("node-to-node SyncShards throughput over loopback gRPC");
  absl::ParseCommandLine(argc, argv);
  return kvr::retrieval::Main();
}
