// kvr_node: a retrieval node server (kvr.v1.RetrievalNode over gRPC, with
// grpc.health.v1 and server reflection).
//
//   kvr_node --listen 127.0.0.1:0 --threads 8 --memory_budget_bytes 8000000000
//
// Prints "kvr_node listening on HOST:PORT" on stdout once serving (port 0
// picks a free port). SIGTERM / SIGINT: health goes NOT_SERVING, in-flight
// calls drain (up to --drain_seconds), exit 0. Flags may also come from a
// file (--flagfile). Prometheus metrics are served at GET /metrics on
// --metrics_listen, announced before that as "kvr_node metrics on HOST:PORT".
#include <csignal>
#include <cstdio>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include <pthread.h>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "retrieval_node/core/node_core.h"
#include "retrieval_node/index/sq8_codes.h"
#include "retrieval_node/server/metrics.h"
#include "retrieval_node/server/node_service.h"
#include "retrieval_node/server/ucx_endpoint.h"
#include "retrieval_node/store/shard_store.h"
#include "services/infra/metrics/metrics_endpoint.h"
#include "services/infra/rpc/grpc_server.h"
#include "services/infra/security/peer_authorizer.h"
#include "services/infra/security/tls_credentials.h"
#include "services/infra/security/tls_flags.h"
#include "services/infra/server/serve_flags.h"
#include "services/infra/server/server_main.h"

ABSL_FLAG(std::string, listen, "127.0.0.1:0",
          "host:port to serve on; port 0 picks a free port (printed on stdout)");
ABSL_FLAG(int, threads, 0,
          "threads for Attend and index builds (0: hardware concurrency)");
ABSL_FLAG(int, attend_threads, 0,
          "threads searching the items of one AttendBatch in parallel (0: hardware "
          "concurrency)");
ABSL_FLAG(int, search_threads, 0,
          "threads searching the (kv head, chunk) shards of one Attend / AttendBatch item in "
          "parallel, the item's own thread included; outputs are bit-identical to 1 (merged in "
          "order). 0: the pool running the item lends its idle workers (--attend_threads for "
          "batch items, --threads for single Attends); 1: sequential; 0 .. 256");
ABSL_FLAG(int, max_batch_items, 1024,
          "items one AttendBatch / AppendBatch may carry (more: RESOURCE_EXHAUSTED naming "
          "max_batch_items); 1 .. 65536");
ABSL_FLAG(int, control_threads, 2, "threads for appends and admin calls");
ABSL_FLAG(int, upload_threads, 2,
          "threads for UploadShard index builds (their own lane: a large upload never delays "
          "other sequences' appends); also the most builds running at once");
ABSL_FLAG(int, sync_threads, 2,
          "threads running SyncShards copies into this node, and as many again serving "
          "ReadShards streams to other nodes (their own lanes; further calls queue)");
ABSL_FLAG(int64_t, memory_budget_bytes, 0,
          "shard memory the node admits (keys, values, indexes); 0 = unlimited. Uploads and "
          "appends beyond it get RESOURCE_EXHAUSTED");
ABSL_FLAG(int64_t, upload_memory_bytes, int64_t{12} << 30,
          "working memory all UploadShard streams in flight may hold besides their shards "
          "(wire buffers, fp32 and persistence copies), reserved at each stream's header; "
          "beyond it an upload gets RESOURCE_EXHAUSTED. The node holds at most "
          "--memory_budget_bytes + this. Default 12 GiB: one --max_upload_bytes (4 GiB) upload "
          "of fp32 keys and values (~3x its payload); 0 = unlimited");
ABSL_FLAG(int, max_message_bytes, 64 << 20, "largest gRPC message received or sent, bytes");
ABSL_FLAG(int64_t, max_upload_bytes, int64_t{4} << 30,
          "largest payload one UploadShard stream may declare, bytes");
ABSL_FLAG(int, tail_capacity, 64,
          "appended keys per (sequence, layer, kv head) kept flat before sealing into the index");
