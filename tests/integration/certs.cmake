# Certificates for local clusters (issue 16 [secure]): the throwaway CA of
# services/infra/security/cert_authority, checked with OpenSSL's verifier.
find_package(OpenSSL 3 REQUIRED)
kvr_test(cert_authority_test
  SOURCES integration/cert_authority_test.cc
  DEPS kvr::cert_authority OpenSSL::Crypto absl::time
  TIMEOUT 60)
