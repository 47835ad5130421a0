#!/usr/bin/env bash
# n choices sharing one prefill (issue 19, session 26): one /v1/completions
# request with n choices (the gateway sends ONE worker request; the worker
# prefills once and forks) against n concurrent n = 1 requests with seeds
# seed + j (what the gateway sent before: n worker requests, n prefills).
# Both give the same choices; the table shows wall time and the worker's
# prefill count and prefill seconds (its metrics) per mode, median of
# --reps runs.
#
# Usage: bench/fork_bench.sh --worker PATH --gateway PATH [--n 8]
#          [--prompt_words 150] [--max_tokens 16] [--reps 3] [--mode retrieval|full]
# Prints a markdown table. Every process it starts is stopped on exit.
set -euo pipefail

worker="" gateway="" n=8 words=150 max_tokens=16 reps=3 mode=retrieval
while [[ $# -gt 0 ]]; do
  case "$1" in
    --worker) worker=$2; shift 2 ;;
    --gateway) gateway=$2; shift 2 ;;
    --n) n=$2; shift 2 ;;
    --prompt_words) words=$2; shift 2 ;;
    --max_tokens) max_tokens=$2; shift 2 ;;
    --reps) reps=$2; shift 2 ;;
    --mode) mode=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
[[ -x "$worker" && -x "$gateway" ]] || { echo "usage: $0 --worker PATH --gateway PATH" >&2; exit 2; }

dir=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$dir"
}
trap cleanup EXIT

# Waits (<= 60 s) for "<prefix>HOST:PORT" in file $1; prints HOST:PORT.
wait_line() {
  local file=$1 prefix=$2
  for _ in $(seq 600); do
    if line=$(grep -m1 "^$prefix" "$file" 2>/dev/null); then echo "${line#"$prefix"}"; return 0; fi
    sleep 0.1
  done
  echo "timed out waiting for '$prefix' in $file" >&2
  cat "$file" >&2
  return 1
}

"$worker" --listen=127.0.0.1:0 --metrics_listen=127.0.0.1:0 --max_concurrent=$((n + 1)) \
  --max_n="$n" >"$dir/worker.out" 2>&1 &
pids+=($!)
waddr=$(wait_line "$dir/worker.out" "kvr_worker listening on ")
wmetrics=$(wait_line "$dir/worker.out" "kvr_worker metrics on ")
"$gateway" --workers="$waddr" --listen=127.0.0.1:0 --http_listen=127.0.0.1:0 \
  --metrics_listen=127.0.0.1:0 --max_n="$n" >"$dir/gateway.out" 2>&1 &
pids+=($!)
wait_line "$dir/gateway.out" "kvr_gateway listening on " >/dev/null
http=$(wait_line "$dir/gateway.out" "kvr_gateway http on ")
model=$(curl -sf "http://$http/v1/models" | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')

story="Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her friends."
prompt=$(python3 -c "import sys; w=sys.argv[1].split(); print(' '.join((w*1000)[:int(sys.argv[2])]))" "$story" "$words")

metric() {  # sum of a worker metric's samples
  curl -sf "http://$wmetrics/metrics" | awk -v m="$1" '$1==m {s+=$2} END {printf "%.6f\n", s}'
}
body() {  # body N SEED
  python3 -c 'import json,sys; print(json.dumps({"model":sys.argv[1],"prompt":sys.argv[2],"max_tokens":int(sys.argv[3]),"temperature":0.8,"seed":int(sys.argv[5]),"n":int(sys.argv[4]),"kvr":{"mode":sys.argv[6]}}))' \
    "$model" "$prompt" "$max_tokens" "$1" "$2" "$mode"
}
now() { date +%s.%N; }

declare -A wall prefills prefill_s
for kind in one_request separate; do
  for r in $(seq "$reps"); do
    c0=$(metric kvr_worker_prefill_duration_seconds_count)
    s0=$(metric kvr_worker_prefill_duration_seconds_sum)
    t0=$(now)
    if [[ $kind == one_request ]]; then
      curl -sf -H 'Content-Type: application/json' -d "$(body "$n" 7)" \
        "http://$http/v1/completions" >"$dir/one.json"
    else
      cpids=()
      for j in $(seq 0 $((n - 1))); do
        curl -sf -H 'Content-Type: application/json' -d "$(body 1 $((7 + j)))" \
          "http://$http/v1/completions" >"$dir/sep.$j.json" &
        cpids+=($!)
      done
      for p in "${cpids[@]}"; do wait "$p"; done
    fi
    t1=$(now)
    c1=$(metric kvr_worker_prefill_duration_seconds_count)
    s1=$(metric kvr_worker_prefill_duration_seconds_sum)
    wall[$kind]+="$(python3 -c "print($t1-$t0)") "
    prefills[$kind]=$(python3 -c "print(int($c1-$c0))")
    prefill_s[$kind]+="$(python3 -c "print($s1-$s0)") "
  done
done
# The same choices either way (choice j = seed 7 + j).
python3 - "$dir" "$n" <<'EOF'
import json, sys
d, n = sys.argv[1], int(sys.argv[2])
one = json.load(open(f"{d}/one.json"))["choices"]
for j in range(n):
    sep = json.load(open(f"{d}/sep.{j}.json"))["choices"][0]["text"]
    if one[j]["text"] != sep:
        sys.exit(f"choice {j} differs from the separate request with seed {7 + j}")
EOF
median() { python3 -c "import statistics,sys; print('%.3f' % statistics.median(map(float, sys.argv[1:])))" $1; }
echo "| mode ($mode, n=$n, prompt ${words} words, max_tokens $max_tokens) | wall s (median of $reps) | prefills | prefill s (median) |"
echo "|---|---|---|---|"
for kind in one_request separate; do
  echo "| $kind | $(median "${wall[$kind]}") | ${prefills[$kind]} | $(median "${prefill_s[$kind]}") |"
done
