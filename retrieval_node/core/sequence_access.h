// Tenant isolation primitives (docs/security.md "Tenant isolation"): the
// random values a worker picks for a sequence (its id, its capability, the
// process's lease owner) and how the node keeps and checks a capability
// (only its SHA-256, compared in constant time). OpenSSL's libcrypto does
// the hashing and the randomness.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "common/status.h"

namespace kvr::retrieval {

// A capability is 16..64 bytes (workers send 16 random bytes).
inline constexpr size_t kMinCapabilityBytes = 16;
inline constexpr size_t kMaxCapabilityBytes = 64;
// A lease owner id is 1..64 bytes (workers send 16 random bytes).
inline constexpr size_t kMaxLeaseOwnerBytes = 64;
// Bytes of the random capability and lease owner a worker picks.
inline constexpr size_t kCapabilityBytes = 16;

// `n` bytes from the operating system's CSPRNG (OpenSSL RAND_bytes).
// Internal when the generator fails (never silently weak).
absl::StatusOr<std::string> RandomBytes(size_t n);

// A random non-zero 64-bit sequence id (CSPRNG). Internal as RandomBytes.
absl::StatusOr<uint64_t> RandomSequenceId();

// SHA-256 of `bytes` (32 raw bytes).
std::string Sha256(std::string_view bytes);

// True when `a` and `b` are equal; for equal sizes the time does not
// depend on where they differ (CRYPTO_memcmp).
bool ConstantTimeEquals(std::string_view a, std::string_view b);

// OK for an empty capability (an open sequence) or one of
// kMinCapabilityBytes..kMaxCapabilityBytes; InvalidArgument naming
// `capability` and the limits otherwise.
absl::Status CheckCapability(std::string_view capability);

// OK for a lease owner of at most kMaxLeaseOwnerBytes (empty when
// `allow_empty`); InvalidArgument naming `lease_owner` otherwise.
absl::Status CheckLeaseOwner(std::string_view lease_owner, bool allow_empty);

}  // namespace kvr::retrieval
