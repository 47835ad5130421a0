// Hostile input against real kvr_node processes (issue 14):
//  * an Append whose last position would pass INT64_MAX is INVALID_ARGUMENT
//    naming first_position, nothing is persisted, and the node restarts
//    from its --data_dir serving everything it acknowledged;
//  * recovery quarantines a sequence with a corrupt record (the node starts,
//    every other sequence is served bit for bit, the quarantined one is
//    NOT_FOUND, counted in Stats and kvr_node_quarantined_sequences, cannot
//    be re-created until dropped, and dropping it deletes its records);
//  * recovery within --memory_budget_bytes: a sequence that does not fit is
//    quarantined, and a restart with room recovers it whole;
//  * upload working memory is reserved at the header (--upload_memory_bytes,
//    the shard itself in --memory_budget_bytes): of two concurrent uploads
//    that each fit alone, the second is RESOURCE_EXHAUSTED naming
//    upload_memory_bytes, the first completes, every reservation is
//    released, and the node keeps serving;
//  * a deadline past --max_deadline_seconds (or none) is INVALID_ARGUMENT;
//  * a large upload's index build does not hold the appends of another
//    sequence (uploads have their own lane, --upload_threads).
// Usage: node_hostile_test --kvr_node PATH [gtest flags]
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <future>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "tests/support/temp_dir.h"
#include "common/tensor.h"
#include "gtest/gtest.h"
#include "kvr/v1/retrieval.grpc.pb.h"
#include "retrieval_node/client/grpc_retrieval_client.h"
#include "retrieval_node/store/shard_store.h"
#include "retrieval_node/wire/proto_convert.h"
#include "rocksdb/db.h"
#include "rocksdb/options.h"
#include "tests/support/metrics_page.h"
#include "tests/support/server_process.h"
#include "tests/support/test_data.h"

