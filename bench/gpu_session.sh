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
#   bash bench/gpu_session.sh --crossover [--layers N]   # the decode crossover only
#   bash bench/gpu_session.sh --table DIR                # rebuild DIR/crossover.txt
# Output: $OUT if set (the device tool's folder), else ./gpu-out:
#   env.txt, build.log, ctest-gpu.log, sanitizer-*.log, decode.txt/.json,
#   decode-1m.txt/.json (--with-1m, --crossover), crossover.txt, summary.txt
#   (one line per step).
#
# --crossover (issue 20 item 4, one time-limited command, ~12 min at most):
# builds gpu_decode_bench only, runs it at 32K and 128K (gpu = in-GPU full
# attention, retrieval) and at 1M (retrieval, stream: the in-GPU KV does not
# fit), then writes crossover.txt: s/token scaled to 32 layers per mode and
# context, retrieval's speed-up over in-GPU full attention (or over
# streaming the KV from the host, at 1M), beside the published anchors.
# Without an NVIDIA GPU (nvidia-smi -L lists none) the script stops at once
# with exit 3 saying so; --table needs no GPU (it reads the JSON rows).
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
crossover=0
table_dir=
while [[ $# -gt 0 ]]; do
  case "$1" in
    --layers) layers=$2; shift 2 ;;
    --layers=*) layers=${1#--layers=}; shift ;;
    --with-1m) with_1m=1; shift ;;
    --skip-sanitizer) sanitizer=0; shift ;;
    --crossover) crossover=1; with_1m=1; sanitizer=0; shift ;;
    --table) table_dir=${2:-}; shift 2 || { echo "gpu_session.sh: --table needs DIR" >&2; exit 2; } ;;
    --table=*) table_dir=${1#--table=}; shift ;;
    -h|--help) sed -n '2,38p' "$0"; exit 0 ;;
    *) echo "gpu_session.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
if ! [[ $layers =~ ^[0-9]+$ ]] || (( layers < 1 || layers > 32 )); then
  echo "gpu_session.sh: --layers '$layers' outside [1, 32]" >&2
  exit 2
fi

# crossover_table DIR: DIR/crossover.txt from DIR/decode.json and (when
# present) DIR/decode-1m.json, the rows gpu_decode_bench writes (one JSON
# object per line). Needs no GPU. Exit 1 when no row could be read.
crossover_table() {
  local dir=$1
  local files=("$dir/decode.json")
  [[ -f $dir/decode-1m.json ]] && files+=("$dir/decode-1m.json")
  awk '
    function field(line, key,    m) {
      if (match(line, "\"" key "\": *\"[^\"]*\"")) {
        m = substr(line, RSTART, RLENGTH); sub("^\"" key "\": *\"", "", m); sub("\"$", "", m)
        return m
      }
      if (match(line, "\"" key "\": *[-0-9.eE+]+")) {
        m = substr(line, RSTART, RLENGTH); sub("^\"" key "\": *", "", m); return m
      }
      return ""
    }
    /"mode"/ {
      mode = field($0, "mode"); ctx = field($0, "context") + 0; l = field($0, "layers") + 0
      s = field($0, "s_per_token") + 0; note = field($0, "note")
      if (l < 1) next
      if (!(ctx in seen)) { seen[ctx] = 1; order[++n] = ctx }
      if (note != "" || s <= 0) { skipped[ctx, mode] = note; next }
      t[ctx, mode] = s * 32 / l
    }
    function cell(c, m) {
      if ((c, m) in t) return sprintf("%.4f", t[c, m])
      if ((c, m) in skipped) return "skipped"
      return "-"
    }
    function ratio(c, a, b) {
      if ((c, a) in t && (c, b) in t && t[c, b] > 0) return sprintf("%.2fx", t[c, a] / t[c, b])
      return "-"
    }
    END {
      if (n == 0) { print "no gpu_decode_bench rows found" > "/dev/stderr"; exit 1 }
      # contexts ascending
      for (i = 1; i <= n; ++i) for (j = i + 1; j <= n; ++j)
        if (order[j] < order[i]) { x = order[i]; order[i] = order[j]; order[j] = x }
      print "decode crossover on the GPU: s/token scaled to 32 layers (Llama-3-8B shape), batch 1"
      printf "%-9s | %12s %12s %12s | %18s %18s\n", "context", "gpu s/tok", "stream s/tok",
             "retr s/tok", "retrieval vs gpu", "retrieval vs stream"
      for (i = 1; i <= n; ++i) {
        c = order[i]
        printf "%-9d | %12s %12s %12s | %18s %18s\n", c, cell(c, "gpu"), cell(c, "stream"),
               cell(c, "retrieval"), ratio(c, "gpu", "retrieval"), ratio(c, "stream", "retrieval")
      }
      print ""
      print "anchors (published, batch 1 unless noted):"
      print "  RetrievalAttention: 0.155 s/token at 128K, A100 (retrieval on the CPU)"
      print "  MagicPIG: 0.054 s/token at 96K, RTX 4090 (CPU attention)"
      print "  RetroInfer: 4.4x full-attention decode throughput at 120K, A100;"
      print "              12.2x over sparse baselines at 1M"
      print "speed-up = baseline s/token / retrieval s/token (> 1: retrieval faster)."
    }' "${files[@]}" >"$dir/crossover.txt"
}

