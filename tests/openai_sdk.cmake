# Issue 19: OpenAI API compatibility. The engine's log-probabilities and
# penalties (unit), and the gateway driven by the official OpenAI Node SDK
# (e2e, tests/openai_sdk/).
kvr_test(logprobs_test SOURCES unit/logprobs_test.cc
  DEPS kvr::engine kvr::llama_reference kvr::retrieval_client
  LABELS unit TIMEOUT 120)

# The official OpenAI Node SDK (npm `openai` v4, pinned by
# tests/openai_sdk/package-lock.json; scripts/install-deps.sh runs its
# `npm ci`) against a real kvr_gateway + kvr_worker on 127.0.0.1: every
# endpoint and parameter of issue 19 and the error shapes the SDK parses,
# values checked against `kvr generate` and the gRPC API
# (tests/openai_sdk/README.md).
find_program(KVR_OPENAI_SDK_NODE NAMES node nodejs)
set(_openai_sdk_dir ${CMAKE_CURRENT_SOURCE_DIR}/openai_sdk)
if(KVR_OPENAI_SDK_NODE AND EXISTS ${_openai_sdk_dir}/node_modules/openai/package.json)
  kvr_test(openai_sdk_conformance_test
    COMMAND ${KVR_OPENAI_SDK_NODE} ${_openai_sdk_dir}/conformance.mjs
      --gateway $<TARGET_FILE:kvr_gateway> --worker $<TARGET_FILE:kvr_worker>
      --kvr $<TARGET_FILE:kvr> --models ${PROJECT_SOURCE_DIR}/models
      --proto ${PROJECT_SOURCE_DIR}/proto
    NEEDS kvr_gateway kvr_worker kvr
    LABELS e2e TIMEOUT 300)
  # `kvr eval` (tools/eval.h) on the bundled tasks (tools/eval_tasks.jsonl)
  # through the same gateway: the accuracy it prints per (task, mode) must
  # equal the one computed from the gRPC API's prompt logprobs and greedy
  # text; a malformed tasks file exits 2 naming the line and the limit.
  kvr_test(kvr_eval_test
    COMMAND ${KVR_OPENAI_SDK_NODE} ${_openai_sdk_dir}/conformance.mjs --suite eval
      --tasks ${PROJECT_SOURCE_DIR}/tools/eval_tasks.jsonl
      --gateway $<TARGET_FILE:kvr_gateway> --worker $<TARGET_FILE:kvr_worker>
      --kvr $<TARGET_FILE:kvr> --models ${PROJECT_SOURCE_DIR}/models
      --proto ${PROJECT_SOURCE_DIR}/proto
    NEEDS kvr_gateway kvr_worker kvr
    LABELS e2e TIMEOUT 300)
else()
  message(STATUS "openai_sdk_conformance_test: not registered, no node or "
                 "tests/openai_sdk/node_modules (run scripts/install-deps.sh)")
endif()

# The worker's scheduler with echo + logprobs: streamed logprobs, the
# summary's prompt logprobs, and the scratch full-attention sequence reserved
# in the memory budget.
kvr_test(echo_scheduler_test SOURCES unit/echo_scheduler_test.cc PROTOBUF_FIRST
  DEPS kvr::worker_server kvr::engine kvr::retrieval_client
  LABELS unit TIMEOUT 120)
