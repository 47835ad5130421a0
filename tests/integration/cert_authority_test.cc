// kvr::cert_authority (services/infra/security/cert_authority.h): the CA and
// role certificates `kvr cluster --secure` makes, checked with OpenSSL's own
// verifier (X509_verify_cert): chain, purpose, CN, SANs, EKU, validity, key
// type; a certificate of another CA (even one named kvr-ca too) fails; hostile
// inputs are refused naming the field; files are written atomically with the
// key at mode 0600.
#include "services/infra/security/cert_authority.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>
#include <sys/stat.h>

#include <algorithm>
#include <ctime>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "tests/support/temp_dir.h"
#include "tests/support/x509_check.h"

namespace kvr::security {
namespace {

using ::testing::HasSubstr;

using ::kvr::test_support::CommonName;
using Cert = ::kvr::test_support::X509Ptr;

Cert ParseCert(const std::string& pem) { return ::kvr::test_support::ParsePemCert(pem); }

std::unique_ptr<EVP_PKEY, decltype(&EVP_PKEY_free)> ParseKey(const std::string& pem) {
  std::unique_ptr<BIO, decltype(&BIO_free)> bio(
      BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())), &BIO_free);
  return {PEM_read_bio_PrivateKey(bio.get(), nullptr, nullptr, nullptr), &EVP_PKEY_free};
}

int Verify(X509* leaf, X509* ca, int purpose, time_t at = 0) {
  return ::kvr::test_support::VerifyWithCa(leaf, ca, purpose, at);
}

// Seconds from `from` to `to`.
int64_t SecondsBetween(const ASN1_TIME* from, const ASN1_TIME* to) {
  int days = 0, seconds = 0;
  EXPECT_EQ(ASN1_TIME_diff(&days, &seconds, from, to), 1);
  return int64_t{days} * 86400 + seconds;
}

