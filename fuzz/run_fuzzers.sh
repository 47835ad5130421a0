#!/usr/bin/env bash
# Runs libFuzzer harnesses built by `make fuzz` (fuzz/README.md).
#
#   fuzz/run_fuzzers.sh BUILD_DIR SECONDS HARNESS...
#
# Each harness fuzzes for SECONDS on a scratch corpus BUILD_DIR/fuzz-corpus/<h>
# (new inputs go there) seeded from fuzz/corpus/<h> (read only), with
# -rss_limit_mb / -malloc_limit_mb 2048 (an input that makes a parser
# allocate more counts as a crash) and -timeout 10 (a slow input, too).
# Crashes land in BUILD_DIR/fuzz-artifacts/<h>/. Prints one summary line per
# harness (seconds it ran, execs, coverage = libFuzzer's last "cov:" count,
# corpus = its last "corp:" count, crash files) and exits 1 when any harness
# crashed.
set -uo pipefail
build_dir=$1
seconds=$2
shift 2
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
status=0
summary=()
for h in "$@"; do
  bin="$build_dir/fuzz/fuzz_$h"
  [[ -x "$bin" ]] || { echo "run_fuzzers: $bin is missing (make fuzz builds it)" >&2; exit 2; }
  scratch="$build_dir/fuzz-corpus/$h"
  artifacts="$build_dir/fuzz-artifacts/$h"
  mkdir -p "$scratch" "$artifacts"
  log="$build_dir/fuzz-logs/$h.log"
  mkdir -p "$(dirname "$log")"
  start=$SECONDS
  KVR_MODELS="$root/models" "$bin" -max_total_time="$seconds" -rss_limit_mb=2048 \
    -malloc_limit_mb=2048 -timeout=10 -print_final_stats=1 \
    -artifact_prefix="$artifacts/" "$scratch" "$root/fuzz/corpus/$h" >"$log" 2>&1
  rc=$?
  elapsed=$((SECONDS - start))
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
  cov=$(grep -o 'cov: [0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
  corp=$(grep -o 'corp: [0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
  crashes=$(find "$artifacts" -type f | wc -l)
  summary+=("$(printf '%-20s %6ss %12s execs  cov %6s  corpus %6s  %s crash file(s)  rc %s' \
    "$h" "$elapsed" "${execs:-?}" "${cov:-?}" "${corp:-?}" "$crashes" "$rc")")
  if [[ $rc -ne 0 ]]; then
    status=1
    echo "run_fuzzers: $h failed (rc $rc); see $log and $artifacts/" >&2
    grep -m3 -E 'ERROR|SUMMARY' "$log" >&2 || true
  fi
done
printf '%s\n' "${summary[@]}"
exit $status