namespace kvr::retrieval {
namespace {

using kvr::test_support::NodeProcess;
using kvr::test_support::RandomMatrix;

constexpr int kDim = 64;
constexpr int64_t kMax = std::numeric_limits<int64_t>::max();

// A fresh directory for one test, removed with its contents.
class TempDir : public test_support::TempDir {
 public:
  TempDir() : test_support::TempDir("kvr_hostile") {}
};

SequenceSpec Spec(uint64_t id, IndexType type = IndexType::kFlat) {
  SequenceSpec s;
  s.sequence_id = id;
  s.n_layers = 1;
  s.n_heads = 2;
  s.n_kv_heads = 1;
  s.head_dim = kDim;
  s.index_type = type;
  return s;
}

std::unique_ptr<GrpcRetrievalClient> Connect(const std::string& address) {
  auto client = GrpcRetrievalClient::Create(address, {});
  EXPECT_TRUE(client.ok()) << client.status();
  return client.ok() ? std::move(client).value() : nullptr;
}

std::unique_ptr<v1::RetrievalNode::Stub> Stub(const std::string& address) {
  return v1::RetrievalNode::NewStub(
      grpc::CreateChannel(address, grpc::InsecureChannelCredentials()));
}

void SetDeadline(grpc::ClientContext* context, int seconds = 30) {
  context->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(seconds));
}

// Append over the raw stub (no client-side checks in the way).
grpc::Status RawAppend(v1::RetrievalNode::Stub* stub, uint64_t sequence, int64_t first,
                       ConstMatrixView rows) {
  v1::AppendRequest request;
  request.set_sequence_id(sequence);
  request.set_first_position(first);
  PackMatrix(rows, request.mutable_keys());
  PackMatrix(rows, request.mutable_values());
  v1::AppendResponse response;
  grpc::ClientContext context;
  SetDeadline(&context);
  return stub->Append(&context, request, &response);
}

// Held positions of (sequence, layer 0, kv head 0), read through ListShards.
std::vector<std::pair<int64_t, int64_t>> Ranges(GrpcRetrievalClient* client, uint64_t id) {
  std::vector<std::pair<int64_t, int64_t>> out;
  auto shards = client->ListShards(id);
  EXPECT_TRUE(shards.ok()) << shards.status();
  if (shards.ok()) {
    for (const ShardInfo& s : *shards) out.emplace_back(s.first_position, s.last_position);
  }
  return out;
}

std::vector<std::string> Args(const std::string& dir, std::vector<std::string> more = {}) {
  std::vector<std::string> args = {"--threads=1", "--data_dir=" + dir};
  args.insert(args.end(), more.begin(), more.end());
  return args;
}

void StopCleanly(NodeProcess* node) {
  const std::optional<int> status = node->Stop(SIGTERM);
  ASSERT_TRUE(status.has_value() && WIFEXITED(*status) && WEXITSTATUS(*status) == 0);
}

TEST(NodeHostileTest, AppendPastInt64MaxIsRejectedAndTheNodeRestarts) {
  TempDir dir;
  ASSERT_FALSE(dir.path().empty());
  const Matrix rows = RandomMatrix(4, kDim, 1);
  {
    auto node = NodeProcess::Start(Args(dir.path()));
    ASSERT_TRUE(node != nullptr && node->listening());
    auto client = Connect(node->address());
    ASSERT_NE(client, nullptr);
    auto stub = Stub(node->address());
    ASSERT_TRUE(client->CreateSequence(Spec(1)).ok());
    ASSERT_TRUE(client->CreateSequence(Spec(2)).ok());
    ASSERT_TRUE(RawAppend(stub.get(), 1, 0, rows.view()).ok());
    // The attack of issue 14: first_position 2^63 - 1 with 2 rows.
    grpc::Status st = RawAppend(stub.get(), 2, kMax, rows.view().rows_slice(0, 2));
    EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << st.error_message();
    EXPECT_NE(st.error_message().find("first_position 9223372036854775807 + 2 rows overflows"),
              std::string::npos)
        << st.error_message();
    st = RawAppend(stub.get(), 2, -1, rows.view());
    EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << st.error_message();
    // The highest representable positions are accepted (and persisted).
    ASSERT_TRUE(RawAppend(stub.get(), 2, kMax - 1, rows.view().rows_slice(0, 2)).ok());
    // A good request still works.
    ASSERT_TRUE(RawAppend(stub.get(), 1, 4, rows.view()).ok());
    client.reset();
    ASSERT_NO_FATAL_FAILURE(StopCleanly(node.get()));
  }
  auto node = NodeProcess::Start(Args(dir.path()));
  ASSERT_TRUE(node != nullptr && node->listening());  // before the fix: DATA_LOSS at recovery, no start
  auto client = Connect(node->address());
  ASSERT_NE(client, nullptr);
  EXPECT_EQ(Ranges(client.get(), 1), (std::vector<std::pair<int64_t, int64_t>>{{0, 7}}));
  EXPECT_EQ(Ranges(client.get(), 2), (std::vector<std::pair<int64_t, int64_t>>{{kMax - 1, kMax}}));
  auto stats = client->Stats();
  ASSERT_TRUE(stats.ok());
  EXPECT_EQ(stats->sequences, 2);
  EXPECT_EQ(stats->quarantined_sequences, 0);
  client.reset();
  ASSERT_NO_FATAL_FAILURE(StopCleanly(node.get()));
}

// Flips one byte inside the value at `key` in the store at `dir` (node stopped).
void FlipByte(const std::string& dir, const std::string& key) {
  rocksdb::Options o;
  rocksdb::DB* raw = nullptr;
  ASSERT_TRUE(rocksdb::DB::Open(o, dir, &raw).ok());
  std::unique_ptr<rocksdb::DB> db(raw);
  std::string value;
  ASSERT_TRUE(db->Get(rocksdb::ReadOptions(), key, &value).ok());
  value[value.size() / 2 + 12] ^= 0x20;
  rocksdb::WriteOptions wo;
  wo.sync = true;
  ASSERT_TRUE(db->Put(wo, key, value).ok());
}

double Metric(const NodeProcess& node, const std::string& name) {
  auto page = kvr::test_support::HttpGetMetrics(node.metrics_address());
  EXPECT_TRUE(page.has_value());
  if (!page.has_value()) return -1;
  return kvr::test_support::Get(kvr::test_support::ParseExposition(*page), name, {});
}

// Three sequences with an uploaded chunk and a tail each; returns their ranges.
void Load(GrpcRetrievalClient* client, const std::vector<uint64_t>& ids) {
  for (uint64_t id : ids) {
    ASSERT_TRUE(client->CreateSequence(Spec(id)).ok());
    const Matrix keys = RandomMatrix(100, kDim, 10 + id);
    ShardUpload up;
    up.key = ShardKey{id, 0, 0, 0};
    up.keys = keys.view();
    up.values = keys.view();
    ASSERT_TRUE(client->UploadShard(up).ok());
    AppendRequest a;
    a.sequence_id = id;
    a.first_position = 100;
    a.keys = a.values = keys.view().rows_slice(0, 5);
    ASSERT_TRUE(client->Append(a).ok());
  }
}

TEST(NodeHostileTest, CorruptSequenceIsQuarantinedAndTheRestIsServed) {
  TempDir dir;
  ASSERT_FALSE(dir.path().empty());
  std::vector<std::vector<std::pair<int64_t, int64_t>>> before;
  {
    auto node = NodeProcess::Start(Args(dir.path()));
    ASSERT_TRUE(node != nullptr && node->listening());
    auto client = Connect(node->address());
    ASSERT_NE(client, nullptr);
    ASSERT_NO_FATAL_FAILURE(Load(client.get(), {1, 2, 3}));
    for (uint64_t id : {1, 3}) before.push_back(Ranges(client.get(), id));
    client.reset();
    ASSERT_NO_FATAL_FAILURE(StopCleanly(node.get()));
  }
  ASSERT_NO_FATAL_FAILURE(FlipByte(dir.path(), ShardStore::TailSegmentKey(2, 0, 0, 100)));
  {
    auto node = NodeProcess::Start(Args(dir.path()));
    ASSERT_TRUE(node != nullptr && node->listening());  // before the fix: DATA_LOSS
    auto client = Connect(node->address());
    ASSERT_NE(client, nullptr);
    EXPECT_EQ(Ranges(client.get(), 1), before[0]);
    EXPECT_EQ(Ranges(client.get(), 3), before[1]);
    EXPECT_EQ(client->ListShards(2).status().code(), absl::StatusCode::kNotFound);
    auto stats = client->Stats();
    ASSERT_TRUE(stats.ok());
    EXPECT_EQ(stats->sequences, 2);
    EXPECT_EQ(stats->quarantined_sequences, 1);
    EXPECT_EQ(Metric(*node, "kvr_node_quarantined_sequences"), 1.0);
    // Its id stays reserved until the operator drops it (records kept).
    const absl::Status create = client->CreateSequence(Spec(2));
    EXPECT_EQ(create.code(), absl::StatusCode::kFailedPrecondition) << create;
    EXPECT_NE(create.message().find("quarantined"), std::string::npos) << create;
    EXPECT_NE(create.message().find("tail segment at position 100"), std::string::npos) << create;
    client.reset();
    ASSERT_NO_FATAL_FAILURE(StopCleanly(node.get()));
  }
  // Still quarantined after another restart (nothing was deleted), then dropped.
  auto node = NodeProcess::Start(Args(dir.path()));
  ASSERT_TRUE(node != nullptr && node->listening());
  auto client = Connect(node->address());
  ASSERT_NE(client, nullptr);
  auto stats = client->Stats();
  ASSERT_TRUE(stats.ok());
  EXPECT_EQ(stats->quarantined_sequences, 1);
  ASSERT_TRUE(client->DropSequence(2).ok());
  ASSERT_TRUE(client->CreateSequence(Spec(2)).ok());
  stats = client->Stats();
  ASSERT_TRUE(stats.ok());
  EXPECT_EQ(stats->quarantined_sequences, 0);
  EXPECT_EQ(stats->sequences, 3);
  client.reset();
  ASSERT_NO_FATAL_FAILURE(StopCleanly(node.get()));
}

TEST(NodeHostileTest, RecoveryStaysWithinTheMemoryBudget) {
  TempDir dir;
  ASSERT_FALSE(dir.path().empty());
  int64_t one_sequence = 0;
  std::vector<std::vector<std::pair<int64_t, int64_t>>> before;
  {
    auto node = NodeProcess::Start(Args(dir.path()));
    ASSERT_TRUE(node != nullptr && node->listening());
    auto client = Connect(node->address());
    ASSERT_NE(client, nullptr);
    ASSERT_NO_FATAL_FAILURE(Load(client.get(), {1}));
    one_sequence = static_cast<int64_t>(Metric(*node, "kvr_node_memory_used_bytes"));
    ASSERT_NO_FATAL_FAILURE(Load(client.get(), {2, 3}));
    for (uint64_t id : {1, 2, 3}) before.push_back(Ranges(client.get(), id));
    client.reset();
    ASSERT_NO_FATAL_FAILURE(StopCleanly(node.get()));
  }
  ASSERT_GT(one_sequence, 0);
  {
    // Room for two of the three: the third (in id order) is quarantined.
    const int64_t budget = one_sequence * 2 + one_sequence / 2;
    auto node = NodeProcess::Start(
        Args(dir.path(), {"--memory_budget_bytes=" + std::to_string(budget)}));
    ASSERT_TRUE(node != nullptr && node->listening());
    auto client = Connect(node->address());
    ASSERT_NE(client, nullptr);
    auto stats = client->Stats();
    ASSERT_TRUE(stats.ok());
    EXPECT_EQ(stats->sequences, 2);
    EXPECT_EQ(stats->quarantined_sequences, 1);
    EXPECT_LE(Metric(*node, "kvr_node_memory_used_bytes"), static_cast<double>(budget));
    EXPECT_EQ(Ranges(client.get(), 1), before[0]);
    EXPECT_EQ(Ranges(client.get(), 2), before[1]);
    EXPECT_EQ(client->ListShards(3).status().code(), absl::StatusCode::kNotFound);
    client.reset();
    ASSERT_NO_FATAL_FAILURE(StopCleanly(node.get()));
  }
  // With room again, nothing was lost.
  auto node = NodeProcess::Start(Args(dir.path()));
  ASSERT_TRUE(node != nullptr && node->listening());
  auto client = Connect(node->address());
  ASSERT_NE(client, nullptr);
  for (uint64_t id : {1, 2, 3}) EXPECT_EQ(Ranges(client.get(), id), before[id - 1]) << id;
  client.reset();
  ASSERT_NO_FATAL_FAILURE(StopCleanly(node.get()));
}

// An UploadShard stream over the raw stub: the header, then (later) the data.
class RawUpload {
 public:
  RawUpload(v1::RetrievalNode::Stub* stub, uint64_t sequence, int64_t n_keys)
      : n_keys_(n_keys) {
    SetDeadline(&context_, 60);
    writer_ = stub->UploadShard(&context_, &response_);
    v1::UploadShardRequest header;
    v1::ShardHeader* h = header.mutable_header();
    h->mutable_key()->set_sequence_id(sequence);
    h->set_n_keys(n_keys);
    h->set_head_dim(kDim);
    h->set_key_dtype(v1::DTYPE_F32);
    h->set_value_dtype(v1::DTYPE_F32);
    write_ok_ = writer_->Write(header);
  }
  bool header_sent() const { return write_ok_; }
  // Sends the keys and values, half-closes, and returns the call's status.
  grpc::Status Finish(uint64_t seed) {
    const Matrix keys = RandomMatrix(static_cast<size_t>(n_keys_), kDim, seed);
    v1::UploadShardRequest data;
    const auto* bytes = reinterpret_cast<const char*>(keys.data.data());
    data.mutable_data()->set_keys(bytes, keys.data.size() * sizeof(float));
    data.mutable_data()->set_values(bytes, keys.data.size() * sizeof(float));
    writer_->Write(data);  // fails harmlessly when the node already finished the call
    return Close();
  }
  grpc::Status Close() {
    writer_->WritesDone();
    return writer_->Finish();
  }
  const v1::UploadShardResponse& response() const { return response_; }

