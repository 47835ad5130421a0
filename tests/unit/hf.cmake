# gpu_worker/model: Hugging Face checkpoints (config.json, safetensors, the
# llama2c -> HF converter) and the SentencePiece / tokenizer.json tokenizers.
find_package(nlohmann_json 3 CONFIG REQUIRED)  # imported targets are directory-scoped
kvr_test(hf_model_test SOURCES unit/hf_model_test.cc DEPS kvr::model nlohmann_json::nlohmann_json)
kvr_test(tokenizers_test SOURCES unit/tokenizers_test.cc DEPS kvr::model nlohmann_json::nlohmann_json)
