# Issue 17, items 1 and 2: the attention data families (tools/attention_data)
# and index_bench running every method on every family.
kvr_test(attention_families_test SOURCES unit/attention_families_test.cc
  DEPS kvr::attention_data TIMEOUT 300)

# index_bench at a small shape on every family, with a stand-in for the
# RoarGraph reference that checks the files it is handed (label slow: a
# benchmark's smoke test).
if(TARGET index_bench)
  find_package(Python3 REQUIRED COMPONENTS Interpreter)
  kvr_test(index_bench_families_test
    COMMAND ${Python3_EXECUTABLE} ${CMAKE_CURRENT_SOURCE_DIR}/index_families_check.py
            $<TARGET_FILE:index_bench>
    NEEDS index_bench LABELS slow TIMEOUT 600)
endif()
