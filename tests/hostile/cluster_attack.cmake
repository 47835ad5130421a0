# A whole `kvr cluster` under attack (issue 14, deliverable 5): 3 kvr_node
# (data dirs, UCX on), kvr_worker and kvr_gateway on 127.0.0.1 get a bounded
# corpus of bad requests over HTTP, gRPC and UCX while well-formed requests
# run alongside; every server keeps serving with a bounded RSS, the
# bystanders' tokens equal a fault-free run, and the cluster restarts clean
# on the same run dir. Also the regression test of the gateway's request-head
# bound (--http_max_header_bytes) it found. UCX transports: tcp on lo (the UCX part skips when UCX
# cannot run).
if(TARGET kvr_gateway)
  if(NOT TARGET PkgConfig::CPP_HTTPLIB)
    find_package(PkgConfig REQUIRED)
    pkg_check_modules(CPP_HTTPLIB REQUIRED IMPORTED_TARGET GLOBAL cpp-httplib)
  endif()
  if(NOT TARGET nlohmann_json::nlohmann_json)
    find_package(nlohmann_json 3 CONFIG REQUIRED)
  endif()
  kvr_test(cluster_attack_test SOURCES hostile/cluster_attack_test.cc OWN_MAIN PROTOBUF_FIRST
    DEPS kvr::proto kvr::cluster_cli kvr::common kvr::node_wire ucx::ucp ucx::ucs
      PkgConfig::CPP_HTTPLIB nlohmann_json::nlohmann_json gRPC::grpc++ absl::strings absl::time
    ARGS --kvr $<TARGET_FILE:kvr>
    NEEDS kvr kvr_node kvr_worker kvr_gateway
    LABELS e2e hostile TIMEOUT 240
    ENVIRONMENT UCX_TLS=tcp UCX_NET_DEVICES=lo UCX_WARN_UNUSED_ENV_VARS=n
      KVR_GATEWAY_BIN=$<TARGET_FILE:kvr_gateway>)
endif()
