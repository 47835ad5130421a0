# Entry points. Every target installs what is missing first (scripts/install-deps.sh
# is idempotent and silent when everything is present).
#
#   make run        build the kvr CLI, then generate text with the embedded default
#   make test       build, then run the default test suite (everything but `slow`)
#   make test-slow  the long tests (ctest label `slow`)
#   make bench      build the benchmarks (see docs/benchmarks.md for commands)
#   make fuzz       build the libFuzzer harnesses with clang + ASan + UBSan in
#                   $(FUZZ_DIR) (build-fuzz/; the main gcc build is untouched)
#                   and run each for FUZZ_SECONDS (default 60); FUZZ_HARNESSES
#                   picks some (fuzz/README.md)
#   make cluster    build the servers, then run a local cluster (3 retrieval nodes,
#                   worker, gateway on 127.0.0.1) until Ctrl-C; CLUSTER_FLAGS are
#                   passed to `kvr cluster` (see tools/README.md)

BUILD_DIR ?= build
BUILD_TYPE ?= RelWithDebInfo
JOBS ?= 2
CMAKE_FLAGS ?=
# CI (which sets $CI) builds with warnings as errors.
ifneq ($(CI),)
CMAKE_FLAGS += -DKVR_WERROR=ON
endif
CTEST_FLAGS ?=

FUZZ_DIR ?= build-fuzz
FUZZ_SECONDS ?= 60
FUZZ_HARNESSES ?= ucx_wire index llama2c llama2c_tokenizer sentencepiece hf_bpe safetensors openai \
  store node_service worker

.PHONY: deps configure build run test test-slow bench clean fuzz

deps:
	@bash scripts/install-deps.sh

configure: deps
	@cmake -S . -B $(BUILD_DIR) -G Ninja -DCMAKE_BUILD_TYPE=$(BUILD_TYPE) $(CMAKE_FLAGS) >/dev/null

build: configure
	@cmake --build $(BUILD_DIR) -j $(JOBS)

run: configure
	@cmake --build $(BUILD_DIR) -j $(JOBS) --target kvr
	@$(BUILD_DIR)/tools/kvr generate --prompt "Once upon a time" --max_tokens 120

test: build
	@cd $(BUILD_DIR) && ctest -LE slow --output-on-failure -j $(JOBS) $(CTEST_FLAGS)

test-slow: build
	@cd $(BUILD_DIR) && ctest -L slow --output-on-failure $(CTEST_FLAGS)

bench: build

fuzz: deps
	@cmake -S . -B $(FUZZ_DIR) -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
	  -DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++ -DKVR_FUZZ=ON \
	  -DKVR_BUILD_TESTS=OFF -DKVR_BUILD_BENCH=OFF -DKVR_WITH_CUDA=OFF >/dev/null
	@cmake --build $(FUZZ_DIR) -j $(JOBS) --target fuzz_all
	@bash fuzz/run_fuzzers.sh $(FUZZ_DIR) $(FUZZ_SECONDS) $(FUZZ_HARNESSES)

.PHONY: cluster
CLUSTER_FLAGS ?=
cluster: configure
	@cmake --build $(BUILD_DIR) -j $(JOBS) --target kvr kvr_node kvr_worker kvr_gateway
	@$(BUILD_DIR)/tools/kvr cluster $(CLUSTER_FLAGS)

clean:
	rm -rf $(BUILD_DIR) $(FUZZ_DIR)
