// What the service harnesses (node_service, worker) share: a reader that
// turns fuzzer bytes into small or raw field values, a bounded generator of
// tensor bytes, and an in-process gRPC server around one callback service
// (no sockets: grpc::Server::InProcessChannel).
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <string_view>

#include "fuzz/service_ops.h"
#include "grpcpp/client_context.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/server.h"
#include "grpcpp/server_builder.h"

namespace kvr::fuzz {

// Reads the fuzzer's bytes front to back; past the end every read gives 0
// (so any prefix of an input is itself a valid op stream).
//
// Field values: Small(n) reads one byte b and gives b % n for b < 0xF0,
// -1 - (b & 7) for 0xF0..0xF7, and a raw 4 / 8 byte value for 0xF8..0xFF
// (Int32 / Int64 / Uint64 variants), so both the common small values and
// the extremes a hostile client sends are one mutation away.
class ByteReader {
 public:
  ByteReader(const uint8_t* data, size_t size) : data_(data), size_(size) {}

  bool done() const { return pos_ >= size_; }
  size_t left() const { return size_ - pos_; }

  uint8_t Byte() { return pos_ < size_ ? data_[pos_++] : 0; }

  // Up to `n` bytes (fewer at the end).
  std::string Bytes(size_t n) {
    n = std::min(n, left());
    std::string out(reinterpret_cast<const char*>(data_ + pos_), n);
    pos_ += n;
    return out;
  }

  // A length-prefixed blob: 2 bytes of length (little endian), then up to
  // that many bytes.
  std::string Blob() {
    const size_t n = Byte() | (size_t{Byte()} << 8);
    return Bytes(n);
  }

  // Everything left.
  std::string Rest() { return Bytes(left()); }

  uint64_t Raw(int bytes) {
    uint64_t v = 0;
    for (int i = 0; i < bytes; ++i) v |= uint64_t{Byte()} << (8 * i);
    return v;
  }

  int32_t Int32(int32_t n) {
    const uint8_t b = Byte();
    if (b < 0xF0) return n > 0 ? b % n : b;
    if (b < 0xF8) return -1 - (b & 7);
    return static_cast<int32_t>(static_cast<uint32_t>(Raw(4)));
  }
  int64_t Int64(int64_t n) {
    const uint8_t b = Byte();
    if (b < 0xF0) return n > 0 ? b % n : b;
    if (b < 0xF8) return -1 - (b & 7);
    return static_cast<int64_t>(Raw(8));
  }
  uint64_t Uint64(uint64_t n) {
    const uint8_t b = Byte();
    if (b < 0xF0) return n > 0 ? b % n : b;
    return Raw(8);
  }
  // A float field: 0, 1, a few in-range values, and NaN / ±Inf / negative.
  float Float() {
    const uint8_t b = Byte();
    switch (b) {
      case 0xFF: return std::numeric_limits<float>::quiet_NaN();
      case 0xFE: return std::numeric_limits<float>::infinity();
      case 0xFD: return -std::numeric_limits<float>::infinity();
      case 0xFC: return -1.0f;
      case 0xFB: {
        const auto bits = static_cast<uint32_t>(Raw(4));
        float f;
        std::memcpy(&f, &bits, sizeof(f));
        return f;
      }
      default: return static_cast<float>(b) / 64.0f;
    }
  }

 private:
  const uint8_t* data_;
  size_t size_;
  size_t pos_ = 0;
};

// Element bytes of a kvr.v1 DType value (1 f32, 2 bf16, 3 f16); others 4.
inline size_t DTypeBytes(int dtype) { return dtype == 2 || dtype == 3 ? 2 : 4; }

// Generates tensor bytes for the harnesses, at most `budget` bytes per input
// in all (so a header that declares a huge tensor costs nothing: the data
// simply stops at the budget and the request is short).
class TensorFill {
 public:
  explicit TensorFill(size_t budget) : budget_(budget) {}

