// Batched Attend / Append (AttendBatch, AppendBatch; issue 20 item 2):
//  * AttendBatch items equal, bit for bit, the same requests sent as single
//    Attends (partials and stats): in process (items searched in parallel on
//    the core's attend_threads pool) and over gRPC against a real kvr_node,
//    whose results also equal the in-process node's;
//  * a batch with bad items (wrong capability, a shard the node lacks,
//    queries of the wrong width) fails only those slots, each with exactly
//    the status the single Attend gives (code and message, which names the
//    field), the good items' partials unchanged (in process, gRPC, UCX:
//    UCX batches equal single UCX Attends and gRPC batches bit for bit, or
//    skip when UCX cannot run here);
//  * more items than max_batch_items is RESOURCE_EXHAUSTED naming
//    max_batch_items (in process and over gRPC, nothing served); a batch over
//    the node's --max_message_bytes is RESOURCE_EXHAUSTED;
//  * kvr_node_attend_batch_items counts the AttendBatch calls and their items,
//    kvr_node_requests_total{method="AttendBatch"|"AppendBatch"} the calls;
//  * AppendBatch leaves a node holding exactly what per-item Appends leave
//    (same positions, same Attend results bit for bit); a bad item fails
//    only its slot; over UCX (wire version 4) its per-item statuses and the
//    state it leaves equal gRPC's AppendBatch on a twin node;
//  * the engine's greedy output (stories260K, 4 concurrent sequences) is
//    token- and logit-identical with attend_batching on and off, and on it
//    sends one AttendBatch per layer and step and no single Attend;
//  * three kvr_node processes, R = 2: a node SIGKILLed in the middle of a
//    batched generation fails its items over per item; every step's greedy
//    token equals the fault-free in-process run's.
//
// Usage: attend_batch_test [--kvr_node PATH] [gtest flags]; the NodeBatch*
// tests need --kvr_node.
#include <signal.h>
#include <sys/wait.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <google/protobuf/stubs/common.h>

#include "absl/strings/str_join.h"
#include "gpu_worker/engine/retrieval_engine.h"
#include "gtest/gtest.h"
#include "retrieval_node/client/client_factory.h"
#include "retrieval_node/client/grpc_retrieval_client.h"
#include "retrieval_node/client/in_process_client.h"
#include "retrieval_node/client/multi_node_client.h"
#include "retrieval_node/client/ucx_retrieval_client.h"
#include "tests/support/chunked_sequence.h"
#include "tests/support/forwarding_client.h"
#include "tests/support/metrics_page.h"
#include "tests/support/server_process.h"
#include "tests/support/stories_model.h"
#include "tests/support/test_data.h"

// Links libprotobuf ahead of libsentencepiece (PROTOBUF_FIRST, see
// cmake/KvrTargets.cmake and engine_chunks_test.cc).
void ReferenceLibprotobufFirst() { GOOGLE_PROTOBUF_VERIFY_VERSION; }

namespace kvr::retrieval {
namespace {

using test_support::ExpectSamePartials;
using test_support::NodeProcess;
using test_support::RandomMatrix;

constexpr int kLayers = 2, kHeads = 4, kKvHeads = 2, kDim = 16;
constexpr int kChunks = 2, kChunkKeys = 200, kAppended = 10;
constexpr int kSequences = 3;

uint64_t SeqId(int s) { return 9100 + static_cast<uint64_t>(s); }
std::string Capability(int s) { return std::string(16, static_cast<char>('a' + s)); }

SequenceSpec Spec(int s) {
  SequenceSpec spec;
  spec.sequence_id = SeqId(s);
  spec.n_layers = kLayers;
  spec.n_heads = kHeads;
  spec.n_kv_heads = kKvHeads;
  spec.head_dim = kDim;
  spec.index_type = IndexType::kGraph;
  return spec;
}

// Creates kSequences sequences, each with kChunks graph-indexed chunks per
// (layer, kv head) and an appended tail, on every client.
void Load(const std::vector<RetrievalClient*>& clients) {
  for (int s = 0; s < kSequences; ++s) {
    ASSERT_NO_FATAL_FAILURE(test_support::LoadChunkedSequence(
        clients, Spec(s), Capability(s), static_cast<uint32_t>(s * 1000), kChunks, kChunkKeys,
        kAppended));
  }
}

// The items of a batch: every (sequence, layer), half of them with a shard
// list; queries, shard lists and outputs owned here.
struct Batch {
  std::vector<Matrix> queries;
  std::vector<std::vector<HeadChunkRef>> shards;
  std::vector<Partials> out;
  std::vector<AttendStats> stats;
  std::vector<AttendBatchItem> items;

