# gpu_worker: backend ops, model loading, tokenizer, forward pass.
kvr_test(worker_backend_test SOURCES unit/worker_backend_test.cc DEPS kvr::worker_backend)
kvr_test(worker_model_test SOURCES unit/worker_model_test.cc DEPS kvr::model)
kvr_test(llama_forward_test SOURCES unit/llama_forward_test.cc DEPS kvr::llama_reference)