TEST(CertAuthorityTest, IssuedCertVerifiesWithRoleNameSansEkuAndValidity) {
  absl::StatusOr<CertAndKey> ca = MakeCa("kvr-ca");
  ASSERT_TRUE(ca.ok()) << ca.status();
  absl::StatusOr<CertAndKey> node =
      IssueCert(*ca, "kvr-node", {"localhost", "kvr-node.kvr.svc"}, {"127.0.0.1", "::1"},
                absl::Hours(2));
  ASSERT_TRUE(node.ok()) << node.status();
  EXPECT_THAT(ca->cert_pem, HasSubstr("-----BEGIN CERTIFICATE-----"));
  EXPECT_THAT(node->key_pem, HasSubstr("-----BEGIN PRIVATE KEY-----"));

  Cert ca_cert = ParseCert(ca->cert_pem);
  Cert leaf = ParseCert(node->cert_pem);
  ASSERT_TRUE(ca_cert && leaf);

  // The chain verifies for both TLS roles (server and client: mTLS).
  EXPECT_EQ(Verify(leaf.get(), ca_cert.get(), X509_PURPOSE_SSL_SERVER), X509_V_OK);
  EXPECT_EQ(Verify(leaf.get(), ca_cert.get(), X509_PURPOSE_SSL_CLIENT), X509_V_OK);

  // Names.
  EXPECT_EQ(CommonName(X509_get_subject_name(leaf.get())), "kvr-node");
  EXPECT_EQ(CommonName(X509_get_issuer_name(leaf.get())), "kvr-ca");
  EXPECT_EQ(CommonName(X509_get_subject_name(ca_cert.get())), "kvr-ca");
  EXPECT_EQ(CommonName(X509_get_issuer_name(ca_cert.get())), "kvr-ca");
  // SANs, matched the way a TLS client checks the target host.
  EXPECT_EQ(X509_check_host(leaf.get(), "localhost", 0, 0, nullptr), 1);
  EXPECT_EQ(X509_check_host(leaf.get(), "kvr-node.kvr.svc", 0, 0, nullptr), 1);
  EXPECT_EQ(X509_check_host(leaf.get(), "example.com", 0, 0, nullptr), 0);
  EXPECT_EQ(X509_check_ip_asc(leaf.get(), "127.0.0.1", 0), 1);
  EXPECT_EQ(X509_check_ip_asc(leaf.get(), "::1", 0), 1);
  EXPECT_EQ(X509_check_ip_asc(leaf.get(), "10.0.0.1", 0), 0);
  std::unique_ptr<GENERAL_NAMES, decltype(&GENERAL_NAMES_free)> sans(
      static_cast<GENERAL_NAMES*>(
          X509_get_ext_d2i(leaf.get(), NID_subject_alt_name, nullptr, nullptr)),
      &GENERAL_NAMES_free);
  ASSERT_NE(sans, nullptr);
  EXPECT_EQ(sk_GENERAL_NAME_num(sans.get()), 4);

  // Extended key usage: serverAuth and clientAuth; a leaf, not a CA.
  const uint32_t eku = X509_get_extended_key_usage(leaf.get());
  EXPECT_TRUE(eku & XKU_SSL_SERVER);
  EXPECT_TRUE(eku & XKU_SSL_CLIENT);
  EXPECT_EQ(X509_get_key_usage(leaf.get()), uint32_t{KU_DIGITAL_SIGNATURE});
  EXPECT_EQ(X509_check_ca(leaf.get()), 0);
  EXPECT_GE(X509_check_ca(ca_cert.get()), 1);
  EXPECT_EQ(X509_get_key_usage(ca_cert.get()), uint32_t{KU_KEY_CERT_SIGN | KU_CRL_SIGN});
  EXPECT_EQ(X509_get_version(leaf.get()), X509_VERSION_3);

  // Validity: [now - kBackdate, now + 2 h] for the leaf, + 1 day for the CA.
  EXPECT_EQ(SecondsBetween(X509_get0_notBefore(leaf.get()), X509_get0_notAfter(leaf.get())),
            absl::ToInt64Seconds(absl::Hours(2) + kBackdate));
  EXPECT_EQ(
      SecondsBetween(X509_get0_notBefore(ca_cert.get()), X509_get0_notAfter(ca_cert.get())),
      absl::ToInt64Seconds(kDefaultValidity + kBackdate));
  time_t now = std::time(nullptr);
  EXPECT_LT(X509_cmp_time(X509_get0_notBefore(leaf.get()), &now), 0);
  time_t in_119_minutes = now + 119 * 60, in_121_minutes = now + 121 * 60;
  EXPECT_GT(X509_cmp_time(X509_get0_notAfter(leaf.get()), &in_119_minutes), 0);
  EXPECT_LT(X509_cmp_time(X509_get0_notAfter(leaf.get()), &in_121_minutes), 0);

  // Key: EC P-256, and it is the certificate's.
  auto key = ParseKey(node->key_pem);
  ASSERT_NE(key, nullptr);
  EXPECT_EQ(EVP_PKEY_get_base_id(key.get()), EVP_PKEY_EC);
  char group[64] = {};
  size_t group_len = 0;
  ASSERT_EQ(EVP_PKEY_get_group_name(key.get(), group, sizeof(group), &group_len), 1);
  EXPECT_EQ(std::string(group, group_len), "prime256v1");
  EXPECT_EQ(X509_check_private_key(leaf.get(), key.get()), 1);
  EXPECT_EQ(EVP_PKEY_get_bits(key.get()), 256);
}

TEST(CertAuthorityTest, SerialsAreRandomPositiveAndAtMost128Bits) {
  absl::StatusOr<CertAndKey> ca = MakeCa("kvr-ca");
  ASSERT_TRUE(ca.ok()) << ca.status();
  std::vector<std::string> serials;
  int max_bits = 0;
  for (int i = 0; i < 8; ++i) {
    absl::StatusOr<CertAndKey> cert = IssueCert(*ca, "kvr-worker", {"localhost"}, {});
    ASSERT_TRUE(cert.ok()) << cert.status();
    Cert leaf = ParseCert(cert->cert_pem);
    std::unique_ptr<BIGNUM, decltype(&BN_free)> bn(
        ASN1_INTEGER_to_BN(X509_get0_serialNumber(leaf.get()), nullptr), &BN_free);
    ASSERT_NE(bn, nullptr);
    EXPECT_FALSE(BN_is_negative(bn.get()));
    EXPECT_FALSE(BN_is_zero(bn.get()));
    EXPECT_LE(BN_num_bits(bn.get()), 128);
    max_bits = std::max(max_bits, BN_num_bits(bn.get()));
    char* hex = BN_bn2hex(bn.get());
    serials.emplace_back(hex);
    OPENSSL_free(hex);
  }
  // 8 random 128-bit numbers: all distinct, and one of them has a bit
  // above 120 set (each has none with chance 2^-8; all 8: 2^-64).
  std::sort(serials.begin(), serials.end());
  EXPECT_EQ(std::unique(serials.begin(), serials.end()), serials.end());
  EXPECT_GT(max_bits, 120);
}

