#include "retrieval_node/core/sequence_access.h"

#include <cstring>
#include <memory>

#include "absl/strings/str_cat.h"
#include "openssl/crypto.h"
#include "openssl/evp.h"
#include "openssl/rand.h"
#include "openssl/sha.h"

namespace kvr::retrieval {

absl::StatusOr<std::string> RandomBytes(size_t n) {
  std::string out(n, '\0');
  if (n > static_cast<size_t>(INT32_MAX)) {
    return absl::InvalidArgumentError(absl::StrCat("RandomBytes: ", n, " bytes > 2^31 - 1"));
  }
  if (n > 0 &&
      RAND_bytes(reinterpret_cast<unsigned char*>(out.data()), static_cast<int>(n)) != 1) {
    return absl::InternalError("RandomBytes: the CSPRNG (RAND_bytes) failed");
  }
  return out;
}

absl::StatusOr<uint64_t> RandomSequenceId() {
  for (;;) {
    KVR_ASSIGN_OR_RETURN(const std::string bytes, RandomBytes(sizeof(uint64_t)));
    uint64_t id = 0;
    std::memcpy(&id, bytes.data(), sizeof(id));
    if (id != 0) return id;
  }
}

std::string Sha256(std::string_view bytes) {
  // The digest fetched once and one context per thread, reused: OpenSSL 3's
  // one-shot SHA256() fetches and allocates per call (~1 us for 16 bytes).
  static EVP_MD* const md = EVP_MD_fetch(nullptr, "SHA256", nullptr);
  struct CtxFree {
    void operator()(EVP_MD_CTX* c) const { EVP_MD_CTX_free(c); }
  };
  thread_local const std::unique_ptr<EVP_MD_CTX, CtxFree> ctx(EVP_MD_CTX_new());
  std::string out(SHA256_DIGEST_LENGTH, '\0');
  auto* digest = reinterpret_cast<unsigned char*>(out.data());
  if (md == nullptr || ctx == nullptr || EVP_DigestInit_ex2(ctx.get(), md, nullptr) != 1 ||
      EVP_DigestUpdate(ctx.get(), bytes.data(), bytes.size()) != 1 ||
      EVP_DigestFinal_ex(ctx.get(), digest, nullptr) != 1) {
    SHA256(reinterpret_cast<const unsigned char*>(bytes.data()), bytes.size(), digest);
  }
  return out;
}

bool ConstantTimeEquals(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  if (a.empty()) return true;
  return CRYPTO_memcmp(a.data(), b.data(), a.size()) == 0;
}

absl::Status CheckCapability(std::string_view capability) {
  if (capability.empty() ||
      (capability.size() >= kMinCapabilityBytes && capability.size() <= kMaxCapabilityBytes)) {
    return absl::OkStatus();
  }
  return absl::InvalidArgumentError(absl::StrCat("capability has ", capability.size(),
                                                 " bytes, outside [", kMinCapabilityBytes, ", ",
                                                 kMaxCapabilityBytes, "]"));
}

absl::Status CheckLeaseOwner(std::string_view lease_owner, bool allow_empty) {
  if (lease_owner.size() > kMaxLeaseOwnerBytes || (!allow_empty && lease_owner.empty())) {
    return absl::InvalidArgumentError(absl::StrCat("lease_owner has ", lease_owner.size(),
                                                   " bytes, outside [", allow_empty ? 0 : 1, ", ",
                                                   kMaxLeaseOwnerBytes, "]"));
  }
  return absl::OkStatus();
}

}  // namespace kvr::retrieval
