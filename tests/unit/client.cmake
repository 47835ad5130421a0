# retrieval_node/client: MakeRetrievalClient, the --nodes factory (in-process
# node, malformed specs, nodes that do not answer).
kvr_test(client_factory_test SOURCES unit/client_factory_test.cc DEPS kvr::client_factory
  TIMEOUT 60)
if(KVR_WITH_SERVICES)
  target_compile_definitions(client_factory_test PRIVATE KVR_TEST_REMOTE_CLIENTS=1)
endif()
