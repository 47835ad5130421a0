# Session 27, issue 18 item 3: the estimate's exact zone (ExactZoneOptions,
# kvr_node --exact_zone_keys_fraction) against a double-precision oracle:
# full cover = full attention, empty zone = the estimate bit for bit, no key
# counted twice, error non-increasing in the budget, hostile fractions, the
# node's keys_exact_zone.
kvr_test(exact_zone_test SOURCES unit/exact_zone_test.cc
  DEPS kvr::index kvr::node_core kvr::attention_data LABELS unit TIMEOUT 120)

# Over gRPC against a real kvr_node: a full zone is full attention and
# AttendStats.keys_exact_zone crosses the wire; bad --exact_zone_* flags stop
# the node.
if(KVR_WITH_SERVICES)
  kvr_test(exact_zone_grpc_test SOURCES integration/exact_zone_grpc_test.cc OWN_MAIN
    DEPS kvr::remote_clients
    ARGS --kvr_node $<TARGET_FILE:kvr_node> NEEDS kvr_node
    LABELS integration TIMEOUT 120)
endif()
