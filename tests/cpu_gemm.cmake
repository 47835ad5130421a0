# The CPU backend's register-blocked matrix product (session 27, issue 20
# item 3): simd matmul_bf16 / matmul_f32 of every table the CPU has against a
# double oracle (random shapes, adversarial values, bit-identical batches),
# the backend's MatMul against the per-dot path (KVR_CPU_GEMM=dot), and the
# stories260K / random bf16 Llama models' logits and greedy tokens with both.
kvr_test(cpu_gemm_kernel_test SOURCES unit/cpu_gemm_test.cc
  DEPS kvr::common kvr::worker_backend LABELS unit TIMEOUT 120)
kvr_test(cpu_gemm_model_test SOURCES unit/cpu_gemm_model_test.cc
  DEPS kvr::llama_reference LABELS unit TIMEOUT 120)
# The backend picks its simd table once per process (simd::Active()): its
# MatMul and the models run again on each forced table (the kernel tests
# above already cover every table through simd::ForIsa).
foreach(isa scalar avx2)
  kvr_test(cpu_gemm_backend_test_${isa} COMMAND cpu_gemm_kernel_test
    --gtest_filter=CpuGemmBackendTest.*
    LABELS unit TIMEOUT 120 ENVIRONMENT KVR_SIMD=${isa})
  kvr_test(cpu_gemm_model_test_${isa} COMMAND cpu_gemm_model_test
    LABELS unit TIMEOUT 120 ENVIRONMENT KVR_SIMD=${isa})
endforeach()
