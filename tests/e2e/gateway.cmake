# services/gateway: kvr_gateway in front of two real kvr_worker processes
# (in-process retrieval nodes): gRPC and OpenAI-compatible HTTP equal the
# worker's own output, concurrency, cancellation, bad requests, overload,
# worker failure, metrics, SIGTERM.
if(TARGET kvr_gateway)
  if(NOT TARGET PkgConfig::CPP_HTTPLIB)
    find_package(PkgConfig REQUIRED)
    pkg_check_modules(CPP_HTTPLIB REQUIRED IMPORTED_TARGET GLOBAL cpp-httplib)
  endif()
  if(NOT TARGET nlohmann_json::nlohmann_json)
    find_package(nlohmann_json 3 CONFIG REQUIRED)
  endif()
  kvr_test(gateway_e2e_test SOURCES e2e/gateway_test.cc OWN_MAIN PROTOBUF_FIRST
    DEPS kvr::proto kvr::health_proto kvr::common PkgConfig::CPP_HTTPLIB
      nlohmann_json::nlohmann_json gRPC::grpc++ absl::strings absl::time
    ARGS --kvr_gateway $<TARGET_FILE:kvr_gateway> --kvr_worker $<TARGET_FILE:kvr_worker>
    NEEDS kvr_gateway kvr_worker
    LABELS e2e TIMEOUT 300)
endif()