if [[ -n $table_dir ]]; then
  if [[ ! -f $table_dir/decode.json ]]; then
    echo "gpu_session.sh: --table: $table_dir/decode.json not found" >&2
    exit 2
  fi
  crossover_table "$table_dir" || exit 1
  cat "$table_dir/crossover.txt"
  exit 0
fi

# A GPU session without a GPU would only fail later, step by step: stop now.
gpus=$(nvidia-smi -L 2>&1)
if [[ $? != 0 ]] || ! grep -q '^GPU [0-9]' <<<"$gpus"; then
  echo "gpu_session.sh: no NVIDIA GPU visible (nvidia-smi -L: ${gpus:-nothing}); nothing run" >&2
  exit 3
fi

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
if [[ $crossover == 1 ]]; then
  step build 420 build.log cmake --build "$build" -j "$(nproc)" --target gpu_decode_bench || exit 1
else
  step build 420 build.log cmake --build "$build" -j "$(nproc)" --target cuda_backend_test \
    cuda_plugin_test kvr_cuda_plugin gpu_decode_bench || exit 1
  step ctest-gpu 240 ctest-gpu.log ctest --test-dir "$build" -L gpu --output-on-failure
fi

if [[ $sanitizer == 1 ]] && command -v compute-sanitizer >/dev/null; then
  # The op tests only (the stories260K ones run minutes under the tools).
  filter='--gtest_filter=CudaBackendTest.*'
  step memcheck 300 sanitizer-memcheck.log compute-sanitizer --tool memcheck --error-exitcode 1 \
    "$build/tests/cuda_backend_test" "$filter"
  step racecheck 300 sanitizer-racecheck.log compute-sanitizer --tool racecheck \
    --error-exitcode 1 "$build/tests/cuda_backend_test" "$filter"
fi

decode_limit=600
[[ $crossover == 1 ]] && decode_limit=240
decode_modes=gpu,stream,retrieval
[[ $crossover == 1 ]] && decode_modes=gpu,retrieval
step decode $decode_limit decode.txt "$build/bench/gpu_decode_bench" --contexts=32768,131072 \
  --layers="$layers" --modes=$decode_modes --json="$out/decode.json"
if [[ $with_1m == 1 ]]; then
  step decode-1m $decode_limit decode-1m.txt "$build/bench/gpu_decode_bench" \
    --contexts=1048576 --layers=2 --modes=retrieval,stream --json="$out/decode-1m.json"
fi
if [[ -f $out/decode.json ]] && crossover_table "$out"; then
  echo "crossover: table in crossover.txt" | tee -a "$out/summary.txt"
  cat "$out/crossover.txt"
else
  echo "crossover: no gpu_decode_bench rows to tabulate" | tee -a "$out/summary.txt"
  failed=1
fi

echo "total: $((SECONDS - started)) s" | tee -a "$out/summary.txt"
exit $failed
