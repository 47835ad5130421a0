# gpu_worker/engine + retrieval_node/client: retrieval attention vs full
# attention on stories260K, coverage, sampling, the in-process node.
kvr_test(engine_test SOURCES unit/engine_test.cc
  DEPS kvr::engine kvr::llama_reference kvr::retrieval_client
  TIMEOUT 120)
# Many sequences on one engine (interleaved / batched steps equal solo runs),
# cancellation, and the pipelined prefill hand-off.
kvr_test(engine_multi_test SOURCES unit/engine_multi_test.cc
  DEPS kvr::engine kvr::retrieval_client TIMEOUT 300)
# Sequence sharding: many placement chunks (and, with services, several nodes
# behind MultiNodeClient) give the same results as one chunk.
if(KVR_WITH_SERVICES)
  kvr_test(engine_chunks_test SOURCES unit/engine_chunks_test.cc PROTOBUF_FIRST
    DEPS kvr::engine kvr::retrieval_client kvr::remote_clients TIMEOUT 300)
  target_compile_definitions(engine_chunks_test PRIVATE KVR_TEST_MULTI_NODE=1)
else()
  kvr_test(engine_chunks_test SOURCES unit/engine_chunks_test.cc
    DEPS kvr::engine kvr::retrieval_client TIMEOUT 300)
endif()
# GenerationScheduler (gpu_worker/server) on the engine: a long prefill does
# not stall decoding streams (ordering of the scheduler's callbacks, no
# timing). kvr::worker_server links libprotobuf and (through kvr::model)
# libsentencepiece: PROTOBUF_FIRST, see cmake/KvrTargets.cmake.
if(KVR_WITH_SERVICES)
  kvr_test(engine_scheduler_test SOURCES unit/engine_scheduler_test.cc PROTOBUF_FIRST
    DEPS kvr::worker_server kvr::engine kvr::retrieval_client
    TIMEOUT 300)
endif()
