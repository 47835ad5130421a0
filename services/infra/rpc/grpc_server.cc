#include "services/infra/rpc/grpc_server.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/resource_quota.h>

#include <pthread.h>

#include <chrono>
#include <cstdio>

#include "absl/strings/str_cat.h"

namespace kvr::rpc {

sigset_t BlockStopSignals() {
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);
  return stop_signals;
}

absl::Status ServeUntilSignal(const std::vector<grpc::Service*>& services,
                              const ServeOptions& options, const sigset_t& stop_signals) {
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  int port = 0;
  grpc::ServerBuilder builder;
  // No SO_REUSEPORT (gRPC's default on Linux): a second server on a port in
  // use must fail to start, not silently share its connections, and port 0
  // must never hand out a port another server already listens on.
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  // Clients (GrpcRetrievalClient) ping every ~500 ms, idle or not, to find a
  // hung peer within a second; accept that instead of answering GOAWAY.
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS, 100);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  builder.AddListeningPort(options.listen,
                           options.credentials != nullptr ? options.credentials
                                                          : grpc::InsecureServerCredentials(),
                           &port);
  builder.SetMaxReceiveMessageSize(options.max_message_bytes);
  builder.SetMaxSendMessageSize(options.max_message_bytes);
  if (options.max_concurrent_streams > 0) {
    builder.AddChannelArgument(GRPC_ARG_MAX_CONCURRENT_STREAMS, options.max_concurrent_streams);
  }
  grpc::ResourceQuota quota(options.name + "_server");
  if (options.memory_quota_bytes > 0) quota.Resize(static_cast<size_t>(options.memory_quota_bytes));
  if (options.max_threads > 0) quota.SetMaxThreads(options.max_threads);
  builder.SetResourceQuota(quota);
  for (grpc::Service* service : services) builder.RegisterService(service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || port == 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen on ", options.listen));
  }
  grpc::HealthCheckServiceInterface* health = server->GetHealthCheckService();
  for (const std::string& name : options.health_services) health->SetServingStatus(name, true);
  health->SetServingStatus(true);

  const size_t colon = options.listen.rfind(':');
  const std::string host =
      colon == std::string::npos ? options.listen : options.listen.substr(0, colon);
  std::printf("%s listening on %s:%d\n", options.name.c_str(), host.c_str(), port);
  std::fflush(stdout);

  int signal = 0;
  sigwait(&stop_signals, &signal);
  std::fprintf(stderr, "%s: signal %d, draining\n", options.name.c_str(), signal);
  health->SetServingStatus(false);
  const auto drain = std::chrono::duration_cast<std::chrono::system_clock::duration>(
      std::chrono::duration<double>(options.drain_seconds));
  // Shutdown returns once every call finished (calls still running at the
  // deadline are cancelled; their reactors still finish from their pools).
  server->Shutdown(std::chrono::system_clock::now() + drain);
  server->Wait();
  return absl::OkStatus();
}

}  // namespace kvr::rpc
