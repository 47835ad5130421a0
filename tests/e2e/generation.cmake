# gpu_worker/server: a real kvr_worker (in-process node) on loopback vs the
# embedded engine; streaming, concurrency, cancellation, bad requests,
# overload, health, reflection, SIGTERM; and a worker on a real kvr_node.
add_executable(generation_e2e_test e2e/generation_test.cc)
target_compile_options(generation_e2e_test PRIVATE ${KVR_WARNINGS})
kvr_link_protobuf_first(generation_e2e_test)  # libsentencepiece: see cmake/KvrTargets.cmake
target_link_libraries(generation_e2e_test PRIVATE kvr::proto
  kvr::health_proto kvr::engine kvr::retrieval_client kvr::model GTest::gtest)
add_dependencies(generation_e2e_test kvr_worker kvr_node kvr_cuda_emulated_plugin)
add_test(NAME generation_e2e_test
  COMMAND generation_e2e_test --kvr_worker $<TARGET_FILE:kvr_worker>
    --kvr_node $<TARGET_FILE:kvr_node>
    --cuda_emulated_plugin $<TARGET_FILE:kvr_cuda_emulated_plugin>)
set_tests_properties(generation_e2e_test PROPERTIES LABELS e2e TIMEOUT 300
  ENVIRONMENT "${KVR_TEST_ENVIRONMENT}")
