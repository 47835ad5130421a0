# Hostile input against the decode worker (issue 14): bounds derived from the
# model (attention rows, prompt bytes, max_tokens), the memory budget's
# admission, bounded GetModelInfo waiters, the linear-time tokenizer.
# Unit level: the validation layer, the engine's per-sequence memory, the
# tokenizer against run.c's algorithm and the scheduler's budget / waiters.
kvr_test(worker_limits_test SOURCES hostile/worker_limits_test.cc PROTOBUF_FIRST
  DEPS kvr::worker_server kvr::engine kvr::retrieval_client
  LABELS unit hostile TIMEOUT 300)
# Through a real kvr_worker's gRPC API: oversized attention options, max_tokens
# past the context, a 1 MiB prompt, the memory budget, bounded waiters; each
# time the worker keeps serving with a bounded RSS.
kvr_test(worker_hostile_test SOURCES hostile/worker_test.cc PROTOBUF_FIRST
  DEPS kvr::proto kvr::common gRPC::grpc++ absl::time
  ARGS --kvr_worker $<TARGET_FILE:kvr_worker>
  NEEDS kvr_worker
  LABELS e2e hostile TIMEOUT 300)
