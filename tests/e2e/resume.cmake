# Issue 15, worker loss: sampling deterministic per position and resumed
# generations identical to uninterrupted ones (unit), and the gateway resuming
# streams on another worker when one is killed mid-stream (e2e).
kvr_test(resume_sampling_test SOURCES unit/resume_sampling_test.cc
  DEPS kvr::engine kvr::retrieval_client LABELS unit TIMEOUT 300)
