# gpu_worker/model: Hugging Face checkpoints (config.json, safetensors, the
# llama2c -> HF converter) and the SentencePiece / tokenizer.json tokenizers.
# Both need nlohmann-json and libsentencepiece, which the KVR_WITH_SERVICES=OFF
# build may lack (kvr::model then compiles those features out).
find_package(nlohmann_json 3 CONFIG QUIET)  # imported targets are directory-scoped
find_package(PkgConfig QUIET)
if(PkgConfig_FOUND)
  pkg_check_modules(KVR_TEST_SENTENCEPIECE QUIET sentencepiece)
endif()
if(nlohmann_json_FOUND AND KVR_TEST_SENTENCEPIECE_FOUND)
  kvr_test(hf_model_test SOURCES unit/hf_model_test.cc
    DEPS kvr::model kvr::llama_reference nlohmann_json::nlohmann_json)
  kvr_test(tokenizers_test SOURCES unit/tokenizers_test.cc
    DEPS kvr::model nlohmann_json::nlohmann_json)
else()
  message(STATUS "kvr: hf_model_test / tokenizers_test skipped (need nlohmann-json and "
    "libsentencepiece)")
endif()
