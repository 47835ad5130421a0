#!/usr/bin/env bash
# Installs every Debian 12 package kvr needs to build, test and benchmark.
# Idempotent: prints nothing and touches nothing when all packages are present.
# Run as root, or as a user who can sudo.
set -euo pipefail

packages=(
  # toolchain
  build-essential cmake ninja-build ccache pkg-config git
  # core libraries
  libabsl-dev nlohmann-json3-dev libsentencepiece-dev
  # services: RPC, persistence, data plane, metrics
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  librocksdb-dev libucx-dev prometheus-cpp-dev
  # gateway: OpenAI-compatible HTTP server
  libcpp-httplib-dev
  # tests and benchmarks
  libgtest-dev libgmock-dev libbenchmark-dev prometheus
  # fuzzing (`make fuzz`): clang with its libFuzzer + ASan/UBSan runtimes
  # (-fsanitize=fuzzer links libclang_rt.fuzzer from libclang-rt-dev)
  clang libclang-rt-dev
  # deploy validation: Helm-compatible chart rendering (Go text/template +
  # sprig), values.schema.json and manifest checks
  golang-go golang-github-masterminds-sprig-dev golang-gopkg-yaml.v2-dev
  python3-jsonschema python3-yaml nodejs
  # chat templates: jinja2 is the oracle of the C++ Jinja subset
  # (tests/unit/jinja_oracle.py)
  python3-jinja2
  # benchmark peers (only the benchmarks link them)
  libfaiss-dev libhnswlib-dev libopenblas-dev
)
# npm: Debian's package, unless a nodejs build that bundles npm is installed.
command -v npm >/dev/null || packages+=(npm)

missing=()
for p in "${packages[@]}"; do
  status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
  [[ "$status" == "install ok installed" ]] || missing+=("$p")
done
if [[ ${#missing[@]} -gt 0 ]]; then
  sudo=""
  if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null || { echo "install-deps: need root or sudo to install: ${missing[*]}" >&2; exit 1; }
    sudo="sudo"
  fi
  echo "install-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Deploy validation's npm packages (Kubernetes / prometheus-operator schemas,
# Grafana's schema, TypeScript), pinned by tests/deploy/package-lock.json and
# installed into tests/deploy/node_modules (git-ignored): the registry is
# reachable at install time only, the tests run offline. Silent and skipped
# when the installed tree matches the lock file. KVR_SKIP_NPM=1 skips it
# (container builds).
deploy_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/tests/deploy"
if [[ -z "${KVR_SKIP_NPM:-}" && -f "$deploy_dir/package-lock.json" ]] &&
   ! cmp -s "$deploy_dir/package-lock.json" "$deploy_dir/node_modules/.kvr-installed-lock"; then
  echo "install-deps: npm ci in tests/deploy"
  (cd "$deploy_dir" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
  cp "$deploy_dir/package-lock.json" "$deploy_dir/node_modules/.kvr-installed-lock"
fi

# The OpenAI conformance test's npm packages (the official `openai` Node SDK
# v4 and @grpc/grpc-js for the gRPC oracle), pinned by
# tests/openai_sdk/package-lock.json into tests/openai_sdk/node_modules
# (git-ignored); same rules as tests/deploy's above.
sdk_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/tests/openai_sdk"
if [[ -z "${KVR_SKIP_NPM:-}" && -f "$sdk_dir/package-lock.json" ]] &&
   ! cmp -s "$sdk_dir/package-lock.json" "$sdk_dir/node_modules/.kvr-installed-lock"; then
  echo "install-deps: npm ci in tests/openai_sdk"
  (cd "$sdk_dir" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
  cp "$sdk_dir/package-lock.json" "$sdk_dir/node_modules/.kvr-installed-lock"
fi
