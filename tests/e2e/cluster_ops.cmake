# tools/cluster and tools/loadgen, operations: `kvr cluster` restarting dead
# children on their old ports and data dirs (crash-loop backoff,
# --max_restarts), --workers N behind the gateway, --replicas pass-through;
# kvr_loadgen backing off on errors and counting them by gRPC code.
if(NOT TARGET nlohmann_json::nlohmann_json)
  find_package(nlohmann_json 3 CONFIG REQUIRED)
endif()
kvr_test(cluster_restart_test SOURCES unit/cluster_restart_test.cc
  DEPS kvr::cluster_cli
  LABELS unit TIMEOUT 60)
if(TARGET kvr_gateway)
  kvr_test(cluster_ops_e2e_test SOURCES e2e/cluster_ops_test.cc OWN_MAIN PROTOBUF_FIRST
    DEPS kvr::proto kvr::health_proto kvr::cluster_cli kvr::common
      nlohmann_json::nlohmann_json gRPC::grpc++ absl::strings absl::time
    ARGS --kvr $<TARGET_FILE:kvr> --kvr_loadgen $<TARGET_FILE:kvr_loadgen>
      --kvr_worker $<TARGET_FILE:kvr_worker>
    NEEDS kvr kvr_node kvr_worker kvr_gateway kvr_loadgen
    LABELS e2e TIMEOUT 240)
endif()
