# mTLS on every gRPC hop (issue 16 [secure], deliverable 1): real kvr_node,
# kvr_worker, kvr_gateway and kvr_health_probe processes with certificates
# from services/infra/security/cert_authority: generation over mTLS equals
# plaintext, wrong peers refused, rotation without restart, start-up rules.
if(TARGET kvr_gateway AND TARGET kvr_health_probe)
  find_package(OpenSSL 3 REQUIRED)
  kvr_test(tls_test SOURCES integration/tls_test.cc OWN_MAIN PROTOBUF_FIRST
    DEPS kvr::tls kvr::cert_authority kvr::proto kvr::health_proto kvr::common
      OpenSSL::Crypto gRPC::grpc++ absl::strings absl::time
    ARGS --kvr_node $<TARGET_FILE:kvr_node> --kvr_worker $<TARGET_FILE:kvr_worker>
      --kvr_gateway $<TARGET_FILE:kvr_gateway>
      --kvr_health_probe $<TARGET_FILE:kvr_health_probe> --kvr $<TARGET_FILE:kvr>
    NEEDS kvr_node kvr_worker kvr_gateway kvr_health_probe kvr
    LABELS integration TIMEOUT 300)
endif()
