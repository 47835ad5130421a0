# Issue 19 item 2: chat templates. The Jinja subset against Python's jinja2
# configured as transformers' apply_chat_template (tests/unit/jinja_oracle.py
# drives jinja_oracle_driver), its limits and errors, and the gateway's
# /v1/chat/completions with a model's own template.
add_executable(jinja_oracle_driver unit/jinja_oracle_driver.cc)
target_compile_options(jinja_oracle_driver PRIVATE ${KVR_WARNINGS})
target_link_libraries(jinja_oracle_driver PRIVATE kvr::chat_template)

find_package(Python3 COMPONENTS Interpreter)
if(Python3_Interpreter_FOUND)
  kvr_test(jinja_oracle_test
    COMMAND ${Python3_EXECUTABLE} ${CMAKE_CURRENT_SOURCE_DIR}/unit/jinja_oracle.py
      --driver $<TARGET_FILE:jinja_oracle_driver>
      --templates ${CMAKE_CURRENT_SOURCE_DIR}/data/chat_templates
    NEEDS jinja_oracle_driver
    LABELS unit TIMEOUT 120)
endif()

# Limits (template bytes, depth, loop iterations, output / string bytes,
# macro recursion) with the limit named, error positions, raise_exception.
kvr_test(jinja_test SOURCES unit/jinja_test.cc DEPS kvr::chat_template LABELS unit TIMEOUT 60)
