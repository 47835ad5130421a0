#!/usr/bin/env bash
# One GPU session's checks and measurements in one command, for a machine
# with CMake, ninja and nvcc but no package registry (the device tool's H100 /
# H200). Every step has its own time limit, so one hang cannot eat a scarce
# session, and writes its log to the output folder; the script goes on after
# a failed step and exits non-zero if any failed.
#
# Here, first (Debian packages installed):
#   gpu_worker/backend/cuda/bundle_deps.sh        # -> .gpu_deps/ (abseil,
#                                                 #    GoogleTest, stories260K)
# There, from the repository root, carrying .gpu_deps:
#   bash bench/gpu_session.sh [--layers N] [--with-1m] [--skip-sanitizer]
# Output: $OUT if set (the device tool's folder), else ./gpu-out:
#   env.txt, build.log, ctest-gpu.log, sanitizer-*.log, decode.txt/.json,
#   decode-1m.txt/.json (--with-1m), summary.txt (one line per step).
#
# Steps: nvidia-smi + nvcc; configure (KVR_WITH_SERVICES=OFF, sm_90 only) and
# build the GPU tests and gpu_decode_bench; ctest -L gpu (every op against the
# CPU backend, stories260K greedy with full and retrieval attention, the
# plugin); compute-sanitizer memcheck and racecheck on the op tests;
# gpu_decode_bench at 32K and 128K (gpu / stream / retrieval; --layers of the
# 32, the table's last column scales to 32); with --with-1m, 1M tokens with
# 2 layers (retrieval and stream; the in-GPU KV does not fit).
set -uo pipefail

layers=8
with_1m=0
sanitizer=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --layers) layers=$2; shift 2 ;;
    --layers=*) layers=${1#--layers=}; shift ;;
    --with-1m) with_1m=1; shift ;;
    --skip-sanitizer) sanitizer=0; shift ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "gpu_session.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo" || exit 2
out=${OUT:-$repo/gpu-out}
mkdir -p "$out"
deps=$repo/.gpu_deps
build=$repo/build-gpu
failed=0
started=$SECONDS

# step NAME LIMIT_SECONDS LOG COMMAND...: runs COMMAND under a time limit,
# appends its output to LOG and a line to summary.txt.
step() {
  local name=$1 limit=$2 log=$3
  shift 3
  local t0=$SECONDS rc
  echo "== $name (limit ${limit}s)" | tee -a "$out/$log"
  timeout --signal=TERM --kill-after=10 "$limit" "$@" >>"$out/$log" 2>&1
  rc=$?
  local line="$name: exit $rc in $((SECONDS - t0)) s (log $log)"
  [[ $rc == 124 ]] && line="$line: TIMED OUT"
  echo "$line" | tee -a "$out/summary.txt"
  [[ $rc == 0 ]] || failed=1
  return $rc
}

{
  nvidia-smi || true
  nvcc --version || true
  echo "cores: $(nproc)"
  cat "$deps/MANIFEST" 2>/dev/null || echo "no $deps/MANIFEST: run bundle_deps.sh here first"
} >"$out/env.txt" 2>&1

if [[ ! -d $deps/include/absl ]]; then
  echo "gpu_session.sh: $deps holds no abseil; make it with gpu_worker/backend/cuda/bundle_deps.sh" \
       "and carry it" | tee -a "$out/summary.txt" >&2
  exit 2
fi

step configure 180 build.log cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DKVR_WITH_SERVICES=OFF -DKVR_DEPS_PREFIX="$deps" \
  -DCMAKE_CUDA_ARCHITECTURES=90 || exit 1
step build 420 build.log cmake --build "$build" -j "$(nproc)" --target cuda_backend_test \
  cuda_plugin_test kvr_cuda_plugin gpu_decode_bench || exit 1

step ctest-gpu 240 ctest-gpu.log ctest --test-dir "$build" -L gpu --output-on-failure

if [[ $sanitizer == 1 ]] && command -v compute-sanitizer >/dev/null; then
  # The op tests only (the stories260K ones run minutes under the tools).
  filter='--gtest_filter=CudaBackendTest.*'
  step memcheck 300 sanitizer-memcheck.log compute-sanitizer --tool memcheck --error-exitcode 1 \
    "$build/tests/cuda_backend_test" "$filter"
  step racecheck 300 sanitizer-racecheck.log compute-sanitizer --tool racecheck \
    --error-exitcode 1 "$build/tests/cuda_backend_test" "$filter"
fi

step decode 600 decode.txt "$build/bench/gpu_decode_bench" --contexts=32768,131072 \
  --layers="$layers" --json="$out/decode.json"
if [[ $with_1m == 1 ]]; then
  step decode-1m 600 decode-1m.txt "$build/bench/gpu_decode_bench" --contexts=1048576 \
    --layers=2 --modes=retrieval,stream --json="$out/decode-1m.json"
fi

echo "total: $((SECONDS - started)) s" | tee -a "$out/summary.txt"
exit $failed
