# Hostile clients against a real kvr_gateway with one real kvr_worker behind
# it (issue 14): deeply nested JSON, 1,000 half-header connections, a
# non-streamed client that disconnects, a deadline a year away.
if(TARGET kvr_gateway)
  if(NOT TARGET PkgConfig::CPP_HTTPLIB)
    find_package(PkgConfig REQUIRED)
    pkg_check_modules(CPP_HTTPLIB REQUIRED IMPORTED_TARGET GLOBAL cpp-httplib)
  endif()
  if(NOT TARGET nlohmann_json::nlohmann_json)
    find_package(nlohmann_json 3 CONFIG REQUIRED)
  endif()
  kvr_test(gateway_hostile_test
    SOURCES hostile/gateway_hostile_test.cc
    DEPS kvr::proto kvr::common PkgConfig::CPP_HTTPLIB nlohmann_json::nlohmann_json
      gRPC::grpc++ absl::strings absl::time
    PROTOBUF_FIRST
    NEEDS kvr_gateway kvr_worker
    LABELS e2e hostile
    TIMEOUT 300
    ENVIRONMENT KVR_GATEWAY_BIN=$<TARGET_FILE:kvr_gateway> KVR_WORKER_BIN=$<TARGET_FILE:kvr_worker>)
endif()

# The body limits of services/gateway/openai.h, without a server.
if(TARGET kvr_gateway_http)
  kvr_test(gateway_json_limits_test
    SOURCES hostile/gateway_json_limits_test.cc
    DEPS kvr::gateway_http absl::strings
    PROTOBUF_FIRST
    LABELS unit hostile)
endif()
