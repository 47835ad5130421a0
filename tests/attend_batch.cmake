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
# decode_bench --attend_batching=on,off at its smallest shape: both rows per
# retrieval mode (in process, gRPC, UCX), identical logits, a bad value refused.
if(TARGET decode_bench)
  find_package(Python3 REQUIRED COMPONENTS Interpreter)
  kvr_test(attend_batch_bench_smoke
    COMMAND ${Python3_EXECUTABLE} ${CMAKE_CURRENT_SOURCE_DIR}/integration/attend_batch_bench_test.py
      $<TARGET_FILE:decode_bench> $<TARGET_FILE:kvr_node>
    NEEDS decode_bench kvr_node LABELS "e2e;bench" TIMEOUT 600)
endif()
# bench/gpu_session.sh's CPU-side parts (issue 20 item 4): the crossover
# table from gpu_decode_bench rows, exit 3 without a GPU, bad arguments.
kvr_test(gpu_session_script_test
  COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/integration/gpu_session_script_test.sh
    ${PROJECT_SOURCE_DIR}
  LABELS unit TIMEOUT 60)
