// Tenant isolation on retrieval nodes (issue 16, docs/security.md "Tenant
// isolation"): capabilities, random sequence ids, owner scoping, leases,
// recovery of all of it, and DropSequence after a persistence failure.
// Real kvr_node processes on 127.0.0.1 (ports chosen at run time) plus the
// in-process NodeCore for what insecure gRPC cannot show (principals).
#include <grpcpp/grpcpp.h>
#include <signal.h>

#include <chrono>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "common/attention.h"
#include "common/tensor.h"
#include "gtest/gtest.h"
#include "kvr/v1/retrieval.grpc.pb.h"
#include "retrieval_node/client/grpc_retrieval_client.h"
#include "retrieval_node/client/in_process_client.h"
#include "retrieval_node/client/ucx_retrieval_client.h"
#include "retrieval_node/core/node_core.h"
#include "retrieval_node/core/sequence_access.h"
#include "retrieval_node/core/shard_persistence.h"
#include "retrieval_node/wire/proto_convert.h"
#include "tests/support/metrics_page.h"
#include "tests/support/server_process.h"
#include "tests/support/temp_dir.h"
#include "tests/support/test_data.h"

namespace kvr::retrieval {
namespace {

using test_support::NodeProcess;
using test_support::RandomMatrix;

constexpr int kLayers = 2, kHeads = 4, kKvHeads = 2, kDim = 16, kKeys = 48;
using Clock = std::chrono::steady_clock;

SequenceSpec Spec(uint64_t id) {
  SequenceSpec s;
  s.sequence_id = id;
  s.n_layers = kLayers;
  s.n_heads = kHeads;
  s.n_kv_heads = kKvHeads;
  s.head_dim = kDim;
  s.value_dtype = DType::kF32;
  s.index_type = IndexType::kFlat;
  return s;
}

std::string Capability() {
  absl::StatusOr<std::string> c = RandomBytes(kCapabilityBytes);
  EXPECT_TRUE(c.ok()) << c.status();
  return c.ok() ? *c : std::string(kCapabilityBytes, 'x');
}

// Fixed test data: what the owner uploads and appends, and its queries.
struct Data {
  Matrix keys = RandomMatrix(kKeys, kDim, 1);
  Matrix values = RandomMatrix(kKeys, kDim, 2);
  Matrix more = RandomMatrix(4, kDim, 3);
  Matrix queries = RandomMatrix(kHeads, kDim, 4);
};
const Data& TestData() {
  static const Data* d = new Data;
  return *d;
}

ShardUpload Upload(uint64_t id, int32_t layer, int32_t kv_head, int32_t chunk,
                   const std::string& capability) {
  ShardUpload up;
  up.key = ShardKey{id, layer, kv_head, chunk};
  up.first_position = int64_t{chunk} * 1000;
  up.keys = TestData().keys.view();
  up.values = TestData().values.view();
  up.capability = capability;
  return up;
}

AppendRequest Append(uint64_t id, const std::string& capability) {
  AppendRequest a;
  a.sequence_id = id;
  a.layer = 0;
  a.kv_head = 0;
  a.first_position = kKeys;
  a.keys = TestData().more.view();
  a.values = TestData().more.view();
  a.capability = capability;
  return a;
}

absl::Status Attend(RetrievalClient* client, uint64_t id, const std::string& capability,
                    Partials* out) {
  *out = Partials(kHeads, kDim);
  AttendRequest r;
  r.sequence_id = id;
  r.layer = 0;
  r.queries = TestData().queries.view();
  r.k = 8;
  r.capability = capability;
  return client->Attend(r, out->view());
}

// Creates `id` with `capability` on `client`, uploads chunk 0 of every
// head of layer 0 and appends to head 0.
void Populate(RetrievalClient* client, uint64_t id, const std::string& capability) {
  ASSERT_TRUE(client->CreateSequence(Spec(id), capability).ok());
  for (int32_t g = 0; g < kKvHeads; ++g) {
    const absl::Status st = client->UploadShard(Upload(id, 0, g, 0, capability));
    ASSERT_TRUE(st.ok()) << st;
  }
  const absl::Status st = client->Append(Append(id, capability));
  ASSERT_TRUE(st.ok()) << st;
}

void ExpectDenied(const absl::Status& st, uint64_t id, const std::string& what) {
  EXPECT_EQ(st.code(), absl::StatusCode::kPermissionDenied) << what << ": " << st;
  EXPECT_NE(st.message().find(absl::StrCat("capability does not match sequence ", id)),
            absl::string_view::npos)
      << what << ": " << st;
}

std::unique_ptr<GrpcRetrievalClient> Connect(const std::string& address) {
  auto c = GrpcRetrievalClient::Create(address);
  EXPECT_TRUE(c.ok()) << c.status();
  if (!c.ok()) return nullptr;
  EXPECT_TRUE((*c)->WaitForReady(absl::Seconds(10)).ok());
  return std::move(c).value();
}

std::unique_ptr<v1::RetrievalNode::Stub> Stub(const std::string& address) {
  return v1::RetrievalNode::NewStub(
      grpc::CreateChannel(address, grpc::InsecureChannelCredentials()));
}

void SetDeadline(grpc::ClientContext* context) {
  context->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
}

// ReadShards of every chunk of `id`, presenting `capability`: the stream's
// final status.
absl::Status ReadAll(v1::RetrievalNode::Stub* stub, uint64_t id, const std::string& capability,
                     int* messages) {
  grpc::ClientContext context;
  SetDeadline(&context);
  v1::ReadShardsRequest request;
  request.set_sequence_id(id);
  request.set_all(true);
  request.set_capability(capability);
  auto reader = stub->ReadShards(&context, request);
  v1::ReadShardsResponse message;
  *messages = 0;
  while (reader->Read(&message)) ++*messages;
  return FromGrpcStatus(reader->Finish());
}

// Everything the owner can observe of `id`: its shard list and layer 0's
// partials (the "data untouched" oracle).
struct Observed {
  std::vector<ShardInfo> shards;
  Partials partials;
};
Observed Observe(GrpcRetrievalClient* client, uint64_t id, const std::string& capability) {
  Observed o;
  absl::StatusOr<std::vector<ShardInfo>> shards = client->ListShards(id, capability);
  EXPECT_TRUE(shards.ok()) << shards.status();
  if (shards.ok()) o.shards = *shards;
  const absl::Status st = Attend(client, id, capability, &o.partials);
  EXPECT_TRUE(st.ok()) << st;
  return o;
}

void ExpectSameObserved(const Observed& a, const Observed& b, const std::string& what) {
  ASSERT_EQ(a.shards.size(), b.shards.size()) << what;
  for (size_t i = 0; i < a.shards.size(); ++i) {
    EXPECT_EQ(a.shards[i].key, b.shards[i].key) << what;
    EXPECT_EQ(a.shards[i].n_keys, b.shards[i].n_keys) << what;
    EXPECT_EQ(a.shards[i].tail_keys, b.shards[i].tail_keys) << what;
    EXPECT_EQ(a.shards[i].last_position, b.shards[i].last_position) << what;
  }
  test_support::ExpectSamePartials(a.partials, b.partials, what);
}

// Polls `done` every 20 ms until it holds or `timeout` passes.
template <typename F>
bool PollUntil(F done, std::chrono::milliseconds timeout) {
  const auto give_up = Clock::now() + timeout;
  while (Clock::now() < give_up) {
    if (done()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return done();
}

// --- capabilities over gRPC -------------------------------------------------------

TEST(TenantTest, AnotherCapabilityIsRefusedByEveryCallAndChangesNothing) {
  auto node = NodeProcess::Start({});
  auto other = NodeProcess::Start({});
  ASSERT_TRUE(node && node->listening() && other && other->listening());
  auto owner = Connect(node->address());
  auto dest = Connect(other->address());
  ASSERT_TRUE(owner && dest);
  absl::StatusOr<SequenceHandle> handle = NewSequenceHandle();
  ASSERT_TRUE(handle.ok()) << handle.status();
  const uint64_t id = handle->id;
  const std::string& cap = handle->capability;
  ASSERT_NO_FATAL_FAILURE(Populate(owner.get(), id, cap));
  const Observed before = Observe(owner.get(), id, cap);
  ASSERT_EQ(before.shards.size(), static_cast<size_t>(kKvHeads));

  auto stub = Stub(node->address());
  for (const std::string& wrong : {Capability(), std::string()}) {
    const std::string what = wrong.empty() ? "no capability" : "another capability";
    Partials p;
    ExpectDenied(Attend(owner.get(), id, wrong, &p), id, what + ": Attend");
    ExpectDenied(owner->Append(Append(id, wrong)), id, what + ": Append");
    AppendRequest async = Append(id, wrong);
    StatusWaiter waiter;
    owner->AppendAsync(async, waiter.callback());
    ExpectDenied(waiter.Wait(), id, what + ": AppendAsync");
    ExpectDenied(owner->UploadShard(Upload(id, 1, 0, 0, wrong)), id, what + ": UploadShard");
    ExpectDenied(owner->DropSequence(id, wrong), id, what + ": DropSequence");
    ExpectDenied(owner->ListShards(id, wrong).status(), id, what + ": ListShards");
    int messages = -1;
    ExpectDenied(ReadAll(stub.get(), id, wrong, &messages), id, what + ": ReadShards");
    EXPECT_EQ(messages, 0) << what << ": ReadShards sent data";
    // SyncShards to the node holding it (the destination checks) and to
    // another node (the source refuses the read; nothing stays behind).
    SyncRequest sync;
    sync.spec = Spec(id);
    sync.source_address = other->address();
    sync.capability = wrong;
    ExpectDenied(owner->SyncShards(sync).status(), id, what + ": SyncShards (destination)");
    sync.source_address = node->address();
    ExpectDenied(dest->SyncShards(sync).status(), id, what + ": SyncShards (source)");
    EXPECT_EQ(dest->ListShards(id, wrong).status().code(), absl::StatusCode::kNotFound) << what;
    // A second CreateSequence of the id is refused whatever it presents.
    EXPECT_EQ(owner->CreateSequence(Spec(id), wrong).code(), absl::StatusCode::kAlreadyExists);
  }
  // Malformed capabilities: INVALID_ARGUMENT naming the field and its limits.
  for (size_t bytes : {size_t{1}, kMinCapabilityBytes - 1, kMaxCapabilityBytes + 1}) {
    Partials p;
    const absl::Status st = Attend(owner.get(), id, std::string(bytes, 'c'), &p);
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << bytes << ": " << st;
    EXPECT_NE(st.message().find("capability has"), absl::string_view::npos) << st;
    EXPECT_NE(st.message().find("[16, 64]"), absl::string_view::npos) << st;
    EXPECT_EQ(owner->CreateSequence(Spec(id + 1), std::string(bytes, 'c')).code(),
              absl::StatusCode::kInvalidArgument);
  }
  ExpectSameObserved(before, Observe(owner.get(), id, cap), "after the refused calls");

  // The owner's sync copies it to the other node, which then holds it
  // under the same capability.
  SyncRequest sync;
  sync.spec = Spec(id);
  sync.source_address = node->address();
  sync.capability = cap;
  absl::StatusOr<SyncResult> synced = dest->SyncShards(sync);
  ASSERT_TRUE(synced.ok()) << synced.status();
  ExpectSameObserved(before, Observe(dest.get(), id, cap), "synced copy");
  ExpectDenied(dest->ListShards(id, Capability()).status(), id, "synced copy, other capability");
  EXPECT_TRUE(owner->DropSequence(id, cap).ok());
  EXPECT_EQ(owner->ListShards(id, cap).status().code(), absl::StatusCode::kNotFound);
}

// --- capabilities over UCX --------------------------------------------------------

TEST(TenantTest, UcxAttendNeedsTheCapability) {
  auto node = NodeProcess::Start({"--ucx_listen=127.0.0.1:0"});
  ASSERT_TRUE(node && node->listening());
  auto grpc = Connect(node->address());
  ASSERT_TRUE(grpc);
  auto ucx = UcxRetrievalClient::Create(std::move(grpc));
  ASSERT_TRUE(ucx.ok()) << ucx.status();
  if (!(*ucx)->using_ucx()) GTEST_SKIP() << "UCX unavailable here: " << (*ucx)->fallback_reason();
  absl::StatusOr<SequenceHandle> handle = NewSequenceHandle();
  ASSERT_TRUE(handle.ok());
  ASSERT_NO_FATAL_FAILURE(Populate(ucx->get(), handle->id, handle->capability));
  Partials good, bad;
  ASSERT_TRUE(Attend(ucx->get(), handle->id, handle->capability, &good).ok());
  ExpectDenied(Attend(ucx->get(), handle->id, Capability(), &bad), handle->id, "UCX Attend");
  ExpectDenied(Attend(ucx->get(), handle->id, "", &bad), handle->id, "UCX Attend, none");
  EXPECT_TRUE((*ucx)->using_ucx()) << "the refusals must have come over UCX";
  Partials again;
  ASSERT_TRUE(Attend(ucx->get(), handle->id, handle->capability, &again).ok());
  test_support::ExpectSamePartials(good, again, "UCX Attend after refusals");
}

// --- random ids -------------------------------------------------------------------

TEST(TenantTest, TwoWorkersSharingANodeNeverCollide) {
  auto node = NodeProcess::Start({});
  ASSERT_TRUE(node && node->listening());
  // Two "workers": two clients (each would have counted ids from 1 before).
  auto a = Connect(node->address());
  auto b = Connect(node->address());
  ASSERT_TRUE(a && b);
  constexpr int kEach = 32;
  std::set<uint64_t> ids;
  std::set<std::string> caps;
  for (int i = 0; i < kEach; ++i) {
    for (GrpcRetrievalClient* c : {a.get(), b.get()}) {
      absl::StatusOr<SequenceHandle> h = NewSequenceHandle();
      ASSERT_TRUE(h.ok());
      EXPECT_GT(h->id, uint64_t{1} << 32) << "ids must not be small counters";
      EXPECT_EQ(h->capability.size(), kCapabilityBytes);
      const absl::Status st = c->CreateSequence(Spec(h->id), h->capability);
      ASSERT_TRUE(st.ok()) << st;
      ids.insert(h->id);
      caps.insert(h->capability);
    }
  }
  EXPECT_EQ(ids.size(), size_t{2 * kEach});
  EXPECT_EQ(caps.size(), size_t{2 * kEach});
  absl::StatusOr<NodeStats> stats = a->Stats();
  ASSERT_TRUE(stats.ok());
  EXPECT_EQ(stats->sequences, 2 * kEach);
}

// --- leases -----------------------------------------------------------------------

absl::Status CreateLeased(v1::RetrievalNode::Stub* stub, uint64_t id, const std::string& cap,
                          const std::string& lease_owner) {
  grpc::ClientContext context;
  SetDeadline(&context);
  v1::CreateSequenceRequest request;
  SequenceSpecToProto(Spec(id), request.mutable_spec());
  request.set_capability(cap);
  request.set_lease_owner(lease_owner);
  v1::CreateSequenceResponse response;
  return FromGrpcStatus(stub->CreateSequence(&context, request, &response));
}

double LeasesExpiredMetric(const NodeProcess& node) {
  std::optional<std::string> page = test_support::HttpGetMetrics(node.metrics_address());
  EXPECT_TRUE(page.has_value());
  if (!page.has_value()) return -1;
  return test_support::Get(test_support::ParseExposition(*page), "kvr_node_leases_expired_total");
}

TEST(TenantTest, AnUnrenewedLeaseExpiresAndARenewedOneSurvives) {
  constexpr double kLease = 1.0;
  auto node = NodeProcess::Start({"--lease_seconds=1"});
  ASSERT_TRUE(node && node->listening());
  auto stub = Stub(node->address());
  auto worker = Connect(node->address());  // renews ProcessLeaseOwner() by itself
  ASSERT_TRUE(worker);

  // The crashed worker's sequence: a lease owner that never renews.
  absl::StatusOr<SequenceHandle> dead = NewSequenceHandle();
  ASSERT_TRUE(dead.ok());
  const Clock::time_point created = Clock::now();
  ASSERT_TRUE(CreateLeased(stub.get(), dead->id, dead->capability, Capability()).ok());
  const absl::Status up = worker->UploadShard(Upload(dead->id, 0, 0, 0, dead->capability));
  ASSERT_TRUE(up.ok()) << up;
  // The live worker's sequence.
  absl::StatusOr<SequenceHandle> live = NewSequenceHandle();
  ASSERT_TRUE(live.ok());
  ASSERT_NO_FATAL_FAILURE(Populate(worker.get(), live->id, live->capability));
  const Observed live_before = Observe(worker.get(), live->id, live->capability);
  absl::StatusOr<NodeStats> stats = worker->Stats();
  ASSERT_TRUE(stats.ok());
  const int64_t used_with_both = stats->memory_bytes;

  EXPECT_TRUE(PollUntil(
      [&] {
        return absl::IsNotFound(worker->ListShards(dead->id, dead->capability).status());
      },
      std::chrono::seconds(15)))
      << "an unrenewed lease of " << kLease << " s did not expire";
  EXPECT_GE(std::chrono::duration<double>(Clock::now() - created).count(), kLease)
      << "expired before lease_seconds";
  EXPECT_EQ(LeasesExpiredMetric(*node), 1.0);
  stats = worker->Stats();
  ASSERT_TRUE(stats.ok());
  EXPECT_EQ(stats->sequences, 1);
  EXPECT_LT(stats->memory_bytes, used_with_both) << "the expired sequence's memory was not freed";

  // The renewed one outlives several lease periods.
  const Clock::time_point until = Clock::now() + std::chrono::milliseconds(3500);
  PollUntil([&] { return Clock::now() >= until; }, std::chrono::seconds(5));
  ExpectSameObserved(live_before, Observe(worker.get(), live->id, live->capability),
                     "renewed sequence after 3.5 lease periods");
  EXPECT_EQ(LeasesExpiredMetric(*node), 1.0);

  // Renewing an owner with nothing on the node renews nothing.
  grpc::ClientContext context;
  SetDeadline(&context);
  v1::RenewLeasesRequest renew;
  renew.set_lease_owner(Capability());
  v1::RenewLeasesResponse renewed;
  ASSERT_TRUE(stub->RenewLeases(&context, renew, &renewed).ok());
  EXPECT_EQ(renewed.sequences(), 0);
  EXPECT_EQ(renewed.lease_seconds(), kLease);
  absl::StatusOr<RenewLeasesResult> mine = worker->RenewLeases();
  ASSERT_TRUE(mine.ok());
  EXPECT_EQ(mine->sequences, 1);
  // A lease owner over 64 bytes: INVALID_ARGUMENT naming it.
  grpc::ClientContext context2;
  SetDeadline(&context2);
  renew.set_lease_owner(std::string(kMaxLeaseOwnerBytes + 1, 'o'));
  const grpc::Status too_long = stub->RenewLeases(&context2, renew, &renewed);
  EXPECT_EQ(too_long.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(too_long.error_message().find("lease_owner"), std::string::npos);
}

// --- recovery ---------------------------------------------------------------------

TEST(TenantTest, RecoveryKeepsTheCapabilityAndRestartsTheLease) {
  test_support::TempDir dir;
  ASSERT_FALSE(dir.path().empty());
  constexpr auto kLease = std::chrono::seconds(2);
  const std::vector<std::string> args = {"--data_dir=" + dir.path(), "--lease_seconds=2"};
  auto node = NodeProcess::Start(args);
  ASSERT_TRUE(node && node->listening());
  absl::StatusOr<SequenceHandle> handle = NewSequenceHandle();
  ASSERT_TRUE(handle.ok());
  const uint64_t id = handle->id;
  const std::string& cap = handle->capability;
  Observed before;
  Clock::time_point last_renewal;
  {
    auto stub = Stub(node->address());
    auto client = Connect(node->address());
    ASSERT_TRUE(client);
    ASSERT_TRUE(CreateLeased(stub.get(), id, cap, "crashed-worker").ok());
    last_renewal = Clock::now();
    for (int32_t g = 0; g < kKvHeads; ++g) {
      ASSERT_TRUE(client->UploadShard(Upload(id, 0, g, 0, cap)).ok());
    }
    ASSERT_TRUE(client->Append(Append(id, cap)).ok());
    before = Observe(client.get(), id, cap);
  }
  ASSERT_TRUE(node->Stop(SIGTERM).has_value());
  // Down for longer than the lease: its owner could not have renewed.
  PollUntil([&] { return Clock::now() >= last_renewal + kLease + std::chrono::milliseconds(500); },
            std::chrono::seconds(5));

  node = NodeProcess::Start(args);
  ASSERT_TRUE(node && node->listening());
  const Clock::time_point recovered = Clock::now();
  auto client = Connect(node->address());
  ASSERT_TRUE(client);
  // The lease restarted at recovery: still served, to the owner only.
  ExpectSameObserved(before, Observe(client.get(), id, cap), "after restart");
  ExpectDenied(client->ListShards(id, Capability()).status(), id, "after restart, other");
  ExpectDenied(client->ListShards(id, "").status(), id, "after restart, none");
  Partials p;
  ExpectDenied(Attend(client.get(), id, Capability(), &p), id, "after restart, Attend");
  // ... and expires lease_seconds after recovery (nobody renews it).
  EXPECT_TRUE(PollUntil([&] { return absl::IsNotFound(client->ListShards(id, cap).status()); },
                        std::chrono::seconds(15)));
  EXPECT_GE(Clock::now() - recovered, kLease - std::chrono::milliseconds(500));
  // Its records are gone too: a second restart does not bring it back.
  ASSERT_TRUE(node->Stop(SIGTERM).has_value());
  node = NodeProcess::Start(args);
  ASSERT_TRUE(node && node->listening());
  client = Connect(node->address());
  ASSERT_TRUE(client);
  EXPECT_EQ(client->ListShards(id, cap).status().code(), absl::StatusCode::kNotFound);
}

// --- in process: owners, open sequences, persistence failures -----------------------

std::unique_ptr<NodeCore> NewCore(ShardPersistence* persistence = nullptr) {
  NodeCoreOptions o;
  o.persistence = persistence;
  absl::StatusOr<std::unique_ptr<NodeCore>> core = NodeCore::Create(o);
  EXPECT_TRUE(core.ok()) << core.status();
  return std::move(core).value();
}

TEST(TenantTest, ListShardsAndStatsCoverOnlyTheCallersPrincipal) {
  auto core = NewCore();
  const std::string cap_a = Capability(), cap_b = Capability();
  ASSERT_TRUE(core->CreateSequence(Spec(11), {cap_a, "", "kvr-worker-a"}).ok());
  ASSERT_TRUE(core->CreateSequence(Spec(22), {cap_b, "", "kvr-worker-b"}).ok());
  ASSERT_TRUE(core->UploadShard(Upload(11, 0, 0, 0, cap_a)).ok());
  ASSERT_TRUE(core->UploadShard(Upload(22, 0, 0, 0, cap_b)).ok());
  ASSERT_TRUE(core->UploadShard(Upload(22, 0, 1, 0, cap_b)).ok());
  absl::StatusOr<std::vector<ShardInfo>> a = core->ListShards(std::nullopt, "", "kvr-worker-a");
  ASSERT_TRUE(a.ok());
  ASSERT_EQ(a->size(), 1u);
  EXPECT_EQ((*a)[0].key.sequence_id, 11u);
  absl::StatusOr<std::vector<ShardInfo>> b = core->ListShards(std::nullopt, "", "kvr-worker-b");
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(b->size(), 2u);
  absl::StatusOr<std::vector<ShardInfo>> none = core->ListShards(std::nullopt, "", "");
  ASSERT_TRUE(none.ok());
  EXPECT_TRUE(none->empty());
  absl::StatusOr<NodeStats> sa = core->Stats("kvr-worker-a"), sb = core->Stats("kvr-worker-b"),
                            all = core->Stats();
  ASSERT_TRUE(sa.ok() && sb.ok() && all.ok());
  EXPECT_EQ(sa->sequences, 1);
  EXPECT_EQ(sa->shards, 1);
  EXPECT_EQ(sa->indexed_keys, kKeys);
  EXPECT_EQ(sb->sequences, 1);
  EXPECT_EQ(sb->shards, 2);
  EXPECT_EQ(all->sequences, 2);
  EXPECT_EQ(all->shards, 3);
  EXPECT_EQ(all->memory_bytes, sa->memory_bytes + sb->memory_bytes);
  // The principal is the creator's, not a key: B's capability opens B's
  // sequence for anyone holding it, but A's capability never does.
  ExpectDenied(core->ListShards(22, cap_a).status(), 22, "A's capability on B's sequence");
}

TEST(TenantTest, AnOpenSequenceAdmitsOnlyRequestsWithoutACapability) {
  auto core = NewCore();
  ASSERT_TRUE(core->CreateSequence(Spec(5)).ok());
  ASSERT_TRUE(core->UploadShard(Upload(5, 0, 0, 0, "")).ok());
  ExpectDenied(core->ListShards(5, Capability()).status(), 5, "capability on an open sequence");
  ExpectDenied(core->DropSequence(5, Capability()), 5, "Drop with a capability");
  EXPECT_TRUE(core->ListShards(5, "").ok());
  EXPECT_TRUE(core->DropSequence(5, "").ok());
}

// A ShardPersistence whose writes fail from the `fail_at`-th on.
class BrokenStore final : public ShardPersistence {
 public:
  explicit BrokenStore(int fail_at) : fail_at_(fail_at) {}
  absl::Status PutSequence(const SequenceSpec&, const SequenceOwner&) override { return Next(); }
  absl::Status DropSequence(uint64_t) override {
    ++drops_;
    return Next();
  }
  absl::Status CommitHead(const HeadWrite&) override { return Next(); }
  absl::Status Recover(const std::function<absl::Status(const SequenceSpec&, const SequenceOwner&)>&,
                       const std::function<absl::Status(uint64_t, RecoveredHead)>&) override {
    return absl::OkStatus();
  }
  void Heal() { fail_at_ = 1 << 30; }
  int drops() const { return drops_; }

 private:
  absl::Status Next() {
    return ++calls_ >= fail_at_ ? absl::UnavailableError("disk on fire") : absl::OkStatus();
  }
  int fail_at_;
  int calls_ = 0;
  int drops_ = 0;
};

TEST(TenantTest, DropAfterAPersistenceFailureFreesTheSequence) {
  BrokenStore store(/*fail_at=*/4);  // create, two uploads, then every write fails
  auto core = NewCore(&store);
  const std::string cap = Capability();
  ASSERT_TRUE(core->CreateSequence(Spec(9), {cap, "", ""}).ok());
  ASSERT_TRUE(core->UploadShard(Upload(9, 0, 0, 0, cap)).ok());
  ASSERT_TRUE(core->UploadShard(Upload(9, 0, 1, 0, cap)).ok());
  EXPECT_EQ(core->Append(Append(9, cap)).code(), absl::StatusCode::kUnavailable);
  EXPECT_GT(core->MemoryUsedBytes(), 0);
  // Refused callers still get PermissionDenied, and nothing is freed.
  ExpectDenied(core->DropSequence(9, Capability()), 9, "Drop by another after the failure");
  EXPECT_TRUE(core->ListShards(9, cap).ok());

  // The owner's drop frees memory and the sequence, even though the store
  // write fails (and says so).
  const absl::Status dropped = core->DropSequence(9, cap);
  EXPECT_EQ(dropped.code(), absl::StatusCode::kUnavailable) << dropped;
  EXPECT_NE(dropped.message().find("dropped from memory"), absl::string_view::npos) << dropped;
  EXPECT_EQ(store.drops(), 1) << "the store's records must be deleted when it can";
  EXPECT_EQ(core->ListShards(9, cap).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(core->MemoryUsedBytes(), 0);
  absl::StatusOr<NodeStats> st = core->Stats();
  ASSERT_TRUE(st.ok());
  EXPECT_EQ(st->sequences, 0);

  // Other writes stay refused (the failure is sticky).
  EXPECT_EQ(core->CreateSequence(Spec(10), {cap, "", ""}).code(), absl::StatusCode::kUnavailable);
}

TEST(TenantTest, DropAfterAnEarlierFailureDeletesRecordsWhenTheStoreWorks) {
  BrokenStore store(/*fail_at=*/3);  // create, upload, then the append fails
  auto core = NewCore(&store);
  const std::string cap = Capability();
  ASSERT_TRUE(core->CreateSequence(Spec(9), {cap, "", ""}).ok());
  ASSERT_TRUE(core->UploadShard(Upload(9, 0, 0, 0, cap)).ok());
  EXPECT_EQ(core->Append(Append(9, cap)).code(), absl::StatusCode::kUnavailable);
  store.Heal();
  EXPECT_TRUE(core->DropSequence(9, cap).ok());
  EXPECT_EQ(store.drops(), 1);
  EXPECT_EQ(core->MemoryUsedBytes(), 0);
  EXPECT_EQ(core->ListShards(9, cap).status().code(), absl::StatusCode::kNotFound);
}

TEST(TenantTest, InProcessLeasesExpireAndRenew) {
  NodeCoreOptions o;
  o.lease_seconds = 0.2;
  absl::StatusOr<std::unique_ptr<NodeCore>> core = NodeCore::Create(o);
  ASSERT_TRUE(core.ok());
  const std::string cap = Capability();
  ASSERT_TRUE((*core)->CreateSequence(Spec(1), {cap, "gone", ""}).ok());
  ASSERT_TRUE((*core)->CreateSequence(Spec(2), {cap, "alive", ""}).ok());
  ASSERT_TRUE((*core)->CreateSequence(Spec(3), {cap, "", ""}).ok());  // no lease
  ASSERT_TRUE((*core)->UploadShard(Upload(1, 0, 0, 0, cap)).ok());
  const int64_t with_one = (*core)->MemoryUsedBytes();
  EXPECT_GT(with_one, 0);
  EXPECT_TRUE(PollUntil(
      [&] {
        EXPECT_TRUE((*core)->RenewLeases("alive").ok());
        return absl::IsNotFound((*core)->ListShards(1, cap).status());
      },
      std::chrono::seconds(10)));
  EXPECT_EQ((*core)->MemoryUsedBytes(), 0);
  const Clock::time_point until = Clock::now() + std::chrono::seconds(1);
  PollUntil(
      [&] {
        EXPECT_EQ(*(*core)->RenewLeases("alive"), 1);
        return Clock::now() >= until;
      },
      std::chrono::seconds(2));
  EXPECT_TRUE((*core)->ListShards(2, cap).ok());
  EXPECT_TRUE((*core)->ListShards(3, cap).ok()) << "a sequence without a lease never expires";
  absl::StatusOr<NodeStats> st = (*core)->Stats();
  ASSERT_TRUE(st.ok());
  EXPECT_EQ(st->leases_expired, 1);
  EXPECT_EQ((*core)->RenewLeases("").status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace kvr::retrieval
