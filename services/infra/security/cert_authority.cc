#include "services/infra/security/cert_authority.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <ctime>
#include <memory>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status.h"

namespace kvr::security {
namespace {

// Owning handles for the OpenSSL objects used here.
struct PkeyFree {
  void operator()(EVP_PKEY* p) const { EVP_PKEY_free(p); }
};
struct X509Free {
  void operator()(X509* p) const { X509_free(p); }
};
struct BioFree {
  void operator()(BIO* p) const { BIO_free(p); }
};
struct BnFree {
  void operator()(BIGNUM* p) const { BN_free(p); }
};
struct ExtFree {
  void operator()(X509_EXTENSION* p) const { X509_EXTENSION_free(p); }
};
struct NamesFree {
  void operator()(GENERAL_NAMES* p) const { GENERAL_NAMES_free(p); }
};
struct NameFree {
  void operator()(GENERAL_NAME* p) const { GENERAL_NAME_free(p); }
};
using Pkey = std::unique_ptr<EVP_PKEY, PkeyFree>;
using Cert = std::unique_ptr<X509, X509Free>;
using Bio = std::unique_ptr<BIO, BioFree>;

// Internal: "<what>: <OpenSSL's queued errors>" (drains the thread's error
// queue; "no OpenSSL error queued" when it was empty).
absl::Status OpenSslError(absl::string_view what) {
  std::vector<std::string> errors;
  for (unsigned long e = ERR_get_error(); e != 0; e = ERR_get_error()) {
    char buf[256];
    ERR_error_string_n(e, buf, sizeof(buf));
    errors.emplace_back(buf);
  }
  if (errors.empty()) errors.emplace_back("no OpenSSL error queued");
  return absl::InternalError(absl::StrCat(what, ": ", absl::StrJoin(errors, "; ")));
}

absl::Status CheckCommonName(absl::string_view field, absl::string_view cn) {
  if (cn.empty()) return absl::InvalidArgumentError(absl::StrCat(field, " is empty"));
  if (cn.size() > kMaxCommonNameBytes) {
    return absl::InvalidArgumentError(absl::StrCat(field, " has ", cn.size(),
                                                   " bytes, more than the limit of ",
                                                   kMaxCommonNameBytes));
  }
  for (char c : cn) {
    const auto u = static_cast<unsigned char>(c);
    if (u < 0x20 || u == 0x7f) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, " has a control character (byte ", static_cast<int>(u), ")"));
    }
  }
  return absl::OkStatus();
}

absl::Status CheckValidity(absl::Duration validity) {
  if (validity < kMinValidity || validity > kMaxValidity) {
    return absl::InvalidArgumentError(absl::StrCat(
        "validity ", absl::FormatDuration(validity), " outside [",
        absl::FormatDuration(kMinValidity), ", ", absl::FormatDuration(kMaxValidity), "]"));
  }
  return absl::OkStatus();
}

absl::Status CheckDnsName(absl::string_view name) {
  if (name.empty()) return absl::InvalidArgumentError("dns_sans has an empty name");
  if (name.size() > kMaxDnsNameBytes) {
    return absl::InvalidArgumentError(absl::StrCat("dns_sans name of ", name.size(),
                                                   " bytes exceeds the limit of ",
                                                   kMaxDnsNameBytes));
  }
  for (char c : name) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                    c == '-' || c == '.' || c == '*';
    if (!ok) {
      return absl::InvalidArgumentError(
          absl::StrCat("dns_sans name \"", absl::CEscape(name),
                       "\" may hold only letters, digits, '-', '.' and '*'"));
    }
  }
  return absl::OkStatus();
}

// A new EC P-256 key pair.
absl::StatusOr<Pkey> NewKey() {
  Pkey key(EVP_PKEY_Q_keygen(nullptr, nullptr, "EC", "P-256"));
  if (!key) return OpenSslError("generating an EC P-256 key");
  return key;
}