ABSL_FLAG(int, train_k, 32, "exact top-k per training query when the node computes it");
ABSL_FLAG(double, target_recall, 0.95,
          "self-calibration: recall@100 on an upload's held-back queries that the chunk's index "
          "search effort (graph beam, IVF nprobe) and, for index type auto, its kind are chosen "
          "for; (0, 1]");
ABSL_FLAG(int, rerank_factor, 4,
          "SQ8 index kinds (flat_sq8, ivf_sq8, and those auto builds): candidates rescored "
          "exactly per result (rerank_factor x k best by code distance); [1, 64]");
ABSL_FLAG(int, decode_train_queries, 256,
          "recent decode (Attend) queries kept per (sequence, layer, kv head) as training "
          "queries for tail seals that build an index; rows x head_dim fp32 each, counted in "
          "--memory_budget_bytes; 0 = none, at most 65536");
ABSL_FLAG(bool, estimate, false,
          "remainder estimation for Attends whose request leaves it at DEFAULT: each query "
          "head's partial also covers, by per-chunk cluster summaries (centroid key, count, "
          "value sum), every key top-k did not retrieve, and tails are attended in full "
          "(docs/benchmarks.md section 4)");
ABSL_FLAG(int, estimate_clusters_per_chunk, 256,
          "clusters per chunk summary for remainder estimation, [1, 65536] (a chunk of n keys "
          "gets at most n / 16); summaries are clustered on a summary thread (queued at upload with "
          "--estimate, else by the first estimating Attend, which attends that chunk exactly until "
          "the summary exists; chunks of keys x clusters <= 16384 are clustered by that Attend) "
          "and counted in --memory_budget_bytes");
ABSL_FLAG(bool, estimate_second_order, false,
          "the estimate's second-order term: each cluster pseudo-key's score gains "
          "ln(1 + s^2/2 sum_t q_t^2 var_t) (the cluster's diagonal key variance), the mass its "
          "mean key misses; lower error on synthetic data, higher KL on stories260K "
          "(docs/benchmarks.md section 4b, Session 26); false: mean key only");
ABSL_FLAG(double, exact_zone_keys_fraction, 0.0,
          "the estimate's exact zone, [0, 1]: per query head and chunk, the summary clusters of "
          "most estimated mass, up to this fraction of the chunk's keys, are attended exactly "
          "instead of estimated (docs/benchmarks.md section 4b, Exact zone); 0: off");
ABSL_FLAG(double, exact_zone_mass_fraction, 1.0,
          "the exact zone, (0, 1]: stop adding clusters once they hold this fraction of the "
          "remainder's estimated mass; 1: only --exact_zone_keys_fraction stops it");
ABSL_FLAG(int64_t, recalibrate_every, 1024,
          "decode queries per (sequence, layer, kv head) between re-calibrations of that head's "
          "chunk indexes (search effort; kind for index auto) on its ring of recent decode "
          "queries, on one background thread (Attends never wait for it); seals then also "
          "calibrate on the ring; 0 = off, at most 2^30");
ABSL_FLAG(bool, background_seals, true,
          "seal full tails on a seal thread into a copy of the chunk index while Attends keep "
          "reading the old one (no Attend stall; the copy costs O(chunk) per seal and the append "
          "that installs it may wait); false: seal in place under the sequence lock, stalling "
          "the sequence's Attends");
ABSL_FLAG(bool, defer_index_build, true,
          "UploadShard stores the chunk, serves it exactly (flat) and replies at once; its "
          "index is built on a background build thread (--index_build_threads, nice 19) and "
          "swapped in when done (ShardInfo.index_pending until then); false: the index is "
          "built before UploadShard replies");
ABSL_FLAG(int, index_build_threads, 1,
          "threads running deferred index builds (--defer_index_build), each at nice 19; "
          "1..256");
