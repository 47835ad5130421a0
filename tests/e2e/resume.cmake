# Issue 15, worker loss: sampling deterministic per position and resumed
# generations identical to uninterrupted ones (unit), and the gateway resuming
# streams on another worker when one is killed mid-stream (e2e).
kvr_test(resume_sampling_test SOURCES unit/resume_sampling_test.cc
  DEPS kvr::engine kvr::retrieval_client LABELS unit TIMEOUT 300)
# A gateway in front of two real workers; the worker serving a long stream is
# killed with SIGKILL after 8 tokens: gRPC (greedy, seeded sampled) and HTTP
# SSE streams complete identical to a fault-free run; both workers killed →
# UNAVAILABLE / 503 promptly.
# (services/gateway/ makes the cpp-httplib and nlohmann-json targets global.)
if(KVR_WITH_SERVICES AND TARGET kvr_gateway)
  kvr_test(resume_e2e_test SOURCES e2e/resume_test.cc OWN_MAIN PROTOBUF_FIRST
    DEPS kvr::proto kvr::common PkgConfig::CPP_HTTPLIB nlohmann_json::nlohmann_json
      gRPC::grpc++ absl::time
    ARGS --kvr_gateway $<TARGET_FILE:kvr_gateway> --kvr_worker $<TARGET_FILE:kvr_worker>
    NEEDS kvr_gateway kvr_worker
    LABELS e2e TIMEOUT 300)
endif()
# GenerateCall's resumption rules against scripted in-process workers:
# retry after a progress message, resume_tokens = the tokens sent, no
# progress after tokens, application errors passed on, max_resumes bound.
if(KVR_WITH_SERVICES AND TARGET kvr_gateway_core)
  kvr_test(gateway_resume_test SOURCES integration/gateway_resume_test.cc PROTOBUF_FIRST
    DEPS kvr::gateway_core kvr::proto prometheus-cpp::core gRPC::grpc++ absl::time
    LABELS integration TIMEOUT 120)
endif()
