// services/infra/membership: static lists (sorted, validated, errors naming the
// entry), DNS specs (parsing; "localhost" against getaddrinfo itself as the
// oracle), and refresh semantics through an injected resolver: change
// notification exactly once per change, keep-last-good on failure or an
// empty answer, and the background refresh thread.
#include "services/infra/membership/membership.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <deque>
#include <set>
#include <string>
#include <vector>

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"

namespace kvr::membership {
namespace {

using Addresses = std::vector<std::string>;

std::unique_ptr<Membership> MustCreate(MembershipOptions options) {
  absl::StatusOr<std::unique_ptr<Membership>> m = Membership::Create(options);
  EXPECT_TRUE(m.ok()) << m.status();
  return m.ok() ? *std::move(m) : nullptr;
}

void ExpectInvalid(const std::string& spec, const std::string& needle) {
  MembershipOptions o;
  o.spec = spec;
  o.refresh = absl::ZeroDuration();
  absl::StatusOr<std::unique_ptr<Membership>> m = Membership::Create(o);
  ASSERT_FALSE(m.ok()) << "spec \"" << spec << "\" was accepted";
  EXPECT_EQ(m.status().code(), absl::StatusCode::kInvalidArgument) << m.status();
  EXPECT_NE(m.status().message().find(needle), absl::string_view::npos)
      << "spec \"" << spec << "\": \"" << m.status().message() << "\" does not name \"" << needle
      << "\"";
}

TEST(MembershipStatic, SortedAndTrimmed) {
  MembershipOptions o;
  o.spec = " 10.0.0.2:7000, 10.0.0.1:7001 ,[::1]:7000,node-a.local:9";
  auto m = MustCreate(o);
  ASSERT_NE(m, nullptr);
  EXPECT_FALSE(m->is_dns());
  const Addresses want = {"10.0.0.1:7001", "10.0.0.2:7000", "[::1]:7000", "node-a.local:9"};
  EXPECT_EQ(m->Current(), want);
  std::vector<Addresses> seen;
  m->Subscribe([&](const Addresses& a) { seen.push_back(a); });
  ASSERT_EQ(seen.size(), 1u);  // called once at once with the current set
  EXPECT_EQ(seen[0], want);
  EXPECT_TRUE(m->RefreshNow().ok());
  EXPECT_EQ(seen.size(), 1u);  // a static list never changes
  EXPECT_EQ(m->refresh_failures(), 0);
}

TEST(MembershipStatic, BadEntriesNameTheEntry) {
  ExpectInvalid("", "empty");
  ExpectInvalid("a:1,,b:2", "entry 2");
  ExpectInvalid("a:1,", "entry 2");
  ExpectInvalid("a:1,hostonly", "entry 2 (\"hostonly\")");
  ExpectInvalid("h:0", "entry 1 (\"h:0\")");
  ExpectInvalid("h:65536", "entry 1 (\"h:65536\")");
  ExpectInvalid("h:70x", "entry 1 (\"h:70x\")");
  ExpectInvalid(":7000", "entry 1");
  ExpectInvalid("::1:7000", "entry 1");
  ExpectInvalid("a:1,node-2=b:2", "entry 2 (\"node-2=b:2\")");
  ExpectInvalid("a:1,b:2,a:1", "entry 3 (\"a:1\"): duplicate");
}

TEST(MembershipDns, BadSpecs) {
  ExpectInvalid("dns:///", "missing :port");
  ExpectInvalid("dns:///svc", "missing :port");
  ExpectInvalid("dns:///:7000", "empty name");
  ExpectInvalid("dns:///svc:0", "port 0 outside [1, 65535]");
  ExpectInvalid("dns:///svc:http", "port \"http\" is not a number");
  ExpectInvalid("dns:///a,b:7000", "name \"a,b\"");
  ExpectInvalid("dns://10.0.0.53/svc:7000", "only dns:///name:port");
  ExpectInvalid("dns:svc:7000", "only dns:///name:port");
}

// The oracle: what getaddrinfo itself answers for the name, formatted the
// way membership promises (sorted, unique, IPv6 bracketed).
Addresses GetaddrinfoOracle(const char* host, int port) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  if (getaddrinfo(host, nullptr, &hints, &res) != 0) return {};
  std::set<std::string> out;
  for (addrinfo* ai = res; ai != nullptr; ai = ai->ai_next) {
    char buf[INET6_ADDRSTRLEN];
    if (ai->ai_family == AF_INET) {
      inet_ntop(AF_INET, &reinterpret_cast<sockaddr_in*>(ai->ai_addr)->sin_addr, buf, sizeof buf);
      out.insert(absl::StrCat(buf, ":", port));
    } else if (ai->ai_family == AF_INET6) {
      inet_ntop(AF_INET6, &reinterpret_cast<sockaddr_in6*>(ai->ai_addr)->sin6_addr, buf,
                sizeof buf);
      out.insert(absl::StrCat("[", buf, "]:", port));
    }
  }
  freeaddrinfo(res);
  return Addresses(out.begin(), out.end());
}

TEST(MembershipDns, LocalhostMatchesGetaddrinfo) {
  const Addresses want = GetaddrinfoOracle("localhost", 7000);
  ASSERT_FALSE(want.empty()) << "getaddrinfo(\"localhost\") answers nothing on this machine";
  // Whatever the resolver configuration, localhost is loopback.
  for (const std::string& a : want) {
    EXPECT_TRUE(a == "127.0.0.1:7000" || a == "[::1]:7000") << a;
  }
  MembershipOptions o;
  o.spec = "dns:///localhost:7000";
  o.refresh = absl::ZeroDuration();
  auto m = MustCreate(o);
  ASSERT_NE(m, nullptr);
  EXPECT_TRUE(m->is_dns());
  EXPECT_EQ(m->Current(), want);
  EXPECT_TRUE(m->RefreshNow().ok());
  EXPECT_EQ(m->Current(), want);
}

TEST(MembershipDns, UnresolvableNameIsAnErrorNamingIt) {
  MembershipOptions o;
  o.spec = "dns:///kvr-no-such-node.invalid:7000";  // .invalid never resolves (RFC 6761)
  o.refresh = absl::ZeroDuration();
  absl::StatusOr<std::unique_ptr<Membership>> m = Membership::Create(o);
  ASSERT_FALSE(m.ok());
  EXPECT_NE(m.status().message().find("kvr-no-such-node.invalid"), absl::string_view::npos)
      << m.status();
}

// A resolver that answers from a script, one entry per call; past the end it
// repeats the last entry. Thread-safe (the refresh thread calls it).
class ScriptedResolver {
 public:
  explicit ScriptedResolver(std::deque<absl::StatusOr<Addresses>> script)
      : script_(std::move(script)) {}

