#include "retrieval_node/client/client_factory.h"

#include <cstdio>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "retrieval_node/client/in_process_client.h"

#ifdef KVR_WITH_REMOTE_CLIENTS
#include "retrieval_node/client/grpc_retrieval_client.h"
#include "retrieval_node/client/multi_node_client.h"
#include "services/infra/membership/membership.h"
#include "services/infra/placement/placement.h"
#endif

namespace kvr::retrieval {
namespace {

#ifdef KVR_WITH_REMOTE_CLIENTS

// A MultiNodeClient over the kvr_node servers of `spec` (not empty).
absl::StatusOr<std::unique_ptr<RetrievalClient>> ConnectNodes(
    const std::string& spec, const RetrievalClientOptions& options) {
  std::vector<placement::NodeInfo> initial;
  std::unique_ptr<membership::Membership> membership;
  if (!absl::StartsWith(spec, "dns:") && spec.find('=') != std::string::npos) {
    absl::StatusOr<std::vector<placement::NodeInfo>> parsed = placement::ParseNodeList(spec);
    if (!parsed.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("--nodes: ", parsed.status().message()));
    }
    initial = *std::move(parsed);
  } else {
    membership::MembershipOptions mo;
    mo.spec = spec;
    mo.refresh = options.refresh;
    absl::StatusOr<std::unique_ptr<membership::Membership>> m =
        membership::Membership::Create(mo);
    if (!m.ok()) {
      return absl::Status(m.status().code(), absl::StrCat("--nodes: ", m.status().message()));
    }
    membership = *std::move(m);
    for (const std::string& address : membership->Current()) {
      initial.push_back({address, address});
    }
  }
  if (options.replicas < 0 || options.replicas > 64) {
    return absl::InvalidArgumentError(
        absl::StrCat("--replicas ", options.replicas, " outside [0, 64] (0: default)"));
  }
  MultiNodeOptions mo;
  mo.replicas = options.replicas > 0 ? options.replicas : (initial.size() >= 2 ? 2 : 1);
  GrpcClientOptions grpc_options;
  grpc_options.credentials = options.credentials;
  // dns:/// sets dial the records' IPs; TLS checks the name they share.
  if (membership != nullptr && membership->is_dns()) {
    grpc_options.tls_server_name = membership->dns_host();
  }
  std::vector<std::unique_ptr<RetrievalClient>> clients;
  std::vector<GrpcRetrievalClient*> grpc_clients;
  for (const placement::NodeInfo& n : initial) {
    KVR_ASSIGN_OR_RETURN(std::unique_ptr<GrpcRetrievalClient> c,
                         GrpcRetrievalClient::Create(n.address, grpc_options));
    KVR_RETURN_IF_ERROR(c->WaitForReady(options.connect_timeout));
    grpc_clients.push_back(c.get());
    clients.push_back(std::move(c));
  }
  // Nodes joining later are watched too; their health goes to the client
  // once it exists (a report before that is dropped: the node starts up).
  auto sink = std::make_shared<std::function<void(const std::string&, bool)>>();
  auto sink_mu = std::make_shared<std::mutex>();
  const MultiNodeClient::Connector connect =
      [sink, sink_mu, grpc_options](
          const placement::NodeInfo& node) -> absl::StatusOr<std::unique_ptr<RetrievalClient>> {
    KVR_ASSIGN_OR_RETURN(std::unique_ptr<GrpcRetrievalClient> c,
                         GrpcRetrievalClient::Create(node.address, grpc_options));
    c->WatchHealth([sink, sink_mu, id = node.id](bool serving) {
      std::function<void(const std::string&, bool)> f;
      {
        std::lock_guard<std::mutex> lock(*sink_mu);
        f = *sink;
      }
      if (f) f(id, serving);
    });
    return std::unique_ptr<RetrievalClient>(std::move(c));
  };
  std::vector<std::string> ids;
  for (const placement::NodeInfo& n : initial) ids.push_back(n.id);
  KVR_ASSIGN_OR_RETURN(
      std::unique_ptr<MultiNodeClient> multi,
      MultiNodeClient::Create(std::move(initial), std::move(clients), connect, mo));
  {
    std::lock_guard<std::mutex> lock(*sink_mu);
    *sink = multi->health_sink();
  }
  for (size_t i = 0; i < grpc_clients.size(); ++i) {
    grpc_clients[i]->WatchHealth(
        [f = multi->health_sink(), id = ids[i]](bool serving) { f(id, serving); });
  }
  if (membership != nullptr) {
    std::function<void(const absl::Status&)> on_error = options.on_node_set_error;
    if (!on_error) {
      on_error = [](const absl::Status& s) {
        std::fprintf(stderr, "kvr: keeping the previous node set: %s\n",
                     std::string(s.message()).c_str());
      };
    }
    multi->Follow(std::move(membership), std::move(on_error));
  }
  return std::unique_ptr<RetrievalClient>(std::move(multi));
}

#else

absl::StatusOr<std::unique_ptr<RetrievalClient>> ConnectNodes(
    const std::string& spec, const RetrievalClientOptions& /*options*/) {
  return absl::UnimplementedError(
      absl::StrCat("--nodes ", spec, ": this build has no networked retrieval clients "
                   "(built without KVR_WITH_SERVICES)"));
}

#endif  // KVR_WITH_REMOTE_CLIENTS

}  // namespace

absl::StatusOr<std::unique_ptr<RetrievalClient>> MakeRetrievalClient(
    std::string_view nodes, const RetrievalClientOptions& options) {
  if (nodes.empty()) {
    KVR_ASSIGN_OR_RETURN(std::unique_ptr<InProcessRetrievalClient> client,
                         InProcessRetrievalClient::Create(options.in_process));
    return std::unique_ptr<RetrievalClient>(std::move(client));
  }
  return ConnectNodes(std::string(nodes), options);
}

}  // namespace kvr::retrieval