  // Adds an item for sequence `s`, layer `layer` (queries of width `dim`).
  void Add(int s, int layer, std::vector<HeadChunkRef> list, std::string capability,
           int dim = kDim) {
    queries.push_back(RandomMatrix(kHeads, static_cast<size_t>(dim),
                                   static_cast<uint32_t>(77 + s * 10 + layer), 0.5f));
    shards.push_back(std::move(list));
    out.emplace_back(kHeads, kDim);
    stats.emplace_back();
    AttendRequest r;
    r.sequence_id = SeqId(s);
    r.layer = layer;
    r.k = 24;
    r.capability = std::move(capability);
    items.push_back({r, {}, nullptr, absl::OkStatus()});
  }
  // Points every item at its buffers (after the last Add).
  void Bind() {
    for (size_t i = 0; i < items.size(); ++i) {
      items[i].request.queries = queries[i].view();
      items[i].request.shards = shards[i];
      items[i].out = out[i].view();
      items[i].stats = &stats[i];
    }
  }
  static Batch Standard() {
    Batch b;
    for (int s = 0; s < kSequences; ++s) {
      for (int layer = 0; layer < kLayers; ++layer) {
        std::vector<HeadChunkRef> list;
        if ((s + layer) % 2 == 1) list = {{1, 1}, {0, 0}};
        b.Add(s, layer, list, Capability(s));
      }
    }
    b.Bind();
    return b;
  }
};

// Sends each item of `batch` as a single Attend through `client` and
// expects the batch's slot to hold exactly its status, partials and stats.
void ExpectEqualsSingleAttends(RetrievalClient* client, const Batch& batch,
                               const std::string& what) {
  for (size_t i = 0; i < batch.items.size(); ++i) {
    const AttendBatchItem& item = batch.items[i];
    Partials single(kHeads, kDim);
    AttendStats single_stats;
    const absl::Status st = client->Attend(item.request, single.view(), &single_stats);
    const std::string where = what + " item " + std::to_string(i);
    EXPECT_EQ(item.status, st) << where;
    if (!st.ok()) continue;
    ExpectSamePartials(batch.out[i], single, where);
    EXPECT_EQ(batch.stats[i].shards_searched, single_stats.shards_searched) << where;
    EXPECT_EQ(batch.stats[i].keys_attended, single_stats.keys_attended) << where;
    EXPECT_EQ(batch.stats[i].distance_computations, single_stats.distance_computations) << where;
    EXPECT_GT(batch.stats[i].shards_searched, 0) << where;
  }
}

// A batch whose items 1, 3 and 5 are bad (wrong capability, a shard the
// node lacks, queries 8 wide for a head_dim 16 sequence); checks each slot.
void ExpectBadItemsFailAlone(RetrievalClient* client, const std::string& what) {
  Batch b;
  b.Add(0, 0, {}, Capability(0));
  b.Add(1, 0, {}, Capability(2));            // another sequence's capability
  b.Add(1, 1, {{0, 1}}, Capability(1));
  b.Add(2, 1, {{1, 7}}, Capability(2));       // chunk 7 is not held
  b.Add(2, 0, {}, Capability(2));
  b.Add(0, 1, {}, Capability(0), kDim / 2);  // queries of the wrong width
  b.Bind();
  ASSERT_TRUE(client->AttendBatch(b.items).ok()) << what;
  EXPECT_TRUE(b.items[0].status.ok()) << what << b.items[0].status;
  EXPECT_TRUE(b.items[2].status.ok()) << what << b.items[2].status;
  EXPECT_TRUE(b.items[4].status.ok()) << what << b.items[4].status;
  EXPECT_EQ(b.items[1].status.code(), absl::StatusCode::kPermissionDenied) << what;
  EXPECT_NE(b.items[1].status.message().find("capability"), std::string::npos)
      << what << b.items[1].status;
  EXPECT_EQ(b.items[3].status.code(), absl::StatusCode::kNotFound) << what;
  EXPECT_NE(b.items[3].status.message().find("chunk 7"), std::string::npos)
      << what << b.items[3].status;
  EXPECT_EQ(b.items[5].status.code(), absl::StatusCode::kInvalidArgument) << what;
  EXPECT_NE(b.items[5].status.message().find("queries"), std::string::npos)
      << what << b.items[5].status;
  // Every slot, good or bad, is what the single Attend gives.
  ExpectEqualsSingleAttends(client, b, what);
}

std::unique_ptr<InProcessRetrievalClient> InProcess(size_t max_batch_items = 1024) {
  NodeCoreOptions o;
  o.threads = 2;
  o.attend_threads = 3;
  o.max_batch_items = max_batch_items;
  auto c = InProcessRetrievalClient::Create(o);
  EXPECT_TRUE(c.ok()) << c.status();
  return std::move(c).value();
}

TEST(InProcessBatchTest, EqualsSingleAttendsBitForBit) {
  auto node = InProcess();
  ASSERT_NO_FATAL_FAILURE(Load({node.get()}));
  Batch b = Batch::Standard();
  ASSERT_TRUE(node->AttendBatch(b.items).ok());
  ExpectEqualsSingleAttends(node.get(), b, "in-process");
  // The core's own entry point with its pool off (inline) gives the same.
  NodeCoreOptions inline_options;
  inline_options.threads = 0;
  auto inline_node = InProcessRetrievalClient::Create(inline_options);
  ASSERT_TRUE(inline_node.ok());
  ASSERT_NO_FATAL_FAILURE(Load({inline_node->get()}));
  Batch c = Batch::Standard();
  ASSERT_TRUE((*inline_node)->AttendBatch(c.items).ok());
  for (size_t i = 0; i < b.items.size(); ++i) {
    ExpectSamePartials(c.out[i], b.out[i], "inline item " + std::to_string(i));
  }
}

TEST(InProcessBatchTest, BadItemFailsOnlyItsSlot) {
  auto node = InProcess();
  ASSERT_NO_FATAL_FAILURE(Load({node.get()}));
  ExpectBadItemsFailAlone(node.get(), "in-process");
}

TEST(InProcessBatchTest, ItemLimitRejectedNamingIt) {
  auto node = InProcess(/*max_batch_items=*/4);
  ASSERT_NO_FATAL_FAILURE(Load({node.get()}));
  Batch b = Batch::Standard();  // 6 items
  ASSERT_EQ(b.items.size(), 6u);
  const absl::Status st = node->AttendBatch(b.items);
  EXPECT_EQ(st.code(), absl::StatusCode::kResourceExhausted) << st;
  EXPECT_NE(st.message().find("6 items exceed max_batch_items 4"), std::string::npos) << st;
  for (const AttendBatchItem& item : b.items) EXPECT_EQ(item.status, st);
  std::vector<AppendBatchItem> appends(5);
  const absl::Status ast = node->AppendBatch(appends);
  EXPECT_EQ(ast.code(), absl::StatusCode::kResourceExhausted) << ast;
  EXPECT_NE(ast.message().find("max_batch_items 4"), std::string::npos) << ast;
  // At the limit it is served.
  b.items.resize(4);
  EXPECT_TRUE(node->AttendBatch(b.items).ok());
  for (const AttendBatchItem& item : b.items) EXPECT_TRUE(item.status.ok()) << item.status;
  // Bad options are refused naming the field.
  NodeCoreOptions bad;
  bad.max_batch_items = 0;
  EXPECT_NE(NodeCore::Create(bad).status().message().find("max_batch_items"), std::string::npos);
}

// Appends rows_per_item rows per item, two items per (sequence 0, layer,
// kv head) in order, and one bad item (positions not after those held).
std::vector<Matrix> g_append_rows;  // the items' keys and values (kept alive)
std::vector<AppendBatchItem> AppendItems() {
  std::vector<AppendBatchItem> items;
  g_append_rows.clear();
  g_append_rows.reserve(64);
  int64_t next = int64_t{kChunks} * kChunkKeys + kAppended;
  for (int part = 0; part < 2; ++part) {
    for (int layer = 0; layer < kLayers; ++layer) {
      for (int g = 0; g < kKvHeads; ++g) {
        const uint32_t seed = static_cast<uint32_t>(300 + part * 10 + layer * 3 + g);
        g_append_rows.push_back(RandomMatrix(3, kDim, seed, 0.5f));
        g_append_rows.push_back(RandomMatrix(3, kDim, seed + 50));
        AppendBatchItem item;
        item.request.sequence_id = SeqId(0);
        item.request.layer = layer;
        item.request.kv_head = g;
        item.request.first_position = next + part * 3;
        item.request.keys = g_append_rows[g_append_rows.size() - 2].view();
        item.request.values = g_append_rows.back().view();
        item.request.capability = Capability(0);
        items.push_back(item);
      }
    }
  }
  AppendBatchItem bad = items.front();
  bad.request.first_position = 5;  // long held
  items.insert(items.begin() + 2, bad);
  return items;
}

TEST(InProcessBatchTest, AppendBatchEqualsSingleAppends) {
  auto batched = InProcess();
  auto single = InProcess();
  ASSERT_NO_FATAL_FAILURE(Load({batched.get(), single.get()}));
  std::vector<AppendBatchItem> items = AppendItems();
  ASSERT_TRUE(batched->AppendBatch(items).ok());
  for (size_t i = 0; i < items.size(); ++i) {
    const absl::Status want = single->Append(items[i].request);
    EXPECT_EQ(items[i].status, want) << "append item " << i;
    EXPECT_EQ(items[i].status.ok(), i != 2) << "append item " << i << " " << items[i].status;
  }
  EXPECT_EQ(items[2].status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(items[2].status.message().find("position"), std::string::npos) << items[2].status;
  for (int layer = 0; layer < kLayers; ++layer) {
    for (int g = 0; g < kKvHeads; ++g) {
      auto a = batched->core().HeldPositions(SeqId(0), layer, g);
      auto b = single->core().HeldPositions(SeqId(0), layer, g);
      ASSERT_TRUE(a.ok() && b.ok());
      EXPECT_EQ(*a, *b);
      EXPECT_EQ(a->size(), size_t{kChunks} * kChunkKeys + kAppended + 6);
    }
  }
  Batch x = Batch::Standard(), y = Batch::Standard();
  ASSERT_TRUE(batched->AttendBatch(x.items).ok());
  ASSERT_TRUE(single->AttendBatch(y.items).ok());
  for (size_t i = 0; i < x.items.size(); ++i) {
    ExpectSamePartials(x.out[i], y.out[i], "after appends item " + std::to_string(i));
  }
}

// ---- The engine ------------------------------------------------------------

// Counts the calls the engine makes, forwarding everything.
class CountingClient : public test_support::ForwardingRetrievalClient {
 public:
  using ForwardingRetrievalClient::ForwardingRetrievalClient;
  void AttendAsync(const AttendRequest& request, PartialsView out, AttendStats* stats,
                   StatusCallback done) override {
    attends.fetch_add(1);
    node()->AttendAsync(request, out, stats, std::move(done));
  }
  void AppendAsync(const AppendRequest& request, StatusCallback done) override {
    appends.fetch_add(1);
    node()->AppendAsync(request, std::move(done));
  }
  void AttendBatchAsync(std::span<AttendBatchItem> items, StatusCallback done) override {
    attend_batches.fetch_add(1);
    node()->AttendBatchAsync(items, std::move(done));
  }
  void AppendBatchAsync(std::span<AppendBatchItem> items, StatusCallback done) override {
    append_batches.fetch_add(1);
    node()->AppendBatchAsync(items, std::move(done));
  }
  std::atomic<int64_t> attends{0}, appends{0}, attend_batches{0}, append_batches{0};
};

constexpr int kEngineSequences = 4, kEngineSteps = 40;

struct EngineRun {
  std::vector<std::vector<int32_t>> tokens;  // [sequence][step]
  std::vector<std::vector<std::vector<float>>> logits;
};

// Greedy decode of kEngineSequences prompts, one StepBatch per step, over
// `client`; `after_step(step)` runs after each step.
EngineRun RunEngine(test_support::StoriesModel& model, RetrievalClient* client, bool batching,
                    const std::function<void(int)>& after_step = nullptr) {
  EngineRun run;
  worker::EngineOptions eo;
  eo.attend_batching = batching;
  eo.handoff_threads = 0;
  auto engine = worker::RetrievalEngine::Create(model.backend.get(), model.weights, client, eo);
  EXPECT_TRUE(engine.ok()) << engine.status();
  if (!engine.ok()) return run;
  worker::AttentionOptions ao;
  ao.sinks = 4;
  ao.window = 16;
  ao.index = IndexType::kFlat;
  ao.top_k = 4096;
  ao.chunk_tokens = 48;
  const char* prompts[kEngineSequences] = {
      "Once upon a time, there was a little girl named Lily. She loved to play outside.",
      "The big dog ran to the park with his friend the cat. They saw a red ball and",
      "Tom had a toy car. He liked to drive it around the house every day until one",
      "One day, a bird flew into the garden and sang a happy song to the flowers"};
  std::vector<std::unique_ptr<worker::EngineSequence>> seqs;
  for (const char* p : prompts) {
    auto s = (*engine)->StartSequence(model.Encode(p), ao);
    EXPECT_TRUE(s.ok()) << s.status();
    if (!s.ok()) return run;
    seqs.push_back(std::move(*s));
  }
  run.tokens.resize(kEngineSequences);
  run.logits.resize(kEngineSequences);
  for (int step = 0; step < kEngineSteps; ++step) {
    std::vector<worker::EngineSequence*> batch;
    std::vector<int32_t> tokens;
    for (int i = 0; i < kEngineSequences; ++i) {
      batch.push_back(seqs[i].get());
      tokens.push_back(test_support::Argmax(seqs[i]->logits()));
      run.tokens[i].push_back(tokens.back());
    }
    std::vector<absl::Status> st(batch.size());
    const absl::Status all = (*engine)->StepBatch(batch, tokens, st);
    EXPECT_TRUE(all.ok()) << all;
    for (int i = 0; i < kEngineSequences; ++i) {
      EXPECT_TRUE(st[i].ok()) << "sequence " << i << " step " << step << ": " << st[i];
      if (!st[i].ok()) return run;
      run.logits[i].emplace_back(seqs[i]->logits().begin(), seqs[i]->logits().end());
    }
    if (after_step) after_step(step);
  }
  for (auto& s : seqs) EXPECT_TRUE((*engine)->EndSequence(*s).ok());
  return run;
}

TEST(EngineBatchTest, TokenIdenticalWithBatchingOnAndOff) {
  test_support::StoriesModel model;
  ASSERT_TRUE(model.Load());
  auto node_off = InProcess(), node_on = InProcess();
  CountingClient off(node_off.get()), on(node_on.get());
  const EngineRun want = RunEngine(model, &off, /*batching=*/false);
  const EngineRun got = RunEngine(model, &on, /*batching=*/true);
  ASSERT_EQ(got.tokens.size(), want.tokens.size());
  for (int i = 0; i < kEngineSequences; ++i) {
    EXPECT_EQ(got.tokens[i], want.tokens[i]) << "sequence " << i;
    ASSERT_EQ(got.logits[i].size(), want.logits[i].size());
    for (size_t s = 0; s < got.logits[i].size(); ++s) {
      ASSERT_EQ(got.logits[i][s], want.logits[i][s]) << "sequence " << i << " step " << s;
    }
  }
  const int n_layers = model.weights->config.n_layers;
  // Off: one Attend per sequence per layer per step, no batches.
  EXPECT_EQ(off.attend_batches.load(), 0);
  EXPECT_EQ(off.attends.load(), int64_t{kEngineSequences} * n_layers * kEngineSteps);
  EXPECT_GT(off.appends.load(), 0);
  // On: one AttendBatch per layer per step, one AppendBatch per layer of a
  // step that spills, and nothing single.
  EXPECT_EQ(on.attends.load(), 0);
  EXPECT_EQ(on.appends.load(), 0);
  EXPECT_EQ(on.attend_batches.load(), int64_t{n_layers} * kEngineSteps);
  EXPECT_GT(on.append_batches.load(), 0);
  EXPECT_LE(on.append_batches.load(), int64_t{n_layers} * kEngineSteps);
}

// ---- Against real kvr_node processes -------------------------------------

std::unique_ptr<GrpcRetrievalClient> Grpc(const std::string& address) {
  auto c = GrpcRetrievalClient::Create(address);
  EXPECT_TRUE(c.ok()) << c.status();
  return c.ok() ? std::move(c).value() : nullptr;
}

TEST(NodeBatchTest, GrpcEqualsSingleAttendsAndInProcess) {
  auto proc =
      NodeProcess::Start({"--defer_index_build=false", "--threads=2", "--attend_threads=3"});
  ASSERT_TRUE(proc != nullptr && proc->listening());
  auto grpc = Grpc(proc->address());
  ASSERT_NE(grpc, nullptr);
  auto local = InProcess();
  ASSERT_NO_FATAL_FAILURE(Load({grpc.get(), local.get()}));
  Batch b = Batch::Standard();
  ASSERT_TRUE(grpc->AttendBatch(b.items).ok());
  ExpectEqualsSingleAttends(grpc.get(), b, "gRPC");
  Batch c = Batch::Standard();
  ASSERT_TRUE(local->AttendBatch(c.items).ok());
  for (size_t i = 0; i < b.items.size(); ++i) {
    ExpectSamePartials(b.out[i], c.out[i], "gRPC vs in-process item " + std::to_string(i));
  }
  ExpectBadItemsFailAlone(grpc.get(), "gRPC");
  // AppendBatch over gRPC leaves what in-process AppendBatch leaves.
  std::vector<AppendBatchItem> remote = AppendItems();
  ASSERT_TRUE(grpc->AppendBatch(remote).ok());
  std::vector<AppendBatchItem> mine = AppendItems();
  ASSERT_TRUE(local->AppendBatch(mine).ok());
  for (size_t i = 0; i < remote.size(); ++i) {
    EXPECT_EQ(remote[i].status, mine[i].status) << "append item " << i;
  }
  Batch x = Batch::Standard(), y = Batch::Standard();
  ASSERT_TRUE(grpc->AttendBatch(x.items).ok());
  ASSERT_TRUE(local->AttendBatch(y.items).ok());
  for (size_t i = 0; i < x.items.size(); ++i) {
    ExpectSamePartials(x.out[i], y.out[i], "after appends item " + std::to_string(i));
  }
  // Three AttendBatch calls of 6 items and one AppendBatch reached the node.
  ASSERT_FALSE(proc->metrics_address().empty());
  const std::optional<std::string> page = test_support::HttpGetMetrics(proc->metrics_address());
  ASSERT_TRUE(page.has_value());
  const test_support::Samples m = test_support::ParseExposition(*page);
  EXPECT_EQ(test_support::Get(m, "kvr_node_attend_batch_items_count"), 3);
  EXPECT_EQ(test_support::Get(m, "kvr_node_attend_batch_items_sum"), 18);
  EXPECT_EQ(test_support::Get(m, "kvr_node_requests_total",
                              {{"method", "AttendBatch"}, {"code", "OK"}}),
            3);
  EXPECT_EQ(test_support::Get(m, "kvr_node_requests_total",
                              {{"method", "AppendBatch"}, {"code", "OK"}}),
            1);
  EXPECT_TRUE(proc->Stop().has_value());
}

TEST(NodeBatchTest, UcxEqualsSingleAttendsAndGrpc) {
  auto proc = NodeProcess::Start(
      {"--defer_index_build=false", "--threads=2", "--ucx_listen=127.0.0.1:0"});
  ASSERT_TRUE(proc != nullptr && proc->listening());
  auto ucx_or = UcxRetrievalClient::Create(Grpc(proc->address()));
  ASSERT_TRUE(ucx_or.ok()) << ucx_or.status();
  std::unique_ptr<UcxRetrievalClient> ucx = std::move(ucx_or).value();
  if (!ucx->using_ucx()) GTEST_SKIP() << "UCX unavailable here: " << ucx->fallback_reason();
  ASSERT_NO_FATAL_FAILURE(Load({ucx.get()}));
  Batch b = Batch::Standard();
  ASSERT_TRUE(ucx->AttendBatch(b.items).ok());
  ExpectEqualsSingleAttends(ucx.get(), b, "UCX");
  Batch g = Batch::Standard();
  ASSERT_TRUE(ucx->grpc()->AttendBatch(g.items).ok());
  for (size_t i = 0; i < b.items.size(); ++i) {
    ExpectSamePartials(b.out[i], g.out[i], "UCX vs gRPC item " + std::to_string(i));
  }
  ExpectBadItemsFailAlone(ucx.get(), "UCX");
  ucx.reset();
  EXPECT_TRUE(proc->Stop().has_value());
}

// UCX AppendBatch (wire version 4, session 26): the same per-item statuses
// as gRPC's AppendBatch on a twin node, the same state after (AttendBatch
// results bit for bit), and it really travelled over UCX (the node counted
// no gRPC AppendBatch).
TEST(NodeBatchTest, UcxAppendBatchEqualsGrpc) {
  auto over_ucx = NodeProcess::Start(
      {"--defer_index_build=false", "--threads=2", "--ucx_listen=127.0.0.1:0"});
  auto over_grpc = NodeProcess::Start({"--defer_index_build=false", "--threads=2"});
  ASSERT_TRUE(over_ucx != nullptr && over_ucx->listening());
  ASSERT_TRUE(over_grpc != nullptr && over_grpc->listening());
  auto ucx_or = UcxRetrievalClient::Create(Grpc(over_ucx->address()));
  ASSERT_TRUE(ucx_or.ok()) << ucx_or.status();
  std::unique_ptr<UcxRetrievalClient> ucx = std::move(ucx_or).value();
  if (!ucx->using_ucx()) GTEST_SKIP() << "UCX unavailable here: " << ucx->fallback_reason();
  auto grpc = Grpc(over_grpc->address());
  ASSERT_NE(grpc, nullptr);
  ASSERT_NO_FATAL_FAILURE(Load({ucx.get(), grpc.get()}));
  std::vector<AppendBatchItem> via_ucx = AppendItems();
  ASSERT_TRUE(ucx->AppendBatch(via_ucx).ok());
  std::vector<AppendBatchItem> via_grpc = AppendItems();
  ASSERT_TRUE(grpc->AppendBatch(via_grpc).ok());
  ASSERT_EQ(via_ucx.size(), via_grpc.size());
  for (size_t i = 0; i < via_ucx.size(); ++i) {
    EXPECT_EQ(via_ucx[i].status, via_grpc[i].status) << "append item " << i;
    EXPECT_EQ(via_ucx[i].status.ok(), i != 2) << "append item " << i << " " << via_ucx[i].status;
  }
  EXPECT_EQ(via_ucx[2].status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(via_ucx[2].status.message().find("position"), std::string::npos) << via_ucx[2].status;
  // A wrong capability fails its slot alone, as over gRPC.
  std::vector<AppendBatchItem> bad = AppendItems();
  bad.resize(2);
  bad[1].request.capability = Capability(2);
  bad[0].request.first_position = 5;
  std::vector<AppendBatchItem> bad_grpc = bad;
  ASSERT_TRUE(ucx->AppendBatch(bad).ok());
  ASSERT_TRUE(grpc->AppendBatch(bad_grpc).ok());
  EXPECT_EQ(bad[1].status.code(), absl::StatusCode::kPermissionDenied) << bad[1].status;
  for (size_t i = 0; i < bad.size(); ++i) EXPECT_EQ(bad[i].status, bad_grpc[i].status) << i;
  Batch x = Batch::Standard(), y = Batch::Standard();
  ASSERT_TRUE(ucx->AttendBatch(x.items).ok());
  ASSERT_TRUE(grpc->AttendBatch(y.items).ok());
  for (size_t i = 0; i < x.items.size(); ++i) {
    ExpectSamePartials(x.out[i], y.out[i], "after UCX vs gRPC appends item " + std::to_string(i));
  }
  // The UCX node served no AppendBatch over gRPC; the twin served two.
  const std::optional<std::string> page =
      test_support::HttpGetMetrics(over_ucx->metrics_address());
  ASSERT_TRUE(page.has_value());
  EXPECT_EQ(test_support::Get(test_support::ParseExposition(*page), "kvr_node_requests_total",
                              {{"method", "AppendBatch"}, {"code", "OK"}}),
            0);
  const std::optional<std::string> twin =
      test_support::HttpGetMetrics(over_grpc->metrics_address());
  ASSERT_TRUE(twin.has_value());
  EXPECT_EQ(test_support::Get(test_support::ParseExposition(*twin), "kvr_node_requests_total",
                              {{"method", "AppendBatch"}, {"code", "OK"}}),
            2);
  ucx.reset();
  EXPECT_TRUE(over_ucx->Stop().has_value());
  EXPECT_TRUE(over_grpc->Stop().has_value());
}

TEST(NodeBatchTest, LimitsRejectedNamingThem) {
  auto proc = NodeProcess::Start({"--max_batch_items=4", "--max_message_bytes=65536"});
  ASSERT_TRUE(proc != nullptr && proc->listening());
  auto grpc = Grpc(proc->address());
  ASSERT_NE(grpc, nullptr);
  ASSERT_NO_FATAL_FAILURE(Load({grpc.get()}));
  Batch b = Batch::Standard();  // 6 items
  const absl::Status st = grpc->AttendBatch(b.items);
  EXPECT_EQ(st.code(), absl::StatusCode::kResourceExhausted) << st;
  EXPECT_NE(st.message().find("6 items exceed max_batch_items 4"), std::string::npos) << st;
  for (const AttendBatchItem& item : b.items) EXPECT_EQ(item.status, st);
  std::vector<AppendBatchItem> appends = AppendItems();  // 9 items
  const absl::Status ast = grpc->AppendBatch(appends);
  EXPECT_EQ(ast.code(), absl::StatusCode::kResourceExhausted) << ast;
  EXPECT_NE(ast.message().find("max_batch_items 4"), std::string::npos) << ast;
  // Four items fit; four items of 4 x 1024 queries (64 KiB each) do not fit
  // the 64 KiB message cap.
  b.items.resize(4);
  ASSERT_TRUE(grpc->AttendBatch(b.items).ok());
  for (const AttendBatchItem& item : b.items) EXPECT_TRUE(item.status.ok()) << item.status;
  Batch wide;
  for (int i = 0; i < 4; ++i) wide.Add(0, 0, {}, Capability(0), 1024);
  wide.Bind();
  const absl::Status big = grpc->AttendBatch(wide.items);
  EXPECT_EQ(big.code(), absl::StatusCode::kResourceExhausted) << big;
  for (const AttendBatchItem& item : wide.items) EXPECT_EQ(item.status, big);
  // The node still serves.
  Batch again = Batch::Standard();
  again.items.resize(2);
  EXPECT_TRUE(grpc->AttendBatch(again.items).ok());
  EXPECT_TRUE(again.items[1].status.ok()) << again.items[1].status;
  EXPECT_TRUE(proc->Stop().has_value());
}

TEST(NodeBatchTest, KilledNodeFailsOverPerItemTokenIdentical) {
  test_support::StoriesModel model;
  ASSERT_TRUE(model.Load());
  auto reference = InProcess();
  const EngineRun want = RunEngine(model, reference.get(), /*batching=*/true);
  ASSERT_EQ(want.tokens.size(), size_t{kEngineSequences});

  std::vector<std::unique_ptr<NodeProcess>> nodes;
  std::vector<std::string> addresses;
  for (int i = 0; i < 3; ++i) {
    nodes.push_back(
        NodeProcess::Start({"--defer_index_build=false", "--threads=1", "--attend_threads=2"}));
    ASSERT_TRUE(nodes.back() != nullptr && nodes.back()->listening());
    addresses.push_back(nodes.back()->address());
  }
  RetrievalClientOptions o;
  o.replicas = 2;
  auto client = MakeRetrievalClient(absl::StrJoin(addresses, ","), o);
  ASSERT_TRUE(client.ok()) << client.status();
  auto* multi = dynamic_cast<MultiNodeClient*>(client->get());
  ASSERT_NE(multi, nullptr);
  CountingClient counting(client->get());
  bool killed = false;
  const EngineRun got = RunEngine(model, &counting, /*batching=*/true, [&](int step) {
    if (step != kEngineSteps / 2) return;
    const std::optional<int> st = nodes[1]->Stop(SIGKILL);
    killed = st.has_value() && WIFSIGNALED(*st) && WTERMSIG(*st) == SIGKILL;
  });
  EXPECT_TRUE(killed);
  ASSERT_EQ(got.tokens.size(), want.tokens.size());
  for (int i = 0; i < kEngineSequences; ++i) {
    EXPECT_EQ(got.tokens[i], want.tokens[i]) << "sequence " << i;
  }
  EXPECT_EQ(counting.attends.load(), 0);
  EXPECT_EQ(counting.attend_batches.load(),
            int64_t{model.weights->config.n_layers} * kEngineSteps);
  ReplicationStats rs;
  ASSERT_TRUE(multi->GetReplicationStats(&rs));
  EXPECT_EQ(rs.nodes_up, 2);
  EXPECT_GT(rs.attend_failovers_unavailable + rs.attend_failovers_down +
                rs.attend_failovers_deadline,
            0);
  client->reset();  // before the nodes
  nodes.clear();
}

}  // namespace
}  // namespace kvr::retrieval

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--kvr_node" && i + 1 < argc) {
      kvr::test_support::NodeBinary() = argv[++i];
    } else if (a.rfind("--kvr_node=", 0) == 0) {
      kvr::test_support::NodeBinary() = a.substr(11);
    }
  }
  signal(SIGPIPE, SIG_IGN);
  return RUN_ALL_TESTS();
}