  Resolver AsResolver() {
    return [this](const std::string& host, int port) -> absl::StatusOr<Addresses> {
      absl::MutexLock lock(&mu_);
      hosts_.push_back(absl::StrCat(host, ":", port));
      ++calls_;
      absl::StatusOr<Addresses> answer = script_.front();
      if (script_.size() > 1) script_.pop_front();
      return answer;
    };
  }
  int calls() const {
    absl::MutexLock lock(&mu_);
    return calls_;
  }
  // Blocks until the resolver has been called `n` times or `timeout` passes.
  bool WaitForCalls(int n, absl::Duration timeout) const {
    absl::MutexLock lock(&mu_);
    auto reached = [this, n]() ABSL_SHARED_LOCKS_REQUIRED(mu_) { return calls_ >= n; };
    return mu_.AwaitWithTimeout(absl::Condition(&reached), timeout);
  }
  std::vector<std::string> hosts() const {
    absl::MutexLock lock(&mu_);
    return hosts_;
  }

 private:
  mutable absl::Mutex mu_;
  std::deque<absl::StatusOr<Addresses>> script_;
  int calls_ = 0;
  std::vector<std::string> hosts_;
};

TEST(MembershipDns, RefreshNotifiesChangesAndKeepsLastGood) {
  ScriptedResolver resolver({
      Addresses{"10.0.0.2:7000", "10.0.0.1:7000", "10.0.0.2:7000"},  // Create: dup + unsorted
      Addresses{"10.0.0.1:7000", "10.0.0.2:7000"},                   // same set
      Addresses{"10.0.0.3:7000", "10.0.0.1:7000", "10.0.0.2:7000"},  // a pod joins
      absl::UnavailableError("SERVFAIL"),                            // DNS outage
      Addresses{},                                                   // all pods unready
      Addresses{"10.0.0.3:7000", "10.0.0.1:7000"},                   // a pod leaves
  });
  MembershipOptions o;
  o.spec = "dns:///kvr-node.kvr.svc.cluster.local:7000";
  o.refresh = absl::ZeroDuration();
  o.resolver = resolver.AsResolver();
  auto m = MustCreate(o);
  ASSERT_NE(m, nullptr);
  EXPECT_EQ(resolver.hosts(), std::vector<std::string>{"kvr-node.kvr.svc.cluster.local:7000"});
  const Addresses two = {"10.0.0.1:7000", "10.0.0.2:7000"};
  const Addresses three = {"10.0.0.1:7000", "10.0.0.2:7000", "10.0.0.3:7000"};
  const Addresses after_leave = {"10.0.0.1:7000", "10.0.0.3:7000"};
  EXPECT_EQ(m->Current(), two);

  std::vector<Addresses> seen;
  m->Subscribe([&](const Addresses& a) { seen.push_back(a); });
  ASSERT_EQ(seen, std::vector<Addresses>{two});

  EXPECT_TRUE(m->RefreshNow().ok());  // same set: no notification
  EXPECT_EQ(seen.size(), 1u);
  EXPECT_TRUE(m->RefreshNow().ok());  // join
  EXPECT_EQ(m->Current(), three);
  ASSERT_EQ(seen.size(), 2u);
  EXPECT_EQ(seen[1], three);

  absl::Status failed = m->RefreshNow();  // outage: keep the last good set
  EXPECT_EQ(failed.code(), absl::StatusCode::kUnavailable) << failed;
  EXPECT_NE(failed.message().find("SERVFAIL"), absl::string_view::npos) << failed;
  EXPECT_EQ(m->Current(), three);
  EXPECT_EQ(m->refresh_failures(), 1);
  EXPECT_EQ(seen.size(), 2u);

  absl::Status empty = m->RefreshNow();  // no record: keep the last good set too
  EXPECT_EQ(empty.code(), absl::StatusCode::kNotFound) << empty;
  EXPECT_NE(empty.message().find("kvr-node.kvr.svc.cluster.local"), absl::string_view::npos);
  EXPECT_EQ(m->Current(), three);
  EXPECT_EQ(m->refresh_failures(), 2);

  EXPECT_TRUE(m->RefreshNow().ok());  // leave
  EXPECT_EQ(m->Current(), after_leave);
  ASSERT_EQ(seen.size(), 3u);
  EXPECT_EQ(seen[2], after_leave);
  EXPECT_EQ(resolver.calls(), 6);
}

TEST(MembershipDns, EmptyOrFailedFirstResolutionIsAnError) {
  for (absl::StatusOr<Addresses> first :
       {absl::StatusOr<Addresses>(Addresses{}),
        absl::StatusOr<Addresses>(absl::NotFoundError("NXDOMAIN"))}) {
    ScriptedResolver resolver({first});
    MembershipOptions o;
    o.spec = "dns:///kvr-node:7000";
    o.resolver = resolver.AsResolver();
    absl::StatusOr<std::unique_ptr<Membership>> m = Membership::Create(o);
    ASSERT_FALSE(m.ok());
    EXPECT_EQ(m.status().code(), absl::StatusCode::kNotFound) << m.status();
    EXPECT_NE(m.status().message().find("kvr-node"), absl::string_view::npos) << m.status();
  }
}

// The background thread re-resolves every `refresh`; the test waits on the
// resolver's call count (deadline 10 s), not on time.
TEST(MembershipDns, BackgroundRefreshAppliesChanges) {
  ScriptedResolver resolver({Addresses{"10.0.0.1:7000"}, Addresses{"10.0.0.1:7000"},
                             Addresses{"10.0.0.1:7000", "10.0.0.9:7000"}});
  absl::Mutex mu;
  std::vector<Addresses> seen;
  {
    MembershipOptions o;
    o.spec = "dns:///kvr-node:7000";
    o.refresh = absl::Milliseconds(1);
    o.resolver = resolver.AsResolver();
    auto m = MustCreate(o);
    ASSERT_NE(m, nullptr);
    m->Subscribe([&](const Addresses& a) {
      absl::MutexLock lock(&mu);
      seen.push_back(a);
    });
    ASSERT_TRUE(resolver.WaitForCalls(4, absl::Seconds(10)));
    // The third answer was applied before the fourth call began.
    EXPECT_EQ(m->Current(), (Addresses{"10.0.0.1:7000", "10.0.0.9:7000"}));
  }  // joins the refresh thread
  const int calls = resolver.calls();
  absl::MutexLock lock(&mu);
  ASSERT_EQ(seen.size(), 2u);
  EXPECT_EQ(seen[0], Addresses{"10.0.0.1:7000"});
  EXPECT_EQ(seen[1], (Addresses{"10.0.0.1:7000", "10.0.0.9:7000"}));
  EXPECT_EQ(resolver.calls(), calls);  // nothing runs after destruction
}

}  // namespace
}  // namespace kvr::membership