  // `count` elements of `dtype` (kvr.v1.DType; anything else is written as
  // 4-byte f32): small finite values from `seed`, with element `nan_at`
  // (if < count) NaN. Truncated to what is left of the budget.
  std::string Values(int64_t count, int dtype, uint8_t seed, int64_t nan_at = -1) {
    const size_t width = DTypeBytes(dtype);
    const int64_t fit = static_cast<int64_t>(budget_ / width);
    const int64_t n = std::clamp<int64_t>(count, 0, fit);
    std::string out(static_cast<size_t>(n) * width, '\0');
    // f32, bf16 and f16 bit patterns of 0, 0.5, 1, -1, 2, -0.5; NaN last.
    static constexpr uint32_t kF32[] = {0x00000000, 0x3F000000, 0x3F800000, 0xBF800000,
                                        0x40000000, 0xBF000000, 0x7FC00000};
    static constexpr uint16_t kBf16[] = {0x0000, 0x3F00, 0x3F80, 0xBF80, 0x4000, 0xBF00, 0x7FC0};
    static constexpr uint16_t kF16[] = {0x0000, 0x3800, 0x3C00, 0xBC00, 0x4000, 0xB800, 0x7E00};
    for (int64_t i = 0; i < n; ++i) {
      const size_t pick = i == nan_at ? 6 : static_cast<size_t>((i * 37 + seed) % 6);
      char* at = out.data() + static_cast<size_t>(i) * width;
      if (width == 4) {
        std::memcpy(at, &kF32[pick], 4);
      } else {
        std::memcpy(at, dtype == 2 ? &kBf16[pick] : &kF16[pick], 2);
      }
    }
    budget_ -= out.size();
    return out;
  }

  // `count` int32 ids in [-1, limit] (both ends out of range), from `seed`.
  std::string Ids(int64_t count, int64_t limit, uint8_t seed) {
    const int64_t n = std::clamp<int64_t>(count, 0, static_cast<int64_t>(budget_ / 4));
    std::string out(static_cast<size_t>(n) * 4, '\0');
    const int64_t span = std::max<int64_t>(limit, 0) + 2;
    for (int64_t i = 0; i < n; ++i) {
      const auto id = static_cast<int32_t>((i * 7 + seed) % span - 1);
      std::memcpy(out.data() + static_cast<size_t>(i) * 4, &id, 4);
    }
    budget_ -= out.size();
    return out;
  }

 private:
  size_t budget_;
};

// How a harness's client reaches its server.
enum class Transport {
  // grpc::Server::InProcessChannel, no socket. gRPC 1.51's in-process
  // transport keeps both call objects of a client stream alive for good
  // when the server finishes the call before reading the client's
  // half-close (an UploadShard refused at its header: ~64 KiB per call, so
  // a long node_service run hit libFuzzer's RSS limit); over HTTP/2 the
  // same calls are freed. Fine for harnesses without client streams.
  kInProcess,
  // A listening port on 127.0.0.1 chosen at run time and a channel to it:
  // the HTTP/2 transport the servers really run, and an address another
  // in-process server can dial (SyncShards' source).
  kLoopback,
};

// A grpc::Server with `service` registered, reached through channel() (see
// Transport). Built once per harness process.
template <typename Service>
class InProcessServer {
 public:
  explicit InProcessServer(Service* service, Transport transport = Transport::kInProcess) {
    grpc::ServerBuilder builder;
    builder.RegisterService(service);
    int port = 0;
    if (transport == Transport::kLoopback) {
      builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    }
    server_ = builder.BuildAndStart();
    if (server_ == nullptr || (transport == Transport::kLoopback && port == 0)) std::abort();
    grpc::ChannelArguments args;
    if (transport == Transport::kLoopback) {
      address_ = "127.0.0.1:" + std::to_string(port);
      channel_ = grpc::CreateCustomChannel(address_, grpc::InsecureChannelCredentials(), args);
    } else {
      channel_ = server_->InProcessChannel(args);
    }
  }
  std::shared_ptr<grpc::Channel> channel() const { return channel_; }
  // "127.0.0.1:PORT" with Transport::kLoopback, "" otherwise.
  const std::string& address() const { return address_; }

 private:
  std::unique_ptr<grpc::Server> server_;
  std::shared_ptr<grpc::Channel> channel_;
  std::string address_;
};

// Sets a deadline `ms` milliseconds away (the services refuse calls without
// one, or with one past their cap: see NodeServiceOptions::max_deadline_seconds).
inline void SetDeadline(grpc::ClientContext* context, int64_t ms) {
  context->set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(ms));
}

}  // namespace kvr::fuzz
