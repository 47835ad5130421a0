# Batched Attend / Append (AttendBatch, AppendBatch; issue 20): one program,
# attend_batch_test. attend_batch_test runs the in-process cases (results
# equal single Attends bit for bit, bad items fail alone, item limit, engine
# token-identical with batching on/off); attend_batch_node_test the same
# program against real kvr_node processes (gRPC bit for bit, limits over the
# wire, a node SIGKILLed mid-generation fails over per item).
kvr_test(attend_batch_test SOURCES integration/attend_batch_test.cc OWN_MAIN PROTOBUF_FIRST
  DEPS kvr::engine kvr::retrieval_client kvr::remote_clients kvr::client_factory
  ARGS --gtest_filter=-NodeBatchTest.*
  TIMEOUT 300)
kvr_test(attend_batch_node_test
  COMMAND $<TARGET_FILE:attend_batch_test> --kvr_node $<TARGET_FILE:kvr_node>
    --gtest_filter=NodeBatchTest.*
  NEEDS kvr_node attend_batch_test LABELS integration TIMEOUT 300)
