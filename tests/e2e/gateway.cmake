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
  add_executable(gateway_e2e_test e2e/gateway_test.cc)
  target_compile_options(gateway_e2e_test PRIVATE ${KVR_WARNINGS})
  target_include_directories(gateway_e2e_test PRIVATE ${PROJECT_SOURCE_DIR})
  kvr_link_protobuf_first(gateway_e2e_test)  # as for every test linking generated code
  target_link_libraries(gateway_e2e_test PRIVATE kvr::proto
    kvr::health_proto kvr::common PkgConfig::CPP_HTTPLIB nlohmann_json::nlohmann_json
    gRPC::grpc++ absl::strings absl::time GTest::gtest)
  add_dependencies(gateway_e2e_test kvr_gateway kvr_worker)
  add_test(NAME gateway_e2e_test
    COMMAND gateway_e2e_test --kvr_gateway $<TARGET_FILE:kvr_gateway>
      --kvr_worker $<TARGET_FILE:kvr_worker>)
  set_tests_properties(gateway_e2e_test PROPERTIES LABELS e2e TIMEOUT 300
    ENVIRONMENT "${KVR_TEST_ENVIRONMENT}")
endif()