 private:
  int64_t n_keys_;
  grpc::ClientContext context_;
  v1::UploadShardResponse response_;
  std::unique_ptr<grpc::ClientWriter<v1::UploadShardRequest>> writer_;
  bool write_ok_ = false;
};

v1::StatsResponse RawStats(v1::RetrievalNode::Stub* stub) {
  grpc::ClientContext context;
  SetDeadline(&context);
  v1::StatsResponse response;
  const grpc::Status st = stub->Stats(&context, v1::StatsRequest(), &response);
  EXPECT_TRUE(st.ok()) << st.error_message();
  return response;
}

// Polls the node's Stats until upload_memory_used_bytes >= `at_least`
// (bounded: 30 s); returns the last value seen.
int64_t WaitForUploadMemory(v1::RetrievalNode::Stub* stub, int64_t at_least) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  int64_t used = 0;
  while (std::chrono::steady_clock::now() < deadline) {
    used = RawStats(stub).upload_memory_used_bytes();
    if (used >= at_least) return used;
    std::this_thread::yield();
  }
  return used;
}

TEST(NodeHostileTest, UploadWorkingMemoryIsReservedInTheBudget) {
  // n keys of dim 64 f32: 256,000 bytes of keys and as many of values on the
  // wire, the same again as fp32 copies and as the persistence copy: 1.536
  // MB of working memory per upload (plus its ~520 KB shard in
  // --memory_budget_bytes). The working budget takes one upload, not two.
  constexpr int64_t kKeys = 1000;
  constexpr int64_t kWorking = 6 * kKeys * kDim * 4;
  constexpr int64_t kUploadBudget = 2'000'000;
  constexpr int64_t kBudget = 4'000'000;
  auto node = NodeProcess::Start({"--threads=1", "--memory_budget_bytes=" + std::to_string(kBudget),
                                  "--upload_memory_bytes=" + std::to_string(kUploadBudget)});
  ASSERT_TRUE(node != nullptr && node->listening());
  auto client = Connect(node->address());
  ASSERT_NE(client, nullptr);
  auto stub = Stub(node->address());
  ASSERT_TRUE(client->CreateSequence(Spec(1)).ok());
  ASSERT_TRUE(client->CreateSequence(Spec(2)).ok());

  RawUpload first(stub.get(), 1, kKeys);
  ASSERT_TRUE(first.header_sent());
  // The node has admitted the first stream once its reservation shows.
  EXPECT_EQ(WaitForUploadMemory(stub.get(), kWorking), kWorking);

  RawUpload second(stub.get(), 2, kKeys);
  const grpc::Status rejected = second.Finish(2);
  EXPECT_EQ(rejected.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED)
      << rejected.error_message();
  EXPECT_NE(rejected.error_message().find("upload_memory_bytes 2000000"), std::string::npos)
      << rejected.error_message();
  EXPECT_EQ(RawStats(stub.get()).upload_memory_used_bytes(), kWorking);  // nothing leaked

  const grpc::Status accepted = first.Finish(1);
  ASSERT_TRUE(accepted.ok()) << accepted.error_message();
  EXPECT_EQ(first.response().shard().n_keys(), kKeys);
  // Every reservation went back: what is left is the shard itself.
  v1::StatsResponse stats = RawStats(stub.get());
  EXPECT_EQ(stats.upload_memory_used_bytes(), 0);
  EXPECT_EQ(stats.upload_memory_bytes(), kUploadBudget);
  EXPECT_EQ(stats.memory_used_bytes(), stats.memory_bytes());
  EXPECT_LE(stats.memory_used_bytes(), kBudget);
  // The node keeps serving: the rejected upload now fits and goes through.
  RawUpload retry(stub.get(), 2, kKeys);
  const grpc::Status retried = retry.Finish(2);
  EXPECT_TRUE(retried.ok()) << retried.error_message();
  stats = RawStats(stub.get());
  EXPECT_EQ(stats.sequences(), 2);
  EXPECT_EQ(stats.shards(), 2);
  EXPECT_EQ(stats.upload_memory_used_bytes(), 0);
  EXPECT_EQ(Metric(*node, "kvr_node_upload_memory_used_bytes"), 0.0);
  EXPECT_LE(Metric(*node, "kvr_node_memory_used_bytes"), static_cast<double>(kBudget));
  client.reset();
  ASSERT_NO_FATAL_FAILURE(StopCleanly(node.get()));
}

