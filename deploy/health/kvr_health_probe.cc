// kvr_health_probe: the container HEALTHCHECK of the kvr images. Asks a
// server's grpc.health.v1.Health/Check and exits 0 when it answers SERVING.
//
//   kvr_health_probe [--addr=127.0.0.1:7000] [--service=kvr.v1.RetrievalNode]
//                    [--timeout_ms=2000]
//                    [--tls_cert_file=PEM --tls_key_file=PEM --tls_ca_file=PEM]
//
// With the three --tls_* files (the server's own, in its container) the probe
// speaks mTLS like the servers' peers (grpc.health.v1 is open to any
// CA-signed peer); some but not all of them is a bad argument.
//
// Exit 0: SERVING; 1: any other status, an RPC error or the deadline (the
// reason on stderr); 2: bad arguments. Kubernetes does not need it (the chart
// uses native gRPC probes); Docker and docker-compose do, and Debian ships no
// gRPC health client, so the images carry this one, built from the project's
// grpc.health.v1 stubs.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>

#include <grpcpp/grpcpp.h>

#include "grpc/health/v1/health.grpc.pb.h"
#include "services/infra/security/tls_credentials.h"

namespace {

int Usage(const std::string& message) {
  std::fprintf(stderr,
               "kvr_health_probe: %s\n"
               "usage: kvr_health_probe [--addr=HOST:PORT] [--service=NAME] "
               "[--timeout_ms=1..60000]\n"
               "       [--tls_cert_file=PEM --tls_key_file=PEM --tls_ca_file=PEM]\n",
               message.c_str());
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  std::string addr = "127.0.0.1:7000";
  std::string service;  // "": the server as a whole
  long timeout_ms = 2000;
  std::string cert_file, key_file, ca_file;
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    const size_t eq = arg.find('=');
    const std::string_view key = arg.substr(0, eq);
    const std::string value(eq == std::string_view::npos ? "" : arg.substr(eq + 1));
    if (key == "--addr" && !value.empty()) {
      addr = value;
    } else if (key == "--service") {
      service = value;
    } else if (key == "--tls_cert_file") {
      cert_file = value;
    } else if (key == "--tls_key_file") {
      key_file = value;
    } else if (key == "--tls_ca_file") {
      ca_file = value;
    } else if (key == "--timeout_ms") {
      char* end = nullptr;
      timeout_ms = std::strtol(value.c_str(), &end, 10);
      if (value.empty() || *end != '\0' || timeout_ms < 1 || timeout_ms > 60000) {
        return Usage("--timeout_ms must be an integer in [1, 60000], got '" + value + "'");
      }
    } else {
      return Usage("unknown argument '" + std::string(arg) + "'");
    }
  }

  const absl::StatusOr<std::optional<kvr::security::TlsFiles>> tls =
      kvr::security::CheckTlsFiles(cert_file, key_file, ca_file, /*reload_seconds=*/10);
  if (!tls.ok()) return Usage(std::string(tls.status().message()));
  auto stub = grpc::health::v1::Health::NewStub(grpc::CreateChannel(
      addr, tls->has_value() ? kvr::security::MakeMtlsChannelCredentials(**tls)
                             : grpc::InsecureChannelCredentials()));
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(timeout_ms));
  grpc::health::v1::HealthCheckRequest request;
  request.set_service(service);
  grpc::health::v1::HealthCheckResponse response;
  const grpc::Status status = stub->Check(&context, request, &response);
  if (!status.ok()) {
    std::fprintf(stderr, "kvr_health_probe: %s: Check(\"%s\") failed: %s\n", addr.c_str(),
                 service.c_str(), status.error_message().c_str());
    return 1;
  }
  if (response.status() != grpc::health::v1::HealthCheckResponse::SERVING) {
    std::fprintf(stderr, "kvr_health_probe: %s: \"%s\" is %s\n", addr.c_str(), service.c_str(),
                 grpc::health::v1::HealthCheckResponse::ServingStatus_Name(response.status())
                     .c_str());
    return 1;
  }
  return 0;
}