TEST(CertAuthorityTest, CertOfAnotherCaDoesNotVerifyEvenWithTheSameCaName) {
  absl::StatusOr<CertAndKey> ca = MakeCa("kvr-ca");
  absl::StatusOr<CertAndKey> impostor = MakeCa("kvr-ca");  // same name, other key
  absl::StatusOr<CertAndKey> other = MakeCa("other-ca");
  ASSERT_TRUE(ca.ok() && impostor.ok() && other.ok());
  absl::StatusOr<CertAndKey> forged = IssueCert(*impostor, "kvr-worker", {"localhost"}, {});
  absl::StatusOr<CertAndKey> foreign = IssueCert(*other, "kvr-worker", {"localhost"}, {});
  absl::StatusOr<CertAndKey> genuine = IssueCert(*ca, "kvr-worker", {"localhost"}, {});
  ASSERT_TRUE(forged.ok() && foreign.ok() && genuine.ok());
  Cert ca_cert = ParseCert(ca->cert_pem);
  Cert other_ca_cert = ParseCert(other->cert_pem);
  Cert forged_cert = ParseCert(forged->cert_pem), foreign_cert = ParseCert(foreign->cert_pem),
       genuine_cert = ParseCert(genuine->cert_pem);
  EXPECT_EQ(Verify(genuine_cert.get(), ca_cert.get(), X509_PURPOSE_SSL_CLIENT), X509_V_OK);
  EXPECT_NE(Verify(forged_cert.get(), ca_cert.get(), X509_PURPOSE_SSL_CLIENT), X509_V_OK);
  EXPECT_EQ(Verify(foreign_cert.get(), ca_cert.get(), X509_PURPOSE_SSL_CLIENT),
            X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY);
  // And the other way round: our leaf is not trusted by another CA.
  EXPECT_EQ(Verify(genuine_cert.get(), other_ca_cert.get(), X509_PURPOSE_SSL_SERVER),
            X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY);
}

TEST(CertAuthorityTest, ExpiredAndNotYetValidCertsDoNotVerify) {
  absl::StatusOr<CertAndKey> ca = MakeCa("kvr-ca");
  ASSERT_TRUE(ca.ok()) << ca.status();
  absl::StatusOr<CertAndKey> cert =
      IssueCert(*ca, "kvr-gateway", {}, {"127.0.0.1"}, absl::Minutes(10));
  ASSERT_TRUE(cert.ok()) << cert.status();
  Cert ca_cert = ParseCert(ca->cert_pem), leaf = ParseCert(cert->cert_pem);
  const time_t now = std::time(nullptr);
  EXPECT_EQ(Verify(leaf.get(), ca_cert.get(), X509_PURPOSE_SSL_SERVER, now + 9 * 60), X509_V_OK);
  EXPECT_EQ(Verify(leaf.get(), ca_cert.get(), X509_PURPOSE_SSL_SERVER, now + 11 * 60),
            X509_V_ERR_CERT_HAS_EXPIRED);
  EXPECT_EQ(Verify(leaf.get(), ca_cert.get(), X509_PURPOSE_SSL_SERVER, now - 6 * 60),
            X509_V_ERR_CERT_NOT_YET_VALID);
}

