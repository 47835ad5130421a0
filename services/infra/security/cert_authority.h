// A throwaway certificate authority for local clusters and tests: makes a CA
// and per-role leaf certificates with the OpenSSL 3 library (EC P-256 keys,
// X.509 v3, ECDSA-SHA256 signatures; no `openssl` command, no hand-written
// ASN.1) and writes them as PEM files.
//
// Certificates and keys travel as PEM text (CertAndKey), so callers never see
// OpenSSL types. Every failure is a Status; OpenSSL's own errors carry the
// OpenSSL error string. All functions are thread-safe (no shared state).
#pragma once

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"

namespace kvr::security {

// A certificate and its private key, both PEM ("-----BEGIN CERTIFICATE-----",
// "-----BEGIN PRIVATE KEY-----": unencrypted PKCS#8).
struct CertAndKey {
  std::string cert_pem;
  std::string key_pem;
};

// Bounds on what callers may ask for (inputs may come from flags).
// RFC 5280's ub-common-name.
inline constexpr size_t kMaxCommonNameBytes = 64;
// DNS names: RFC 1035's 253 characters; at most this many of each SAN kind.
inline constexpr size_t kMaxDnsNameBytes = 253;
inline constexpr size_t kMaxSans = 64;
// Validity in [kMinValidity, kMaxValidity].
inline constexpr absl::Duration kMinValidity = absl::Seconds(1);
inline constexpr absl::Duration kMaxValidity = absl::Hours(24 * 825);
// Certificates start being valid this long before they are made, so peers
// whose clocks are a little behind accept them at once.
inline constexpr absl::Duration kBackdate = absl::Minutes(5);
// The default validity of both the CA and its leaves: a throwaway CA.
inline constexpr absl::Duration kDefaultValidity = absl::Hours(24);

// A self-signed CA certificate with Subject CN `cn` (also the issuer),
// basicConstraints CA:TRUE, pathlen 0 (critical: it signs leaves only),
// keyUsage keyCertSign + cRLSign (critical), a subject
// key identifier, a random positive 128-bit serial, valid from now -
// kBackdate to now + `validity`, and a new EC P-256 key.
// InvalidArgument naming the field when `cn` is empty, longer than
// kMaxCommonNameBytes or has a control character, or `validity` is outside
// [kMinValidity, kMaxValidity]; Internal with OpenSSL's error string when a
// library call fails.
absl::StatusOr<CertAndKey> MakeCa(absl::string_view cn,
                                  absl::Duration validity = kDefaultValidity);

// A leaf certificate for a role, signed by `ca` (a CertAndKey made by MakeCa
// or read from PEM files): Subject CN `role_cn` (e.g. "kvr-node"), issuer the
// CA's subject, subjectAltName with `dns_sans` (DNS names) and `ip_sans`
// (IPv4 or IPv6 literals, e.g. "127.0.0.1", "::1"), extendedKeyUsage
// serverAuth + clientAuth, keyUsage digitalSignature (critical),
// basicConstraints CA:FALSE (critical), subject and authority key
// identifiers, a random positive 128-bit serial, valid from now - kBackdate
// to now + `validity` (not clamped to the CA's own expiry), a new EC P-256
// key. At least one SAN is required (TLS clients check the host against the
// SANs, not the CN). InvalidArgument naming the field and the limit for a bad
// CN (as MakeCa), more than kMaxSans DNS or IP names, a DNS name that is
// empty, longer than kMaxDnsNameBytes or not letters/digits/'-'/'.'/'*', an
// IP that does not parse, a bad validity, or a `ca` whose PEM does not parse
// or whose key does not match its certificate; Internal with OpenSSL's error
// string when a library call fails.
absl::StatusOr<CertAndKey> IssueCert(const CertAndKey& ca, absl::string_view role_cn,
                                     const std::vector<std::string>& dns_sans,
                                     const std::vector<std::string>& ip_sans,
                                     absl::Duration validity = kDefaultValidity);

// Writes `contents` to `path` atomically with permission bits `mode`: a new
// temporary file beside it, created with O_EXCL and `mode` (never readable
// by others in between), written, fsync'ed, then renamed over `path`. A
// reader (a certificate watcher) sees the old file or the new one, never a
// part. Errors name the path and errno's text.
absl::Status WriteFileAtomically(const std::string& path, absl::string_view contents,
                                 unsigned mode);

// Writes a certificate (mode 0644) and its key (mode 0600), each with
// WriteFileAtomically; the key first, so a watcher that sees the new
// certificate finds its key already in place.
absl::Status WriteCertAndKey(const CertAndKey& cert, const std::string& cert_path,
                             const std::string& key_path);

// Reads a whole file (at most `max_bytes`; OutOfRange past it).
absl::StatusOr<std::string> ReadSmallFile(const std::string& path, size_t max_bytes = 1 << 20);

}  // namespace kvr::security
