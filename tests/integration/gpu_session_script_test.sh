#!/usr/bin/env bash
# The CPU-side parts of bench/gpu_session.sh (tests/attend_batch.cmake):
#  * --table DIR turns gpu_decode_bench rows (decode.json + decode-1m.json)
#    into crossover.txt: s/token scaled to 32 layers, retrieval's speed-up
#    over in-GPU full attention at 32K / 128K and over streaming at 1M, the
#    anchors; a file with no rows is exit 1, a missing one exit 2;
#  * without a GPU (nvidia-smi missing, failing, or listing no GPU) the
#    session stops at once with exit 3 naming the reason, before any build;
#  * bad arguments are exit 2 naming them.
# usage: gpu_session_script_test.sh REPO_ROOT
set -u
repo=$1
script=$repo/bench/gpu_session.sh
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail() { echo "FAIL: $*"; exit 1; }

mkdir -p "$tmp/rows"
cat >"$tmp/rows/decode.json" <<'JSON'
[
  {"mode": "gpu", "context": 32768, "layers": 8, "s_per_token": 0.010000, "attention_s": 0.004, "retrieval_s": 0, "node_s": 0, "gpu_kv_fraction": 1, "note": ""},
  {"mode": "retrieval", "context": 32768, "layers": 8, "s_per_token": 0.020000, "attention_s": 0.001, "retrieval_s": 0.01, "node_s": 0.01, "gpu_kv_fraction": 0.02, "note": ""},
  {"mode": "gpu", "context": 131072, "layers": 8, "s_per_token": 0.040000, "attention_s": 0.03, "retrieval_s": 0, "node_s": 0, "gpu_kv_fraction": 1, "note": ""},
  {"mode": "retrieval", "context": 131072, "layers": 8, "s_per_token": 0.010000, "attention_s": 0.001, "retrieval_s": 0.005, "node_s": 0.005, "gpu_kv_fraction": 0.005, "note": ""}
]
JSON
cat >"$tmp/rows/decode-1m.json" <<'JSON'
[
  {"mode": "retrieval", "context": 1048576, "layers": 2, "s_per_token": 0.005000, "attention_s": 0.001, "retrieval_s": 0.003, "node_s": 0.003, "gpu_kv_fraction": 0.001, "note": ""},
  {"mode": "stream", "context": 1048576, "layers": 2, "s_per_token": 0.100000, "attention_s": 0.09, "retrieval_s": 0, "node_s": 0, "gpu_kv_fraction": 0.1, "note": ""},
  {"mode": "gpu", "context": 1048576, "layers": 2, "s_per_token": 0, "attention_s": 0, "retrieval_s": 0, "node_s": 0, "gpu_kv_fraction": 0, "note": "skipped: KV does not fit"}
]
JSON
bash "$script" --table "$tmp/rows" >"$tmp/out.txt" 2>&1 || fail "--table exited $?: $(cat "$tmp/out.txt")"
table=$tmp/rows/crossover.txt
[[ -f $table ]] || fail "no crossover.txt"
# gpu 0.01 s x 32/8 = 0.04, retrieval 0.08: 0.50x; 128K 0.16 vs 0.04: 4.00x;
# 1M stream 0.1 x 16 = 1.6 vs 0.08: 20.00x, gpu skipped.
grep -Eq '^32768 +\| +0\.0400 +- +0\.0800 \| +0\.50x +-$' "$table" || fail "32K row: $(cat "$table")"
grep -Eq '^131072 +\| +0\.1600 +- +0\.0400 \| +4\.00x +-$' "$table" || fail "128K row: $(cat "$table")"
grep -Eq '^1048576 +\| +skipped +1\.6000 +0\.0800 \| +- +20\.00x$' "$table" || fail "1M row: $(cat "$table")"
grep -q 'RetrievalAttention: 0.155 s/token at 128K' "$table" || fail "anchors missing"
grep -q 'RetroInfer: 4.4x' "$table" || fail "RetroInfer anchor missing"

echo '[]' >"$tmp/empty.json"; mkdir -p "$tmp/none"; mv "$tmp/empty.json" "$tmp/none/decode.json"
bash "$script" --table "$tmp/none" >/dev/null 2>&1; rc=$?
[[ $rc == 1 ]] || fail "--table with no rows exited $rc, want 1"
bash "$script" --table "$tmp/missing" >/dev/null 2>"$tmp/err"; rc=$?
[[ $rc == 2 ]] && grep -q 'decode.json not found' "$tmp/err" || fail "--table of a missing dir: $rc $(cat "$tmp/err")"

# No GPU: nvidia-smi missing, failing, or listing none. The build folder must
# not appear (nothing ran).
mkdir -p "$tmp/bin"
for fake in missing failing empty; do
  rm -f "$tmp/bin/nvidia-smi"
  case $fake in
    failing) printf '#!/bin/sh\necho "NVIDIA-SMI has failed" >&2\nexit 9\n' >"$tmp/bin/nvidia-smi" ;;
    empty) printf '#!/bin/sh\necho "No devices were found"\nexit 0\n' >"$tmp/bin/nvidia-smi" ;;
  esac
  [[ -f $tmp/bin/nvidia-smi ]] && chmod +x "$tmp/bin/nvidia-smi"
  OUT=$tmp/out-$fake PATH="$tmp/bin:/usr/bin:/bin" bash "$script" --crossover >/dev/null \
    2>"$tmp/err"; rc=$?
  [[ $rc == 3 ]] || fail "$fake nvidia-smi: exit $rc, want 3 ($(cat "$tmp/err"))"
  grep -q 'no NVIDIA GPU visible' "$tmp/err" || fail "$fake nvidia-smi: $(cat "$tmp/err")"
done

bash "$script" --layers 0 >/dev/null 2>"$tmp/err"; rc=$?
[[ $rc == 2 ]] && grep -q -- '--layers' "$tmp/err" || fail "--layers 0: exit $rc $(cat "$tmp/err")"
bash "$script" --bogus >/dev/null 2>"$tmp/err"; rc=$?
[[ $rc == 2 ]] && grep -q -- "--bogus" "$tmp/err" || fail "--bogus: exit $rc $(cat "$tmp/err")"
echo PASS
