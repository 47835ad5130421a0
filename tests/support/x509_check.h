// Checking certificates with OpenSSL's own verifier in tests: parse PEM,
// X509_verify_cert against one CA for a TLS purpose at a given time, read the
// subject / issuer CN. Tests using it link OpenSSL::Crypto.
#pragma once

#include <openssl/bio.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include <ctime>
#include <memory>
#include <string>

#include "gtest/gtest.h"

namespace kvr::test_support {

struct X509Free {
  void operator()(X509* p) const { X509_free(p); }
};
using X509Ptr = std::unique_ptr<X509, X509Free>;

// The first certificate of PEM text `pem`; null when there is none.
inline X509Ptr ParsePemCert(const std::string& pem) {
  std::unique_ptr<BIO, decltype(&BIO_free)> bio(
      BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())), &BIO_free);
  return X509Ptr(PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr));
}

// X509_verify_cert of `leaf` against a store holding only `ca`, for TLS
// purpose `purpose` (X509_PURPOSE_SSL_SERVER / _CLIENT), at time `at` (0:
// now). X509_V_OK or the verifier's error.
inline int VerifyWithCa(X509* leaf, X509* ca, int purpose, time_t at = 0) {
  std::unique_ptr<X509_STORE, decltype(&X509_STORE_free)> store(X509_STORE_new(),
                                                                &X509_STORE_free);
  EXPECT_EQ(X509_STORE_add_cert(store.get(), ca), 1);
  std::unique_ptr<X509_STORE_CTX, decltype(&X509_STORE_CTX_free)> ctx(X509_STORE_CTX_new(),
                                                                      &X509_STORE_CTX_free);
  EXPECT_EQ(X509_STORE_CTX_init(ctx.get(), store.get(), leaf, nullptr), 1);
  EXPECT_EQ(X509_STORE_CTX_set_purpose(ctx.get(), purpose), 1);
  if (at != 0) X509_STORE_CTX_set_time(ctx.get(), 0, at);
  const int ok = X509_verify_cert(ctx.get());
  const int error = X509_STORE_CTX_get_error(ctx.get());
  EXPECT_EQ(ok == 1, error == X509_V_OK);
  return error;
}

// The CN of a subject or issuer name; "" when it has none.
inline std::string CommonName(X509_NAME* name) {
  char buf[256] = {};
  const int n = X509_NAME_get_text_by_NID(name, NID_commonName, buf, sizeof(buf));
  return n < 0 ? "" : std::string(buf, static_cast<size_t>(n));
}

}  // namespace kvr::test_support
