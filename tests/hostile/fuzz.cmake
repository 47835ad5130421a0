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
  # UCX resource bounds: requests in flight per connection and in bytes get
  # RESOURCE_EXHAUSTED naming the limit, connections past the cap are
  # refused (same in-process setup as ucx_routing_test).
  kvr_test(ucx_limits_test
    SOURCES hostile/ucx_limits_test.cc
    DEPS kvr::node_server kvr::remote_clients
    PROTOBUF_FIRST
    LABELS integration
    TIMEOUT 120
    ENVIRONMENT UCX_TLS=tcp UCX_NET_DEVICES=lo UCX_WARN_UNUSED_ENV_VARS=n)
  # The node_service fuzzer's out-of-memory (gRPC's in-process transport
  # keeps client streams the server finishes early; fuzz/README.md): the
  # same refused UploadShard streams, abandoned uploads and cancelled
  # ReadShards against a real kvr_node over TCP leave its RSS within 64 MiB
  # of its warmed-up value and its upload reservations at 0.
  kvr_test(node_stream_memory_test SOURCES hostile/node_stream_memory_test.cc NODE_MAIN
    DEPS kvr::proto kvr::common gRPC::grpc++
    PROTOBUF_FIRST
    ARGS --kvr_node $<TARGET_FILE:kvr_node>
    NEEDS kvr_node LABELS integration hostile TIMEOUT 300)
endif()

# The worker fuzzer's finding: malformed UTF-8 from byte tokens in proto3
# string fields (GenerateChunk.text, DetokenizeResponse.text) made the client
# drop messages; ValidUtf8 cases, and Detokenize / a high-temperature Generate
# through the real WorkerService on an in-process gRPC server.
kvr_test(worker_utf8_test SOURCES hostile/worker_utf8_test.cc PROTOBUF_FIRST
  DEPS kvr::worker_server kvr::engine kvr::retrieval_client
  LABELS unit hostile TIMEOUT 120)

# Every libFuzzer harness (fuzz/) replayed on its seed corpus plus fixed
# mutations of it, in this (gcc) build: `make test` exercises each harness
# with no clang dependency (the clang build, `make fuzz`, fuzzes for real).
if(KVR_WITH_SERVICES AND NOT KVR_FUZZ)
  # node_service / worker: every RPC of the retrieval node / decode worker
  # through the service object on a gRPC server in the test's process
  # (node_service over 127.0.0.1, worker in-process; ~3-5 s each).
  foreach(h ucx_wire index llama2c llama2c_tokenizer sentencepiece hf_bpe safetensors openai
      store node_service worker)
    # The store harness opens RocksDB per input (~50 ms): fewer mutations.
    set(_mutations 500)
    if(h STREQUAL "store")
      set(_mutations 16)
    endif()
    kvr_test(fuzz_${h}
      COMMAND $<TARGET_FILE:fuzz_${h}_replay> --mutations=${_mutations}
        ${PROJECT_SOURCE_DIR}/fuzz/corpus/${h}
      NEEDS fuzz_${h}_replay
      LABELS fuzz
      TIMEOUT 120)
  endforeach()
endif()
