#include "services/infra/membership/membership.h"

#include <algorithm>
#include <cstdio>
#include <utility>

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "common/status.h"
#include "services/infra/placement/placement.h"

namespace kvr::membership {
namespace {

constexpr absl::string_view kDnsScheme = "dns:///";

void SortUnique(std::vector<std::string>* v) {
  std::sort(v->begin(), v->end());
  v->erase(std::unique(v->begin(), v->end()), v->end());
}

// "host:port,..." → sorted addresses. Entries are validated by the placement
// node-list parser (the same rules as every other node list); the id= form
// is refused because membership is a set of addresses.
absl::StatusOr<std::vector<std::string>> ParseStatic(absl::string_view spec) {
  KVR_ASSIGN_OR_RETURN(std::vector<placement::NodeInfo> nodes, placement::ParseNodeList(spec));
  std::vector<std::string> out;
  absl::flat_hash_set<std::string> seen;
  for (size_t i = 0; i < nodes.size(); ++i) {
    if (nodes[i].id != nodes[i].address) {
      return absl::InvalidArgumentError(absl::StrCat(
          "node list entry ", i + 1, " (\"", nodes[i].id, "=", nodes[i].address,
          "\"): id=host:port is not accepted here; list addresses (host:port)"));
    }
    if (!seen.insert(nodes[i].address).second) {
      return absl::InvalidArgumentError(absl::StrCat("node list entry ", i + 1, " (\"",
                                                     nodes[i].address, "\"): duplicate address"));
    }
    out.push_back(nodes[i].address);
  }
  SortUnique(&out);
  return out;
}

// "name:port" after "dns:///" → (name, port).
absl::Status ParseDnsTarget(absl::string_view spec, std::string* host, int* port) {
  absl::string_view target = spec.substr(kDnsScheme.size());
  auto bad = [&](absl::string_view why) {
    return absl::InvalidArgumentError(
        absl::StrCat("dns spec \"", spec, "\": ", why, " (want dns:///name:port)"));
  };
  const size_t colon = target.rfind(':');
  if (colon == absl::string_view::npos) return bad("missing :port");
  absl::string_view name = target.substr(0, colon);
  const absl::string_view port_text = target.substr(colon + 1);
  if (absl::ConsumePrefix(&name, "[") && !absl::ConsumeSuffix(&name, "]")) {
    return bad("unterminated '[' in the name");
  }
  if (name.empty()) return bad("empty name");
  if (name.find_first_of("/,[] ") != absl::string_view::npos) {
    return bad(absl::StrCat("name \"", name, "\" holds '/', ',', '[', ']' or a space"));
  }
  int p = 0;
  if (!absl::SimpleAtoi(port_text, &p)) {
    return bad(absl::StrCat("port \"", port_text, "\" is not a number"));
  }
  if (p < 1 || p > 65535) return bad(absl::StrCat("port ", p, " outside [1, 65535]"));
  *host = std::string(name);
  *port = p;
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::vector<std::string>> ResolveWithGetaddrinfo(const std::string& host,
                                                                int port) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;  // one entry per address, not per socket type
  addrinfo* result = nullptr;
  const int rc = getaddrinfo(host.c_str(), nullptr, &hints, &result);
  if (rc != 0) {
    const std::string why = gai_strerror(rc);
    if (rc == EAI_NONAME || rc == EAI_NODATA) {
      return absl::NotFoundError(absl::StrCat("resolving \"", host, "\": ", why));
    }
    return absl::UnavailableError(absl::StrCat("resolving \"", host, "\": ", why));
  }
  std::vector<std::string> out;
  for (const addrinfo* ai = result; ai != nullptr; ai = ai->ai_next) {
    char text[INET6_ADDRSTRLEN] = {};
    if (ai->ai_family == AF_INET) {
      const auto* sin = reinterpret_cast<const sockaddr_in*>(ai->ai_addr);
      if (inet_ntop(AF_INET, &sin->sin_addr, text, sizeof(text)) == nullptr) continue;
      out.push_back(absl::StrCat(text, ":", port));
    } else if (ai->ai_family == AF_INET6) {
      const auto* sin6 = reinterpret_cast<const sockaddr_in6*>(ai->ai_addr);
      if (inet_ntop(AF_INET6, &sin6->sin6_addr, text, sizeof(text)) == nullptr) continue;
      out.push_back(absl::StrCat("[", text, "]:", port));
    }
  }
  freeaddrinfo(result);
  return out;
}

Membership::Membership(const MembershipOptions& options)
    : spec_(options.spec),
      refresh_(options.refresh),
      resolver_(options.resolver ? options.resolver : Resolver(ResolveWithGetaddrinfo)) {}

absl::StatusOr<std::unique_ptr<Membership>> Membership::Create(const MembershipOptions& options) {
  auto m = std::unique_ptr<Membership>(new Membership(options));
  const absl::string_view spec = absl::StripAsciiWhitespace(options.spec);
  if (absl::StartsWith(spec, "dns:")) {
    if (!absl::StartsWith(spec, kDnsScheme)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "dns spec \"", spec, "\": only dns:///name:port (no DNS authority) is supported"));
    }
    KVR_RETURN_IF_ERROR(ParseDnsTarget(spec, &m->dns_host_, &m->dns_port_));
    KVR_ASSIGN_OR_RETURN(std::vector<std::string> first, m->ResolveSorted());
    {
      absl::MutexLock lock(&m->mu_);
      m->current_ = std::move(first);
    }
    if (m->refresh_ > absl::ZeroDuration()) {
      m->refresher_ = std::thread([p = m.get()] { p->RefreshLoop(); });
    }
    return m;
  }
  KVR_ASSIGN_OR_RETURN(std::vector<std::string> nodes, ParseStatic(spec));
  absl::MutexLock lock(&m->mu_);
  m->current_ = std::move(nodes);
  return m;
}