// Head-of-line: with one control thread and one upload thread, two graph
// uploads (to two sequences) take turns on the upload lane. Once the first
// has replied the second is building; an Append to a third sequence issued
// then completes before that build does. Before uploads had their own lane
// the append queued behind the build on the shared control pool.
TEST(NodeHostileTest, UploadBuildsDoNotDelayOtherSequencesAppends) {
  auto node = NodeProcess::Start({"--threads=1", "--control_threads=1", "--upload_threads=1"});
  ASSERT_TRUE(node != nullptr && node->listening());
  auto admin = Connect(node->address());
  std::vector<std::unique_ptr<GrpcRetrievalClient>> uploaders;
  uploaders.push_back(Connect(node->address()));
  uploaders.push_back(Connect(node->address()));
  ASSERT_TRUE(admin != nullptr && uploaders[0] != nullptr && uploaders[1] != nullptr);
  ASSERT_TRUE(admin->CreateSequence(Spec(1, IndexType::kGraph)).ok());
  ASSERT_TRUE(admin->CreateSequence(Spec(2, IndexType::kGraph)).ok());
  ASSERT_TRUE(admin->CreateSequence(Spec(3)).ok());
  constexpr size_t kKeys = 20000;
  const Matrix keys = RandomMatrix(kKeys, kDim, 7);
  // Whichever upload replies first fulfils `first` with its index.
  std::promise<int> first;
  std::atomic<bool> first_set{false};
  const auto upload = [&](int i) {
    ShardUpload up;
    up.key = ShardKey{static_cast<uint64_t>(1 + i), 0, 0, 0};
    up.keys = keys.view();
    up.values = keys.view();
    const absl::Status st = uploaders[static_cast<size_t>(i)]->UploadShard(up);
    if (!first_set.exchange(true)) first.set_value(i);
    return st;
  };
  std::vector<std::future<absl::Status>> uploads;
  uploads.push_back(std::async(std::launch::async, upload, 0));
  uploads.push_back(std::async(std::launch::async, upload, 1));
  const int done_first = first.get_future().get();
  std::future<absl::Status>& building = uploads[static_cast<size_t>(1 - done_first)];
  const auto start = std::chrono::steady_clock::now();
  AppendRequest ap;
  ap.sequence_id = 3;
  ap.keys = ap.values = keys.view().rows_slice(0, 4);
  const absl::Status appended = admin->Append(ap);
  const double append_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  ASSERT_TRUE(appended.ok()) << appended;
  const bool still_building =
      building.wait_for(std::chrono::seconds(0)) != std::future_status::ready;
  const absl::Status second_done = building.get();
  const double build_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const absl::Status first_done = uploads[static_cast<size_t>(done_first)].get();
  ASSERT_TRUE(first_done.ok()) << first_done;
  ASSERT_TRUE(second_done.ok()) << second_done;
  std::printf("append %.4f s while the other upload built for %.3f s more\n", append_seconds,
              build_seconds);
  EXPECT_TRUE(still_building) << "the append waited for the upload's build";
  admin.reset();
  uploaders.clear();
  ASSERT_NO_FATAL_FAILURE(StopCleanly(node.get()));
}

