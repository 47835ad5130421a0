// MultiNodeClient with R replicas over in-process nodes: which node gets
// which write and which shards of an Attend, failover within one Attend,
// staleness, the sync orchestration (in sync only when the synced positions
// equal the issued ones) and drops a down node missed. The nodes are
// FakeNodes: an InProcessRetrievalClient that can be "down" (every call
// UNAVAILABLE), fail Attends only, and records what it was sent.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/attention.h"
#include "gtest/gtest.h"
#include "retrieval_node/client/in_process_client.h"
#include "retrieval_node/client/multi_node_client.h"
#include "tests/support/replica_workload.h"
#include "services/infra/placement/placement.h"

namespace kvr::retrieval {
namespace {

using namespace test_support::replica_workload;  // NOLINT(build/namespaces): test workload

// Fill, asserting success.
void FillOk(RetrievalClient& client, uint64_t seq) { ASSERT_TRUE(Fill(client, seq).ok()); }

// A node that keeps each (sequence, kv head, chunk) in its own in-process
// core, so it can serve AttendRequest::shards exactly (the branch's NodeCore
// ignores the list): an Attend searches the listed shards (all it holds when
// the list is empty) and merges their partials.
class FakeNode final : public RetrievalClient {
 public:
  std::atomic<bool> down{false};               // every call: UNAVAILABLE
  std::atomic<bool> attend_unavailable{false};  // Attends only
  // Answers SyncShards (default: Unimplemented, as the in-process client).
  std::function<absl::StatusOr<SyncResult>(const SyncRequest&)> on_sync;

  struct Attend {
    int32_t layer;
    std::vector<HeadChunkRef> shards;  // empty: everything it holds
  };
  std::vector<Attend> attends() {
    std::lock_guard<std::mutex> lock(mu_);
    return attends_;
  }
  std::vector<ShardKey> uploads() {
    std::lock_guard<std::mutex> lock(mu_);
    return uploads_;
  }
  int appends() {
    std::lock_guard<std::mutex> lock(mu_);
    return appends_;
  }
  std::vector<uint64_t> drops() {
    std::lock_guard<std::mutex> lock(mu_);
    return drops_;
  }
  std::vector<SyncRequest> syncs() {
    std::lock_guard<std::mutex> lock(mu_);
    return syncs_;
  }
  void ClearLog() {
    std::lock_guard<std::mutex> lock(mu_);
    attends_.clear();
    uploads_.clear();
    appends_ = 0;
  }

