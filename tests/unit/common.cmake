# tests for this area
kvr_test(half_test SOURCES unit/half_test.cc DEPS kvr::common LABELS unit)
kvr_test(simd_test SOURCES unit/simd_test.cc DEPS kvr::common LABELS unit)

# Active() picks its table once per process, so each KVR_SIMD value gets its
# own run of the same binary (without KVR_SIMD the test forces "scalar").
kvr_test(simd_dispatch_test SOURCES unit/simd_dispatch_test.cc DEPS kvr::common LABELS unit)
foreach(isa avx2 avx512 bogus)
  kvr_test(simd_dispatch_test_${isa} COMMAND simd_dispatch_test
    TIMEOUT 60 ENVIRONMENT KVR_SIMD=${isa})
endforeach()
# common/Subprocess: log file, kept lines, process group, signal mask,
# PollExit, failed exec.
kvr_test(subprocess_test SOURCES unit/subprocess_test.cc DEPS kvr::common LABELS unit TIMEOUT 60)
