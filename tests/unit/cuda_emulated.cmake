# The cuda backend's sources on the CPU emulator (label unit: runs everywhere,
# no GPU, no CUDA toolkit). cuda_backend_emulated_test is cuda_backend_test.cc
# itself, linked with the emulated backend: every op against the CPU backend
# and stories260K greedy equality. cuda_emulator_test checks the emulator's
# own semantics and that it catches the kernel bugs it claims to.
kvr_test(cuda_backend_emulated_test SOURCES unit/cuda_backend_test.cc
  DEPS kvr::cuda_backend_emulated kvr::model kvr::llama_reference kvr::engine
    kvr::retrieval_client
  ARGS --gtest_filter=-CudaStoriesTest.*
  LABELS "unit;cuda_emulated" TIMEOUT 300)
# The same program's stories260K greedy runs (~150 s on the emulator): slow.
kvr_test(cuda_backend_emulated_stories_test
  COMMAND cuda_backend_emulated_test --gtest_filter=CudaStoriesTest.*
  LABELS "slow;cuda_emulated" TIMEOUT 900)
kvr_test(cuda_emulator_test SOURCES unit/cuda_emulator_test.cc
  DEPS kvr::cuda_emulator
  LABELS "unit;cuda_emulated")
# LoadBackendPlugin with the emulated CUDA backend as a dlopen plugin.
kvr_test(backend_plugin_test SOURCES unit/backend_plugin_test.cc DEPS kvr::worker_backend
  NEEDS kvr_cuda_emulated_plugin)
target_compile_definitions(backend_plugin_test PRIVATE
  KVR_TEST_PLUGIN="$<TARGET_FILE:kvr_cuda_emulated_plugin>")
# bench/gpu_decode_bench on the emulator at the smallest shape: all three
# modes (gpu, stream, retrieval) must produce a row and the program exit 0.
# A check that the benchmark works before a GPU session spends time on it,
# not a measurement; ~2 min on the emulator, so slow (make test-slow, and
# bench/gpu_session.sh's build runs the real one).
if(TARGET gpu_decode_bench_emulated)
  kvr_test(gpu_decode_bench_emulated
    COMMAND bash -c "out=$(\"$0\" --contexts=1024 --layers=1 --steps=1 --sinks=16 --window=64 \
--top_k=16 --node_threads=1) || exit 1$<SEMICOLON> echo \"$out\"$<SEMICOLON> \
test $(echo \"$out\" | grep -cE '^(gpu|stream|retrieval) +1024 [|] +[0-9]') -eq 3"
      $<TARGET_FILE:gpu_decode_bench_emulated>
    LABELS "slow;cuda_emulated" TIMEOUT 600)
endif()
# How often the backend and the engine on it make the host wait for the
# device (the emulator counts every wait).
kvr_test(cuda_sync_test SOURCES unit/cuda_sync_test.cc
  DEPS kvr::cuda_backend_emulated kvr::cuda_emulator kvr::engine kvr::retrieval_client
  LABELS "unit;cuda_emulated")
# kvr generate --backend cuda (the plugin loader in the CLI) on the emulated
# plugin prints the CPU backend's text, for a prompt that is offloaded.
if(TARGET kvr)
  kvr_test(kvr_generate_cuda_emulated
    COMMAND bash -c "p='Once upon a time, there was a little girl named Lily. She loved to play \
outside in the park with her friends.'$<SEMICOLON> cpu=$(\"$0\" generate --prompt \"$p\" --max_tokens 48) \
&& cuda=$(\"$0\" generate --prompt \"$p\" --max_tokens 48 --backend cuda --cuda_plugin \"$1\") \
&& echo \"$cuda\" && [ \"$cpu\" = \"$cuda\" ] && [ \${#cuda} -gt \${#p} ]"
      $<TARGET_FILE:kvr> $<TARGET_FILE:kvr_cuda_emulated_plugin>
    LABELS "unit;cuda_emulated" TIMEOUT 300)
endif()
