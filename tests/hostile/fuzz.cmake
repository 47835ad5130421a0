# Hostile input, UCX data plane and fuzzing (issue 14; docs/security.md
# "UCX data plane and fuzzing").
if(KVR_WITH_SERVICES)
  # UCX reply routing: a late reply of a gone client never reaches another
  # client (in-process UcxEndpoint + real UcxRetrievalClients on loopback;
  # skips with the UCX error when UCX cannot run).
  kvr_test(ucx_routing_test
    SOURCES hostile/ucx_routing_test.cc
    DEPS kvr::node_server kvr::remote_clients
    PROTOBUF_FIRST
    LABELS integration
    TIMEOUT 120
    ENVIRONMENT UCX_TLS=tcp UCX_NET_DEVICES=lo UCX_WARN_UNUSED_ENV_VARS=n)
endif()