ABSL_FLAG(std::string, data_dir, "",
          "RocksDB directory where shards persist (appends are acknowledged once synced) and "
          "from which they are recovered at startup, before serving; empty = memory only");
ABSL_FLAG(std::string, metrics_listen, "127.0.0.1:0",
          "host:port serving Prometheus metrics at GET /metrics; port 0 picks a free port "
          "(printed on stdout as \"kvr_node metrics on HOST:PORT\"); empty disables metrics");
ABSL_FLAG(std::string, ucx_listen, "",
          "IPV4:PORT of the UCX data plane for Attend (UCP active messages; transports from "
          "UCX_TLS); port 0 picks a free port (printed as \"kvr_node ucx on HOST:PORT\" and "
          "advertised by the GetEndpoints RPC); empty = UCX off");
ABSL_FLAG(std::string, tls_sync_peers, "kvr-node",
          "with mTLS: identities (certificate CN, DNS or URI SAN) a SyncShards source must "
          "present; the source is named by IP:port, so its certificate is checked against these "
          "and the CA instead of its address. Comma-separated, at most 64");
ABSL_FLAG(bool, ucx_allow_unencrypted, false,
          "with mTLS on (--tls_cert_file ...), allow --ucx_listen anyway: UCX carries Attend "
          "without encryption and without the peer's certificate (each Attend still needs its "
          "sequence's capability). Without this flag kvr_node refuses to start with both set");
ABSL_FLAG(int64_t, ucx_busy_poll_us, 0,
          "after UCX activity, poll this many microseconds before sleeping (lower latency, "
          "one busy core); 0 = sleep at once");
ABSL_FLAG(int64_t, ucx_max_connections, 256,
          "UCX client connections open at once; a further connection is rejected (that client "
          "falls back to gRPC). Default 256, the same as --max_concurrent_streams: a node "
          "serves a few decode workers, each with one connection; 0 = unbounded");
ABSL_FLAG(int64_t, ucx_max_inflight_per_connection, 64,
          "UCX Attend requests one connection may have in flight; a further one is answered "
          "RESOURCE_EXHAUSTED at once, its payload not received. Default 64: a kvr_worker "
          "has one Attend per sequence of its batched step in flight per node, at most its "
          "--max_concurrent (default 8); raise this with a worker's --max_concurrent above 64. "
          "A connection with twice this many messages whose replies are not sent yet (a client "
          "that floods or does not read its replies) has further messages dropped unanswered. "
          "0 = unbounded");
ABSL_FLAG(int64_t, ucx_max_inflight_bytes, int64_t{2} << 30,
          "UCX Attend request bytes in flight over all connections; a request that would pass "
          "it is answered RESOURCE_EXHAUSTED at once, its payload not received. Default 2 GiB "
          "(as --grpc_memory_quota_bytes); at least --max_message_bytes; 0 = unbounded");
ABSL_FLAG(double, lease_seconds, 60.0,
          "seconds a sequence created with a lease owner lives after its owner's last "
          "CreateSequence / RenewLeases (dropped then, memory and data dir; counted in "
          "kvr_node_leases_expired_total); restarts at recovery; 0 = never expire");
ABSL_FLAG(bool, recovery_quarantine, true,
          "with --data_dir: a sequence whose stored records are corrupt or inconsistent, or "
          "that does not fit --memory_budget_bytes, is quarantined at startup (logged, counted "
          "in kvr_node_quarantined_sequences, not served, records kept) and every other "
          "sequence is served; false = such a sequence stops the node from starting");
ABSL_FLAG(double, max_deadline_seconds, 600.0,
          "longest deadline a kvr.v1.RetrievalNode call may carry, seconds; a call with a later "
          "deadline or none is INVALID_ARGUMENT (0 = no cap). Default: 10x the clients' "
          "longest (UploadShard, 60 s)");
ABSL_FLAG(double, drain_seconds, 10.0,
          "on SIGTERM / SIGINT, how long in-flight calls may take before they are cancelled");