// A certificate with version 3, a random positive 128-bit serial, validity
// [now - kBackdate, now + validity], Subject CN `cn`, and `key`'s public key.
absl::StatusOr<Cert> NewCert(absl::string_view cn, absl::Duration validity, EVP_PKEY* key) {
  Cert cert(X509_new());
  if (!cert) return OpenSslError("X509_new");
  if (X509_set_version(cert.get(), X509_VERSION_3) != 1) return OpenSslError("X509_set_version");

  std::unique_ptr<BIGNUM, BnFree> serial(BN_new());
  if (!serial) return OpenSslError("BN_new");
  do {
    unsigned char bytes[16];
    if (RAND_bytes(bytes, sizeof(bytes)) != 1) return OpenSslError("RAND_bytes (serial)");
    if (BN_bin2bn(bytes, sizeof(bytes), serial.get()) == nullptr) return OpenSslError("BN_bin2bn");
  } while (BN_is_zero(serial.get()));  // RFC 5280: positive
  if (BN_to_ASN1_INTEGER(serial.get(), X509_get_serialNumber(cert.get())) == nullptr) {
    return OpenSslError("setting the serial number");
  }

  const absl::Time now = absl::Now();
  if (ASN1_TIME_set(X509_getm_notBefore(cert.get()), absl::ToTimeT(now - kBackdate)) == nullptr ||
      ASN1_TIME_set(X509_getm_notAfter(cert.get()), absl::ToTimeT(now + validity)) == nullptr) {
    return OpenSslError("setting the validity");
  }

  X509_NAME* subject = X509_get_subject_name(cert.get());
  if (X509_NAME_add_entry_by_NID(subject, NID_commonName, MBSTRING_UTF8,
                                 reinterpret_cast<const unsigned char*>(cn.data()),
                                 static_cast<int>(cn.size()), -1, 0) != 1) {
    return OpenSslError("setting the subject CN");
  }
  if (X509_set_pubkey(cert.get(), key) != 1) return OpenSslError("X509_set_pubkey");
  return cert;
}

// Adds extension `nid` = `value` (OpenSSL's X509V3 value syntax, e.g.
// "critical,CA:TRUE") to `cert`, with `issuer` for authorityKeyIdentifier.
absl::Status AddExtension(X509* cert, X509* issuer, int nid, const char* value) {
  X509V3_CTX ctx;
  X509V3_set_ctx_nodb(&ctx);
  X509V3_set_ctx(&ctx, issuer, cert, nullptr, nullptr, 0);
  std::unique_ptr<X509_EXTENSION, ExtFree> ext(X509V3_EXT_conf_nid(nullptr, &ctx, nid, value));
  if (!ext) return OpenSslError(absl::StrCat("making extension ", OBJ_nid2sn(nid), "=", value));
  if (X509_add_ext(cert, ext.get(), -1) != 1) {
    return OpenSslError(absl::StrCat("adding extension ", OBJ_nid2sn(nid)));
  }
  return absl::OkStatus();
}

// Adds subjectAltName with the (already checked) DNS names and IP literals.
absl::Status AddSubjectAltNames(X509* cert, const std::vector<std::string>& dns_sans,
                                const std::vector<std::string>& ip_sans) {
  std::unique_ptr<GENERAL_NAMES, NamesFree> names(sk_GENERAL_NAME_new_null());
  if (!names) return OpenSslError("sk_GENERAL_NAME_new_null");
  for (const std::string& dns : dns_sans) {
    std::unique_ptr<GENERAL_NAME, NameFree> name(GENERAL_NAME_new());
    ASN1_IA5STRING* value = ASN1_IA5STRING_new();
    if (!name || value == nullptr ||
        ASN1_STRING_set(value, dns.data(), static_cast<int>(dns.size())) != 1) {
      ASN1_IA5STRING_free(value);
      return OpenSslError("making a DNS name");
    }
    GENERAL_NAME_set0_value(name.get(), GEN_DNS, value);
    if (sk_GENERAL_NAME_push(names.get(), name.get()) == 0) return OpenSslError("adding a DNS name");
    name.release();  // owned by `names`
  }
  for (const std::string& ip : ip_sans) {
    unsigned char bytes[16];
    int length = 0;
    if (inet_pton(AF_INET, ip.c_str(), bytes) == 1) {
      length = 4;
    } else if (inet_pton(AF_INET6, ip.c_str(), bytes) == 1) {
      length = 16;
    } else {
      return absl::InvalidArgumentError(absl::StrCat(
          "ip_sans entry \"", absl::CEscape(ip), "\" is not an IPv4 or IPv6 address"));
    }
    std::unique_ptr<GENERAL_NAME, NameFree> name(GENERAL_NAME_new());
    ASN1_OCTET_STRING* value = ASN1_OCTET_STRING_new();
    if (!name || value == nullptr || ASN1_OCTET_STRING_set(value, bytes, length) != 1) {
      ASN1_OCTET_STRING_free(value);
      return OpenSslError("making an IP address name");
    }
    GENERAL_NAME_set0_value(name.get(), GEN_IPADD, value);
    if (sk_GENERAL_NAME_push(names.get(), name.get()) == 0) {
      return OpenSslError("adding an IP address name");
    }
    name.release();
  }
  if (X509_add1_ext_i2d(cert, NID_subject_alt_name, names.get(), 0, X509V3_ADD_DEFAULT) != 1) {
    return OpenSslError("adding subjectAltName");
  }
  return absl::OkStatus();
}

