// Asks a server for its service list through grpc.reflection.v1alpha over a
// generic bidi stream (Debian installs no reflection protos for clients).
#pragma once

#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"

namespace kvr::test_support {

// The raw ServerReflectionResponse bytes for list_services = "*": every
// service name appears in them verbatim.
inline absl::StatusOr<std::string> ReflectionListServices(const std::string& address) {
  auto channel = grpc::CreateChannel(address, grpc::InsecureChannelCredentials());
  grpc::GenericStub stub(channel);
  grpc::CompletionQueue cq;
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  auto call = stub.PrepareCall(
      &ctx, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", &cq);
  void* tag = nullptr;
  bool ok = false;
  // Waits for operation `want`; false when it failed or another completed.
  auto step = [&](intptr_t want) {
    return cq.Next(&tag, &ok) && reinterpret_cast<intptr_t>(tag) == want && ok;
  };
  auto drain = [&] {
    cq.Shutdown();
    while (cq.Next(&tag, &ok)) {
    }
  };
  std::string bytes;
  absl::Status result = absl::OkStatus();
  call->StartCall(reinterpret_cast<void*>(1));
  if (!step(1)) result = absl::UnavailableError("reflection: StartCall failed");
  if (result.ok()) {
    // ServerReflectionRequest { list_services = "*" } (field 7, string).
    const char request_bytes[] = {0x3a, 0x01, '*'};
    grpc::Slice slice(request_bytes, sizeof(request_bytes));
    grpc::ByteBuffer request(&slice, 1);
    call->Write(request, reinterpret_cast<void*>(2));
    if (!step(2)) result = absl::UnavailableError("reflection: Write failed");
  }
  if (result.ok()) {
    grpc::ByteBuffer reply;
    call->Read(&reply, reinterpret_cast<void*>(3));
    std::vector<grpc::Slice> slices;
    if (!step(3) || !reply.Dump(&slices).ok()) {
      result = absl::UnavailableError("reflection: Read failed");
    } else {
      for (const grpc::Slice& s : slices) {
        bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
      }
    }
  }
  if (result.ok()) {
    call->WritesDone(reinterpret_cast<void*>(4));
    if (!step(4)) result = absl::UnavailableError("reflection: WritesDone failed");
  }
  grpc::Status status;
  if (result.ok()) {
    call->Finish(&status, reinterpret_cast<void*>(5));
    if (!step(5) || !status.ok()) {
      result = absl::UnavailableError(
          absl::StrCat("reflection: Finish: ", status.error_message()));
    }
  } else {
    ctx.TryCancel();
  }
  drain();
  if (!result.ok()) return result;
  return bytes;
}

}  // namespace kvr::test_support