// Deadlines: a call without one, or with one past --max_deadline_seconds
// (a year, as in issue 14), is INVALID_ARGUMENT naming the limit, for
// unary calls and the upload stream; a normal deadline works.
TEST(NodeHostileTest, DeadlinesBeyondTheCapAreRejected) {
  auto node = NodeProcess::Start({"--threads=1", "--max_deadline_seconds=60"});
  ASSERT_TRUE(node != nullptr && node->listening());
  auto stub = Stub(node->address());
  const auto stats = [&](std::optional<std::chrono::seconds> deadline) {
    grpc::ClientContext context;
    if (deadline.has_value()) context.set_deadline(std::chrono::system_clock::now() + *deadline);
    v1::StatsResponse response;
    return stub->Stats(&context, v1::StatsRequest(), &response);
  };
  grpc::Status st = stats(std::chrono::hours(24 * 365));
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << st.error_message();
  EXPECT_NE(st.error_message().find("exceeds max_deadline_seconds 60"), std::string::npos)
      << st.error_message();
  st = stats(std::nullopt);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << st.error_message();
  EXPECT_NE(st.error_message().find("no deadline"), std::string::npos) << st.error_message();
  {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::hours(24 * 365));
    v1::UploadShardResponse response;
    auto writer = stub->UploadShard(&context, &response);
    writer->WritesDone();
    st = writer->Finish();
    EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << st.error_message();
    EXPECT_NE(st.error_message().find("max_deadline_seconds"), std::string::npos)
        << st.error_message();
  }
  st = stats(std::chrono::seconds(30));
  EXPECT_TRUE(st.ok()) << st.error_message();
  stub.reset();
  ASSERT_NO_FATAL_FAILURE(StopCleanly(node.get()));
}

}  // namespace
}  // namespace kvr::retrieval