TEST(CertAuthorityTest, HostileInputsAreRefusedNamingTheField) {
  absl::StatusOr<CertAndKey> ca = MakeCa("kvr-ca");
  absl::StatusOr<CertAndKey> other = MakeCa("other-ca");
  ASSERT_TRUE(ca.ok() && other.ok());
  auto expect_invalid = [](const absl::Status& status, const std::string& text) {
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
    EXPECT_THAT(std::string(status.message()), HasSubstr(text));
  };
  expect_invalid(MakeCa("").status(), "cn is empty");
  expect_invalid(MakeCa(std::string(65, 'a')).status(), "cn has 65 bytes, more than the limit of 64");
  EXPECT_TRUE(MakeCa(std::string(64, 'a')).ok());
  expect_invalid(MakeCa("kvr\nca").status(), "cn has a control character");
  expect_invalid(MakeCa("kvr-ca", absl::ZeroDuration()).status(), "validity 0 outside [1s, ");
  expect_invalid(MakeCa("kvr-ca", absl::Hours(24 * 826)).status(), "validity");
  expect_invalid(IssueCert(*ca, "", {"localhost"}, {}).status(), "role_cn is empty");
  expect_invalid(IssueCert(*ca, "kvr-node", {}, {}).status(), "need one SAN");
  // A comma would smuggle another SAN into a config-string based builder.
  expect_invalid(IssueCert(*ca, "kvr-node", {"a,DNS:evil.com"}, {}).status(),
                 "dns_sans name \"a,DNS:evil.com\" may hold only");
  expect_invalid(IssueCert(*ca, "kvr-node", {""}, {}).status(), "dns_sans has an empty name");
  expect_invalid(IssueCert(*ca, "kvr-node", {std::string(254, 'a')}, {}).status(),
                 "254 bytes exceeds the limit of 253");
  expect_invalid(IssueCert(*ca, "kvr-node", {}, {"1.2.3"}).status(),
                 "ip_sans entry \"1.2.3\" is not an IPv4 or IPv6 address");
  expect_invalid(
      IssueCert(*ca, "kvr-node", std::vector<std::string>(65, "localhost"), {}).status(),
      "exceeds the limit of 64 names");
  // The CA: mismatched key, not a CA, unparsable PEM (with OpenSSL's reason).
  expect_invalid(IssueCert({ca->cert_pem, other->key_pem}, "kvr-node", {"localhost"}, {}).status(),
                 "does not match");
  absl::StatusOr<CertAndKey> leaf = IssueCert(*ca, "kvr-node", {"localhost"}, {});
  ASSERT_TRUE(leaf.ok());
  expect_invalid(IssueCert(*leaf, "kvr-node", {"localhost"}, {}).status(), "is not a CA");
  const absl::Status garbage = IssueCert({"garbage", ca->key_pem}, "kvr-node", {"localhost"}, {})
                                   .status();
  expect_invalid(garbage, "parsing the CA certificate PEM: ");
  EXPECT_THAT(std::string(garbage.message()), HasSubstr("no start line"));  // OpenSSL's text
}

TEST(CertAuthorityTest, FilesAreWrittenAtomicallyWithThePrivateKeyAtMode0600) {
  kvr::test_support::TempDir dir("kvr_certs");
  ASSERT_FALSE(dir.path().empty());
  absl::StatusOr<CertAndKey> ca = MakeCa("kvr-ca");
  ASSERT_TRUE(ca.ok());
  const std::string cert_path = dir.path() + "/ca.pem", key_path = dir.path() + "/ca.key";
  const mode_t old_umask = umask(0);  // the modes must not depend on the umask
  const absl::Status written = WriteCertAndKey(*ca, cert_path, key_path);
  umask(old_umask);
  ASSERT_TRUE(written.ok()) << written;
  struct stat st {};
  ASSERT_EQ(stat(key_path.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  ASSERT_EQ(stat(cert_path.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0644u);
  EXPECT_EQ(ReadSmallFile(cert_path).value(), ca->cert_pem);
  EXPECT_EQ(ReadSmallFile(key_path).value(), ca->key_pem);

  // Rotation: overwriting replaces the files whole (a new inode by rename).
  absl::StatusOr<CertAndKey> next = MakeCa("kvr-ca");
  ASSERT_TRUE(next.ok());
  ASSERT_EQ(stat(cert_path.c_str(), &st), 0);
  const ino_t old_inode = st.st_ino;
  ASSERT_TRUE(WriteCertAndKey(*next, cert_path, key_path).ok());
  EXPECT_EQ(ReadSmallFile(cert_path).value(), next->cert_pem);
  EXPECT_EQ(ReadSmallFile(key_path).value(), next->key_pem);
  ASSERT_EQ(stat(cert_path.c_str(), &st), 0);
  EXPECT_NE(st.st_ino, old_inode);
  int entries = 0;
  for (const auto& entry : std::filesystem::directory_iterator(dir.path())) {
    (void)entry;
    ++entries;
  }
  EXPECT_EQ(entries, 2);  // no temporary files left behind

  // Errors name the path; reads are bounded.
  const absl::Status bad = WriteFileAtomically(dir.path() + "/no/such/dir/x", "x", 0600);
  EXPECT_THAT(std::string(bad.message()), HasSubstr("/no/such/dir/x"));
  EXPECT_EQ(ReadSmallFile(cert_path, 10).status().code(), absl::StatusCode::kOutOfRange);
  EXPECT_EQ(ReadSmallFile(dir.path() + "/missing").status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace kvr::security
