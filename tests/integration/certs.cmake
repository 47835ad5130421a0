# Certificates for local clusters (issue 16 [secure]): the throwaway CA of
# services/infra/security/cert_authority, checked with OpenSSL's verifier.
find_package(OpenSSL 3 REQUIRED)
kvr_test(cert_authority_test
  SOURCES integration/cert_authority_test.cc
  DEPS kvr::cert_authority OpenSSL::Crypto absl::time
  TIMEOUT 60)

# `kvr cluster --secure` with fake children that log their argv
# (fake_kvr_server.sh): credentials on disk, the flags each role gets,
# cluster.json. No real TLS servers needed.
if(NOT TARGET nlohmann_json::nlohmann_json)
  find_package(nlohmann_json 3 CONFIG REQUIRED)
endif()
kvr_test(cluster_secure_test SOURCES integration/cluster_secure_test.cc OWN_MAIN
  DEPS kvr::cluster_cli kvr::cert_authority kvr::gateway_api_keys kvr::common OpenSSL::Crypto
    nlohmann_json::nlohmann_json absl::strings absl::time
  ARGS --kvr $<TARGET_FILE:kvr>
    --fake_server ${CMAKE_CURRENT_SOURCE_DIR}/integration/fake_kvr_server.sh
  NEEDS kvr
  LABELS integration TIMEOUT 120)

# `kvr cluster --secure` with real servers: token-identical to the insecure
# cluster through `kvr client` and the client library; plaintext, another
# CA, no / wrong key and the client certificate at the worker refused;
# kvr_loadgen --start_cluster --secure; over --workers 2: plaintext to every
# server, wrong roles at a node, HTTP 401/200, a second worker identity
# locked out of the cluster's sequences while a generation runs.
if(TARGET kvr_gateway)
  if(NOT TARGET PkgConfig::CPP_HTTPLIB)
    find_package(PkgConfig REQUIRED)
    pkg_check_modules(CPP_HTTPLIB REQUIRED IMPORTED_TARGET GLOBAL cpp-httplib)
  endif()
  kvr_test(cluster_secure_e2e_test SOURCES e2e/cluster_secure_e2e_test.cc OWN_MAIN PROTOBUF_FIRST
    DEPS kvr::cluster_cli kvr::cert_authority kvr::tls kvr::proto kvr::common
      nlohmann_json::nlohmann_json gRPC::grpc++ absl::strings absl::time PkgConfig::CPP_HTTPLIB
    ARGS --kvr $<TARGET_FILE:kvr> --kvr_loadgen $<TARGET_FILE:kvr_loadgen>
    NEEDS kvr kvr_node kvr_worker kvr_gateway kvr_loadgen
    LABELS e2e TIMEOUT 240)
endif()
