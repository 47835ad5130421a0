# Gateway API keys (issue 16 [secure], services/gateway/api_keys.h).
#   api_keys_test: the keys file, key checks, limits and reloads, no server.
#   apikeys_e2e_test: a real kvr_gateway with --api_keys_file in front of a
#     real kvr_worker: 401 / 429 shapes over HTTP and gRPC, outputs equal to
#     a gateway without keys, reloads, exit 2 on a bad file, no key in the
#     logs, `kvr apikey` round trip.
if(TARGET kvr_gateway_api_keys)
  kvr_test(api_keys_test
    SOURCES unit/api_keys_test.cc
    DEPS kvr::gateway_api_keys absl::strings
    LABELS unit hostile)
endif()
if(TARGET kvr_gateway AND TARGET kvr)
  if(NOT TARGET PkgConfig::CPP_HTTPLIB)
    find_package(PkgConfig REQUIRED)
    pkg_check_modules(CPP_HTTPLIB REQUIRED IMPORTED_TARGET GLOBAL cpp-httplib)
  endif()
  if(NOT TARGET nlohmann_json::nlohmann_json)
    find_package(nlohmann_json 3 CONFIG REQUIRED)
  endif()
  kvr_test(apikeys_e2e_test
    SOURCES integration/apikeys_test.cc
    DEPS kvr::proto kvr::common kvr::gateway_api_keys PkgConfig::CPP_HTTPLIB
      nlohmann_json::nlohmann_json gRPC::grpc++ absl::strings absl::time
    PROTOBUF_FIRST
    NEEDS kvr_gateway kvr_worker kvr
    LABELS e2e hostile
    TIMEOUT 300
    ENVIRONMENT KVR_GATEWAY_BIN=$<TARGET_FILE:kvr_gateway> KVR_WORKER_BIN=$<TARGET_FILE:kvr_worker>
      KVR_BIN=$<TARGET_FILE:kvr>)
endif()
