// A kvr.v1.Generation Generate stream as a test's client sees it: the text
// and token ids of its chunks concatenated, its summary and its status.
// Shared by the e2e tests that compare streams (a worker's own output is the
// oracle for what the gateway streams).
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "grpcpp/client_context.h"
#include "kvr/v1/generation.grpc.pb.h"

namespace kvr::test_support {

struct GenerateStream {
  std::string text;
  std::vector<int32_t> tokens;
  std::optional<v1::GenerateFinal> summary;
  grpc::Status status;

  // Adds one response: a chunk's text and ids, or the summary (progress
  // messages carry neither).
  void Append(const v1::GenerateResponse& msg) {
    if (msg.has_chunk()) {
      text += msg.chunk().text();
      tokens.insert(tokens.end(), msg.chunk().token_ids().begin(), msg.chunk().token_ids().end());
    } else if (msg.has_summary()) {
      summary = msg.summary();
    }
  }
};

// Reads the whole stream of `request` from `stub`, bounded by `timeout`,
// sending `metadata` (e.g. {"authorization", "Bearer <key>"}) with the call.
inline GenerateStream ReadGenerate(
    v1::Generation::Stub* stub, const v1::GenerateRequest& request,
    std::chrono::milliseconds timeout,
    const std::vector<std::pair<std::string, std::string>>& metadata = {}) {
  GenerateStream out;
  grpc::ClientContext ctx;
  for (const auto& [key, value] : metadata) ctx.AddMetadata(key, value);
  ctx.set_deadline(std::chrono::system_clock::now() + timeout);
  auto reader = stub->Generate(&ctx, request);
  v1::GenerateResponse msg;
  while (reader->Read(&msg)) out.Append(msg);
  out.status = reader->Finish();
  return out;
}

// A stream of several choices (GenerateRequest.n / prompts): each choice's
// chunks and final, by GenerateChunk.index / GenerateFinal.index, and the
// call's status (in every choice's `status` too).
struct GenerateChoices {
  std::map<int, GenerateStream> by_index;
  int finals = 0;  // GenerateFinal messages received
  grpc::Status status;
};

// ReadGenerate for a stream of several choices.
inline GenerateChoices ReadGenerateChoices(v1::Generation::Stub* stub,
                                           const v1::GenerateRequest& request,
                                           std::chrono::milliseconds timeout) {
  GenerateChoices out;
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + timeout);
  auto reader = stub->Generate(&ctx, request);
  v1::GenerateResponse msg;
  while (reader->Read(&msg)) {
    if (msg.has_chunk()) out.by_index[msg.chunk().index()].Append(msg);
    if (msg.has_summary()) {
      out.by_index[msg.summary().index()].Append(msg);
      ++out.finals;
    }
  }
  out.status = reader->Finish();
  for (auto& [index, choice] : out.by_index) choice.status = out.status;
  return out;
}

}  // namespace kvr::test_support