absl::StatusOr<CertAndKey> ToPem(X509* cert, EVP_PKEY* key) {
  CertAndKey out;
  for (int part = 0; part < 2; ++part) {
    Bio bio(BIO_new(BIO_s_mem()));
    if (!bio) return OpenSslError("BIO_new");
    const int ok = part == 0 ? PEM_write_bio_X509(bio.get(), cert)
                             : PEM_write_bio_PrivateKey(bio.get(), key, nullptr, nullptr, 0,
                                                        nullptr, nullptr);
    if (ok != 1) return OpenSslError(part == 0 ? "PEM-encoding the certificate"
                                               : "PEM-encoding the private key");
    char* data = nullptr;
    const long size = BIO_get_mem_data(bio.get(), &data);
    if (size <= 0 || data == nullptr) return OpenSslError("reading the PEM buffer");
    (part == 0 ? out.cert_pem : out.key_pem).assign(data, static_cast<size_t>(size));
  }
  return out;
}

// Parses the CA's PEM certificate and key; InvalidArgument when either does
// not parse, the key is not the certificate's, or the certificate is no CA.
absl::Status ParseCa(const CertAndKey& ca, Cert* cert, Pkey* key) {
  Bio cert_bio(BIO_new_mem_buf(ca.cert_pem.data(), static_cast<int>(ca.cert_pem.size())));
  Bio key_bio(BIO_new_mem_buf(ca.key_pem.data(), static_cast<int>(ca.key_pem.size())));
  if (!cert_bio || !key_bio) return OpenSslError("BIO_new_mem_buf");
  cert->reset(PEM_read_bio_X509(cert_bio.get(), nullptr, nullptr, nullptr));
  if (!*cert) {
    const absl::Status error = OpenSslError("parsing the CA certificate PEM");
    return absl::InvalidArgumentError(error.message());
  }
  key->reset(PEM_read_bio_PrivateKey(key_bio.get(), nullptr, nullptr, nullptr));
  if (!*key) {
    const absl::Status error = OpenSslError("parsing the CA private key PEM");
    return absl::InvalidArgumentError(error.message());
  }
  if (X509_check_private_key(cert->get(), key->get()) != 1) {
    ERR_clear_error();
    return absl::InvalidArgumentError("the CA private key does not match the CA certificate");
  }
  if (X509_check_ca(cert->get()) < 1) {
    return absl::InvalidArgumentError("the CA certificate is not a CA (basicConstraints)");
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<CertAndKey> MakeCa(absl::string_view cn, absl::Duration validity) {
  KVR_RETURN_IF_ERROR(CheckCommonName("cn", cn));
  KVR_RETURN_IF_ERROR(CheckValidity(validity));
  ERR_clear_error();
  KVR_ASSIGN_OR_RETURN(Pkey key, NewKey());
  KVR_ASSIGN_OR_RETURN(Cert cert, NewCert(cn, validity, key.get()));
  if (X509_set_issuer_name(cert.get(), X509_get_subject_name(cert.get())) != 1) {
    return OpenSslError("X509_set_issuer_name");
  }
  KVR_RETURN_IF_ERROR(
      AddExtension(cert.get(), cert.get(), NID_basic_constraints, "critical,CA:TRUE,pathlen:0"));
  KVR_RETURN_IF_ERROR(
      AddExtension(cert.get(), cert.get(), NID_key_usage, "critical,keyCertSign,cRLSign"));
  KVR_RETURN_IF_ERROR(AddExtension(cert.get(), cert.get(), NID_subject_key_identifier, "hash"));
  if (X509_sign(cert.get(), key.get(), EVP_sha256()) <= 0) return OpenSslError("signing the CA");
  return ToPem(cert.get(), key.get());
}

absl::StatusOr<CertAndKey> IssueCert(const CertAndKey& ca, absl::string_view role_cn,
                                     const std::vector<std::string>& dns_sans,
                                     const std::vector<std::string>& ip_sans,
                                     absl::Duration validity) {
  KVR_RETURN_IF_ERROR(CheckCommonName("role_cn", role_cn));
  KVR_RETURN_IF_ERROR(CheckValidity(validity));
  if (dns_sans.size() > kMaxSans || ip_sans.size() > kMaxSans) {
    return absl::InvalidArgumentError(absl::StrCat("dns_sans (", dns_sans.size(), ") or ip_sans (",
                                                   ip_sans.size(), ") exceeds the limit of ",
                                                   kMaxSans, " names"));
  }
  if (dns_sans.empty() && ip_sans.empty()) {
    return absl::InvalidArgumentError("dns_sans and ip_sans are both empty: need one SAN");
  }
  for (const std::string& dns : dns_sans) KVR_RETURN_IF_ERROR(CheckDnsName(dns));
  ERR_clear_error();
  Cert ca_cert;
  Pkey ca_key;
  KVR_RETURN_IF_ERROR(ParseCa(ca, &ca_cert, &ca_key));

  KVR_ASSIGN_OR_RETURN(Pkey key, NewKey());
  KVR_ASSIGN_OR_RETURN(Cert cert, NewCert(role_cn, validity, key.get()));
  if (X509_set_issuer_name(cert.get(), X509_get_subject_name(ca_cert.get())) != 1) {
    return OpenSslError("X509_set_issuer_name");
  }
  KVR_RETURN_IF_ERROR(
      AddExtension(cert.get(), ca_cert.get(), NID_basic_constraints, "critical,CA:FALSE"));
  KVR_RETURN_IF_ERROR(
      AddExtension(cert.get(), ca_cert.get(), NID_key_usage, "critical,digitalSignature"));
  KVR_RETURN_IF_ERROR(
      AddExtension(cert.get(), ca_cert.get(), NID_ext_key_usage, "serverAuth,clientAuth"));
  KVR_RETURN_IF_ERROR(
      AddExtension(cert.get(), ca_cert.get(), NID_subject_key_identifier, "hash"));
  KVR_RETURN_IF_ERROR(
      AddExtension(cert.get(), ca_cert.get(), NID_authority_key_identifier, "keyid:always"));
  KVR_RETURN_IF_ERROR(AddSubjectAltNames(cert.get(), dns_sans, ip_sans));
  if (X509_sign(cert.get(), ca_key.get(), EVP_sha256()) <= 0) {
    return OpenSslError("signing the certificate");
  }
  return ToPem(cert.get(), key.get());
}

absl::Status WriteFileAtomically(const std::string& path, absl::string_view contents,
                                 unsigned mode) {
  static std::atomic<uint64_t> counter{0};
  const std::string tmp = absl::StrCat(path, ".tmp-", getpid(), "-", counter.fetch_add(1));
  const int fd = open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode);
  if (fd < 0) {
    return absl::InternalError(absl::StrCat("creating ", tmp, ": ", std::strerror(errno)));
  }
  auto fail = [&](absl::string_view step) {
    const int saved = errno;
    close(fd);
    unlink(tmp.c_str());
    return absl::InternalError(absl::StrCat(step, " ", tmp, ": ", std::strerror(saved)));
  };
  // The umask may have cleared bits of `mode`; set exactly what was asked.
  if (fchmod(fd, static_cast<mode_t>(mode)) != 0) return fail("fchmod");
  size_t done = 0;
  while (done < contents.size()) {
    const ssize_t n = write(fd, contents.data() + done, contents.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      return fail("writing");
    }
    done += static_cast<size_t>(n);
  }
  if (fsync(fd) != 0) return fail("fsync");
  if (close(fd) != 0) {
    const int saved = errno;
    unlink(tmp.c_str());
    return absl::InternalError(absl::StrCat("closing ", tmp, ": ", std::strerror(saved)));
  }
  if (rename(tmp.c_str(), path.c_str()) != 0) {
    const int saved = errno;
    unlink(tmp.c_str());
    return absl::InternalError(
        absl::StrCat("renaming ", tmp, " to ", path, ": ", std::strerror(saved)));
  }
  return absl::OkStatus();
}

absl::Status WriteCertAndKey(const CertAndKey& cert, const std::string& cert_path,
                             const std::string& key_path) {
  KVR_RETURN_IF_ERROR(WriteFileAtomically(key_path, cert.key_pem, 0600));
  return WriteFileAtomically(cert_path, cert.cert_pem, 0644);
}

absl::StatusOr<std::string> ReadSmallFile(const std::string& path, size_t max_bytes) {
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    const int saved = errno;
    const std::string message = absl::StrCat("opening ", path, ": ", std::strerror(saved));
    return saved == ENOENT ? absl::NotFoundError(message) : absl::InternalError(message);
  }
  std::string out;
  char buf[65536];
  while (true) {
    const ssize_t n = read(fd, buf, sizeof(buf));
    if (n < 0) {
      if (errno == EINTR) continue;
      const int saved = errno;
      close(fd);
      return absl::InternalError(absl::StrCat("reading ", path, ": ", std::strerror(saved)));
    }
    if (n == 0) break;
    if (out.size() + static_cast<size_t>(n) > max_bytes) {
      close(fd);
      return absl::OutOfRangeError(
          absl::StrCat(path, " is larger than the limit of ", max_bytes, " bytes"));
    }
    out.append(buf, static_cast<size_t>(n));
  }
  close(fd);
  return out;
}

}  // namespace kvr::security