namespace kvr::retrieval {
namespace {

constexpr char kProgram[] = "kvr_node";
constexpr char kServiceName[] = "kvr.v1.RetrievalNode";
// Who may call kvr.v1.RetrievalNode over mTLS by default: decode workers,
// and other nodes (SyncShards reads its source's ReadShards).
constexpr char kDefaultAllowedPeers[] = "kvr-worker,kvr-node";

int Fail(absl::string_view message) { return server::Fail(kProgram, message); }

int Main(int argc, char** argv) {
  server::ParseFlags(
      "retrieval_node/server/main.cc",
      "retrieval node (kvr.v1.RetrievalNode over gRPC, grpc.health.v1, reflection).\n"
      "  kvr_node --listen 127.0.0.1:0 [--threads N] [--memory_budget_bytes B]\n"
      "Flags may also be read from a file with --flagfile=PATH.",
      argc, argv);

  // Block the stop signals in every thread (gRPC's and ours inherit the
  // mask); the main thread takes them with sigwait.
  const sigset_t stop_signals = rpc::BlockStopSignals();

  const int threads_flag = absl::GetFlag(FLAGS_threads);
  const int control_threads = absl::GetFlag(FLAGS_control_threads);
  const int max_message_bytes = absl::GetFlag(FLAGS_max_message_bytes);
  const absl::Status flags_ok =
      server::FlagChecks()
          .InRange("threads", threads_flag, 0, 256)
          .InRange("control_threads", control_threads, 1, 256)
          .InRange("attend_threads", absl::GetFlag(FLAGS_attend_threads), 0, 256)
          .InRange("search_threads", absl::GetFlag(FLAGS_search_threads), 0, 256)
          .InRange("max_batch_items", absl::GetFlag(FLAGS_max_batch_items), 1,
                   static_cast<int>(kMaxBatchItemsLimit))
          .InRange("upload_threads", absl::GetFlag(FLAGS_upload_threads), 1, 256)
          .InRange("sync_threads", absl::GetFlag(FLAGS_sync_threads), 1, 256)
          .InRange("index_build_threads", absl::GetFlag(FLAGS_index_build_threads), 1, 256)
          .AtLeast("max_message_bytes", max_message_bytes, 1 << 16)
          .AtLeast("memory_budget_bytes", absl::GetFlag(FLAGS_memory_budget_bytes), int64_t{0})
          .AtLeast("upload_memory_bytes", absl::GetFlag(FLAGS_upload_memory_bytes), int64_t{0})
          .AtLeast("tail_capacity", absl::GetFlag(FLAGS_tail_capacity), 1)
          .InRange("decode_train_queries", absl::GetFlag(FLAGS_decode_train_queries), 0,
                   static_cast<int>(kMaxDecodeTrainQueries))
          .InRange("estimate_clusters_per_chunk",
                   absl::GetFlag(FLAGS_estimate_clusters_per_chunk),
                   static_cast<int>(index::kMinEstimateClusters),
                   static_cast<int>(index::kMaxEstimateClusters))
          .InRange("recalibrate_every", absl::GetFlag(FLAGS_recalibrate_every), int64_t{0},
                   static_cast<int64_t>(kMaxRecalibrateEvery))
          .AtLeast("max_deadline_seconds", absl::GetFlag(FLAGS_max_deadline_seconds), 0.0)
          .AtLeast("ucx_max_connections", absl::GetFlag(FLAGS_ucx_max_connections), int64_t{0})
          .AtLeast("ucx_max_inflight_per_connection",
                   absl::GetFlag(FLAGS_ucx_max_inflight_per_connection), int64_t{0})
          .status();
  if (!flags_ok.ok()) return Fail(flags_ok.message());
  const absl::StatusOr<server::ServeBounds> bounds = server::ServeBoundsFromFlags();
  if (!bounds.ok()) return Fail(bounds.status().message());
  if (const int64_t b = absl::GetFlag(FLAGS_ucx_max_inflight_bytes);
      b < 0 || (b != 0 && b < max_message_bytes)) {
    return Fail(absl::StrCat("--ucx_max_inflight_bytes must be 0 (unbounded) or at least "
                             "--max_message_bytes (",
                             max_message_bytes, "), got ", b));
  }

  absl::StatusOr<security::ProcessTls> tls =
      security::ProcessTlsFromFlags(kProgram, kDefaultAllowedPeers);
  if (!tls.ok()) return Fail(tls.status().message());
  if (tls->enabled() && !absl::GetFlag(FLAGS_ucx_listen).empty() &&
      !absl::GetFlag(FLAGS_ucx_allow_unencrypted)) {
    return Fail(
        "--ucx_listen with mTLS on: the UCX data plane is neither encrypted nor authenticated "
        "by certificate; drop --ucx_listen, or accept that with --ucx_allow_unencrypted");
  }

  NodeCoreOptions core_options;
  core_options.threads = threads_flag > 0
                             ? static_cast<size_t>(threads_flag)
                             : std::max<size_t>(1, std::thread::hardware_concurrency());
  const int attend_threads = absl::GetFlag(FLAGS_attend_threads);
  core_options.attend_threads = attend_threads > 0
                                    ? static_cast<size_t>(attend_threads)
                                    : std::max<size_t>(1, std::thread::hardware_concurrency());
  core_options.search_threads = static_cast<size_t>(absl::GetFlag(FLAGS_search_threads));
  core_options.max_batch_items = static_cast<size_t>(absl::GetFlag(FLAGS_max_batch_items));
  core_options.memory_budget_bytes = absl::GetFlag(FLAGS_memory_budget_bytes);
  core_options.upload_memory_bytes = absl::GetFlag(FLAGS_upload_memory_bytes);
  core_options.tail_capacity = static_cast<size_t>(absl::GetFlag(FLAGS_tail_capacity));
  core_options.train_k = absl::GetFlag(FLAGS_train_k);
  core_options.calibration.target_recall = absl::GetFlag(FLAGS_target_recall);
  if (absl::Status s = index::ValidateCalibrationOptions(core_options.calibration); !s.ok()) {
    return Fail(absl::StrCat("--", s.message()));
  }
  core_options.ivf.rerank_factor = absl::GetFlag(FLAGS_rerank_factor);
  if (absl::Status s = index::ValidateRerankFactor(core_options.ivf.rerank_factor, "rerank_factor"); !s.ok()) {
    return Fail(absl::StrCat("--", s.message()));
  }
  core_options.decode_train_queries =
      static_cast<size_t>(absl::GetFlag(FLAGS_decode_train_queries));
  core_options.background_seals = absl::GetFlag(FLAGS_background_seals);
  core_options.defer_index_build = absl::GetFlag(FLAGS_defer_index_build);
  core_options.index_build_threads =
      static_cast<size_t>(absl::GetFlag(FLAGS_index_build_threads));
  // Deferred builds are recorded in the build metrics when they install (on
  // the build thread); the metrics exist only later, and go before the core.
  struct BuiltMetrics {
    std::mutex mu;
    NodeMetrics* metrics = nullptr;  // guarded by mu
  };
  auto built_metrics = std::make_shared<BuiltMetrics>();
  core_options.on_index_built = [built_metrics](IndexType type, double seconds,
                                                double measured_us, double expected_recall) {
    std::lock_guard<std::mutex> lock(built_metrics->mu);
    if (built_metrics->metrics != nullptr) {
      built_metrics->metrics->RecordIndexBuild(type, seconds);
      built_metrics->metrics->RecordIndexCalibration(type, measured_us, expected_recall);
    }
  };
  core_options.estimate = absl::GetFlag(FLAGS_estimate);
  core_options.estimate_clusters_per_chunk =
      static_cast<size_t>(absl::GetFlag(FLAGS_estimate_clusters_per_chunk));
  core_options.estimate_second_order = absl::GetFlag(FLAGS_estimate_second_order);
  core_options.exact_zone_keys_fraction = absl::GetFlag(FLAGS_exact_zone_keys_fraction);
  core_options.exact_zone_mass_fraction = absl::GetFlag(FLAGS_exact_zone_mass_fraction);
  core_options.recalibrate_every = static_cast<size_t>(absl::GetFlag(FLAGS_recalibrate_every));
  core_options.recovery_quarantine = absl::GetFlag(FLAGS_recovery_quarantine);
  core_options.lease_seconds = absl::GetFlag(FLAGS_lease_seconds);
  std::unique_ptr<ShardStore> store;  // outlives the core (declared first)
  if (const std::string data_dir = absl::GetFlag(FLAGS_data_dir); !data_dir.empty()) {
    absl::StatusOr<std::unique_ptr<ShardStore>> opened = ShardStore::Open(data_dir);
    if (!opened.ok()) return Fail(opened.status().ToString());
    store = std::move(opened).value();
    core_options.persistence = store.get();
  }
  absl::StatusOr<std::unique_ptr<NodeCore>> core = NodeCore::Create(core_options);
  if (!core.ok()) return Fail(core.status().ToString());
  if (store != nullptr) {
    if (absl::Status st = (*core)->Recover(); !st.ok()) {
      return Fail("recovery from --data_dir " + store->dir() + " failed: " + st.ToString());
    }
  }

  NodeServiceOptions service_options;
  service_options.control_threads = static_cast<size_t>(control_threads);
  service_options.upload_threads = static_cast<size_t>(absl::GetFlag(FLAGS_upload_threads));
  service_options.max_upload_bytes = absl::GetFlag(FLAGS_max_upload_bytes);
  service_options.max_deadline_seconds = absl::GetFlag(FLAGS_max_deadline_seconds);
  service_options.max_message_bytes = max_message_bytes;
  service_options.max_batch_items = core_options.max_batch_items;
  service_options.sync_threads = static_cast<size_t>(absl::GetFlag(FLAGS_sync_threads));
  if (tls->enabled()) {
    absl::StatusOr<std::vector<std::string>> sync_peers =
        security::ParseAllowedPeers(absl::GetFlag(FLAGS_tls_sync_peers), "tls_sync_peers");
    if (!sync_peers.ok()) return Fail(sync_peers.status().message());
    service_options.peer_credentials =
        security::MakeMtlsPeerChannelCredentials(*tls->files, *std::move(sync_peers));
  } else {
    service_options.peer_credentials = tls->channel;
  }
  // Metrics: served before the RPC port opens, so the first request is counted.
  std::unique_ptr<NodeMetrics> metrics;
  std::unique_ptr<metrics::MetricsEndpoint> metrics_endpoint;  // stopped before `metrics`
  if (const std::string metrics_listen = absl::GetFlag(FLAGS_metrics_listen);
      !metrics_listen.empty()) {
    metrics = std::make_unique<NodeMetrics>();
    NodeCore* const node = core->get();
    metrics->SetHoldingsSource([node] {
      NodeHoldings h;
      if (absl::StatusOr<NodeStats> st = node->Stats(); st.ok()) {
        h.sequences = st->sequences;
        h.shards = st->shards;
        h.indexed_keys = st->indexed_keys;
        h.tail_keys = st->tail_keys;
        h.quarantined_sequences = st->quarantined_sequences;
        h.leases_expired = st->leases_expired;
        h.index_builds_pending = st->index_builds_pending;
      }
      h.memory_used_bytes = node->MemoryUsedBytes();
      h.memory_budget_bytes = node->options().memory_budget_bytes;
      h.upload_memory_used_bytes = node->UploadMemoryUsedBytes();
      return h;
    });
    absl::StatusOr<std::unique_ptr<metrics::MetricsEndpoint>> endpoint =
        server::ServeMetrics(kProgram, metrics_listen, metrics->collectable());
    if (!endpoint.ok()) return Fail(endpoint.status().ToString());
    metrics_endpoint = *std::move(endpoint);
    service_options.metrics = metrics.get();
    std::lock_guard<std::mutex> lock(built_metrics->mu);
    built_metrics->metrics = metrics.get();
  }
  // Stops deferred builds' metrics before `metrics` goes (declared after it).
  struct ClearOnExit {
    std::shared_ptr<BuiltMetrics> sink;
    ~ClearOnExit() {
      std::lock_guard<std::mutex> lock(sink->mu);
      sink->metrics = nullptr;
    }
  } clear_built_metrics{built_metrics};
  auto service = std::make_unique<NodeService>(core->get(), service_options);

  // UCX data plane: Attend over UCP, served by the same handler and pools as
  // the gRPC Attend; stopped before the service and the core go away.
  std::unique_ptr<UcxEndpoint> ucx;
  if (const std::string ucx_listen = absl::GetFlag(FLAGS_ucx_listen); !ucx_listen.empty()) {
    UcxEndpointOptions ucx_options;
    ucx_options.listen = ucx_listen;
    ucx_options.max_message_bytes = static_cast<size_t>(max_message_bytes);
    ucx_options.busy_poll_us = absl::GetFlag(FLAGS_ucx_busy_poll_us);
    ucx_options.max_connections = static_cast<size_t>(absl::GetFlag(FLAGS_ucx_max_connections));
    ucx_options.max_inflight_per_connection =
        static_cast<size_t>(absl::GetFlag(FLAGS_ucx_max_inflight_per_connection));
    ucx_options.max_inflight_bytes =
        static_cast<size_t>(absl::GetFlag(FLAGS_ucx_max_inflight_bytes));
    NodeService* const svc = service.get();
    absl::StatusOr<std::unique_ptr<UcxEndpoint>> started = UcxEndpoint::Start(
        ucx_options, [svc](const v1::AttendRequest& request, v1::AttendResponse* response,
                           std::function<void(absl::Status)> done) {
          svc->HandleAttend(request, response, std::move(done));
        },
        [svc](const v1::AttendBatchRequest& request, v1::AttendBatchResponse* response,
              std::function<void(absl::Status)> done) {
          svc->HandleAttendBatch(request, response, std::move(done));
        },
        [svc](const v1::AppendBatchRequest& request, v1::AppendBatchResponse* response,
              std::function<void(absl::Status)> done) {
          svc->HandleAppendBatch(request, response, std::move(done));
        });
    if (!started.ok()) return Fail(started.status().ToString());
    ucx = std::move(started).value();
    service->SetUcxAddress(ucx->address());
    std::printf("kvr_node ucx on %s\n", ucx->address().c_str());
    std::fflush(stdout);
  }

  const absl::Status served =
      rpc::ServeUntilSignal({service.get()},
                            {.name = kProgram,
                             .listen = absl::GetFlag(FLAGS_listen),
                             .max_message_bytes = max_message_bytes,
                             .health_services = {kServiceName},
                             .drain_seconds = absl::GetFlag(FLAGS_drain_seconds),
                             .max_concurrent_streams = bounds->max_concurrent_streams,
                             .memory_quota_bytes = bounds->memory_quota_bytes,
                             .max_threads = bounds->max_threads,
                             .credentials = tls->server},
                            stop_signals);
  if (!served.ok()) return Fail(served.message());
  ucx.reset();               // no new UCX Attend; late completions are dropped safely
  service.reset();           // control pool: drained and joined
  metrics_endpoint.reset();  // no scrape reads the core any more
  core->reset();             // Attend pool: joined
  std::fprintf(stderr, "kvr_node: stopped\n");
  return 0;
}

}  // namespace
}  // namespace kvr::retrieval

int main(int argc, char** argv) { return kvr::retrieval::Main(argc, argv); }