Membership::~Membership() {
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
  }
  if (refresher_.joinable()) refresher_.join();
}

std::vector<std::string> Membership::Current() const {
  absl::MutexLock lock(&mu_);
  return current_;
}

int64_t Membership::refresh_failures() const {
  absl::MutexLock lock(&mu_);
  return failures_;
}

void Membership::Subscribe(std::function<void(const std::vector<std::string>&)> on_change) {
  absl::MutexLock apply(&apply_mu_);
  on_change(Current());
  subscribers_.push_back(std::move(on_change));
}

absl::StatusOr<std::vector<std::string>> Membership::ResolveSorted() const {
  absl::StatusOr<std::vector<std::string>> resolved = resolver_(dns_host_, dns_port_);
  if (!resolved.ok()) {
    return absl::Status(resolved.status().code(),
                        absl::StrCat("dns:///", dns_host_, ":", dns_port_, ": ",
                                     resolved.status().message()));
  }
  if (resolved->empty()) {
    return absl::NotFoundError(
        absl::StrCat("dns:///", dns_host_, ":", dns_port_, ": name \"", dns_host_,
                     "\" resolved to no address"));
  }
  SortUnique(&*resolved);
  return resolved;
}

absl::Status Membership::RefreshNow() {
  if (!is_dns()) return absl::OkStatus();
  absl::MutexLock apply(&apply_mu_);
  absl::StatusOr<std::vector<std::string>> resolved = ResolveSorted();
  if (!resolved.ok()) {
    int64_t failures = 0;
    size_t kept = 0;
    {
      absl::MutexLock lock(&mu_);
      failures = ++failures_;
      kept = current_.size();
    }
    std::fprintf(stderr, "kvr membership: refresh failed (%lld so far), keeping %zu nodes: %s\n",
                 static_cast<long long>(failures), kept,
                 std::string(resolved.status().message()).c_str());
    return resolved.status();
  }
  {
    absl::MutexLock lock(&mu_);
    if (*resolved == current_) return absl::OkStatus();
    current_ = *resolved;
  }
  std::fprintf(stderr, "kvr membership: %s now %zu nodes: %s\n", spec_.c_str(), resolved->size(),
               absl::StrJoin(*resolved, ",").c_str());
  for (const auto& subscriber : subscribers_) subscriber(*resolved);
  return absl::OkStatus();
}

void Membership::RefreshLoop() {
  while (true) {
    {
      absl::MutexLock lock(&mu_);
      // Wakes early only to stop.
      mu_.AwaitWithTimeout(absl::Condition(&stop_), refresh_);
      if (stop_) return;
    }
    // The status is logged and counted inside.
    RefreshNow().IgnoreError();
  }
}

}  // namespace kvr::membership
