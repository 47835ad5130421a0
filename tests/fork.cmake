# Issue 19 item 1: n > 1 sharing one prefill (RetrievalEngine::ForkSequence,
# kvr.v1.RetrievalNode/ForkSequence, GenerateRequest n / prompts).
#
# Engine + in-process node: forks step bit-identically to their source and
# to a fresh prefill (full and retrieval mode), shards stored once
# (NodeStats.shard_uploads / forks), appends after the fork reach only the
# stepping sequence, dropping the source leaves the fork intact, memory back
# to the baseline; NodeCore::ForkSequence's refusals (unknown, capability,
# taken id, id 0, budget); a client without ForkSequence -> Unimplemented.
kvr_test(fork_engine_test SOURCES unit/fork_engine_test.cc
  DEPS kvr::engine kvr::retrieval_client LABELS unit TIMEOUT 300)
if(KVR_WITH_SERVICES)
  # The scheduler's choice groups (GenerationWork::forks): one prefill,
  # choice j == a lone request with seed + j, the per-choice prefill fallback
  # when the nodes cannot fork, every choice's memory reserved at Submit.
  kvr_test(fork_scheduler_test SOURCES unit/fork_scheduler_test.cc PROTOBUF_FIRST
    DEPS kvr::worker_server kvr::engine kvr::retrieval_client
    LABELS unit TIMEOUT 300)
endif()
# Real processes: 2 kvr_node + kvr_worker (--nodes, 2 replicas) + kvr_gateway:
# gRPC n = 3 greedy / seeded, a prompts batch, prefill once (worker metrics),
# shards uploaded once and forked on both nodes (node Stats), node memory
# back to its baseline; hostile n / prompts / stop / ForkSequence; HTTP n = 2
# as one worker request.
if(KVR_WITH_SERVICES AND TARGET kvr_gateway)
  kvr_test(fork_e2e_test SOURCES e2e/fork_test.cc OWN_MAIN PROTOBUF_FIRST
    DEPS kvr::proto kvr::common PkgConfig::CPP_HTTPLIB nlohmann_json::nlohmann_json
      gRPC::grpc++ absl::time
    ARGS --kvr_node $<TARGET_FILE:kvr_node> --kvr_worker $<TARGET_FILE:kvr_worker>
      --kvr_gateway $<TARGET_FILE:kvr_gateway>
    NEEDS kvr_node kvr_worker kvr_gateway
    LABELS e2e TIMEOUT 300)
endif()
