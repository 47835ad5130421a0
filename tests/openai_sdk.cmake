# Issue 19: OpenAI API compatibility. The engine's log-probabilities and
# penalties (unit), and the gateway driven by the official OpenAI Node SDK
# (e2e, tests/openai_sdk/).
kvr_test(logprobs_test SOURCES unit/logprobs_test.cc
  DEPS kvr::engine kvr::llama_reference kvr::retrieval_client
  LABELS unit TIMEOUT 120)
