// MakeRetrievalClient: the RetrievalClient a --nodes flag names. Every binary
// that takes --nodes (kvr_worker, `kvr generate`) builds its client here.
//
//   ""                  a retrieval node in this process
//                       (InProcessRetrievalClient over a new NodeCore)
//   host:port,...       these kvr_node servers over gRPC, shards placed by
//                       rendezvous hashing (MultiNodeClient)
//   dns:///name:port    every A/AAAA record of `name` (a Kubernetes headless
//                       service), re-resolved every `refresh`; each new
//                       sequence is placed on the set current when it starts,
//                       running ones keep theirs (services/infra/membership)
//   id=host:port,...    a fixed set with stable node ids (placement hashes
//                       the ids, so nodes may change address)
//
// Replication (networked specs): each chunk lives on `replicas` nodes
// (0 = the default: 2 when the spec names >= 2 nodes at start, else 1); a
// sequence created while fewer nodes are live gets fewer (with a warning on
// stderr) and counts as under-replicated. Every node's health is watched
// (grpc.health.v1 Watch + keepalive): a dead node is routed around within
// about a second, a returning one re-synced from a live replica first.
//
// The nodes known at start must accept a connection within
// `connect_timeout` (a typo fails here, not at the first request); nodes
// that join later connect lazily (a node not up yet fails the calls placed
// on it, not the membership change). Built without KVR_WITH_SERVICES, only
// the in-process node is available.
#pragma once

#include <functional>
#include <memory>
#include <string_view>

#include "absl/time/time.h"
#include "common/status.h"
#include "retrieval_node/client/retrieval_client.h"
#include "retrieval_node/core/node_core.h"

namespace grpc {
class ChannelCredentials;
}  // namespace grpc

namespace kvr::retrieval {

struct RetrievalClientOptions {
  // The in-process node's options (empty spec only).
  NodeCoreOptions in_process;
  // How long each node known at start may take to accept a connection.
  absl::Duration connect_timeout = absl::Seconds(5);
  // dns:/// only: time between re-resolutions (> 0).
  absl::Duration refresh = absl::Seconds(10);
  // Owners per chunk for networked specs: 0 = default (see above), else
  // in [1, 64].
  int replicas = 0;
  // A changed node set the client refuses (the previous set stays in use).
  // Null: one line on stderr.
  std::function<void(const absl::Status&)> on_node_set_error;
  // Credentials of the channels to networked nodes (services/infra/security:
  // mTLS presenting this process's certificate); null = plaintext.
  std::shared_ptr<grpc::ChannelCredentials> credentials;
};

// The client for `nodes` (see the file comment); num_nodes() is the set a
// new sequence is placed on. InvalidArgument naming --nodes for a malformed
// spec; NotFound for a DNS name without addresses; DeadlineExceeded /
// Unavailable for a node that does not answer; Unimplemented for a
// non-empty spec in a build without the services.
absl::StatusOr<std::unique_ptr<RetrievalClient>> MakeRetrievalClient(
    std::string_view nodes, const RetrievalClientOptions& options = {});

}  // namespace kvr::retrieval