  absl::Status CreateSequence(const SequenceSpec& spec) override {
    if (down) return Down();
    std::lock_guard<std::mutex> lock(mu_);
    if (!specs_.emplace(spec.sequence_id, spec).second) {
      return absl::AlreadyExistsError(absl::StrCat("sequence ", spec.sequence_id));
    }
    return absl::OkStatus();
  }
  absl::Status UploadShard(const ShardUpload& upload) override {
    if (down) return Down();
    std::lock_guard<std::mutex> lock(mu_);
    uploads_.push_back(upload.key);
    KVR_ASSIGN_OR_RETURN(RetrievalClient * sub,
                         Sub(upload.key.sequence_id, upload.key.kv_head, upload.key.chunk));
    KVR_RETURN_IF_ERROR(sub->UploadShard(upload));
    int32_t& last = last_chunk_[{upload.key.sequence_id, upload.key.layer, upload.key.kv_head}];
    last = std::max(last, upload.key.chunk);
    return absl::OkStatus();
  }
  absl::Status Append(const AppendRequest& request) override {
    if (down) return Down();
    std::lock_guard<std::mutex> lock(mu_);
    ++appends_;
    const int32_t chunk = last_chunk_[{request.sequence_id, request.layer, request.kv_head}];
    KVR_ASSIGN_OR_RETURN(RetrievalClient * sub, Sub(request.sequence_id, request.kv_head, chunk));
    return sub->Append(request);
  }
  void AttendAsync(const AttendRequest& request, PartialsView out, AttendStats* stats,
                   StatusCallback done) override {
    std::vector<RetrievalClient*> subs;
    {
      std::lock_guard<std::mutex> lock(mu_);
      attends_.push_back({request.layer, {request.shards.begin(), request.shards.end()}});
      if (!down && !attend_unavailable) {
        if (request.shards.empty()) {
          for (auto& [key, sub] : subs_) {
            if (std::get<0>(key) == request.sequence_id) subs.push_back(sub.get());
          }
        } else {
          for (const HeadChunkRef& s : request.shards) {
            auto it = subs_.find({request.sequence_id, s.kv_head, s.chunk});
            if (it == subs_.end()) {
              done(absl::NotFoundError(absl::StrCat("shard ", s.kv_head, "/", s.chunk)));
              return;
            }
            subs.push_back(it->second.get());
          }
        }
      }
    }
    if (down || attend_unavailable) {
      done(Down());
      return;
    }
    SetEmpty(out);
    AttendStats total;
    Partials part(out.size(), out.dim());
    AttendRequest whole = request;  // each core holds one shard of the list
    whole.shards = {};
    for (RetrievalClient* sub : subs) {
      AttendStats one;
      if (absl::Status st = sub->Attend(whole, part.view(), &one); !st.ok()) {
        done(st);
        return;
      }
      MergeInto(out, part.view());
      total.shards_searched += one.shards_searched;
    }
    if (stats != nullptr) *stats = total;
    done(absl::OkStatus());
  }
  absl::Status DropSequence(uint64_t sequence_id) override {
    if (down) return Down();
    std::lock_guard<std::mutex> lock(mu_);
    drops_.push_back(sequence_id);
    specs_.erase(sequence_id);
    std::erase_if(subs_, [&](const auto& kv) { return std::get<0>(kv.first) == sequence_id; });
    return absl::OkStatus();
  }
  absl::StatusOr<NodeStats> Stats() override {
    if (down) return Down();
    return NodeStats{};
  }
  absl::StatusOr<SyncResult> SyncShards(const SyncRequest& request) override {
    if (down) return Down();
    {
      std::lock_guard<std::mutex> lock(mu_);
      syncs_.push_back(request);
    }
    if (on_sync) return on_sync(request);
    return RetrievalClient::SyncShards(request);
  }

 private:
  static absl::Status Down() { return absl::UnavailableError("fake node is down"); }
  // The core of (sequence, kv head, chunk), made on first use. mu_ held.
  absl::StatusOr<RetrievalClient*> Sub(uint64_t seq, int32_t kv_head, int32_t chunk) {
    auto spec = specs_.find(seq);
    if (spec == specs_.end()) return absl::NotFoundError(absl::StrCat("sequence ", seq));
    std::unique_ptr<InProcessRetrievalClient>& sub = subs_[{seq, kv_head, chunk}];
    if (sub == nullptr) {
      KVR_ASSIGN_OR_RETURN(sub, InProcessRetrievalClient::Create());
      KVR_RETURN_IF_ERROR(sub->CreateSequence(spec->second));
    }
    return sub.get();
  }

  std::mutex mu_;
  std::map<uint64_t, SequenceSpec> specs_;
  std::map<std::tuple<uint64_t, int32_t, int32_t>, std::unique_ptr<InProcessRetrievalClient>>
      subs_;
  std::map<std::tuple<uint64_t, int32_t, int32_t>, int32_t> last_chunk_;  // (seq, layer, head)
  std::vector<Attend> attends_;
  std::vector<ShardKey> uploads_;
  int appends_ = 0;
  std::vector<uint64_t> drops_;
  std::vector<SyncRequest> syncs_;
};

// Polls `cond` until it holds or 5 s passed.
template <typename F>
bool Eventually(F cond) {
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  while (std::chrono::steady_clock::now() < give_up) {
    if (cond()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));  // polling, not synchronisation
  }
  return cond();
}

class ReplicasTest : public ::testing::Test {
 protected:
  // `n` fake nodes ("n0", "n1", ...) behind one MultiNodeClient with R = r.
  void Build(int n, int r) {
    std::vector<placement::NodeInfo> infos;
    std::vector<std::unique_ptr<RetrievalClient>> clients;
    for (int i = 0; i < n; ++i) {
      auto f = std::make_unique<FakeNode>();
      fakes_.push_back(f.get());
      clients.push_back(std::move(f));
      infos.push_back({"n" + std::to_string(i), "127.0.0.1:" + std::to_string(7000 + i)});
    }
    auto p = placement::Placement::Create(infos, 1);
    ASSERT_TRUE(p.ok());
    placement_ = std::make_unique<placement::Placement>(*std::move(p));
    MultiNodeOptions o;
    o.replicas = r;
    o.sync_backoff = absl::Milliseconds(10);
    auto m = MultiNodeClient::Create(infos, std::move(clients), nullptr, o);
    ASSERT_TRUE(m.ok()) << m.status();
    multi_ = *std::move(m);
  }

