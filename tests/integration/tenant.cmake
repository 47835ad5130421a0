# Tenant isolation on retrieval nodes (issue 16 [secure]): capabilities over
# gRPC and UCX, random sequence ids, principal scoping, leases
# (--lease_seconds), recovery of capabilities and leases, DropSequence after
# a persistence failure. Real kvr_node processes on loopback + NodeCore.
kvr_test(tenant_test SOURCES integration/tenant_test.cc NODE_MAIN
  DEPS kvr::node_server kvr::remote_clients kvr::node_wire
  ARGS --kvr_node $<TARGET_FILE:kvr_node> NEEDS kvr_node
  LABELS integration TIMEOUT 240
  ENVIRONMENT UCX_TLS=tcp UCX_NET_DEVICES=lo UCX_WARN_UNUSED_ENV_VARS=n)
