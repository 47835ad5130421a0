# retrieval_node/server metrics: a real kvr_node's /metrics scraped over
# loopback, counters checked against the calls made, text checked by
# `promtool check metrics` (Debian package prometheus; skipped without it).
add_executable(metrics_test integration/metrics_test.cc)
target_compile_options(metrics_test PRIVATE ${KVR_WARNINGS})
target_link_libraries(metrics_test PRIVATE kvr::remote_clients GTest::gtest)
add_dependencies(metrics_test kvr_node)
add_test(NAME metrics_test COMMAND metrics_test --kvr_node $<TARGET_FILE:kvr_node>)
set_tests_properties(metrics_test PROPERTIES LABELS integration TIMEOUT 120)
