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

# The gateway with a model's own template (an HF checkpoint converted from
# stories260K + tokenizer_config.json with the Llama-3 template): the prompt
# the worker gets is jinja2's rendering; stop at generation_config's
# eos_token_id; --chat_template override; raise_exception → 400.
if(KVR_WITH_SERVICES AND Python3_Interpreter_FOUND)
  kvr_test(chat_template_e2e_test SOURCES e2e/chat_template_test.cc OWN_MAIN PROTOBUF_FIRST
    DEPS kvr::proto kvr::model kvr::common PkgConfig::CPP_HTTPLIB nlohmann_json::nlohmann_json
      gRPC::grpc++ absl::strings absl::time
    ARGS --kvr_gateway $<TARGET_FILE:kvr_gateway> --kvr_worker $<TARGET_FILE:kvr_worker>
      --templates ${CMAKE_CURRENT_SOURCE_DIR}/data/chat_templates
      --oracle ${CMAKE_CURRENT_SOURCE_DIR}/unit/jinja_oracle.py --python ${Python3_EXECUTABLE}
    NEEDS kvr_gateway kvr_worker
    LABELS e2e TIMEOUT 300)
endif()

# The chat_template fuzz harness (fuzz/chat_template_fuzzer.cc) replayed on
# its seeds (the bundled templates, configs) plus fixed mutations.
if(KVR_WITH_SERVICES AND NOT KVR_FUZZ)
  kvr_test(fuzz_chat_template
    COMMAND $<TARGET_FILE:fuzz_chat_template_replay> --mutations=500
      ${PROJECT_SOURCE_DIR}/fuzz/corpus/chat_template
    NEEDS fuzz_chat_template_replay
    LABELS fuzz
    TIMEOUT 120)
endif()

# The worker's chat settings from tokenizer_config.json /
# generation_config.json / --chat_template, with their bounds.
kvr_test(chat_config_test SOURCES unit/chat_config_test.cc DEPS kvr::model LABELS unit TIMEOUT 60)
