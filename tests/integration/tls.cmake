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

# bench/transport_bench's mTLS rows (Attend p50 with and without TLS in one
# run, docs/benchmarks.md section 7) at the smallest shape: the bench's TLS
# set-up keeps working as the node's TLS flags evolve.
if(TARGET transport_bench)
  find_package(Python3 REQUIRED COMPONENTS Interpreter)
  kvr_test(transport_bench_smoke_test
    COMMAND ${Python3_EXECUTABLE} ${CMAKE_CURRENT_SOURCE_DIR}/integration/transport_bench_smoke.py
      $<TARGET_FILE:transport_bench> $<TARGET_FILE:kvr_node>
    NEEDS transport_bench kvr_node
    LABELS integration TIMEOUT 150)
endif()
