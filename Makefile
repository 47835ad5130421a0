# Entry points. Every target installs what is missing first (scripts/install-deps.sh
# is idempotent and silent when everything is present).
#
#   make run        build the kvr CLI, then generate text with the embedded default
#   make test       build, then run the default test suite (everything but `slow`)
#   make test-slow  the long tests (ctest label `slow`)
#   make bench      build the benchmarks (see docs/benchmarks.md for commands)

BUILD_DIR ?= build
BUILD_TYPE ?= RelWithDebInfo
JOBS ?= 2
CMAKE_FLAGS ?=
CTEST_FLAGS ?=

.PHONY: deps configure build run test test-slow bench clean

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

clean:
	rm -rf $(BUILD_DIR)