  std::vector<size_t> Owners(uint64_t seq, int layer, int head, int chunk, int r) const {
    std::vector<size_t> out(static_cast<size_t>(r));
    placement_->NodesFor({seq, static_cast<uint32_t>(layer), static_cast<uint32_t>(head),
                          static_cast<uint32_t>(chunk)},
                         std::span<size_t>(out));
    return out;
  }

  // The single-node reference for the same writes.
  static Partials Reference(int layer, int64_t appended_rows) {
    auto one = InProcessRetrievalClient::Create();
    KVR_CHECK(one.ok());
    KVR_CHECK((*one)->CreateSequence(Spec(1)).ok());
    KVR_CHECK(Fill(**one, 1).ok());
    if (appended_rows > 0) {
      KVR_CHECK(AppendAll(**one, 1, kChunks * kRows, static_cast<int>(appended_rows)).ok());
    }
    auto p = AttendLayer(**one, 1, layer);
    KVR_CHECK(p.ok());
    return *std::move(p);
  }

  void MarkDown(int i) {
    fakes_[static_cast<size_t>(i)]->down = true;
    multi_->SetNodeUp("n" + std::to_string(i), false);
  }

  std::vector<FakeNode*> fakes_;
  std::unique_ptr<placement::Placement> placement_;
  std::unique_ptr<MultiNodeClient> multi_;
};

// Uploads reach exactly the R owners of each chunk; an Attend asks each
// shard of the layer from exactly one node, its primary, in one request per
// node.
TEST_F(ReplicasTest, WritesGoToEveryOwnerAttendToThePrimaryOnce) {
  Build(3, 2);
  ASSERT_TRUE(multi_->CreateSequence(Spec(1)).ok());
  FillOk(*multi_, 1);
  std::map<std::pair<size_t, int>, int> uploads;  // (node, shard index) -> count
  for (size_t n = 0; n < 3; ++n) {
    for (const ShardKey& k : fakes_[n]->uploads()) {
      const std::vector<size_t> owners = Owners(1, k.layer, k.kv_head, k.chunk, 2);
      EXPECT_NE(std::find(owners.begin(), owners.end(), n), owners.end()) << k.DebugString();
      ++uploads[{n, (k.layer * kKvHeads + k.kv_head) * kChunks + k.chunk}];
    }
  }
  EXPECT_EQ(uploads.size(), static_cast<size_t>(kLayers * kKvHeads * kChunks * 2));

  for (FakeNode* f : fakes_) f->ClearLog();
  ASSERT_TRUE(AttendLayer(*multi_, 1, 1).ok());
  std::set<std::pair<int, int>> seen;
  for (size_t n = 0; n < 3; ++n) {
    const auto attends = fakes_[n]->attends();
    ASSERT_LE(attends.size(), 1u) << "node " << n;
    if (attends.empty()) continue;
    EXPECT_EQ(attends[0].layer, 1);
    ASSERT_FALSE(attends[0].shards.empty()) << "R = 2 over 3 nodes lists shards";
    for (const HeadChunkRef& s : attends[0].shards) {
      EXPECT_TRUE(seen.insert({s.kv_head, s.chunk}).second) << "attended twice";
      EXPECT_EQ(Owners(1, 1, s.kv_head, s.chunk, 2)[0], n) << "not its primary";
    }
  }
  EXPECT_EQ(seen.size(), static_cast<size_t>(kKvHeads * kChunks));
}

// With R = 1 nothing changes: one plain request (no shard list) per node
// holding keys of the layer, and the result equals one node's.
TEST_F(ReplicasTest, OneReplicaSendsPlainRequestsWithUnchangedResults) {
  Build(3, 1);
  ASSERT_TRUE(multi_->CreateSequence(Spec(1)).ok());
  FillOk(*multi_, 1);
  ASSERT_TRUE(AppendAll(*multi_, 1, kChunks * kRows, 5).ok());
  auto got = AttendLayer(*multi_, 1, 0);
  ASSERT_TRUE(got.ok()) << got.status();
  for (FakeNode* f : fakes_) {
    for (const auto& a : f->attends()) EXPECT_TRUE(a.shards.empty());
  }
  ExpectSamePartials(*got, Reference(0, 5));
}

// R = 2 over two nodes, one goes down: uploads and appends still succeed
// (the down node is stale), every Attend goes to the survivor as one plain
// request, and results equal the single-node reference.
TEST_F(ReplicasTest, OneOfTwoDownKeepsServingIdenticalResults) {
  Build(2, 2);
  ASSERT_TRUE(multi_->CreateSequence(Spec(1)).ok());
  FillOk(*multi_, 1);
  MarkDown(1);
  ASSERT_TRUE(AppendAll(*multi_, 1, kChunks * kRows, 3).ok());
  EXPECT_FALSE(multi_->InSync(1, "n1"));
  EXPECT_TRUE(multi_->InSync(1, "n0"));
  EXPECT_EQ(fakes_[1]->appends(), 0);
  for (int layer = 0; layer < kLayers; ++layer) {
    fakes_[0]->ClearLog();
    auto got = AttendLayer(*multi_, 1, layer);
    ASSERT_TRUE(got.ok()) << got.status();
    const auto attends = fakes_[0]->attends();
    ASSERT_EQ(attends.size(), 1u);
    EXPECT_TRUE(attends[0].shards.empty()) << "the survivor owns every shard: plain request";
    ExpectSamePartials(*got, Reference(layer, 3));
  }
  ReplicationStats st;
  ASSERT_TRUE(multi_->GetReplicationStats(&st));
  EXPECT_EQ(st.nodes, 2);
  EXPECT_EQ(st.nodes_up, 1);
  EXPECT_EQ(st.under_replicated_shards, kLayers * kKvHeads * kChunks);
  EXPECT_GT(st.attend_failovers_down, 0);
}

// A node that answers an Attend UNAVAILABLE while its health still says up:
// its shards go to their second owner within the same Attend, the result is
// complete, and the node is suspected (not live) for a while.
TEST_F(ReplicasTest, AttendFailsOverWithinTheCall) {
  Build(2, 2);
  ASSERT_TRUE(multi_->CreateSequence(Spec(1)).ok());
  FillOk(*multi_, 1);
  fakes_[0]->attend_unavailable = true;
  AttendStats stats;
  auto got = AttendLayer(*multi_, 1, 0, &stats);
  ASSERT_TRUE(got.ok()) << got.status();
  ExpectSamePartials(*got, Reference(0, 0));
  // n1 answered its own shards and then n0's (one re-sent request).
  std::set<std::pair<int, int>> second;
  for (const auto& a : fakes_[1]->attends()) {
    for (const HeadChunkRef& s : a.shards) second.insert({s.kv_head, s.chunk});
  }
  std::set<std::pair<int, int>> first;
  for (const auto& a : fakes_[0]->attends()) {
    for (const HeadChunkRef& s : a.shards) first.insert({s.kv_head, s.chunk});
  }
  for (const auto& s : first) EXPECT_TRUE(second.count(s)) << "not re-routed";
  EXPECT_EQ(stats.shards_searched, kKvHeads * kChunks);
  ReplicationStats st;
  ASSERT_TRUE(multi_->GetReplicationStats(&st));
  EXPECT_EQ(st.attend_failovers_unavailable, 1);
  EXPECT_FALSE(multi_->IsLive("n0"));
}

// Every owner of a shard gone: the Attend (and a write) fails Unavailable
// naming the shard; a refusal from every owner is the refusal itself and
// marks nobody stale.
TEST_F(ReplicasTest, NoLiveOwnerIsUnavailableNamingTheShard) {
  Build(2, 2);
  ASSERT_TRUE(multi_->CreateSequence(Spec(1)).ok());
  FillOk(*multi_, 1);
  const Matrix k = Random(4, kDim + 1, 5);
  AppendRequest bad;
  bad.sequence_id = 1;
  bad.layer = 0;
  bad.kv_head = 0;
  bad.first_position = kChunks * kRows;
  bad.keys = k.view();
  bad.values = k.view();
  const absl::Status refused = multi_->Append(bad);
  EXPECT_TRUE(absl::IsInvalidArgument(refused)) << refused;
  EXPECT_TRUE(multi_->InSync(1, "n0") && multi_->InSync(1, "n1"));

  MarkDown(0);
  MarkDown(1);
  auto got = AttendLayer(*multi_, 1, 0);
  ASSERT_TRUE(absl::IsUnavailable(got.status())) << got.status();
  EXPECT_NE(got.status().message().find("shard"), std::string::npos) << got.status();
  const absl::Status w = AppendAll(*multi_, 1, kChunks * kRows, 1);
  EXPECT_TRUE(absl::IsUnavailable(w)) << w;
  EXPECT_NE(w.message().find("no live in-sync replica"), std::string::npos) << w;
}

// New sequences are placed on live nodes only, with R reduced to what is
// live (and counted under-replicated).
TEST_F(ReplicasTest, NewSequencesGoToLiveNodesOnly) {
  Build(3, 2);
  MarkDown(1);
  MarkDown(2);
  ASSERT_TRUE(multi_->CreateSequence(Spec(7)).ok());
  FillOk(*multi_, 7);
  EXPECT_EQ(fakes_[0]->uploads().size(), static_cast<size_t>(kLayers * kKvHeads * kChunks));
  EXPECT_TRUE(fakes_[1]->uploads().empty());
  EXPECT_TRUE(fakes_[2]->uploads().empty());
  ReplicationStats st;
  ASSERT_TRUE(multi_->GetReplicationStats(&st));
  EXPECT_EQ(st.under_replicated_shards, kLayers * kKvHeads * kChunks);
  auto got = AttendLayer(*multi_, 7, 1);
  ASSERT_TRUE(got.ok()) << got.status();
}

// A returning node is stale and is synced from a live in-sync owner with
// exactly the shards it owns; it is in sync again only when the sync's last
// positions equal the ones issued (a short answer means another round).
TEST_F(ReplicasTest, ReturningNodeSyncsBeforeServing) {
  Build(2, 2);
  ASSERT_TRUE(multi_->CreateSequence(Spec(1)).ok());
  FillOk(*multi_, 1);
  MarkDown(1);
  ASSERT_TRUE(AppendAll(*multi_, 1, kChunks * kRows, 4).ok());  // n1 misses these
  const int64_t last = kChunks * kRows + 3;
  std::atomic<int> rounds{0};
  fakes_[1]->on_sync = [&](const SyncRequest& r) -> absl::StatusOr<SyncResult> {
    SyncResult res;
    res.last_positions.assign(kLayers * kKvHeads, last);
    // The first answer is one row short: not in sync yet.
    if (rounds.fetch_add(1) == 0) res.last_positions[0] = last - 1;
    res.keys_copied = 4 * static_cast<int64_t>(r.shards.size());
    return res;
  };
  fakes_[1]->down = false;
  multi_->SetNodeUp("n1", true);
  ASSERT_TRUE(Eventually([&] { return multi_->InSync(1, "n1"); }));
  EXPECT_GE(rounds.load(), 2);
  const auto syncs = fakes_[1]->syncs();
  ASSERT_FALSE(syncs.empty());
  EXPECT_EQ(syncs[0].source_address, "127.0.0.1:7000");
  EXPECT_EQ(syncs[0].spec.sequence_id, 1u);
  EXPECT_EQ(syncs[0].shards.size(), static_cast<size_t>(kLayers * kKvHeads * kChunks));
  ReplicationStats st;
  ASSERT_TRUE(multi_->GetReplicationStats(&st));
  EXPECT_GE(st.syncs_succeeded, 2);
  EXPECT_EQ(st.under_replicated_shards, 0);
  // Back in service: writes reach it again and Attends use it.
  const int before = fakes_[1]->appends();
  ASSERT_TRUE(AppendAll(*multi_, 1, kChunks * kRows + 4, 1).ok());
  EXPECT_EQ(fakes_[1]->appends(), before + kLayers * kKvHeads);
}

// A node whose sync keeps failing stays out of service (writes and Attends
// skip it) and the failures are counted.
TEST_F(ReplicasTest, FailedSyncKeepsNodeOut) {
  Build(2, 2);
  ASSERT_TRUE(multi_->CreateSequence(Spec(1)).ok());
  FillOk(*multi_, 1);
  MarkDown(1);
  fakes_[1]->down = false;
  multi_->SetNodeUp("n1", true);  // the in-process node answers Unimplemented
  ReplicationStats st;
  ASSERT_TRUE(Eventually([&] {
    multi_->GetReplicationStats(&st);
    return st.syncs_failed >= 2;
  }));
  EXPECT_FALSE(multi_->InSync(1, "n1"));
  fakes_[1]->ClearLog();
  ASSERT_TRUE(AttendLayer(*multi_, 1, 0).ok());
  EXPECT_TRUE(fakes_[1]->attends().empty());
}

// A sequence dropped while a node was down is dropped there when it returns.
TEST_F(ReplicasTest, DropWhileDownIsDeliveredOnReturn) {
  Build(2, 2);
  ASSERT_TRUE(multi_->CreateSequence(Spec(3)).ok());
  FillOk(*multi_, 3);
  MarkDown(1);
  ASSERT_TRUE(multi_->DropSequence(3).ok());
  EXPECT_EQ(fakes_[0]->drops(), std::vector<uint64_t>{3});
  EXPECT_TRUE(fakes_[1]->drops().empty());
  fakes_[1]->down = false;
  multi_->SetNodeUp("n1", true);
  ASSERT_TRUE(Eventually([&] { return fakes_[1]->drops() == std::vector<uint64_t>{3}; }));
}

// CreateSequence: a node failing with a transport error is left stale
// (fewer than R failed: every shard keeps an in-sync owner, writes work).
TEST_F(ReplicasTest, CreateSurvivesFewerThanRTransportFailures) {
  Build(3, 2);
  fakes_[2]->down = true;  // health still says up: only the call fails
  ASSERT_TRUE(multi_->CreateSequence(Spec(1)).ok());
  EXPECT_FALSE(multi_->InSync(1, "n2"));
  EXPECT_TRUE(multi_->InSync(1, "n0"));
  FillOk(*multi_, 1);
  ASSERT_TRUE(AppendAll(*multi_, 1, kChunks * kRows, 2).ok());
  auto got = AttendLayer(*multi_, 1, 1);
  ASSERT_TRUE(got.ok()) << got.status();
  ExpectSamePartials(*got, Reference(1, 2));
}

// R transport failures fail CreateSequence with that error, and the node
// that accepted drops the sequence again.
TEST_F(ReplicasTest, CreateFailsWhenRNodesFail) {
  Build(3, 2);
  fakes_[1]->down = true;
  fakes_[2]->down = true;
  const absl::Status st = multi_->CreateSequence(Spec(2));
  EXPECT_TRUE(absl::IsUnavailable(st)) << st;
  EXPECT_EQ(fakes_[0]->drops(), std::vector<uint64_t>{2});
}

}  // namespace
}  // namespace kvr::retrieval
