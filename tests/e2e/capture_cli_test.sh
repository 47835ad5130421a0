#!/bin/bash
# `kvr capture` from the command line: the files of one layer, the manifest's
# tokens = `kvr generate --mode full` (token-identical text), the exit status
# of a refused run (1: non-empty --out; 2: a bad flag), and, when index_bench
# is built, that it reads the captured head unchanged (its row counts are
# P + G keys, P * group training and G * group decode queries; flat recall 1).
#
# usage: capture_cli_test.sh KVR [INDEX_BENCH]
set -u
kvr=$1
bench=${2:-}
dir=$(mktemp -d "${TMPDIR:-/tmp}/kvr_capture_cli_XXXXXX")
trap 'rm -rf "$dir"' EXIT
fail() { echo "FAIL: $*"; exit 1; }

prompt="Once upon a time, there was a little girl named Lily. She"
"$kvr" capture --prompt "$prompt" --generate 40 --layers 3 --out "$dir/cap" 2>"$dir/err" ||
  fail "kvr capture exited $?: $(cat "$dir/err")"
n_files=$(ls "$dir/cap" | wc -l)
[ "$n_files" = 17 ] || fail "want 4 kv heads x 4 files + manifest.json = 17 files, got $n_files"
[ -z "$(ls "$dir/cap" | grep -v -E '^(L3_H[0-3]_(keys|values|train|queries)\.npy|manifest\.json)$')" ] ||
  fail "unexpected files: $(ls "$dir/cap")"
m="$dir/cap/manifest.json"
p=$(sed -n 's/^  "prompt_tokens": \([0-9]*\),$/\1/p' "$m")
g=$(sed -n 's/^  "generated_tokens": \([0-9]*\),$/\1/p' "$m")
[ -n "$p" ] && [ "$g" = 40 ] || fail "manifest: prompt_tokens '$p', generated_tokens '$g' (want 40)"
text=$(sed -n 's/^  "generated_text": "\(.*\)",$/\1/p' "$m")

# Capture on = capture off: the engine's full-attention greedy text.
"$kvr" generate --mode full --max_tokens 40 --prompt "$prompt" >"$dir/gen" 2>"$dir/gen_err" ||
  fail "kvr generate exited $?: $(cat "$dir/gen_err")"
[ "$(cat "$dir/gen")" = "$prompt$text" ] ||
  fail "kvr generate gave '$(cat "$dir/gen")', capture recorded '$prompt$text'"

# Refusals and their exit status.
"$kvr" capture --prompt "$prompt" --out "$dir/cap" 2>"$dir/err"
rc=$?
[ $rc = 1 ] && grep -q -- "--force" "$dir/err" || fail "non-empty --out: exit $rc, $(cat "$dir/err")"
"$kvr" capture --prompt "$prompt" --out "$dir/other" --layers 1,x 2>"$dir/err"
rc=$?
[ $rc = 2 ] && grep -q -- "--layers" "$dir/err" || fail "bad --layers: exit $rc, $(cat "$dir/err")"
[ ! -e "$dir/other" ] || fail "a refused capture created its --out"

if [ -n "$bench" ]; then
  (cd "$dir/cap" && "$bench" --keys=L3_H0_keys.npy --values=L3_H0_values.npy \
      --train=L3_H0_train.npy --queries=L3_H0_queries.npy --k=8 --train_k=8 \
      --methods=flat,graph --graph_beams=8,16 --threads=1 --json=rows.json) >"$dir/bench" 2>&1 ||
    fail "index_bench exited $?: $(tail -5 "$dir/bench")"
  want="=== external: N=$((p + g)) d=8 train=$((p * 2)) test=$((g * 2)) k=8 ==="
  grep -q -F -- "$want" "$dir/bench" || fail "index_bench: want '$want' in $(cat "$dir/bench")"
  grep -q '"method": "flat", "param": "exact", "recall": 1.000000' "$dir/cap/rows.json" ||
    fail "index_bench rows: $(cat "$dir/cap/rows.json")"
  grep -q '"method": "graph"' "$dir/cap/rows.json" || fail "no graph rows"
fi
echo "PASS: $p prompt + $g generated tokens captured; index_bench read them"
