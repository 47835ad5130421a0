# A whole `kvr cluster` under attack (issue 14, deliverable 5): 3 kvr_node
# (data dirs, UCX on), kvr_worker and kvr_gateway on 127.0.0.1 get a bounded
# corpus of bad requests over HTTP, gRPC and UCX while well-formed requests
# run alongside; every server keeps serving with a bounded RSS, the
# bystanders' tokens equal a fault-free run, and the cluster restarts clean
# on the same run dir. Also the regression test of the gateway's
# request-head bound (--http_max_header_bytes) and of the node's bound on
# UCX replies not yet sent, which it found. UCX transports: tcp
# on lo (the UCX part skips when UCX cannot run). cpp-httplib and
# nlohmann-json: the GLOBAL targets of services/gateway.
if(TARGET kvr_gateway)
  kvr_test(cluster_attack_test SOURCES hostile/cluster_attack_test.cc PROTOBUF_FIRST
    DEPS kvr::proto kvr::cluster_cli kvr::common kvr::node_wire ucx::ucp ucx::ucs
      PkgConfig::CPP_HTTPLIB nlohmann_json::nlohmann_json gRPC::grpc++ absl::strings absl::time
    NEEDS kvr kvr_node kvr_worker kvr_gateway
    LABELS e2e hostile TIMEOUT 240
    ENVIRONMENT UCX_TLS=tcp UCX_NET_DEVICES=lo UCX_WARN_UNUSED_ENV_VARS=n
      KVR_BIN=$<TARGET_FILE:kvr> KVR_GATEWAY_BIN=$<TARGET_FILE:kvr_gateway>
      KVR_NODE_BIN=$<TARGET_FILE:kvr_node>)
endif()
